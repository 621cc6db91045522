//! Mirroring state kept by a site (DESIGN §6): per-pool mode, site name,
//! mirror uuid and peers; per-image mirror record (global id, mode, role,
//! promotion epoch); mirror snapshots; status reports from mirror daemons.
//! All of it lives in the store's `Mirror` table, one JSON record per key:
//!
//! ```text
//! pool/<pool>                      PoolMirror
//! image/<image id>                 ImageMirror
//! status/<global id>/<site name>   SiteStatus (what a daemon last reported)
//! daemon/<site name>/<service id>  Daemon (heartbeat)
//! ack/<global id>/<peer uuid>      the newest primary snapshot id a peer holds
//! ```
//!
//! This module decides; the mirror daemon (tern-mirror) moves data.

use crate::site::{Site, now_secs};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tern_store::{
    KvTable, MirrorSnap, MirrorSnapState, SnapInfo, SnapNamespace, Store, StoreError,
};
use tern_types::ErrorKind;
use tern_types::error::Error;

pub const PEER_CLIENT: &str = "client.rbd-mirror-peer";

/// A test fault point (see tern-mirror's `hold`): with `TERN_TEST_HOLD_DIR`
/// set and `<dir>/<point>` armed, wait (two minutes at most) until the
/// test writes `<point>.go`, so a test can act between two steps.
fn test_hold(point: &str) {
    let Some(dir) = std::env::var_os("TERN_TEST_HOLD_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    if std::fs::remove_file(dir.join(point)).is_err() {
        return;
    }
    tracing::info!(point, "test fault point: holding");
    let _ = std::fs::write(dir.join(format!("{point}.held")), b"");
    let go = dir.join(format!("{point}.go"));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !go.exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(go);
}

