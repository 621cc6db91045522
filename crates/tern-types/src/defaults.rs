//! Defaults of options that more than one crate reads: the site keeps the
//! option (`tern config`), and a daemon needs the same value before it has
//! asked the site.

/// `rbd_mirror_memory_target`: bytes of unapplied replay data a mirror
/// daemon may hold.
pub const MIRROR_MEMORY_TARGET: u64 = 256 << 20;

/// `rbd_mirror_concurrent_image_syncs`: images a mirror daemon fully syncs
/// at once.
pub const MIRROR_CONCURRENT_IMAGE_SYNCS: u64 = 5;
