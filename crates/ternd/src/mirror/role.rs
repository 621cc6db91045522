//! The promote and demote rules: which copy of an image may become
//! primary, when, and what a promotion records.

use super::*;

impl Mirror {
    pub fn demote(&self, pool: &str, name: &str) -> Result<ImageMirror, Error> {
        let info = self.store().image_info(pool, name)?;
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
            .and_then(|i| i.flush())?;
        // The demotion snapshot is the commit point: from it on, a crash
        // is settled by finishing the demotion (`settle_interrupted`).
        self.primary_snapshot(pool, name, MirrorSnapState::PrimaryDemoted)?;
        crate::testpoint::reached("demote-marker");
        self.finish_demotion(pool, name, &info.id.to_string(), &mut m)?;
        Ok(m)
    }

    fn finish_demotion(
        &self,
        pool: &str,
        name: &str,
        id: &str,
        m: &mut ImageMirror,
    ) -> Result<(), Error> {
        // Journal mode: the marker after the demotion snapshot tells the
        // peer's replayer to stop there.
        let img = self.store().open_image(pool, name)?;
        if let Some(j) = img.journal() {
            let last = j.last_tid();
            let marked = j.entries(last).next().and_then(|e| e.ok()).is_some_and(|e| {
                matches!(&e.op, tern_store::journal::JournalOp::Marker { kind, .. } if kind == "demote")
            });
            if !marked {
                img.journal_marker("demote", m.epoch.to_string().as_bytes())?;
            }
        }
        crate::testpoint::reached("demote-commit");
        m.primary = false;
        m.demoted = true;
        self.save_image(id, m)
    }

    /// Settles the promotions, demotions and sync completions a crash
    /// interrupted, at start before anything is served: each is exactly
    /// done or exactly not.
    pub fn settle_interrupted(&self) {
        let Ok(pools) = self.store().pool_list() else {
            return;
        };
        for p in pools {
            let Ok(images) = self.store().image_list(&p.name) else {
                continue;
            };
            for img in images {
                let (pool, name) = (p.name.as_str(), img.name.as_str());
                if let Err(e) = self.settle_one(pool, name) {
                    tracing::error!(pool, image = name, error = %e.chain(), "cannot settle a promotion, demotion or sync a crash interrupted");
                }
            }
        }
    }

    fn settle_one(&self, pool: &str, name: &str) -> Result<(), Error> {
        let (info, Some(mut m)) = self.image_of(pool, name)? else {
            return Ok(());
        };
        let id = info.id.to_string();
        let snaps = self.mirror_snaps(pool, name)?;
        if let Some(p) = m.promoting.clone() {
            let snap = snaps.iter().find(|(s, ms)| {
                s.id > p.after_snap
                    && ms.state == MirrorSnapState::Primary
                    && ms.primary_mirror_uuid.is_empty()
            });
            match snap {
                Some((s, _)) => {
                    tracing::warn!(
                        pool,
                        image = name,
                        epoch = p.epoch,
                        "finishing a promotion a crash interrupted after its snapshot"
                    );
                    let own = self.pool_enabled(pool)?.mirror_uuid;
                    self.finish_promotion(&mut m, s.id, own);
                }
                None => {
                    tracing::warn!(
                        pool,
                        image = name,
                        "a promotion a crash interrupted before its snapshot did not happen"
                    );
                    m.promoting = None;
                }
            }
            return self.save_image(&id, &m);
        }
        if let Some(s) = m.sync.clone()
            && s.finishing.is_some()
            && self.sync_snapshot_taken(pool, name, &s)?
        {
            tracing::warn!(
                pool,
                image = name,
                snap = s.primary_snap_id,
                "finishing a sync a crash interrupted after its snapshot"
            );
            super::sync::finish_sync(&mut m);
            return self.save_image(&id, &m);
        }
        let demoted_snap = matches!(snaps.last(), Some((_, ms)) if ms.state == MirrorSnapState::PrimaryDemoted && ms.primary_mirror_uuid.is_empty());
        if m.primary && demoted_snap {
            tracing::warn!(
                pool,
                image = name,
                "finishing a demotion a crash interrupted after its snapshot"
            );
            self.finish_demotion(pool, name, &id, &mut m)?;
        }
        Ok(())
    }

    fn finish_promotion(&self, m: &mut ImageMirror, snap_id: u64, own: String) {
        let Some(p) = m.promoting.take() else {
            return;
        };
        m.primary = true;
        m.demoted = false;
        m.epoch = p.epoch;
        // Once primary, this image's history is its own: if it ever
        // follows a peer's journal again, it starts from a sync point (a
        // delta), never from an old place that would replay, out of their
        // order, writes it already holds.
        m.journal_pos = None;
        m.primary_mirror_uuid = own;
        if let Some(f) = p.fork {
            m.fork = Some(Fork { snap_id, ..f });
        }
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
        let info = self.store().image_info(pool, name)?;
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
                self.store().snap_rollback(pool, name, &s.name)?;
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
        let own = self.pool_enabled(pool)?.mirror_uuid;
        let was_demoted_here = from_uuid == own;
        let after_snap = self
            .store()
            .snap_list(pool, name)?
            .iter()
            .map(|s| s.id)
            .max()
            .unwrap_or(0);
        m.promoting = Some(Promotion {
            epoch: new_epoch,
            after_snap,
            fork: (!was_demoted_here).then(|| Fork {
                from_mirror_uuid: from_uuid,
                journal_tid,
                snap_id: 0,
                forced: force,
                data_as_of_us,
                at: now_secs(),
            }),
        });
        let id = info.id.to_string();
        self.save_image(&id, &m)?;
        crate::testpoint::reached("promote-snap");
        let snap = match self.snapshot_as_primary(pool, name, &m, MirrorSnapState::Primary) {
            Ok(s) => s,
            Err(e) => {
                m.promoting = None;
                self.save_image(&id, &m)?;
                return Err(e);
            }
        };
        crate::testpoint::reached("promote-commit");
        self.finish_promotion(&mut m, snap.id, own);
        self.save_image(&id, &m)?;
        drop(hw);
        Ok(m)
    }
}
