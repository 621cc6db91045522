//! The journal's tunables and their defaults (the one place they are
//! written down; the daemon's `rbd_journal_*` options map onto them).

use serde::{Deserialize, Serialize};

/// Default [`JournalOptions::segment_size`] (`rbd_journal_object_size`).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;
/// Default [`JournalOptions::max_size`] (`rbd_journal_max_size`).
pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;
/// Default [`JournalOptions::checkpoint_bytes`].
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 256 << 20;
/// Default [`JournalOptions::commit_age_us`] (`rbd_journal_commit_age`).
pub const DEFAULT_COMMIT_AGE_US: u64 = 5000;
/// Smallest [`JournalOptions::segment_size`] a site accepts: smaller
/// segments would cost a file per few entries.
pub const MIN_SEGMENT_SIZE: u64 = 64 << 10;
/// Smallest [`JournalOptions::max_size`] a site accepts.
pub const MIN_MAX_SIZE: u64 = 1 << 20;

pub use tern_types::journal::JournalDurability;

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
            segment_size: DEFAULT_SEGMENT_SIZE,
            max_size: DEFAULT_MAX_SIZE,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            durability: JournalDurability::Strict,
            commit_age_us: DEFAULT_COMMIT_AGE_US,
        }
    }
}
