//! Dirty tracking: the per-object chunk epoch maps and the write intent
//! that keeps them honest across a crash.
//!
//! A mutation in epoch E (image `snap_seq` = E) of chunk c sets
//! `map[c] = E + 1` in the object's in-memory header; 0 means "not written
//! since the file was born". Maps reach the file lazily, in `flush` (before
//! that file's sync) and so in `snap_create`. To make "lazily" safe, the
//! first mutation of an object in an epoch first writes and syncs
//! `intent_epoch = E + 1` (with the opening's generation). After a crash,
//! an object loaded with an intent of the current epoch from an earlier
//! generation is treated as wholly changed in that epoch: a diff may
//! over-report that object, never miss a write.

use crate::error::{StoreError, data_io};
use crate::header::SnapExt;
use crate::image::{Image, State};
use crate::object::{self, ObjectFile};
use std::io;
use std::sync::atomic::Ordering;

/// The map value of a mutation made while the image's snap_seq is `epoch`.
pub fn mark(epoch: u64) -> u32 {
    // Epochs are snapshot ids; 4 billion snapshots of one image do not
    // happen, but saturating keeps the map monotonic if they did.
    u32::try_from(epoch + 1).unwrap_or(u32::MAX)
}

impl Image {
    /// Everything that must precede a mutation of head object bytes
    /// `[lo, hi)` in the current epoch: copy-on-write if a snapshot needs
    /// the current content, a durable write intent if this is the object's
    /// first mutation of the epoch, then the map update (in memory).
    pub(crate) fn before_mutation(
        &self,
        st: &State,
        spec: &str,
        f: &ObjectFile,
        lo: u64,
        hi: u64,
    ) -> Result<(), StoreError> {
        let epoch = st.snap_seq;
        let want = mark(epoch);
        let mut m = f.hdr.lock();
        let mut sync = false;
        if m.ext.snap_seq < epoch {
            if self.clone_needed(st, &m.ext) {
                self.make_clone(spec, f, &m.ext, epoch)?;
                // The head's new snap_seq is made durable before the
                // mutation; a crash before that leaves a redundant clone.
                sync = true;
            }
            m.ext.snap_seq = epoch;
            m.dirty = true;
        }
        // Once per object per epoch. An intent of this epoch inherited from
        // an earlier opening still covers this one's lazy map updates:
        // recovery only asks whether the intent's generation differs from
        // the recovering one's.
        if m.ext.intent_epoch != want {
            m.ext.intent_epoch = want;
            m.ext.intent_gen = self.shared.boot;
            sync = true;
        }
        if sync {
            let r = object::persist_ext(&f.file, &self.id, f.no, &mut m)
                .and_then(|()| f.file.sync_data());
            r.map_err(|e| self.io_err("recording a write intent", spec, f.no, e))?;
        }
        for c in self.chunks.covering(lo, hi) {
            if m.ext.map[c] != want {
                m.ext.map[c] = want;
                m.dirty = true;
            }
        }
        self.shared.mutated.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the in-memory map of `f` into its header if it changed. The
    /// caller syncs the file.
    pub(crate) fn persist_map(&self, f: &ObjectFile) -> io::Result<()> {
        let mut m = f.hdr.lock();
        if m.dirty {
            object::persist_ext(&f.file, &self.id, f.no, &mut m)?;
        }
        Ok(())
    }

    /// An intent of the current epoch left by an earlier opening that did
    /// not shut down cleanly: the map may lack updates for unflushed writes.
    pub(crate) fn needs_recovery(&self, st: &State, ext: &SnapExt) -> bool {
        self.shared.unclean
            && ext.intent_epoch != 0
            && u64::from(ext.intent_epoch) == st.snap_seq + 1
            && ext.intent_gen != self.shared.boot
    }

    /// Folds a stale intent (or a torn map) into the map: every chunk is
    /// marked changed in the current epoch, durably, and the intent is
    /// cleared so this happens once.
    pub(crate) fn recover(&self, st: &State, spec: &str, f: &ObjectFile) -> Result<(), StoreError> {
        let mut m = f.hdr.lock();
        let all = mark(st.snap_seq);
        for v in m.ext.map.iter_mut() {
            *v = (*v).max(all);
        }
        m.ext.intent_epoch = 0;
        m.ext.intent_gen = self.shared.boot;
        let r =
            object::persist_ext(&f.file, &self.id, f.no, &mut m).and_then(|()| f.file.sync_data());
        r.map_err(|e| self.io_err("recovering the chunk map", spec, f.no, e))
    }

    pub(crate) fn io_err(
        &self,
        doing: &'static str,
        spec: &str,
        no: u64,
        e: io::Error,
    ) -> StoreError {
        data_io(
            doing,
            spec,
            object::object_path(&self.dir, no),
            e,
            |spec, path, source| StoreError::SnapshotData { spec, path, source },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Chunks;

    #[test]
    fn geometry() {
        let c = Chunks::new(4 << 20);
        assert_eq!((c.size, c.count), (8192, 512));
        let c = Chunks::new(4096);
        assert_eq!((c.size, c.count), (4096, 1));
        let c = Chunks::new(65536);
        assert_eq!((c.size, c.count), (4096, 16));
        let c = Chunks::new(1 << 30);
        assert_eq!((c.size, c.count), (2 << 20, 512));
        assert_eq!(Chunks::new(65536).covering(4095, 4097), 0..2);
        assert_eq!(Chunks::new(65536).covering(5, 5), 0..0);
        assert_eq!(mark(0), 1);
    }
}
