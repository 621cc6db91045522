use crate::config::{ClusterConfig, Keyring, TlsMode};
use crate::{ClientError, connect};
use std::path::Path;
use tern_proto::headers;
use tern_proto::v1 as pb;
use tern_proto::v1::{
    auth_client, config_client, image_client, io_client, journal_client, lock_client,
    mirror_client, mirror_daemon_client, pool_client, site_client, snap_client,
};
use tern_types::{API_VERSION, ErrorKind};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds the caller's identity and API version to every request.
#[derive(Clone)]
pub struct Identity {
    entity: MetadataValue<tonic::metadata::Ascii>,
    key: MetadataValue<tonic::metadata::Ascii>,
    version: MetadataValue<tonic::metadata::Ascii>,
}

impl Interceptor for Identity {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert(headers::ENTITY, self.entity.clone());
        md.insert(headers::KEY, self.key.clone());
        md.insert(headers::API_VERSION, self.version.clone());
        Ok(req)
    }
}

/// The transport every generated service client of a [`SiteClient`] runs on.
pub type Transport = InterceptedService<Channel, Identity>;

/// A connection to one site as one entity. One channel and one identity
/// serve every service of the API; [`SiteClient::pool`], [`SiteClient::io`]
/// and their siblings hand out the generated client of each service.
#[derive(Clone)]
pub struct SiteClient {
    channel: Channel,
    ident: Identity,
    compressed: bool,
    endpoint: String,
    entity: String,
}

