//! The gRPC API, one module per service. Every handler has one shape:
//! authorise the call ([`Api::run`] or [`Api::call`]), do the work on the
//! blocking pool ([`crate::work::blocking`]), reply. The work itself lives
//! in the site, the store, the mirror records and the modules beside this
//! one (import, export, status, convert).

mod auth;
mod config;
mod image;
mod io;
mod journal;
mod lock;
mod mirror;
mod mirror_daemon;
mod pool;
mod site;
mod snap;

use crate::auth::{Need, UserRecord};
use crate::budget::StreamBudget;
use crate::locks::Locks;
use crate::mirror::Mirror;
use crate::site::Site;
use crate::work::blocking;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tern_daemon::Tasks;
use tern_proto::headers;
use tern_proto::v1 as pb;
use tern_store::{CreateOpts, Image, KvTable, SnapInfo};
use tern_types::error::Error;
use tern_types::{API_VERSION, ErrorKind, Features, Layout, validate_name};
use tonic::{Request, Response, Status};

/// What a handler returns.
pub type Reply<T> = Result<Response<T>, Status>;

/// The boundary error as a gRPC status, its kind in `x-tern-error-kind`.
pub fn status_of(e: Error) -> Status {
    let code = match e.kind {
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorKind::PermissionDenied | ErrorKind::ReadOnly => tonic::Code::PermissionDenied,
        ErrorKind::Busy | ErrorKind::Fenced => tonic::Code::FailedPrecondition,
        ErrorKind::NoSpace => tonic::Code::ResourceExhausted,
        ErrorKind::Corrupt => tonic::Code::DataLoss,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::VersionMismatch => tonic::Code::FailedPrecondition,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(headers::ERROR_KIND, e.kind.as_str().parse().expect("ascii"));
    Status::with_metadata(code, e.message, md)
}

/// How long an exclusive lock lives without renewal (`rbd_lock_lease_seconds`).
pub fn lock_lease(store: &tern_store::Store) -> std::time::Duration {
    let key = "global\0rbd_lock_lease_seconds";
    let secs = store
        .kv_get(KvTable::Config, key)
        .ok()
        .flatten()
        .and_then(|v| v.parse::<f64>().ok());
    use crate::options::{LOCK_LEASE_MAX_SECS, LOCK_LEASE_MIN_SECS, LOCK_LEASE_SECS};
    let secs = secs.unwrap_or(LOCK_LEASE_SECS);
    std::time::Duration::from_secs_f64(secs.clamp(LOCK_LEASE_MIN_SECS, LOCK_LEASE_MAX_SECS))
}

/// The image a request names; a request without one is refused before
/// anything else is looked at.
fn image(r: &Option<pb::ImageRef>) -> Result<&pb::ImageRef, Status> {
    r.as_ref()
        .ok_or_else(|| status_of(Error::invalid("the request names no image")))
}

/// I/O counters per pool since ternd started (`tern pool stats`).
#[derive(Default)]
pub struct PoolCounters {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

impl PoolCounters {
    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Counters(Mutex<HashMap<String, Arc<PoolCounters>>>);

impl Counters {
    pub fn of(&self, pool: &str) -> Arc<PoolCounters> {
        self.0.lock().entry(pool.to_string()).or_default().clone()
    }

    pub fn all(&self) -> Vec<(String, Arc<PoolCounters>)> {
        let map = self.0.lock();
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// What every service works with. Each service's trait is implemented on
/// it in its own module.
pub struct Api {
    pub site: Arc<Site>,
    pub locks: Arc<Locks>,
    pub budget: Arc<StreamBudget>,
    pub counters: Arc<Counters>,
    /// The daemon's tasks, for streams that outlive their handler.
    pub tasks: Tasks,
}

/// One authorised call: who makes it and what its work may use. Cheap to
/// clone; the work of a call runs with it on the blocking pool.
#[derive(Clone)]
pub struct Ctx {
    pub site: Arc<Site>,
    pub locks: Arc<Locks>,
    pub counters: Arc<Counters>,
    pub who: UserRecord,
}

impl Api {
    pub fn new(site: Arc<Site>, locks: Arc<Locks>, budget: Arc<StreamBudget>, tasks: Tasks) -> Api {
        Api {
            site,
            locks,
            budget,
            counters: Arc::default(),
            tasks,
        }
    }

    /// Version check and authentication, then authorisation for `need`:
    /// the context the call's work runs with.
    fn call<T>(&self, req: &Request<T>, need: Need<'_>) -> Result<Ctx, Status> {
        let md = req.metadata();
        let get = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
        };
        if let Some(v) = get(headers::API_VERSION)
            && v != API_VERSION.to_string()
        {
            return Err(status_of(Error::new(
                ErrorKind::VersionMismatch,
                format!(
                    "this site speaks API version {API_VERSION}, the client {v}: upgrade the older side"
                ),
            )));
        }
        let who = self
            .site
            .authenticate(
                get(headers::ENTITY),
                get(headers::KEY),
                req.remote_addr().map(|a| a.ip()),
            )
            .map_err(status_of)?;
        self.site.authorize(&who, need).map_err(status_of)?;
        Ok(Ctx {
            site: self.site.clone(),
            locks: self.locks.clone(),
            counters: self.counters.clone(),
            who,
        })
    }

    /// The shape of a handler: authorises the call for what `need` says of
    /// its message, runs `work` with the message on the blocking pool and
    /// replies with what it returns.
    async fn run<T, R>(
        &self,
        req: Request<T>,
        need: impl for<'a> FnOnce(&'a T) -> Result<Need<'a>, Status>,
        work: impl FnOnce(&Ctx, T) -> Result<R, Error> + Send + 'static,
    ) -> Reply<R>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        let c = self.call(&req, need(req.get_ref())?)?;
        let msg = req.into_inner();
        c.run(move |c| work(c, msg)).await.map(Response::new)
    }
}

impl Ctx {
    /// Runs `work` on the blocking pool with this context.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&Ctx) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Status> {
        let c = self.clone();
        blocking(move || work(&c)).await.map_err(status_of)
    }

    pub(crate) fn mirror(&self) -> Mirror {
        Mirror {
            site: self.site.clone(),
        }
    }

    pub(crate) fn lease(&self) -> std::time::Duration {
        lock_lease(&self.site.store)
    }

    pub(crate) fn open(&self, r: &pb::ImageRef) -> Result<Arc<Image>, Error> {
        Ok(self.site.store.open_image(&r.pool, &r.image)?)
    }

    /// The image and, for `pool/image@snap`, the snapshot to read.
    pub(crate) fn open_at(
        &self,
        r: &pb::ImageRef,
    ) -> Result<(Arc<Image>, Option<SnapInfo>), Error> {
        let img = self.open(r)?;
        if r.snap.is_empty() {
            return Ok((img, None));
        }
        let snap = self.site.store.snap_get(&r.pool, &r.image, &r.snap)?;
        Ok((img, Some(snap)))
    }

    /// Opens an image for writing: refuses snapshots, and enforces the
    /// exclusive lock when the image has that feature.
    pub(crate) fn open_for_write(
        &self,
        r: &pb::ImageRef,
        cookie: &str,
    ) -> Result<Arc<Image>, Error> {
        if !r.snap.is_empty() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "{}/{}@{} is a snapshot: snapshots are read-only",
                    r.pool, r.image, r.snap
                ),
            ));
        }
        let img = self.open(r)?;
        let info = img.info();
        self.refuse_non_primary(r, &info)?;
        if info.features.has(Features::EXCLUSIVE_LOCK) {
            let cookie = if cookie.is_empty() {
                None
            } else {
                Some(cookie)
            };
            let spec = format!("{}/{}", r.pool, r.image);
            self.locks.check_write(
                &self.site.store,
                info.id.as_str(),
                &spec,
                cookie,
                &self.who.entity,
                self.lease(),
            )?;
        }
        Ok(img)
    }

    /// Only the primary copy of a mirrored image takes client writes.
    pub(crate) fn refuse_non_primary(
        &self,
        r: &pb::ImageRef,
        info: &tern_store::ImageInfo,
    ) -> Result<(), Error> {
        if let Some(m) = self.mirror().image(&info.id.to_string())?
            && !m.primary
        {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "{}/{} is a non-primary mirror image: it takes writes only from mirroring. \
                     Promote it (`tern mirror image promote {}/{}`) to write here",
                    r.pool, r.image, r.pool, r.image
                ),
            ));
        }
        Ok(())
    }

    /// For the mirror daemon's sync writes: the image must be non-primary
    /// with a sync in progress.
    pub(crate) fn open_for_sync(&self, r: &pb::ImageRef) -> Result<Arc<Image>, Error> {
        let img = self.open(r)?;
        let m = self.mirror().image(&img.info().id.to_string())?;
        match m {
            Some(m) if !m.primary && m.sync.is_some() => Ok(img),
            Some(m) if m.primary => Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{}/{} is primary here: refusing a mirror sync into it (split-brain?)",
                    r.pool, r.image
                ),
            )),
            _ => Err(Error::invalid(format!(
                "{}/{} has no mirror sync in progress",
                r.pool, r.image
            ))),
        }
    }

    /// How a new image is laid out: what the request says, the site's
    /// `rbd_default_*` options for what it leaves out.
    pub(crate) fn default_create(&self, req: &pb::ImageCreateRequest) -> Result<CreateOpts, Error> {
        validate_name("pool", &req.pool)?;
        validate_name("image", &req.image)?;
        if req.size == 0 {
            return Err(Error::invalid("image size must be greater than 0"));
        }
        let cfg = |k: &str| self.site.config_value("client", k);
        let object_size = if req.object_size != 0 {
            req.object_size
        } else {
            1u64 << cfg("rbd_default_order")?
                .parse::<u32>()
                .unwrap_or(22)
                .clamp(12, 30)
        };
        let default_or = |asked: u64, key: &str| -> Result<Option<u64>, Error> {
            Ok(match (asked, cfg(key)?.parse::<u64>().unwrap_or(0)) {
                (0, 0) => None,
                (0, d) => Some(d),
                (s, _) => Some(s),
            })
        };
        let su = default_or(req.stripe_unit, "rbd_default_stripe_unit")?;
        let sc = default_or(req.stripe_count, "rbd_default_stripe_count")?;
        let layout = Layout::new(object_size, su, sc)?;
        let mut features = if req.features.is_empty() {
            Features::parse_list(&[cfg("rbd_default_features")?])?
        } else {
            Features::parse_list(&req.features)?
        };
        if layout.is_striped() {
            features.0 |= Features::STRIPING;
        }
        features.validate()?;
        Ok(CreateOpts {
            size: req.size,
            layout,
            features,
        })
    }
}

