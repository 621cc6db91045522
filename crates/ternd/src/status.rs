//! The status and health policy: what `tern status` and `mirror image
//! status` / `mirror pool status` say, built from the store and from what
//! mirror daemons reported, never from a silent daemon's last word.

use crate::mirror::{self, Mirror, MirrorStatusState as State, StatusReason as Reason};
use crate::site::Site;
use tern_store::KvTable;
use tern_types::api::{
    MirrorDaemonInfo, MirrorImageStatus, MirrorPoolStatus, MirrorSiteStatus, SiteStatus,
};
use tern_types::error::Error;
use tern_types::mirror::MirrorHealth;
use tern_types::site::Health;

/// The site's status and health.
pub fn site(site: &std::sync::Arc<Site>) -> Result<SiteStatus, Error> {
    let pools = site.store.pool_list()?;
    let mut checks = Vec::new();
    let (mut images, mut provisioned) = (0, 0);
    let no_app: Vec<_> = pools
        .iter()
        .filter(|p| p.application.is_none())
        .map(|p| p.name.clone())
        .collect();
    if !no_app.is_empty() {
        checks.push(format!(
            "POOL_APP_NOT_ENABLED: {} pool(s) do not have an application enabled ({}): run `tern pool init POOL`",
            no_app.len(),
            no_app.join(", ")
        ));
    }
    for p in &pools {
        let st = site.store.pool_stats(&p.name)?;
        images += st.images;
        provisioned += st.provisioned_bytes;
    }
    let used = site.store.used_bytes()?;
    let (total, avail) = statvfs(&site.data_dir);
    let mut health = if checks.is_empty() {
        Health::Ok
    } else {
        Health::Warn
    };
    if total > 0 && avail * 100 / total < 3 {
        checks.push(format!(
            "OSD_FULL: data disk has {} free",
            tern_types::format_size(avail)
        ));
        health = Health::Err;
    } else if total > 0 && avail * 100 / total < 10 {
        checks.push(format!(
            "OSD_NEARFULL: data disk has {} free",
            tern_types::format_size(avail)
        ));
        health = Health::Warn;
    }
    // A mirrored pool's health is the site's too: a DR copy that is not
    // replaying, or two primaries, must not hide behind HEALTH_OK.
    let m = Mirror { site: site.clone() };
    for p in &pools {
        if m.pool(&p.name)?
            .is_none_or(|pm| pm.mode == mirror::PoolMirrorMode::Disabled)
        {
            continue;
        }
        let st = pool(&m, &p.name)?;
        let (word, level) = match st.health {
            MirrorHealth::Ok => continue,
            MirrorHealth::Warning => ("MIRROR_POOL_WARNING", Health::Warn),
            MirrorHealth::Error => ("MIRROR_POOL_ERROR", Health::Err),
        };
        checks.push(format!(
            "{word}: pool '{}' mirroring health {} (daemons {}, images {}): see `tern mirror pool status {} --verbose`",
            p.name, st.health, st.daemon_health, st.image_health, p.name
        ));
        if health != Health::Err {
            health = level;
        }
    }
    Ok(SiteStatus {
        site_id: site.site_id.clone(),
        site_name: site.site_name.clone(),
        health,
        health_checks: checks,
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: site.started.elapsed().as_secs(),
        pools: pools.len() as u64,
        images,
        provisioned_bytes: provisioned,
        used_bytes: used,
        avail_bytes: avail,
        total_bytes: total,
        nbd_endpoint: site
            .store
            .kv_get(KvTable::Site, "nbd_endpoint")?
            .unwrap_or_default(),
        endpoints: site
            .store
            .kv_get(KvTable::Site, "endpoints")?
            .map(|s| s.split(',').map(String::from).collect())
            .unwrap_or_default(),
    })
}

fn statvfs(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0);
    }
    let bs = s.f_frsize;
    (s.f_blocks * bs, s.f_bavail * bs)
}

/// A daemon counts as up while its heartbeats keep coming: two missed
/// intervals (plus slack for scheduling) and it is down.
const STALE_MS: u64 = 2500;

/// One mirrored image's status.
pub fn image(m: &Mirror, pool: &str, image: &str) -> Result<MirrorImageStatus, Error> {
    let pm = m.pool_enabled(pool)?;
    let (img, im) = m.image_of(pool, image)?;
    let im = im.ok_or_else(|| {
        Error::invalid(format!(
            "mirroring is not enabled on image '{pool}/{image}'"
        ))
    })?;
    let daemons = m.daemons()?;
    build_status(m, &img, &im, &pm, &daemons)
}