fn serr(e: StoreError) -> Error {
    Error::new(e.kind(), e.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PeerRec {
    pub uuid: String,
    pub site_name: String,
    pub client_name: String,
    pub direction: String,
    #[serde(default)]
    pub mirror_uuid: String,
    pub fsid: String,
    pub mon_host: Vec<String>,
    pub tls_fingerprint: String,
    pub remote_pool: String,
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PoolMirror {
    pub mode: String,
    pub site_name: String,
    pub mirror_uuid: String,
    #[serde(default)]
    pub peers: Vec<PeerRec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ImageMirror {
    pub global_id: String,
    pub mode: String,
    pub state: String,
    pub primary: bool,
    pub epoch: u64,
    #[serde(default)]
    pub demoted: bool,
    /// For non-primary images: the mirror uuid of the site it copies.
    #[serde(default)]
    pub primary_mirror_uuid: String,
    #[serde(default)]
    pub resync_requested: bool,
    /// The requested resync copies everything (`resync --full`).
    #[serde(default)]
    pub resync_full: bool,
    /// A sync from the primary in progress: the image head is being
    /// overwritten and is consistent only at its last complete snapshot.
    #[serde(default)]
    pub sync: Option<SyncState>,
    /// Journal mode, non-primary: how far the primary's journal is
    /// replayed here (every entry up to `tid` of the journal of the site
    /// with mirror uuid `primary_mirror_uuid` is applied).
    #[serde(default)]
    pub journal_pos: Option<JournalPos>,
    /// How this image last became primary (see [`Fork`]).
    #[serde(default)]
    pub fork: Option<Fork>,
    /// What the last completed resync did ("delta …" / "full …").
    #[serde(default)]
    pub last_resync: String,
    /// Non-primary: the promotion epoch of the primary whose data (and
    /// demotion) this copy holds. A plain promotion here builds on it: the
    /// new epoch is one past it, and no site may have passed it.
    #[serde(default)]
    pub primary_epoch: u64,
}

/// What this site learnt from its peers, just before a promotion, of their
/// copies of the image.
#[derive(Debug, Clone, Default)]
pub struct PeerView {
    /// The highest promotion epoch any peer's copy carries.
    pub max_epoch: u64,
    /// (site name, epoch) of the copy that carries it.
    pub max_epoch_site: String,
    /// Peers whose copy is primary right now.
    pub primary_at: Vec<String>,
    /// Peers that could not be asked (name and why).
    pub unreachable: Vec<(String, String)>,
}

/// Refuses a mirror daemon's step on a copy that was promoted after the
/// step's work began: the daemon read the image at epoch `expect`, and a
/// promotion since moved it on, so the step belongs to a role this image
/// no longer has.
fn check_fence(pool: &str, name: &str, m: &ImageMirror, expect: Option<u64>) -> Result<(), Error> {
    if let Some(e) = expect
        && e != m.epoch
    {
        return Err(Error::new(
            ErrorKind::Fenced,
            format!(
                "'{pool}/{name}' changed role (epoch {e} → {}) after this mirroring step began: the step is refused",
                m.epoch
            ),
        ));
    }
    Ok(())
}

/// Recorded at promotion: the point where this image's history left the
/// site it copied. A demoted former primary resyncs from here by delta:
/// its own writes after `journal_tid` (journal mode) are what diverged.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Fork {
    pub from_mirror_uuid: String,
    /// Journal mode: the last entry of `from`'s journal applied here.
    pub journal_tid: u64,
    /// The primary snapshot taken at promotion.
    pub snap_id: u64,
    pub forced: bool,
    /// The primary's time (unix µs) of the newest write held here then.
    pub data_as_of_us: u64,
    pub at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct JournalPos {
    pub primary_mirror_uuid: String,
    pub tid: u64,
    /// Entries up to this snapshot's own entry are in a copy: skip them.
    #[serde(default)]
    pub skip_to: String,
    /// The primary's time (unix µs) of entry `tid`.
    #[serde(default)]
    pub timestamp_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SyncState {
    pub primary_mirror_uuid: String,
    pub primary_snap_id: u64,
    pub demoted: bool,
    pub size: u64,
    pub last_copied_object_number: u64,
    pub started: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SiteStatus {
    pub site_name: String,
    pub mirror_uuids: String,
    pub state: String,
    pub description: String,
    pub last_update: u64,
    pub reason: String,
    pub lag_seconds: f64,
    pub last_sync: u64,
    pub progress: f64,
    pub daemon_id: String,
    pub bytes_synced: u64,
    /// Set by the site when it stored the report (its own clock).
    #[serde(default)]
    pub received: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Daemon {
    pub service_id: String,
    pub instance_id: String,
    pub client_id: String,
    pub hostname: String,
    pub version: String,
    pub site_name: String,
    pub last_heartbeat: u64,
    #[serde(default)]
    pub received_ms: u64,
}

pub struct Mirror {
    pub site: Arc<Site>,
}

/// How long a silent daemon stays listed (as down) before its record goes.
pub const DAEMON_FORGET_MS: u64 = 600_000;

/// The keys of daemon records silent for longer than [`DAEMON_FORGET_MS`]
/// (or unreadable).
fn forgotten_daemons(records: &[(String, String)], now: u64) -> Vec<String> {
    records
        .iter()
        .filter(|(_, v)| {
            serde_json::from_str::<Daemon>(v).map_or(true, |d| {
                now.saturating_sub(d.received_ms) > DAEMON_FORGET_MS
            })
        })
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod daemon_tests {
    use super::*;

    #[test]
    fn silent_daemons_are_forgotten_after_ten_minutes() {
        let rec = |id: &str, received_ms: u64| {
            let d = Daemon {
                service_id: id.into(),
                instance_id: id.into(),
                client_id: "mirror".into(),
                hostname: "h".into(),
                version: "v".into(),
                site_name: "site-a".into(),
                last_heartbeat: received_ms / 1000,
                received_ms,
            };
            (
                format!("daemon/site-a/{id}"),
                serde_json::to_string(&d).unwrap(),
            )
        };
        let now = 10_000_000;
        let records = vec![
            rec("live", now - 1_000),
            rec("down-9min", now - 540_000),
            rec("gone-11min", now - 660_000),
            ("daemon/site-a/damaged".to_string(), "{".to_string()),
        ];
        assert_eq!(
            forgotten_daemons(&records, now),
            ["daemon/site-a/gone-11min", "daemon/site-a/damaged"]
        );
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn get<T: for<'a> Deserialize<'a>>(store: &Store, key: &str) -> Result<Option<T>, Error> {
    match store.kv_get(KvTable::Mirror, key).map_err(serr)? {
        Some(v) => serde_json::from_str(&v).map(Some).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("mirror record {key} is damaged: {e}"),
            )
        }),
        None => Ok(None),
    }
}

fn put<T: Serialize>(store: &Store, key: &str, v: &T) -> Result<(), Error> {
    store
        .kv_put(
            KvTable::Mirror,
            key,
            &serde_json::to_string(v).expect("serialisable"),
        )
        .map_err(serr)
}

pub fn valid_direction(d: &str) -> Result<(), Error> {
    match d {
        "rx-only" | "rx-tx" | "tx-only" => Ok(()),
        _ => Err(Error::invalid(format!(
            "direction '{d}' must be rx-only, rx-tx or tx-only"
        ))),
    }
}

/// A peer that the snapshot cap overtook (see `Mirror::prune`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Behind {
    /// The newest snapshot it had acknowledged then (0: none).
    pub acked: u64,
    /// Snapshots newer than that, pruned before it synced them.
    pub pruned_unsynced: u64,
    /// Its base went too: its next sync is a full copy.
    pub base_lost: bool,
    pub cap: u64,
}

/// Longest site name accepted, in bytes.
pub const MAX_SITE_NAME: usize = 64;

/// A site name is shown in listings, status and metrics and keys status
/// records: visible characters only, bounded, and no '/'.
pub fn valid_site_name(name: &str) -> Result<(), Error> {
    tern_types::validate_visible("site name", name, MAX_SITE_NAME)?;
    if name.contains('/') {
        return Err(Error::invalid(format!(
            "site name '{}' may not contain '/'",
            tern_types::escaped(name)
        )));
    }
    Ok(())
}

impl Mirror {
    fn store(&self) -> &Store {
        &self.site.store
    }

    pub fn pool(&self, pool: &str) -> Result<Option<PoolMirror>, Error> {
        self.store().pool_get(pool).map_err(serr)?;
        get(self.store(), &format!("pool/{pool}"))
    }

    /// The pool's mirroring config, or an error saying mirroring is off.
    pub fn pool_enabled(&self, pool: &str) -> Result<PoolMirror, Error> {
        match self.pool(pool)? {
            Some(p) if p.mode != "disabled" => Ok(p),
            _ => Err(Error::invalid(format!(
                "mirroring is not enabled on pool '{pool}': run `tern mirror pool enable {pool} image` first"
            ))),
        }
    }

    pub fn save_pool(&self, pool: &str, p: &PoolMirror) -> Result<(), Error> {
        put(self.store(), &format!("pool/{pool}"), p)
    }

    pub fn pool_enable(
        &self,
        pool: &str,
        mode: &str,
        site_name: &str,
    ) -> Result<PoolMirror, Error> {
        if !matches!(mode, "image" | "pool") {
            return Err(Error::invalid(format!(
                "mirror mode '{mode}' must be 'image' or 'pool'"
            )));
        }
        let mut p = self.pool(pool)?.unwrap_or_default();
        if p.mirror_uuid.is_empty() {
            p.mirror_uuid = uuid::Uuid::new_v4().to_string();
        }
        p.mode = mode.to_string();
        if !site_name.is_empty() {
            valid_site_name(site_name)?;
            p.site_name = site_name.to_string();
        } else if p.site_name.is_empty() {
            p.site_name = self.site.site_name.clone();
        }
        self.save_pool(pool, &p)?;
        if mode == "pool" {
            for img in self.store().image_list(pool).map_err(serr)? {
                if self.image(&img.id.to_string())?.is_none() {
                    // As rbd: journal mode for journaled images.
                    let mode = if img.features.has(tern_types::Features::JOURNALING) {
                        "journal"
                    } else {
                        "snapshot"
                    };
                    self.image_enable(pool, &img.name, mode)?;
                }
            }
        }
        Ok(p)
    }

    pub fn pool_disable(&self, pool: &str) -> Result<(), Error> {
        for img in self.store().image_list(pool).map_err(serr)? {
            if self.image(&img.id.to_string())?.is_some() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "pool '{pool}' still has mirrored images (e.g. '{}'): disable mirroring on them first",
                        img.name
                    ),
                ));
            }
        }
        let mut p = self.pool(pool)?.unwrap_or_default();
        p.mode = "disabled".into();
        self.save_pool(pool, &p)
    }

    /// Adds or (same fsid) updates a peer; returns it.
    pub fn peer_upsert(&self, pool: &str, mut peer: PeerRec) -> Result<PeerRec, Error> {
        valid_direction(&peer.direction)?;
        valid_site_name(&peer.site_name)?;
        let mut p = self.pool_enabled(pool)?;
        if peer.fsid == self.site.site_id {
            return Err(Error::invalid(
                "a site cannot be its own peer: the token was made on this site",
            ));
        }
        if peer.site_name == p.site_name {
            return Err(Error::invalid(format!(
                "the peer calls itself '{}', the name of this site: site names must differ",
                peer.site_name
            )));
        }
        match p
            .peers
            .iter_mut()
            .find(|x| !peer.fsid.is_empty() && x.fsid == peer.fsid)
        {
            Some(existing) => {
                peer.uuid = existing.uuid.clone();
                *existing = peer.clone();
            }
            None => {
                if peer.uuid.is_empty() {
                    peer.uuid = uuid::Uuid::new_v4().to_string();
                }
                p.peers.push(peer.clone());
            }
        }
        self.save_pool(pool, &p)?;
        Ok(peer)
    }

    pub fn peer_remove(&self, pool: &str, uuid: &str) -> Result<(), Error> {
        let mut p = self.pool_enabled(pool)?;
        let before = p.peers.len();
        p.peers.retain(|x| x.uuid != uuid);
        if p.peers.len() == before {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("pool '{pool}' has no peer {uuid}"),
            ));
        }
        self.save_pool(pool, &p)
    }

    pub fn peer_set(&self, pool: &str, uuid: &str, key: &str, value: &str) -> Result<(), Error> {
        let mut p = self.pool_enabled(pool)?;
        let peer = p.peers.iter_mut().find(|x| x.uuid == uuid).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("pool '{pool}' has no peer {uuid}"),
            )
        })?;
        match key {
            "client" => peer.client_name = value.into(),
            "site-name" | "site_name" => {
                valid_site_name(value)?;
                peer.site_name = value.into();
            }
            "mon-host" | "mon_host" => peer.mon_host = value.split(',').map(String::from).collect(),
            "key" => peer.key = value.into(),
            "direction" => {
                valid_direction(value)?;
                peer.direction = value.into()
            }
            "tls-fingerprint" | "tls_fingerprint" => peer.tls_fingerprint = value.into(),
            _ => {
                return Err(Error::invalid(format!(
                    "unknown peer attribute '{key}': use client, site-name, mon-host, key, direction or tls-fingerprint"
                )));
            }
        }
        self.save_pool(pool, &p)
    }

    pub fn image(&self, image_id: &str) -> Result<Option<ImageMirror>, Error> {
        get(self.store(), &format!("image/{image_id}"))
    }

    pub fn image_of(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<(tern_store::ImageInfo, Option<ImageMirror>), Error> {
        let info = self.store().image_info(pool, name).map_err(serr)?;
        let m = self.image(&info.id.to_string())?;
        Ok((info, m))
    }

    fn save_image(&self, image_id: &str, m: &ImageMirror) -> Result<(), Error> {
        put(self.store(), &format!("image/{image_id}"), m)
    }

    /// Mirror snapshots of an image, oldest first.
    pub fn mirror_snaps(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<Vec<(SnapInfo, MirrorSnap)>, Error> {
        Ok(self
            .store()
            .snap_list(pool, name)
            .map_err(serr)?
            .into_iter()
            .filter_map(|s| match &s.namespace {
                SnapNamespace::Mirror(m) => {
                    let m = m.clone();
                    Some((s, m))
                }
                _ => None,
            })
            .collect())
    }

    pub fn image_enable(&self, pool: &str, name: &str, mode: &str) -> Result<ImageMirror, Error> {
        let p = self.pool_enabled(pool)?;
        match mode {
            "snapshot" => {}
            "journal" => {
                let info = self.store().image_info(pool, name).map_err(serr)?;
                if !info.features.has(tern_types::Features::JOURNALING) {
                    return Err(Error::invalid(format!(
                        "journal-based mirroring of '{pool}/{name}' needs the journaling feature: \
                         `tern feature enable {pool}/{name} journaling` first, or use snapshot mode"
                    )));
                }
            }
            _ => {
                return Err(Error::invalid(format!(
                    "mirror image mode '{mode}' must be snapshot or journal"
                )));
            }
        }
        let (info, existing) = self.image_of(pool, name)?;
        if let Some(m) = existing {
            // Idempotent, like rbd.
            return Ok(m);
        }
        let m = ImageMirror {
            global_id: uuid::Uuid::new_v4().to_string(),
            mode: mode.into(),
            state: "enabled".into(),
            primary: true,
            epoch: 1,
            demoted: false,
            primary_mirror_uuid: p.mirror_uuid.clone(),
            resync_requested: false,
            resync_full: false,
            sync: None,
            journal_pos: None,
            fork: None,
            last_resync: String::new(),
            primary_epoch: 0,
        };
        self.save_image(&info.id.to_string(), &m)?;
        self.primary_snapshot(pool, name, MirrorSnapState::Primary)?;
        Ok(m)
    }

    pub fn image_disable(&self, pool: &str, name: &str, force: bool) -> Result<(), Error> {
        let (info, _) = self.image_of(pool, name)?;
        let slot = self.replay_slot(&info.id.to_string());
        let _gate = slot.lock();
        let m = self.image(&info.id.to_string())?;
        let Some(m) = m else {
            return Err(Error::invalid(format!(
                "mirroring is not enabled on image '{pool}/{name}'"
            )));
        };
        if !m.primary && !force {
            return Err(Error::invalid(format!(
                "'{pool}/{name}' is non-primary: disable mirroring on the primary, or use --force here"
            )));
        }
        for (s, _) in self.mirror_snaps(pool, name)? {
            self.store()
                .snap_remove(pool, name, &s.name, true)
                .map_err(serr)?;
        }
        let id = info.id.to_string();
        self.store()
            .kv_delete(KvTable::Mirror, &format!("image/{id}"))
            .map_err(serr)?;
        for (k, _) in self
            .store()
            .kv_list(KvTable::Mirror, &format!("status/{}/", m.global_id))
            .map_err(serr)?
        {
            let _ = self.store().kv_delete(KvTable::Mirror, &k);
        }
        Ok(())
    }

    fn peers_tx(&self, pool: &str) -> Result<Vec<PeerRec>, Error> {
        Ok(self
            .pool_enabled(pool)?
            .peers
            .into_iter()
            .filter(|p| p.direction != "tx-only")
            .collect())
    }

    /// Takes a primary (or demoted) mirror snapshot, then prunes old ones.
    pub fn primary_snapshot(
        &self,
        pool: &str,
        name: &str,
        state: MirrorSnapState,
    ) -> Result<SnapInfo, Error> {
        let (_, m) = self.image_of(pool, name)?;
        let m = m.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        if !m.primary {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "'{pool}/{name}' is non-primary: mirror snapshots are taken on the primary"
                ),
            ));
        }
        let peers = self.peers_tx(pool)?;
        let snap_name = format!(
            ".mirror.primary.{}.{}",
            m.global_id,
            uuid::Uuid::new_v4().simple()
        );
        let ms = MirrorSnap {
            state,
            complete: true,
            mirror_peer_uuids: peers.iter().map(|p| p.uuid.clone()).collect(),
            primary_mirror_uuid: String::new(),
            primary_snap_id: 0,
            last_copied_object_number: 0,
        };
        let snap = self
            .store()
            .snap_create(pool, name, &snap_name, SnapNamespace::Mirror(ms))
            .map_err(serr)?;
        self.prune(pool, name, &m)?;
        Ok(snap)
    }

    /// rbd_mirroring_max_mirroring_snapshots: at most this many primary
    /// mirror snapshots per image, however they were taken.
    pub fn max_snaps(&self) -> usize {
        let (lo, hi) = crate::options::range_of("rbd_mirroring_max_mirroring_snapshots")
            .unwrap_or((3.0, 1000.0));
        self.site
            .config_f64("client", "rbd_mirroring_max_mirroring_snapshots")
            .clamp(lo, hi) as usize
    }

    /// Holds the primary mirror snapshots of an image to the cap, as Ceph
    /// does: the newest always stays, then each peer's base (the newest
    /// snapshot it acknowledged holding: its next delta starts there), then
    /// the newest of the rest; everything older goes, synced by a peer or
    /// not. A peer that had not synced a pruned snapshot loses nothing it
    /// needs (its next delta, from its base to the newest, covers it) but
    /// it has fallen behind, and its status says so; only when more peers'
    /// bases than the cap allows must the oldest bases go too, and those
    /// peers' next sync is a full copy.
    fn prune(&self, pool: &str, name: &str, m: &ImageMirror) -> Result<(), Error> {
        let max = self.max_snaps();
        let snaps: Vec<(SnapInfo, MirrorSnap)> = self
            .mirror_snaps(pool, name)?
            .into_iter()
            .filter(|(_, ms)| {
                matches!(
                    ms.state,
                    MirrorSnapState::Primary | MirrorSnapState::PrimaryDemoted
                )
            })
            .collect();
        if snaps.len() <= max {
            return Ok(());
        }
        let peers = self.peers_tx(pool)?;
        let mut acks = Vec::new();
        for p in &peers {
            let acked: u64 =
                get(self.store(), &format!("ack/{}/{}", m.global_id, p.uuid))?.unwrap_or(0);
            acks.push((p, acked));
        }
        let exists = |id: u64| snaps.iter().any(|(s, _)| s.id == id);
        let mut keep = std::collections::BTreeSet::new();
        keep.insert(snaps.last().expect("more than max").0.id);
        let mut bases: Vec<u64> = acks
            .iter()
            .map(|(_, a)| *a)
            .filter(|a| *a > 0 && exists(*a))
            .collect();
        bases.sort_unstable_by(|a, b| b.cmp(a));
        for b in bases {
            if keep.len() < max {
                keep.insert(b);
            }
        }
        for (s, _) in snaps.iter().rev() {
            if keep.len() >= max {
                break;
            }
            keep.insert(s.id);
        }
        let mut removed = Vec::new();
        for (s, _) in &snaps {
            if !keep.contains(&s.id) {
                self.store()
                    .snap_remove(pool, name, &s.name, true)
                    .map_err(serr)?;
                removed.push(s.id);
            }
        }
        for (p, acked) in acks {
            let unsynced = removed.iter().filter(|id| **id > acked).count() as u64;
            let base_lost = acked > 0 && removed.contains(&acked);
            if unsynced == 0 && !base_lost {
                continue;
            }
            let key = format!("behind/{}/{}", m.global_id, p.uuid);
            let mut b: Behind = get(self.store(), &key)?.unwrap_or_default();
            b.acked = acked;
            b.pruned_unsynced += unsynced;
            b.base_lost |= base_lost;
            b.cap = max as u64;
            put(self.store(), &key, &b)?;
            tracing::warn!(
                image = %format!("{pool}/{name}"), peer = %p.site_name, pruned = unsynced, base_lost,
                "mirror snapshot cap reached before the peer synced: it fell behind"
            );
        }
        Ok(())
    }

    /// What pruning did to a peer that had not caught up, if anything.
    pub fn behind(&self, global_id: &str, peer_uuid: &str) -> Result<Option<Behind>, Error> {
        get(self.store(), &format!("behind/{global_id}/{peer_uuid}"))
    }

    pub fn ack(
        &self,
        pool: &str,
        global_id: &str,
        peer_uuid: &str,
        snap_id: u64,
    ) -> Result<(), Error> {
        let key = format!("ack/{global_id}/{peer_uuid}");
        let old: u64 = get(self.store(), &key)?.unwrap_or(0);
        if snap_id > old {
            put(self.store(), &key, &snap_id)?;
        }
        // A newer snapshot synced: caught up with what pruning took.
        let bkey = format!("behind/{global_id}/{peer_uuid}");
        if let Some(b) = get::<Behind>(self.store(), &bkey)?
            && snap_id > b.acked
        {
            self.store()
                .kv_delete(KvTable::Mirror, &bkey)
                .map_err(serr)?;
        }
        let _ = pool;
        Ok(())
    }

    pub fn find_by_global(
        &self,
        pool: &str,
        global_id: &str,
    ) -> Result<Option<(tern_store::ImageInfo, ImageMirror)>, Error> {
        for img in self.store().image_list(pool).map_err(serr)? {
            if let Some(m) = self.image(&img.id.to_string())?
                && m.global_id == global_id
            {
                return Ok(Some((img, m)));
            }
        }
        Ok(None)
    }

    pub fn demote(&self, pool: &str, name: &str) -> Result<ImageMirror, Error> {
        let info = self.store().image_info(pool, name).map_err(serr)?;
        let slot = self.replay_slot(&info.id.to_string());
        let _gate = slot.lock();
        let m = self.image(&info.id.to_string())?;
        let mut m = m.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        if !m.primary {
            return Err(Error::invalid(format!(
                "'{pool}/{name}' is already non-primary"
            )));
        }
        self.store()
            .open_image(pool, name)
            .and_then(|i| i.flush())
            .map_err(serr)?;
        self.primary_snapshot(pool, name, MirrorSnapState::PrimaryDemoted)?;
        // Journal mode: the marker after the demotion snapshot tells the
        // peer's replayer to stop there.
        let img = self.store().open_image(pool, name).map_err(serr)?;
        if img.journal().is_some() {
            img.journal_marker("demote", m.epoch.to_string().as_bytes())
                .map_err(serr)?;
        }
        m.primary = false;
        m.demoted = true;
        self.save_image(&info.id.to_string(), &m)?;
        Ok(m)
    }

    /// Promote. Plain: only once this site holds the demotion of the newest
    /// primary there was — its own (it demoted the image and no peer was
    /// promoted since: every peer is asked, in `peers`) or the demotion of
    /// the site it follows, replayed here — so nothing acknowledged is lost.
    /// Forced: at once; an incomplete sync is rolled back to the last
    /// complete snapshot so the image is crash-consistent. Either way the
    /// epoch moves past every epoch known here, which fences every
    /// mirroring step begun before.
    pub fn promote(
        &self,
        pool: &str,
        name: &str,
        force: bool,
        peers: &PeerView,
    ) -> Result<ImageMirror, Error> {
        let info = self.store().image_info(pool, name).map_err(serr)?;
        // No journal batch, sync step or record update may land while (or
        // after) this image turns primary: they all take this lock.
        let slot = self.replay_slot(&info.id.to_string());
        let hw = slot.lock();
        let m = self.image(&info.id.to_string())?;
        let mut m = m.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        if m.primary {
            return Err(Error::invalid(format!(
                "'{pool}/{name}' is already primary"
            )));
        }
        let snaps = self.mirror_snaps(pool, name)?;
        let last_complete = snaps.iter().rev().find(|(_, ms)| ms.complete);
        let pool_rec = self.pool_enabled(pool)?;
        let own = pool_rec.mirror_uuid.clone();
        let from = pool_rec
            .peers
            .iter()
            .find(|p| p.mirror_uuid == m.primary_mirror_uuid)
            .map(|p| p.site_name.clone())
            .unwrap_or_else(|| "the primary site".into());
        let new_epoch = if !force {
            if m.sync.is_some() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "cannot promote '{pool}/{name}': a sync from {from} is in progress, so the demotion of {from} \
                         has not been replayed yet. Wait until `tern mirror image status {pool}/{name}` shows it synced, \
                         or use --force if {from} is lost"
                    ),
                ));
            }
            let demoted_here = m.demoted && m.primary_mirror_uuid == own;
            let demotion_replayed = matches!(
                snaps.last(),
                Some((_, ms)) if ms.complete && ms.state == MirrorSnapState::NonPrimaryDemoted
            );
            let holds_epoch = if demoted_here {
                m.epoch
            } else if demotion_replayed {
                m.primary_epoch
            } else {
                let why = match snaps.last() {
                    Some((_, ms)) if !ms.complete => "a sync from it is still in progress",
                    _ => "it has not been demoted, or its demotion has not been replayed here yet",
                };
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "cannot promote '{pool}/{name}': the demotion of {from} has not been replayed yet ({why}). \
                         Demote it on {from} and wait until `tern mirror image status {pool}/{name}` shows it synced, \
                         or use --force if {from} is lost"
                    ),
                ));
            };
            if !peers.primary_at.is_empty() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "cannot promote '{pool}/{name}': {} holds it as primary. Demote it there first \
                         (and wait until this site has replayed the demotion), or use --force if that site is lost",
                        peers.primary_at.join(" and ")
                    ),
                ));
            }
            // Someone was promoted after the demotion held here: its writes,
            // and its own demotion, are not here yet.
            let (newer, newer_site) = if peers.max_epoch > m.epoch.max(m.primary_epoch) {
                (peers.max_epoch, peers.max_epoch_site.clone())
            } else {
                (m.epoch.max(m.primary_epoch), "this site".to_string())
            };
            if newer > holds_epoch {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "cannot promote '{pool}/{name}': {newer_site} was promoted (epoch {newer}) after the demotion \
                         this site holds (epoch {holds_epoch}), and its demotion has not been replayed here yet. \
                         Wait until `tern mirror image status {pool}/{name}` shows it replayed (the mirror daemon here \
                         follows it), or use --force if {newer_site} is lost"
                    ),
                ));
            }
            if demoted_here && let Some((site, why)) = peers.unreachable.first() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "cannot promote '{pool}/{name}' back without --force: this site demoted it, and {site} cannot \
                         be asked whether it was promoted since ({why}). Retry when {site} answers, or use --force \
                         if {site} is lost"
                    ),
                ));
            }
            holds_epoch + 1
        } else {
            // A sync cut short left the head half-written: go back to the
            // last complete copy so the promoted image is crash-consistent.
            if m.sync.take().is_some()
                && let Some((s, _)) = last_complete
            {
                self.store()
                    .snap_rollback(pool, name, &s.name)
                    .map_err(serr)?;
            }
            m.epoch.max(m.primary_epoch).max(peers.max_epoch) + 1
        };
        // What this site holds of the old primary: its journal up to a
        // tid (journal mode), or its newest snapshot copied here.
        let from_uuid = m.primary_mirror_uuid.clone();
        let (journal_tid, data_as_of_us) = match &m.journal_pos {
            Some(p) if p.primary_mirror_uuid == from_uuid => {
                let tid = if hw.0 == from_uuid {
                    hw.1.max(p.tid)
                } else {
                    p.tid
                };
                (tid, p.timestamp_us)
            }
            _ => (
                0,
                self.mirror_snaps(pool, name)?
                    .iter()
                    .rev()
                    .find(|(_, ms)| ms.complete && ms.primary_mirror_uuid == from_uuid)
                    .map_or(0, |(s, _)| s.created * 1_000_000),
            ),
        };
        m.primary = true;
        m.demoted = false;
        m.epoch = new_epoch;
        // Once primary, this image's history is its own: if it ever
        // follows a peer's journal again, it starts from a sync point (a
        // delta), never from an old place that would replay, out of their
        // order, writes it already holds.
        m.journal_pos = None;
        m.primary_mirror_uuid = self.pool_enabled(pool)?.mirror_uuid;
        let was_demoted_here = from_uuid == m.primary_mirror_uuid;
        self.save_image(&info.id.to_string(), &m)?;
        let snap = self.primary_snapshot(pool, name, MirrorSnapState::Primary)?;
        if !was_demoted_here {
            m.fork = Some(Fork {
                from_mirror_uuid: from_uuid,
                journal_tid,
                snap_id: snap.id,
                forced: force,
                data_as_of_us,
                at: now_secs(),
            });
            self.save_image(&info.id.to_string(), &m)?;
        }
        drop(hw);
        Ok(m)
    }

    /// Creates the local non-primary copy of a remote primary image.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        &self,
        pool: &str,
        name: &str,
        global_id: &str,
        mode: &str,
        opts: &tern_store::CreateOpts,
        primary_mirror_uuid: &str,
    ) -> Result<ImageMirror, Error> {
        self.pool_enabled(pool)?;
        if let Some((img, m)) = self.find_by_global(pool, global_id)? {
            let _ = img;
            return Ok(m);
        }
        match self.store().image_info(pool, name) {
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "'{pool}/{name}' exists here but is not a copy of the remote image {global_id}: \
                         rename or remove it so mirroring can create its copy"
                    ),
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(serr(e)),
        }
        let info = self.store().image_create(pool, name, opts).map_err(serr)?;
        let m = ImageMirror {
            global_id: global_id.into(),
            mode: mode.into(),
            state: "enabled".into(),
            primary: false,
            epoch: 0,
            demoted: false,
            primary_mirror_uuid: primary_mirror_uuid.into(),
            resync_requested: false,
            resync_full: false,
            sync: None,
            journal_pos: None,
            fork: None,
            last_resync: String::new(),
            primary_epoch: 0,
        };
        self.save_image(&info.id.to_string(), &m)?;
        Ok(m)
    }

    pub fn store_flush(&self, pool: &str, name: &str) -> Result<(), Error> {
        self.store()
            .open_image(pool, name)
            .and_then(|i| i.flush())
            .map_err(serr)
    }

    /// Starts (or resumes) copying a primary snapshot into this non-primary image.
    pub fn sync_begin(
        &self,
        pool: &str,
        name: &str,
        q: &tern_proto::v1::MirrorSyncBeginRequest,
    ) -> Result<SyncState, Error> {
        let info = self.store().image_info(pool, name).map_err(serr)?;
        let slot = self.replay_slot(&info.id.to_string());
        let _gate = slot.lock();
        let mut m = self.image(&info.id.to_string())?.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        check_fence(pool, name, &m, q.expect_epoch)?;
        if m.primary {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "'{pool}/{name}' is primary here: refusing to overwrite it with a remote copy (split-brain?)"
                ),
            ));
        }
        if let Some(s) = &m.sync
            && s.primary_snap_id == q.primary_snap_id
            && s.primary_mirror_uuid == q.primary_mirror_uuid
        {
            return Ok(s.clone());
        }
        if q.primary_epoch > 0 {
            m.primary_epoch = q.primary_epoch;
        }
        let s = SyncState {
            primary_mirror_uuid: q.primary_mirror_uuid.clone(),
            primary_snap_id: q.primary_snap_id,
            demoted: q.demoted,
            size: q.size,
            last_copied_object_number: 0,
            started: now_secs(),
        };
        if q.size != info.size {
            self.store()
                .image_resize(pool, name, q.size, true)
                .map_err(serr)?;
        }
        // Between reading the record and writing it back: a promotion
        // here must wait (it takes the same lock), or be undone.
        test_hold("sync-begin");
        m.sync = Some(s.clone());
        m.primary_mirror_uuid = q.primary_mirror_uuid.clone();
        // Following another site now: no longer "demoted here" (a copy
        // others would follow for its demotion).
        m.demoted = false;
        self.save_image(&info.id.to_string(), &m)?;
        Ok(s)
    }

    /// Records progress; with `complete`, flushes and takes the non-primary
    /// mirror snapshot that marks this copy complete.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_progress(
        &self,
        pool: &str,
        name: &str,
        primary_snap_id: u64,
        last: u64,
        complete: bool,
        resync_summary: &str,
        expect_epoch: Option<u64>,
    ) -> Result<SnapInfo, Error> {
        let info = self.store().image_info(pool, name).map_err(serr)?;
        let slot = self.replay_slot(&info.id.to_string());
        let _gate = slot.lock();
        let mut m = self.image(&info.id.to_string())?.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        check_fence(pool, name, &m, expect_epoch)?;
        if m.primary {
            return Err(Error::new(
                ErrorKind::Fenced,
                format!("'{pool}/{name}' is primary here: its sync from another site is over"),
            ));
        }
        let mut s = match m.sync.clone() {
            Some(s) if s.primary_snap_id == primary_snap_id => s,
            _ => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("no sync of snapshot {primary_snap_id} in progress on '{pool}/{name}'"),
                ));
            }
        };
        s.last_copied_object_number = last;
        if !complete {
            m.sync = Some(s);
            self.save_image(&info.id.to_string(), &m)?;
            return Ok(SnapInfo {
                id: 0,
                name: String::new(),
                namespace: SnapNamespace::User,
                size: 0,
                created: 0,
                protected: false,
            });
        }
        let snap = self.non_primary_snapshot(
            pool,
            name,
            &m.global_id,
            &s.primary_mirror_uuid,
            s.primary_snap_id,
            s.demoted,
            last,
        )?;
        m.sync = None;
        if !resync_summary.is_empty() {
            m.resync_requested = false;
            m.resync_full = false;
            m.last_resync = format!("{resync_summary} (finished {})", now_secs());
        }
        self.save_image(&info.id.to_string(), &m)?;
        Ok(snap)
    }

    /// Takes the local copy's snapshot of the primary's snapshot
    /// `primary_snap_id` (after a flush, so it holds what was written), then
    /// keeps a bounded number of them: the newest is the base of the next
    /// delta.
    #[allow(clippy::too_many_arguments)]
    fn non_primary_snapshot(
        &self,
        pool: &str,
        name: &str,
        global_id: &str,
        primary_mirror_uuid: &str,
        primary_snap_id: u64,
        demoted: bool,
        last_copied_object_number: u64,
    ) -> Result<SnapInfo, Error> {
        self.store_flush(pool, name)?;
        let ms = MirrorSnap {
            state: if demoted {
                MirrorSnapState::NonPrimaryDemoted
            } else {
                MirrorSnapState::NonPrimary
            },
            complete: true,
            mirror_peer_uuids: vec![],
            primary_mirror_uuid: primary_mirror_uuid.to_string(),
            primary_snap_id,
            last_copied_object_number,
        };
        let snap_name = format!(
            ".mirror.non_primary.{global_id}.{}",
            uuid::Uuid::new_v4().simple()
        );
        let snap = self
            .store()
            .snap_create(pool, name, &snap_name, SnapNamespace::Mirror(ms))
            .map_err(serr)?;
        let olds: Vec<_> = self
            .mirror_snaps(pool, name)?
            .into_iter()
            .filter(|(_, x)| {
                matches!(
                    x.state,
                    MirrorSnapState::NonPrimary | MirrorSnapState::NonPrimaryDemoted
                )
            })
            .collect();
        let max = self.max_snaps();
        if olds.len() > max {
            for (x, _) in olds.iter().take(olds.len() - max) {
                self.store()
                    .snap_remove(pool, name, &x.name, true)
                    .map_err(serr)?;
            }
        }
        Ok(snap)
    }

    /// Changes an image's mirror record in place, serialised with
    /// promotion and the mirror daemon's steps (a record read before a
    /// promotion and written after it would undo the promotion).
    pub fn update_image<T>(
        &self,
        image_id: &str,
        f: impl FnOnce(&mut ImageMirror) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let slot = self.replay_slot(image_id);
        let _gate = slot.lock();
        let mut m = self
            .image(image_id)?
            .ok_or_else(|| Error::invalid("mirroring is not enabled on this image".to_string()))?;
        let out = f(&mut m)?;
        self.save_image(image_id, &m)?;
        Ok(out)
    }

    /// Runs `write` (a mirror sync's data) only while the image is still
    /// the non-primary copy, at the epoch, that the sync began on: a
    /// promotion waits for a write in progress, and none lands after it.
    pub fn sync_write<T>(
        &self,
        image_id: &str,
        spec: &str,
        expect_epoch: Option<u64>,
        write: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let slot = self.replay_slot(image_id);
        let _gate = slot.lock();
        let m = self.image(image_id)?;
        match m {
            Some(m) if !m.primary && m.sync.is_some() => {
                let (pool, name) = spec.split_once('/').unwrap_or((spec, ""));
                check_fence(pool, name, &m, expect_epoch)?;
                write()
            }
            Some(m) if m.primary => Err(Error::new(
                ErrorKind::Fenced,
                format!("{spec} was promoted here: its mirror sync is refused"),
            )),
            _ => Err(Error::new(
                ErrorKind::Fenced,
                format!(
                    "{spec} has no mirror sync in progress any more: the sync's writes are refused"
                ),
            )),
        }
    }

    pub fn store_status(&self, global_id: &str, mut s: SiteStatus) -> Result<(), Error> {
        // Reports come from peers' keys too: the name keys the record and
        // is shown in status and metrics.
        if !s.site_name.is_empty() {
            valid_site_name(&s.site_name)?;
        }
        s.received = now_ms();
        put(
            self.store(),
            &format!("status/{global_id}/{}", s.site_name),
            &s,
        )
    }

    pub fn statuses(&self, global_id: &str) -> Result<Vec<SiteStatus>, Error> {
        let mut v = Vec::new();
        for (k, val) in self
            .store()
            .kv_list(KvTable::Mirror, &format!("status/{global_id}/"))
            .map_err(serr)?
        {
            match serde_json::from_str(&val) {
                Ok(s) => v.push(s),
                Err(e) => tracing::warn!(key = %k, error = %e, "skipping a damaged status record"),
            }
        }
        Ok(v)
    }

    pub fn heartbeat(&self, mut d: Daemon) -> Result<(), Error> {
        if !d.site_name.is_empty() {
            valid_site_name(&d.site_name)?;
        }
        if d.service_id.contains('/') || d.service_id.chars().any(tern_types::text::is_invisible) {
            return Err(Error::invalid(format!(
                "daemon id '{}' may hold visible characters only, no '/'",
                tern_types::escaped(&d.service_id)
            )));
        }
        d.received_ms = now_ms();
        put(
            self.store(),
            &format!("daemon/{}/{}", d.site_name, d.service_id),
            &d,
        )?;
        // A restarted daemon has a new id, so silent ones would pile up.
        let all = self
            .store()
            .kv_list(KvTable::Mirror, "daemon/")
            .map_err(serr)?;
        for key in forgotten_daemons(&all, d.received_ms) {
            self.store()
                .kv_delete(KvTable::Mirror, &key)
                .map_err(serr)?;
        }
        Ok(())
    }

    pub fn daemons(&self) -> Result<Vec<Daemon>, Error> {
        Ok(self
            .store()
            .kv_list(KvTable::Mirror, "daemon/")
            .map_err(serr)?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str(&v).ok())
            .collect())
    }
}

