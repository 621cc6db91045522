//! Copy-on-write with RADOS clone semantics.
//!
//! Snapshot creation does no per-object work. Instead, the first mutation
//! of a head object in epoch N (image snap_seq = N) whose content some
//! snapshot still needs copies the head file to the clone
//! `<object no>.<N>` (reflink where possible, else a sparse copy), header
//! and all, so the clone carries the chunk map as of the snapshot. One
//! clone serves every snapshot with id in `(previous clone or born, N]`.
//!
//! Reading snapshot S of object o uses the clone with the smallest id >= S,
//! else the head; if S <= that file's `born`, o did not exist at S (zeros).

use crate::error::StoreError;
use crate::header::SnapExt;
use crate::image::{CloneMap, Image, State};
use crate::object::{self, ObjMeta, ObjectFile, OpenError};
use parking_lot::MutexGuard;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// One object as seen at some point (snapshot or head), resolved and held:
/// for a head, its header lock is held so no copy-on-write (and so no
/// mutation) can start while the caller reads it as a snapshot.
pub(crate) struct View<'a> {
    pub file: Arc<ObjectFile>,
    pub meta: MutexGuard<'a, ObjMeta>,
}

impl Image {
    /// Some live snapshot is newer than the object's last clone check and
    /// than its birth, so it sees the current head content.
    pub(crate) fn clone_needed(&self, st: &State, ext: &SnapExt) -> bool {
        st.snaps
            .last()
            .is_some_and(|s| s.id > ext.snap_seq && s.id > ext.born)
    }

