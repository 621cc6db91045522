//! The status and health policy: what `tern status` and `mirror image
//! status` / `mirror pool status` say, built from the store and from what
//! mirror daemons reported, never from a silent daemon's last word.

use crate::mirror::{self, Mirror};
use crate::site::Site;
use tern_proto::v1 as pb;
use tern_store::KvTable;
use tern_types::error::Error;

/// The site's status and health.
pub fn site(site: &Site) -> Result<pb::StatusReply, Error> {
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
        "HEALTH_OK"
    } else {
        "HEALTH_WARN"
    };
    if total > 0 && avail * 100 / total < 3 {
        checks.push(format!(
            "OSD_FULL: data disk has {} free",
            tern_types::format_size(avail)
        ));
        health = "HEALTH_ERR";
    } else if total > 0 && avail * 100 / total < 10 {
        checks.push(format!(
            "OSD_NEARFULL: data disk has {} free",
            tern_types::format_size(avail)
        ));
        health = "HEALTH_WARN";
    }
    Ok(pb::StatusReply {
        site_id: site.site_id.clone(),
        site_name: site.site_name.clone(),
        health: health.into(),
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

/// A daemon-reported state without its `up+`/`down+` prefix.
pub(crate) fn strip_state(s: &str) -> &str {
    s.trim_start_matches("up+").trim_start_matches("down+")
}

/// One mirrored image's status.
pub fn image(m: &Mirror, pool: &str, image: &str) -> Result<pb::MirrorImageStatus, Error> {
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
pub fn pool(m: &Mirror, pool: &str) -> Result<pb::MirrorPoolStatusReply, Error> {
    let pm = m.pool_enabled(pool)?;
    let daemons = m.daemons()?;
    let now = mirror::now_ms();
    let mut images = Vec::new();
    let mut states: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let (mut errors, mut warnings) = (0, 0);
    for img in m.site.store.image_list(pool)? {
        let Some(im) = m.image(&img.id.to_string())? else {
            continue;
        };
        let st = build_status(m, &img, &im, &pm, &daemons)?;
        // Count what matters for the image: its copies' states on a
        // primary, its own state on a non-primary.
        let mut counted: Vec<&pb::MirrorSiteStatus> = if im.primary {
            st.peer_sites.iter().collect()
        } else {
            st.local.iter().collect()
        };
        // A primary in split-brain is in error itself, whatever
        // its peers last said.
        if im.primary
            && let Some(l) = st.local.as_ref()
            && l.up
            && strip_state(&l.state) == "error"
        {
            counted.push(l);
        }
        for c in counted {
            let key = if c.up {
                strip_state(&c.state).to_string()
            } else {
                "unknown".to_string()
            };
            match key.as_str() {
                "error" => errors += 1,
                "replaying" | "stopped" => {}
                _ => warnings += 1,
            }
            *states.entry(key).or_default() += 1;
        }
        images.push(st);
    }
    let mine: Vec<&mirror::Daemon> = daemons
        .iter()
        .filter(|d| d.site_name == pm.site_name)
        .collect();
    let daemon_pb: Vec<pb::MirrorDaemonInfo> = mine
        .iter()
        .map(|d| {
            let up = now.saturating_sub(d.received_ms) <= STALE_MS;
            pb::MirrorDaemonInfo {
                service_id: d.service_id.clone(),
                instance_id: d.instance_id.clone(),
                client_id: d.client_id.clone(),
                hostname: d.hostname.clone(),
                version: d.version.clone(),
                last_heartbeat: d.received_ms / 1000,
                up,
                health: if up { "OK".into() } else { "ERROR".into() },
                site_name: d.site_name.clone(),
            }
        })
        .collect();
    let daemon_health = if daemon_pb.iter().any(|d| d.up) {
        "OK"
    } else {
        "WARNING"
    };
    let image_health = if errors > 0 {
        "ERROR"
    } else if warnings > 0 {
        "WARNING"
    } else {
        "OK"
    };
    let rank = |h: &str| match h {
        "ERROR" => 2,
        "WARNING" => 1,
        _ => 0,
    };
    let health = if rank(daemon_health) >= rank(image_health) {
        daemon_health
    } else {
        image_health
    };
    Ok(pb::MirrorPoolStatusReply {
        health: health.into(),
        daemon_health: daemon_health.into(),
        image_health: image_health.into(),
        states: states.into_iter().collect(),
        // Live daemons, and for ten minutes the ones that went
        // silent (shown down): a restarted daemon has a new id.
        daemons: daemon_pb
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
) -> Result<pb::MirrorImageStatus, Error> {
    let now = mirror::now_ms();
    let statuses = m.statuses(&im.global_id)?;
    let local_daemon = daemons
        .iter()
        .filter(|d| d.site_name == pm.site_name && now.saturating_sub(d.received_ms) <= STALE_MS)
        .max_by_key(|d| d.received_ms);
    let site_status = |name: &str| statuses.iter().find(|s| s.site_name == name);
    let mut local = match site_status(&pm.site_name) {
        Some(s) => s.clone(),
        None if im.primary => mirror::SiteStatus {
            state: "stopped".into(),
            description: "local image is primary".into(),
            reason: "primary".into(),
            ..Default::default()
        },
        None => mirror::SiteStatus {
            state: "unknown".into(),
            description: "no status reported yet".into(),
            reason: "unknown".into(),
            ..Default::default()
        },
    };
    if im.primary && local.reason != "split-brain" && local.reason != "error" {
        local.state = "stopped".into();
        local.description = "local image is primary".into();
        local.reason = "primary".into();
    }
    let local_up = local_daemon.is_some();
    let to_pb =
        |s: &mirror::SiteStatus, up: bool, site_name: &str, uuid: &str| pb::MirrorSiteStatus {
            site_name: site_name.to_string(),
            mirror_uuids: uuid.to_string(),
            state: format!(
                "{}+{}",
                if up { "up" } else { "down" },
                strip_state(&s.state)
            ),
            description: s.description.clone(),
            last_update: if s.last_update == 0 {
                now / 1000
            } else {
                s.last_update
            },
            reason: if up {
                s.reason.clone()
            } else {
                "daemon-down".into()
            },
            lag_seconds: s.lag_seconds,
            last_sync: s.last_sync,
            progress: s.progress,
            daemon_id: s.daemon_id.clone(),
            bytes_synced: s.bytes_synced,
            up,
        };
    let local_pb = to_pb(&local, local_up, &pm.site_name, &pm.mirror_uuid);
    let mut peers = Vec::new();
    for p in &pm.peers {
        let st = match site_status(&p.site_name) {
            Some(s) => {
                let age = now.saturating_sub(s.received);
                let mut x = to_pb(s, age <= STALE_MS, &p.site_name, &p.mirror_uuid);
                if age > STALE_MS {
                    x.reason = "unreachable".into();
                    x.description = format!(
                        "no report from {}'s mirror daemon for {:.0} s (it said: {})",
                        p.site_name,
                        age as f64 / 1000.0,
                        s.description
                    );
                }
                x
            }
            None => pb::MirrorSiteStatus {
                site_name: p.site_name.clone(),
                mirror_uuids: p.mirror_uuid.clone(),
                state: "down+unknown".into(),
                description: format!("no report from {}'s mirror daemon yet", p.site_name),
                last_update: 0,
                reason: "unreachable".into(),
                up: false,
                ..Default::default()
            },
        };
        let mut st = st;
        if im.primary
            && let Some(b) = m.behind(&im.global_id, &p.uuid)?
        {
            st.reason = "behind".into();
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
    Ok(pb::MirrorImageStatus {
        name: img.name.clone(),
        global_id: im.global_id.clone(),
        local: Some(local_pb),
        peer_sites: peers,
        daemon_id: local_daemon
            .map(|d| d.service_id.clone())
            .unwrap_or_default(),
    })
}
