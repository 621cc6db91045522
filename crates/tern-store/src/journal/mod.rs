//! The per-image journal: a write-ahead log of every mutation of an image
//! with the `journaling` feature, and the source of journal-mode mirroring.
//!
//! # On disk
//!
//! ```text
//! objects/<image id>/journal/state                 checkpoint + clients (see `state`)
//! objects/<image id>/journal/<segno 016x>.jseg     segments (see `format`, `segment`)
//! ```
//!
//! A journal is created whole in `journal.new` and renamed into place, so
//! a crash never leaves half of one.
//!
//! # Write path and durability
//!
//! A mutation of a journaled image appends an entry (tid strictly
//! increasing by one) to an in-memory buffer and is acknowledged once the
//! entry is durable (group commit, see `commit`); it is then applied to the
//! object files, which are not synced for it, and a read of its range
//! waits for that apply. In [`JournalDurability::OnFlush`] mode the entry
//! is only written to the segment (page cache) before the acknowledgement,
//! and is durable at the next flush or FUA, as with a disk's write cache.
//!
//! # Checkpoint, replay and trimming
//!
//! The checkpoint says "every entry up to tid X is applied to the object
//! files durably". It advances lazily (every `checkpoint_bytes` of journal,
//! at a flush a few seconds after the last one, at a clean close, and at
//! every snapshot operation or resize, which are barriers): the journal is
//! synced up to X, the image's dirty object files are synced, then X is
//! recorded. On open, entries after the checkpoint are replayed in order.
//! Replaying is idempotent (writes, discards and resizes set state; snapshot
//! operations check whether they already happened), so a crash during
//! replay just replays again.
//!
//! Segments whose every entry is at or below the checkpoint and the
//! committed position of every connected client are deleted. A client that
//! would make the journal exceed `max_size` is disconnected instead: it no
//! longer holds back trimming, and reading a trimmed position fails with
//! [`StoreError::JournalTrimmed`] (kind `Fenced`: the client has lost its
//! place and must resync).

mod commit;
pub mod format;
pub(crate) mod replay;
mod segment;
mod state;

pub use commit::CommitStats;
pub use format::{FormatError, JournalEntry, JournalOp};

use crate::error::{StoreError, is_no_space};
use crate::now_secs;
use format::{ENTRY_HEADER_LEN, SEG_HEADER_LEN, SegmentHeader};
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};
use state::{ClientRecord, PersistState};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tern_types::ImageId;

/// Name of the journal directory inside an image's data directory.
pub const JOURNAL_DIR: &str = "journal";
const JOURNAL_NEW: &str = "journal.new";
/// The id under which the local image's own position (the applied
/// checkpoint) is listed among the clients; not available to others.
pub const LOCAL_CLIENT: &str = "local";
/// Writes larger than this are journaled as several entries, so one entry
/// stays a reasonable unit for readers and for `max_bytes`.
pub const MAX_WRITE_ENTRY: usize = 4 << 20;
/// A flush checkpoints if the last checkpoint is older than this.
const CHECKPOINT_AGE: Duration = Duration::from_secs(30);

/// Acknowledged writes not yet applied, in bytes of data, past which the
/// sync stage waits for the apply stage. Acknowledging no longer waits for
/// the apply, so without it a writer faster than the apply (copy-on-write
/// after a snapshot, a slow disk) would queue without bound, in memory
/// and in the list every read checks.
const APPLY_BACKLOG: u64 = 32 << 20;

/// How often a stalled apply stage tries its failed entry again.
const APPLY_RETRY: Duration = Duration::from_millis(200);

/// When an appended entry is durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalDurability {
    /// Before the mutation is acknowledged (group-committed fdatasync).
    #[default]
    Strict,
    /// At the next flush or FUA write, like a disk's volatile write cache.
    /// Entries still reach the segment file (page cache) before the object
    /// files, so a process crash loses nothing; a power cut may lose the
    /// unflushed tail of the journal while the object files kept some of
    /// those writes, as a disk's cache may.
    OnFlush,
}

/// Journal tunables (`rbd_journal_object_size` maps to `segment_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalOptions {
    /// A segment is closed and a new one started once it would grow past
    /// this (an entry larger than it gets a segment of its own).
    pub segment_size: u64,
    /// Journal size above which lagging clients are disconnected.
    pub max_size: u64,
    /// Journal bytes appended between two lazy checkpoints.
    pub checkpoint_bytes: u64,
    pub durability: JournalDurability,
    /// In `OnFlush` mode, entries not made durable by a flush or FUA are
    /// synced in the background this long (microseconds) after they are
    /// appended: it bounds what a power cut can take and how long a peer
    /// waits to see an entry. 0: only flushes and FUA sync.
    pub commit_age_us: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_size: 16 << 20,
            max_size: 1 << 30,
            checkpoint_bytes: 256 << 20,
            durability: JournalDurability::Strict,
            commit_age_us: 5000,
        }
    }
}

/// A client of the journal and how far it has got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub id: String,
    /// Every entry with tid <= this has been processed by the client.
    pub commit_tid: u64,
    /// Fell too far behind: it no longer holds back trimming and must resync.
    pub disconnected: bool,
    /// Durable entries after `commit_tid`.
    pub entries_behind: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub segno: u64,
    pub first_tid: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// What `tern journal info|status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalInfo {
    pub image_id: ImageId,
    pub segments: Vec<SegmentInfo>,
    pub bytes: u64,
    /// Oldest tid still held (or the next tid, if the journal is empty).
    pub first_tid: u64,
    /// Last tid appended (0: none yet).
    pub last_tid: u64,
    /// Last tid on stable storage and visible to readers.
    pub durable_tid: u64,
    /// Applied checkpoint: the local image's position.
    pub applied_tid: u64,
    /// The local image first ([`LOCAL_CLIENT`]), then registered clients.
    pub clients: Vec<ClientInfo>,
    pub options: JournalOptions,
    /// fdatasyncs done by group commit since the journal was opened.
    pub syncs: u64,
}

