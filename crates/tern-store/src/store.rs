//! The store: one opening of a data directory, with its pools and images
//! (metadata and data kept in step). Snapshot operations, feature changes
//! and journal replay are further `impl Store` blocks in `snap`,
//! `features` and `replay`.

use crate::error::StoreError;
use crate::image::{self, Image, StoreState};
use crate::journal::{self, Journal, JournalOptions};
use crate::meta::{ImageRecord, Meta, info_of};
use crate::object;
use crate::types::{CreateOpts, ImageInfo, KvTable, PoolInfo, PoolStats, now_secs};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tern_types::{Features, ImageId, Layout};

/// Default cap on object-file descriptors held open by one store.
pub const DEFAULT_FD_CAP: usize = 4096;

/// The object-file cap [`Store::open`] uses: half the process's descriptor
/// limit (at most [`DEFAULT_FD_CAP`]), so sockets, the metadata database,
/// journals and exports keep the other half however many objects clients
/// touch.
pub fn fd_cap_for_limit() -> usize {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return DEFAULT_FD_CAP;
    }
    usize::try_from(rl.rlim_cur / 2)
        .unwrap_or(DEFAULT_FD_CAP)
        .clamp(16, DEFAULT_FD_CAP)
}
/// The store only guards what would break its own keys; the daemon
/// validates names properly (and may use `.`-names for hidden images).
fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        "names must not be empty"
    } else if name.len() > 250 {
        "names are at most 250 bytes"
    } else if name.contains('/') || name.contains('\0') {
        "names may not contain '/' or NUL"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidName {
        what,
        name: name.to_string(),
        reason,
    })
}

/// Name of the clean-shutdown marker in the store directory.
const CLEAN_MARKER: &str = "clean";

pub struct Store {
    dir: PathBuf,
    pub(crate) meta: Meta,
    shared: Arc<StoreState>,
    /// Serialises metadata changes that also touch data (resize, remove,
    /// rename, pool removal) so two of them never interleave on one image.
    pub(crate) admin: Mutex<()>,
    /// A `flush_all` completed with no mutation during it.
    flushed_clean: AtomicBool,
    /// Strong handles of every image opened since the store was opened.
    /// Callers open per request; without this, each request would get a
    /// fresh handle with a cold fd cache (the map in `StoreState` is weak to
    /// avoid a cycle through `Image::shared`).
    keep: Mutex<HashMap<ImageId, Arc<Image>>>,
    /// Options for journals opened or created from now on.
    journal_opts: Mutex<JournalOptions>,
    /// Per-image journal options (`tern config image set`).
    journal_overrides: Mutex<HashMap<ImageId, JournalOptions>>,
    /// Serialises the slow open of journaled images (replay runs outside
    /// the open-image map lock, see `open_image`).
    opening: Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

impl Store {
    /// Opens (creating if absent) the store in `dir`, and deletes data
    /// directories left by an image removal that a crash interrupted.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with_fd_cap(dir, fd_cap_for_limit())
    }

