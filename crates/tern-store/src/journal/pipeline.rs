//! The committer of a journaled image: two threads per journal that turn
//! queued mutations into acknowledged, then applied, ones.
//!
//! A writer appends its entry and queues the mutation under the journal's
//! writer lock (so the queue is in tid order), then waits, holding no
//! thread if it is async. The committer's sync stage takes everything
//! queued and makes it durable with one `fdatasync` (or, in `OnFlush` mode
//! without FUA, just writes it to the segment file) and acknowledges it;
//! its apply stage, a second thread, applies each synced batch to the
//! object files in tid order while the next batch is being synced. A read
//! of the head first waits for the apply of every acknowledged write to
//! its range (`Journal::settle`), so it sees them all.
//!
//! So the write-ahead rule holds (no object file ever holds a write its
//! journal could lose), concurrent writers share syncs, overlapping writes
//! land in journal order (the order a peer replays them in), a writer
//! waits for one sync and not also for the apply of everything ahead of
//! it, and no writer thread parks per request: under load a round carries
//! as many mutations as arrived during the previous one.
//!
//! Barriers (snapshot operations, resize, markers, feature changes, clean
//! close) hold the image state for writing, which the committer needs for
//! reading; they run a round themselves before going on, so everything
//! queued before them is applied before them.
//!
//! The journal does not know the image: the apply stage writes through
//! [`Apply`] and reaches the image's state lock through [`Target`], both
//! implemented on the image's side.

use super::checkpoint;
use super::writer::{Log, Pending, PendingOp};
use crate::error::StoreError;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Acknowledged writes not yet applied, in bytes of data, past which the
/// sync stage waits for the apply stage. Acknowledging no longer waits for
/// the apply, so without it a writer faster than the apply (copy-on-write
/// after a snapshot, a slow disk) would queue without bound, in memory
/// and in the list every read checks.
const APPLY_BACKLOG: u64 = 32 << 20;

/// How often a stalled apply stage tries its failed entry again.
const APPLY_RETRY: Duration = Duration::from_millis(200);

/// Where the apply stage puts acknowledged mutations: the image, with its
/// state held by the caller.
pub(crate) trait Apply {
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), StoreError>;
    fn zero(&self, discard: bool, offset: u64, len: u64) -> Result<(), StoreError>;
}

/// The image as the apply thread sees it (it holds it weakly: the thread
/// must not keep a dropped image alive).
pub(crate) trait Target: Send + Sync + 'static {
    /// Runs `apply` with the image's state held for reading, taken before
    /// any batch is: a barrier holding it for writing then finds them all
    /// still queued. `None`: the image is gone (the thread ends).
    /// `Some(false)`: this journal is no longer the image's (closed or
    /// removed under us), and `apply` was not run.
    fn hold(&self, apply: &mut dyn FnMut(&dyn Apply)) -> Option<bool>;

    /// Starts a lazy checkpoint off the calling thread: a checkpoint syncs
    /// object files, which would hold every queued writer for its whole
    /// duration.
    fn checkpoint_soon(&self);
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
struct ReadyBatch {
    batch: Vec<Pending>,
}

#[derive(Default)]
struct Ready {
    batches: VecDeque<ReadyBatch>,
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

/// The sync and apply stages of one journal, and what writers and readers
/// wait on.
pub(super) struct Pipeline {
    log: Arc<Log>,
    /// One committer round at a time, so batches apply in tid order.
    round: Mutex<()>,
    /// Held from taking queued mutations until they are handed over as
    /// ready, so a barrier can wait for a sync in progress.
    stage: Mutex<()>,
    /// Synced (or written out) batches waiting to be applied, in order.
    ready: Mutex<Ready>,
    ready_cv: Condvar,
    /// `Done::stalled` is set (read on every write without the lock).
    stalled_flag: AtomicBool,
    /// Tests only: microseconds the apply stage sleeps per batch.
    apply_delay_us: AtomicU64,
    done: Mutex<Done>,
    done_cv: Condvar,
}

impl Pipeline {
    /// A pipeline over `log`, every entry up to its last one finished.
    pub(super) fn new(log: Arc<Log>) -> Pipeline {
        let through = log.last_tid();
        Pipeline {
            log,
            round: Mutex::new(()),
            stage: Mutex::new(()),
            ready: Mutex::new(Ready::default()),
            ready_cv: Condvar::new(),
            stalled_flag: AtomicBool::new(false),
            apply_delay_us: AtomicU64::new(0),
            done: Mutex::new(Done {
                through,
                ..Done::default()
            }),
            done_cv: Condvar::new(),
        }
    }

