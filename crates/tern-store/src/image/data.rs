//! The data path: read, write, discard and write-zeroes, flush, and the
//! allocation and usage queries, over the object files.

use super::{Image, PROBE_LIMIT, State, spec_of};
use crate::error::{StoreError, data_io};
use crate::extent::{ObjectSpan, ObjectSpans, merge_ranges, object_range_to_image, spans_in};
use crate::header::HEADER_SIZE;
use crate::journal::{JournalOp, MAX_WRITE_ENTRY, Ticket};
use crate::object::{self, ObjectFile};
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Image {
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
                return Ok(spans_in(&self.layout, existing, off, off + len));
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
}
