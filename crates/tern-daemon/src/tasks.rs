//! One lifecycle for a daemon's background tasks. Every long-lived task
//! (listeners and their connections, schedules, lock renewers, replayers)
//! is spawned on the process's [`Tasks`]; a stop request reaches all of
//! them through one token, and shutdown waits for them, boundedly, before
//! the process puts its store away.

use std::future::Future;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// How long shutdown waits for tasks to finish before it goes on without
/// them: long enough for in-flight requests to be answered and streams to
/// close, short enough for a service manager's stop timeout (systemd's
/// default is 90 s).
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

/// The tasks of one process and the token that asks them to stop. Cheap
/// to clone: clones share both.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns a task that ends by itself once [`Tasks::stopping`] completes
    /// (a listener's graceful shutdown, a loop that finishes its step).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Spawns a task that is dropped at its next await once a stop is
    /// asked: for work with nothing to put away, which a restart resumes.
    pub fn spawn_until_stop<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(stop.run_until_cancelled_owned(task))
    }

    /// Completes once a stop was asked.
    pub fn stopping(&self) -> WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Asks every task to stop.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Asks for a stop on the first SIGTERM or SIGINT.
    pub fn stop_on_signal(&self) {
        let tasks = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => tasks.stop(),
                _ = tasks.stopping() => {}
            }
        });
    }

    /// Asks every task to stop and waits until they have ended, at most
    /// `bound`. Returns how many were still running then.
    pub async fn shutdown(&self, bound: Duration) -> usize {
        self.stop();
        self.tracker.close();
        match tokio::time::timeout(bound, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_and_waits() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopping = tasks.stopping();
        tasks.spawn(async move {
            stopping.await;
            // Puts something away after the stop, before it ends.
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(()).expect("receiver");
        });
        let forever = tasks.spawn_until_stop(std::future::pending::<()>());
        assert_eq!(tasks.shutdown(Duration::from_secs(5)).await, 0);
        rx.await.expect("the task finished its work");
        assert_eq!(forever.await.expect("joined"), None);
    }

    #[tokio::test]
    async fn shutdown_is_bounded() {
        let tasks = Tasks::new();
        tasks.spawn(std::future::pending::<()>());
        let left = tasks.shutdown(Duration::from_millis(50)).await;
        assert_eq!(left, 1);
    }
}
