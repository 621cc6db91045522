//! The values a site's API takes and gives, as plain Rust: what tern-client
//! returns to the CLI, the mirror daemon and the tests, and what the site's
//! status policy builds. Their wire form and the conversions live in
//! tern-proto; an empty string or zero here means what it means on the wire
//! (documented in `tern.proto`).

use crate::ImageSpec;
use crate::journal::JournalDurability;
use crate::mirror::{
    ImageMirrorMode, ImageMirrorState, MirrorHealth, MirrorSnapState, MirrorStatusState,
    PeerDirection, PoolMirrorMode, SnapNamespaceType, StatusReason,
};
use crate::site::{Health, Profile};
use bytes::Bytes;
use std::collections::BTreeMap;

// Site.

#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub api_version: u32,
    pub site_id: String,
    pub site_name: String,
    pub version: String,
    /// Who the site thinks we are.
    pub entity: String,
    pub profile: Profile,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteStatus {
    pub site_id: String,
    pub site_name: String,
    pub health: Health,
    pub health_checks: Vec<String>,
    pub version: String,
    pub uptime_secs: u64,
    pub pools: u64,
    pub images: u64,
    pub provisioned_bytes: u64,
    pub used_bytes: u64,
    pub avail_bytes: u64,
    pub total_bytes: u64,
    pub endpoints: Vec<String>,
    /// Empty: NBD is off.
    pub nbd_endpoint: String,
}