/// What `tern journal inspect` reports: every segment and entry checked
/// from the files, independently of the in-memory state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectReport {
    pub segments: u64,
    pub entries: u64,
    pub bytes: u64,
    pub first_tid: Option<u64>,
    pub last_tid: Option<u64>,
    /// Entries per op name.
    pub counts: BTreeMap<String, u64>,
    /// One sentence per problem; empty means clean.
    pub errors: Vec<String>,
}

struct Seg {
    first_tid: u64,
    /// File offset of entry `first_tid + i`.
    offsets: Vec<u64>,
    /// Bytes, header and buffered entries included.
    len: u64,
}

struct Writer {
    segs: BTreeMap<u64, Seg>,
    cur_no: u64,
    cur: Arc<File>,
    /// Entries appended but not yet written to `cur`, which they continue
    /// at file offset `buf_off`.
    buf: Vec<u8>,
    buf_off: u64,
    next_tid: u64,
    /// Appended, not yet applied to the object files: the checkpoint stays
    /// below the smallest. An entry whose apply failed stays here, so it
    /// is replayed at the next open.
    inflight: BTreeSet<u64>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
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
    spares: Vec<u64>,
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

fn backlog_bytes(batch: &[Pending]) -> u64 {
    batch
        .iter()
        .map(|p| match &p.op {
            PendingOp::Write { data, .. } => data.len() as u64,
            PendingOp::Zero { .. } => 4096,
        })
        .sum()
}

impl PendingOp {
    /// The image range it changes.
    fn range(&self) -> (u64, u64) {
        match self {
            PendingOp::Write { offset, data } => (*offset, data.len() as u64),
            PendingOp::Zero { offset, len, .. } => (*offset, *len),
        }
    }
}

/// A synced and acknowledged batch, for the apply stage.
pub(crate) struct ReadyBatch {
    pub batch: Vec<Pending>,
}

#[derive(Default)]
struct Ready {
    batches: std::collections::VecDeque<ReadyBatch>,
    closed: bool,
    /// The apply stage is stalled on a failed entry (the first batch):
    /// it retries every [`APPLY_RETRY`].
    stalled: bool,
}

/// What the committer has finished: every queued entry with tid <=
/// `through` is acknowledged (durable as promised), or failed with the
/// error kept here. Acknowledged entries wait in `unapplied` until they
/// are in the object files; reads of their ranges wait for that.
#[derive(Default)]
struct Done {
    through: u64,
    errors: BTreeMap<u64, Arc<StoreError>>,
    /// Acknowledged, not yet applied, in tid order.
    unapplied: Vec<Unapplied>,
    /// Bytes of the acknowledged batches the apply stage has not finished
    /// (a discard or zeroing counts one block).
    backlog: u64,
    /// The apply stage stopped at this entry, which failed to apply (a
    /// full disk): it and every later entry wait, in order, for a retry
    /// to succeed. Meanwhile reads of unapplied ranges and new writes
    /// fail with this error instead of waiting or piling up.
    stalled: Option<(u64, Arc<StoreError>)>,
    closed: bool,
    /// Writers waiting without a thread of their own, each woken alone
    /// when its entry is finished (waking every waiter at every round
    /// would cost more than the round).
    waiters: BTreeMap<u64, tokio::sync::oneshot::Sender<Result<(), Arc<StoreError>>>>,
}

/// The image range of an acknowledged, unapplied mutation.
#[derive(Debug, Clone, Copy)]
struct Unapplied {
    tid: u64,
    offset: u64,
    len: u64,
}

impl Writer {
    fn cur_seg(&mut self) -> &mut Seg {
        self.segs.get_mut(&self.cur_no).expect("current segment")
    }

