//! A journaled image: installing its journal and committer, barriers and
//! markers, and checkpoints (the lazy ones on a thread of their own).

use super::{Image, State, spec_of};
use crate::error::StoreError;
use crate::journal::{Apply, Journal, JournalOp, Target};
use std::sync::{Arc, Weak};

impl Image {
    /// Makes the object files hold every applied journal entry durably and
    /// records that as the journal's checkpoint (then trims). With `wait`
    /// false, skips if another checkpoint is running.
    pub(crate) fn checkpoint_locked(&self, st: &State, wait: bool) -> Result<(), StoreError> {
        match &st.journal {
            Some(j) => {
                if wait {
                    self.commit_round(st, j)?;
                }
                j.checkpoint(wait, || self.flush_locked(st))
            }
            None => Ok(()),
        }
    }

    /// The image's journal, while it has the journaling feature.
    pub fn journal(&self) -> Option<Arc<Journal>> {
        self.state.read().journal.clone()
    }

    /// Appends a marker entry (mirroring's demote/promote) after every
    /// mutation that returned before this call and before any that starts
    /// after it; durable on return. Returns its tid.
    pub fn journal_marker(&self, kind: &str, payload: &[u8]) -> Result<u64, StoreError> {
        let st = self.state.write();
        self.check(&st, "journal marker", 0, 0)?;
        let Some(j) = &st.journal else {
            return Err(StoreError::JournalingDisabled {
                spec: spec_of(&st.info),
            });
        };
        self.commit_round(&st, j)?;
        let tid = j.append(&JournalOp::Marker {
            kind: kind.to_string(),
            payload: payload.to_vec(),
        })?;
        j.sync_to(tid)?;
        j.applied(tid);
        Ok(tid)
    }

    /// Appends a barrier entry (resize, snapshot operation) for a caller
    /// holding `state` for writing, durably. `None` if not journaled.
    pub(crate) fn journal_barrier(
        &self,
        st: &State,
        op: &JournalOp,
    ) -> Result<Option<u64>, StoreError> {
        let Some(j) = &st.journal else {
            return Ok(None);
        };
        // Everything queued before the barrier is applied before it.
        self.commit_round(st, j)?;
        let tid = j.append(op)?;
        if let Err(e) = j.sync_to(tid) {
            j.applied(tid);
            return Err(e);
        }
        Ok(Some(tid))
    }

    /// After a barrier's operation (successful or not): the entry counts as
    /// applied, and since nothing else runs, a full checkpoint makes the
    /// journal never need to replay across it. On failure the operation
    /// did not happen here; a replay after a crash would redo it, as for
    /// any unacknowledged write.
    pub(crate) fn end_barrier(&self, st: &State, tid: Option<u64>) -> Result<(), StoreError> {
        if let (Some(t), Some(j)) = (tid, &st.journal) {
            j.applied(t);
            self.checkpoint_locked(st, true)?;
        }
        Ok(())
    }

    /// Installs or removes the journal (feature toggles, open), starting
    /// its committer.
    pub(crate) fn set_journal(self: &Arc<Self>, st: &mut State, j: Option<Arc<Journal>>) {
        if let Some(j) = &j {
            j.start(Box::new(Committing {
                img: Arc::downgrade(self),
                j: j.clone(),
            }));
        }
        if let Some(old) = std::mem::replace(&mut st.journal, j) {
            old.close();
        }
    }

    /// A whole committer round for a barrier holding `st`: everything
    /// queued before it is applied first (see `journal::pipeline`).
    fn commit_round(&self, st: &State, j: &Journal) -> Result<(), StoreError> {
        j.commit_round(&Applier { img: self, st })
    }

    /// A flush that also checkpoints the journal fully, so the next open
    /// has nothing to replay (clean shutdown).
    pub(crate) fn flush_and_checkpoint(&self) -> Result<(), StoreError> {
        let st = self.state.read();
        self.check(&st, "flush", 0, 0)?;
        match &st.journal {
            Some(_) => self.checkpoint_locked(&st, true),
            None => self.flush_locked(&st),
        }
    }
}

/// The image as the journal's apply stage writes to it, for a caller
/// holding `state`: the plain (unjournaled) data path.
struct Applier<'a> {
    img: &'a Image,
    st: &'a State,
}

impl Apply for Applier<'_> {
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.img.write_locked(self.st, offset, data, false)
    }

    fn zero(&self, discard: bool, offset: u64, len: u64) -> Result<(), StoreError> {
        let doing = if discard { "discarding" } else { "zeroing" };
        self.img.zero_range_locked(self.st, doing, offset, len)
    }
}

/// What the apply thread of journal `j` holds of the image: a weak
/// handle, so a dropped image ends the thread instead of living on.
struct Committing {
    img: Weak<Image>,
    j: Arc<Journal>,
}

impl Target for Committing {
    fn hold(&self, apply: &mut dyn FnMut(&dyn Apply)) -> Option<bool> {
        let img = self.img.upgrade()?;
        let st = img.state.read();
        let current = st.journal.as_ref().is_some_and(|c| Arc::ptr_eq(c, &self.j));
        if !current || img.is_removed() {
            return Some(false);
        }
        apply(&Applier { img: &img, st: &st });
        Some(true)
    }

    fn checkpoint_soon(&self) {
        let Some(img) = self.img.upgrade() else {
            return;
        };
        std::thread::spawn(move || {
            let st = img.state.read();
            // Best effort: a failed lazy checkpoint only delays
            // trimming, and a failed object sync is reported by every
            // later flush.
            let _ = img.checkpoint_locked(&st, false);
        });
    }
}
