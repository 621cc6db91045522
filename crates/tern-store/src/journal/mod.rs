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

mod checkpoint;
mod clients;
mod commit;
pub mod format;
mod options;
mod pipeline;
mod reader;
mod segment;
mod state;
mod writer;

pub use clients::{ClientInfo, LOCAL_CLIENT};
pub use commit::CommitStats;
pub use format::{FormatError, JournalEntry, JournalOp};
pub use options::{
    DEFAULT_CHECKPOINT_BYTES, DEFAULT_COMMIT_AGE_US, DEFAULT_MAX_SIZE, DEFAULT_SEGMENT_SIZE,
    JournalDurability, JournalOptions, MIN_MAX_SIZE, MIN_SEGMENT_SIZE,
};
pub(crate) use pipeline::{Apply, Target};
pub use reader::{Entries, InspectReport, JournalInfo, SegmentInfo};
pub use writer::JOURNAL_DIR;

use crate::error::StoreError;
use checkpoint::Checkpoint;
use clients::Clients;
use pipeline::Pipeline;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tern_types::ImageId;
use writer::{Log, PendingOp};

/// Writes larger than this are journaled as several entries, so one entry
/// stays a reasonable unit for readers and for `max_bytes`.
pub const MAX_WRITE_ENTRY: usize = 4 << 20;

/// An image's journal. Shared (`Arc`) by the image handle and by readers.
///
/// The parts, each in its own file: the log being appended to
/// (`writer`), the committer's sync and apply stages (`pipeline`), the
/// persisted positions and trimming (`clients`), the checkpoint
/// (`checkpoint`) and reading back (`reader`). This type puts them
/// together; none of them knows it, or the image.
pub struct Journal {
    log: Arc<Log>,
    pipe: Arc<Pipeline>,
    clients: Clients,
    ckpt: Checkpoint,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.log.dir)
            .finish()
    }
}

/// A queued journaled mutation to wait for.
#[must_use = "the write is acknowledged only when the ticket says so"]
pub struct Ticket {
    j: Arc<Journal>,
    tid: u64,
}

impl Ticket {
    /// Blocks until the mutation is durable as promised (reads see it from
    /// then on).
    pub fn wait(self) -> Result<(), StoreError> {
        self.j.wait_done(self.tid)
    }

    /// [`Self::wait`] for async callers: no thread waits.
    pub async fn wait_async(self) -> Result<(), StoreError> {
        self.j.pipe.wait_done_async(self.tid).await
    }
}

impl Journal {
    /// Creates an empty journal in `<image dir>/journal` whose first entry
    /// will have tid `first_tid`, replacing any leftover. Durable on return.
    pub(crate) fn create(
        image_dir: &Path,
        spec: &str,
        image_id: &ImageId,
        first_tid: u64,
    ) -> Result<(), StoreError> {
        writer::create(image_dir, spec, image_id, first_tid)
    }

    /// Deletes the journal directory (and any half-created one).
    pub(crate) fn remove(image_dir: &Path, spec: &str) -> Result<(), StoreError> {
        writer::remove(image_dir, spec)
    }

    pub(crate) fn exists(image_dir: &Path) -> bool {
        writer::exists(image_dir)
    }

    /// Opens the journal, dropping a torn tail of the last segment (and a
    /// last segment whose creation a crash interrupted). Everything kept is
    /// synced, so it is all durable and readable. Damage anywhere else is
    /// refused as corruption. Its committer starts with [`Self::start`].
    pub(crate) fn open(
        image_dir: &Path,
        spec: &str,
        image_id: &ImageId,
        opts: JournalOptions,
    ) -> Result<Journal, StoreError> {
        let (log, st) = Log::open(image_dir, spec, image_id, opts)?;
        let log = Arc::new(log);
        Ok(Journal {
            pipe: Arc::new(Pipeline::new(log.clone())),
            clients: Clients::new(log.clone(), st),
            ckpt: Checkpoint::default(),
            log,
        })
    }

    /// Starts the committer, which applies to `target` (see `pipeline`).
    pub(crate) fn start(&self, target: Box<dyn Target>) {
        self.pipe.start(target);
    }

    pub(crate) fn set_spec(&self, spec: &str) {
        self.log.set_spec(spec);
    }

    pub fn options(&self) -> JournalOptions {
        self.log.options()
    }

    /// Changes the tunables of an open journal; a new segment size applies
    /// from the next segment on.
    pub fn set_options(&self, opts: JournalOptions) {
        self.log.set_options(opts);
    }

    pub fn dir(&self) -> &Path {
        &self.log.dir
    }

    // ---- the image's side ----

    /// Appends `op`; returns its tid. Not yet durable: see [`Self::sync_to`].
    pub(crate) fn append(&self, op: &JournalOp) -> Result<u64, StoreError> {
        self.log.append(op)
    }

    /// Appends a write and queues it for the committer.
    pub(crate) fn queue_write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<u64, StoreError> {
        self.queue(PendingOp::Write { offset, data }, fua)
    }

