//! Every conversion between the wire messages and the plain values of
//! `tern_types` (its `api`, `mirror`, `site` and `journal` modules). The
//! client decodes replies and encodes requests here; the site does the
//! reverse with the same code.

use crate::v1 as pb;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use tern_types::ImageSpec;
use tern_types::api::*;
use tern_types::error::Error;
use tern_types::journal::{JournalClientAction, JournalDurability};
use tern_types::mirror::{
    ImageMirrorMode, ImageMirrorState, MirrorHealth, MirrorSnapState, MirrorStatusState,
    PeerDirection, PoolMirrorMode, SnapNamespaceType, StatusReason,
};
use tern_types::site::{Health, Profile};

/// A value read off the wire; refused (InvalidArgument) when the wire form
/// says nothing valid, such as an unknown or unspecified enum.
pub trait FromWire<W>: Sized {
    fn from_wire(w: W) -> Result<Self, Error>;
}

/// A value put on the wire.
pub trait IntoWire<W> {
    fn into_wire(self) -> W;
}

macro_rules! same {
    ($($t:ty),*) => {$(
        impl FromWire<$t> for $t {
            fn from_wire(w: $t) -> Result<Self, Error> {
                Ok(w)
            }
        }
        impl IntoWire<$t> for $t {
            fn into_wire(self) -> $t {
                self
            }
        }
    )*};
}
same!(u64, u32, bool, f64, String, Bytes, Vec<u8>);

impl<W, T: FromWire<W>> FromWire<Vec<W>> for Vec<T> {
    fn from_wire(w: Vec<W>) -> Result<Self, Error> {
        w.into_iter().map(T::from_wire).collect()
    }
}
impl<W, T: IntoWire<W>> IntoWire<Vec<W>> for Vec<T> {
    fn into_wire(self) -> Vec<W> {
        self.into_iter().map(T::into_wire).collect()
    }
}
impl<W, T: FromWire<W>> FromWire<Option<W>> for Option<T> {
    fn from_wire(w: Option<W>) -> Result<Self, Error> {
        w.map(T::from_wire).transpose()
    }
}
impl<W, T: IntoWire<W>> IntoWire<Option<W>> for Option<T> {
    fn into_wire(self) -> Option<W> {
        self.map(T::into_wire)
    }
}
impl<V> FromWire<HashMap<String, V>> for BTreeMap<String, V> {
    fn from_wire(w: HashMap<String, V>) -> Result<Self, Error> {
        Ok(w.into_iter().collect())
    }
}
impl<V> IntoWire<HashMap<String, V>> for BTreeMap<String, V> {
    fn into_wire(self) -> HashMap<String, V> {
        self.into_iter().collect()
    }
}

/// Enums travel as the wire's enums, variant for variant. Zero is
/// "unspecified": refused where a value is required, none where it is
/// optional.
macro_rules! enums {
    ($($t:ident { $($v:ident),+ $(,)? })*) => {$(
        impl FromWire<i32> for $t {
            fn from_wire(w: i32) -> Result<Self, Error> {
                match pb::$t::try_from(w) {
                    $(Ok(pb::$t::$v) => Ok($t::$v),)+
                    Ok(pb::$t::Unspecified) => Err(Error::invalid(format!(
                        "the {} is unspecified",
                        $t::WHAT
                    ))),
                    Err(_) => Err(Error::invalid(format!("unknown {} {w}", $t::WHAT))),
                }
            }
        }
        impl IntoWire<i32> for $t {
            fn into_wire(self) -> i32 {
                match self {
                    $($t::$v => pb::$t::$v as i32,)+
                }
            }
        }
        impl FromWire<i32> for Option<$t> {
            fn from_wire(w: i32) -> Result<Self, Error> {
                (w != pb::$t::Unspecified as i32).then(|| $t::from_wire(w)).transpose()
            }
        }
        impl IntoWire<i32> for Option<$t> {
            fn into_wire(self) -> i32 {
                self.map_or(pb::$t::Unspecified as i32, IntoWire::into_wire)
            }
        }
    )*};
}
enums! {
    Health { Ok, Warn, Err }
    Profile { Admin, Rbd, RbdReadOnly, RbdMirror, RbdMirrorPeer }
    JournalDurability { Strict, OnFlush }
    JournalClientAction { Register, Unregister, Commit, Get }
    SnapNamespaceType { User, Mirror }
    MirrorSnapState { Primary, PrimaryDemoted, NonPrimary, NonPrimaryDemoted }
    PoolMirrorMode { Disabled, Image, Pool }
    ImageMirrorMode { Snapshot, Journal }
    ImageMirrorState { Enabled, Disabling, Disabled }
    PeerDirection { RxOnly, RxTx, TxOnly }
    MirrorStatusState { Unknown, StartingReplay, Replaying, Syncing, Stopped, Error }
    StatusReason {
        Unknown, Primary, Starting, Replaying, CatchingUp, Syncing, Demoted, ResyncRequested,
        SplitBrain, Error, PeerUnreachable, Unreachable, DaemonDown, Behind,
    }
    MirrorHealth { Ok, Warning, Error }
}

