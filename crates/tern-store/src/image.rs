//! An open image: the data path (read, write, discard, flush) over its
//! object files, with an fd cache and the dirty set that makes `flush` keep
//! the durability contract.
//!
//! Locks, in the order they may be taken:
//! 1. `state` (RwLock): readers are I/O, the writer is resize/remove, so an
//!    operation never sees the size change or the data vanish under it.
//! 2. `open_lock` (Mutex): serialises creating, opening and deleting object
//!    files of this image, so nobody sees a half-written header or keeps
//!    using a file another thread just unlinked.
//! 3. `slots` (Mutex): the fd-cache map, held only for lookups.
//! 4. `dirty.files` (Mutex): the dirty set, held only to insert or swap.
//!
//! Then, per object: its header mutex (`ObjectFile::hdr`), then `clones`,
//! then `clone_files`. Snapshot operations (create, remove, rollback) hold
//! `state` for writing, so no I/O is in flight while the epoch changes.
//!
//! The store's open-image map may be taken while holding `state`, never the
//! other way round; the removal flag is an atomic so the map's holder needs
//! no image lock.

use crate::error::{StoreError, data_io};
use crate::extent::{
    Chunks, ObjectSpan, ObjectSpans, merge_ranges, object_prefix_below, object_range_to_image,
    object_span,
};
use crate::header::HEADER_SIZE;
use crate::journal::{Apply, Journal, JournalOp, MAX_WRITE_ENTRY, Target, Ticket};
use crate::object::{self, ObjMeta, ObjectFile, OpenError};
use crate::types::{ImageInfo, MAX_IMAGE_SIZE, SnapInfo};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tern_types::{ImageId, Layout};

/// Beyond this many objects a range operation lists the image directory
/// instead of probing each object: a discard of a whole 1 TiB image should
/// cost what its data costs, not 262,144 failed opens.
pub(crate) const PROBE_LIMIT: usize = 256;
/// Negative cache entries are dropped past this many slots.
const MAX_SLOTS: usize = 65536;

/// Per-store state shared with every open image.
pub(crate) struct Shared {
    pub objects_dir: PathBuf,
    pub open_fds: Arc<AtomicUsize>,
    pub fd_cap: usize,
    /// Open images, so `open_image` hands out one `Arc` per image.
    pub images: Mutex<HashMap<ImageId, Weak<Image>>>,
    /// Dirty sets outlive any one `Image` value: writes made through a
    /// handle that was dropped unflushed are still synced by the next
    /// handle's flush.
    pub dirty: Mutex<HashMap<ImageId, Arc<DirtySet>>>,
    /// The store was opened without the clean-shutdown marker: write
    /// intents left by an earlier generation may cover lost map updates.
    pub unclean: bool,
    /// This opening's generation, recorded with every write intent.
    pub boot: u32,
    /// Set by every mutation; `flush_all` clears it first and checks it
    /// last, so "clean" means no mutation since a complete flush.
    pub mutated: AtomicBool,
    /// The store directory's exclusive lock, held while anything of this
    /// opening can still write.
    pub _lock: std::fs::File,
}

