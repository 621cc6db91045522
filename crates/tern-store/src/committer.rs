//! The committer of a journaled image: one thread per journal that turns
//! queued mutations into acknowledged ones.
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

use crate::error::StoreError;
use crate::image::{Image, State};
use crate::journal::{Journal, PendingOp, ReadyBatch};
use std::sync::{Arc, Weak};

/// A queued journaled mutation to wait for.
#[must_use = "the write is acknowledged only when the ticket says so"]
pub struct Ticket {
    pub(crate) j: Arc<Journal>,
    pub(crate) tid: u64,
}

impl Ticket {
    /// Blocks until the mutation is durable as promised (reads see it from
    /// then on).
    pub fn wait(self) -> Result<(), StoreError> {
        self.j.wait_done(self.tid)
    }

    /// [`Self::wait`] for async callers: no thread waits.
    pub async fn wait_async(self) -> Result<(), StoreError> {
        self.j.wait_done_async(self.tid).await
    }
}

impl Image {
    pub(crate) fn start_committer(self: &Arc<Self>, j: &Arc<Journal>) {
        let jj = j.clone();
        std::thread::Builder::new()
            .name("tern-jsync".into())
            .spawn(move || {
                while jj.wait_work() {
                    jj.wait_apply_room();
                    jj.sync_stage();
                    if jj.wants_spare() {
                        let jp = jj.clone();
                        std::thread::spawn(move || jp.prepare_spare());
                    }
                }
            })
            .expect("spawning the journal sync thread");
        let (img, j) = (Arc::downgrade(self), j.clone());
        std::thread::Builder::new()
            .name("tern-japply".into())
            .spawn(move || apply_loop(img, j))
            .expect("spawning the journal apply thread");
    }

    /// A whole round for a caller holding `state` (a barrier): syncs what
    /// is queued, waits for a sync in progress, and applies every ready
    /// batch, so everything queued before the call is applied after it.
    /// Fails if the apply stage is stalled (the barrier must not run ahead
    /// of acknowledged writes).
    pub(crate) fn commit_round(&self, st: &State, j: &Journal) -> Result<(), StoreError> {
        let _one = j.round.lock();
        j.sync_stage();
        self.apply_ready(st, j);
        match j.stalled_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Applies the ready batches in order. At an entry whose apply fails
    /// (a full disk) the stage stops: that entry and all after it go back
    /// to the queue, in order, to be tried again (see `Journal::stall`).
    /// They are acknowledged and durable in the journal, so nothing is
    /// lost, even across a crash (the next open replays them). Called with
    /// `round` held.
    fn apply_ready(&self, st: &State, j: &Journal) {
        let mut batches = j.take_ready().into_iter();
        while let Some(mut rb) = batches.next() {
            j.apply_delay();
            let mut failed = None;
            for (i, p) in rb.batch.iter().enumerate() {
                let r = match &p.op {
                    PendingOp::Write { offset, data } => {
                        self.write_locked(st, *offset, data, false)
                    }
                    PendingOp::Zero {
                        discard,
                        offset,
                        len,
                    } => {
                        let doing = if *discard { "discarding" } else { "zeroing" };
                        self.zero_range_locked(st, doing, *offset, *len)
                    }
                };
                match r {
                    Ok(()) => j.applied(p.tid),
                    Err(e) => {
                        failed = Some((i, e));
                        break;
                    }
                }
            }
            match failed {
                None => j.batch_applied(&rb.batch),
                Some((i, e)) => {
                    let rest = rb.batch.split_off(i);
                    j.batch_applied(&rb.batch);
                    let mut back = vec![ReadyBatch { batch: rest }];
                    back.extend(batches);
                    j.stall(back, Arc::new(e));
                    return;
                }
            }
        }
        j.unstall();
    }
}

/// The second stage: applies batches as the sync stage hands them over,
/// so the next sync runs while this one's writes land.
fn apply_loop(img: Weak<Image>, j: Arc<Journal>) {
    while j.wait_ready() {
        let Some(img) = img.upgrade() else {
            break;
        };
        // The state lock before the batches: a barrier holding it for
        // writing then finds them all still queued.
        let st = img.state_read();
        let current = st.journal.as_ref().is_some_and(|c| Arc::ptr_eq(c, &j));
        if !current || img.is_removed() {
            // Closed under us: its waiters are told so by the close.
            drop(j.take_ready());
            continue;
        }
        {
            let _one = j.round.lock();
            img.apply_ready(&st, &j);
        }
        let due = j.checkpoint_due(false);
        drop(st);
        if due {
            // Off this thread: a checkpoint syncs object files, which
            // would hold every queued writer for its whole duration.
            let img = img.clone();
            std::thread::spawn(move || {
                let st = img.state_read();
                // Best effort: a failed lazy checkpoint only delays
                // trimming, and a failed object sync is reported by every
                // later flush.
                let _ = img.checkpoint_locked(&st, false);
            });
        }
    }
}