    /// Starts the committer's two threads; they end when the journal
    /// closes.
    pub(super) fn start(self: &Arc<Self>, target: Box<dyn Target>) {
        let p = self.clone();
        std::thread::Builder::new()
            .name("tern-jsync".into())
            .spawn(move || {
                while p.log.wait_work() {
                    p.wait_apply_room();
                    p.sync_stage();
                    if p.log.wants_spare() {
                        let log = p.log.clone();
                        std::thread::spawn(move || log.prepare_spare());
                    }
                }
            })
            .expect("spawning the journal sync thread");
        let p = self.clone();
        std::thread::Builder::new()
            .name("tern-japply".into())
            .spawn(move || p.apply_loop(&*target))
            .expect("spawning the journal apply thread");
    }

    /// The second stage: applies batches as the sync stage hands them over,
    /// so the next sync runs while this one's writes land.
    fn apply_loop(&self, target: &dyn Target) {
        while self.wait_ready() {
            // Holding here (no lock held) lets a test pile up acknowledged,
            // unapplied entries for a crash to leave behind.
            crate::testpoint::reached("journal-apply");
            let mut due = false;
            let held = target.hold(&mut |img| {
                {
                    let _one = self.round.lock();
                    self.apply_ready(img);
                }
                due = checkpoint::due(&self.log, false);
            });
            match held {
                None => break,
                // Closed under us: its waiters are told so by the close.
                Some(false) => drop(self.take_ready()),
                Some(true) if due => target.checkpoint_soon(),
                Some(true) => {}
            }
        }
    }

    /// A whole round for a caller holding the image state (a barrier):
    /// syncs what is queued, waits for a sync in progress, and applies
    /// every ready batch, so everything queued before the call is applied
    /// after it. Fails if the apply stage is stalled (the barrier must not
    /// run ahead of acknowledged writes).
    pub(super) fn commit_round(&self, img: &dyn Apply) -> Result<(), StoreError> {
        let _one = self.round.lock();
        self.sync_stage();
        self.apply_ready(img);
        match self.stalled_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Applies the ready batches in order. At an entry whose apply fails
    /// (a full disk) the stage stops: that entry and all after it go back
    /// to the queue, in order, to be tried again (see [`Self::stall`]).
    /// They are acknowledged and durable in the journal, so nothing is
    /// lost, even across a crash (the next open replays them). Called with
    /// `round` held.
    fn apply_ready(&self, img: &dyn Apply) {
        let mut batches = self.take_ready().into_iter();
        while let Some(mut rb) = batches.next() {
            self.apply_delay();
            let mut failed = None;
            for (i, p) in rb.batch.iter().enumerate() {
                let r = match &p.op {
                    PendingOp::Write { offset, data } => img.write(*offset, data),
                    PendingOp::Zero {
                        discard,
                        offset,
                        len,
                    } => img.zero(*discard, *offset, *len),
                };
                match r {
                    Ok(()) => self.log.applied(p.tid),
                    Err(e) => {
                        failed = Some((i, e));
                        break;
                    }
                }
            }
            match failed {
                None => self.batch_applied(&rb.batch),
                Some((i, e)) => {
                    let rest = rb.batch.split_off(i);
                    self.batch_applied(&rb.batch);
                    let mut back = vec![ReadyBatch { batch: rest }];
                    back.extend(batches);
                    self.stall(back, Arc::new(e));
                    return;
                }
            }
        }
        self.unstall();
    }

    /// Blocks while the apply stage is more than [`APPLY_BACKLOG`] behind
    /// the acknowledgements (the sync stage calls it before a round).
    fn wait_apply_room(&self) {
        let mut d = self.done.lock();
        while d.backlog > APPLY_BACKLOG && !d.closed {
            self.done_cv.wait(&mut d);
        }
    }

    /// Takes what is queued and makes it durable (or written out), then
    /// hands it over to be applied. The stage lock is held throughout.
    fn sync_stage(&self) {
        let _g = self.stage.lock();
        let (batch, fua) = self.log.take_pending();
        let Some(last) = batch.last().map(|p| p.tid) else {
            return;
        };
        let synced = if self.log.wants_sync(fua) {
            self.log.sync_to(last)
        } else {
            self.log.write_out()
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
                let mut d = self.done.lock();
                self.finish_locked(&mut d, last, errors);
            }
        }
    }