// Pools and images.

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolInfo {
    pub id: u64,
    pub name: String,
    pub application: String,
    pub created: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStats {
    pub pool: String,
    pub images: u64,
    pub provisioned_bytes: u64,
    pub used_bytes: u64,
    pub objects: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// A new image. Zero sizes take the site's defaults; no features, the
/// site's default features.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageCreate {
    pub pool: String,
    pub image: String,
    pub size: u64,
    pub object_size: u64,
    pub stripe_unit: u64,
    pub stripe_count: u64,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInfo {
    pub pool: String,
    pub name: String,
    pub id: String,
    pub size: u64,
    pub object_size: u64,
    pub stripe_unit: u64,
    pub stripe_count: u64,
    pub features: u64,
    pub feature_names: Vec<String>,
    pub created: u64,
    pub modified: u64,
    pub objects: u64,
    pub used_bytes: u64,
    pub snapshot_count: u64,
    /// Set when the info is of a snapshot.
    pub snap: String,
    pub protected: bool,
    pub snap_id: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checksums {
    pub size: u64,
    pub chunk_size: u64,
    pub hashes: Vec<Vec<u8>>,
}

// Data.

/// A piece of an image on the data streams: bytes, or a run of zeros.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataChunk {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
    pub data: Bytes,
}

/// What `ReadStream` sends: a range of an image or snapshot, or (with
/// `diff`) only what changed since `diff_from`, plus the `extra` ranges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadStream {
    pub image: ImageSpec,
    pub offset: u64,
    /// 0: to the end.
    pub length: u64,
    /// 0: 4 MiB.
    pub chunk_size: u32,
    pub diff: bool,
    pub diff_from: String,
    pub whole_object: bool,
    pub extra: Vec<DiffExtent>,
}

/// The first message of a write stream: what it writes into.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteOpen {
    /// A new image, created hidden and shown at commit.
    pub create: Option<ImageCreate>,
    /// Without `create`: an existing image.
    pub image: Option<ImageSpec>,
    pub lock_cookie: String,
    /// Apply an export-diff, all of it or nothing.
    pub diff: Option<DiffTarget>,
    /// Mirror daemon only: write into a non-primary image during a sync.
    pub mirror_sync: bool,
    pub expect_epoch: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiffTarget {
    pub from_snap: String,
    pub to_snap: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WriteMessage {
    Open(Box<WriteOpen>),
    Chunk(DataChunk),
    /// `final_size` 0 keeps the size; `total_bytes` is checked.
    Commit {
        final_size: u64,
        total_bytes: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Written {
    pub bytes_written: u64,
    pub bytes_zero: u64,
    pub image: Option<ImageInfo>,
}

// Journals.

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalSegment {
    pub segno: u64,
    pub first_tid: u64,
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalClientInfo {
    pub id: String,
    pub commit_tid: u64,
    pub disconnected: bool,
    pub entries_behind: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalInfo {
    pub image_id: String,
    pub segments: Vec<JournalSegment>,
    pub bytes: u64,
    pub first_tid: u64,
    pub last_tid: u64,
    pub durable_tid: u64,
    pub applied_tid: u64,
    pub clients: Vec<JournalClientInfo>,
    pub segment_size: u64,
    pub max_size: u64,
    pub durability: JournalDurability,
    pub syncs: u64,
    pub commit_age: f64,
    pub splay_width: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalInspect {
    pub segments: u64,
    pub entries: u64,
    pub bytes: u64,
    /// 0: none.
    pub first_tid: u64,
    pub last_tid: u64,
    pub counts: BTreeMap<String, u64>,
    pub errors: Vec<String>,
}

/// Whole encoded entries, in tid order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalChunk {
    pub entries: Vec<u8>,
    pub first_tid: u64,
    pub last_tid: u64,
    pub durable_tid: u64,
}

// Snapshots and diffs.

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub created: u64,
    pub protected: bool,
    pub namespace: SnapNamespaceType,
    /// Mirror snapshots only.
    pub mirror_state: Option<MirrorSnapState>,
    pub mirror_complete: bool,
    pub mirror_peer_uuids: Vec<String>,
    pub primary_snap_id: u64,
    pub primary_mirror_uuid: String,
}

impl SnapInfo {
    /// The mirror state as rbd prints it; empty for user snapshots.
    pub fn mirror_state_word(&self) -> &'static str {
        self.mirror_state.map_or("", MirrorSnapState::as_str)
    }

    /// A complete mirror snapshot in one of `states`.
    pub fn is_complete_mirror(&self, states: impl Fn(MirrorSnapState) -> bool) -> bool {
        self.mirror_complete && self.mirror_state.is_some_and(states)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiffRequest {
    /// `image.snap`: the end point (none: the head).
    pub image: ImageSpec,
    /// Empty: from an empty image.
    pub from_snap: String,
    pub whole_object: bool,
    pub offset: u64,
    /// 0: to the end.
    pub length: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub length: u64,
    pub data: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    pub extents: Vec<DiffExtent>,
    pub size: u64,
    pub granularity: u64,
}

// Locks, users and config.

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LockInfo {
    /// client.NAME
    pub locker: String,
    /// The cookie.
    pub id: String,
    pub address: String,
    pub age_secs: u64,
    pub lease_ms: u64,
    pub expires_in_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthEntity {
    pub entity: String,
    pub key: String,
    pub caps: BTreeMap<String, String>,
    pub profile: Profile,
    pub created: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigEntry {
    pub who: String,
    pub key: String,
    pub value: String,
}

// Mirroring.

/// A peer site of a pool (sites keep it as a JSON record).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MirrorPeer {
    pub uuid: String,
    pub site_name: String,
    pub client_name: String,
    pub direction: PeerDirection,
    /// The remote site's mirror uuid for this pool.
    #[serde(default)]
    pub mirror_uuid: String,
    pub fsid: String,
    pub mon_host: Vec<String>,
    pub tls_fingerprint: String,
    pub remote_pool: String,
    /// Only to the local mirror daemon and admins.
    pub key: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorPoolInfo {
    pub pool: String,
    pub mode: PoolMirrorMode,
    pub site_name: String,
    pub mirror_uuid: String,
    pub peers: Vec<MirrorPeer>,
    pub fsid: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootstrapImport {
    pub pool: String,
    /// This site's name (set if the pool has none).
    pub site_name: String,
    pub direction: PeerDirection,
    pub token: String,
    /// Empty: the token's pool.
    pub remote_pool: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerRegistered {
    pub peer: Option<MirrorPeer>,
    pub mirror_uuid: String,
    pub site_name: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorImageInfo {
    pub pool: String,
    pub name: String,
    pub global_id: String,
    pub mode: ImageMirrorMode,
    pub state: ImageMirrorState,
    pub primary: bool,
    pub epoch: u64,
    pub mirror_snaps: Vec<SnapInfo>,
    pub size: u64,
    pub object_size: u64,
    pub stripe_unit: u64,
    pub stripe_count: u64,
    pub features: u64,
    pub image_id: String,
    pub demoted: bool,
    pub journal_primary_uuid: String,
    pub journal_tid: u64,
    pub journal_skip_to: String,
    pub primary_mirror_uuid: String,
    pub resync_requested: bool,
    pub fork_mirror_uuid: String,
    pub fork_journal_tid: u64,
    pub fork_snap_id: u64,
    pub fork_forced: bool,
    pub fork_data_as_of_us: u64,
    pub fork_at: u64,
    pub last_resync: String,
    pub resync_full: bool,
    pub primary_epoch: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorImageList {
    pub images: Vec<MirrorImageInfo>,
    pub mirror_uuid: String,
    pub site_name: String,
}

/// What one site's mirror daemon says of an image (sites keep it as a
/// JSON record).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MirrorSiteStatus {
    pub site_name: String,
    pub mirror_uuids: String,
    /// The daemon is up (rbd's `up+` / `down+`).
    pub up: bool,
    pub state: MirrorStatusState,
    /// Ceph's words: "replaying, {json}", "local image is primary".
    pub description: String,
    /// Unix seconds.
    pub last_update: u64,
    pub reason: StatusReason,
    pub lag_seconds: f64,
    pub last_sync: u64,
    /// 0..1 while syncing.
    pub progress: f64,
    pub daemon_id: String,
    pub bytes_synced: u64,
}

impl MirrorSiteStatus {
    /// rbd's compound state, `up+replaying`.
    pub fn state_label(&self) -> String {
        crate::mirror::status_state(self.up, self.state)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorImageStatus {
    pub name: String,
    pub global_id: String,
    pub local: MirrorSiteStatus,
    pub peer_sites: Vec<MirrorSiteStatus>,
    pub daemon_id: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorDaemonInfo {
    pub service_id: String,
    pub instance_id: String,
    pub client_id: String,
    pub hostname: String,
    pub version: String,
    pub last_heartbeat: u64,
    pub up: bool,
    pub health: MirrorHealth,
    pub site_name: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorPoolStatus {
    pub health: MirrorHealth,
    pub daemon_health: MirrorHealth,
    pub image_health: MirrorHealth,
    /// Images per state word.
    pub states: BTreeMap<String, u64>,
    pub daemons: Vec<MirrorDaemonInfo>,
    pub images: Vec<MirrorImageStatus>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusReport {
    /// The pool on the called site.
    pub pool: String,
    pub global_id: String,
    /// `site_name`: the reporting daemon's site.
    pub status: MirrorSiteStatus,
    pub daemon: Option<MirrorDaemonInfo>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageAdopt {
    pub pool: String,
    pub name: String,
    pub global_id: String,
    pub mode: ImageMirrorMode,
    pub size: u64,
    pub object_size: u64,
    pub stripe_unit: u64,
    pub stripe_count: u64,
    pub features: u64,
    pub primary_mirror_uuid: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncBegin {
    pub image: ImageSpec,
    pub snap_name: String,
    pub primary_mirror_uuid: String,
    pub primary_snap_id: u64,
    pub size: u64,
    /// The primary snapshot marks a demotion.
    pub demoted: bool,
    /// The local image's epoch when the daemon's work began (a fence).
    pub expect_epoch: Option<u64>,
    pub primary_epoch: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncProgress {
    pub image: ImageSpec,
    pub snap_id: u64,
    pub last_copied_object_number: u64,
    /// At completion of a resync: what it did.
    pub resync_summary: String,
    pub expect_epoch: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncState {
    pub primary_snap_id: u64,
    pub last_copied_object_number: u64,
    pub resumed: bool,
    pub primary_mirror_uuid: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotAck {
    pub pool: String,
    pub global_id: String,
    pub peer_mirror_uuid: String,
    pub primary_snap_id: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalApply {
    pub image: ImageSpec,
    pub primary_mirror_uuid: String,
    pub entries: Vec<u8>,
    pub persist: bool,
    pub expect_epoch: Option<u64>,
    pub primary_epoch: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalApplied {
    pub last_tid: u64,
    pub last_timestamp_us: u64,
    pub entries: u64,
    pub bytes: u64,
    pub demoted: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalPosition {
    pub image: ImageSpec,
    pub primary_mirror_uuid: String,
    /// 0: no position.
    pub tid: u64,
    pub skip_to: String,
    /// The primary's time (unix µs) of entry `tid`.
    pub timestamp_us: u64,
    pub expect_epoch: Option<u64>,
}

/// A mirror snapshot schedule, or (listing) the level to list at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schedule {
    pub pool: String,
    /// Empty: pool level.
    pub image: String,
    /// 15m, 1h, 1d.
    pub interval: String,
    /// HH:MM:SS UTC, optional.
    pub start_time: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduledSnapshot {
    pub image: String,
    pub time: u64,
}
