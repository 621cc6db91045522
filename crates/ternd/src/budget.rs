//! One memory budget for the data that the API's read streams (exports,
//! diffs, initial syncs) have read but the client has not yet taken.
//!
//! A stream's producer reserves bytes before it reads: first from its own
//! share (at most two chunks, so it reads the next chunk while the last one
//! is on the wire), then from the site-wide budget. Messages wait in a
//! queue this module owns, not in a channel inside tonic, so that a stream
//! whose client stops reading can be emptied: when a producer finds no room
//! in its own share for the stall timeout, the client has taken nothing for
//! that long, and the stream ends, its queued data is dropped, its budget
//! returns, and its connection is closed (the chunk HTTP/2 holds for it is
//! freed only with the connection). The same rule as NBD's reply timeout.
//!
//! The chunk a message was sent in stays charged until the stream is polled
//! again: hyper polls only once HTTP/2 has sent what it holds, so that is
//! when its memory is free.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tern_proto::v1 as pb;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::listen::ConnState;

/// What a message with no data is charged: a diff of a million tiny zero
/// runs must not queue without bound either.
const MESSAGE_OVERHEAD: usize = 64;

/// The site-wide budget.
#[derive(Debug)]
pub struct StreamBudget {
    sem: Arc<Semaphore>,
    total: usize,
    stall: Duration,
}

impl StreamBudget {
    /// `bytes` is raised to 32 MiB, so that any one chunk (8 MiB) fits.
    pub fn new(bytes: usize, stall: Duration) -> Arc<StreamBudget> {
        let total = bytes.max(32 << 20);
        Arc::new(StreamBudget {
            sem: Arc::new(Semaphore::new(total)),
            total,
            stall,
        })
    }

    /// Bytes charged to read streams now (for tests and /metrics).
    pub fn in_use(&self) -> usize {
        self.total - self.sem.available_permits()
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// A new stream whose messages are at most `chunk` bytes of data.
    /// `conn` is closed if the stream stalls.
    pub fn stream<T>(
        self: &Arc<Self>,
        chunk: usize,
        conn: Option<Arc<ConnState>>,
    ) -> (Tx<T>, Rx<T>) {
        let share = (2 * chunk.max(MESSAGE_OVERHEAD)).min(self.total / 2);
        let shared = Arc::new(StreamChannel {
            q: Mutex::new(Queue {
                items: VecDeque::new(),
                charged: 0,
                done: false,
                gone: false,
                stalled: false,
                held: false,
                last_take: tokio::time::Instant::now(),
                waker: None,
            }),
            space: Notify::new(),
        });
        (
            Tx {
                budget: self.clone(),
                shared: shared.clone(),
                share,
                conn,
            },
            Rx { shared, held: None },
        )
    }
}

/// A message a read stream sends: what it is charged is its data.
pub trait Charged: Send + 'static {
    fn data_len(&self) -> usize;
}