    fn last_tid(&self) -> u64 {
        self.next_tid - 1
    }
}

/// An image's journal. Shared (`Arc`) by the image handle and by readers.
pub struct Journal {
    spec: RwLock<String>,
    dir: PathBuf,
    image_id: ImageId,
    opts: Mutex<JournalOptions>,
    w: Mutex<Writer>,
    commit: commit::GroupCommit,
    /// The persisted state; its lock also serialises writing the file.
    st: Mutex<PersistState>,
    /// One checkpoint at a time.
    ckpt: Mutex<()>,
    /// One committer round at a time, so batches apply in tid order.
    pub(crate) round: Mutex<()>,
    /// Held from taking queued mutations until they are handed over as
    /// ready, so a barrier can wait for a sync in progress.
    pub(crate) stage: Mutex<()>,
    /// Synced (or written out) batches waiting to be applied, in order.
    ready: Mutex<Ready>,
    ready_cv: Condvar,
    /// A spare segment is being zero-filled.
    preparing: std::sync::atomic::AtomicBool,
    /// `Done::stalled` is set (read on every write without the lock).
    stalled_flag: std::sync::atomic::AtomicBool,
    /// Tests only: microseconds the apply stage sleeps per batch.
    apply_delay_us: std::sync::atomic::AtomicU64,
    /// Wakes the committer (paired with `w`).
    work: Condvar,
    done: Mutex<Done>,
    done_cv: Condvar,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Journal {
    fn io_err(&self, path: &Path, e: io::Error) -> StoreError {
        io_error(&self.spec.read(), path, e)
    }

    fn corrupt(&self, path: &Path, reason: String) -> StoreError {
        StoreError::JournalCorrupt {
            spec: self.spec.read().clone(),
            path: path.to_path_buf(),
            reason,
        }
    }

    /// Creates an empty journal in `<image dir>/journal` whose first entry
    /// will have tid `first_tid`, replacing any leftover. Durable on return.
    pub(crate) fn create(
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
                crate::object::fsync_dir(parent).map_err(|e| err(parent, e))?;
            }
        }
        remove_dir_if_exists(&new).map_err(|e| err(&new, e))?;
        remove_dir_if_exists(&dir).map_err(|e| err(&dir, e))?;
        std::fs::create_dir(&new).map_err(|e| err(&new, e))?;
        segment::create(&new, &SegmentHeader::new(image_id, 0, first_tid))
            .map_err(|e| err(&new, e))?;
        let st = PersistState {
            checkpoint: first_tid - 1,
            clients: Vec::new(),
        };
        state::store(&new, &st).map_err(|e| err(&new, e))?;
        std::fs::rename(&new, &dir).map_err(|e| err(&dir, e))?;
        crate::object::fsync_dir(image_dir).map_err(|e| err(image_dir, e))
    }

    /// Deletes the journal directory (and any half-created one).
    pub(crate) fn remove(image_dir: &Path, spec: &str) -> Result<(), StoreError> {
        for d in [JOURNAL_NEW, JOURNAL_DIR] {
            let p = image_dir.join(d);
            remove_dir_if_exists(&p).map_err(|e| io_error(spec, &p, e))?;
        }
        Ok(())
    }

    pub(crate) fn exists(image_dir: &Path) -> bool {
        image_dir.join(JOURNAL_DIR).exists() || image_dir.join(JOURNAL_NEW).exists()
    }

    /// Opens the journal, dropping a torn tail of the last segment (and a
    /// last segment whose creation a crash interrupted). Everything kept is
    /// synced, so it is all durable and readable. Damage anywhere else is
    /// refused as corruption.
    pub(crate) fn open(
        image_dir: &Path,
        spec: &str,
        image_id: &ImageId,
        opts: JournalOptions,
    ) -> Result<Journal, StoreError> {
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
        Ok(Journal {
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
            commit: commit::GroupCommit::new(next_tid - 1),
            st: Mutex::new(st),
            ckpt: Mutex::new(()),
            round: Mutex::new(()),
            stage: Mutex::new(()),
            ready: Mutex::new(Ready::default()),
            ready_cv: Condvar::new(),
            preparing: std::sync::atomic::AtomicBool::new(false),
            stalled_flag: std::sync::atomic::AtomicBool::new(false),
            apply_delay_us: std::sync::atomic::AtomicU64::new(0),
            work: Condvar::new(),
            done: Mutex::new(Done {
                through: next_tid - 1,
                ..Done::default()
            }),
            done_cv: Condvar::new(),
        })
    }

    pub(crate) fn set_spec(&self, spec: &str) {
        *self.spec.write() = spec.to_string();
    }

    pub fn options(&self) -> JournalOptions {
        *self.opts.lock()
    }