/// The token of `mirror pool peer bootstrap create`: Ceph's four keys plus ours.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token {
    pub fsid: String,
    pub client_id: String,
    pub key: String,
    pub mon_host: String,
    #[serde(default)]
    pub site_name: String,
    #[serde(default)]
    pub tls_fingerprint: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub mirror_uuid: String,
}

impl Token {
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_string(self).expect("json"))
    }

    pub fn decode(s: &str) -> Result<Token, Error> {
        use base64::Engine;
        let bad = |why: &str| Error::invalid(format!("malformed bootstrap token: {why}"));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| bad("not base64"))?;
        let t: Token = serde_json::from_slice(&raw)
            .map_err(|e| bad(&format!("not the expected JSON ({e})")))?;
        tern_types::SiteId::parse(&t.fsid).map_err(|_| bad("fsid is not a site id"))?;
        if t.key.is_empty() || t.client_id.is_empty() {
            return Err(bad("no key or client_id"));
        }
        if t.tls_fingerprint.len() != 64
            || !t.tls_fingerprint.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(bad(
                "tls_fingerprint is missing or not a SHA-256 (a Ceph token cannot be used: tern pins certificates)",
            ));
        }
        if t.mon_host_list().is_empty() {
            return Err(bad("mon_host names no endpoint"));
        }
        if !t.site_name.is_empty() {
            valid_site_name(&t.site_name).map_err(|e| bad(&e.message))?;
        }
        crate::auth::validate_entity(&format!("client.{}", t.client_id))
            .map_err(|e| bad(&e.message))?;
        if !t.pool.is_empty() {
            tern_types::validate_name("pool", &t.pool).map_err(|e| bad(&e.message))?;
        }
        Ok(t)
    }

    /// Accepts ours (`h:p,h:p`) and Ceph's (`[v2:h:p/0,v1:h:p/0]`).
    pub fn mon_host_list(&self) -> Vec<String> {
        self.mon_host
            .trim_matches(|c| c == '[' || c == ']')
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .filter(|s| !s.starts_with("v1:"))
            .map(|s| {
                s.trim_start_matches("v2:")
                    .trim_end_matches("/0")
                    .to_string()
            })
            .collect()
    }
}