/// Messages whose fields carry the same names on both sides.
macro_rules! fields {
    ($($pb:ident <=> $t:ident { $($f:ident),* $(,)? })*) => {$(
        impl FromWire<pb::$pb> for $t {
            fn from_wire(w: pb::$pb) -> Result<Self, Error> {
                Ok($t { $($f: FromWire::from_wire(w.$f)?,)* })
            }
        }
        impl IntoWire<pb::$pb> for $t {
            fn into_wire(self) -> pb::$pb {
                pb::$pb { $($f: self.$f.into_wire(),)* }
            }
        }
    )*};
}

/// A message field that is always set: absent reads as the default.
macro_rules! required {
    ($($pb:ident => $t:ty),*) => {$(
        impl FromWire<Option<pb::$pb>> for $t {
            fn from_wire(w: Option<pb::$pb>) -> Result<Self, Error> {
                Ok(Option::<$t>::from_wire(w)?.unwrap_or_default())
            }
        }
        impl IntoWire<Option<pb::$pb>> for $t {
            fn into_wire(self) -> Option<pb::$pb> {
                Some(self.into_wire())
            }
        }
    )*};
}
required!(ImageRef => ImageSpec, MirrorSiteStatus => MirrorSiteStatus);

impl FromWire<pb::ImageRef> for ImageSpec {
    fn from_wire(w: pb::ImageRef) -> Result<Self, Error> {
        Ok(ImageSpec {
            pool: w.pool,
            image: w.image,
            snap: (!w.snap.is_empty()).then_some(w.snap),
        })
    }
}
impl IntoWire<pb::ImageRef> for ImageSpec {
    fn into_wire(self) -> pb::ImageRef {
        pb::ImageRef {
            pool: self.pool,
            image: self.image,
            snap: self.snap.unwrap_or_default(),
        }
    }
}

/// `w.decode()`: [`FromWire`] in method position.
pub trait Decode: Sized {
    fn decode<T: FromWire<Self>>(self) -> Result<T, Error> {
        T::from_wire(self)
    }
}
impl<W> Decode for W {}

impl FromWire<pb::WriteStreamMessage> for WriteMessage {
    fn from_wire(w: pb::WriteStreamMessage) -> Result<Self, Error> {
        use pb::write_stream_message::Msg;
        Ok(match w.msg {
            Some(Msg::Open(o)) => WriteMessage::Open(Box::new(o.decode()?)),
            Some(Msg::Chunk(c)) => WriteMessage::Chunk(c.decode()?),
            Some(Msg::Commit(c)) => WriteMessage::Commit {
                final_size: c.final_size,
                total_bytes: c.total_bytes,
            },
            None => return Err(Error::invalid("empty write stream message")),
        })
    }
}
impl IntoWire<pb::WriteStreamMessage> for WriteMessage {
    fn into_wire(self) -> pb::WriteStreamMessage {
        use pb::write_stream_message::Msg;
        let msg = match self {
            WriteMessage::Open(o) => Msg::Open((*o).into_wire()),
            WriteMessage::Chunk(c) => Msg::Chunk(c.into_wire()),
            WriteMessage::Commit {
                final_size,
                total_bytes,
            } => Msg::Commit(pb::WriteStreamCommit {
                final_size,
                total_bytes,
            }),
        };
        pb::WriteStreamMessage { msg: Some(msg) }
    }
}

