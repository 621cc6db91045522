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

mod journal_apply;
mod records;
mod role;
mod snapshots;
mod sync;
mod token;

pub use journal_apply::Applied;
pub use records::*;
pub use token::Token;

use crate::site::{Site, now_secs};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tern_store::{KvTable, MirrorSnap, MirrorSnapState, SnapInfo, SnapNamespace, Store};
use tern_types::ErrorKind;
use tern_types::error::Error;
pub use tern_types::mirror::{
    ImageMirrorMode, ImageMirrorState, MirrorStatusState, PeerDirection, PoolMirrorMode,
    StatusReason,
};

/// The mirroring state of one site, over its store.
pub struct Mirror {
    pub site: Arc<Site>,
}

impl Mirror {
    fn store(&self) -> &Store {
        &self.site.store
    }

    pub fn pool(&self, pool: &str) -> Result<Option<PoolMirror>, Error> {
        self.store().pool_get(pool)?;
        get(self.store(), &format!("pool/{pool}"))
    }

    /// The pool's mirroring config, or an error saying mirroring is off.
    pub fn pool_enabled(&self, pool: &str) -> Result<PoolMirror, Error> {
        match self.pool(pool)? {
            Some(p) if p.mode != PoolMirrorMode::Disabled => Ok(p),
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
        mode: PoolMirrorMode,
        site_name: &str,
    ) -> Result<PoolMirror, Error> {
        let mode = PoolMirrorMode::enabling(mode.as_str())?;
        let mut p = self.pool(pool)?.unwrap_or_default();
        if p.mirror_uuid.is_empty() {
            p.mirror_uuid = uuid::Uuid::new_v4().to_string();
        }
        p.mode = mode;
        if !site_name.is_empty() {
            valid_site_name(site_name)?;
            p.site_name = site_name.to_string();
        } else if p.site_name.is_empty() {
            p.site_name = self.site.site_name.clone();
        }
        self.save_pool(pool, &p)?;
        if mode == PoolMirrorMode::Pool {
            for img in self.store().image_list(pool)? {
                if self.image(&img.id.to_string())?.is_none() {
                    let mode = ImageMirrorMode::for_features(img.features);
                    self.image_enable(pool, &img.name, mode)?;
                }
            }
        }
        Ok(p)
    }

    pub fn pool_disable(&self, pool: &str) -> Result<(), Error> {
        for img in self.store().image_list(pool)? {
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
        p.mode = PoolMirrorMode::Disabled;
        self.save_pool(pool, &p)
    }

    /// Adds or (same fsid) updates a peer; returns it.
    pub fn peer_upsert(&self, pool: &str, mut peer: PeerRec) -> Result<PeerRec, Error> {
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
            "direction" => peer.direction = value.parse()?,
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
        let info = self.store().image_info(pool, name)?;
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
            .snap_list(pool, name)?
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

    pub fn image_enable(
        &self,
        pool: &str,
        name: &str,
        mode: ImageMirrorMode,
    ) -> Result<ImageMirror, Error> {
        let p = self.pool_enabled(pool)?;
        let (info, existing) = self.image_of(pool, name)?;
        if let Some(m) = existing {
            // Idempotent, like rbd; another mode is refused, never a
            // silent no-op that leaves the RPO other than asked.
            if m.mode != mode {
                return Err(Error::invalid(format!(
                    "mirroring of '{pool}/{name}' is already enabled in {} mode: switching an enabled image \
                     to {mode} mode is not supported; disable its mirroring and enable it again in {mode} mode",
                    m.mode
                )));
            }
            return Ok(m);
        }
        match mode {
            ImageMirrorMode::Snapshot => {}
            ImageMirrorMode::Journal => {
                if !info.features.has(tern_types::Features::JOURNALING) {
                    return Err(Error::invalid(format!(
                        "journal-based mirroring of '{pool}/{name}' needs the journaling feature: \
                         `tern feature enable {pool}/{name} journaling` first, or use snapshot mode"
                    )));
                }
            }
        }
        let m = ImageMirror {
            global_id: uuid::Uuid::new_v4().to_string(),
            mode,
            state: ImageMirrorState::Enabled,
            primary: true,
            epoch: 1,
            demoted: false,
            primary_mirror_uuid: p.mirror_uuid.clone(),
            resync_requested: false,
            resync_full: false,
            sync: None,
            journal_pos: None,
            fork: None,
            promoting: None,
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
            self.store().snap_remove(pool, name, &s.name, true)?;
        }
        let id = info.id.to_string();
        self.store()
            .kv_delete(KvTable::Mirror, &format!("image/{id}"))?;
        for (k, _) in self
            .store()
            .kv_list(KvTable::Mirror, &format!("status/{}/", m.global_id))?
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
            .filter(|p| p.direction != PeerDirection::TxOnly)
            .collect())
    }
}

impl Mirror {
    pub fn store_status(&self, global_id: &str, mut s: SiteStatus) -> Result<(), Error> {
        // Reports come from peers' keys too: the name keys the record and
        // is shown in status and metrics.
        if !s.report.site_name.is_empty() {
            valid_site_name(&s.report.site_name)?;
        }
        s.received = now_ms();
        put(
            self.store(),
            &format!("status/{global_id}/{}", s.report.site_name),
            &s,
        )
    }

    pub fn statuses(&self, global_id: &str) -> Result<Vec<SiteStatus>, Error> {
        let mut v = Vec::new();
        for (k, val) in self
            .store()
            .kv_list(KvTable::Mirror, &format!("status/{global_id}/"))?
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
        let all = self.store().kv_list(KvTable::Mirror, "daemon/")?;
        for key in forgotten_daemons(&all, d.received_ms) {
            self.store().kv_delete(KvTable::Mirror, &key)?;
        }
        Ok(())
    }

    pub fn daemons(&self) -> Result<Vec<Daemon>, Error> {
        Ok(self
            .store()
            .kv_list(KvTable::Mirror, "daemon/")?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str(&v).ok())
            .collect())
    }
}
