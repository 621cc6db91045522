//! The non-primary side of a snapshot sync: adopting a remote image,
//! beginning, advancing and completing a sync, fenced writes.

use super::*;

impl Mirror {
    /// Creates the local non-primary copy of a remote primary image.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        &self,
        pool: &str,
        name: &str,
        global_id: &str,
        mode: ImageMirrorMode,
        opts: &tern_store::CreateOpts,
        primary_mirror_uuid: &str,
    ) -> Result<ImageMirror, Error> {
        self.pool_enabled(pool)?;
        if let Some((_, m)) = self.find_by_global(pool, global_id)? {
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
            Err(e) => return Err(Error::from(e)),
        }
        let info = self.store().image_create(pool, name, opts)?;
        let m = ImageMirror {
            global_id: global_id.into(),
            mode,
            state: ImageMirrorState::Enabled,
            primary: false,
            epoch: 0,
            demoted: false,
            primary_mirror_uuid: primary_mirror_uuid.into(),
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
        Ok(m)
    }

    pub fn store_flush(&self, pool: &str, name: &str) -> Result<(), Error> {
        self.store()
            .open_image(pool, name)
            .and_then(|i| i.flush())
            .map_err(Error::from)
    }

    /// Starts (or resumes) copying a primary snapshot into this non-primary image.
    pub fn sync_begin(
        &self,
        pool: &str,
        name: &str,
        q: &tern_proto::v1::MirrorSyncBeginRequest,
    ) -> Result<SyncState, Error> {
        let info = self.store().image_info(pool, name)?;
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
            finishing: None,
        };
        if q.size != info.size {
            self.store().image_resize(pool, name, q.size, true)?;
        }
        // Between reading the record and writing it back: a promotion
        // here must wait (it takes the same lock), or be undone.
        crate::testpoint::reached("sync-begin");
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
        let info = self.store().image_info(pool, name)?;
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
        // The snapshot is the sync's commit point: what to record after it
        // is written first.
        s.finishing = Some(resync_summary.to_string());
        m.sync = Some(s.clone());
        self.save_image(&info.id.to_string(), &m)?;
        crate::testpoint::reached("sync-complete-snap");
        let snap = self.non_primary_snapshot(
            pool,
            name,
            &m.global_id,
            &s.primary_mirror_uuid,
            s.primary_snap_id,
            s.demoted,
            last,
        )?;
        crate::testpoint::reached("sync-complete");
        finish_sync(&mut m);
        self.save_image(&info.id.to_string(), &m)?;
        Ok(snap)
    }

    /// Whether the non-primary snapshot that completes sync `s` exists.
    pub(super) fn sync_snapshot_taken(
        &self,
        pool: &str,
        name: &str,
        s: &SyncState,
    ) -> Result<bool, Error> {
        Ok(self.mirror_snaps(pool, name)?.iter().any(|(_, ms)| {
            ms.complete
                && matches!(
                    ms.state,
                    MirrorSnapState::NonPrimary | MirrorSnapState::NonPrimaryDemoted
                )
                && ms.primary_snap_id == s.primary_snap_id
                && ms.primary_mirror_uuid == s.primary_mirror_uuid
        }))
    }

    /// Takes the local copy's snapshot of the primary's snapshot
    /// `primary_snap_id` (after a flush, so it holds what was written), then
    /// keeps a bounded number of them: the newest is the base of the next
    /// delta.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn non_primary_snapshot(
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
            .snap_create(pool, name, &snap_name, SnapNamespace::Mirror(ms))?;
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
                self.store().snap_remove(pool, name, &x.name, true)?;
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
}

/// Ends a sync whose snapshot is taken, recording its resync summary.
pub(super) fn finish_sync(m: &mut ImageMirror) {
    let Some(summary) = m.sync.take().and_then(|s| s.finishing) else {
        return;
    };
    if !summary.is_empty() {
        m.resync_requested = false;
        m.resync_full = false;
        m.last_resync = format!("{summary} (finished {})", now_secs());
    }
}
