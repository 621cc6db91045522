//! What the two tern daemons, `ternd` and `tern-mirror`, share as
//! long-running processes: how they log, how their background tasks live
//! and stop (one [`Tasks`] per process, stopped in order on SIGTERM or
//! SIGINT), and the small unauthenticated metrics listener.

pub mod http;
pub mod log;
pub mod metrics;
mod tasks;

pub use tasks::{SHUTDOWN_BOUND, Tasks};
