//! The log itself: creating, opening and removing a journal directory,
//! and appending to it (the in-memory buffer, writing out, group commit,
//! rolling to the next segment, spare segment files).
//!
//! Everything here is about entries and segments; what becomes of an
//! appended mutation afterwards is the pipeline's business, what may be
//! deleted is the clients' and the checkpoint's.

use super::commit::{CommitStats, GroupCommit};
use super::format::{
    self, ENTRY_HEADER_LEN, JournalEntry, JournalOp, SEG_HEADER_LEN, SegmentHeader,
};
use super::options::{JournalDurability, JournalOptions};
use super::segment;
use super::state::{self, PersistState};
use crate::error::{StoreError, is_no_space};
use crate::object::fsync_dir;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tern_types::ImageId;

/// Name of the journal directory inside an image's data directory.
pub const JOURNAL_DIR: &str = "journal";
const JOURNAL_NEW: &str = "journal.new";

pub(super) struct Seg {
    pub(super) first_tid: u64,
    /// File offset of entry `first_tid + i`.
    pub(super) offsets: Vec<u64>,
    /// Bytes, header and buffered entries included.
    pub(super) len: u64,
}

pub(super) struct Writer {
    pub(super) segs: BTreeMap<u64, Seg>,
    pub(super) cur_no: u64,
    cur: Arc<File>,
    /// Entries appended but not yet written to `cur`, which they continue
    /// at file offset `buf_off`.
    buf: Vec<u8>,
    pub(super) buf_off: u64,
    pub(super) next_tid: u64,
    /// Appended, not yet applied to the object files: the checkpoint stays
    /// below the smallest. An entry whose apply failed stays here, so it
    /// is replayed at the next open.
    inflight: BTreeSet<u64>,
    pub(super) since_checkpoint: u64,
    pub(super) last_checkpoint: Instant,
    /// A write-out failed; nothing more may be appended.
    failed: bool,
    /// Bytes of `cur` known to be allocated on disk: appends below this
    /// cannot meet a full disk.
    allocated: u64,
    /// Mutations appended and waiting for the committer, in tid order
    /// (they are queued under this lock, so the order is the journal's).
    pending: Vec<Pending>,
    /// A queued mutation wants to be durable when acknowledged (FUA), in
    /// `OnFlush` mode.
    pending_fua: bool,
    /// The journal is closing: the committer ends.
    stopping: bool,
    /// Trimmed segment files kept for reuse (by their old numbers):
    /// overwriting a file in place makes each sync cheaper than growing
    /// one, which changes its size.
    pub(super) spares: Vec<u64>,
}

impl Writer {
    fn cur_seg(&mut self) -> &mut Seg {
        self.segs.get_mut(&self.cur_no).expect("current segment")
    }

    pub(super) fn last_tid(&self) -> u64 {
        self.next_tid - 1
    }

    /// The oldest tid still held (the next one, if the journal is empty).
    pub(super) fn first_tid(&self) -> u64 {
        self.segs
            .values()
            .next()
            .map_or(self.next_tid, |s| s.first_tid)
    }
}

/// A mutation the committer applies once its entry may be acted on.
pub(crate) struct Pending {
    pub tid: u64,
    pub op: PendingOp,
}

pub(crate) enum PendingOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        discard: bool,
        offset: u64,
        len: u64,
    },
}