impl Shared {
    pub fn dirty_set(&self, id: &ImageId) -> Arc<DirtySet> {
        self.dirty.lock().entry(id.clone()).or_default().clone()
    }

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

/// The process (or system) is out of file descriptors: closing some of
/// ours and retrying can succeed.
fn fds_exhausted(e: &OpenError) -> bool {
    matches!(e, OpenError::Io(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
}

/// Attempts at an object open that fails for want of descriptors, each
/// after shedding what the cache can give back.
const FD_RETRIES: usize = 4;

/// Object files written (or created, punched) since the last flush. Keyed
/// by the `ObjectFile`'s address, not the object number: a file deleted and
/// recreated while a write to the old one is in flight gives two entries,
/// and both are synced.
#[derive(Default)]
pub(crate) struct DirtySet {
    pub(crate) files: Mutex<HashMap<usize, Arc<ObjectFile>>>,
    /// Entries were created or deleted in the image directory.
    dir: AtomicBool,
    /// A sync failed. Linux may drop the dirty pages after reporting such
    /// an error once, so a retry could "succeed" without the data: every
    /// later flush fails instead.
    failed: AtomicBool,
}

impl DirtySet {
    pub(crate) fn add(&self, f: &Arc<ObjectFile>) {
        self.files
            .lock()
            .entry(Arc::as_ptr(f) as usize)
            .or_insert_with(|| f.clone());
    }
}

enum Slot {
    /// Known not to exist (all zeros).
    Absent,
    Open(Arc<ObjectFile>),
}

pub(crate) struct State {
    pub info: ImageInfo,
    /// Id of the newest snapshot ever taken: the current epoch.
    pub snap_seq: u64,
    /// Live snapshots, by id.
    pub snaps: Vec<SnapInfo>,
    /// Present while the image has the journaling feature. Changed only
    /// with `state` held for writing, so an operation sees one answer from
    /// start to end.
    pub journal: Option<Arc<Journal>>,
}

impl State {
    pub fn snap(&self, id: u64) -> Result<&SnapInfo, StoreError> {
        self.snaps
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| StoreError::SnapNotFound {
                spec: format!("{}@{{id {id}}}", spec_of(&self.info)),
            })
    }
}

/// Clone ids per object number.
pub(crate) type CloneMap = BTreeMap<u64, BTreeSet<u64>>;

pub struct Image {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: ImageId,
    pub(crate) dir: PathBuf,
    pub(crate) layout: Layout,
    pub(crate) chunks: Chunks,
    state: RwLock<State>,
    removed: AtomicBool,
    open_lock: Mutex<()>,
    /// Serialises flushes: a flush that finds the dirty set empty because a
    /// concurrent one swapped it out must still wait for that one's syncs
    /// (a journal checkpoint relies on it).
    flush_lock: Mutex<()>,
    slots: Mutex<HashMap<u64, Slot>>,
    pub(crate) dirty: Arc<DirtySet>,
    /// Which clones exist, filled by one directory listing the first time
    /// a snapshot needs it, then kept up to date by clone creation and GC.
    pub(crate) clones: Mutex<Option<CloneMap>>,
    /// Open clone files, by (object no, clone id).
    pub(crate) clone_files: Mutex<HashMap<(u64, u64), Arc<ObjectFile>>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.read();
        f.debug_struct("Image")
            .field("id", &self.id)
            .field("spec", &spec_of(&st.info))
            .field("size", &st.info.size)
            .field("removed", &self.is_removed())
            .finish()
    }
}

impl Drop for Image {
    /// The last handle gone: the committer ends and readers of the journal
    /// are woken for good.
    fn drop(&mut self) {
        if let Some(j) = self.state.get_mut().journal.take() {
            j.close();
        }
    }
}

pub(crate) fn spec_of(info: &ImageInfo) -> String {
    format!("{}/{}", info.pool, info.name)
}

impl Image {
    pub(crate) fn new(
        shared: Arc<Shared>,
        info: ImageInfo,
        snap_seq: u64,
        snaps: Vec<SnapInfo>,
    ) -> Image {
        let dirty = shared.dirty_set(&info.id);
        Image {
            dir: shared.objects_dir.join(info.id.as_str()),
            id: info.id.clone(),
            layout: info.layout,
            chunks: Chunks::new(info.layout.object_size),
            shared,
            state: RwLock::new(State {
                info,
                snap_seq,
                snaps,
                journal: None,
            }),
            removed: AtomicBool::new(false),
            open_lock: Mutex::new(()),
            flush_lock: Mutex::new(()),
            slots: Mutex::new(HashMap::new()),
            dirty,
            clones: Mutex::new(None),
            clone_files: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` with I/O excluded (state held for writing), for snapshot
    /// operations.
    pub(crate) fn with_snapshots_locked<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut st = self.state.write();
        self.check(&st, "snapshot operation", 0, 0)?;
        f(&mut st)
    }

    /// Runs `f` with I/O allowed alongside (state held for reading).
    pub(crate) fn with_state<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let st = self.state.read();
        self.check(&st, op, 0, 0)?;
        f(&st)
    }

    /// The image's snapshots, by id.
    pub fn snapshots(&self) -> Vec<SnapInfo> {
        self.state.read().snaps.clone()
    }

    pub fn info(&self) -> ImageInfo {
        self.state.read().info.clone()
    }

    pub fn size(&self) -> u64 {
        self.state.read().info.size
    }

    pub fn id(&self) -> &ImageId {
        &self.id
    }

    /// The directory holding this image's object files.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    pub(crate) fn set_name(&self, name: &str, modified: u64) {
        let mut st = self.state.write();
        st.info.name = name.to_string();
        st.info.modified = modified;
        if let Some(j) = &st.journal {
            j.set_spec(&spec_of(&st.info));
        }
    }

    /// Marks the image removed. Waits for in-flight I/O (it holds `state`),
    /// after which every call on this handle fails with NotFound.
    pub(crate) fn mark_removed(&self) {
        let mut st = self.state.write();
        self.removed.store(true, Ordering::SeqCst);
        if let Some(j) = st.journal.take() {
            j.close();
        }
        self.slots.lock().clear();
        self.clone_files.lock().clear();
        self.dirty.files.lock().clear();
    }

    pub(crate) fn check(
        &self,
        st: &State,
        op: &'static str,
        off: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        if self.is_removed() {
            return Err(StoreError::ImageRemoved {
                spec: spec_of(&st.info),
            });
        }
        match off.checked_add(len) {
            Some(end) if end <= st.info.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                op,
                spec: spec_of(&st.info),
                off,
                len,
                size: st.info.size,
            }),
        }
    }

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

    /// Objects touched by `[off, off+len)` with their spans; may include
    /// objects that do not exist.
    pub(crate) fn spans(
        &self,
        spec: &str,
        off: u64,
        len: u64,
    ) -> Result<Vec<ObjectSpan>, StoreError> {
        let mut v = Vec::new();
        for s in ObjectSpans::new(&self.layout, off, len) {
            v.push(s);
            if v.len() > PROBE_LIMIT {
                let existing =
                    object::list_objects(&self.dir).map_err(|source| StoreError::Scan {
                        spec: spec.to_string(),
                        path: self.dir.clone(),
                        source,
                    })?;
                let end = off + len;
                return Ok(existing
                    .into_iter()
                    .filter_map(|o| {
                        let (lo, hi) = object_span(&self.layout, o, off, end);
                        (lo < hi).then_some((o, lo, hi))
                    })
                    .collect());
            }
        }
        Ok(v)
    }

    /// Before a read of the head: on a journaled image, waits until the
    /// writes acknowledged so far that touch the range are in the object
    /// files (the committer acknowledges a write once its entry is durable
    /// and applies it just after). Call without holding `state`: the apply
    /// needs it.
    pub(crate) fn settle(&self, off: u64, len: u64) -> Result<(), StoreError> {
        let j = self.state.read().journal.clone();
        match j {
            Some(j) => j.settle(off, len),
            None => Ok(()),
        }
    }

    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.settle(off, buf.len() as u64)?;
        let st = self.state.read();
        self.check(&st, "read", off, buf.len() as u64)?;
        let spec = spec_of(&st.info);
        for e in self.layout.extents(off, buf.len() as u64) {
            let dst = &mut buf[e.buf_offset as usize..][..e.len as usize];
            match self.object(&st, &spec, e.object_no, false)? {
                None => dst.fill(0),
                Some(f) => {
                    let n = object::read_full_at(&f.file, dst, HEADER_SIZE + e.offset).map_err(
                        |source| StoreError::Read {
                            spec: spec.clone(),
                            path: object::object_path(&self.dir, e.object_no),
                            source,
                        },
                    )?;
                    dst[n..].fill(0);
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `off`. With `fua` the data is durable on return;
    /// otherwise once a later [`flush`](Self::flush) returns.
    ///
    /// On a journaled image the write is first appended to the journal and
    /// is durable on return (see [`crate::journal`] for the `OnFlush` mode).
    pub fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), StoreError> {
        let st = self.state.read();
        self.check(&st, "write", off, data.len() as u64)?;
        if let Some(j) = &st.journal {
            let j = j.clone();
            let mut tids = Vec::with_capacity(1);
            for (i, chunk) in data.chunks(MAX_WRITE_ENTRY).enumerate() {
                let at = off + (i * MAX_WRITE_ENTRY) as u64;
                tids.push(j.queue_write(at, chunk.to_vec(), fua)?);
            }
            // Never wait holding `state`: a barrier waiting for it would
            // stall the committer, which needs it too.
            drop(st);
            return tids.into_iter().try_for_each(|t| j.wait_done(t));
        }
        self.write_locked(&st, off, data, fua)
    }

    /// [`write`](Self::write) of an owned buffer, without blocking: on a
    /// journaled image whose state lock is free, queues the write for the
    /// committer and returns the ticket to wait on. Gives the data back
    /// when the caller must use [`write`](Self::write) instead (plain
    /// image, or lock busy, or a write too large for one entry).
    #[allow(clippy::result_large_err)]
    pub fn try_queue_write(
        &self,
        off: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<Result<Ticket, StoreError>, Vec<u8>> {
        let Some(st) = self.state.try_read() else {
            return Err(data);
        };
        let Some(j) = &st.journal else {
            return Err(data);
        };
        if data.len() > MAX_WRITE_ENTRY {
            return Err(data);
        }
        if let Err(e) = self.check(&st, "write", off, data.len() as u64) {
            return Ok(Err(e));
        }
        Ok(j.queue_write(off, data, fua).map(|tid| j.ticket(tid)))
    }

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

    pub(crate) fn state_write(&self) -> parking_lot::RwLockWriteGuard<'_, State> {
        self.state.write()
    }

    pub(crate) fn state_read(&self) -> parking_lot::RwLockReadGuard<'_, State> {
        self.state.read()
    }

    /// [`write`](Self::write) without journaling, for a caller holding `state`.
    pub(crate) fn write_locked(
        &self,
        st: &State,
        off: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), StoreError> {
        let spec = spec_of(&st.info);
        let mut touched: Vec<Arc<ObjectFile>> = Vec::new();
        let mut seen = HashSet::new();
        let mut result = Ok(());
        for e in self.layout.extents(off, data.len() as u64) {
            let f = match self.object(st, &spec, e.object_no, true) {
                Ok(f) => f.expect("created on demand"),
                Err(err) => {
                    result = Err(err);
                    break;
                }
            };
            if let Err(err) = self.before_mutation(st, &spec, &f, e.offset, e.offset + e.len) {
                result = Err(err);
                break;
            }
            let src = &data[e.buf_offset as usize..][..e.len as usize];
            let r = f.file.write_all_at(src, HEADER_SIZE + e.offset);
            if seen.insert(Arc::as_ptr(&f) as usize) {
                touched.push(f);
            }
            if let Err(source) = r {
                let path = object::object_path(&self.dir, e.object_no);
                result = Err(data_io(
                    "writing",
                    &spec,
                    path,
                    source,
                    |spec, path, source| StoreError::Write { spec, path, source },
                ));
                break;
            }
        }
        // Only after the data is in the file: a flush that swapped the set
        // before this point did not owe this write anything, and one after
        // it sees the entry.
        for f in &touched {
            self.dirty.add(f);
        }
        result?;
        if fua {
            for f in &touched {
                f.file
                    .sync_data()
                    .map_err(|source| self.flush_error(&spec, f.no, source))?;
            }
            self.sync_dir(&spec)?;
        }
        Ok(())
    }

    pub(crate) fn flush_error(&self, spec: &str, no: u64, source: io::Error) -> StoreError {
        self.dirty.failed.store(true, Ordering::SeqCst);
        data_io(
            "flushing",
            spec,
            object::object_path(&self.dir, no),
            source,
            |spec, path, source| StoreError::Flush { spec, path, source },
        )
    }

    pub(crate) fn sync_dir(&self, spec: &str) -> Result<(), StoreError> {
        if self.dirty.dir.swap(false, Ordering::SeqCst)
            && let Err(source) = object::fsync_dir(&self.dir)
        {
            self.dirty.dir.store(true, Ordering::SeqCst);
            return Err(StoreError::Flush {
                spec: spec.to_string(),
                path: self.dir.clone(),
                source,
            });
        }
        Ok(())
    }

    /// Deallocates the range: it reads as zeros afterwards.
    pub fn discard(&self, off: u64, len: u64) -> Result<(), StoreError> {
        self.zero_range("discard", "discarding", off, len)
    }

    /// Zeroes the range. Same effect as discard here: holes are zeros, and
    /// snapshots keep their data through copy-on-write either way.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<(), StoreError> {
        self.zero_range("write-zeroes", "zeroing", off, len)
    }

    fn zero_range(
        &self,
        op: &'static str,
        doing: &'static str,
        off: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let st = self.state.read();
        self.check(&st, op, off, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(j) = &st.journal {
            let j = j.clone();
            let tid = j.queue_zero(op == "discard", off, len, false)?;
            drop(st);
            return j.wait_done(tid);
        }
        self.zero_range_locked(&st, doing, off, len)
    }

    /// Discard / write-zeroes without journaling, for a caller holding `state`.
    pub(crate) fn zero_range_locked(
        &self,
        st: &State,
        doing: &'static str,
        off: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let spec = spec_of(&st.info);
        let os = self.layout.object_size;
        for (no, lo, hi) in self.spans(&spec, off, len)? {
            let path = || object::object_path(&self.dir, no);
            let mk = |spec, path, source| StoreError::Discard { spec, path, source };
            // With snapshots the head file stays (punched): deleting it
            // would lose the epoch map that tells diffs what changed.
            if lo == 0 && hi == os && st.snaps.is_empty() {
                self.delete_object(no)
                    .map_err(|e| data_io(doing, &spec, path(), e, mk))?;
            } else if let Some(f) = self.object(st, &spec, no, false)? {
                self.before_mutation(st, &spec, &f, lo, hi)?;
                let r = object::punch_hole(&f.file, HEADER_SIZE + lo, hi - lo);
                self.dirty.add(&f);
                r.map_err(|e| data_io(doing, &spec, path(), e, mk))?;
            }
        }
        Ok(())
    }

    /// Makes every write that returned before this call durable: syncs each
    /// file written since the last flush, then the directory if entries
    /// were created or deleted.
    ///
    /// On a journaled image every acknowledged write is already durable in
    /// the journal (strict mode) or becomes so now (`OnFlush`): a flush
    /// appends a flush entry, waits for it, and checkpoints only lazily.
    pub fn flush(&self) -> Result<(), StoreError> {
        let st = self.state.read();
        self.check(&st, "flush", 0, 0)?;
        if let Some(j) = &st.journal {
            let tid = j.append(&JournalOp::Flush)?;
            j.sync_to(tid)?;
            j.applied(tid);
            if j.checkpoint_due(true) {
                self.checkpoint_locked(&st, false)?;
            }
            return Ok(());
        }
        self.flush_locked(&st)
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

    /// [`flush`](Self::flush) for a caller that holds `state`. Chunk maps
    /// are written into each header before that file's sync, so after a
    /// flush the maps on disk are exact.
    pub(crate) fn flush_locked(&self, st: &State) -> Result<(), StoreError> {
        let spec = spec_of(&st.info);
        if self.dirty.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Flush {
                spec,
                path: self.dir.clone(),
                source: io::Error::other(
                    "an earlier flush failed and data may have been lost; the image needs checking",
                ),
            });
        }
        let _one = self.flush_lock.lock();
        // A descriptor shed while this flush waited for the lock may have
        // failed its sync.
        if self.dirty.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Flush {
                spec,
                path: self.dir.clone(),
                source: io::Error::other(
                    "an earlier sync failed and data may have been lost; the image needs checking",
                ),
            });
        }
        // Swap the set out so writes that land during the syncs are tracked
        // for the next flush instead of being lost from the set.
        let files = std::mem::take(&mut *self.dirty.files.lock());
        for f in files.values() {
            self.persist_map(f)
                .and_then(|()| f.file.sync_data())
                .map_err(|source| self.flush_error(&spec, f.no, source))?;
        }
        self.sync_dir(&spec)
    }

    /// Data extents `(offset, len)` of the image inside `[off, off+len)`,
    /// sorted and merged; everything else reads as zeros. Reads no data.
    pub fn allocated_extents(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        self.settle(off, len)?;
        let st = self.state.read();
        self.check(&st, "allocation query", off, len)?;
        let spec = spec_of(&st.info);
        let mut out = Vec::new();
        for (no, lo, hi) in self.spans(&spec, off, len)? {
            let Some(f) = self.object(&st, &spec, no, false)? else {
                continue;
            };
            let ranges = object::data_ranges(&f.file, HEADER_SIZE + lo, HEADER_SIZE + hi).map_err(
                |source| StoreError::Scan {
                    spec: spec.clone(),
                    path: object::object_path(&self.dir, no),
                    source,
                },
            )?;
            for (a, b) in ranges {
                object_range_to_image(&self.layout, no, a - HEADER_SIZE, b - HEADER_SIZE, &mut out);
            }
        }
        Ok(merge_ranges(out))
    }

    /// On-disk bytes of this image's object files (allocated blocks).
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        let st = self.state.read();
        self.check(&st, "usage query", 0, 0)?;
        object::dir_usage(&self.dir)
            .map(|(bytes, _)| bytes)
            .map_err(|source| StoreError::Scan {
                spec: spec_of(&st.info),
                path: self.dir.clone(),
                source,
            })
    }

    /// Changes the size. `commit` records the new size in the metadata and
    /// returns the new info; it runs after the data past a new, smaller end
    /// is gone and that is durable. In that order a crash leaves either the
    /// old size with its tail zeroed (what the user asked to lose) or the
    /// new size, never a size whose tail shows stale data after a later
    /// grow.
    ///
    /// On a journaled image the resize is journaled first (with `record`;
    /// a replay passes false) and is a checkpoint barrier.
    pub(crate) fn resize(
        &self,
        new_size: u64,
        allow_shrink: bool,
        record: bool,
        commit: impl FnOnce() -> Result<ImageInfo, StoreError>,
    ) -> Result<ImageInfo, StoreError> {
        let mut st = self.state.write();
        self.check(&st, "resize", 0, 0)?;
        let spec = spec_of(&st.info);
        check_size(&spec, new_size)?;
        let old = st.info.size;
        if new_size < old && !allow_shrink {
            return Err(StoreError::ShrinkNotAllowed {
                spec,
                from: old,
                to: new_size,
            });
        }
        let tid = if record {
            self.journal_barrier(&st, &JournalOp::Resize { size: new_size })?
        } else {
            None
        };
        let r = (|| {
            if new_size < old {
                self.cut_objects(&st, &spec, old, new_size)?;
            }
            commit()
        })();
        if let Ok(info) = &r {
            st.info.size = info.size;
            st.info.modified = info.modified;
        }
        self.end_barrier(&st, tid)?;
        r.map(|_| st.info.clone())
    }

    /// Deletes objects wholly past `new_size` and truncates the one that
    /// straddles it (with striping, several), then flushes that. Lists the
    /// directory, so the cost follows the data, not the size.
    ///
    /// With snapshots, files are truncated, not deleted, after copy-on-write,
    /// and the cut chunks count as mutated now: a later grow brings the
    /// range back as zeros, and a diff must report it.
    fn cut_objects(
        &self,
        st: &State,
        spec: &str,
        old_size: u64,
        new_size: u64,
    ) -> Result<(), StoreError> {
        let mk = |spec, path, source| StoreError::Resize { spec, path, source };
        let existing = object::list_objects(&self.dir)
            .map_err(|e| data_io("resizing", spec, self.dir.clone(), e, mk))?;
        for no in existing {
            let keep = object_prefix_below(&self.layout, no, new_size);
            let was = object_prefix_below(&self.layout, no, old_size);
            let path = object::object_path(&self.dir, no);
            if keep == 0 && st.snaps.is_empty() {
                self.delete_object(no)
                    .map_err(|e| data_io("resizing", spec, path, e, mk))?;
            } else if keep < self.layout.object_size {
                let Some(f) = self.object(st, spec, no, false)? else {
                    continue;
                };
                if keep < was {
                    self.before_mutation(st, spec, &f, keep, was)?;
                }
                let r = (|| {
                    if f.file.metadata()?.len() > HEADER_SIZE + keep {
                        f.file.set_len(HEADER_SIZE + keep)?;
                    }
                    Ok(())
                })();
                self.dirty.add(&f);
                r.map_err(|e| data_io("resizing", spec, path, e, mk))?;
            }
        }
        self.flush_locked(st)
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

pub(crate) fn check_size(spec: &str, size: u64) -> Result<(), StoreError> {
    let reason = if size == 0 {
        "an image must have a size greater than 0"
    } else if size > MAX_IMAGE_SIZE {
        "the largest image is 2^60 bytes (1 EiB)"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidSize {
        spec: spec.to_string(),
        size,
        reason,
    })
}
