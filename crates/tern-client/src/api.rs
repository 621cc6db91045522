//! The typed API of a site, one group per service: plain arguments in,
//! `tern_types` values out. `c.pool().create("rbd")`,
//! `c.image().info(&spec)`, `c.mirror().image_status(&spec)`.

use crate::{ClientError, SiteClient};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use std::collections::BTreeMap;
use tern_proto::convert::{FromWire, IntoWire};
use tern_proto::v1 as pb;
use tern_types::ImageSpec;
use tern_types::api::*;
use tern_types::journal::JournalClientAction;
use tern_types::mirror::{ImageMirrorMode, PoolMirrorMode};

impl SiteClient {
    /// Awaits a call and decodes its reply.
    pub(crate) async fn call<P, T: FromWire<P>>(
        &self,
        call: impl Future<Output = Result<tonic::Response<P>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        let reply = call.await.map_err(|s| self.err(s))?.into_inner();
        self.decode(reply)
    }

    fn decode<P, T: FromWire<P>>(&self, reply: P) -> Result<T, ClientError> {
        T::from_wire(reply).map_err(|e| {
            ClientError::new(
                tern_types::ErrorKind::Internal,
                format!(
                    "the site at {} sent a reply this client cannot read: {e}",
                    self.endpoint()
                ),
            )
        })
    }

    /// A server stream of decoded messages.
    async fn stream<P, T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<tonic::Streaming<P>>, tonic::Status>>,
    ) -> Result<BoxStream<'static, Result<T, ClientError>>, ClientError>
    where
        P: Send + 'static,
        T: FromWire<P> + Send + 'static,
    {
        let stream = call.await.map_err(|s| self.err(s))?.into_inner();
        let c = self.clone();
        Ok(stream
            .map(move |m| c.decode(m.map_err(|s| c.err(s))?))
            .boxed())
    }
}

fn at(spec: &ImageSpec) -> pb::ImageRef {
    spec.clone().into_wire()
}

fn image(spec: &ImageSpec) -> Option<pb::ImageRef> {
    Some(at(spec))
}