/// Registers every service of the API, each with the message limits and
/// compression the API uses.
macro_rules! servers {
    ($($field:ident: $module:ident::$server:ident,)*) => {
        /// Every service of the API, all served by the one [`Api`].
        pub struct Servers {
            $(pub $field: pb::$module::$server<Api>,)*
        }

        impl Servers {
            pub fn new(api: Arc<Api>) -> Servers {
                use tonic::codec::CompressionEncoding::Zstd;
                Servers {
                    $($field: pb::$module::$server::from_arc(api.clone())
                        .max_decoding_message_size(tern_proto::MAX_MESSAGE)
                        .max_encoding_message_size(tern_proto::MAX_MESSAGE)
                        // Compressed only for clients that ask (rbd_mirror_compression on a daemon).
                        .accept_compressed(Zstd)
                        .send_compressed(Zstd),)*
                }
            }

        }
    };
}

servers! {
    site: site_server::SiteServer,
    pool: pool_server::PoolServer,
    image: image_server::ImageServer,
    io: io_server::IoServer,
    journal: journal_server::JournalServer,
    snap: snap_server::SnapServer,
    lock: lock_server::LockServer,
    auth: auth_server::AuthServer,
    config: config_server::ConfigServer,
    mirror: mirror_server::MirrorServer,
    mirror_daemon: mirror_daemon_server::MirrorDaemonServer,
}