    /// Blocks until a batch is ready to apply (after a pause when
    /// stalled); false once closing.
    fn wait_ready(&self) -> bool {
        let mut r = self.ready.lock();
        if r.stalled && !r.closed {
            self.ready_cv.wait_for(&mut r, APPLY_RETRY);
        }
        while r.batches.is_empty() && !r.closed {
            self.ready_cv.wait(&mut r);
        }
        !r.batches.is_empty()
    }

    fn take_ready(&self) -> Vec<ReadyBatch> {
        self.ready.lock().batches.drain(..).collect()
    }

    /// Publishes that every queued entry up to `through` is finished;
    /// `errors` are the ones that failed.
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
    fn batch_applied(&self, batch: &[Pending]) {
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
    fn stall(&self, rest: Vec<ReadyBatch>, error: Arc<StoreError>) {
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
                self.log.spec()
            );
        }
        d.stalled = Some((tid, error));
        self.stalled_flag.store(true, Ordering::SeqCst);
        self.done_cv.notify_all();
    }

    /// Every queued entry is applied: a stall, if any, is over.
    fn unstall(&self) {
        if !self.stalled_flag.load(Ordering::SeqCst) {
            return;
        }
        self.ready.lock().stalled = false;
        let mut d = self.done.lock();
        if let Some((tid, _)) = d.stalled.take() {
            tracing::warn!(
                "journal of image '{}': entry {tid} and those after it are applied now; writes accepted again",
                self.log.spec()
            );
        }
        self.stalled_flag.store(false, Ordering::SeqCst);
        self.done_cv.notify_all();
    }

    /// The error of a stalled apply stage, as the image reports it.
    pub(super) fn stalled_error(&self) -> Option<StoreError> {
        if !self.stalled_flag.load(Ordering::SeqCst) {
            return None;
        }
        let d = self.done.lock();
        d.stalled.as_ref().map(|(tid, e)| StoreError::JournalApply {
            spec: self.log.spec(),
            tid: *tid,
            source: e.clone(),
        })
    }

    /// Blocks until every acknowledged mutation that touches
    /// `[offset, offset+len)` is in the object files, so a read of the range
    /// sees every write acknowledged before it. Fails if one of them could
    /// not be applied.
    pub(super) fn settle(&self, offset: u64, len: u64) -> Result<(), StoreError> {
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
                    spec: self.log.spec(),
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
            spec: self.log.spec(),
        }
    }

    /// Blocks until the committer has acknowledged (or failed) entry `tid`.
    pub(super) fn wait_done(&self, tid: u64) -> Result<(), StoreError> {
        let mut d = self.done.lock();
        loop {
            if let Some(r) = self.result_of(&mut d, tid) {
                return r;
            }
            self.done_cv.wait(&mut d);
        }
    }

    /// [`Self::wait_done`] without blocking a thread.
    pub(super) async fn wait_done_async(&self, tid: u64) -> Result<(), StoreError> {
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

    /// Bytes of acknowledged writes not yet applied to the object files.
    pub(super) fn apply_backlog(&self) -> u64 {
        self.done.lock().backlog
    }

    pub(super) fn slow_apply_for_tests(&self, per_batch: Duration) {
        self.apply_delay_us
            .store(per_batch.as_micros() as u64, Ordering::Relaxed);
    }

    fn apply_delay(&self) {
        let us = self.apply_delay_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
    }

    /// The stages end; every waiter is told the journal is gone.
    pub(super) fn close(&self) {
        self.ready.lock().closed = true;
        self.ready_cv.notify_all();
        let mut d = self.done.lock();
        d.closed = true;
        d.waiters.clear();
        self.done_cv.notify_all();
    }
}
