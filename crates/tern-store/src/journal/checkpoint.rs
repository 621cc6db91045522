//! The applied checkpoint: "every entry up to tid X is in the object files
//! durably". When one is due, and the order that makes recording it safe.

use super::clients::Clients;
use super::writer::Log;
use crate::error::StoreError;
use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// A flush checkpoints if the last checkpoint is older than this.
const CHECKPOINT_AGE: Duration = Duration::from_secs(30);

/// A lazy checkpoint is due: enough bytes since the last one, or (at a
/// flush) enough time.
pub(super) fn due(log: &Log, at_flush: bool) -> bool {
    let w = log.w.lock();
    let o = log.options();
    // A journal capped small must checkpoint (and so trim) well before
    // the cap, or nothing could ever be trimmed in time.
    let every = o.checkpoint_bytes.min(o.max_size / 4).max(1);
    w.since_checkpoint >= every
        || (at_flush && w.since_checkpoint > 0 && w.last_checkpoint.elapsed() >= CHECKPOINT_AGE)
}

/// One checkpoint at a time.
#[derive(Default)]
pub(super) struct Checkpoint {
    one: Mutex<()>,
}

impl Checkpoint {
    /// Runs a checkpoint: `sync_objects` must make every applied write
    /// durable in the object files. With `wait` false, gives up at once if
    /// another checkpoint is running. Trims afterwards.
    pub(super) fn run(
        &self,
        log: &Log,
        clients: &Clients,
        wait: bool,
        sync_objects: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _g = if wait {
            self.one.lock()
        } else {
            match self.one.try_lock() {
                Some(g) => g,
                None => return Ok(()),
            }
        };
        let x = log.applied_watermark();
        if x <= clients.checkpoint() {
            return Ok(());
        }
        {
            let mut w = log.w.lock();
            w.since_checkpoint = 0;
            w.last_checkpoint = Instant::now();
        }
        // The journal first: an object file must never hold a write whose
        // entry a crash could lose, or peers would miss it.
        log.sync_to(x)?;
        sync_objects()?;
        crate::testpoint::reached("journal-checkpoint-record");
        clients.record_checkpoint(x)?;
        crate::testpoint::reached("journal-checkpoint-trim");
        clients.trim()
    }
}