impl Charged for pb::DataChunk {
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl Charged for pb::JournalChunk {
    fn data_len(&self) -> usize {
        self.entries.len()
    }
}

struct Item<T> {
    msg: Option<Result<T, Status>>,
    cost: usize,
    _permit: Option<OwnedSemaphorePermit>,
}

struct Queue<T> {
    items: VecDeque<Item<T>>,
    /// Bytes of this stream reserved, queued or held by the receiver.
    charged: usize,
    /// The producer is done (dropped).
    done: bool,
    /// The receiver is gone (client cancelled, connection closed).
    gone: bool,
    /// The stream was ended for stalling; nothing more is queued.
    stalled: bool,
    /// The receiver holds a message HTTP/2 has not sent yet.
    held: bool,
    /// When the receiver last took a message (or the stream began).
    last_take: tokio::time::Instant,
    waker: Option<Waker>,
}

impl<T> Queue<T> {
    /// When the stream counts as stalled: `stall` after the client last
    /// took a message, if data is waiting for it; never if none is (a
    /// stream waiting for the site's budget is not at fault).
    fn deadline(&self, stall: Duration) -> Option<tokio::time::Instant> {
        (self.held || !self.items.is_empty()).then(|| self.last_take + stall)
    }
}

/// What the two ends of one stream share: its queue and the wakeup for
/// room freed in it.
struct StreamChannel<T> {
    q: Mutex<Queue<T>>,
    /// Room was freed in this stream's share, or the receiver went away.
    space: Notify,
}

impl<T> StreamChannel<T> {
    fn release(&self, cost: usize) {
        let mut q = self.q.lock();
        q.charged = q.charged.saturating_sub(cost);
        drop(q);
        self.space.notify_waiters();
    }
}

/// The producing side of a stream.
pub struct Tx<T> {
    budget: Arc<StreamBudget>,
    shared: Arc<StreamChannel<T>>,
    share: usize,
    conn: Option<Arc<ConnState>>,
}

/// Bytes a producer may fill, not yet queued.
pub struct Reserved<T> {
    shared: Arc<StreamChannel<T>>,
    permit: Option<OwnedSemaphorePermit>,
    left: usize,
}

impl<T> Drop for Reserved<T> {
    fn drop(&mut self) {
        if self.left > 0 {
            self.shared.release(self.left);
        }
    }
}

fn gone() -> Status {
    Status::cancelled("the client went away")
}

impl<T: Charged> Tx<T> {
    /// Whether the client went away (or the stream was ended).
    pub fn is_closed(&self) -> bool {
        let q = self.shared.q.lock();
        q.gone || q.stalled
    }

    /// Waits until `n` more bytes may be read for this stream: room in its
    /// own share (ending the stream if none comes within the stall
    /// timeout), then in the site's budget.
    pub async fn reserve(&self, n: usize) -> Result<Reserved<T>, Status> {
        let n = n.max(MESSAGE_OVERHEAD).min(self.share);
        loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut q = self.shared.q.lock();
                if q.gone || q.stalled {
                    return Err(gone());
                }
                if q.charged == 0 || q.charged + n <= self.share {
                    q.charged += n;
                    break;
                }
                q.deadline(self.budget.stall)
            };
            self.wait(notified, deadline).await?;
        }
        let mut r = Reserved {
            shared: self.shared.clone(),
            permit: None,
            left: n,
        };
        let acquire = self.budget.sem.clone().acquire_many_owned(n as u32);
        tokio::pin!(acquire);
        loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let q = self.shared.q.lock();
                if q.gone || q.stalled {
                    return Err(gone());
                }
                q.deadline(self.budget.stall)
            };
            tokio::select! {
                p = &mut acquire => {
                    r.permit = Some(p.expect("the budget's semaphore is never closed"));
                    return Ok(r);
                }
                w = self.wait(notified, deadline) => w?,
            }
        }
    }

    /// Waits for `notified`, or ends the stream as stalled at `deadline`
    /// if its client still has taken nothing by then.
    async fn wait(
        &self,
        notified: Pin<&mut tokio::sync::futures::Notified<'_>>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), Status> {
        let Some(at) = deadline else {
            notified.await;
            return Ok(());
        };
        if tokio::time::timeout_at(at, notified).await.is_ok() {
            return Ok(());
        }
        let still = self.shared.q.lock().deadline(self.budget.stall);
        if still.is_some_and(|d| d <= tokio::time::Instant::now()) {
            self.stall();
            return Err(Status::deadline_exceeded(format!(
                "the client took no data for {} s",
                self.budget.stall.as_secs()
            )));
        }
        Ok(())
    }

    /// Queues `msg` within a reservation (its data must fit what is left).
    pub fn push(&self, r: &mut Reserved<T>, msg: T) {
        let cost = msg.data_len().max(MESSAGE_OVERHEAD).min(r.left);
        let permit = match r.permit.as_mut() {
            Some(p) if cost < p.num_permits() => p.split(cost),
            _ => r.permit.take(),
        };
        r.left -= cost;
        self.enqueue(Item {
            msg: Some(Ok(msg)),
            cost,
            _permit: permit,
        });
    }

    /// Reserves room for `msg` and queues it.
    pub async fn send(&self, msg: T) -> Result<(), Status> {
        let mut r = self.reserve(msg.data_len()).await?;
        self.push(&mut r, msg);
        Ok(())
    }

    /// Ends the stream with an error (uncharged: it is small and last).
    pub fn fail(&self, e: Status) {
        self.enqueue(Item {
            msg: Some(Err(e)),
            cost: 0,
            _permit: None,
        });
    }

    fn enqueue(&self, item: Item<T>) {
        let mut q = self.shared.q.lock();
        if q.gone || q.stalled {
            let cost = item.cost;
            drop(q);
            drop(item);
            self.shared.release(cost);
            return;
        }
        if q.items.is_empty() && !q.held {
            // The stall clock starts when data starts waiting for the
            // client: a stream that waited long for the site's budget has
            // not kept its client waiting meanwhile.
            q.last_take = tokio::time::Instant::now();
        }
        q.items.push_back(item);
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }

    fn stall(&self) {
        let dropped = {
            let mut q = self.shared.q.lock();
            q.stalled = true;
            q.charged = 0;
            if let Some(w) = q.waker.take() {
                w.wake();
            }
            std::mem::take(&mut q.items)
        };
        drop(dropped);
        tracing::warn!(
            stall_secs = self.budget.stall.as_secs(),
            "a read stream's client took no data: stream ended and its connection closed"
        );
        if let Some(c) = &self.conn {
            c.kill();
        }
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        let mut q = self.shared.q.lock();
        q.done = true;
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }
}