pub fn now() -> u64 {
    now_secs()
}

/// What applying a batch of the primary's journal entries did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub last_tid: u64,
    /// Unix microseconds of the last entry applied.
    pub last_timestamp_us: u64,
    pub entries: u64,
    pub bytes: u64,
    /// A demote marker was reached: the primary handed over; replay stops.
    pub demoted: bool,
}

impl Mirror {
    /// Journal mode, on the non-primary: applies the primary's entries (in
    /// the journal's own encoding, crc-checked) in order, up to and
    /// including a demote marker. Every entry is idempotent in sequence, so
    /// replaying some again after a restart changes nothing. With
    /// `persist`, the image is flushed and the position recorded.
    pub fn journal_apply(
        &self,
        pool: &str,
        name: &str,
        primary_mirror_uuid: &str,
        entries: &[u8],
        persist: bool,
        fence: (Option<u64>, u64),
    ) -> Result<Applied, Error> {
        use tern_store::journal::{JournalEntry, JournalOp};
        let id = self
            .store()
            .image_info(pool, name)
            .map_err(serr)?
            .id
            .to_string();
        let img = self.store().open_image(pool, name).map_err(serr)?;
        let slot = self.replay_slot(&id);
        let mut hw = slot.lock();
        // Read under the lock: a promotion holds it while it turns the
        // image primary, so no batch lands after that.
        let mut m = self.image(&id)?.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        check_fence(pool, name, &m, fence.0)?;
        if m.primary {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "'{pool}/{name}' is primary here: refusing to replay another site's journal into it"
                ),
            ));
        }
        if hw.0 != primary_mirror_uuid {
            let from = m
                .journal_pos
                .as_ref()
                .filter(|p| p.primary_mirror_uuid == primary_mirror_uuid)
                .map_or(0, |p| p.tid);
            *hw = (primary_mirror_uuid.to_string(), from);
        }
        let mut done = Applied::default();
        // Writes are queued on a journaled image and waited for together
        // (one sync for many, as the primary's writers share theirs); any
        // other entry waits for them first, so the order holds.
        let mut tickets: Vec<tern_store::Ticket> = Vec::new();
        // The position before the first write still in `tickets`: if one
        // of them fails, replay must not count them as applied.
        let mut before_queued: Option<u64> = None;
        fn drain(
            t: &mut Vec<tern_store::Ticket>,
            hw: &mut (String, u64),
            before: &mut Option<u64>,
        ) -> Result<(), Error> {
            let mut failed = None;
            for x in t.drain(..) {
                // Wait for every one even after a failure: none may still
                // be landing when the caller retries.
                if let Err(e) = x.wait() {
                    failed.get_or_insert(e);
                }
            }
            if let Some(e) = failed {
                if let Some(b) = before.take() {
                    hw.1 = b;
                }
                return Err(serr(e));
            }
            *before = None;
            Ok(())
        }
        let mut b = entries;
        let map_key = |rid: u64| format!("journal-snap/{id}/{primary_mirror_uuid}/{rid}");
        while !b.is_empty() {
            let (e, used) = JournalEntry::decode(b).map_err(|e| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("journal entry from the primary: {e}"),
                )
            })?;
            b = &b[used..];
            if e.tid <= hw.1 {
                // Applied already (a replayer restarted behind us).
                done.last_tid = e.tid;
                done.last_timestamp_us = e.timestamp_us;
                continue;
            }
            let (tid, timestamp_us) = (e.tid, e.timestamp_us);
            if let JournalOp::Write { offset, data } = e.op {
                // The decoded payload goes to the journal queue as it is.
                done.bytes += data.len() as u64;
                match img.try_queue_write(offset, data, false) {
                    Ok(t) => {
                        before_queued.get_or_insert(hw.1);
                        tickets.push(t.map_err(serr)?);
                    }
                    Err(data) => {
                        drain(&mut tickets, &mut hw, &mut before_queued)?;
                        img.write(offset, &data, false).map_err(serr)?;
                    }
                }
                done.last_tid = tid;
                done.last_timestamp_us = timestamp_us;
                done.entries += 1;
                hw.1 = tid;
                continue;
            }
            drain(&mut tickets, &mut hw, &mut before_queued)?;
            match &e.op {
                JournalOp::Write { .. } => unreachable!("handled above"),
                JournalOp::Discard { offset, len } => img.discard(*offset, *len).map_err(serr)?,
                JournalOp::WriteZeroes { offset, len } => {
                    img.write_zeroes(*offset, *len).map_err(serr)?
                }
                JournalOp::Resize { size } => {
                    if img.size() != *size {
                        self.store()
                            .image_resize(pool, name, *size, true)
                            .map_err(serr)?;
                    }
                }
                JournalOp::SnapCreate {
                    id: rid,
                    name: sname,
                    namespace,
                } => match namespace {
                    SnapNamespace::User => {
                        if self.store().snap_get(pool, name, sname).is_err() {
                            self.store()
                                .snap_create(pool, name, sname, SnapNamespace::User)
                                .map_err(serr)?;
                        }
                        put(self.store(), &map_key(*rid), &sname.to_string())?;
                    }
                    SnapNamespace::Mirror(ms) => {
                        let have = self.mirror_snaps(pool, name)?.into_iter().any(|(_, x)| {
                            x.primary_snap_id == *rid
                                && x.primary_mirror_uuid == primary_mirror_uuid
                        });
                        if !have {
                            self.non_primary_snapshot(
                                pool,
                                name,
                                &m.global_id,
                                primary_mirror_uuid,
                                *rid,
                                ms.state == MirrorSnapState::PrimaryDemoted,
                                0,
                            )?;
                        }
                    }
                },
                JournalOp::SnapRemove { id: rid } => {
                    // Mirror snapshots here are pruned on their own.
                    if let Some(sname) = get::<String>(self.store(), &map_key(*rid))? {
                        if self.store().snap_get(pool, name, &sname).is_ok() {
                            self.store()
                                .snap_remove(pool, name, &sname, false)
                                .map_err(serr)?;
                        }
                        let _ = self.store().kv_delete(KvTable::Mirror, &map_key(*rid));
                    }
                }
                JournalOp::SnapRollback { id: rid } => {
                    if let Some(sname) = get::<String>(self.store(), &map_key(*rid))? {
                        self.store()
                            .snap_rollback(pool, name, &sname)
                            .map_err(serr)?;
                    }
                }
                JournalOp::Flush => img.flush().map_err(serr)?,
                JournalOp::Marker { kind, .. } => {
                    if kind == "demote" {
                        done.demoted = true;
                    }
                }
            }
            done.last_tid = e.tid;
            done.last_timestamp_us = e.timestamp_us;
            done.entries += 1;
            hw.1 = e.tid;
            if done.demoted {
                break;
            }
        }
        drain(&mut tickets, &mut hw, &mut before_queued)?;
        if persist || done.demoted {
            img.flush().map_err(serr)?;
            if hw.1 > 0 {
                m.journal_pos = Some(JournalPos {
                    primary_mirror_uuid: primary_mirror_uuid.to_string(),
                    tid: hw.1,
                    skip_to: String::new(),
                    timestamp_us: if done.last_timestamp_us > 0 {
                        done.last_timestamp_us
                    } else {
                        m.journal_pos
                            .as_ref()
                            .filter(|p| p.primary_mirror_uuid == primary_mirror_uuid)
                            .map_or(0, |p| p.timestamp_us)
                    },
                });
                m.primary_mirror_uuid = primary_mirror_uuid.to_string();
                m.demoted = false;
                if fence.1 > 0 {
                    m.primary_epoch = fence.1;
                }
                self.save_image(&id, &m)?;
            }
        }
        Ok(done)
    }

    /// Records where journal replay stands after a snapshot sync: the
    /// replayer continues from `tid` (0: no position).
    pub fn journal_pos_set(
        &self,
        pool: &str,
        name: &str,
        pos: Option<JournalPos>,
        expect_epoch: Option<u64>,
    ) -> Result<(), Error> {
        let info = self.store().image_info(pool, name).map_err(serr)?;
        let id = info.id.to_string();
        // Read the record under the lock: read before it, a promotion in
        // between would be written back over (the image turned non-primary).
        let slot = self.replay_slot(&id);
        let mut hw = slot.lock();
        let mut m = self.image(&id)?.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        check_fence(pool, name, &m, expect_epoch)?;
        if m.primary {
            return Err(Error::new(
                ErrorKind::Fenced,
                format!("'{pool}/{name}' is primary here: it replays no other site's journal"),
            ));
        }
        test_hold("journal-position");
        *hw = pos.as_ref().map_or((String::new(), 0), |p| {
            (p.primary_mirror_uuid.clone(), p.tid)
        });
        m.journal_pos = pos;
        self.save_image(&id, &m)
    }

    fn replay_slot(&self, image_id: &str) -> crate::site::ReplaySlot {
        self.site
            .replay
            .lock()
            .entry(image_id.to_string())
            .or_default()
            .clone()
    }
}
