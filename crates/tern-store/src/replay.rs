//! Replay at open: entries after the checkpoint are applied again, in
//! order, then a checkpoint records that.
//!
//! Every entry is idempotent here. Writes, discards, zeroes and resizes
//! set state, so applying one twice (or over later data that a later entry
//! rewrites anyway) ends the same. Snapshot operations check first: a
//! create whose id is at or below the image's snap_seq happened; a remove
//! or rollback of a snapshot that is gone cannot be needed, because those
//! operations are checkpoint barriers (nothing after one is ever replayed
//! together with an older one).

use crate::error::StoreError;
use crate::image::Image;
use crate::journal::JournalOp;
use crate::meta::info_of;
use crate::store::Store;
use crate::types::now_secs;

impl Store {
    /// Replays the journal of a handle that nobody else can see yet.
    /// Returns the number of entries replayed.
    pub(crate) fn replay_journal(&self, img: &Image) -> Result<u64, StoreError> {
        let Some(j) = img.journal() else {
            return Ok(0);
        };
        let mut n = 0;
        for e in j.entries(j.applied_tid() + 1) {
            let e = e?;
            crate::testpoint::reached("journal-replay");
            self.replay_op(img, &e.op)?;
            n += 1;
        }
        let st = img.state_read();
        img.checkpoint_locked(&st, true)?;
        Ok(n)
    }

    fn replay_op(&self, img: &Image, op: &JournalOp) -> Result<(), StoreError> {
        let info = img.info();
        let (pool, name) = (info.pool.as_str(), info.name.as_str());
        let fits = |off: u64, len: u64| off.checked_add(len).is_some_and(|end| end <= info.size);
        match op {
            JournalOp::Write { offset, data } => {
                if fits(*offset, data.len() as u64) {
                    img.with_state("replay", |st| img.write_locked(st, *offset, data, false))?;
                }
            }
            JournalOp::Discard { offset, len } | JournalOp::WriteZeroes { offset, len } => {
                if fits(*offset, *len) && *len > 0 {
                    img.with_state("replay", |st| {
                        img.zero_range_locked(st, "replaying", *offset, *len)
                    })?;
                }
            }
            JournalOp::Resize { size } => {
                if *size != info.size {
                    img.resize(*size, true, false, || {
                        let now = now_secs();
                        let (p, r) = self.meta.image_update(pool, name, |r| {
                            r.size = *size;
                            r.modified = now;
                        })?;
                        Ok(info_of(&p.name, r, 0))
                    })?;
                }
            }
            JournalOp::SnapCreate {
                id,
                name: snap,
                namespace,
            } => {
                let seq = img.with_state("replay", |st| Ok(st.snap_seq))?;
                if seq < *id {
                    match self.snap_create_on(img, pool, name, snap, namespace.clone(), false) {
                        Err(StoreError::SnapExists { .. }) => {}
                        r => {
                            r?;
                        }
                    }
                }
            }
            JournalOp::SnapRemove { id } => {
                if img.snapshots().iter().any(|s| s.id == *id) {
                    self.remove_snaps_on(img, pool, name, |_| Ok(vec![*id]), false)?;
                }
            }
            JournalOp::SnapRollback { id } => {
                if let Some(s) = img.snapshots().into_iter().find(|s| s.id == *id) {
                    self.snap_rollback_on(img, pool, name, &s, false)?;
                }
            }
            JournalOp::Flush | JournalOp::Marker { .. } => {}
        }
        Ok(())
    }
}
