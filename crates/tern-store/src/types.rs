//! The store's plain records: what pools, images and snapshots are, as
//! the metadata keeps them and callers see them. Every layer uses these;
//! they use nothing of the store.

use serde::{Deserialize, Serialize};
use tern_types::{Features, ImageId, Layout};

/// Largest image size: 2^60 bytes, so every offset arithmetic fits in u64
/// with room to spare.
pub const MAX_IMAGE_SIZE: u64 = 1 << 60;
/// Small tables whose meaning belongs to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvTable {
    Site,
    Users,
    Config,
    /// Mirroring: pool modes, peers, per-image mirror state, status reports.
    Mirror,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateOpts {
    pub size: u64,
    pub layout: Layout,
    pub features: Features,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub application: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Visible images (hidden `.name` images are not counted here, but their
    /// bytes and objects are).
    pub images: u64,
    pub provisioned_bytes: u64,
    pub used_bytes: u64,
    pub objects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: ImageId,
    pub pool: String,
    pub name: String,
    pub size: u64,
    pub layout: Layout,
    pub features: Features,
    /// Unix seconds.
    pub created: u64,
    pub modified: u64,
    /// Snapshots of the image (user and mirror).
    #[serde(default)]
    pub snap_count: u64,
}

pub(crate) use tern_types::time::now_secs;

/// A snapshot of an image. Ids are per image and strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub namespace: SnapNamespace,
    /// Image size when the snapshot was taken; bounds reads of it.
    pub size: u64,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub protected: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapNamespace {
    #[default]
    User,
    Mirror(MirrorSnap),
}

/// State of a mirror snapshot, as rbd keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MirrorSnap {
    pub state: MirrorSnapState,
    pub complete: bool,
    pub mirror_peer_uuids: Vec<String>,
    pub primary_mirror_uuid: String,
    pub primary_snap_id: u64,
    pub last_copied_object_number: u64,
}

pub use tern_types::mirror::MirrorSnapState;
