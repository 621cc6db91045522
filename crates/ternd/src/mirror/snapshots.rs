//! Mirror snapshots on the primary: taking them, pruning past the cap,
//! and what peers hold (acks).

use super::*;

impl Mirror {
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
        self.snapshot_as_primary(pool, name, &m, state)
    }

    /// A primary mirror snapshot of an image `m` describes, primary or
    /// being promoted.
    pub(super) fn snapshot_as_primary(
        &self,
        pool: &str,
        name: &str,
        m: &ImageMirror,
        state: MirrorSnapState,
    ) -> Result<SnapInfo, Error> {
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
            .snap_create(pool, name, &snap_name, SnapNamespace::Mirror(ms))?;
        self.prune(pool, name, m)?;
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
    pub(super) fn prune(&self, pool: &str, name: &str, m: &ImageMirror) -> Result<(), Error> {
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
                self.store().snap_remove(pool, name, &s.name, true)?;
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

    pub fn ack(&self, global_id: &str, peer_uuid: &str, snap_id: u64) -> Result<(), Error> {
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
            self.store().kv_delete(KvTable::Mirror, &bkey)?;
        }
        Ok(())
    }

    pub fn find_by_global(
        &self,
        pool: &str,
        global_id: &str,
    ) -> Result<Option<(tern_store::ImageInfo, ImageMirror)>, Error> {
        for img in self.store().image_list(pool)? {
            if let Some(m) = self.image(&img.id.to_string())?
                && m.global_id == global_id
            {
                return Ok(Some((img, m)));
            }
        }
        Ok(None)
    }
}