/// The stream tonic sends from.
pub struct Rx<T> {
    shared: Arc<StreamChannel<T>>,
    held: Option<Item<T>>,
}

impl<T: Unpin> futures::Stream for Rx<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Polled again: HTTP/2 has sent what the last message held.
        if let Some(h) = this.held.take() {
            let cost = h.cost;
            drop(h);
            this.shared.release(cost);
        }
        let mut q = this.shared.q.lock();
        q.held = false;
        q.last_take = tokio::time::Instant::now();
        if let Some(mut item) = q.items.pop_front() {
            q.held = true;
            let msg = item.msg.take();
            drop(q);
            this.held = Some(item);
            return Poll::Ready(msg);
        }
        if q.stalled || q.done {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Drop for Rx<T> {
    fn drop(&mut self) {
        let items = {
            let mut q = self.shared.q.lock();
            q.gone = true;
            q.charged = 0;
            std::mem::take(&mut q.items)
        };
        drop(items);
        self.held = None;
        self.shared.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn chunk(n: usize) -> pb::DataChunk {
        pb::DataChunk {
            offset: 0,
            length: n as u64,
            zero: false,
            data: vec![7; n].into(),
        }
    }

    #[tokio::test]
    async fn share_and_budget_bound_what_is_queued() {
        let b = StreamBudget::new(32 << 20, Duration::from_secs(60));
        let (tx, mut rx) = b.stream::<pb::DataChunk>(4 << 20, None);
        // Two chunks fit this stream's share; the third waits for a read.
        tx.send(chunk(4 << 20)).await.unwrap();
        tx.send(chunk(4 << 20)).await.unwrap();
        assert_eq!(b.in_use(), 8 << 20);
        let third = tokio::time::timeout(Duration::from_millis(100), tx.send(chunk(4 << 20)));
        assert!(third.await.is_err(), "a third chunk did not wait");
        assert_eq!(rx.next().await.unwrap().unwrap().data.len(), 4 << 20);
        // Taken but held until the next poll.
        assert_eq!(b.in_use(), 8 << 20);
        assert_eq!(rx.next().await.unwrap().unwrap().data.len(), 4 << 20);
        assert_eq!(b.in_use(), 4 << 20);
        drop(tx);
        assert!(rx.next().await.is_none());
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn a_stalled_stream_gives_everything_back() {
        let b = StreamBudget::new(32 << 20, Duration::from_millis(200));
        let (tx, rx) = b.stream::<pb::DataChunk>(8 << 20, None);
        tx.send(chunk(8 << 20)).await.unwrap();
        tx.send(chunk(8 << 20)).await.unwrap();
        let e = tx.send(chunk(8 << 20)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(b.in_use(), 0);
        assert!(tx.is_closed());
        drop(rx);
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn unread_streams_holding_the_whole_budget_are_ended() {
        // Each stream's one chunk was taken into HTTP/2 and never sent:
        // all wait for the site's budget, none for its own share. The
        // waiting must not last forever.
        let b = StreamBudget::new(32 << 20, Duration::from_millis(300));
        let mut streams = Vec::new();
        for _ in 0..4 {
            let (tx, mut rx) = b.stream::<pb::DataChunk>(8 << 20, None);
            tx.send(chunk(8 << 20)).await.unwrap();
            assert!(rx.next().await.is_some());
            streams.push((tx, rx));
        }
        assert_eq!(b.in_use(), 32 << 20);
        let t = std::time::Instant::now();
        let e = streams[0].0.send(chunk(8 << 20)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(t.elapsed() < Duration::from_secs(2));
        // Its held chunk goes with its receiver (the closed connection).
        drop(streams.remove(0));
        assert_eq!(b.in_use(), 24 << 20);
    }

    #[tokio::test]
    async fn a_long_wait_for_the_budget_is_not_a_stall() {
        // A stream that waited longer than the stall timeout for the
        // site's budget, then queued a chunk its client has not had a
        // chance to take yet, is not stalled.
        let b = StreamBudget::new(32 << 20, Duration::from_millis(200));
        let (hog1, _rx1) = b.stream::<pb::DataChunk>(16 << 20, None);
        let (hog2, _rx2) = b.stream::<pb::DataChunk>(16 << 20, None);
        hog1.send(chunk(16 << 20)).await.unwrap();
        hog2.send(chunk(16 << 20)).await.unwrap();
        let (tx, mut rx) = b.stream::<pb::DataChunk>(16 << 20, None);
        let late = tokio::spawn(async move {
            tx.send(chunk(16 << 20)).await?;
            tx.send(chunk(16 << 20)).await?;
            Ok::<_, Status>(tx)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A hog whose client never read is ended; its budget goes to the
        // late stream, whose client then reads at once.
        assert!(hog1.send(chunk(16 << 20)).await.is_err());
        // The producer runs first: it queues and asks for more before its
        // client has polled once.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(rx.next().await.is_some());
        assert!(rx.next().await.is_some());
        let _tx = late.await.unwrap().expect("the late stream was ended");
    }

    #[tokio::test]
    async fn streams_wait_for_the_budget_not_fail() {
        let b = StreamBudget::new(32 << 20, Duration::from_secs(60));
        let (tx1, mut rx1) = b.stream::<pb::DataChunk>(8 << 20, None);
        let (tx2, mut rx2) = b.stream::<pb::DataChunk>(8 << 20, None);
        let (tx3, _rx3) = b.stream::<pb::DataChunk>(8 << 20, None);
        for tx in [&tx1, &tx2] {
            tx.send(chunk(8 << 20)).await.unwrap();
            tx.send(chunk(8 << 20)).await.unwrap();
        }
        assert_eq!(b.in_use(), 32 << 20);
        let waiting = tokio::spawn(async move {
            tx3.send(chunk(8 << 20)).await.unwrap();
            tx3
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the budget was exceeded");
        // Reading one stream to its end frees room for the third.
        drop(tx1);
        while rx1.next().await.is_some() {}
        let _tx3 = waiting.await.unwrap();
        assert_eq!(b.in_use(), (32 << 20) - (8 << 20));
        drop(tx2);
        while rx2.next().await.is_some() {}
    }

    #[tokio::test]
    async fn a_gone_receiver_ends_the_producer() {
        let b = StreamBudget::new(32 << 20, Duration::from_secs(60));
        let (tx, rx) = b.stream::<pb::DataChunk>(8 << 20, None);
        tx.send(chunk(8 << 20)).await.unwrap();
        tx.send(chunk(8 << 20)).await.unwrap();
        let blocked = tokio::spawn(async move { tx.send(chunk(8 << 20)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(rx);
        let e = blocked.await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Cancelled);
        assert_eq!(b.in_use(), 0);
    }
}
