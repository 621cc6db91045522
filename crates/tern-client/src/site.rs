use crate::config::{ClusterConfig, Keyring, TlsMode};
use crate::{ClientError, connect};
use std::path::Path;
use tern_proto::headers;
use tern_proto::v1 as pb;
use tern_proto::v1::{
    auth_client, config_client, image_client, io_client, journal_client, lock_client,
    mirror_client, mirror_daemon_client, pool_client, site_client, snap_client,
};
use tern_types::api::Hello;
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
/// and their siblings group its typed calls by service.
#[derive(Clone)]
pub struct SiteClient {
    channel: Channel,
    ident: Identity,
    compressed: bool,
    endpoint: String,
    entity: String,
}

/// The generated clients of every service, over one connection's channel
/// and identity. Only tests of the wire itself (malformed or hostile
/// requests that the typed API cannot express) should use these.
pub struct Wire<'a>(&'a SiteClient);

/// One accessor per service: the generated client over this connection's
/// channel and identity, with its message limits and compression.
macro_rules! services {
    ($($name:ident => $module:ident::$client:ident;)*) => {
        impl Wire<'_> {
            $(
                pub fn $name(&self) -> $module::$client<Transport> {
                    let c = $module::$client::with_interceptor(self.0.channel.clone(), self.0.ident.clone())
                        .max_decoding_message_size(tern_proto::MAX_MESSAGE)
                        .max_encoding_message_size(tern_proto::MAX_MESSAGE);
                    if self.0.compressed {
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
    site => site_client::SiteClient;
    pool => pool_client::PoolClient;
    image => image_client::ImageClient;
    io => io_client::IoClient;
    journal => journal_client::JournalClient;
    snap => snap_client::SnapClient;
    lock => lock_client::LockClient;
    auth => auth_client::AuthClient;
    config => config_client::ConfigClient;
    mirror => mirror_client::MirrorClient;
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

    /// The generated clients: for tests of the wire itself only.
    pub fn wire(&self) -> Wire<'_> {
        Wire(self)
    }

    pub fn err(&self, s: tonic::Status) -> ClientError {
        crate::error::from_status(s, &self.endpoint)
    }

    /// Checks that the site speaks our API version and accepts our key.
    pub async fn hello(&self) -> Result<Hello, ClientError> {
        let r: Hello = self
            .call(self.wire().site().hello(pb::HelloRequest {
                api_version: API_VERSION,
            }))
            .await?;
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
