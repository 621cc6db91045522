//! The image's object files: the fd cache in front of them, opening and
//! creating them (shedding descriptors across the store when the cap is
//! near), and deleting them.

use super::{Image, Slot, State, StoreState};
use crate::error::{StoreError, data_io};
use crate::object::{self, ObjMeta, ObjectFile, OpenError};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// Negative cache entries are dropped past this many slots.
const MAX_SLOTS: usize = 65536;

/// The process (or system) is out of file descriptors: closing some of
/// ours and retrying can succeed.
fn fds_exhausted(e: &OpenError) -> bool {
    matches!(e, OpenError::Io(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
}

/// Attempts at an object open that fails for want of descriptors, each
/// after shedding what the cache can give back.
const FD_RETRIES: usize = 4;

impl StoreState {
    fn under(&self, target: usize) -> bool {
        self.open_fds.load(Ordering::Relaxed) <= target
    }

    /// Brings the open object files across all open images comfortably
    /// under the cap: idle cached fds first, then, if a client keeps that
    /// many objects dirty without flushing, dirty ones, each synced before
    /// it closes. Without the second step one writer that never flushes
    /// holds a descriptor per object it touched until the process runs out
    /// and every other image, socket and export fails with it.
    fn shed(&self, caller: Option<&Image>) {
        let target = self.fd_cap * 3 / 4;
        let images: Vec<Arc<Image>> = self
            .images
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for img in &images {
            img.shed_idle();
            if self.under(target) {
                return;
            }
        }
        // The caller's own image first: it is the one opening objects.
        let caller = caller.into_iter();
        for img in caller.chain(images.iter().map(|i| &**i)) {
            img.shed_dirty(target);
            if self.under(target) {
                return;
            }
        }
    }
}

impl Image {
    /// The cached file for object `no`, opening (or with `create`, creating)
    /// it on a miss. `None`: the object does not exist and reads as zeros.
    pub(crate) fn object(
        &self,
        st: &State,
        spec: &str,
        no: u64,
        create: bool,
    ) -> Result<Option<Arc<ObjectFile>>, StoreError> {
        if let Some(hit) = self.lookup(no, create) {
            return Ok(hit);
        }
        let path = object::object_path(&self.dir, no);
        let mut tries = 0;
        let (guard, opened) = loop {
            // Shed before opening, not only after: at the cap, the next
            // open may be the one that fails.
            if tries > 0 || !self.shared.under(self.shared.fd_cap.saturating_sub(1)) {
                self.shared.shed(Some(self));
            }
            let guard = self.open_lock.lock();
            if let Some(hit) = self.lookup(no, create) {
                return Ok(hit);
            }
            let r = object::open_object(
                &self.dir,
                &self.id,
                no,
                create,
                self.chunks.count,
                st.snap_seq,
            );
            match r {
                Err(e) if fds_exhausted(&e) && tries < FD_RETRIES => {
                    drop(guard);
                    tries += 1;
                    if tries > 1 {
                        // Descriptors held elsewhere (sockets, other
                        // processes) may free up in a moment.
                        std::thread::sleep(std::time::Duration::from_millis(10 << tries));
                    }
                }
                r => break (guard, r),
            }
        };
        let opened = opened.map_err(|e| match e {
            OpenError::Header(source) => StoreError::CorruptObject {
                spec: spec.to_string(),
                path: path.clone(),
                source,
            },
            OpenError::Io(e) => data_io("writing", spec, path.clone(), e, |spec, path, source| {
                StoreError::OpenObject { spec, path, source }
            }),
        })?;
        let Some(opened) = opened else {
            let mut slots = self.slots.lock();
            if slots.len() >= MAX_SLOTS {
                slots.retain(|_, s| matches!(s, Slot::Open(_)));
            }
            slots.insert(no, Slot::Absent);
            return Ok(None);
        };
        let f = Arc::new(ObjectFile::new(
            opened.file,
            no,
            ObjMeta {
                dirty: false,
                ..opened.meta
            },
            self.shared.open_fds.clone(),
        ));
        if opened.map_torn || self.needs_recovery(st, &f.hdr.lock().ext) {
            self.recover(st, spec, &f)?;
        }
        if opened.initialised {
            // The header and the directory entry need a flush like data.
            self.dirty.dir.store(true, Ordering::SeqCst);
            self.dirty.add(&f);
        }
        self.slots.lock().insert(no, Slot::Open(f.clone()));
        drop(guard);
        if !self.shared.under(self.shared.fd_cap) {
            self.shared.shed(Some(self));
        }
        Ok(Some(f))
    }

    /// `Some(answer)` if the cache decides it; `None` to go to the disk.
    fn lookup(&self, no: u64, create: bool) -> Option<Option<Arc<ObjectFile>>> {
        match self.slots.lock().get(&no) {
            Some(Slot::Open(f)) => Some(Some(f.clone())),
            Some(Slot::Absent) if !create => Some(None),
            _ => None,
        }
    }

    fn shed_idle(&self) {
        // strong_count 1: only the cache holds it, so it is neither dirty
        // (the dirty set would hold it) nor in use by an I/O.
        self.slots.lock().retain(|_, s| match s {
            Slot::Open(f) => Arc::strong_count(f) > 1,
            Slot::Absent => false,
        });
        self.clone_files
            .lock()
            .retain(|_, f| Arc::strong_count(f) > 1);
    }

    /// Syncs and closes dirty object files that nothing but the cache and
    /// the dirty set holds, until the store is under `target`. A file
    /// leaves the dirty set only once its data and map are on disk, and
    /// `flush_lock` is held throughout, so a flush that starts meanwhile
    /// waits and still covers every write acknowledged before it. Locks are
    /// only tried: the caller may hold this image's, and waiting on another
    /// image's could deadlock; a busy image is simply skipped.
    fn shed_dirty(&self, target: usize) {
        let Some(_flush) = self.flush_lock.try_lock() else {
            return;
        };
        // Held so nobody reopens an object (reading its header from disk)
        // before the map we took out of the cache is written back.
        let Some(_open) = self.open_lock.try_lock() else {
            return;
        };
        let excess = self
            .shared
            .open_fds
            .load(Ordering::Relaxed)
            .saturating_sub(target);
        if excess == 0 {
            return;
        }
        let mut victims = Vec::new();
        {
            let mut slots = self.slots.lock();
            let mut dirty = self.dirty.files.lock();
            slots.retain(|_, s| {
                let Slot::Open(f) = s else { return true };
                let key = Arc::as_ptr(f) as usize;
                // 2: the slot and the dirty set. Any I/O in flight holds a
                // third reference, and new ones need `slots`, held here.
                if victims.len() < excess && Arc::strong_count(f) == 2 && dirty.contains_key(&key) {
                    dirty.remove(&key);
                    victims.push(f.clone());
                    return false;
                }
                true
            });
        }
        for f in victims {
            if let Err(e) = self.persist_map(&f).and_then(|()| f.file.sync_data()) {
                // As in flush: the pages may be gone, so every later flush
                // of this image must fail rather than claim durability.
                self.dirty.failed.store(true, Ordering::SeqCst);
                tracing::error!(image = %self.id, object = f.no, error = %e,
                    "syncing an object file to close it failed");
            }
        }
    }

    /// Unlinks object `no`; the cache forgets it first so no later I/O
    /// reaches the unlinked file.
    pub(crate) fn delete_object(&self, no: u64) -> io::Result<bool> {
        let _g = self.open_lock.lock();
        self.slots.lock().insert(no, Slot::Absent);
        match std::fs::remove_file(object::object_path(&self.dir, no)) {
            Ok(()) => {
                self.dirty.dir.store(true, Ordering::SeqCst);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