    /// [`open`](Self::open) with a different cap on open object files.
    pub fn open_with_fd_cap(dir: &Path, fd_cap: usize) -> Result<Store, StoreError> {
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects).map_err(|source| StoreError::CreateDir {
            path: objects.clone(),
            source,
        })?;
        // One opening at a time: two would replay the same journals and
        // trim each other's segments. The lock lives as long as `StoreState`,
        // that is until the last image handle and background task of this
        // opening are gone; the kernel drops it when the process dies.
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::CreateDir {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::CreateDir {
                    path: lock_path,
                    source,
                });
            }
        }
        let meta = Meta::open(&dir.join("meta.redb"))?;
        // The marker says the last opening flushed every map; remove it
        // (durably) before anything can write, so a crash from now on is
        // seen as one.
        let marker = dir.join(CLEAN_MARKER);
        let unclean = match std::fs::remove_file(&marker) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(source) => {
                return Err(StoreError::Marker {
                    path: marker,
                    source,
                });
            }
        };
        // redb syncs its file but not the directory entries that name it
        // and objects/; a new store must not lose them to a power cut.
        for d in [Some(dir), dir.parent()].into_iter().flatten() {
            if !d.as_os_str().is_empty() {
                object::fsync_dir(d).map_err(|source| StoreError::CreateDir {
                    path: d.to_path_buf(),
                    source,
                })?;
            }
        }
        let known = meta.image_ids()?;
        let rd = std::fs::read_dir(&objects).map_err(|source| StoreError::RemoveOrphan {
            path: objects.clone(),
            source,
        })?;
        for entry in rd {
            let entry = entry.map_err(|source| StoreError::RemoveOrphan {
                path: objects.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir && !known.contains(&name) {
                std::fs::remove_dir_all(entry.path()).map_err(|source| {
                    StoreError::RemoveOrphan {
                        path: entry.path(),
                        source,
                    }
                })?;
            }
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            shared: Arc::new(StoreState {
                objects_dir: objects,
                open_fds: Arc::new(AtomicUsize::new(0)),
                fd_cap: fd_cap.max(1),
                images: Mutex::new(HashMap::new()),
                dirty: Mutex::new(HashMap::new()),
                unclean,
                boot: meta.boot,
                mutated: AtomicBool::new(false),
                _lock: lock,
            }),
            meta,
            admin: Mutex::new(()),
            flushed_clean: AtomicBool::new(false),
            keep: Mutex::new(HashMap::new()),
            journal_opts: Mutex::new(JournalOptions::default()),
            journal_overrides: Mutex::new(HashMap::new()),
            opening: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets the default options of journals, for those opened from now on
    /// and for open ones without an override of their own.
    pub fn set_journal_options(&self, opts: JournalOptions) {
        *self.journal_opts.lock() = opts;
        for img in self.live_images() {
            if !self.journal_overrides.lock().contains_key(img.id())
                && let Some(j) = img.journal()
            {
                j.set_options(opts);
            }
        }
    }

    pub fn journal_options(&self) -> JournalOptions {
        *self.journal_opts.lock()
    }

    /// Sets (or with `None` clears) one image's journal options, which
    /// take precedence over the defaults; applies to its open journal too.
    pub fn set_image_journal_options(&self, id: &ImageId, opts: Option<JournalOptions>) {
        match opts {
            Some(o) => self.journal_overrides.lock().insert(id.clone(), o),
            None => self.journal_overrides.lock().remove(id),
        };
        if let Some(img) = self.live_image(id)
            && let Some(j) = img.journal()
        {
            j.set_options(self.journal_options_for(id));
        }
    }

    /// The journal options that apply to image `id`.
    pub fn journal_options_for(&self, id: &ImageId) -> JournalOptions {
        let o = self.journal_overrides.lock().get(id).copied();
        o.unwrap_or_else(|| self.journal_options())
    }

    fn live_images(&self) -> Vec<Arc<Image>> {
        let map = self.shared.images.lock();
        map.values().filter_map(Weak::upgrade).collect()
    }

    /// The journal of a journaled image (opening the image, and so
    /// replaying, if needed).
    pub fn journal(&self, pool: &str, image: &str) -> Result<Arc<Journal>, StoreError> {
        self.open_image(pool, image)?
            .journal()
            .ok_or_else(|| StoreError::JournalingDisabled {
                spec: format!("{pool}/{image}"),
            })
    }

    /// Object files currently held open by this store.
    pub fn open_fds(&self) -> usize {
        self.shared
            .open_fds
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    // ---- key-value tables ----

    pub fn kv_get(&self, table: KvTable, key: &str) -> Result<Option<String>, StoreError> {
        self.meta.kv_get(table, key)
    }

    pub fn kv_put(&self, table: KvTable, key: &str, value: &str) -> Result<(), StoreError> {
        self.meta.kv_put(table, key, value)
    }

    pub fn kv_delete(&self, table: KvTable, key: &str) -> Result<bool, StoreError> {
        self.meta.kv_delete(table, key)
    }

    /// Entries whose key starts with `prefix`, sorted by key.
    pub fn kv_list(
        &self,
        table: KvTable,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.meta.kv_list(table, prefix)
    }

    // ---- pools ----

    pub fn pool_create(&self, name: &str) -> Result<PoolInfo, StoreError> {
        check_name("pool", name)?;
        self.meta.pool_create(name, now_secs())
    }

    /// Tags the pool with its application (e.g. "rbd"); idempotent.
    pub fn pool_init(&self, name: &str, application: &str) -> Result<PoolInfo, StoreError> {
        self.meta.pool_set_application(name, application)
    }

    /// All pools, sorted by name.
    pub fn pool_list(&self) -> Result<Vec<PoolInfo>, StoreError> {
        self.meta.pool_list()
    }

    pub fn pool_get(&self, name: &str) -> Result<PoolInfo, StoreError> {
        self.meta.pool_get(name)
    }

    /// Removes an empty pool; with `force`, its images and their data too.
    pub fn pool_remove(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let _admin = self.admin.lock();
        let removed = self.meta.pool_remove(name, force)?;
        for r in removed {
            self.drop_image_data(&format!("{name}/{}", r.name), &r.id)?;
        }
        Ok(())
    }

    pub fn pool_stats(&self, name: &str) -> Result<PoolStats, StoreError> {
        let p = self.meta.pool_get(name)?;
        let mut st = PoolStats {
            images: 0,
            provisioned_bytes: 0,
            used_bytes: 0,
            objects: 0,
        };
        for r in self.meta.image_list(p.id)? {
            if !r.name.starts_with('.') {
                st.images += 1;
            }
            st.provisioned_bytes += r.size;
            let dir = self.shared.objects_dir.join(r.id.as_str());
            let (bytes, count) = object::dir_usage(&dir).map_err(|source| StoreError::Scan {
                spec: format!("{name}/{}", r.name),
                path: dir.clone(),
                source,
            })?;
            st.used_bytes += bytes;
            st.objects += count;
        }
        Ok(st)
    }

    // ---- images ----

    pub fn image_create(
        &self,
        pool: &str,
        name: &str,
        opts: &CreateOpts,
    ) -> Result<ImageInfo, StoreError> {
        check_name("image", name)?;
        let spec = format!("{pool}/{name}");
        image::check_size(&spec, opts.size)?;
        let l = opts.layout;
        let layout = Layout::new(l.object_size, Some(l.stripe_unit), Some(l.stripe_count))
            .map_err(|source| StoreError::InvalidLayout {
                spec: spec.clone(),
                source,
            })?;
        let mut features = opts.features;
        features
            .validate()
            .map_err(|source| StoreError::InvalidFeatures { spec, source })?;
        if layout.is_striped() {
            // As rbd does: non-default striping is recorded as a feature.
            features.0 |= Features::STRIPING;
        }
        let now = now_secs();
        let (p, rec) = self
            .meta
            .image_create(pool, name, |id, pool_id| ImageRecord {
                id,
                pool_id,
                name: name.to_string(),
                size: opts.size,
                layout,
                features,
                created: now,
                modified: now,
                snap_seq: 0,
            })?;
        Ok(info_of(&p.name, rec, 0))
    }

    /// Visible images of the pool, sorted by name; `.`-names are hidden.
    pub fn image_list(&self, pool: &str) -> Result<Vec<ImageInfo>, StoreError> {
        let p = self.meta.pool_get(pool)?;
        self.meta
            .image_list(p.id)?
            .into_iter()
            .filter(|r| !r.name.starts_with('.'))
            .map(|r| {
                let n = self.meta.snap_list(&r.id)?.len() as u64;
                Ok(info_of(&p.name, r, n))
            })
            .collect()
    }

    pub fn image_info(&self, pool: &str, name: &str) -> Result<ImageInfo, StoreError> {
        let (p, r) = self.meta.image_get(pool, name)?;
        let n = self.meta.snap_list(&r.id)?.len() as u64;
        Ok(info_of(&p.name, r, n))
    }

    pub fn image_resize(
        &self,
        pool: &str,
        name: &str,
        new_size: u64,
        allow_shrink: bool,
    ) -> Result<ImageInfo, StoreError> {
        let _admin = self.admin.lock();
        let img = self.open_image(pool, name)?;
        img.resize(new_size, allow_shrink, true, || {
            let now = now_secs();
            let (p, r) = self.meta.image_update(pool, name, |r| {
                r.size = new_size;
                r.modified = now;
            })?;
            Ok(info_of(&p.name, r, 0))
        })
    }

    /// Renames within the pool. Data stays where it is (named by image id).
    pub fn image_rename(&self, pool: &str, old: &str, new: &str) -> Result<(), StoreError> {
        check_name("image", new)?;
        let _admin = self.admin.lock();
        let rec = self.meta.image_rename(pool, old, new, now_secs())?;
        if let Some(img) = self.live_image(&rec.id) {
            img.set_name(&rec.name, rec.modified);
        }
        Ok(())
    }

    /// Removes the image and its data. Open handles fail with NotFound from
    /// then on. Refused (Busy) while it has user snapshots; mirror
    /// snapshots go with it.
    pub fn image_remove(&self, pool: &str, name: &str) -> Result<(), StoreError> {
        let _admin = self.admin.lock();
        let rec = self.meta.image_remove(pool, name)?;
        self.drop_image_data(&format!("{pool}/{name}"), &rec.id)
    }

    /// Names of the hidden (`.`-prefixed) images of a pool: imports in
    /// progress, or left by a crash.
    pub fn hidden_images(&self, pool: &str) -> Result<Vec<String>, StoreError> {
        let p = self.meta.pool_get(pool)?;
        Ok(self
            .meta
            .image_list(p.id)?
            .into_iter()
            .filter(|r| r.name.starts_with('.'))
            .map(|r| r.name)
            .collect())
    }

    /// Flushes every image, for a clean shutdown. Returns the first error
    /// after trying all of them. If it succeeds and nothing is mutated
    /// afterwards, dropping the store leaves the clean-shutdown marker.
    pub fn flush_all(&self) -> Result<(), StoreError> {
        self.flushed_clean.store(false, Ordering::SeqCst);
        self.shared.mutated.store(false, Ordering::SeqCst);
        let mut first = None;
        for p in self.meta.pool_list()? {
            for r in self.meta.image_list(p.id)? {
                let res = self
                    .open_image(&p.name, &r.name)
                    .and_then(|img| img.flush_and_checkpoint());
                if let Err(e) = res {
                    first.get_or_insert(e);
                }
            }
        }
        if first.is_none() {
            self.flushed_clean.store(true, Ordering::SeqCst);
        }
        first.map_or(Ok(()), Err)
    }

    /// Flushes everything and closes the store, leaving the clean-shutdown
    /// marker so the next open trusts the chunk maps as they are.
    pub fn close(self) -> Result<(), StoreError> {
        self.flush_all()?;
        self.write_marker()
    }

    fn write_marker(&self) -> Result<(), StoreError> {
        if !self.flushed_clean.swap(false, Ordering::SeqCst)
            || self.shared.mutated.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        let path = self.dir.join(CLEAN_MARKER);
        std::fs::write(&path, b"clean\n")
            .and_then(|()| std::fs::File::open(&path)?.sync_all())
            .and_then(|()| object::fsync_dir(&self.dir))
            .map_err(|source| StoreError::Marker { path, source })
    }

    /// The shared handle of an image: the same `Arc` while any is alive.
    ///
    /// The first open of a journaled image replays its journal (entries
    /// past the last checkpoint) before anyone sees the handle.
    pub fn open_image(&self, pool: &str, name: &str) -> Result<Arc<Image>, StoreError> {
        {
            // The map lock is held across the metadata read so that a
            // removal (metadata commit, then map cleanup) cannot slip
            // between the read and the insert and leave a live handle to a
            // removed image.
            let mut map = self.shared.images.lock();
            let (p, rec) = self.meta.image_get(pool, name)?;
            if let Some(img) = map.get(&rec.id).and_then(Weak::upgrade)
                && !img.is_removed()
            {
                return Ok(img);
            }
            if !rec.features.has(Features::JOURNALING) {
                map.retain(|_, w| w.strong_count() > 0);
                let img = self.new_image(&p.name, rec)?;
                // Left by a crash while journaling was being turned on
                // (before the feature commit) or off (after it).
                if Journal::exists(img.data_dir()) {
                    Journal::remove(img.data_dir(), &format!("{pool}/{name}"))?;
                }
                map.insert(img.id().clone(), Arc::downgrade(&img));
                self.keep.lock().insert(img.id().clone(), img.clone());
                return Ok(img);
            }
        }
        // Journaled: the replay does I/O that may take the map lock (fd
        // shedding) and must end before anyone else sees the handle, so it
        // runs outside the map lock, under `opening`, which makes one
        // opener do it while the others wait.
        let _opening = self.opening.lock();
        let (p, rec) = self.meta.image_get(pool, name)?;
        if let Some(img) = self.live_image(&rec.id)
            && !img.is_removed()
        {
            return Ok(img);
        }
        let id = rec.id.clone();
        let spec = format!("{}/{}", p.name, rec.name);
        let img = self.new_image(&p.name, rec)?;
        if !img.data_dir().join(journal::JOURNAL_DIR).exists() {
            // First open of an image created with journaling.
            Journal::create(img.data_dir(), &spec, &id, 1)?;
        }
        let j = Journal::open(img.data_dir(), &spec, &id, self.journal_options_for(&id))?;
        img.set_journal(&mut img.state_write(), Some(Arc::new(j)));
        let t = std::time::Instant::now();
        let n = self.replay_journal(&img)?;
        if n > 0 {
            // Only an unclean stop leaves entries past the checkpoint.
            tracing::info!(image = %spec, entries = n, ms = t.elapsed().as_millis() as u64,
                "replayed the journal entries an unclean stop left unapplied");
        }
        let mut map = self.shared.images.lock();
        // A removal may have committed while the replay ran.
        match self.meta.image_get(pool, name) {
            Ok((_, r)) if r.id == id => {}
            _ => {
                img.mark_removed();
                return Err(StoreError::ImageNotFound { spec });
            }
        }
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(id.clone(), Arc::downgrade(&img));
        self.keep.lock().insert(id, img.clone());
        Ok(img)
    }

    fn new_image(&self, pool: &str, rec: ImageRecord) -> Result<Arc<Image>, StoreError> {
        let snaps = self.meta.snap_list(&rec.id)?;
        let snap_seq = rec.snap_seq;
        let info = info_of(pool, rec, snaps.len() as u64);
        Ok(Arc::new(Image::new(
            self.shared.clone(),
            info,
            snap_seq,
            snaps,
        )))
    }

    /// On-disk bytes of all object data.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        let objects = &self.shared.objects_dir;
        let scan = |path: &Path, source| StoreError::Scan {
            spec: "(all images)".to_string(),
            path: path.to_path_buf(),
            source,
        };
        let mut total = 0;
        for entry in std::fs::read_dir(objects).map_err(|e| scan(objects, e))? {
            let entry = entry.map_err(|e| scan(objects, e))?;
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let (bytes, _) =
                    object::dir_usage(&entry.path()).map_err(|e| scan(&entry.path(), e))?;
                total += bytes;
            }
        }
        Ok(total)
    }

    fn live_image(&self, id: &ImageId) -> Option<Arc<Image>> {
        // The guard is a tail temporary, dropped before the caller takes
        // any image lock: image locks are never taken while holding the map.
        self.shared.images.lock().get(id).and_then(Weak::upgrade)
    }

    /// After the metadata is gone: fences open handles, then deletes data.
    fn drop_image_data(&self, spec: &str, id: &ImageId) -> Result<(), StoreError> {
        self.keep.lock().remove(id);
        let img = self
            .shared
            .images
            .lock()
            .remove(id)
            .and_then(|w| w.upgrade());
        if let Some(img) = img {
            img.mark_removed();
        }
        self.shared.dirty.lock().remove(id);
        let dir = self.shared.objects_dir.join(id.as_str());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::RemoveData {
                spec: spec.to_string(),
                path: dir,
                source,
            }),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Best effort: without the marker the next open merely over-reports
        // recently written objects in diffs.
        let _ = self.write_marker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Store>();
        send_sync::<Image>();
        send_sync::<Arc<Image>>();
        send_sync::<StoreError>();
    }
}
