//! Store and site records to their protobuf form and back.

use crate::auth::UserRecord;
use crate::mirror;
use crate::site::Site;
use tern_proto::convert::{FromWire, IntoWire};
use tern_proto::v1 as pb;
use tern_store::{SnapInfo, SnapNamespace};
use tern_types::error::Error;
use tern_types::mirror::SnapNamespaceType;

pub fn image_info_pb(info: &tern_store::ImageInfo, used: Option<u64>) -> pb::ImageInfo {
    pb::ImageInfo {
        pool: info.pool.clone(),
        name: info.name.clone(),
        id: info.id.to_string(),
        size: info.size,
        object_size: info.layout.object_size,
        stripe_unit: info.layout.stripe_unit,
        stripe_count: info.layout.stripe_count,
        features: info.features.0,
        feature_names: info
            .features
            .names()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        created: info.created,
        modified: info.modified,
        objects: info.layout.object_count(info.size),
        used_bytes: used.unwrap_or(0),
        snapshot_count: info.snap_count,
        ..Default::default()
    }
}

pub fn pool_pb(p: tern_store::PoolInfo) -> pb::PoolInfo {
    pb::PoolInfo {
        id: p.id,
        name: p.name,
        application: p.application.unwrap_or_default(),
        created: p.created,
    }
}

pub fn journal_client_pb(c: &tern_store::journal::ClientInfo) -> pb::JournalClientInfo {
    pb::JournalClientInfo {
        id: c.id.clone(),
        commit_tid: c.commit_tid,
        disconnected: c.disconnected,
        entries_behind: c.entries_behind,
    }
}

pub fn snap_pb(s: &SnapInfo) -> pb::SnapInfo {
    let mut out = pb::SnapInfo {
        id: s.id,
        name: s.name.clone(),
        size: s.size,
        created: s.created,
        protected: s.protected,
        namespace: SnapNamespaceType::User.into_wire(),
        ..Default::default()
    };
    if let SnapNamespace::Mirror(m) = &s.namespace {
        out.namespace = SnapNamespaceType::Mirror.into_wire();
        out.mirror_state = m.state.into_wire();
        out.mirror_complete = m.complete;
        out.mirror_peer_uuids = m.mirror_peer_uuids.clone();
        out.primary_snap_id = m.primary_snap_id;
        out.primary_mirror_uuid = m.primary_mirror_uuid.clone();
    }
    out
}

pub fn lock_pb(l: &crate::locks::Lock, lease: std::time::Duration) -> pb::LockInfo {
    let now = std::time::Instant::now();
    pb::LockInfo {
        locker: l.entity.clone(),
        id: l.cookie.clone(),
        address: l.address.clone(),
        age_secs: now.duration_since(l.acquired).as_secs(),
        lease_ms: lease.as_millis() as u64,
        expires_in_ms: l.expires.saturating_duration_since(now).as_millis() as u64,
    }
}

/// A peer as given; without a client, the peer client.
pub fn peer_rec(p: pb::MirrorPeer) -> Result<mirror::PeerRec, Error> {
    let mut p = mirror::PeerRec::from_wire(p)?;
    if p.client_name.is_empty() {
        p.client_name = mirror::PEER_CLIENT.into();
    }
    Ok(p)
}

/// A peer as shown; its key only to those who may have it.
pub fn peer_pb(p: &mirror::PeerRec, with_key: bool) -> pb::MirrorPeer {
    let mut p = p.clone();
    if !with_key {
        p.key.clear();
    }
    p.into_wire()
}

pub fn daemon_rec(d: pb::MirrorDaemonInfo) -> mirror::Daemon {
    mirror::Daemon {
        service_id: d.service_id,
        instance_id: d.instance_id,
        client_id: d.client_id,
        hostname: d.hostname,
        version: d.version,
        site_name: d.site_name,
        last_heartbeat: d.last_heartbeat,
        received_ms: 0,
    }
}