fields! {
    HelloReply <=> Hello { api_version, site_id, site_name, version, entity, profile }
    StatusReply <=> SiteStatus {
        site_id, site_name, health, health_checks, version, uptime_secs, pools, images,
        provisioned_bytes, used_bytes, avail_bytes, total_bytes, endpoints, nbd_endpoint,
    }
    PoolInfo <=> PoolInfo { id, name, application, created }
    PoolStatsReply <=> PoolStats {
        pool, images, provisioned_bytes, used_bytes, objects, read_ops, write_ops, read_bytes,
        write_bytes,
    }
    ImageCreateRequest <=> ImageCreate {
        pool, image, size, object_size, stripe_unit, stripe_count, features,
    }
    ImageInfo <=> ImageInfo {
        pool, name, id, size, object_size, stripe_unit, stripe_count, features, feature_names,
        created, modified, objects, used_bytes, snapshot_count, snap, protected, snap_id,
    }
    ChecksumReply <=> Checksums { size, chunk_size, hashes }
    DataChunk <=> DataChunk { offset, length, zero, data }
    ReadStreamRequest <=> ReadStream {
        image, offset, length, chunk_size, diff, diff_from, whole_object, extra,
    }
    WriteStreamOpen <=> WriteOpen { create, image, lock_cookie, diff, mirror_sync, expect_epoch }
    DiffTarget <=> DiffTarget { from_snap, to_snap, size }
    WriteStreamReply <=> Written { bytes_written, bytes_zero, image }
    JournalSegment <=> JournalSegment { segno, first_tid, entries, bytes }
    JournalClientInfo <=> JournalClientInfo { id, commit_tid, disconnected, entries_behind }
    JournalInfoReply <=> JournalInfo {
        image_id, segments, bytes, first_tid, last_tid, durable_tid, applied_tid, clients,
        segment_size, max_size, durability, syncs, commit_age, splay_width,
    }
    JournalInspectReply <=> JournalInspect {
        segments, entries, bytes, first_tid, last_tid, counts, errors,
    }
    JournalChunk <=> JournalChunk { entries, first_tid, last_tid, durable_tid }
    SnapInfo <=> SnapInfo {
        id, name, size, created, protected, namespace, mirror_state, mirror_complete,
        mirror_peer_uuids, primary_snap_id, primary_mirror_uuid,
    }
    DiffRequest <=> DiffRequest { image, from_snap, whole_object, offset, length }
    DiffExtent <=> DiffExtent { offset, length, data }
    DiffReply <=> Diff { extents, size, granularity }
    LockInfo <=> LockInfo { locker, id, address, age_secs, lease_ms, expires_in_ms }
    AuthEntity <=> AuthEntity { entity, key, caps, profile, created }
    ConfigEntry <=> ConfigEntry { who, key, value }
    MirrorPeer <=> MirrorPeer {
        uuid, site_name, client_name, direction, mirror_uuid, fsid, mon_host, tls_fingerprint,
        remote_pool, key,
    }
    MirrorPoolInfo <=> MirrorPoolInfo { pool, mode, site_name, mirror_uuid, peers, fsid }
    MirrorBootstrapImportRequest <=> BootstrapImport {
        pool, site_name, direction, token, remote_pool,
    }
    MirrorPeerRegisterReply <=> PeerRegistered { peer, mirror_uuid, site_name }
    MirrorImageInfo <=> MirrorImageInfo {
        pool, name, global_id, mode, state, primary, epoch, mirror_snaps, size, object_size,
        stripe_unit, stripe_count, features, image_id, demoted, journal_primary_uuid,
        journal_tid, journal_skip_to, primary_mirror_uuid, resync_requested, fork_mirror_uuid,
        fork_journal_tid, fork_snap_id, fork_forced, fork_data_as_of_us, fork_at, last_resync,
        resync_full, primary_epoch,
    }
    MirrorImageListReply <=> MirrorImageList { images, mirror_uuid, site_name }
    MirrorSiteStatus <=> MirrorSiteStatus {
        site_name, mirror_uuids, up, state, description, last_update, reason, lag_seconds,
        last_sync, progress, daemon_id, bytes_synced,
    }
    MirrorImageStatus <=> MirrorImageStatus { name, global_id, local, peer_sites, daemon_id }
    MirrorDaemonInfo <=> MirrorDaemonInfo {
        service_id, instance_id, client_id, hostname, version, last_heartbeat, up, health,
        site_name,
    }
    MirrorPoolStatusReply <=> MirrorPoolStatus {
        health, daemon_health, image_health, states, daemons, images,
    }
    MirrorStatusReportRequest <=> StatusReport { pool, global_id, status, daemon }
    MirrorImageAdoptRequest <=> ImageAdopt {
        pool, name, global_id, mode, size, object_size, stripe_unit, stripe_count, features,
        primary_mirror_uuid,
    }
    MirrorSyncBeginRequest <=> SyncBegin {
        image, snap_name, primary_mirror_uuid, primary_snap_id, size, demoted, expect_epoch,
        primary_epoch,
    }
    MirrorSyncProgressRequest <=> SyncProgress {
        image, snap_id, last_copied_object_number, resync_summary, expect_epoch,
    }
    MirrorSyncState <=> SyncState {
        primary_snap_id, last_copied_object_number, resumed, primary_mirror_uuid,
    }
    MirrorSnapshotAckRequest <=> SnapshotAck {
        pool, global_id, peer_mirror_uuid, primary_snap_id,
    }
    MirrorJournalApplyRequest <=> JournalApply {
        image, primary_mirror_uuid, entries, persist, expect_epoch, primary_epoch,
    }
    MirrorJournalApplyReply <=> JournalApplied {
        last_tid, last_timestamp_us, entries, bytes, demoted,
    }
    MirrorJournalPositionRequest <=> JournalPosition {
        image, primary_mirror_uuid, tid, skip_to, timestamp_us, expect_epoch,
    }
    MirrorScheduleEntry <=> Schedule { pool, image, interval, start_time }
    MirrorScheduleNext <=> ScheduledSnapshot { image, time }
}