    /// Changes the tunables of an open journal; a new segment size applies
    /// from the next segment on.
    pub fn set_options(&self, opts: JournalOptions) {
        *self.opts.lock() = opts;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    // ---- appending ----

    /// Appends `op`; returns its tid. Not yet durable: see [`Self::sync_to`].
    pub(crate) fn append(&self, op: &JournalOp) -> Result<u64, StoreError> {
        let len = ENTRY_HEADER_LEN + format::payload_len(op);
        self.push(
            len,
            |tid, out, _| {
                JournalEntry::encode_op_into(tid, now_us(), op, out);
            },
            None,
        )
    }

    /// Appends a discard or write-zeroes and queues it for the committer.
    pub(crate) fn queue_zero(
        &self,
        discard: bool,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<u64, StoreError> {
        let op = if discard {
            JournalOp::Discard { offset, len }
        } else {
            JournalOp::WriteZeroes { offset, len }
        };
        let elen = ENTRY_HEADER_LEN + format::payload_len(&op);
        self.push(
            elen,
            |tid, out, _| JournalEntry::encode_op_into(tid, now_us(), &op, out),
            Some((
                PendingOp::Zero {
                    discard,
                    offset,
                    len,
                },
                fua,
            )),
        )
    }

    /// Appends a write and queues it for the committer.
    pub(crate) fn queue_write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<u64, StoreError> {
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

    fn push(
        &self,
        len: usize,
        encode: impl FnOnce(u64, &mut Vec<u8>, Option<&PendingOp>),
        queue: Option<(PendingOp, bool)>,
    ) -> Result<u64, StoreError> {
        if queue.is_some()
            && let Some(e) = self.stalled_error()
        {
            // Nothing more is taken on while the acknowledged writes
            // cannot be applied: they would only fail the same way.
            return Err(e);
        }
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

    /// Blocks while the apply stage is more than [`APPLY_BACKLOG`] behind
    /// the acknowledgements (the sync stage calls it before a round).
    pub(crate) fn wait_apply_room(&self) {
        let mut d = self.done.lock();
        while d.backlog > APPLY_BACKLOG && !d.closed {
            self.done_cv.wait(&mut d);
        }
    }

    /// Blocks until mutations are queued; returns false once the journal
    /// is closing and nothing is left.
    pub(crate) fn wait_work(&self) -> bool {
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
    pub(crate) fn take_pending(&self) -> (Vec<Pending>, bool) {
        let mut w = self.w.lock();
        let fua = std::mem::take(&mut w.pending_fua);
        (std::mem::take(&mut w.pending), fua)
    }

    /// Takes what is queued and makes it durable (or written out), then
    /// hands it over to be applied. The stage lock is held throughout.
    pub(crate) fn sync_stage(&self) {
        let _g = self.stage.lock();
        let (batch, fua) = self.take_pending();
        let Some(last) = batch.last().map(|p| p.tid) else {
            return;
        };
        let synced = if self.wants_sync(fua) {
            self.sync_to(last)
        } else {
            self.write_out()
        };
        // Acknowledged now, before the apply: the entries are as durable
        // as promised, reads of their ranges wait for the apply, and the
        // next sync overlaps this apply. So a writer waits for one sync,
        // not for a sync and the apply of everything ahead of it.
        match synced {
            Ok(()) => {
                let mut d = self.done.lock();
                d.backlog += backlog_bytes(&batch);
                d.unapplied.extend(batch.iter().map(|p| {
                    let (offset, len) = p.op.range();
                    Unapplied {
                        tid: p.tid,
                        offset,
                        len,
                    }
                }));
                self.finish_locked(&mut d, last, Vec::new());
                drop(d);
                let mut r = self.ready.lock();
                r.batches.push_back(ReadyBatch { batch });
                self.ready_cv.notify_one();
            }
            Err(e) => {
                let e = Arc::new(e);
                let errors = batch.iter().map(|p| (p.tid, e.clone())).collect();
                self.finish(last, errors);
            }
        }
    }

    /// Whether a spare segment should be prepared now (the journal is on
    /// its first lap and has none); if so, the caller
    /// must run [`Self::prepare_spare`] (the flag is taken).
    pub(crate) fn wants_spare(&self) -> bool {
        let w = self.w.lock();
        // In steady state trimming hands segments back; this is for the
        // first lap (and a journal whose readers hold back trimming).
        w.spares.is_empty()
            && !self
                .preparing
                .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes a zero-filled segment file of the segment size and adds it
    /// to the spares: the first lap through a journal then also overwrites
    /// in place. Runs off the write path; a failure only means appends.
    pub(crate) fn prepare_spare(&self) {
        let size = self.options().segment_size;
        let id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if segment::prepare_spare(&self.dir, id, size).is_ok() {
            self.w.lock().spares.push(id);
        }
        self.preparing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Blocks until a batch is ready to apply (after a pause when
    /// stalled); false once closing.
    pub(crate) fn wait_ready(&self) -> bool {
        let mut r = self.ready.lock();
        if r.stalled && !r.closed {
            self.ready_cv.wait_for(&mut r, APPLY_RETRY);
        }
        while r.batches.is_empty() && !r.closed {
            self.ready_cv.wait(&mut r);
        }
        !r.batches.is_empty()
    }

    pub(crate) fn take_ready(&self) -> Vec<ReadyBatch> {
        self.ready.lock().batches.drain(..).collect()
    }

    /// Publishes that every queued entry up to `through` is finished;
    /// `errors` are the ones that failed.
    pub(crate) fn finish(&self, through: u64, errors: Vec<(u64, Arc<StoreError>)>) {
        let mut d = self.done.lock();
        self.finish_locked(&mut d, through, errors);
    }

    fn finish_locked(&self, d: &mut Done, through: u64, errors: Vec<(u64, Arc<StoreError>)>) {
        d.errors.extend(errors);
        d.through = d.through.max(through);
        let ready: Vec<u64> = d.waiters.range(..=d.through).map(|(t, _)| *t).collect();
        for t in ready {
            let tx = d.waiters.remove(&t).expect("listed");
            let r = d.errors.remove(&t).map_or(Ok(()), Err);
            let _ = tx.send(r);
        }
        self.done_cv.notify_all();
    }

    /// The apply stage has applied `batch` (acknowledged entries, in tid
    /// order).
    pub(crate) fn batch_applied(&self, batch: &[Pending]) {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return;
        };
        let mut d = self.done.lock();
        d.backlog = d.backlog.saturating_sub(backlog_bytes(batch));
        d.unapplied
            .retain(|u| u.tid < first.tid || u.tid > last.tid);
        self.done_cv.notify_all();
    }

    /// The apply stage stopped at the first entry of `rest` with `error`:
    /// `rest` (that entry and everything after it, in order) goes back to
    /// the front of the queue for the next try.
    pub(crate) fn stall(&self, rest: Vec<ReadyBatch>, error: Arc<StoreError>) {
        let Some(tid) = rest.first().and_then(|b| b.batch.first()).map(|p| p.tid) else {
            return;
        };
        {
            let mut r = self.ready.lock();
            for b in rest.into_iter().rev() {
                r.batches.push_front(b);
            }
            r.stalled = true;
        }
        let mut d = self.done.lock();
        if d.stalled.is_none() {
            tracing::error!(
                "journal entry {tid} of image '{}' is durable but applying it failed: {error}; \
                 retrying every {APPLY_RETRY:?}, refusing new writes meanwhile",
                self.spec.read()
            );
        }
        d.stalled = Some((tid, error));
        self.stalled_flag
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.done_cv.notify_all();
    }

    /// Every queued entry is applied: a stall, if any, is over.
    pub(crate) fn unstall(&self) {
        if !self.stalled_flag.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.ready.lock().stalled = false;
        let mut d = self.done.lock();
        if let Some((tid, _)) = d.stalled.take() {
            tracing::warn!(
                "journal of image '{}': entry {tid} and those after it are applied now; writes accepted again",
                self.spec.read()
            );
        }
        self.stalled_flag
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.done_cv.notify_all();
    }

    /// The error of a stalled apply stage, as the image reports it.
    pub(crate) fn stalled_error(&self) -> Option<StoreError> {
        if !self.stalled_flag.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let d = self.done.lock();
        d.stalled.as_ref().map(|(tid, e)| StoreError::JournalApply {
            spec: self.spec.read().clone(),
            tid: *tid,
            source: e.clone(),
        })
    }

    /// Blocks until every acknowledged mutation that touches
    /// `[offset, offset+len)` is in the object files, so a read of the range
    /// sees every write acknowledged before it. Fails if one of them could
    /// not be applied.
    pub(crate) fn settle(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let end = offset.saturating_add(len);
        let mut d = self.done.lock();
        loop {
            let mut overlapping = d
                .unapplied
                .iter()
                .filter(|u| u.offset < end && offset < u.offset.saturating_add(u.len));
            if overlapping.next().is_none() {
                return Ok(());
            }
            // Waiting would last as long as the disk stays full.
            if let Some((tid, e)) = &d.stalled {
                return Err(StoreError::JournalApply {
                    spec: self.spec.read().clone(),
                    tid: *tid,
                    source: e.clone(),
                });
            }
            if d.closed {
                return Err(self.closed_error());
            }
            self.done_cv.wait(&mut d);
        }
    }

    fn result_of(&self, d: &mut Done, tid: u64) -> Option<Result<(), StoreError>> {
        if let Some(e) = d.errors.remove(&tid) {
            return Some(Err(StoreError::Shared(e)));
        }
        if d.through >= tid {
            return Some(Ok(()));
        }
        if d.closed {
            return Some(Err(self.closed_error()));
        }
        None
    }

    fn closed_error(&self) -> StoreError {
        StoreError::ImageRemoved {
            spec: self.spec.read().clone(),
        }
    }

    /// Blocks until the committer has acknowledged (or failed) entry `tid`.
    pub(crate) fn wait_done(&self, tid: u64) -> Result<(), StoreError> {
        let mut d = self.done.lock();
        loop {
            if let Some(r) = self.result_of(&mut d, tid) {
                return r;
            }
            self.done_cv.wait(&mut d);
        }
    }

    /// [`Self::wait_done`] without blocking a thread.
    pub(crate) async fn wait_done_async(&self, tid: u64) -> Result<(), StoreError> {
        let rx = {
            let mut d = self.done.lock();
            if let Some(r) = self.result_of(&mut d, tid) {
                return r;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            d.waiters.insert(tid, tx);
            rx
        };
        match rx.await {
            Ok(r) => r.map_err(StoreError::Shared),
            // Dropped by the close.
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Entries are visible to readers once durable; in `OnFlush` mode the
    /// committer only writes them out, unless a FUA asks for more.
    pub(crate) fn wants_sync(&self, fua: bool) -> bool {
        fua || self.options().durability == JournalDurability::Strict
    }

    /// Makes every appended entry reach the segment file (page cache).
    pub(crate) fn write_out(&self) -> Result<(), StoreError> {
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
    pub(crate) fn sync_to(&self, tid: u64) -> Result<(), StoreError> {
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

    /// The entry is applied to the object files.
    pub(crate) fn applied(&self, tid: u64) {
        self.w.lock().inflight.remove(&tid);
    }

    /// Highest tid such that it and every entry before it are applied.
    fn applied_watermark(&self) -> u64 {
        let w = self.w.lock();
        w.inflight.first().map_or(w.last_tid(), |&first| first - 1)
    }

    /// A lazy checkpoint is due: enough bytes since the last one, or (at a
    /// flush) enough time.
    pub(crate) fn checkpoint_due(&self, at_flush: bool) -> bool {
        let w = self.w.lock();
        let o = self.options();
        // A journal capped small must checkpoint (and so trim) well before
        // the cap, or nothing could ever be trimmed in time.
        let every = o.checkpoint_bytes.min(o.max_size / 4).max(1);
        w.since_checkpoint >= every
            || (at_flush && w.since_checkpoint > 0 && w.last_checkpoint.elapsed() >= CHECKPOINT_AGE)
    }

    /// Runs a checkpoint: `sync_objects` must make every applied write
    /// durable in the object files. With `wait` false, gives up at once if
    /// another checkpoint is running. Trims afterwards.
    pub(crate) fn checkpoint(
        &self,
        wait: bool,
        sync_objects: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _g = if wait {
            self.ckpt.lock()
        } else {
            match self.ckpt.try_lock() {
                Some(g) => g,
                None => return Ok(()),
            }
        };
        let x = self.applied_watermark();
        if x <= self.st.lock().checkpoint {
            return Ok(());
        }
        {
            let mut w = self.w.lock();
            w.since_checkpoint = 0;
            w.last_checkpoint = Instant::now();
        }
        // The journal first: an object file must never hold a write whose
        // entry a crash could lose, or peers would miss it.
        self.sync_to(x)?;
        sync_objects()?;
        {
            let mut st = self.st.lock();
            if x > st.checkpoint {
                let mut next = st.clone();
                next.checkpoint = x;
                state::store(&self.dir, &next).map_err(|e| self.io_err(&self.dir, e))?;
                *st = next;
            }
        }
        self.trim()
    }

    pub fn applied_tid(&self) -> u64 {
        self.st.lock().checkpoint
    }

    pub fn last_tid(&self) -> u64 {
        self.w.lock().last_tid()
    }

    pub fn durable_tid(&self) -> u64 {
        self.commit.durable()
    }

    /// Bytes of acknowledged writes not yet applied to the object files.
    pub fn apply_backlog(&self) -> u64 {
        self.done.lock().backlog
    }

    /// Makes the apply stage sleep this long per batch, so tests can make
    /// it the slow one.
    #[doc(hidden)]
    pub fn slow_apply_for_tests(&self, per_batch: Duration) {
        self.apply_delay_us.store(
            per_batch.as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub(crate) fn apply_delay(&self) {
        let us = self
            .apply_delay_us
            .load(std::sync::atomic::Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
    }

    pub fn stats(&self) -> CommitStats {
        self.commit.stats()
    }

    // ---- trimming ----

    /// Deletes segments every holder is done with; disconnects clients that
    /// would keep the journal above `max_size`.
    fn trim(&self) -> Result<(), StoreError> {
        let mut st = self.st.lock();
        // (segno, last tid, bytes) of closed segments, oldest first, and
        // the total size.
        let (closed, total): (Vec<(u64, u64, u64)>, u64) = {
            let w = self.w.lock();
            let total = w.segs.values().map(|s| s.len).sum();
            let closed = w
                .segs
                .iter()
                .filter(|(no, _)| **no != w.cur_no)
                .map(|(no, s)| {
                    let last = (s.first_tid + s.offsets.len() as u64).saturating_sub(1);
                    (*no, last, s.len)
                })
                .collect();
            (closed, total)
        };
        let keep_from = |st: &PersistState| {
            st.clients
                .iter()
                .filter(|c| !c.disconnected)
                .map(|c| c.commit)
                .fold(st.checkpoint, u64::min)
        };
        let trimmable = |pos: u64| -> (Vec<u64>, u64) {
            let mut nos = Vec::new();
            let mut bytes = 0;
            for &(no, last, len) in &closed {
                if last > pos {
                    break;
                }
                nos.push(no);
                bytes += len;
            }
            (nos, bytes)
        };
        let (mut nos, mut freed) = trimmable(keep_from(&st));
        let mut changed = false;
        while total - freed > self.options().max_size {
            // The furthest-behind client that holds back more than the
            // local image does goes first.
            let checkpoint = st.checkpoint;
            let victim = st
                .clients
                .iter_mut()
                .filter(|c| !c.disconnected && c.commit < checkpoint)
                .min_by_key(|c| c.commit);
            let Some(v) = victim else { break };
            v.disconnected = true;
            changed = true;
            (nos, freed) = trimmable(keep_from(&st));
        }
        if changed {
            state::store(&self.dir, &st).map_err(|e| self.io_err(&self.dir, e))?;
        }
        drop(st);
        if nos.is_empty() {
            return Ok(());
        }
        // Enough to take a whole checkpoint interval's segments back, which
        // the journal held anyway just before this trim.
        let opts = self.options();
        let keep = (opts.checkpoint_bytes / opts.segment_size.max(1) + 2).min(64) as usize;
        let mut recycle = {
            let mut w = self.w.lock();
            for no in &nos {
                w.segs.remove(no);
            }
            keep.saturating_sub(w.spares.len())
        };
        for no in nos {
            let p = segment::seg_path(&self.dir, no);
            let r = if recycle > 0 {
                std::fs::rename(&p, segment::spare_path(&self.dir, no))
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) if recycle > 0 => {
                    recycle -= 1;
                    self.w.lock().spares.push(no);
                }
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_err(&p, e)),
            }
        }
        // Not strictly needed (a resurrected old segment is trimmed again),
        // but keeps the directory honest.
        crate::object::fsync_dir(&self.dir).map_err(|e| self.io_err(&self.dir, e))
    }

    // ---- clients ----

    fn persist(&self, st: &mut PersistState, next: PersistState) -> Result<(), StoreError> {
        state::store(&self.dir, &next).map_err(|e| self.io_err(&self.dir, e))?;
        *st = next;
        Ok(())
    }

    /// Registers a client (a peer's replayer) at the current end of the
    /// journal: it holds back trimming of every entry after that. Idempotent
    /// for a connected client; a disconnected one is reconnected at the
    /// current end (it must have resynced).
    pub fn register_client(&self, id: &str) -> Result<ClientInfo, StoreError> {
        if id.is_empty() || id == LOCAL_CLIENT || id.len() > 250 {
            return Err(StoreError::InvalidName {
                what: "journal client",
                name: id.to_string(),
                reason: "client ids are 1 to 250 bytes and 'local' is reserved",
            });
        }
        let end = self.durable_tid();
        let mut st = self.st.lock();
        let mut next = st.clone();
        match next.clients.iter_mut().find(|c| c.id == id) {
            Some(c) if !c.disconnected => {}
            Some(c) => {
                c.disconnected = false;
                c.commit = end;
            }
            None => next.clients.push(ClientRecord {
                id: id.to_string(),
                commit: end,
                disconnected: false,
                registered: now_secs(),
            }),
        }
        if next != *st {
            self.persist(&mut st, next)?;
        }
        let c = st.clients.iter().find(|c| c.id == id).expect("registered");
        Ok(client_info(c, end))
    }

    pub fn unregister_client(&self, id: &str) -> Result<(), StoreError> {
        {
            let mut st = self.st.lock();
            if !st.clients.iter().any(|c| c.id == id) {
                return Err(self.no_client(id));
            }
            let mut next = st.clone();
            next.clients.retain(|c| c.id != id);
            self.persist(&mut st, next)?;
        }
        self.trim()
    }

    fn no_client(&self, id: &str) -> StoreError {
        StoreError::JournalClientNotFound {
            spec: self.spec.read().clone(),
            client: id.to_string(),
        }
    }

    /// Records that `client` has processed every entry up to `tid`
    /// (persisted), then trims what nobody needs any more. Positions only
    /// move forward; an older `tid` is ignored.
    pub fn commit(&self, client: &str, tid: u64) -> Result<(), StoreError> {
        let durable = self.durable_tid();
        {
            let mut st = self.st.lock();
            let Some(c) = st.clients.iter().find(|c| c.id == client) else {
                return Err(self.no_client(client));
            };
            if c.disconnected {
                return Err(StoreError::JournalClientDisconnected {
                    spec: self.spec.read().clone(),
                    client: client.to_string(),
                });
            }
            if tid > durable {
                return Err(StoreError::JournalCommitAhead {
                    spec: self.spec.read().clone(),
                    client: client.to_string(),
                    tid,
                    last: durable,
                });
            }
            if tid <= c.commit {
                return Ok(());
            }
            let mut next = st.clone();
            if let Some(c) = next.clients.iter_mut().find(|c| c.id == client) {
                c.commit = tid;
            }
            self.persist(&mut st, next)?;
        }
        self.trim()
    }

    pub fn client(&self, id: &str) -> Result<ClientInfo, StoreError> {
        let end = self.durable_tid();
        let st = self.st.lock();
        st.clients
            .iter()
            .find(|c| c.id == id)
            .map(|c| client_info(c, end))
            .ok_or_else(|| self.no_client(id))
    }

    // ---- reading ----

    /// Durable entries from `tid` on, in order, about `max_bytes` of them
    /// (at least one if any exists). Empty when `tid` is past the last
    /// durable entry. Fails with [`StoreError::JournalTrimmed`] if `tid` was
    /// trimmed.
    pub fn read_from(&self, tid: u64, max_bytes: u64) -> Result<Vec<JournalEntry>, StoreError> {
        let durable = self.durable_tid();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut next = tid.max(1);
        while next <= durable && (out.is_empty() || bytes < max_bytes) {
            // Plan one segment's read under the lock, read outside it.
            let (no, start, limit, count) = {
                let w = self.w.lock();
                let first = w.segs.values().next().map_or(w.next_tid, |s| s.first_tid);
                if next < first {
                    return Err(StoreError::JournalTrimmed {
                        spec: self.spec.read().clone(),
                        tid: next,
                        first,
                    });
                }
                let Some((no, s)) = w.segs.iter().rev().find(|(_, s)| s.first_tid <= next) else {
                    break;
                };
                let i = (next - s.first_tid) as usize;
                if i >= s.offsets.len() {
                    break;
                }
                let last_in_seg = s.first_tid + s.offsets.len() as u64 - 1;
                let upto = last_in_seg.min(durable);
                let j = (upto - s.first_tid) as usize;
                let limit = s.offsets.get(j + 1).copied().unwrap_or(s.len);
                (*no, s.offsets[i], limit, upto - next + 1)
            };
            let path = segment::seg_path(&self.dir, no);
            let f = match segment::open_ro(&self.dir, no) {
                Ok(f) => f,
                // Trimmed between the plan and the open.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::JournalTrimmed {
                        spec: self.spec.read().clone(),
                        tid: next,
                        first: self.first_tid(),
                    });
                }
                Err(e) => return Err(self.io_err(&path, e)),
            };
            let mut got = 0u64;
            let end = segment::scan(&f, start, limit, |_, e, n| {
                if e.tid != next {
                    return false;
                }
                out.push(e);
                next += 1;
                got += 1;
                bytes += n as u64;
                got < count && bytes < max_bytes
            })
            .map_err(|e| self.io_err(&path, e))?;
            if let Some(why) = end.stop {
                return Err(self.corrupt(&path, format!("at offset {}: {why}", end.end)));
            }
            if got == 0 {
                return Err(
                    self.corrupt(&path, format!("entry {next} is not where the index says"))
                );
            }
        }
        Ok(out)
    }

    fn first_tid(&self) -> u64 {
        let w = self.w.lock();
        w.segs.values().next().map_or(w.next_tid, |s| s.first_tid)
    }

    /// Blocks until an entry after `after_tid` is durable (so readable) or
    /// `timeout` passes; returns the last durable tid. Lets a stream push
    /// new entries without polling.
    pub fn wait_for(&self, after_tid: u64, timeout: Duration) -> u64 {
        self.commit.wait_for(after_tid, timeout)
    }

    /// Every durable entry from `from` on, for `journal export`.
    pub fn entries(&self, from: u64) -> Entries<'_> {
        Entries {
            j: self,
            next: from.max(1),
            upto: self.durable_tid(),
            batch: std::collections::VecDeque::new(),
            done: false,
        }
    }

    // ---- introspection ----

    pub fn info(&self) -> JournalInfo {
        let stats = self.commit.stats();
        let durable = stats.durable_tid;
        let st = self.st.lock().clone();
        let w = self.w.lock();
        let segments: Vec<SegmentInfo> = w
            .segs
            .iter()
            .map(|(no, s)| SegmentInfo {
                segno: *no,
                first_tid: s.first_tid,
                entries: s.offsets.len() as u64,
                bytes: s.len,
            })
            .collect();
        let mut clients = vec![ClientInfo {
            id: LOCAL_CLIENT.to_string(),
            commit_tid: st.checkpoint,
            disconnected: false,
            entries_behind: durable.saturating_sub(st.checkpoint),
        }];
        clients.extend(st.clients.iter().map(|c| client_info(c, durable)));
        JournalInfo {
            image_id: self.image_id.clone(),
            bytes: segments.iter().map(|s| s.bytes).sum(),
            first_tid: segments.first().map_or(w.next_tid, |s| s.first_tid),
            segments,
            last_tid: w.last_tid(),
            durable_tid: durable,
            applied_tid: st.checkpoint,
            clients,
            options: self.options(),
            syncs: stats.syncs,
        }
    }

    /// Reads every segment from disk and checks headers, every entry's crc
    /// and the tid sequence. Only what has been written out is checked (an
    /// entry still in memory is not on disk yet).
    pub fn inspect(&self) -> Result<InspectReport, StoreError> {
        // Each segment up to where its entries end (a recycled file holds
        // old contents after that); the current one up to what is written.
        let segs: Vec<(u64, u64)> = {
            let w = self.w.lock();
            w.segs
                .iter()
                .map(|(&no, s)| (no, if no == w.cur_no { w.buf_off } else { s.len }))
                .collect()
        };
        let mut r = InspectReport::default();
        let mut expect: Option<u64> = None;
        for (no, written) in segs {
            let path = segment::seg_path(&self.dir, no);
            let f = match segment::open_ro(&self.dir, no) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // trimmed meanwhile
                Err(e) => return Err(self.io_err(&path, e)),
            };
            r.segments += 1;
            let len = f.metadata().map_err(|e| self.io_err(&path, e))?.len();
            let limit = written.min(len);
            if len < written {
                r.errors.push(format!(
                    "{}: {len} bytes, but its entries end at {written}",
                    path.display()
                ));
            }
            r.bytes += limit;
            let hdr = match segment::read_header(&f).map_err(|e| self.io_err(&path, e))? {
                Ok(h) => h,
                Err(e) => {
                    r.errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if hdr.segno != no || hdr.image_id != self.image_id.as_str() {
                r.errors.push(format!(
                    "{}: header names segment {} of image '{}'",
                    path.display(),
                    hdr.segno,
                    hdr.image_id
                ));
            }
            if let Some(n) = expect
                && hdr.first_tid != n
            {
                r.errors.push(format!(
                    "{}: starts at tid {}, expected {n}",
                    path.display(),
                    hdr.first_tid
                ));
            }
            let mut next = hdr.first_tid;
            let mut errors = Vec::new();
            let end = segment::scan(&f, SEG_HEADER_LEN as u64, limit, |off, e, _| {
                if e.tid != next {
                    errors.push(format!(
                        "{}: entry at offset {off} has tid {}, expected {next}",
                        path.display(),
                        e.tid
                    ));
                }
                next = e.tid + 1;
                r.entries += 1;
                r.first_tid.get_or_insert(e.tid);
                r.last_tid = Some(e.tid);
                *r.counts.entry(e.op.name().to_string()).or_default() += 1;
                true
            })
            .map_err(|e| self.io_err(&path, e))?;
            r.errors.extend(errors);
            if let Some(why) = end.stop {
                r.errors
                    .push(format!("{}: at offset {}: {why}", path.display(), end.end));
                // Where the next segment should start is unknown now.
                expect = None;
            } else {
                expect = Some(next);
            }
        }
        Ok(r)
    }

    /// Wakes every `wait_for` for good: the journal is going away.
    pub(crate) fn close(&self) {
        self.w.lock().stopping = true;
        self.work.notify_all();
        self.ready.lock().closed = true;
        self.ready_cv.notify_all();
        self.commit.close();
        let mut d = self.done.lock();
        d.closed = true;
        d.waiters.clear();
        self.done_cv.notify_all();
    }
}

fn client_info(c: &ClientRecord, durable: u64) -> ClientInfo {
    ClientInfo {
        id: c.id.clone(),
        commit_tid: c.commit,
        disconnected: c.disconnected,
        entries_behind: durable.saturating_sub(c.commit),
    }
}

fn io_error(spec: &str, path: &Path, e: io::Error) -> StoreError {
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

/// Iterator over durable entries, read in batches (see [`Journal::entries`]).
pub struct Entries<'a> {
    j: &'a Journal,
    next: u64,
    upto: u64,
    batch: std::collections::VecDeque<JournalEntry>,
    done: bool,
}

impl Iterator for Entries<'_> {
    type Item = Result<JournalEntry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.batch.pop_front() {
            return Some(Ok(e));
        }
        if self.done || self.next > self.upto {
            return None;
        }
        match self.j.read_from(self.next, 4 << 20) {
            Ok(v) if v.is_empty() => None,
            Ok(v) => {
                self.next = v.last().expect("non-empty").tid + 1;
                self.batch
                    .extend(v.into_iter().filter(|e| e.tid <= self.upto));
                self.batch.pop_front().map(Ok)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