/// The segments of one journal and what is being appended to them.
pub(super) struct Log {
    spec: RwLock<String>,
    pub(super) dir: PathBuf,
    pub(super) image_id: ImageId,
    opts: Mutex<JournalOptions>,
    pub(super) w: Mutex<Writer>,
    commit: GroupCommit,
    /// Wakes the committer (paired with `w`).
    work: Condvar,
    /// A spare segment is being zero-filled.
    preparing: AtomicBool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(super) fn io_error(spec: &str, path: &Path, e: io::Error) -> StoreError {
    if is_no_space(&e) {
        StoreError::NoSpace {
            doing: "journaling",
            spec: spec.to_string(),
            source: e,
        }
    } else {
        StoreError::JournalIo {
            spec: spec.to_string(),
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn remove_dir_if_exists(p: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates an empty journal in `<image dir>/journal` whose first entry
/// will have tid `first_tid`, replacing any leftover. Durable on return.
pub(super) fn create(
    image_dir: &Path,
    spec: &str,
    image_id: &ImageId,
    first_tid: u64,
) -> Result<(), StoreError> {
    let new = image_dir.join(JOURNAL_NEW);
    let dir = image_dir.join(JOURNAL_DIR);
    let err = |p: &Path, e| io_error(spec, p, e);
    if !image_dir.exists() {
        std::fs::create_dir_all(image_dir).map_err(|e| err(image_dir, e))?;
        if let Some(parent) = image_dir.parent() {
            fsync_dir(parent).map_err(|e| err(parent, e))?;
        }
    }
    remove_dir_if_exists(&new).map_err(|e| err(&new, e))?;
    remove_dir_if_exists(&dir).map_err(|e| err(&dir, e))?;
    std::fs::create_dir(&new).map_err(|e| err(&new, e))?;
    segment::create(&new, &SegmentHeader::new(image_id, 0, first_tid)).map_err(|e| err(&new, e))?;
    let st = PersistState {
        checkpoint: first_tid - 1,
        clients: Vec::new(),
    };
    state::store(&new, &st).map_err(|e| err(&new, e))?;
    std::fs::rename(&new, &dir).map_err(|e| err(&dir, e))?;
    fsync_dir(image_dir).map_err(|e| err(image_dir, e))
}

/// Deletes the journal directory (and any half-created one).
pub(super) fn remove(image_dir: &Path, spec: &str) -> Result<(), StoreError> {
    for d in [JOURNAL_NEW, JOURNAL_DIR] {
        let p = image_dir.join(d);
        remove_dir_if_exists(&p).map_err(|e| io_error(spec, &p, e))?;
    }
    Ok(())
}

pub(super) fn exists(image_dir: &Path) -> bool {
    image_dir.join(JOURNAL_DIR).exists() || image_dir.join(JOURNAL_NEW).exists()
}

impl Log {
    /// Opens the journal, dropping a torn tail of the last segment (and a
    /// last segment whose creation a crash interrupted). Everything kept is
    /// synced, so it is all durable and readable. Damage anywhere else is
    /// refused as corruption. Returns the persisted state with it.
    pub(super) fn open(
        image_dir: &Path,
        spec: &str,
        image_id: &ImageId,
        opts: JournalOptions,
    ) -> Result<(Log, PersistState), StoreError> {
        let dir = image_dir.join(JOURNAL_DIR);
        // A leftover of an interrupted create is garbage.
        let new = image_dir.join(JOURNAL_NEW);
        remove_dir_if_exists(&new).map_err(|e| io_error(spec, &new, e))?;
        let corrupt = |path: &Path, reason: String| StoreError::JournalCorrupt {
            spec: spec.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let st = state::load(&dir)
            .map_err(|e| io_error(spec, &dir, e))?
            .map_err(|r| corrupt(&dir.join(state::STATE_FILE), r))?;
        let mut nos = segment::list_segments(&dir).map_err(|e| io_error(spec, &dir, e))?;
        let mut segs = BTreeMap::new();
        let mut next_tid = None::<u64>;
        let mut cur = None;
        while let Some(&no) = nos.first() {
            let last = nos.len() == 1;
            let path = segment::seg_path(&dir, no);
            let f = segment::open_rw(&dir, no).map_err(|e| io_error(spec, &path, e))?;
            let hdr = segment::read_header(&f).map_err(|e| io_error(spec, &path, e))?;
            let hdr = match hdr {
                Ok(h) => h,
                // Created but its header never made it: no entry was ever
                // durable in it (creation syncs before first use).
                Err(_) if last && !segs.is_empty() => {
                    std::fs::remove_file(&path).map_err(|e| io_error(spec, &path, e))?;
                    nos.remove(0);
                    // The one before (synced whole before this one was
                    // created) is the current segment again.
                    let (&prev, seg): (&u64, &Seg) = segs.iter().next_back().expect("not empty");
                    let ppath = segment::seg_path(&dir, prev);
                    let f = segment::open_rw(&dir, prev).map_err(|e| io_error(spec, &ppath, e))?;
                    cur = Some((prev, f, seg.len));
                    continue;
                }
                Err(e) => return Err(corrupt(&path, e.to_string())),
            };
            if hdr.segno != no {
                return Err(corrupt(
                    &path,
                    format!("header names segment {}", hdr.segno),
                ));
            }
            if hdr.image_id != image_id.as_str() {
                return Err(corrupt(
                    &path,
                    format!("segment belongs to image '{}'", hdr.image_id),
                ));
            }
            if let Some(n) = next_tid
                && hdr.first_tid != n
            {
                return Err(corrupt(
                    &path,
                    format!(
                        "segment starts at tid {}, but the one before ends at tid {}: entries are missing or damaged",
                        hdr.first_tid,
                        n - 1
                    ),
                ));
            }
            let file_len = f.metadata().map_err(|e| io_error(spec, &path, e))?.len();
            let mut offsets = Vec::new();
            let mut expect = hdr.first_tid;
            // A whole entry of another tid is a leftover of the file's
            // previous life (segments are recycled): the end of this one.
            let mut stale = false;
            let mut seg_end = SEG_HEADER_LEN as u64;
            let end = segment::scan(&f, SEG_HEADER_LEN as u64, file_len, |off, e, n| {
                if e.tid != expect {
                    stale = true;
                    return false;
                }
                offsets.push(off);
                seg_end = off + n as u64;
                expect += 1;
                true
            })
            .map_err(|e| io_error(spec, &path, e))?;
            // Bytes past the last entry of a closed segment are a recycled
            // file's old contents; that nothing is missing there is proved
            // by the next segment starting at the next tid (checked above).
            if (end.stop.is_some() || stale) && last {
                // The torn tail of the newest segment (an append that was
                // never acknowledged) or old contents. Cut off, so that
                // appends continue after the last whole entry and no
                // remnant can ever pass for a later one.
                f.set_len(seg_end)
                    .and_then(|()| f.sync_data())
                    .map_err(|e| io_error(spec, &path, e))?;
            } else if last {
                // What a killed process left in the page cache is durable
                // from now on, so it may be acknowledged and read.
                f.sync_data().map_err(|e| io_error(spec, &path, e))?;
            }
            next_tid = Some(expect);
            segs.insert(
                no,
                Seg {
                    first_tid: hdr.first_tid,
                    offsets,
                    len: seg_end,
                },
            );
            if last {
                cur = Some((no, f, seg_end));
            }
            nos.remove(0);
        }
        let Some((cur_no, cur, cur_len)) = cur else {
            return Err(corrupt(&dir, "the journal has no segments".into()));
        };
        let next_tid = next_tid.expect("a segment was read");
        if st.checkpoint >= next_tid {
            return Err(corrupt(
                &dir,
                format!(
                    "checkpoint {} is past the last entry {}",
                    st.checkpoint,
                    next_tid - 1
                ),
            ));
        }
        let spares = segment::list_spares(&dir).map_err(|e| io_error(spec, &dir, e))?;
        let log = Log {
            spec: RwLock::new(spec.to_string()),
            dir,
            image_id: image_id.clone(),
            opts: Mutex::new(opts),
            w: Mutex::new(Writer {
                segs,
                cur_no,
                cur: Arc::new(cur),
                buf: Vec::new(),
                buf_off: cur_len,
                allocated: 0,
                next_tid,
                inflight: BTreeSet::new(),
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                failed: false,
                pending: Vec::new(),
                pending_fua: false,
                stopping: false,
                spares,
            }),
            commit: GroupCommit::new(next_tid - 1),
            work: Condvar::new(),
            preparing: AtomicBool::new(false),
        };
        Ok((log, st))
    }

    pub(super) fn spec(&self) -> String {
        self.spec.read().clone()
    }

    pub(super) fn set_spec(&self, spec: &str) {
        *self.spec.write() = spec.to_string();
    }

    pub(super) fn io_err(&self, path: &Path, e: io::Error) -> StoreError {
        io_error(&self.spec.read(), path, e)
    }

    pub(super) fn corrupt(&self, path: &Path, reason: String) -> StoreError {
        StoreError::JournalCorrupt {
            spec: self.spec(),
            path: path.to_path_buf(),
            reason,
        }
    }

    pub(super) fn options(&self) -> JournalOptions {
        *self.opts.lock()
    }

    pub(super) fn set_options(&self, opts: JournalOptions) {
        *self.opts.lock() = opts;
    }

    // ---- appending ----

    /// Appends `op`; returns its tid. Not yet durable: see [`Self::sync_to`].
    pub(super) fn append(&self, op: &JournalOp) -> Result<u64, StoreError> {
        let len = ENTRY_HEADER_LEN + format::payload_len(op);
        self.push(
            len,
            |tid, out, _| {
                JournalEntry::encode_op_into(tid, now_us(), op, out);
            },
            None,
        )
    }

    /// Appends a write, discard or write-zeroes and queues it for the
    /// committer.
    pub(super) fn queue(&self, op: PendingOp, fua: bool) -> Result<u64, StoreError> {
        match op {
            PendingOp::Write { offset, data } => {
                let crc = format::WritePayload::crc(offset, &data);
                self.push(
                    ENTRY_HEADER_LEN + 8 + data.len(),
                    |tid, out, queued| {
                        if let Some(PendingOp::Write { data, .. }) = queued {
                            format::WritePayload::encode(offset, data, crc, tid, now_us(), out)
                        }
                    },
                    Some((PendingOp::Write { offset, data }, fua)),
                )
            }
            PendingOp::Zero {
                discard,
                offset,
                len,
            } => {
                let entry = if discard {
                    JournalOp::Discard { offset, len }
                } else {
                    JournalOp::WriteZeroes { offset, len }
                };
                let elen = ENTRY_HEADER_LEN + format::payload_len(&entry);
                self.push(
                    elen,
                    |tid, out, _| JournalEntry::encode_op_into(tid, now_us(), &entry, out),
                    Some((op, fua)),
                )
            }
        }
    }

    fn push(
        &self,
        len: usize,
        encode: impl FnOnce(u64, &mut Vec<u8>, Option<&PendingOp>),
        queue: Option<(PendingOp, bool)>,
    ) -> Result<u64, StoreError> {
        let mut w = self.w.lock();
        if w.failed {
            return Err(self.io_err(
                &self.dir,
                io::Error::other("an earlier journal write failed; the image needs checking"),
            ));
        }
        let seg_len = w.segs[&w.cur_no].len;
        let has_entries = !w.segs[&w.cur_no].offsets.is_empty();
        if has_entries && seg_len + len as u64 > self.options().segment_size {
            self.roll(&mut w)?;
        }
        self.allocate_locked(&mut w, len as u64)?;
        let tid = w.next_tid;
        let start = w.buf.len();
        encode(tid, &mut w.buf, queue.as_ref().map(|(op, _)| op));
        debug_assert_eq!(w.buf.len() - start, len);
        let seg = w.cur_seg();
        seg.offsets.push(seg.len);
        seg.len += len as u64;
        w.next_tid += 1;
        w.inflight.insert(tid);
        w.since_checkpoint += len as u64;
        if let Some((op, fua)) = queue {
            w.pending.push(Pending { tid, op });
            w.pending_fua |= fua;
            if w.pending.len() == 1 {
                self.work.notify_one();
            }
        }
        Ok(tid)
    }

    // ---- the committer's side ----

    /// Blocks until mutations are queued; returns false once the journal
    /// is closing and nothing is left.
    pub(super) fn wait_work(&self) -> bool {
        let mut w = self.w.lock();
        while w.pending.is_empty() && !w.stopping {
            let age = self.options().commit_age_us;
            if age > 0 && self.commit.durable() < w.last_tid() {
                let timeout = Duration::from_micros(age);
                if self.work.wait_for(&mut w, timeout).timed_out() {
                    let last = w.last_tid();
                    drop(w);
                    // Background commit of an `OnFlush` journal; a failure
                    // is reported to the next writer that syncs.
                    let _ = self.sync_to(last);
                    w = self.w.lock();
                }
            } else {
                self.work.wait(&mut w);
            }
        }
        !w.pending.is_empty()
    }

    /// Takes every queued mutation, and whether one of them wants FUA.
    pub(super) fn take_pending(&self) -> (Vec<Pending>, bool) {
        let mut w = self.w.lock();
        let fua = std::mem::take(&mut w.pending_fua);
        (std::mem::take(&mut w.pending), fua)
    }

    /// Entries are visible to readers once durable; in `OnFlush` mode the
    /// committer only writes them out, unless a FUA asks for more.
    pub(super) fn wants_sync(&self, fua: bool) -> bool {
        fua || self.options().durability == JournalDurability::Strict
    }

    /// Whether a spare segment should be prepared now (the journal is on
    /// its first lap and has none); if so, the caller
    /// must run [`Self::prepare_spare`] (the flag is taken).
    pub(super) fn wants_spare(&self) -> bool {
        let w = self.w.lock();
        // In steady state trimming hands segments back; this is for the
        // first lap (and a journal whose readers hold back trimming).
        w.spares.is_empty() && !self.preparing.swap(true, Ordering::SeqCst)
    }

    /// Writes a zero-filled segment file of the segment size and adds it
    /// to the spares: the first lap through a journal then also overwrites
    /// in place. Runs off the write path; a failure only means appends.
    pub(super) fn prepare_spare(&self) {
        let size = self.options().segment_size;
        let id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if segment::prepare_spare(&self.dir, id, size).is_ok() {
            self.w.lock().spares.push(id);
        }
        self.preparing.store(false, Ordering::SeqCst);
    }

    /// The committer ends and readers waiting for entries are woken for
    /// good.
    pub(super) fn close(&self) {
        self.w.lock().stopping = true;
        self.work.notify_all();
        self.commit.close();
    }

    // ---- writing out and syncing ----

    /// Makes every appended entry reach the segment file (page cache).
    pub(super) fn write_out(&self) -> Result<(), StoreError> {
        let mut w = self.w.lock();
        self.write_out_locked(&mut w)
    }

    /// Closes the current segment (written out and synced, so only the
    /// newest segment can ever have a torn tail) and starts the next.
    fn roll(&self, w: &mut Writer) -> Result<(), StoreError> {
        self.write_out_locked(w)?;
        let path = segment::seg_path(&self.dir, w.cur_no);
        w.cur.sync_data().map_err(|e| {
            w.failed = true;
            self.io_err(&path, e)
        })?;
        self.commit.mark_durable(w.last_tid());
        let no = w.cur_no + 1;
        let hdr = SegmentHeader::new(&self.image_id, no, w.next_tid);
        let reused = w
            .spares
            .pop()
            .and_then(|k| segment::reuse(&self.dir, k, &hdr).ok());
        let f = match reused {
            Some(f) => f,
            None => segment::create(&self.dir, &hdr)
                .map_err(|e| self.io_err(&segment::seg_path(&self.dir, no), e))?,
        };
        w.segs.insert(
            no,
            Seg {
                first_tid: w.next_tid,
                offsets: Vec::new(),
                len: SEG_HEADER_LEN as u64,
            },
        );
        w.cur = Arc::new(f);
        w.cur_no = no;
        w.buf_off = SEG_HEADER_LEN as u64;
        w.allocated = 0;
        Ok(())
    }

    /// Room on disk for the next `len` bytes of the current segment,
    /// before an entry is taken: on a full disk the append is refused
    /// cleanly and the journal goes on once there is room. Without it the
    /// write-out would fail with part of the entry in the file, which
    /// fails the journal until a restart. A whole segment at a time where
    /// the disk has it.
    fn allocate_locked(&self, w: &mut Writer, len: u64) -> Result<(), StoreError> {
        let at = w.segs[&w.cur_no].len;
        let end = at + len;
        if end <= w.allocated {
            return Ok(());
        }
        let whole = end.max(self.options().segment_size);
        let path = segment::seg_path(&self.dir, w.cur_no);
        let from = w.allocated.max(at);
        match segment::allocate(&w.cur, from, whole - from) {
            Ok(()) => w.allocated = whole,
            Err(_) => {
                segment::allocate(&w.cur, at, len).map_err(|e| self.io_err(&path, e))?;
                w.allocated = end;
            }
        }
        Ok(())
    }

    fn write_out_locked(&self, w: &mut Writer) -> Result<(), StoreError> {
        if w.failed {
            // What failed is still in `buf`: writing it now would make
            // entries after it durable, and their writers acknowledged,
            // while the failed ones' writers were told they failed.
            return Err(self.io_err(
                &self.dir,
                io::Error::other("an earlier journal write failed; the image needs checking"),
            ));
        }
        if w.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = w.cur.write_all_at(&w.buf, w.buf_off) {
            // Part of the buffer may be in the file: appending after it
            // would leave a hole of garbage in the middle of the segment.
            w.failed = true;
            return Err(self.io_err(&segment::seg_path(&self.dir, w.cur_no), e));
        }
        w.buf_off += w.buf.len() as u64;
        w.buf.clear();
        Ok(())
    }

    /// Makes every entry up to `tid` durable (group commit).
    pub(super) fn sync_to(&self, tid: u64) -> Result<(), StoreError> {
        self.commit
            .sync_to(tid, || {
                let mut w = self.w.lock();
                // The cause as it was: a full disk must still read as
                // ENOSPC to the writer, not as an unnamed I/O error.
                self.write_out_locked(&mut w).map_err(|e| match e {
                    StoreError::NoSpace { source, .. } | StoreError::JournalIo { source, .. } => {
                        source
                    }
                    other => io::Error::other(other.to_string()),
                })?;
                Ok((w.cur.clone(), w.last_tid()))
            })
            .map_err(|e| self.io_err(&self.dir, e))
    }

    /// Blocks until an entry after `after_tid` is durable or `timeout`
    /// passes; returns the last durable tid.
    pub(super) fn wait_for(&self, after_tid: u64, timeout: Duration) -> u64 {
        self.commit.wait_for(after_tid, timeout)
    }

    // ---- positions ----

    /// The entry is applied to the object files.
    pub(super) fn applied(&self, tid: u64) {
        self.w.lock().inflight.remove(&tid);
    }

    /// Highest tid such that it and every entry before it are applied.
    pub(super) fn applied_watermark(&self) -> u64 {
        let w = self.w.lock();
        w.inflight.first().map_or(w.last_tid(), |&first| first - 1)
    }

    pub(super) fn first_tid(&self) -> u64 {
        self.w.lock().first_tid()
    }

    pub(super) fn last_tid(&self) -> u64 {
        self.w.lock().last_tid()
    }

    pub(super) fn durable_tid(&self) -> u64 {
        self.commit.durable()
    }

    pub(super) fn stats(&self) -> CommitStats {
        self.commit.stats()
    }
}