/// Replies that wrap one value: the client takes the value.
macro_rules! unwrapped {
    ($($pb:ident.$f:ident => $t:ty),* $(,)?) => {$(
        impl FromWire<pb::$pb> for $t {
            fn from_wire(w: pb::$pb) -> Result<Self, Error> {
                FromWire::from_wire(w.$f)
            }
        }
    )*};
}
unwrapped! {
    PoolListReply.pools => Vec<PoolInfo>,
    ImageListReply.images => Vec<ImageInfo>,
    SnapListReply.snaps => Vec<SnapInfo>,
    LockListReply.locks => Vec<LockInfo>,
    AuthListReply.entities => Vec<AuthEntity>,
    ConfigListReply.entries => Vec<ConfigEntry>,
    MirrorScheduleListReply.schedules => Vec<Schedule>,
    MirrorScheduleStatusReply.scheduled => Vec<ScheduledSnapshot>,
    SnapPurgeReply.removed => u64,
    MirrorBootstrapToken.token => String,
    ReadReply.data => Vec<u8>,
}

impl FromWire<pb::Empty> for () {
    fn from_wire(_: pb::Empty) -> Result<Self, Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: FromWire<i32> + IntoWire<i32> + Copy + PartialEq + std::fmt::Debug>(
        all: &[T],
    ) {
        for v in all {
            assert_eq!(T::from_wire(v.into_wire()).unwrap(), *v);
        }
    }

    #[test]
    fn enums_round_trip_and_unspecified_is_refused() {
        round_trip(Health::ALL);
        round_trip(Profile::ALL);
        round_trip(PeerDirection::ALL);
        round_trip(MirrorStatusState::ALL);
        round_trip(StatusReason::ALL);
        round_trip(MirrorSnapState::ALL);
        let e = PoolMirrorMode::from_wire(0).unwrap_err();
        assert_eq!(e.kind, tern_types::ErrorKind::InvalidArgument);
        assert_eq!(e.message, "the mirror mode is unspecified");
        assert!(PeerDirection::from_wire(99).is_err());
        assert_eq!(Option::<MirrorSnapState>::from_wire(0).unwrap(), None);
    }

    #[test]
    fn a_status_keeps_up_and_state_apart() {
        let s = MirrorSiteStatus {
            up: false,
            state: MirrorStatusState::Replaying,
            reason: StatusReason::DaemonDown,
            ..Default::default()
        };
        assert_eq!(s.state_label(), "down+replaying");
        let w: pb::MirrorSiteStatus = s.clone().into_wire();
        assert_eq!(MirrorSiteStatus::from_wire(w).unwrap(), s);
    }
}