    /// The clone cache, filled by one directory listing on first use.
    /// Unfinished clones (a crash mid-copy) are deleted then.
    pub(crate) fn clone_map(
        &self,
        spec: &str,
    ) -> Result<MutexGuard<'_, Option<CloneMap>>, StoreError> {
        let mut g = self.clones.lock();
        if g.is_none() {
            let listing = object::list_dir(&self.dir).map_err(|source| StoreError::Scan {
                spec: spec.to_string(),
                path: self.dir.clone(),
                source,
            })?;
            for tmp in &listing.tmps {
                let _ = std::fs::remove_file(tmp);
            }
            let mut map = CloneMap::new();
            for (no, id) in listing.clones {
                map.entry(no).or_default().insert(id);
            }
            *g = Some(map);
        }
        Ok(g)
    }

    /// Smallest clone id >= `s` of object `no`.
    pub(crate) fn clone_for(&self, spec: &str, no: u64, s: u64) -> Result<Option<u64>, StoreError> {
        let g = self.clone_map(spec)?;
        Ok(g.as_ref()
            .and_then(|m| m.get(&no))
            .and_then(|ids| ids.range(s..).next().copied()))
    }

    /// Object numbers that have clones.
    pub(crate) fn cloned_objects(&self, spec: &str) -> Result<Vec<u64>, StoreError> {
        let g = self.clone_map(spec)?;
        Ok(g.as_ref()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default())
    }

    /// Copies head `f` to clone `id`: copy to a temporary name, write the
    /// in-memory header (`ext`: the exact map as of now), sync, rename into
    /// place, sync the directory. A crash leaves at worst a temporary file
    /// or a redundant clone. The caller holds `f`'s header lock.
    pub(crate) fn make_clone(
        &self,
        spec: &str,
        f: &ObjectFile,
        ext: &SnapExt,
        id: u64,
    ) -> Result<(), StoreError> {
        // Loaded first, so the insert below never races the listing.
        drop(self.clone_map(spec)?);
        let tmp = object::clone_tmp_path(&self.dir, f.no, id);
        let dst = object::clone_path(&self.dir, f.no, id);
        let r = (|| {
            let out = object::copy_file(&f.file, &tmp)?;
            let mut meta = ObjMeta {
                ext: SnapExt {
                    snap_seq: id,
                    intent_epoch: 0,
                    ..ext.clone()
                },
                dirty: true,
                // Always write the fixed part: the copy may be of an old
                // file without the snapshot bit.
                legacy: true,
            };
            object::persist_ext(&out, &self.id, f.no, &mut meta)?;
            out.sync_data()?;
            std::fs::rename(&tmp, &dst)?;
            object::fsync_dir(&self.dir)
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io_err("copy-on-write", spec, f.no, e));
        }
        // A redundant clone of the same id may be cached from before.
        self.clone_files.lock().remove(&(f.no, id));
        if let Some(m) = self.clones.lock().as_mut() {
            m.entry(f.no).or_default().insert(id);
        }
        Ok(())
    }

    /// The open clone file `(no, id)`, if it exists.
    pub(crate) fn clone_file(
        &self,
        spec: &str,
        no: u64,
        id: u64,
    ) -> Result<Option<Arc<ObjectFile>>, StoreError> {
        if let Some(f) = self.clone_files.lock().get(&(no, id)) {
            return Ok(Some(f.clone()));
        }
        let path = object::clone_path(&self.dir, no, id);
        let opened = object::open_clone(&self.dir, &self.id, no, id, self.chunks.count).map_err(
            |e| match e {
                OpenError::Header(source) => StoreError::CorruptObject {
                    spec: spec.to_string(),
                    path: path.clone(),
                    source,
                },
                OpenError::Io(source) => StoreError::OpenObject {
                    spec: spec.to_string(),
                    path: path.clone(),
                    source,
                },
            },
        )?;
        let Some(mut opened) = opened else {
            return Ok(None);
        };
        if opened.map_torn {
            // Clones are synced before they are named, so this takes a
            // damaged disk; assume every chunk changed up to the clone.
            let all = u32::try_from(id).unwrap_or(u32::MAX);
            opened.meta.ext.map.iter_mut().for_each(|v| *v = all);
        }
        let f = Arc::new(ObjectFile::new(
            opened.file,
            no,
            opened.meta,
            self.shared.open_fds.clone(),
        ));
        self.clone_files.lock().insert((no, id), f.clone());
        Ok(Some(f))
    }

    /// Object `no` as seen at `at` (None: head). `Ok(None)`: it does not
    /// exist there (zeros).
    pub(crate) fn view<'a>(
        &self,
        st: &State,
        spec: &str,
        no: u64,
        at: Option<u64>,
        head: &'a mut Option<Arc<ObjectFile>>,
        clone: &'a mut Option<Arc<ObjectFile>>,
    ) -> Result<Option<View<'a>>, StoreError> {
        *head = self.object(st, spec, no, false)?;
        let Some(s) = at else {
            return Ok(head.as_ref().map(|f| View {
                file: f.clone(),
                meta: f.hdr.lock(),
            }));
        };
        // Lock the head first, then look for a clone: a writer clones under
        // this lock, so either its clone is visible now or it waits for us.
        let guard = head.as_ref().map(|f| f.hdr.lock());
        if let Some(id) = self.clone_for(spec, no, s)? {
            drop(guard);
            let Some(cf) = self.clone_file(spec, no, id)? else {
                return Err(StoreError::SnapshotData {
                    spec: spec.to_string(),
                    path: object::clone_path(&self.dir, no, id),
                    source: io::Error::new(io::ErrorKind::NotFound, "clone vanished"),
                });
            };
            *clone = Some(cf);
            let f = clone.as_ref().expect("just set");
            let meta = f.hdr.lock();
            if s <= meta.ext.born {
                return Ok(None);
            }
            return Ok(Some(View {
                file: f.clone(),
                meta,
            }));
        }
        match (head.as_ref(), guard) {
            (Some(f), Some(meta)) if s > meta.ext.born => Ok(Some(View {
                file: f.clone(),
                meta,
            })),
            _ => Ok(None),
        }
    }

    /// Deletes clones no live snapshot needs. Clone c of object o serves the
    /// snapshots in `(prev, c]`, prev being o's next-lower clone or, for the
    /// lowest, the clone's own `born`. Costs one check per clone file.
    pub(crate) fn gc_clones(&self, st: &State) -> Result<(), StoreError> {
        let spec = crate::image::spec_of(&st.info);
        let all: Vec<(u64, Vec<u64>)> = {
            let g = self.clone_map(&spec)?;
            g.as_ref()
                .map(|m| {
                    m.iter()
                        .map(|(no, ids)| (*no, ids.iter().copied().collect()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut removed = false;
        for (no, ids) in all {
            let mut prev: Option<u64> = None;
            for id in ids {
                let lower = match prev {
                    Some(p) => p,
                    None => match self.clone_file(&spec, no, id)? {
                        Some(f) => f.hdr.lock().ext.born,
                        None => 0,
                    },
                };
                let needed = st.snaps.iter().any(|s| s.id > lower && s.id <= id);
                if needed {
                    prev = Some(id);
                    continue;
                }
                self.clone_files.lock().remove(&(no, id));
                if let Some(m) = self.clones.lock().as_mut()
                    && let Some(set) = m.get_mut(&no)
                {
                    set.remove(&id);
                    if set.is_empty() {
                        m.remove(&no);
                    }
                }
                match std::fs::remove_file(object::clone_path(&self.dir, no, id)) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io_err("removing a clone", &spec, no, e)),
                }
                // An unneeded clone is skipped for `prev`: no snapshot lies
                // in its range, so the next clone's range may start below.
            }
        }
        if removed {
            object::fsync_dir(&self.dir).map_err(|e| StoreError::SnapshotData {
                spec: spec.clone(),
                path: self.dir.clone(),
                source: e,
            })?;
        }
        Ok(())
    }

    /// Reads object bytes at file offset `pos` of a view into `dst`,
    /// zero-filling past its end.
    pub(crate) fn read_view(
        &self,
        spec: &str,
        v: &View<'_>,
        dst: &mut [u8],
        obj_off: u64,
    ) -> Result<(), StoreError> {
        let n = object::read_full_at(&v.file.file, dst, crate::header::HEADER_SIZE + obj_off)
            .map_err(|source| StoreError::Read {
                spec: spec.to_string(),
                path: object::object_path(&self.dir, v.file.no),
                source,
            })?;
        dst[n..].fill(0);
        Ok(())
    }
}

/// Positioned write helper for rollback copies.
pub(crate) fn write_at(f: &ObjectFile, data: &[u8], pos: u64) -> io::Result<()> {
    f.file.write_all_at(data, pos)
}