    /// Appends a discard or write-zeroes and queues it for the committer.
    pub(crate) fn queue_zero(
        &self,
        discard: bool,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<u64, StoreError> {
        let op = PendingOp::Zero {
            discard,
            offset,
            len,
        };
        self.queue(op, fua)
    }

    fn queue(&self, op: PendingOp, fua: bool) -> Result<u64, StoreError> {
        if let Some(e) = self.pipe.stalled_error() {
            // Nothing more is taken on while the acknowledged writes
            // cannot be applied: they would only fail the same way.
            return Err(e);
        }
        self.log.queue(op, fua)
    }

    /// A ticket for queued entry `tid`.
    pub(crate) fn ticket(self: &Arc<Self>, tid: u64) -> Ticket {
        Ticket {
            j: self.clone(),
            tid,
        }
    }

    /// Blocks until the committer has acknowledged (or failed) entry `tid`.
    pub(crate) fn wait_done(&self, tid: u64) -> Result<(), StoreError> {
        self.pipe.wait_done(tid)
    }

    /// Makes every entry up to `tid` durable (group commit).
    pub(crate) fn sync_to(&self, tid: u64) -> Result<(), StoreError> {
        self.log.sync_to(tid)
    }

    /// The entry is applied to the object files.
    pub(crate) fn applied(&self, tid: u64) {
        self.log.applied(tid);
    }

    /// Blocks until every acknowledged mutation that touches
    /// `[offset, offset+len)` is in the object files (see `pipeline`).
    pub(crate) fn settle(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.pipe.settle(offset, len)
    }

    /// A whole committer round for a barrier holding the image state, so
    /// everything queued before it is applied to `img` first.
    pub(crate) fn commit_round(&self, img: &dyn Apply) -> Result<(), StoreError> {
        self.pipe.commit_round(img)
    }

    /// A lazy checkpoint is due: enough bytes since the last one, or (at a
    /// flush) enough time.
    pub(crate) fn checkpoint_due(&self, at_flush: bool) -> bool {
        checkpoint::due(&self.log, at_flush)
    }

    /// Runs a checkpoint: `sync_objects` must make every applied write
    /// durable in the object files. With `wait` false, gives up at once if
    /// another checkpoint is running. Trims afterwards.
    pub(crate) fn checkpoint(
        &self,
        wait: bool,
        sync_objects: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.ckpt.run(&self.log, &self.clients, wait, sync_objects)
    }

    /// Wakes every waiter for good: the journal is going away.
    pub(crate) fn close(&self) {
        self.log.close();
        self.pipe.close();
    }

    // ---- clients ----

    /// Registers a client (a peer's replayer) at the current end of the
    /// journal: it holds back trimming of every entry after that. Idempotent
    /// for a connected client; a disconnected one is reconnected at the
    /// current end (it must have resynced).
    pub fn register_client(&self, id: &str) -> Result<ClientInfo, StoreError> {
        self.clients.register(id)
    }

    pub fn unregister_client(&self, id: &str) -> Result<(), StoreError> {
        self.clients.unregister(id)
    }

    /// Records that `client` has processed every entry up to `tid`
    /// (persisted), then trims what nobody needs any more. Positions only
    /// move forward; an older `tid` is ignored.
    pub fn commit(&self, client: &str, tid: u64) -> Result<(), StoreError> {
        self.clients.commit(client, tid)
    }

    pub fn client(&self, id: &str) -> Result<ClientInfo, StoreError> {
        self.clients.client(id)
    }

    // ---- reading ----

    /// Durable entries from `tid` on, in order, about `max_bytes` of them
    /// (at least one if any exists). Empty when `tid` is past the last
    /// durable entry. Fails with [`StoreError::JournalTrimmed`] if `tid` was
    /// trimmed.
    pub fn read_from(&self, tid: u64, max_bytes: u64) -> Result<Vec<JournalEntry>, StoreError> {
        reader::read_from(&self.log, tid, max_bytes)
    }

    /// Blocks until an entry after `after_tid` is durable (so readable) or
    /// `timeout` passes; returns the last durable tid. Lets a stream push
    /// new entries without polling.
    pub fn wait_for(&self, after_tid: u64, timeout: Duration) -> u64 {
        self.log.wait_for(after_tid, timeout)
    }

    /// Every durable entry from `from` on, for `journal export`.
    pub fn entries(&self, from: u64) -> Entries<'_> {
        Entries::new(&self.log, from)
    }

    // ---- introspection ----

    pub fn info(&self) -> JournalInfo {
        reader::info(&self.log, &self.clients)
    }

    /// Reads every segment from disk and checks headers, every entry's crc
    /// and the tid sequence. Only what has been written out is checked (an
    /// entry still in memory is not on disk yet).
    pub fn inspect(&self) -> Result<InspectReport, StoreError> {
        reader::inspect(&self.log)
    }

    pub fn applied_tid(&self) -> u64 {
        self.clients.checkpoint()
    }

    pub fn last_tid(&self) -> u64 {
        self.log.last_tid()
    }

    pub fn durable_tid(&self) -> u64 {
        self.log.durable_tid()
    }

    /// Bytes of acknowledged writes not yet applied to the object files.
    pub fn apply_backlog(&self) -> u64 {
        self.pipe.apply_backlog()
    }

    /// Makes the apply stage sleep this long per batch, so tests can make
    /// it the slow one.
    #[doc(hidden)]
    pub fn slow_apply_for_tests(&self, per_batch: Duration) {
        self.pipe.slow_apply_for_tests(per_batch);
    }

    pub fn stats(&self) -> CommitStats {
        self.log.stats()
    }
}