/// One accessor per service: the generated client over this connection's
/// channel and identity, with its message limits and compression.
macro_rules! services {
    ($($(#[$doc:meta])* $name:ident => $module:ident::$client:ident;)*) => {
        impl SiteClient {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> $module::$client<Transport> {
                    let c = $module::$client::with_interceptor(self.channel.clone(), self.ident.clone())
                        .max_decoding_message_size(tern_proto::MAX_MESSAGE)
                        .max_encoding_message_size(tern_proto::MAX_MESSAGE);
                    if self.compressed {
                        use tonic::codec::CompressionEncoding::Zstd;
                        c.send_compressed(Zstd).accept_compressed(Zstd)
                    } else {
                        c
                    }
                }
            )*
        }
    };
}

services! {
    /// Hello and status.
    site => site_client::SiteClient;
    pool => pool_client::PoolClient;
    image => image_client::ImageClient;
    /// Image data: small I/O and the read and write streams.
    io => io_client::IoClient;
    journal => journal_client::JournalClient;
    snap => snap_client::SnapClient;
    lock => lock_client::LockClient;
    auth => auth_client::AuthClient;
    config => config_client::ConfigClient;
    /// Mirroring administration and status.
    mirror => mirror_client::MirrorClient;
    /// What mirror daemons and peer sites call.
    mirror_daemon => mirror_daemon_client::MirrorDaemonClient;
}

impl SiteClient {
    /// Connects to the first endpoint of `conf` as `entity` with `key`.
    pub fn connect_with(
        endpoint: &str,
        tls: &TlsMode,
        entity: &str,
        key: &str,
    ) -> Result<SiteClient, ClientError> {
        let channel = connect::channel(endpoint, tls)?;
        let val = |s: &str, what: &str| {
            s.parse().map_err(|_| {
                ClientError::new(
                    ErrorKind::InvalidArgument,
                    format!("{what} '{s}' is not valid ASCII"),
                )
            })
        };
        let ident = Identity {
            entity: val(entity, "entity")?,
            key: val(key, "key")?,
            version: API_VERSION.to_string().parse().expect("digits"),
        };
        Ok(SiteClient {
            channel,
            ident,
            compressed: false,
            endpoint: endpoint.to_string(),
            entity: entity.to_string(),
        })
    }

    /// Connects using a cluster config; the key comes from `keyring` or the
    /// config's default keyring for `entity`.
    pub fn connect(
        conf: &ClusterConfig,
        entity: &str,
        keyring: Option<&Path>,
    ) -> Result<SiteClient, ClientError> {
        let path = keyring
            .map(Path::to_path_buf)
            .unwrap_or_else(|| conf.keyring_path(entity));
        let ring = Keyring::load(&path)?;
        let key = ring.key_for(entity).ok_or_else(|| {
            ClientError::new(
                ErrorKind::Unauthenticated,
                format!("keyring {} has no key for {entity}", path.display()),
            )
        })?;
        let endpoint = conf.endpoints.first().ok_or_else(|| {
            ClientError::new(
                ErrorKind::InvalidArgument,
                "the cluster config names no mon_host",
            )
        })?;
        Self::connect_with(endpoint, &conf.tls, entity, key)
    }

    /// Compresses requests with zstd and accepts zstd-compressed replies
    /// (the site compresses bulk data for such clients).
    pub fn compressed(mut self) -> SiteClient {
        self.compressed = true;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn entity(&self) -> &str {
        &self.entity
    }

    pub fn err(&self, s: tonic::Status) -> ClientError {
        crate::error::from_status(s, &self.endpoint)
    }

    /// Checks that the site speaks our API version and accepts our key.
    pub async fn hello(&self) -> Result<pb::HelloReply, ClientError> {
        let r = self
            .site()
            .hello(pb::HelloRequest {
                api_version: API_VERSION,
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        if r.api_version != API_VERSION {
            return Err(ClientError::new(
                ErrorKind::VersionMismatch,
                format!(
                    "site {} speaks API version {}, this client {API_VERSION}: upgrade the older side",
                    self.endpoint, r.api_version
                ),
            ));
        }
        Ok(r)
    }
}

/// Wrappers that return the reply or a [`ClientError`], grouped by service.
macro_rules! rpc {
    ($($svc:ident { $($name:ident($req:ty) -> $resp:ty;)* })*) => {
        impl SiteClient {
            $($(
                pub async fn $name(&self, req: $req) -> Result<$resp, ClientError> {
                    self.$svc().$name(req).await.map(|r| r.into_inner()).map_err(|s| self.err(s))
                }
            )*)*
        }
    };
}

rpc! {
    site {
        status(pb::StatusRequest) -> pb::StatusReply;
    }
    pool {
        pool_create(pb::PoolRequest) -> pb::PoolInfo;
        pool_init(pb::PoolInitRequest) -> pb::PoolInfo;
        pool_list(pb::Empty) -> pb::PoolListReply;
        pool_stats(pb::PoolRequest) -> pb::PoolStatsReply;
        pool_remove(pb::PoolRemoveRequest) -> pb::Empty;
    }
    image {
        image_create(pb::ImageCreateRequest) -> pb::ImageInfo;
        image_list(pb::PoolRequest) -> pb::ImageListReply;
        image_get(pb::ImageRef) -> pb::ImageInfo;
        image_resize(pb::ImageResizeRequest) -> pb::ImageInfo;
        image_rename(pb::ImageRenameRequest) -> pb::Empty;
        image_remove(pb::ImageRef) -> pb::Empty;
        image_features(pb::ImageFeaturesRequest) -> pb::ImageInfo;
        image_checksum(pb::ChecksumRequest) -> pb::ChecksumReply;
    }
    io {
        read(pb::ReadRequest) -> pb::ReadReply;
        write(pb::WriteRequest) -> pb::Empty;
        discard(pb::RangeRequest) -> pb::Empty;
        write_zeroes(pb::RangeRequest) -> pb::Empty;
        flush(pb::ImageRef) -> pb::Empty;
    }
    journal {
        journal_info(pb::ImageRef) -> pb::JournalInfoReply;
        journal_inspect(pb::ImageRef) -> pb::JournalInspectReply;
        journal_client(pb::JournalClientRequest) -> pb::JournalClientInfo;
        journal_extents(pb::JournalExtentsRequest) -> pb::DiffReply;
    }
    snap {
        snap_create(pb::SnapRequest) -> pb::SnapInfo;
        snap_list(pb::SnapListRequest) -> pb::SnapListReply;
        snap_remove(pb::SnapRequest) -> pb::Empty;
        snap_rename(pb::SnapRenameRequest) -> pb::Empty;
        snap_rollback(pb::SnapRequest) -> pb::Empty;
        snap_protect(pb::SnapProtectRequest) -> pb::Empty;
        snap_purge(pb::ImageRef) -> pb::SnapPurgeReply;
        diff(pb::DiffRequest) -> pb::DiffReply;
    }
    lock {
        lock_acquire(pb::LockRequest) -> pb::LockInfo;
        lock_release(pb::LockRequest) -> pb::Empty;
        lock_list(pb::ImageRef) -> pb::LockListReply;
        lock_break(pb::LockBreakRequest) -> pb::Empty;
    }
    auth {
        auth_get_or_create(pb::AuthGetOrCreateRequest) -> pb::AuthEntity;
        auth_get(pb::AuthName) -> pb::AuthEntity;
        auth_list(pb::Empty) -> pb::AuthListReply;
        auth_remove(pb::AuthName) -> pb::Empty;
        auth_caps(pb::AuthGetOrCreateRequest) -> pb::AuthEntity;
    }
    config {
        config_set(pb::ConfigSetRequest) -> pb::Empty;
        config_get(pb::ConfigGetRequest) -> pb::ConfigListReply;
        config_remove(pb::ConfigGetRequest) -> pb::Empty;
        config_dump(pb::Empty) -> pb::ConfigListReply;
    }
    mirror {
        mirror_pool_enable(pb::MirrorPoolEnableRequest) -> pb::MirrorPoolInfo;
        mirror_pool_disable(pb::PoolRequest) -> pb::Empty;
        mirror_pool_get(pb::MirrorPoolInfoRequest) -> pb::MirrorPoolInfo;
        mirror_peer_add(pb::MirrorPeerAddRequest) -> pb::MirrorPeer;
        mirror_peer_remove(pb::MirrorPeerRemoveRequest) -> pb::Empty;
        mirror_peer_set(pb::MirrorPeerSetRequest) -> pb::Empty;
        mirror_bootstrap_create(pb::MirrorBootstrapCreateRequest) -> pb::MirrorBootstrapToken;
        mirror_bootstrap_import(pb::MirrorBootstrapImportRequest) -> pb::MirrorPeer;
        mirror_image_enable(pb::MirrorImageEnableRequest) -> pb::MirrorImageInfo;
        mirror_image_disable(pb::MirrorImageDisableRequest) -> pb::Empty;
        mirror_image_promote(pb::MirrorImagePromoteRequest) -> pb::MirrorImageInfo;
        mirror_image_demote(pb::ImageRef) -> pb::MirrorImageInfo;
        mirror_image_resync(pb::MirrorImageResyncRequest) -> pb::Empty;
        mirror_image_snapshot(pb::ImageRef) -> pb::SnapInfo;
        mirror_image_get(pb::ImageRef) -> pb::MirrorImageInfo;
        mirror_image_list(pb::PoolRequest) -> pb::MirrorImageListReply;
        mirror_image_status_get(pb::ImageRef) -> pb::MirrorImageStatus;
        mirror_pool_status(pb::MirrorPoolStatusRequest) -> pb::MirrorPoolStatusReply;
        mirror_schedule_add(pb::MirrorScheduleRequest) -> pb::Empty;
        mirror_schedule_remove(pb::MirrorScheduleRequest) -> pb::Empty;
        mirror_schedule_list(pb::MirrorScheduleRequest) -> pb::MirrorScheduleListReply;
        mirror_schedule_status(pb::MirrorScheduleRequest) -> pb::MirrorScheduleStatusReply;
    }
    mirror_daemon {
        mirror_peer_register(pb::MirrorPeerRegisterRequest) -> pb::MirrorPeerRegisterReply;
        mirror_status_report(pb::MirrorStatusReportRequest) -> pb::Empty;
        mirror_daemon_heartbeat(pb::MirrorDaemonInfo) -> pb::Empty;
        mirror_image_adopt(pb::MirrorImageAdoptRequest) -> pb::MirrorImageInfo;
        mirror_sync_begin(pb::MirrorSyncBeginRequest) -> pb::MirrorSyncState;
        mirror_sync_progress(pb::MirrorSyncProgressRequest) -> pb::Empty;
        mirror_sync_complete(pb::MirrorSyncProgressRequest) -> pb::SnapInfo;
        mirror_snapshot_ack(pb::MirrorSnapshotAckRequest) -> pb::Empty;
        mirror_journal_apply(pb::MirrorJournalApplyRequest) -> pb::MirrorJournalApplyReply;
        mirror_journal_position(pb::MirrorJournalPositionRequest) -> pb::Empty;
    }
}

pub fn image_ref(pool: &str, image: &str) -> pb::ImageRef {
    snap_ref(pool, image, None)
}

/// A reference to `pool/image@snap` (no snap: the head).
pub fn snap_ref(pool: &str, image: &str, snap: Option<&str>) -> pb::ImageRef {
    pb::ImageRef {
        pool: pool.to_string(),
        image: image.to_string(),
        snap: snap.unwrap_or("").to_string(),
    }
}