pub fn mirror_info_pb(
    img: &tern_store::ImageInfo,
    im: &mirror::ImageMirror,
    snaps: &[(SnapInfo, tern_store::MirrorSnap)],
) -> pb::MirrorImageInfo {
    pb::MirrorImageInfo {
        pool: img.pool.clone(),
        name: img.name.clone(),
        global_id: im.global_id.clone(),
        mode: im.mode.into_wire(),
        state: im.state.into_wire(),
        primary: im.primary,
        epoch: im.epoch,
        mirror_snaps: snaps.iter().map(|(s, _)| snap_pb(s)).collect(),
        size: img.size,
        object_size: img.layout.object_size,
        stripe_unit: img.layout.stripe_unit,
        stripe_count: img.layout.stripe_count,
        features: img.features.0,
        image_id: img.id.to_string(),
        demoted: im.demoted,
        journal_primary_uuid: im
            .journal_pos
            .as_ref()
            .map(|p| p.primary_mirror_uuid.clone())
            .unwrap_or_default(),
        journal_tid: im.journal_pos.as_ref().map_or(0, |p| p.tid),
        journal_skip_to: im
            .journal_pos
            .as_ref()
            .map(|p| p.skip_to.clone())
            .unwrap_or_default(),
        primary_mirror_uuid: im.primary_mirror_uuid.clone(),
        resync_requested: im.resync_requested,
        resync_full: im.resync_full,
        fork_mirror_uuid: im
            .fork
            .as_ref()
            .map(|f| f.from_mirror_uuid.clone())
            .unwrap_or_default(),
        fork_journal_tid: im.fork.as_ref().map_or(0, |f| f.journal_tid),
        fork_snap_id: im.fork.as_ref().map_or(0, |f| f.snap_id),
        fork_forced: im.fork.as_ref().is_some_and(|f| f.forced),
        fork_data_as_of_us: im.fork.as_ref().map_or(0, |f| f.data_as_of_us),
        fork_at: im.fork.as_ref().map_or(0, |f| f.at),
        last_resync: im.last_resync.clone(),
        primary_epoch: im.primary_epoch,
    }
}

pub fn journal_info_pb(
    i: &tern_store::journal::JournalInfo,
    commit_age: f64,
    splay_width: u64,
) -> pb::JournalInfoReply {
    pb::JournalInfoReply {
        image_id: i.image_id.to_string(),
        segments: i
            .segments
            .iter()
            .map(|s| pb::JournalSegment {
                segno: s.segno,
                first_tid: s.first_tid,
                entries: s.entries,
                bytes: s.bytes,
            })
            .collect(),
        bytes: i.bytes,
        first_tid: i.first_tid,
        last_tid: i.last_tid,
        durable_tid: i.durable_tid,
        applied_tid: i.applied_tid,
        clients: i.clients.iter().map(journal_client_pb).collect(),
        segment_size: i.options.segment_size,
        max_size: i.options.max_size,
        durability: i.options.durability.into_wire(),
        syncs: i.syncs,
        commit_age,
        splay_width,
    }
}

pub fn entity_pb(site: &Site, rec: &UserRecord, created: bool) -> pb::AuthEntity {
    pb::AuthEntity {
        entity: rec.entity.clone(),
        key: site.key_of(rec),
        caps: rec.caps.clone().into_iter().collect(),
        profile: rec.profile.into_wire(),
        created,
    }
}

pub fn pool_mirror_pb(
    fsid: &str,
    pool: &str,
    p: &mirror::PoolMirror,
    with_keys: bool,
) -> pb::MirrorPoolInfo {
    pb::MirrorPoolInfo {
        pool: pool.to_string(),
        mode: p.mode.into_wire(),
        site_name: p.site_name.clone(),
        mirror_uuid: p.mirror_uuid.clone(),
        peers: p.peers.iter().map(|x| peer_pb(x, with_keys)).collect(),
        fsid: fsid.to_string(),
    }
}

/// A daemon's report, as the site keeps it.
pub fn site_status_rec(s: pb::MirrorSiteStatus) -> Result<mirror::SiteStatus, Error> {
    Ok(mirror::SiteStatus {
        report: FromWire::from_wire(s)?,
        received: 0,
    })
}

pub fn applied_pb(a: mirror::Applied) -> pb::MirrorJournalApplyReply {
    pb::MirrorJournalApplyReply {
        last_tid: a.last_tid,
        last_timestamp_us: a.last_timestamp_us,
        entries: a.entries,
        bytes: a.bytes,
        demoted: a.demoted,
    }
}