/// One group of typed calls per service: each method is one RPC, with the
/// request it builds.
macro_rules! api {
    ($(
        $(#[$gdoc:meta])*
        $group:ident = $accessor:ident, $svc:ident {
            $(
                $(#[$doc:meta])*
                fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $rpc:ident($req:expr);
            )*
        }
    )*) => {$(
        $(#[$gdoc])*
        #[derive(Clone, Copy)]
        pub struct $group<'a>(&'a SiteClient);

        impl SiteClient {
            $(#[$gdoc])*
            pub fn $accessor(&self) -> $group<'_> {
                $group(self)
            }
        }

        impl $group<'_> {
            $(
                $(#[$doc])*
                pub async fn $name(self, $($arg: $ty),*) -> Result<$ret, ClientError> {
                    let c = self.0;
                    c.call(c.wire().$svc().$rpc($req)).await
                }
            )*
        }
    )*};
}

api! {
    /// Who the site is and how it is.
    SiteApi = site, site {
        fn status() -> SiteStatus = status(pb::StatusRequest {});
    }

    PoolApi = pool, pool {
        fn create(pool: &str) -> PoolInfo = pool_create(pb::PoolRequest { pool: pool.into() });
        fn init(pool: &str, application: &str) -> PoolInfo = pool_init(pb::PoolInitRequest {
            pool: pool.into(),
            application: application.into(),
        });
        fn list() -> Vec<PoolInfo> = pool_list(pb::Empty {});
        fn stats(pool: &str) -> PoolStats = pool_stats(pb::PoolRequest { pool: pool.into() });
        fn remove(pool: &str, force: bool) -> () = pool_remove(pb::PoolRemoveRequest {
            pool: pool.into(),
            force,
        });
    }

    ImageApi = image, image {
        fn create(new: ImageCreate) -> ImageInfo = image_create(new.into_wire());
        fn list(pool: &str) -> Vec<ImageInfo> = image_list(pb::PoolRequest { pool: pool.into() });
        /// Of the head, or of `spec.snap`.
        fn info(spec: &ImageSpec) -> ImageInfo = image_get(at(spec));
        fn resize(spec: &ImageSpec, size: u64, allow_shrink: bool) -> ImageInfo =
            image_resize(pb::ImageResizeRequest { image: image(spec), size, allow_shrink });
        fn rename(spec: &ImageSpec, new_name: &str) -> () = image_rename(pb::ImageRenameRequest {
            image: image(spec),
            new_name: new_name.into(),
        });
        /// `force`: also a non-primary mirror copy.
        fn remove(spec: &ImageSpec, force: bool) -> () =
            image_remove(pb::ImageRemoveRequest { image: image(spec), force });
        /// rbd feature enable|disable, by rbd's feature names.
        fn features(spec: &ImageSpec, enable: Vec<String>, disable: Vec<String>) -> ImageInfo =
            image_features(pb::ImageFeaturesRequest { image: image(spec), enable, disable });
        /// BLAKE3 of each `chunk_size` piece, computed at the site (0: its default).
        fn checksum(spec: &ImageSpec, chunk_size: u64) -> Checksums =
            image_checksum(pb::ChecksumRequest { image: image(spec), chunk_size });
    }

    /// Small I/O; bulk data goes through [`IoApi::read_stream`] and
    /// [`IoApi::write_stream`].
    IoApi = io, io {
        fn read(spec: &ImageSpec, offset: u64, length: u64) -> Vec<u8> =
            read(pb::ReadRequest { image: image(spec), offset, length });
        /// `lock_cookie`: the writer's exclusive lock (images with exclusive-lock).
        fn write(spec: &ImageSpec, offset: u64, data: Vec<u8>, fua: bool, lock_cookie: &str) -> () =
            write(pb::WriteRequest {
                image: image(spec),
                offset,
                data,
                fua,
                lock_cookie: lock_cookie.into(),
            });
        fn discard(spec: &ImageSpec, offset: u64, length: u64, lock_cookie: &str) -> () =
            discard(pb::RangeRequest { image: image(spec), offset, length, lock_cookie: lock_cookie.into() });
        fn write_zeroes(spec: &ImageSpec, offset: u64, length: u64, lock_cookie: &str) -> () =
            write_zeroes(pb::RangeRequest { image: image(spec), offset, length, lock_cookie: lock_cookie.into() });
        fn flush(spec: &ImageSpec) -> () = flush(at(spec));
    }

    JournalApi = journal, journal {
        fn info(spec: &ImageSpec) -> JournalInfo = journal_info(at(spec));
        fn inspect(spec: &ImageSpec) -> JournalInspect = journal_inspect(at(spec));
        fn client(spec: &ImageSpec, client: &str, action: JournalClientAction, tid: u64) -> JournalClientInfo =
            journal_client(pb::JournalClientRequest {
                image: image(spec),
                client: client.into(),
                action: action.into_wire(),
                tid,
            });
        /// The extents written by entries after `after_tid`; NotFound if the
        /// journal no longer holds them all.
        fn extents(spec: &ImageSpec, after_tid: u64) -> Diff =
            journal_extents(pb::JournalExtentsRequest { image: image(spec), after_tid });
    }

    SnapApi = snap, snap {
        fn create(spec: &ImageSpec, snap: &str) -> SnapInfo =
            snap_create(pb::SnapRequest { image: image(spec), snap: snap.into() });
        /// `all`: mirror snapshots too.
        fn list(spec: &ImageSpec, all: bool) -> Vec<SnapInfo> =
            snap_list(pb::SnapListRequest { image: image(spec), all });
        fn remove(spec: &ImageSpec, snap: &str) -> () =
            snap_remove(pb::SnapRequest { image: image(spec), snap: snap.into() });
        fn rename(spec: &ImageSpec, snap: &str, new_name: &str) -> () =
            snap_rename(pb::SnapRenameRequest { image: image(spec), snap: snap.into(), new_name: new_name.into() });
        fn rollback(spec: &ImageSpec, snap: &str) -> () =
            snap_rollback(pb::SnapRequest { image: image(spec), snap: snap.into() });
        fn protect(spec: &ImageSpec, snap: &str, protect: bool) -> () =
            snap_protect(pb::SnapProtectRequest { image: image(spec), snap: snap.into(), protect });
        /// Returns how many were removed.
        fn purge(spec: &ImageSpec) -> u64 = snap_purge(at(spec));
        /// Changed extents between two points, from metadata only.
        fn diff(req: DiffRequest) -> Diff = diff(req.into_wire());
    }

    LockApi = lock, lock {
        fn acquire(spec: &ImageSpec, cookie: &str, address: &str) -> LockInfo =
            lock_acquire(pb::LockRequest { image: image(spec), cookie: cookie.into(), address: address.into() });
        fn release(spec: &ImageSpec, cookie: &str) -> () =
            lock_release(pb::LockRequest { image: image(spec), cookie: cookie.into(), address: String::new() });
        fn list(spec: &ImageSpec) -> Vec<LockInfo> = lock_list(at(spec));
        fn break_lock(spec: &ImageSpec, id: &str, locker: &str) -> () =
            lock_break(pb::LockBreakRequest { image: image(spec), id: id.into(), locker: locker.into() });
    }

    AuthApi = auth, auth {
        /// `caps`: service (mon, osd, mgr) to Ceph cap string.
        fn get_or_create(entity: &str, caps: BTreeMap<String, String>) -> AuthEntity =
            auth_get_or_create(pb::AuthGetOrCreateRequest { entity: entity.into(), caps: caps.into_wire() });
        fn get(entity: &str) -> AuthEntity = auth_get(pb::AuthName { entity: entity.into() });
        fn list() -> Vec<AuthEntity> = auth_list(pb::Empty {});
        fn remove(entity: &str) -> () = auth_remove(pb::AuthName { entity: entity.into() });
        /// Replaces an entity's caps; its key stays.
        fn caps(entity: &str, caps: BTreeMap<String, String>) -> AuthEntity =
            auth_caps(pb::AuthGetOrCreateRequest { entity: entity.into(), caps: caps.into_wire() });
    }

    ConfigApi = config, config {
        fn set(who: &str, key: &str, value: &str) -> () =
            config_set(pb::ConfigSetRequest { who: who.into(), key: key.into(), value: value.into() });
        fn get(who: &str, key: &str) -> Vec<ConfigEntry> =
            config_get(pb::ConfigGetRequest { who: who.into(), key: key.into() });
        fn remove(who: &str, key: &str) -> () =
            config_remove(pb::ConfigGetRequest { who: who.into(), key: key.into() });
        fn dump() -> Vec<ConfigEntry> = config_dump(pb::Empty {});
    }

    /// Mirroring as operators (and peers looking) see it.
    MirrorApi = mirror, mirror {
        fn pool_enable(pool: &str, mode: PoolMirrorMode, site_name: &str) -> MirrorPoolInfo =
            mirror_pool_enable(pb::MirrorPoolEnableRequest {
                pool: pool.into(),
                mode: mode.into_wire(),
                site_name: site_name.into(),
            });
        fn pool_disable(pool: &str) -> () = mirror_pool_disable(pb::PoolRequest { pool: pool.into() });
        /// `with_keys`: peers' keys too (admins and the local mirror daemon).
        fn pool_info(pool: &str, with_keys: bool) -> MirrorPoolInfo =
            mirror_pool_get(pb::MirrorPoolInfoRequest { pool: pool.into(), with_keys });
        fn peer_add(pool: &str, peer: MirrorPeer) -> MirrorPeer =
            mirror_peer_add(pb::MirrorPeerAddRequest { pool: pool.into(), peer: Some(peer.into_wire()) });
        fn peer_remove(pool: &str, uuid: &str) -> () =
            mirror_peer_remove(pb::MirrorPeerRemoveRequest { pool: pool.into(), uuid: uuid.into() });
        fn peer_set(pool: &str, uuid: &str, key: &str, value: &str) -> () =
            mirror_peer_set(pb::MirrorPeerSetRequest {
                pool: pool.into(),
                uuid: uuid.into(),
                key: key.into(),
                value: value.into(),
            });
        /// Returns the token.
        fn bootstrap_create(pool: &str, site_name: &str) -> String =
            mirror_bootstrap_create(pb::MirrorBootstrapCreateRequest {
                pool: pool.into(),
                site_name: site_name.into(),
            });
        fn bootstrap_import(req: BootstrapImport) -> MirrorPeer = mirror_bootstrap_import(req.into_wire());
        fn image_enable(spec: &ImageSpec, mode: ImageMirrorMode) -> MirrorImageInfo =
            mirror_image_enable(pb::MirrorImageEnableRequest { image: image(spec), mode: mode.into_wire() });
        fn image_disable(spec: &ImageSpec, force: bool) -> () =
            mirror_image_disable(pb::MirrorImageDisableRequest { image: image(spec), force });
        fn image_promote(spec: &ImageSpec, force: bool) -> MirrorImageInfo =
            mirror_image_promote(pb::MirrorImagePromoteRequest { image: image(spec), force });
        fn image_demote(spec: &ImageSpec) -> MirrorImageInfo = mirror_image_demote(at(spec));
        /// `full`: copy everything, not only what diverged.
        fn image_resync(spec: &ImageSpec, full: bool) -> () =
            mirror_image_resync(pb::MirrorImageResyncRequest { image: image(spec), full });
        fn image_snapshot(spec: &ImageSpec) -> SnapInfo = mirror_image_snapshot(at(spec));
        fn image_info(spec: &ImageSpec) -> MirrorImageInfo = mirror_image_get(at(spec));
        /// Every mirrored image of a pool with its role and mirror snapshots.
        fn image_list(pool: &str) -> MirrorImageList = mirror_image_list(pb::PoolRequest { pool: pool.into() });
        fn image_status(spec: &ImageSpec) -> MirrorImageStatus =
            mirror_image_status_get(at(spec));
        fn pool_status(pool: &str, verbose: bool) -> MirrorPoolStatus =
            mirror_pool_status(pb::MirrorPoolStatusRequest { pool: pool.into(), verbose });
        fn schedule_add(s: Schedule) -> () = mirror_schedule_add(schedule(s, false));
        fn schedule_remove(s: Schedule) -> () = mirror_schedule_remove(schedule(s, false));
        /// The schedules at `s`'s level (and below it with `recursive`).
        fn schedule_list(s: Schedule, recursive: bool) -> Vec<Schedule> =
            mirror_schedule_list(schedule(s, recursive));
        fn schedule_status(s: Schedule) -> Vec<ScheduledSnapshot> =
            mirror_schedule_status(schedule(s, false));
    }

    /// What mirror daemons (tern-mirror) and peer sites call on a site.
    MirrorDaemonApi = mirror_daemon, mirror_daemon {
        /// Registers the calling site as a peer of `pool` here (rx-tx import).
        fn peer_register(pool: &str, peer: MirrorPeer) -> PeerRegistered =
            mirror_peer_register(pb::MirrorPeerRegisterRequest { pool: pool.into(), peer: Some(peer.into_wire()) });
        fn status_report(report: StatusReport) -> () = mirror_status_report(report.into_wire());
        fn heartbeat(daemon: MirrorDaemonInfo) -> () = mirror_daemon_heartbeat(daemon.into_wire());
        /// Creates the local non-primary copy of a remote primary image.
        fn adopt(req: ImageAdopt) -> MirrorImageInfo = mirror_image_adopt(req.into_wire());
        fn sync_begin(req: SyncBegin) -> SyncState = mirror_sync_begin(req.into_wire());
        fn sync_progress(req: SyncProgress) -> () = mirror_sync_progress(req.into_wire());
        fn sync_complete(req: SyncProgress) -> SnapInfo = mirror_sync_complete(req.into_wire());
        fn snapshot_ack(req: SnapshotAck) -> () = mirror_snapshot_ack(req.into_wire());
        fn journal_apply(req: JournalApply) -> JournalApplied = mirror_journal_apply(req.into_wire());
        fn journal_position(req: JournalPosition) -> () = mirror_journal_position(req.into_wire());
    }
}

fn schedule(s: Schedule, recursive: bool) -> pb::MirrorScheduleRequest {
    pb::MirrorScheduleRequest {
        pool: s.pool,
        image: s.image,
        interval: s.interval,
        start_time: s.start_time,
        recursive,
    }
}

impl IoApi<'_> {
    /// Sparse-aware export: holes come back as zero chunks, never as bytes.
    pub async fn read_stream(
        self,
        req: ReadStream,
    ) -> Result<BoxStream<'static, Result<DataChunk, ClientError>>, ClientError> {
        let c = self.0;
        c.stream(c.wire().io().read_stream(req.into_wire())).await
    }

    /// Import: the first message opens (and may create) the target, the
    /// last one commits. A stream that ends without a commit leaves
    /// nothing behind.
    pub async fn write_stream(
        self,
        messages: impl Stream<Item = WriteMessage> + Send + 'static,
    ) -> Result<Written, ClientError> {
        let c = self.0;
        c.call(
            c.wire()
                .io()
                .write_stream(messages.map(IntoWire::<pb::WriteStreamMessage>::into_wire)),
        )
        .await
    }
}

impl JournalApi<'_> {
    /// Entries from `from_tid` on (0: the oldest held), `max_bytes` per
    /// chunk (0: 4 MiB); with `follow`, waits for new ones instead of ending.
    /// With `skip_to_snap`, entries before that snapshot's creation are
    /// left out by the site (the snapshot's own entry is sent).
    pub async fn read(
        self,
        spec: &ImageSpec,
        from_tid: u64,
        follow: bool,
        max_bytes: u64,
        skip_to_snap: &str,
    ) -> Result<BoxStream<'static, Result<JournalChunk, ClientError>>, ClientError> {
        let c = self.0;
        let req = pb::JournalReadRequest {
            image: image(spec),
            from_tid,
            follow,
            max_bytes,
            skip_to_snap: skip_to_snap.to_string(),
        };
        c.stream(c.wire().journal().journal_read(req)).await
    }
}