/// A mirrored pool's status: its images, its daemons, their health.
pub fn pool(m: &Mirror, pool: &str) -> Result<MirrorPoolStatus, Error> {
    let pm = m.pool_enabled(pool)?;
    let daemons = m.daemons()?;
    let now = mirror::now_ms();
    let mut images = Vec::new();
    let mut states = std::collections::BTreeMap::<String, u64>::new();
    let (mut errors, mut warnings) = (0, 0);
    for img in m.site.store.image_list(pool)? {
        let Some(im) = m.image(&img.id.to_string())? else {
            continue;
        };
        let st = build_status(m, &img, &im, &pm, &daemons)?;
        // Count what matters for the image: its copies' states on a
        // primary, its own state on a non-primary.
        let mut counted: Vec<&MirrorSiteStatus> = if im.primary {
            st.peer_sites.iter().collect()
        } else {
            vec![&st.local]
        };
        // A primary in split-brain is in error itself, whatever
        // its peers last said.
        if im.primary && st.local.up && st.local.state == State::Error {
            counted.push(&st.local);
        }
        for c in counted {
            let key = if c.up { c.state } else { State::Unknown };
            match key {
                State::Error => errors += 1,
                State::Replaying | State::Stopped => {}
                _ => warnings += 1,
            }
            *states.entry(key.to_string()).or_default() += 1;
        }
        images.push(st);
    }
    let mine: Vec<&mirror::Daemon> = daemons
        .iter()
        .filter(|d| d.site_name == pm.site_name)
        .collect();
    let daemons: Vec<MirrorDaemonInfo> = mine
        .iter()
        .map(|d| {
            let up = now.saturating_sub(d.received_ms) <= STALE_MS;
            MirrorDaemonInfo {
                service_id: d.service_id.clone(),
                instance_id: d.instance_id.clone(),
                client_id: d.client_id.clone(),
                hostname: d.hostname.clone(),
                version: d.version.clone(),
                last_heartbeat: d.received_ms / 1000,
                up,
                health: if up {
                    MirrorHealth::Ok
                } else {
                    MirrorHealth::Error
                },
                site_name: d.site_name.clone(),
            }
        })
        .collect();
    let daemon_health = if daemons.iter().any(|d| d.up) {
        MirrorHealth::Ok
    } else {
        MirrorHealth::Warning
    };
    let image_health = if errors > 0 {
        MirrorHealth::Error
    } else if warnings > 0 {
        MirrorHealth::Warning
    } else {
        MirrorHealth::Ok
    };
    Ok(MirrorPoolStatus {
        // The variants go from good to bad.
        health: daemon_health.max(image_health),
        daemon_health,
        image_health,
        states,
        // Live daemons, and for ten minutes the ones that went
        // silent (shown down): a restarted daemon has a new id.
        daemons: daemons
            .into_iter()
            .filter(|d| {
                d.up || now.saturating_sub(d.last_heartbeat * 1000) < mirror::DAEMON_FORGET_MS
            })
            .collect(),
        images,
    })
}

/// Builds an image's status from what daemons reported, never from the
/// image itself, and never showing a silent daemon's last state as live.
fn build_status(
    m: &Mirror,
    img: &tern_store::ImageInfo,
    im: &mirror::ImageMirror,
    pm: &mirror::PoolMirror,
    daemons: &[mirror::Daemon],
) -> Result<MirrorImageStatus, Error> {
    let now = mirror::now_ms();
    let statuses = m.statuses(&im.global_id)?;
    let local_daemon = daemons
        .iter()
        .filter(|d| d.site_name == pm.site_name && now.saturating_sub(d.received_ms) <= STALE_MS)
        .max_by_key(|d| d.received_ms);
    let site_status = |name: &str| statuses.iter().find(|s| s.report.site_name == name);
    let mut local = match site_status(&pm.site_name) {
        Some(s) => s.report.clone(),
        None if im.primary => MirrorSiteStatus {
            state: State::Stopped,
            description: "local image is primary".into(),
            reason: Reason::Primary,
            ..Default::default()
        },
        None => MirrorSiteStatus {
            state: State::Unknown,
            description: "no status reported yet".into(),
            reason: Reason::Unknown,
            ..Default::default()
        },
    };
    if im.primary && !matches!(local.reason, Reason::SplitBrain | Reason::Error) {
        local.state = State::Stopped;
        local.description = "local image is primary".into();
        local.reason = Reason::Primary;
    }
    let local_up = local_daemon.is_some();
    let shown = |s: &MirrorSiteStatus, up: bool, site_name: &str, uuid: &str| MirrorSiteStatus {
        site_name: site_name.to_string(),
        mirror_uuids: uuid.to_string(),
        last_update: if s.last_update == 0 {
            now / 1000
        } else {
            s.last_update
        },
        reason: if up { s.reason } else { Reason::DaemonDown },
        up,
        ..s.clone()
    };
    let local = shown(&local, local_up, &pm.site_name, &pm.mirror_uuid);
    let mut peers = Vec::new();
    for p in &pm.peers {
        let st = match site_status(&p.site_name) {
            Some(s) => {
                let age = now.saturating_sub(s.received);
                let mut x = shown(&s.report, age <= STALE_MS, &p.site_name, &p.mirror_uuid);
                if age > STALE_MS {
                    x.reason = Reason::Unreachable;
                    x.description = format!(
                        "no report from {}'s mirror daemon for {:.0} s (it said: {})",
                        p.site_name,
                        age as f64 / 1000.0,
                        s.report.description
                    );
                }
                x
            }
            None => MirrorSiteStatus {
                site_name: p.site_name.clone(),
                mirror_uuids: p.mirror_uuid.clone(),
                state: State::Unknown,
                description: format!("no report from {}'s mirror daemon yet", p.site_name),
                last_update: 0,
                reason: Reason::Unreachable,
                up: false,
                ..Default::default()
            },
        };
        let mut st = st;
        if im.primary
            && let Some(b) = m.behind(&im.global_id, &p.uuid)?
        {
            st.reason = Reason::Behind;
            st.description = format!(
                "fell behind: {} mirror snapshot(s) {} had not synced were pruned (rbd_mirroring_max_mirroring_snapshots={}); {} (it said: {})",
                b.pruned_unsynced,
                p.site_name,
                b.cap,
                if b.base_lost {
                    format!(
                        "its last synced snapshot {} was pruned too, so its next sync is a full copy",
                        b.acked
                    )
                } else if b.acked > 0 {
                    format!(
                        "it catches up by a delta from snapshot {} to the newest",
                        b.acked
                    )
                } else {
                    "its first sync copies the newest".to_string()
                },
                st.description
            );
        }
        peers.push(st);
    }
    Ok(MirrorImageStatus {
        name: img.name.clone(),
        global_id: im.global_id.clone(),
        local,
        peer_sites: peers,
        daemon_id: local_daemon
            .map(|d| d.service_id.clone())
            .unwrap_or_default(),
    })
}
