//! Group commit: concurrent appenders share one `fdatasync`.
//!
//! Leader/follower, no extra thread. Appenders copy their entry into the
//! journal's in-memory buffer (cheap, under the writer lock) and then ask
//! for durability up to their tid. If nobody is syncing, the caller becomes
//! the leader: it writes out the whole buffer (every entry appended so far,
//! its own and its followers') and syncs the segment once. Callers that
//! arrive while a sync runs wait on the condvar; when it ends they either
//! find their tid covered or one of them leads the next round, carrying
//! everything that queued up meanwhile. Under load a sync therefore covers
//! as many entries as arrived during the previous one.
//!
//! The same condvar wakes readers blocked in `wait_for`: entries become
//! visible to readers only once durable, so a peer never replicates an
//! entry that a crash could still take away.

use parking_lot::{Condvar, Mutex};
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct SyncState {
    /// Every entry with tid <= durable is on stable storage.
    durable: u64,
    syncing: bool,
    /// A sync failed: the kernel may have dropped the pages, so nothing
    /// after this can be promised durable again.
    failed: Option<String>,
    syncs: u64,
    /// A `wait_for` caller asked to be woken early (the journal is closing).
    closed: bool,
}

#[derive(Debug, Default)]
pub struct GroupCommit {
    m: Mutex<SyncState>,
    cv: Condvar,
}

/// Counters for benchmarks and `journal status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    pub durable_tid: u64,
    pub syncs: u64,
}

impl GroupCommit {
    pub fn new(durable: u64) -> GroupCommit {
        GroupCommit {
            m: Mutex::new(SyncState {
                durable,
                ..Default::default()
            }),
            cv: Condvar::new(),
        }
    }

    pub fn stats(&self) -> CommitStats {
        let g = self.m.lock();
        CommitStats {
            durable_tid: g.durable,
            syncs: g.syncs,
        }
    }

    pub fn durable(&self) -> u64 {
        self.m.lock().durable
    }

    /// Returns once every entry up to `tid` is durable. `write_out` writes
    /// the buffered entries to the current segment and returns that file
    /// and the last tid now in it; it runs only in the leader.
    pub fn sync_to(
        &self,
        tid: u64,
        write_out: impl Fn() -> io::Result<(Arc<File>, u64)>,
    ) -> io::Result<()> {
        let mut g = self.m.lock();
        loop {
            if let Some(msg) = &g.failed {
                return Err(io::Error::other(msg.clone()));
            }
            if g.durable >= tid {
                return Ok(());
            }
            if g.syncing {
                self.cv.wait(&mut g);
                continue;
            }
            g.syncing = true;
            drop(g);
            // Outside the lock: followers queue up while we sync.
            let r = write_out().and_then(|(file, last)| file.sync_data().map(|()| last));
            g = self.m.lock();
            g.syncing = false;
            g.syncs += 1;
            match r {
                Ok(last) => {
                    g.durable = g.durable.max(last);
                    self.cv.notify_all();
                }
                Err(e) => {
                    g.failed = Some(format!("journal sync failed earlier: {e}"));
                    self.cv.notify_all();
                    return Err(e);
                }
            }
        }
    }

    /// Records entries made durable by someone else (a segment roll, or a
    /// replay at open that found them on disk).
    pub fn mark_durable(&self, tid: u64) {
        let mut g = self.m.lock();
        if tid > g.durable {
            g.durable = tid;
            self.cv.notify_all();
        }
    }

    /// Blocks until an entry after `after` is durable or `timeout` passes;
    /// returns the last durable tid.
    pub fn wait_for(&self, after: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut g = self.m.lock();
        while g.durable <= after && !g.closed && g.failed.is_none() {
            if self.cv.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.durable
    }

    /// Wakes every waiter for good (journal removed or disabled).
    pub fn close(&self) {
        self.m.lock().closed = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn followers_share_syncs() {
        let t = tempfile::tempdir().unwrap();
        let f = Arc::new(File::create(t.path().join("f")).unwrap());
        let gc = Arc::new(GroupCommit::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gc, next, f) = (gc.clone(), next.clone(), f.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let tid = next.fetch_add(1, Ordering::SeqCst) + 1;
                        gc.sync_to(tid, || Ok((f.clone(), next.load(Ordering::SeqCst))))
                            .unwrap();
                        assert!(gc.durable() >= tid);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = gc.stats();
        assert_eq!(s.durable_tid, 400);
        assert!(s.syncs <= 400);
        assert_eq!(gc.wait_for(400, Duration::from_millis(10)), 400);
        assert_eq!(gc.wait_for(0, Duration::from_secs(10)), 400);
    }
}
