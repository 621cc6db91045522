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

// By role; each adds methods to `Image` and uses only what this file
// declares, never a sibling, so the store's imports stay one-way.
mod data;
mod journaling;
mod objects;
mod resize;

use crate::error::StoreError;
use crate::extent::Chunks;
use crate::journal::Journal;
use crate::object::ObjectFile;
use crate::types::{ImageInfo, MAX_IMAGE_SIZE, SnapInfo};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tern_types::{ImageId, Layout};

/// Beyond this many objects a range operation lists the image directory
/// instead of probing each object: a discard of a whole 1 TiB image should
/// cost what its data costs, not 262,144 failed opens.
pub(crate) const PROBE_LIMIT: usize = 256;

/// Per-store state shared with every open image.
pub(crate) struct StoreState {
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

impl StoreState {
    pub fn dirty_set(&self, id: &ImageId) -> Arc<DirtySet> {
        self.dirty.lock().entry(id.clone()).or_default().clone()
    }
}

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
    pub(crate) shared: Arc<StoreState>,
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
        shared: Arc<StoreState>,
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

    pub(crate) fn state_write(&self) -> parking_lot::RwLockWriteGuard<'_, State> {
        self.state.write()
    }

    pub(crate) fn state_read(&self) -> parking_lot::RwLockReadGuard<'_, State> {
        self.state.read()
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
