//! Mirror snapshot schedules (`rbd mirror snapshot schedule …`), run by
//! ternd. A schedule is an interval and an optional start time, at pool or
//! image level; several may apply to one image. Every tick, each primary
//! snapshot-mode image whose newest primary mirror snapshot is older than
//! the latest slot of any of its schedules gets a new mirror snapshot.
//! Deciding from the snapshots themselves (not a remembered "last run")
//! makes the runner survive restarts and follow the primary role: after a
//! promotion the new primary's images are due, the demoted side's are not
//! primary and are skipped.

use crate::mirror::{ImageMirrorMode, Mirror, PoolMirrorMode};
use serde::{Deserialize, Serialize};
use tern_store::{KvTable, MirrorSnapState};
use tern_types::ErrorKind;
use tern_types::error::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Seconds.
    pub interval: u64,
    /// Seconds after midnight UTC, if given.
    pub start: Option<u64>,
}

/// `15m`, `1h`, `1d`; a plain number is minutes (as in rbd). `s` is ours, for labs and tests.
pub fn parse_interval(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let bad = || {
        Error::invalid(format!(
            "invalid interval '{s}': use a number with m, h or d (e.g. 15m)"
        ))
    };
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        "s" => n,
        _ => return Err(bad()),
    };
    if secs == 0 {
        return Err(bad());
    }
    Ok(secs)
}

