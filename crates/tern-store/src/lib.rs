//! The on-disk site store: pools, images and their data, synchronously.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/meta.redb                         metadata (redb), see `meta`
//! <dir>/clean                             present only after a clean shutdown
//! <dir>/objects/<image id>/<object no>    one sparse file per object (the head),
//!                                         object no as 16 lowercase hex
//! <dir>/objects/<image id>/<no>.<snap>    a clone: object `no` as it was before
//!                                         the first write in epoch `snap` (16 hex)
//! ```
//!
//! * `meta.redb` holds every table (pools, images, site/users/config
//!   key-values) and a `format` version; a store written by a newer format
//!   is refused with [`StoreError::FormatTooNew`]. Records are JSON so new
//!   fields can be added compatibly. Each change is one durable transaction.
//! * An image's data directory is named by its id, so renames never touch
//!   data. It is created on the first write, and each object file on the
//!   first write to that object: a missing directory or file reads as zeros,
//!   as do holes inside files.
//! * Every object file starts with a 4096-byte header page (magic, version,
//!   feature bits, object number, image id, crc32c, then the snapshot
//!   extension: clone bookkeeping, write intent and the chunk epoch map, see
//!   [`header`]); data byte `k` of the object is at file offset `4096 + k`.
//!
//! # Snapshots
//!
//! O(1) to create (a flush and one metadata transaction); copy-on-write per
//! object at its first mutation afterwards (`cow`); diffs from per-chunk
//! epoch maps (`dirty`, `diff`); metadata operations in `snap`.
//!
//! # Crash behaviour
//!
//! * A new image exists once its metadata commit returns; its data directory
//!   appears later, so a crash leaves nothing to clean.
//! * Removal deletes the metadata first (one transaction), then the data
//!   directory. A crash in between leaves an orphan directory, which
//!   [`Store::open`] deletes. Open does nothing else.
//! * Data follows the disk contract: a write is durable once a later
//!   [`Image::flush`] returns, or at once with FUA.
//! * Dirty tracking survives a crash: open removes the `clean` marker, and
//!   after an open without it, objects whose write intent is of the current
//!   epoch and from an earlier opening are reported wholly changed. The
//!   marker is written when the store is dropped (or [`Store::close`]d)
//!   with nothing mutated since a successful [`Store::flush_all`].
//!
//! # Journaling
//!
//! Images with the `journaling` feature keep a write-ahead log of every
//! mutation in `objects/<image id>/journal/`: see [`journal`]. Their writes
//! are durable when acknowledged (group commit), their object files are
//! synced only at checkpoints, and an open replays what the last
//! checkpoint does not cover. [`Store::image_set_features`] turns the
//! feature on and off on a live image.

mod cow;
mod diff;
mod dirty;
pub mod error;
mod extent;
mod features;
pub mod header;
mod image;
pub mod journal;
mod meta;
mod object;
mod replay;
mod snap;
mod store;
pub mod testpoint;
mod types;

pub use diff::DiffExtent;
pub use error::StoreError;
pub use image::Image;
pub use journal::{
    ClientInfo, InspectReport, Journal, JournalDurability, JournalEntry, JournalInfo, JournalOp,
    JournalOptions, SegmentInfo, Ticket,
};
pub use meta::FORMAT_VERSION;
pub use store::{DEFAULT_FD_CAP, Store, fd_cap_for_limit};
pub use types::{
    CreateOpts, ImageInfo, KvTable, MAX_IMAGE_SIZE, MirrorSnap, MirrorSnapState, PoolInfo,
    PoolStats, SnapInfo, SnapNamespace,
};