pub fn fmt_interval(secs: u64) -> String {
    if secs.is_multiple_of(86400) {
        format!("{}d", secs / 86400)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

pub fn parse_start(s: &str) -> Result<u64, Error> {
    let bad = || Error::invalid(format!("invalid start time '{s}': use HH:MM[:SS] (UTC)"));
    let parts: Vec<&str> = s.trim().split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let n = |i: usize, max: u64| -> Result<u64, Error> {
        let v: u64 = parts
            .get(i)
            .map(|p| p.parse().map_err(|_| bad()))
            .unwrap_or(Ok(0))?;
        if v >= max { Err(bad()) } else { Ok(v) }
    };
    Ok(n(0, 24)? * 3600 + n(1, 60)? * 60 + n(2, 60)?)
}

pub fn fmt_start(s: u64) -> String {
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Schedule {
    /// From the words of the CLI: an interval and an optional start time ("" for none).
    pub fn parse(interval: &str, start_time: &str) -> Result<Schedule, Error> {
        Ok(Schedule {
            interval: parse_interval(interval)?,
            start: if start_time.is_empty() {
                None
            } else {
                Some(parse_start(start_time)?)
            },
        })
    }

    /// The newest slot at or before `now` (unix seconds).
    pub fn last_slot(&self, now: u64) -> u64 {
        let anchor = match self.start {
            Some(st) => {
                let today = now - now % 86400 + st;
                if today <= now {
                    today
                } else {
                    today.saturating_sub(86400)
                }
            }
            None => 0,
        };
        if now < anchor {
            return 0;
        }
        anchor + (now - anchor) / self.interval * self.interval
    }

    pub fn next_slot(&self, now: u64) -> u64 {
        self.last_slot(now) + self.interval
    }
}

fn key(pool: &str, image: &str) -> String {
    format!("schedule/{pool}/{image}")
}

impl Mirror {
    pub fn schedules(&self, pool: &str, image: &str) -> Result<Vec<Schedule>, Error> {
        match self.site.store.kv_get(KvTable::Mirror, &key(pool, image))? {
            Some(v) => {
                serde_json::from_str(&v).map_err(|e| Error::new(ErrorKind::Corrupt, e.to_string()))
            }
            None => Ok(vec![]),
        }
    }

    fn save_schedules(&self, pool: &str, image: &str, v: &[Schedule]) -> Result<(), Error> {
        let k = key(pool, image);
        let r = if v.is_empty() {
            self.site.store.kv_delete(KvTable::Mirror, &k).map(|_| ())
        } else {
            self.site.store.kv_put(
                KvTable::Mirror,
                &k,
                &serde_json::to_string(v).expect("json"),
            )
        };
        r.map_err(Error::from)
    }

    pub fn schedule_add(&self, pool: &str, image: &str, s: Schedule) -> Result<(), Error> {
        self.site.store.pool_get(pool)?;
        if !image.is_empty() {
            self.site.store.image_info(pool, image)?;
        }
        let mut v = self.schedules(pool, image)?;
        if !v.contains(&s) {
            v.push(s);
        }
        self.save_schedules(pool, image, &v)
    }

    pub fn schedule_rm(&self, pool: &str, image: &str, s: Option<Schedule>) -> Result<(), Error> {
        let mut v = self.schedules(pool, image)?;
        let before = v.len();
        match &s {
            Some(s) => v.retain(|x| x != s),
            None => v.clear(),
        }
        if v.len() == before {
            return Err(Error::new(ErrorKind::NotFound, "no such schedule"));
        }
        self.save_schedules(pool, image, &v)
    }

    /// Every (pool, image) with schedules; image "" is pool level.
    pub fn all_schedules(&self) -> Result<Vec<(String, String, Vec<Schedule>)>, Error> {
        let mut out = Vec::new();
        for (k, v) in self.site.store.kv_list(KvTable::Mirror, "schedule/")? {
            let rest = &k["schedule/".len()..];
            if let Some((pool, image)) = rest.split_once('/')
                && let Ok(s) = serde_json::from_str(&v)
            {
                out.push((pool.to_string(), image.to_string(), s));
            }
        }
        Ok(out)
    }

    /// One pass: take a mirror snapshot of every primary image that is due.
    /// Returns the images snapshotted.
    pub fn run_schedules(&self, now: u64) -> Result<Vec<String>, Error> {
        let all = self.all_schedules()?;
        let mut done = Vec::new();
        let pools: std::collections::BTreeSet<String> =
            all.iter().map(|(p, _, _)| p.clone()).collect();
        for pool in pools {
            if self
                .pool(&pool)?
                .is_none_or(|p| p.mode == PoolMirrorMode::Disabled)
            {
                continue;
            }
            let pool_level: Vec<Schedule> = all
                .iter()
                .filter(|(p, i, _)| *p == pool && i.is_empty())
                .flat_map(|(_, _, s)| s.clone())
                .collect();
            for img in self.site.store.image_list(&pool)? {
                let Some(m) = self.image(&img.id.to_string())? else {
                    continue;
                };
                if !m.primary || m.mode != ImageMirrorMode::Snapshot {
                    continue;
                }
                let mut scheds = pool_level.clone();
                scheds.extend(
                    all.iter()
                        .filter(|(p, i, _)| *p == pool && *i == img.name)
                        .flat_map(|(_, _, s)| s.clone()),
                );
                let Some(due) = scheds.iter().map(|s| s.last_slot(now)).max() else {
                    continue;
                };
                let newest = self
                    .mirror_snaps(&pool, &img.name)?
                    .iter()
                    .filter(|(_, ms)| ms.state == MirrorSnapState::Primary)
                    .map(|(s, _)| s.created)
                    .max()
                    .unwrap_or(0);
                if newest < due {
                    self.store_flush(&pool, &img.name)?;
                    let s = self.primary_snapshot(&pool, &img.name, MirrorSnapState::Primary)?;
                    tracing::info!(image = %format!("{pool}/{}", img.name), snap = %s.name, "scheduled mirror snapshot");
                    done.push(format!("{pool}/{}", img.name));
                }
            }
        }
        Ok(done)
    }
}

/// Next snapshot times for `schedule status`: (image spec, unix time).
pub fn status(m: &Mirror, pool: &str, image: &str, now: u64) -> Result<Vec<(String, u64)>, Error> {
    let all = m.all_schedules()?;
    let mut out = Vec::new();
    for img in m.site.store.image_list(pool)? {
        if !image.is_empty() && img.name != image {
            continue;
        }
        let Some(mi) = m.image(&img.id.to_string())? else {
            continue;
        };
        if !mi.primary {
            continue;
        }
        let next = all
            .iter()
            .filter(|(p, i, _)| p == pool && (i.is_empty() || *i == img.name))
            .flat_map(|(_, _, s)| s.iter().map(|s| s.next_slot(now)))
            .min();
        if let Some(n) = next {
            out.push((format!("{pool}/{}", img.name), n));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots() {
        let s = Schedule {
            interval: 900,
            start: None,
        };
        assert_eq!(s.last_slot(1000), 900);
        assert_eq!(s.next_slot(1000), 1800);
        let s = Schedule {
            interval: 3600,
            start: Some(8 * 3600),
        };
        let day = 20_000 * 86400;
        assert_eq!(s.last_slot(day + 8 * 3600 + 10), day + 8 * 3600);
        assert_eq!(
            s.last_slot(day + 7 * 3600),
            day - 86400 + 8 * 3600 + 23 * 3600
        );
        assert_eq!(parse_interval("15m").unwrap(), 900);
        assert_eq!(parse_interval("2").unwrap(), 120);
        assert_eq!(parse_interval("1d").unwrap(), 86400);
        assert!(parse_interval("0m").is_err());
        assert!(parse_interval("5x").is_err());
        assert_eq!(parse_start("08:00:00").unwrap(), 8 * 3600);
        assert!(parse_start("25:00").is_err());
        assert_eq!(fmt_interval(3600), "1h");
    }
}
