//! The gRPC service: authenticates and authorises every call, then runs the
//! store's synchronous work on the blocking pool (the one place where
//! blocking I/O meets async, STYLE §6).

use crate::auth::{Need, UserRecord};
use crate::locks::Locks;
use crate::mirror::{self, Mirror};
use crate::options;
use crate::schedule;
use crate::site::Site;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tern_proto::headers;
use tern_proto::v1 as pb;
use tern_store::{CreateOpts, Image, KvTable, SnapInfo, SnapNamespace};
use tern_types::error::Error;
use tern_types::{API_VERSION, ErrorKind, Features, Layout, validate_name};
use tonic::{Request, Response, Status, Streaming};

/// Largest image an import of unknown length may grow to before commit.
const IMPORT_MAX_SIZE: u64 = 1 << 50;
const DATA_CHUNK: u64 = 4 << 20;

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
    std::time::Duration::from_secs_f64(secs.unwrap_or(15.0).clamp(0.5, 3600.0))
}

fn serr(e: tern_store::StoreError) -> Error {
    Error::new(e.kind(), e.to_string())
}

/// I/O counters per pool since ternd started (`tern pool stats`).
#[derive(Default)]
pub struct PoolCounters {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

pub struct Service {
    site: Arc<Site>,
    counters: Mutex<HashMap<String, Arc<PoolCounters>>>,
    locks: Arc<Locks>,
    budget: Arc<crate::budget::StreamBudget>,
}

type SResult<T> = Result<Response<T>, Status>;

/// Sets a generated server's message limits and compression.
macro_rules! api {
    ($($field:ident: $module:ident::$server:ident,)*) => {
        /// Every service of the API, each served by the one [`Service`].
        pub struct Api {
            $(pub $field: pb::$module::$server<Service>,)*
        }

        impl Api {
            pub fn new(svc: Arc<Service>) -> Api {
                use tonic::codec::CompressionEncoding::Zstd;
                Api {
                    $($field: pb::$module::$server::from_arc(svc.clone())
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

api! {
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(status_of),
        Err(e) => Err(status_of(Error::new(
            ErrorKind::Internal,
            format!("worker failed: {e}"),
        ))),
    }
}

fn image_info_pb(info: &tern_store::ImageInfo, used: Option<u64>) -> pb::ImageInfo {
    pb::ImageInfo {
        pool: info.pool.clone(),
        name: info.name.clone(),
        id: info.id.to_string(),
        size: info.size,
        object_size: info.layout.object_size,
        stripe_unit: info.layout.stripe_unit,
        stripe_count: info.layout.stripe_count,
        features: info.features.0,
        feature_names: info
            .features
            .names()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        created: info.created,
        modified: info.modified,
        objects: info.layout.object_count(info.size),
        used_bytes: used.unwrap_or(0),
        snapshot_count: info.snap_count,
        ..Default::default()
    }
}

fn pool_pb(p: tern_store::PoolInfo) -> pb::PoolInfo {
    pb::PoolInfo {
        id: p.id,
        name: p.name,
        application: p.application.unwrap_or_default(),
        created: p.created,
    }
}

fn journal_client_pb(c: &tern_store::journal::ClientInfo) -> pb::JournalClientInfo {
    pb::JournalClientInfo {
        id: c.id.clone(),
        commit_tid: c.commit_tid,
        disconnected: c.disconnected,
        entries_behind: c.entries_behind,
    }
}

pub fn durability_name(d: tern_store::JournalDurability) -> &'static str {
    match d {
        tern_store::JournalDurability::Strict => "strict",
        tern_store::JournalDurability::OnFlush => "flush",
    }
}

fn image_ref(r: Option<pb::ImageRef>) -> Result<pb::ImageRef, Status> {
    r.ok_or_else(|| status_of(Error::invalid("the request names no image")))
}

impl Service {
    pub fn new(
        site: Arc<Site>,
        locks: Arc<Locks>,
        budget: Arc<crate::budget::StreamBudget>,
    ) -> Service {
        Service {
            site,
            counters: Mutex::new(HashMap::new()),
            locks,
            budget,
        }
    }

    pub(crate) fn stream_budget(&self) -> &Arc<crate::budget::StreamBudget> {
        &self.budget
    }

    pub(crate) fn site_ref(&self) -> &Arc<Site> {
        &self.site
    }

    pub(crate) fn all_counters(&self) -> Vec<(String, Arc<PoolCounters>)> {
        self.counters
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) async fn pool_status_of(
        &self,
        pool: &str,
    ) -> Result<pb::MirrorPoolStatusReply, Status> {
        self.pool_status(pool).await
    }

    fn counters(&self, pool: &str) -> Arc<PoolCounters> {
        self.counters
            .lock()
            .entry(pool.to_string())
            .or_default()
            .clone()
    }

    /// Version check and authentication, then authorisation for `need`.
    fn check<T>(&self, req: &Request<T>, need: Need<'_>) -> Result<UserRecord, Status> {
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
        Ok(who)
    }

    fn open(&self, r: &pb::ImageRef) -> Result<Arc<Image>, Error> {
        self.site.store.open_image(&r.pool, &r.image).map_err(serr)
    }

    /// The image and, for `pool/image@snap`, the snapshot to read.
    fn open_at(&self, r: &pb::ImageRef) -> Result<(Arc<Image>, Option<SnapInfo>), Error> {
        let img = self.open(r)?;
        if r.snap.is_empty() {
            return Ok((img, None));
        }
        let snap = self
            .site
            .store
            .snap_get(&r.pool, &r.image, &r.snap)
            .map_err(serr)?;
        Ok((img, Some(snap)))
    }

    fn lease(&self) -> std::time::Duration {
        lock_lease(&self.site.store)
    }

    /// Opens an image for writing: refuses snapshots, and enforces the
    /// exclusive lock when the image has that feature.
    fn open_for_write(
        &self,
        r: &pb::ImageRef,
        cookie: &str,
        who: &UserRecord,
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
                &who.entity,
                self.lease(),
            )?;
        }
        Ok(img)
    }

    /// Only the primary copy of a mirrored image takes client writes.
    fn refuse_non_primary(
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
    fn open_for_sync(&self, r: &pb::ImageRef) -> Result<Arc<Image>, Error> {
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

    fn default_create(&self, req: &pb::ImageCreateRequest) -> Result<CreateOpts, Error> {
        validate_name("pool", &req.pool)?;
        validate_name("image", &req.image)?;
        if req.size == 0 {
            return Err(Error::invalid("image size must be greater than 0"));
        }
        let cfg = |k: &str| self.config_value("client", k);
        let object_size = if req.object_size != 0 {
            req.object_size
        } else {
            1u64 << cfg("rbd_default_order")?
                .parse::<u32>()
                .unwrap_or(22)
                .clamp(12, 30)
        };
        let su = match (
            req.stripe_unit,
            cfg("rbd_default_stripe_unit")?.parse::<u64>().unwrap_or(0),
        ) {
            (0, 0) => None,
            (0, d) => Some(d),
            (s, _) => Some(s),
        };
        let sc = match (
            req.stripe_count,
            cfg("rbd_default_stripe_count")?.parse::<u64>().unwrap_or(0),
        ) {
            (0, 0) => None,
            (0, d) => Some(d),
            (s, _) => Some(s),
        };
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

    /// The effective value of an option for `who` (set value or default).
    fn config_value(&self, who: &str, key: &str) -> Result<String, Error> {
        self.site.config_value(who, key)
    }

    /// Checks the caller may change config section `who` and returns its
    /// stored form: `image:POOL/IMAGE` (rbd config image) becomes
    /// `image.<id>`, so the setting follows the image through renames.
    fn config_who<T>(&self, req: &Request<T>, who: &str, key: &str) -> Result<String, Status> {
        let Some(spec) = who.strip_prefix("image:") else {
            self.check(req, Need::Admin)?;
            return Ok(who.to_string());
        };
        let (pool, image) = spec.split_once('/').ok_or_else(|| {
            status_of(Error::invalid(format!(
                "'{spec}' is not an image spec: use POOL/IMAGE"
            )))
        })?;
        self.check(req, Need::Write(pool))?;
        if !key.is_empty() && !key.starts_with("rbd_") {
            return Err(status_of(Error::invalid(format!(
                "'{key}' is not an image option: only rbd_* options can be set per image"
            ))));
        }
        let info = self
            .site
            .store
            .image_info(pool, image)
            .map_err(|e| status_of(serr(e)))?;
        Ok(format!("image.{}", info.id))
    }

    fn entity_pb(&self, rec: &UserRecord, created: bool) -> pb::AuthEntity {
        pb::AuthEntity {
            entity: rec.entity.clone(),
            key: self.site.key_of(rec),
            caps: rec.caps.clone().into_iter().collect(),
            profile: rec.profile.as_str().to_string(),
            created,
        }
    }
}

fn statvfs(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0);
    }
    let bs = s.f_frsize;
    (s.f_blocks * bs, s.f_bavail * bs)
}

#[tonic::async_trait]
impl pb::site_server::Site for Service {
    async fn hello(&self, req: Request<pb::HelloRequest>) -> SResult<pb::HelloReply> {
        let who = self.check(&req, Need::SiteRead)?;
        Ok(Response::new(pb::HelloReply {
            api_version: API_VERSION,
            site_id: self.site.site_id.clone(),
            site_name: self.site.site_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            entity: who.entity,
            profile: who.profile.as_str().to_string(),
        }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> SResult<pb::StatusReply> {
        self.check(&req, Need::SiteRead)?;
        let site = self.site.clone();
        let reply = blocking(move || {
            let pools = site.store.pool_list().map_err(serr)?;
            let mut checks = Vec::new();
            let (mut images, mut provisioned) = (0, 0);
            let no_app: Vec<_> = pools.iter().filter(|p| p.application.is_none()).map(|p| p.name.clone()).collect();
            if !no_app.is_empty() {
                checks.push(format!(
                    "POOL_APP_NOT_ENABLED: {} pool(s) do not have an application enabled ({}): run `tern pool init POOL`",
                    no_app.len(),
                    no_app.join(", ")
                ));
            }
            for p in &pools {
                let st = site.store.pool_stats(&p.name).map_err(serr)?;
                images += st.images;
                provisioned += st.provisioned_bytes;
            }
            let used = site.store.used_bytes().map_err(serr)?;
            let (total, avail) = statvfs(&site.data_dir);
            let mut health = if checks.is_empty() { "HEALTH_OK" } else { "HEALTH_WARN" };
            if total > 0 && avail * 100 / total < 3 {
                checks.push(format!("OSD_FULL: data disk has {} free", tern_types::format_size(avail)));
                health = "HEALTH_ERR";
            } else if total > 0 && avail * 100 / total < 10 {
                checks.push(format!("OSD_NEARFULL: data disk has {} free", tern_types::format_size(avail)));
                health = "HEALTH_WARN";
            }
            Ok(pb::StatusReply {
                site_id: site.site_id.clone(),
                site_name: site.site_name.clone(),
                health: health.into(),
                health_checks: checks,
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_secs: site.started.elapsed().as_secs(),
                pools: pools.len() as u64,
                images,
                provisioned_bytes: provisioned,
                used_bytes: used,
                avail_bytes: avail,
                total_bytes: total,
                nbd_endpoint: site.store.kv_get(KvTable::Site, "nbd_endpoint").map_err(serr)?.unwrap_or_default(),
                endpoints: site
                    .store
                    .kv_get(KvTable::Site, "endpoints")
                    .map_err(serr)?
                    .map(|s| s.split(',').map(String::from).collect())
                    .unwrap_or_default(),
            })
        })
        .await?;
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl pb::pool_server::Pool for Service {
    async fn pool_create(&self, req: Request<pb::PoolRequest>) -> SResult<pb::PoolInfo> {
        self.check(&req, Need::Admin)?;
        let pool = req.into_inner().pool;
        let site = self.site.clone();
        let p = blocking(move || {
            validate_name("pool", &pool)?;
            site.store.pool_create(&pool).map_err(serr)
        })
        .await?;
        tracing::info!(pool = %p.name, "pool created");
        Ok(Response::new(pool_pb(p)))
    }

    async fn pool_init(&self, req: Request<pb::PoolInitRequest>) -> SResult<pb::PoolInfo> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let site = self.site.clone();
        let app = if r.application.is_empty() {
            "rbd".to_string()
        } else {
            r.application
        };
        let p = blocking(move || site.store.pool_init(&r.pool, &app).map_err(serr)).await?;
        Ok(Response::new(pool_pb(p)))
    }

    async fn pool_list(&self, req: Request<pb::Empty>) -> SResult<pb::PoolListReply> {
        self.check(&req, Need::SiteRead)?;
        let site = self.site.clone();
        let pools = blocking(move || site.store.pool_list().map_err(serr)).await?;
        Ok(Response::new(pb::PoolListReply {
            pools: pools.into_iter().map(pool_pb).collect(),
        }))
    }

    async fn pool_stats(&self, req: Request<pb::PoolRequest>) -> SResult<pb::PoolStatsReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let site = self.site.clone();
        let p = pool.clone();
        let st = blocking(move || site.store.pool_stats(&p).map_err(serr)).await?;
        let c = self.counters(&pool);
        Ok(Response::new(pb::PoolStatsReply {
            pool,
            images: st.images,
            provisioned_bytes: st.provisioned_bytes,
            used_bytes: st.used_bytes,
            objects: st.objects,
            read_ops: c.read_ops.load(Ordering::Relaxed),
            write_ops: c.write_ops.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            write_bytes: c.write_bytes.load(Ordering::Relaxed),
        }))
    }

    async fn pool_remove(&self, req: Request<pb::PoolRemoveRequest>) -> SResult<pb::Empty> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let site = self.site.clone();
        blocking(move || site.store.pool_remove(&r.pool, r.force).map_err(serr)).await?;
        Ok(Response::new(pb::Empty {}))
    }
}

#[tonic::async_trait]
impl pb::image_server::Image for Service {
    async fn image_create(&self, req: Request<pb::ImageCreateRequest>) -> SResult<pb::ImageInfo> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Write(&pool))?;
        let r = req.into_inner();
        let opts = self.default_create(&r).map_err(status_of)?;
        let site = self.site.clone();
        let m = self.mirror();
        let info = blocking(move || {
            let info = site
                .store
                .image_create(&r.pool, &r.image, &opts)
                .map_err(serr)?;
            // In pool mode every image is mirrored, as with rbd.
            if m.pool(&r.pool)?.is_some_and(|p| p.mode == "pool") {
                m.image_enable(&r.pool, &r.image, "snapshot")?;
            }
            Ok(info)
        })
        .await?;
        tracing::info!(image = %format!("{}/{}", info.pool, info.name), size = info.size, "image created");
        Ok(Response::new(image_info_pb(&info, Some(0))))
    }

    async fn image_list(&self, req: Request<pb::PoolRequest>) -> SResult<pb::ImageListReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let site = self.site.clone();
        let images = blocking(move || {
            let list = site.store.image_list(&pool).map_err(serr)?;
            Ok(list.iter().map(|i| image_info_pb(i, None)).collect())
        })
        .await?;
        Ok(Response::new(pb::ImageListReply { images }))
    }

    async fn image_get(&self, req: Request<pb::ImageRef>) -> SResult<pb::ImageInfo> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let r = req.into_inner();
        let site = self.site.clone();
        let info = blocking(move || {
            let info = site.store.image_info(&r.pool, &r.image).map_err(serr)?;
            let used = site
                .store
                .open_image(&r.pool, &r.image)
                .and_then(|i| i.used_bytes())
                .map_err(serr)?;
            let mut out = image_info_pb(&info, Some(used));
            out.snapshot_count =
                site.store.snap_list(&r.pool, &r.image).map_err(serr)?.len() as u64;
            if !r.snap.is_empty() {
                let snap = site
                    .store
                    .snap_get(&r.pool, &r.image, &r.snap)
                    .map_err(serr)?;
                out.size = snap.size;
                out.objects = info.layout.object_count(snap.size);
                out.snap = snap.name;
                out.snap_id = snap.id;
                out.protected = snap.protected;
            }
            Ok(out)
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn image_resize(&self, req: Request<pb::ImageResizeRequest>) -> SResult<pb::ImageInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let site = self.site.clone();
        let info = blocking(move || {
            if q.size == 0 {
                return Err(Error::invalid("image size must be greater than 0"));
            }
            site.store
                .image_resize(&r.pool, &r.image, q.size, q.allow_shrink)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(image_info_pb(&info, None)))
    }

    async fn image_rename(&self, req: Request<pb::ImageRenameRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let new = req.into_inner().new_name;
        let site = self.site.clone();
        blocking(move || {
            validate_name("image", &new)?;
            site.store
                .image_rename(&r.pool, &r.image, &new)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn image_remove(&self, req: Request<pb::ImageRef>) -> SResult<pb::Empty> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Write(&pool))?;
        let r = req.into_inner();
        let (site, locks) = (self.site.clone(), self.locks.clone());
        blocking(move || {
            let id = site
                .store
                .image_info(&r.pool, &r.image)
                .map_err(serr)?
                .id
                .to_string();
            let spec = format!("{}/{}", r.pool, r.image);
            locks.remove_unless_open(&id, &spec, || {
                site.store.image_remove(&r.pool, &r.image).map_err(serr)
            })
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn image_features(
        &self,
        req: Request<pb::ImageFeaturesRequest>,
    ) -> SResult<pb::ImageInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let site = self.site.clone();
        let info = blocking(move || {
            let bits = |names: &[String]| -> Result<u64, Error> {
                if names.is_empty() {
                    return Ok(0);
                }
                Ok(Features::parse_list(names)?.0)
            };
            let (enable, disable) = (bits(&q.enable)?, bits(&q.disable)?);
            if enable == 0 && disable == 0 {
                return Err(Error::invalid("name at least one feature to change"));
            }
            site.store
                .image_set_features(&r.pool, &r.image, enable, disable)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(image_info_pb(&info, None)))
    }

    async fn image_checksum(
        &self,
        req: Request<pb::ChecksumRequest>,
    ) -> SResult<pb::ChecksumReply> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
        let chunk = req.get_ref().chunk_size;
        let chunk = if chunk == 0 {
            4 << 20
        } else {
            chunk.clamp(64 << 10, 64 << 20)
        };
        let (img, snap) = self.open_at(&r).map_err(status_of)?;
        let size = snap.as_ref().map(|s| s.size).unwrap_or_else(|| img.size());
        let at = snap.map(|s| s.id);
        let hashes = blocking(move || {
            let zero = blake3::hash(&vec![0u8; chunk as usize]);
            let mut out = Vec::new();
            let mut buf = vec![0u8; chunk as usize];
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                // Holes need no reading: a chunk with no data hashes as zeros.
                let allocated = img.allocated_extents_at(at, off, n).map_err(serr)?;
                let h = if allocated.is_empty() && n == chunk {
                    zero
                } else {
                    img.read_at(at, off, &mut buf[..n as usize]).map_err(serr)?;
                    blake3::hash(&buf[..n as usize])
                };
                out.push(h.as_bytes().to_vec());
                off += n;
            }
            Ok(out)
        })
        .await?;
        Ok(Response::new(pb::ChecksumReply {
            size,
            chunk_size: chunk,
            hashes,
        }))
    }
}

#[tonic::async_trait]
impl pb::io_server::Io for Service {
    async fn read(&self, req: Request<pb::ReadRequest>) -> SResult<pb::ReadReply> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
        let q = req.into_inner();
        if q.length > tern_proto::MAX_MESSAGE as u64 - 4096 {
            return Err(status_of(Error::invalid(
                "read larger than 16 MiB: use ReadStream",
            )));
        }
        let (img, snap) = self.open_at(&r).map_err(status_of)?;
        let snap_id = snap.map(|s| s.id);
        let c = self.counters(&r.pool);
        let data = blocking(move || {
            let mut buf = vec![0u8; q.length as usize];
            img.read_at(snap_id, q.offset, &mut buf).map_err(serr)?;
            Ok(buf)
        })
        .await?;
        c.read_ops.fetch_add(1, Ordering::Relaxed);
        c.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Response::new(pb::ReadReply { data }))
    }

    async fn write(&self, req: Request<pb::WriteRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        let who = self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let img = self
            .open_for_write(&r, &q.lock_cookie, &who)
            .map_err(status_of)?;
        let c = self.counters(&r.pool);
        let n = q.data.len() as u64;
        blocking(move || img.write(q.offset, &q.data, q.fua).map_err(serr)).await?;
        c.write_ops.fetch_add(1, Ordering::Relaxed);
        c.write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(Response::new(pb::Empty {}))
    }

    async fn discard(&self, req: Request<pb::RangeRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        let who = self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let img = self
            .open_for_write(&r, &q.lock_cookie, &who)
            .map_err(status_of)?;
        blocking(move || img.discard(q.offset, q.length).map_err(serr)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn write_zeroes(&self, req: Request<pb::RangeRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        let who = self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let img = self
            .open_for_write(&r, &q.lock_cookie, &who)
            .map_err(status_of)?;
        blocking(move || img.write_zeroes(q.offset, q.length).map_err(serr)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn flush(&self, req: Request<pb::ImageRef>) -> SResult<pb::Empty> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Write(&pool))?;
        let img = self.open(req.get_ref()).map_err(status_of)?;
        blocking(move || img.flush().map_err(serr)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    type ReadStreamStream = crate::budget::Rx<pb::DataChunk>;

    async fn read_stream(
        &self,
        req: Request<pb::ReadStreamRequest>,
    ) -> SResult<Self::ReadStreamStream> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
        let req_conn = req.extensions().get::<crate::listen::ConnInfo>().cloned();
        let q = req.into_inner();
        let (img, snap) = self.open_at(&r).map_err(status_of)?;
        let size = snap.as_ref().map(|s| s.size).unwrap_or_else(|| img.size());
        let to = snap.as_ref().map(|s| s.id);
        let end = if q.length == 0 {
            size
        } else {
            q.offset.saturating_add(q.length).min(size)
        };
        if q.offset > size {
            return Err(status_of(Error::invalid(format!(
                "offset {} is past the end ({size})",
                q.offset
            ))));
        }
        let from = if q.diff && !q.diff_from.is_empty() {
            let f = self
                .site
                .store
                .snap_get(&r.pool, &r.image, &q.diff_from)
                .map_err(|e| status_of(serr(e)))?;
            if to.is_some_and(|t| t < f.id) {
                return Err(status_of(Error::invalid(format!(
                    "snapshot '{}' is newer than '{}': a diff runs from an older point to a newer one",
                    q.diff_from, r.snap
                ))));
            }
            Some(f.id)
        } else {
            None
        };
        let chunk = if q.chunk_size == 0 {
            DATA_CHUNK
        } else {
            (q.chunk_size as u64).clamp(4096, 8 << 20)
        };
        let (tx, rx) = self.budget.stream(chunk as usize, req_conn.map(|c| c.0));
        let c = self.counters(&r.pool);
        let (diff, whole) = (q.diff, q.whole_object);
        tokio::spawn(async move {
            let res = if diff {
                let extra: Vec<(u64, u64)> = q
                    .extra
                    .iter()
                    .filter(|e| e.offset < end && e.offset + e.length > q.offset)
                    .map(|e| {
                        let o = e.offset.max(q.offset);
                        (o, (e.offset + e.length).min(end) - o)
                    })
                    .collect();
                stream_diff(img, from, to, q.offset, end, chunk, whole, extra, &tx, &c).await
            } else {
                stream_out(img, to, q.offset, end, chunk, &tx, &c).await
            };
            if let Err(e) = res {
                tx.fail(e);
            }
        });
        Ok(Response::new(rx))
    }

    async fn write_stream(
        &self,
        req: Request<Streaming<pb::WriteStreamMessage>>,
    ) -> SResult<pb::WriteStreamReply> {
        // Authenticated here; the pool is known only from the first message.
        let who = self.check(&req, Need::SiteRead)?;
        let mut stream = req.into_inner();
        use pb::write_stream_message::Msg;
        let first = stream.message().await?.and_then(|m| m.msg);
        let Some(Msg::Open(open)) = first else {
            return Err(status_of(Error::invalid(
                "a write stream must start with an open message",
            )));
        };
        let mut sync_fence = None;
        let mut import = match (open.create, open.image) {
            (Some(create), _) => {
                self.site
                    .authorize(&who, Need::Write(&create.pool))
                    .map_err(status_of)?;
                Import::create(&self.site, self, create).await?
            }
            (None, Some(r)) => {
                self.site
                    .authorize(&who, Need::Write(&r.pool))
                    .map_err(status_of)?;
                let img = if open.mirror_sync {
                    self.site
                        .authorize(&who, Need::MirrorDaemon(&r.pool))
                        .map_err(status_of)?;
                    let img = self.open_for_sync(&r).map_err(status_of)?;
                    sync_fence = Some(SyncFence {
                        image_id: img.info().id.to_string(),
                        spec: format!("{}/{}", r.pool, r.image),
                        expect_epoch: open.expect_epoch,
                    });
                    img
                } else {
                    self.open_for_write(&r, &open.lock_cookie, &who)
                        .map_err(status_of)?
                };
                let mut import = Import {
                    img,
                    target: r,
                    hidden: None,
                    site: self.site.clone(),
                    data: 0,
                    zeros: 0,
                    safety: None,
                    diff_to: None,
                    limit: u64::MAX,
                    fence: sync_fence,
                };
                if let Some(d) = open.diff {
                    import.begin_diff(d).await?;
                }
                import
            }
            (None, None) => return Err(status_of(Error::invalid("open names no image"))),
        };
        let c = self.counters(&import.target.pool);
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m.msg,
                Ok(None) => {
                    import.abort().await;
                    return Err(status_of(Error::invalid(
                        "the write stream ended before its commit: the import was discarded",
                    )));
                }
                Err(e) => {
                    import.abort().await;
                    return Err(e);
                }
            };
            let res = match msg {
                Some(Msg::Chunk(ch)) => {
                    let n = ch.length;
                    let r = import.chunk(ch).await;
                    c.write_ops.fetch_add(1, Ordering::Relaxed);
                    c.write_bytes.fetch_add(n, Ordering::Relaxed);
                    r
                }
                Some(Msg::Commit(cm)) => {
                    let reply = import.commit(cm).await;
                    return reply.map(Response::new);
                }
                _ => Err(status_of(Error::invalid(
                    "unexpected message in a write stream",
                ))),
            };
            if let Err(e) = res {
                import.abort().await;
                return Err(e);
            }
        }
    }
}

#[tonic::async_trait]
impl pb::journal_server::Journal for Service {
    async fn journal_info(&self, req: Request<pb::ImageRef>) -> SResult<pb::JournalInfoReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let r = req.into_inner();
        let site = self.site.clone();
        let reply = blocking(move || {
            let j = site.store.journal(&r.pool, &r.image).map_err(serr)?;
            let i = j.info();
            let age = site.config_f64(&format!("image.{}", i.image_id), "rbd_journal_commit_age");
            let splay =
                site.config_f64(&format!("image.{}", i.image_id), "rbd_journal_splay_width");
            Ok(pb::JournalInfoReply {
                image_id: i.image_id.to_string(),
                segments: i
                    .segments
                    .iter()
                    .map(|s| pb::JournalSegment {
                        segno: s.segno,
                        first_tid: s.first_tid,
                        entries: s.entries,
                        bytes: s.bytes,
                    })
                    .collect(),
                bytes: i.bytes,
                first_tid: i.first_tid,
                last_tid: i.last_tid,
                durable_tid: i.durable_tid,
                applied_tid: i.applied_tid,
                clients: i.clients.iter().map(journal_client_pb).collect(),
                segment_size: i.options.segment_size,
                max_size: i.options.max_size,
                durability: durability_name(i.options.durability).into(),
                syncs: i.syncs,
                commit_age: age,
                splay_width: splay as u64,
            })
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn journal_inspect(
        &self,
        req: Request<pb::ImageRef>,
    ) -> SResult<pb::JournalInspectReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let r = req.into_inner();
        let site = self.site.clone();
        let rep = blocking(move || {
            let j = site.store.journal(&r.pool, &r.image).map_err(serr)?;
            j.inspect().map_err(serr)
        })
        .await?;
        Ok(Response::new(pb::JournalInspectReply {
            segments: rep.segments,
            entries: rep.entries,
            bytes: rep.bytes,
            first_tid: rep.first_tid.unwrap_or(0),
            last_tid: rep.last_tid.unwrap_or(0),
            counts: rep.counts.into_iter().collect(),
            errors: rep.errors,
        }))
    }

    type JournalReadStream = crate::budget::Rx<pb::JournalChunk>;

    async fn journal_read(
        &self,
        req: Request<pb::JournalReadRequest>,
    ) -> SResult<Self::JournalReadStream> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
        let conn = req
            .extensions()
            .get::<crate::listen::ConnInfo>()
            .map(|c| c.0.clone());
        let q = req.into_inner();
        let site = self.site.clone();
        let (pool, image) = (r.pool.clone(), r.image.clone());
        let j = blocking(move || site.store.journal(&pool, &image).map_err(serr)).await?;
        let max = if q.max_bytes == 0 {
            4 << 20
        } else {
            q.max_bytes.clamp(4096, 8 << 20)
        };
        let (tx, rx) = self.budget.stream(max as usize, conn);
        tokio::spawn(async move {
            let mut next = if q.from_tid == 0 {
                j.info().first_tid
            } else {
                q.from_tid
            };
            loop {
                // Room first: entries read are charged until sent.
                let Ok(mut room) = tx.reserve(max as usize).await else {
                    return;
                };
                let jj = j.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let entries = jj.read_from(next, max)?;
                    if entries.is_empty() && q.follow {
                        // A stream, not polling: woken by the next commit.
                        jj.wait_for(next - 1, std::time::Duration::from_secs(1));
                    }
                    Ok::<_, tern_store::StoreError>((entries, jj.durable_tid()))
                })
                .await;
                let (entries, durable) = match read {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => {
                        tx.fail(status_of(serr(e)));
                        return;
                    }
                    Err(e) => {
                        tx.fail(Status::internal(e.to_string()));
                        return;
                    }
                };
                if entries.is_empty() {
                    if !q.follow || tx.is_closed() {
                        return;
                    }
                    continue;
                }
                let first_tid = entries[0].tid;
                let last_tid = entries[entries.len() - 1].tid;
                let mut buf = Vec::new();
                for e in &entries {
                    e.encode_into(&mut buf);
                }
                next = last_tid + 1;
                let chunk = pb::JournalChunk {
                    entries: buf,
                    first_tid,
                    last_tid,
                    durable_tid: durable,
                };
                tx.push(&mut room, chunk);
            }
        });
        Ok(Response::new(rx))
    }

    async fn journal_extents(
        &self,
        req: Request<pb::JournalExtentsRequest>,
    ) -> SResult<pb::DiffReply> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
        let after = req.get_ref().after_tid;
        let site = self.site.clone();
        let reply = blocking(move || {
            use tern_store::journal::JournalOp;
            let j = site.store.journal(&r.pool, &r.image).map_err(serr)?;
            let gone = |why: String| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "the journal of {}/{} cannot list the writes after entry {after}: {why}",
                        r.pool, r.image
                    ),
                )
            };
            let mut v: Vec<(u64, u64)> = Vec::new();
            let mut expect = after + 1;
            for e in j.entries(after + 1) {
                let e = e.map_err(|e| gone(e.to_string()))?;
                if e.tid != expect {
                    return Err(gone(format!("it starts at entry {}", e.tid)));
                }
                expect += 1;
                match e.op {
                    JournalOp::Write { offset, data } => v.push((offset, data.len() as u64)),
                    JournalOp::Discard { offset, len } | JournalOp::WriteZeroes { offset, len } => {
                        v.push((offset, len))
                    }
                    JournalOp::Resize { .. } | JournalOp::SnapRollback { .. } => {
                        return Err(gone(format!(
                            "entry {} is a {} (not a set of extents)",
                            e.tid,
                            e.op.name()
                        )));
                    }
                    _ => {}
                }
            }
            if expect == after + 1 && j.info().first_tid > after + 1 && j.last_tid() > after {
                return Err(gone("they were trimmed".into()));
            }
            let extents = merge_extents(v)
                .into_iter()
                .map(|(offset, length)| pb::DiffExtent {
                    offset,
                    length,
                    data: true,
                })
                .collect();
            Ok(pb::DiffReply {
                extents,
                size: 0,
                granularity: 1,
            })
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn journal_client(
        &self,
        req: Request<pb::JournalClientRequest>,
    ) -> SResult<pb::JournalClientInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        let q = req.get_ref().clone();
        // Reading positions is reading; holding back trimming is what a
        // peer's replayer (or an image writer) may do.
        if q.action == "get" {
            self.check(&req, Need::Read(&r.pool))?;
        } else if self.check(&req, Need::MirrorPeer(&r.pool)).is_err() {
            self.check(&req, Need::Write(&r.pool))?;
        }
        let site = self.site.clone();
        let info = blocking(move || {
            let j = site.store.journal(&r.pool, &r.image).map_err(serr)?;
            match q.action.as_str() {
                "register" => j.register_client(&q.client).map_err(serr),
                "unregister" => {
                    let c = j.client(&q.client).map_err(serr)?;
                    j.unregister_client(&q.client).map_err(serr)?;
                    Ok(c)
                }
                "commit" => {
                    j.commit(&q.client, q.tid).map_err(serr)?;
                    j.client(&q.client).map_err(serr)
                }
                "get" => j.client(&q.client).map_err(serr),
                other => Err(Error::invalid(format!(
                    "unknown journal client action '{other}': use register, unregister, commit or get"
                ))),
            }
        })
        .await?;
        Ok(Response::new(journal_client_pb(&info)))
    }
}

#[tonic::async_trait]
impl pb::snap_server::Snap for Service {
    async fn snap_create(&self, req: Request<pb::SnapRequest>) -> SResult<pb::SnapInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let name = req.into_inner().snap;
        let site = self.site.clone();
        let info = blocking(move || {
            validate_name("snapshot", &name)?;
            site.store
                .snap_create(&r.pool, &r.image, &name, SnapNamespace::User)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(snap_pb(&info)))
    }

    async fn snap_list(&self, req: Request<pb::SnapListRequest>) -> SResult<pb::SnapListReply> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
        let all = req.get_ref().all;
        let site = self.site.clone();
        let snaps = blocking(move || site.store.snap_list(&r.pool, &r.image).map_err(serr)).await?;
        let snaps = snaps
            .iter()
            .filter(|s| {
                all || (matches!(s.namespace, SnapNamespace::User) && !s.name.starts_with('.'))
            })
            .map(snap_pb)
            .collect();
        Ok(Response::new(pb::SnapListReply { snaps }))
    }

    async fn snap_remove(&self, req: Request<pb::SnapRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let name = req.into_inner().snap;
        let site = self.site.clone();
        blocking(move || {
            site.store
                .snap_remove(&r.pool, &r.image, &name, false)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn snap_rename(&self, req: Request<pb::SnapRenameRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let site = self.site.clone();
        blocking(move || {
            validate_name("snapshot", &q.new_name)?;
            site.store
                .snap_rename(&r.pool, &r.image, &q.snap, &q.new_name)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn snap_rollback(&self, req: Request<pb::SnapRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        let who = self.check(&req, Need::Write(&r.pool))?;
        let name = req.into_inner().snap;
        // A rollback rewrites the image: it must not race a lock holder.
        self.open_for_write(
            &pb::ImageRef {
                snap: String::new(),
                ..r.clone()
            },
            "",
            &who,
        )
        .map_err(status_of)?;
        let site = self.site.clone();
        blocking(move || {
            site.store
                .snap_rollback(&r.pool, &r.image, &name)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn snap_protect(&self, req: Request<pb::SnapProtectRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let site = self.site.clone();
        blocking(move || {
            site.store
                .snap_set_protected(&r.pool, &r.image, &q.snap, q.protect)
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn snap_purge(&self, req: Request<pb::ImageRef>) -> SResult<pb::SnapPurgeReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Write(&pool))?;
        let r = req.into_inner();
        let site = self.site.clone();
        let removed =
            blocking(move || site.store.snap_purge(&r.pool, &r.image).map_err(serr)).await?;
        Ok(Response::new(pb::SnapPurgeReply { removed }))
    }

    async fn diff(&self, req: Request<pb::DiffRequest>) -> SResult<pb::DiffReply> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
        let q = req.into_inner();
        let (img, to) = self.open_at(&r).map_err(status_of)?;
        let site = self.site.clone();
        let reply = blocking(move || {
            let from = if q.from_snap.is_empty() {
                None
            } else {
                Some(site.store.snap_get(&r.pool, &r.image, &q.from_snap).map_err(serr)?)
            };
            if let (Some(f), Some(t)) = (&from, &to)
                && f.id > t.id
            {
                return Err(Error::invalid(format!(
                    "snapshot '{}' is newer than '{}': a diff runs from an older point to a newer one",
                    f.name, t.name
                )));
            }
            let size = to.as_ref().map(|t| t.size).unwrap_or_else(|| img.size());
            let len = if q.length == 0 { size.saturating_sub(q.offset) } else { q.length };
            let extents = img
                .diff(from.map(|f| f.id), to.map(|t| t.id), q.offset, len, q.whole_object)
                .map_err(serr)?
                .into_iter()
                .map(|e| pb::DiffExtent { offset: e.offset, length: e.length, data: e.data })
                .collect();
            Ok(pb::DiffReply { extents, size, granularity: img.diff_granularity() })
        })
        .await?;
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl pb::lock_server::Lock for Service {
    async fn lock_acquire(&self, req: Request<pb::LockRequest>) -> SResult<pb::LockInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        let who = self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        if q.cookie.is_empty() {
            return Err(status_of(Error::invalid("a lock needs a cookie")));
        }
        let img = self.open(&r).map_err(status_of)?;
        let info = img.info();
        if !info.features.has(Features::EXCLUSIVE_LOCK) {
            return Err(status_of(Error::invalid(format!(
                "{}/{} does not have the exclusive-lock feature",
                r.pool, r.image
            ))));
        }
        let lease = self.lease();
        let spec = format!("{}/{}", r.pool, r.image);
        let l = self
            .locks
            .acquire(
                &self.site.store,
                info.id.as_str(),
                &spec,
                crate::locks::Claim {
                    cookie: &q.cookie,
                    entity: &who.entity,
                    address: &q.address,
                },
                lease,
            )
            .map_err(status_of)?;
        Ok(Response::new(lock_pb(&l, lease)))
    }

    async fn lock_release(&self, req: Request<pb::LockRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let img = self.open(&r).map_err(status_of)?;
        self.locks
            .release(img.info().id.as_str(), &req.get_ref().cookie);
        Ok(Response::new(pb::Empty {}))
    }

    async fn lock_list(&self, req: Request<pb::ImageRef>) -> SResult<pb::LockListReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let img = self.open(req.get_ref()).map_err(status_of)?;
        let lease = self.lease();
        let locks = self
            .locks
            .list(img.info().id.as_str())
            .iter()
            .map(|l| lock_pb(l, lease))
            .collect();
        Ok(Response::new(pb::LockListReply { locks }))
    }

    async fn lock_break(&self, req: Request<pb::LockBreakRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let img = self.open(&r).map_err(status_of)?;
        let spec = format!("{}/{}", r.pool, r.image);
        self.locks
            .break_lock(
                &self.site.store,
                img.info().id.as_str(),
                &spec,
                &q.id,
                &q.locker,
            )
            .map_err(status_of)?;
        Ok(Response::new(pb::Empty {}))
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for Service {
    async fn auth_get_or_create(
        &self,
        req: Request<pb::AuthGetOrCreateRequest>,
    ) -> SResult<pb::AuthEntity> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let caps: BTreeMap<String, String> = r.caps.into_iter().collect();
        let site = self.site.clone();
        let (rec, created) = blocking(move || site.get_or_create_user(&r.entity, &caps)).await?;
        Ok(Response::new(self.entity_pb(&rec, created)))
    }

    async fn auth_get(&self, req: Request<pb::AuthName>) -> SResult<pb::AuthEntity> {
        self.check(&req, Need::Admin)?;
        let rec = self
            .site
            .get_user(&req.get_ref().entity)
            .map_err(status_of)?;
        Ok(Response::new(self.entity_pb(&rec, false)))
    }

    async fn auth_list(&self, req: Request<pb::Empty>) -> SResult<pb::AuthListReply> {
        self.check(&req, Need::Admin)?;
        let entities = self
            .site
            .list_users()
            .iter()
            .map(|r| self.entity_pb(r, false))
            .collect();
        Ok(Response::new(pb::AuthListReply { entities }))
    }

    async fn auth_remove(&self, req: Request<pb::AuthName>) -> SResult<pb::Empty> {
        let who = self.check(&req, Need::Admin)?;
        let entity = req.into_inner().entity;
        let site = self.site.clone();
        blocking(move || site.remove_user(&entity, &who.entity)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn auth_caps(&self, req: Request<pb::AuthGetOrCreateRequest>) -> SResult<pb::AuthEntity> {
        let who = self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let caps: BTreeMap<String, String> = r.caps.into_iter().collect();
        let site = self.site.clone();
        let rec = blocking(move || site.set_user_caps(&r.entity, &caps, &who.entity)).await?;
        Ok(Response::new(self.entity_pb(&rec, false)))
    }
}

#[tonic::async_trait]
impl pb::config_server::Config for Service {
    async fn config_set(&self, req: Request<pb::ConfigSetRequest>) -> SResult<pb::Empty> {
        let who = self.config_who(&req, &req.get_ref().who, &req.get_ref().key)?;
        let mut r = req.into_inner();
        r.who = who;
        let site = self.site.clone();
        blocking(move || {
            options::validate_who(&r.who)?;
            let opt = options::find(&r.key)?;
            let v = options::check_value(opt, &r.value)?;
            if opt.name == "rbd_default_features" {
                Features::parse_list(std::slice::from_ref(&v))?.validate()?;
            }
            site.store
                .kv_put(KvTable::Config, &format!("{}\0{}", r.who, r.key), &v)
                .map_err(serr)?;
            if opt.name.starts_with("rbd_journal_") {
                site.apply_journal_config()?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn config_get(&self, req: Request<pb::ConfigGetRequest>) -> SResult<pb::ConfigListReply> {
        self.check(&req, Need::SiteRead)?;
        let mut r = req.get_ref().clone();
        if r.who.starts_with("image:") {
            r.who = self.config_who(&req, &r.who, &r.key)?;
        }
        options::validate_who(&r.who).map_err(status_of)?;
        let mut entries = Vec::new();
        if r.key.is_empty() {
            for opt in options::OPTIONS {
                entries.push(pb::ConfigEntry {
                    who: r.who.clone(),
                    key: opt.name.into(),
                    value: self.config_value(&r.who, opt.name).map_err(status_of)?,
                });
            }
        } else {
            let value = self.config_value(&r.who, &r.key).map_err(status_of)?;
            entries.push(pb::ConfigEntry {
                who: r.who,
                key: r.key,
                value,
            });
        }
        Ok(Response::new(pb::ConfigListReply { entries }))
    }

    async fn config_remove(&self, req: Request<pb::ConfigGetRequest>) -> SResult<pb::Empty> {
        let who = self.config_who(&req, &req.get_ref().who, &req.get_ref().key)?;
        let r = req.into_inner();
        let opt = options::find(&r.key).map_err(status_of)?;
        self.site
            .store
            .kv_delete(KvTable::Config, &format!("{}\0{}", who, r.key))
            .map_err(|e| status_of(serr(e)))?;
        if opt.name.starts_with("rbd_journal_") {
            if let Some(id) = who
                .strip_prefix("image.")
                .and_then(|i| tern_types::ImageId::parse(i).ok())
            {
                self.site.store.set_image_journal_options(&id, None);
            }
            self.site.apply_journal_config().map_err(status_of)?;
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn config_dump(&self, req: Request<pb::Empty>) -> SResult<pb::ConfigListReply> {
        self.check(&req, Need::SiteRead)?;
        let list = self
            .site
            .store
            .kv_list(KvTable::Config, "")
            .map_err(|e| status_of(serr(e)))?;
        let entries = list
            .into_iter()
            .filter_map(|(k, value)| {
                let (who, key) = k.split_once('\0')?;
                Some(pb::ConfigEntry {
                    who: who.into(),
                    key: key.into(),
                    value,
                })
            })
            .collect();
        Ok(Response::new(pb::ConfigListReply { entries }))
    }
}

#[tonic::async_trait]
impl pb::mirror_server::Mirror for Service {
    async fn mirror_pool_enable(
        &self,
        req: Request<pb::MirrorPoolEnableRequest>,
    ) -> SResult<pb::MirrorPoolInfo> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let m = self.mirror();
        let p = blocking(move || {
            m.pool_enable(&r.pool, &r.mode, &r.site_name)
                .map(|p| (r.pool, p))
        })
        .await?;
        Ok(Response::new(self.pool_info_pb(&p.0, &p.1, false)))
    }

    async fn mirror_pool_disable(&self, req: Request<pb::PoolRequest>) -> SResult<pb::Empty> {
        self.check(&req, Need::Admin)?;
        let pool = req.into_inner().pool;
        let m = self.mirror();
        blocking(move || m.pool_disable(&pool)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_pool_get(
        &self,
        req: Request<pb::MirrorPoolInfoRequest>,
    ) -> SResult<pb::MirrorPoolInfo> {
        let pool = req.get_ref().pool.clone();
        let who = self.check(&req, Need::Read(&pool))?;
        let with_keys = req.get_ref().with_keys
            && matches!(
                who.profile,
                crate::auth::Profile::Admin | crate::auth::Profile::RbdMirror
            );
        let m = self.mirror();
        let p2 = pool.clone();
        let p = blocking(move || m.pool(&p2)).await?;
        let p = p.unwrap_or_else(|| mirror::PoolMirror {
            mode: "disabled".into(),
            ..Default::default()
        });
        Ok(Response::new(self.pool_info_pb(&pool, &p, with_keys)))
    }

    async fn mirror_peer_add(
        &self,
        req: Request<pb::MirrorPeerAddRequest>,
    ) -> SResult<pb::MirrorPeer> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let peer = r
            .peer
            .ok_or_else(|| status_of(Error::invalid("no peer given")))?;
        let rec = peer_rec(peer);
        let m = self.mirror();
        let rec = blocking(move || m.peer_upsert(&r.pool, rec)).await?;
        Ok(Response::new(peer_pb(&rec, false)))
    }

    async fn mirror_peer_remove(
        &self,
        req: Request<pb::MirrorPeerRemoveRequest>,
    ) -> SResult<pb::Empty> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let m = self.mirror();
        blocking(move || m.peer_remove(&r.pool, &r.uuid)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_peer_set(&self, req: Request<pb::MirrorPeerSetRequest>) -> SResult<pb::Empty> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let m = self.mirror();
        blocking(move || m.peer_set(&r.pool, &r.uuid, &r.key, &r.value)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_bootstrap_create(
        &self,
        req: Request<pb::MirrorBootstrapCreateRequest>,
    ) -> SResult<pb::MirrorBootstrapToken> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let (m, site) = (self.mirror(), self.site.clone());
        let token = blocking(move || {
            let mut p = m.pool_enabled(&r.pool)?;
            if !r.site_name.is_empty() && p.site_name != r.site_name {
                mirror::valid_site_name(&r.site_name)?;
                p.site_name = r.site_name.clone();
                m.save_pool(&r.pool, &p)?;
            }
            let (user, _) = site.get_or_create_user(mirror::PEER_CLIENT, &peer_caps())?;
            Ok(mirror::Token {
                fsid: site.site_id.clone(),
                client_id: mirror::PEER_CLIENT.trim_start_matches("client.").into(),
                key: site.key_of(&user),
                mon_host: site_endpoints(&site)?.join(","),
                site_name: p.site_name.clone(),
                tls_fingerprint: site.tls.fingerprint.clone(),
                pool: r.pool.clone(),
                mirror_uuid: p.mirror_uuid.clone(),
            }
            .encode())
        })
        .await?;
        Ok(Response::new(pb::MirrorBootstrapToken { token }))
    }

    async fn mirror_bootstrap_import(
        &self,
        req: Request<pb::MirrorBootstrapImportRequest>,
    ) -> SResult<pb::MirrorPeer> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        let direction = if r.direction.is_empty() {
            "rx-tx".to_string()
        } else {
            r.direction.clone()
        };
        mirror::valid_direction(&direction).map_err(status_of)?;
        if !r.site_name.is_empty() {
            mirror::valid_site_name(&r.site_name).map_err(status_of)?;
        }
        let token = mirror::Token::decode(&r.token).map_err(status_of)?;
        let (m, pool) = (self.mirror(), r.pool.clone());
        let mut local = blocking(move || m.pool_enabled(&pool)).await?;
        // Nothing is stored until the token is proven (below).
        let rename_local = !r.site_name.is_empty() && local.site_name != r.site_name;
        if rename_local {
            local.site_name = r.site_name.clone();
        }
        if !token.site_name.is_empty() && token.site_name == local.site_name {
            return Err(status_of(Error::invalid(format!(
                "the token names site '{}', which is this site's own name: import a token made on the other site, or give the sites different names",
                token.site_name
            ))));
        }
        // Prove the token: reach the site it names, pinned to its certificate, with its key.
        let remote_pool = if r.remote_pool.is_empty() {
            token.pool.clone()
        } else {
            r.remote_pool.clone()
        };
        let remote_pool = if remote_pool.is_empty() {
            r.pool.clone()
        } else {
            remote_pool
        };
        let endpoints = token.mon_host_list();
        let tls = tern_client::config::TlsMode::Pinned(token.tls_fingerprint.to_ascii_lowercase());
        let entity = format!("client.{}", token.client_id);
        let remote =
            tern_client::SiteClient::connect_with(&endpoints[0], &tls, &entity, &token.key)
                .map_err(|e| status_of(Error::new(e.kind, e.message)))?;
        let hello = remote
            .hello()
            .await
            .map_err(|e| status_of(token_error(&token, e)))?;
        if hello.site_id != token.fsid {
            return Err(status_of(Error::new(
                ErrorKind::Unauthenticated,
                format!(
                    "the token says site {} but {} is site {}: the token was altered or is for another site",
                    token.fsid, endpoints[0], hello.site_id
                ),
            )));
        }
        let rp = remote
            .mirror_pool_get(pb::MirrorPoolInfoRequest {
                pool: remote_pool.clone(),
                with_keys: false,
            })
            .await
            .map_err(|e| status_of(token_error(&token, e)))?;
        if rp.mode == "disabled" || rp.mode.is_empty() {
            return Err(status_of(Error::invalid(format!(
                "mirroring is not enabled on pool '{remote_pool}' at site {}: run `tern mirror pool enable {remote_pool} image` there first",
                tern_types::escaped(&hello.site_name)
            ))));
        }
        // The site's own word on its name, against what the token says.
        let remote_name = if rp.site_name.is_empty() {
            hello.site_name.clone()
        } else {
            rp.site_name.clone()
        };
        if !token.site_name.is_empty() && token.site_name != remote_name {
            return Err(status_of(Error::new(
                ErrorKind::Unauthenticated,
                format!(
                    "the token says site name '{}' but the site at {} calls itself '{}': the token was altered; nothing was stored",
                    token.site_name,
                    endpoints[0],
                    tern_types::escaped(&remote_name)
                ),
            )));
        }
        mirror::valid_site_name(&remote_name).map_err(status_of)?;
        if rename_local {
            let (m, pool, name) = (self.mirror(), r.pool.clone(), local.site_name.clone());
            blocking(move || {
                let mut p = m.pool_enabled(&pool)?;
                p.site_name = name;
                m.save_pool(&pool, &p)
            })
            .await?;
        }
        let peer = mirror::PeerRec {
            uuid: String::new(),
            site_name: remote_name,
            client_name: entity.clone(),
            direction: direction.clone(),
            mirror_uuid: rp.mirror_uuid.clone(),
            fsid: token.fsid.clone(),
            mon_host: endpoints.clone(),
            tls_fingerprint: token.tls_fingerprint.to_ascii_lowercase(),
            remote_pool: remote_pool.clone(),
            key: token.key.clone(),
        };
        let (m, pool) = (self.mirror(), r.pool.clone());
        let stored = blocking(move || m.peer_upsert(&pool, peer)).await?;
        if direction == "rx-tx" {
            // The reverse direction: a key minted here for the other site's daemon.
            let site = self.site.clone();
            let me = blocking(move || {
                let (user, _) = site.get_or_create_user(mirror::PEER_CLIENT, &peer_caps())?;
                Ok(pb::MirrorPeer {
                    uuid: String::new(),
                    site_name: local.site_name.clone(),
                    client_name: mirror::PEER_CLIENT.into(),
                    direction: "rx-tx".into(),
                    mirror_uuid: local.mirror_uuid.clone(),
                    fsid: site.site_id.clone(),
                    mon_host: site_endpoints(&site)?,
                    tls_fingerprint: site.tls.fingerprint.clone(),
                    remote_pool: r.pool.clone(),
                    key: site.key_of(&user),
                })
            })
            .await?;
            remote
                .mirror_peer_register(pb::MirrorPeerRegisterRequest {
                    pool: remote_pool,
                    peer: Some(me),
                })
                .await
                .map_err(|e| status_of(token_error(&token, e)))?;
        }
        Ok(Response::new(peer_pb(&stored, false)))
    }

    async fn mirror_image_enable(
        &self,
        req: Request<pb::MirrorImageEnableRequest>,
    ) -> SResult<pb::MirrorImageInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let mode = req.into_inner().mode;
        let mode = if mode.is_empty() {
            "snapshot".to_string()
        } else {
            mode
        };
        let m = self.mirror();
        let (p, n) = (r.pool.clone(), r.image.clone());
        blocking(move || m.image_enable(&p, &n, &mode)).await?;
        self.mirror_image_info(&r).await.map(Response::new)
    }

    async fn mirror_image_disable(
        &self,
        req: Request<pb::MirrorImageDisableRequest>,
    ) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let force = req.get_ref().force;
        let m = self.mirror();
        blocking(move || m.image_disable(&r.pool, &r.image, force)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_image_promote(
        &self,
        req: Request<pb::MirrorImagePromoteRequest>,
    ) -> SResult<pb::MirrorImageInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let force = req.get_ref().force;
        // A plain promotion asks every peer first: one promoted after the
        // demotion this site holds has writes this site lacks.
        let peers = if force {
            mirror::PeerView::default()
        } else {
            self.peer_view(&r.pool, &r.image).await?
        };
        let m = self.mirror();
        let (p, n) = (r.pool.clone(), r.image.clone());
        blocking(move || m.promote(&p, &n, force, &peers)).await?;
        tracing::warn!(image = %format!("{}/{}", r.pool, r.image), force, "image promoted to primary");
        self.mirror_image_info(&r).await.map(Response::new)
    }

    async fn mirror_image_demote(
        &self,
        req: Request<pb::ImageRef>,
    ) -> SResult<pb::MirrorImageInfo> {
        let r = req.get_ref().clone();
        self.check(&req, Need::Write(&r.pool))?;
        let m = self.mirror();
        let (p, n) = (r.pool.clone(), r.image.clone());
        blocking(move || m.demote(&p, &n)).await?;
        tracing::warn!(image = %format!("{}/{}", r.pool, r.image), "image demoted to non-primary");
        self.mirror_image_info(&r).await.map(Response::new)
    }

    async fn mirror_image_resync(
        &self,
        req: Request<pb::MirrorImageResyncRequest>,
    ) -> SResult<pb::Empty> {
        let full = req.get_ref().full;
        let r = req.get_ref().image.clone().unwrap_or_default();
        self.check(&req, Need::Write(&r.pool))?;
        let m = self.mirror();
        blocking(move || {
            let (info, _) = m.image_of(&r.pool, &r.image)?;
            m.update_image(&info.id.to_string(), |im| {
                if im.primary {
                    return Err(Error::invalid(format!(
                        "'{}/{}' is primary: resync runs on a demoted (non-primary) image",
                        r.pool, r.image
                    )));
                }
                im.resync_requested = true;
                im.resync_full |= full;
                Ok(())
            })
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_image_snapshot(&self, req: Request<pb::ImageRef>) -> SResult<pb::SnapInfo> {
        let r = req.get_ref().clone();
        // A peer's journal replayer takes sync-point snapshots here (as
        // rbd-mirror does); it cannot write image data. That is all a peer
        // key needs: on snapshot-mode images only writers (the schedule,
        // an operator) take them. Either way the cap bounds how many exist.
        let who = match self.check(&req, Need::Write(&r.pool)) {
            Ok(w) => w,
            Err(_) => self.check(&req, Need::MirrorPeer(&r.pool))?,
        };
        let peer_only = !who.allows(Need::Write(&r.pool));
        let m = self.mirror();
        let s = blocking(move || {
            if peer_only {
                let (_, im) = m.image_of(&r.pool, &r.image)?;
                if im.is_some_and(|im| im.mode != "journal") {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        format!(
                            "a mirror peer may take sync-point snapshots of journal-mode images only; '{}/{}' is in snapshot mode: its snapshots come from its schedule or an operator",
                            r.pool, r.image
                        ),
                    ));
                }
            }
            m.store_flush(&r.pool, &r.image)?;
            m.primary_snapshot(&r.pool, &r.image, tern_store::MirrorSnapState::Primary)
        })
        .await?;
        Ok(Response::new(snap_pb(&s)))
    }

    async fn mirror_image_get(&self, req: Request<pb::ImageRef>) -> SResult<pb::MirrorImageInfo> {
        let r = req.get_ref().clone();
        self.check(&req, Need::Read(&r.pool))?;
        self.mirror_image_info(&r).await.map(Response::new)
    }

    async fn mirror_image_list(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> SResult<pb::MirrorImageListReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let m = self.mirror();
        let (images, p) = blocking(move || {
            let p = m.pool(&pool)?.unwrap_or_default();
            let mut out = Vec::new();
            for img in m
                .site
                .store
                .image_list(&pool)
                .map_err(|e| Error::new(e.kind(), e.to_string()))?
            {
                if let Some(im) = m.image(&img.id.to_string())? {
                    let snaps = m.mirror_snaps(&pool, &img.name)?;
                    out.push(mirror_info_pb(&img, &im, &snaps));
                }
            }
            Ok((out, p))
        })
        .await?;
        Ok(Response::new(pb::MirrorImageListReply {
            images,
            mirror_uuid: p.mirror_uuid,
            site_name: p.site_name,
        }))
    }

    async fn mirror_image_status_get(
        &self,
        req: Request<pb::ImageRef>,
    ) -> SResult<pb::MirrorImageStatus> {
        let r = req.get_ref().clone();
        self.check(&req, Need::Read(&r.pool))?;
        let st = self.status_of_image(&r.pool, &r.image).await?;
        Ok(Response::new(st))
    }

    async fn mirror_pool_status(
        &self,
        req: Request<pb::MirrorPoolStatusRequest>,
    ) -> SResult<pb::MirrorPoolStatusReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let reply = self.pool_status(&pool).await?;
        Ok(Response::new(reply))
    }

    async fn mirror_schedule_add(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> SResult<pb::Empty> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Write(&pool))?;
        let r = req.into_inner();
        let m = self.mirror();
        blocking(move || {
            m.schedule_add(
                &r.pool,
                &r.image,
                schedule::Schedule::parse(&r.interval, &r.start_time)?,
            )
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_schedule_remove(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> SResult<pb::Empty> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Write(&pool))?;
        let r = req.into_inner();
        let m = self.mirror();
        blocking(move || {
            // No interval: every schedule at this level.
            let s = if r.interval.is_empty() {
                None
            } else {
                Some(schedule::Schedule::parse(&r.interval, &r.start_time)?)
            };
            m.schedule_rm(&r.pool, &r.image, s)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_schedule_list(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> SResult<pb::MirrorScheduleListReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::SiteRead)?;
        let r = req.into_inner();
        let m = self.mirror();
        let list = blocking(move || {
            let mut out = Vec::new();
            for (p, i, ss) in m.all_schedules()? {
                let level_match = if r.recursive {
                    (pool.is_empty() || p == pool) && (r.image.is_empty() || i == r.image)
                } else {
                    p == pool && i == r.image
                };
                if level_match {
                    for s in ss {
                        out.push(pb::MirrorScheduleEntry {
                            pool: p.clone(),
                            image: i.clone(),
                            interval: schedule::fmt_interval(s.interval),
                            start_time: s.start.map(schedule::fmt_start).unwrap_or_default(),
                        });
                    }
                }
            }
            Ok(out)
        })
        .await?;
        Ok(Response::new(pb::MirrorScheduleListReply {
            schedules: list,
        }))
    }

    async fn mirror_schedule_status(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> SResult<pb::MirrorScheduleStatusReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Read(&pool))?;
        let r = req.into_inner();
        let m = self.mirror();
        let v = blocking(move || schedule::status(&m, &r.pool, &r.image, crate::site::now_secs()))
            .await?;
        Ok(Response::new(pb::MirrorScheduleStatusReply {
            scheduled: v
                .into_iter()
                .map(|(image, time)| pb::MirrorScheduleNext { image, time })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::mirror_daemon_server::MirrorDaemon for Service {
    async fn mirror_peer_register(
        &self,
        req: Request<pb::MirrorPeerRegisterRequest>,
    ) -> SResult<pb::MirrorPeerRegisterReply> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::MirrorPeer(&pool))?;
        let r = req.into_inner();
        let peer = peer_rec(
            r.peer
                .ok_or_else(|| status_of(Error::invalid("no peer given")))?,
        );
        let m = self.mirror();
        let (stored, p) = blocking(move || {
            let stored = m.peer_upsert(&r.pool, peer)?;
            Ok((stored, m.pool_enabled(&r.pool)?))
        })
        .await?;
        Ok(Response::new(pb::MirrorPeerRegisterReply {
            peer: Some(peer_pb(&stored, false)),
            mirror_uuid: p.mirror_uuid,
            site_name: p.site_name,
        }))
    }

    async fn mirror_journal_apply(
        &self,
        req: Request<pb::MirrorJournalApplyRequest>,
    ) -> SResult<pb::MirrorJournalApplyReply> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::MirrorDaemon(&r.pool))?;
        let q = req.into_inner();
        let m = self.mirror();
        let a = blocking(move || {
            m.journal_apply(
                &r.pool,
                &r.image,
                &q.primary_mirror_uuid,
                &q.entries,
                q.persist,
                (q.expect_epoch, q.primary_epoch),
            )
        })
        .await?;
        Ok(Response::new(pb::MirrorJournalApplyReply {
            last_tid: a.last_tid,
            last_timestamp_us: a.last_timestamp_us,
            entries: a.entries,
            bytes: a.bytes,
            demoted: a.demoted,
        }))
    }

    async fn mirror_journal_position(
        &self,
        req: Request<pb::MirrorJournalPositionRequest>,
    ) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::MirrorDaemon(&r.pool))?;
        let q = req.into_inner();
        let m = self.mirror();
        blocking(move || {
            let pos = (q.tid > 0).then_some(mirror::JournalPos {
                primary_mirror_uuid: q.primary_mirror_uuid,
                tid: q.tid,
                skip_to: q.skip_to,
                timestamp_us: q.timestamp_us,
            });
            m.journal_pos_set(&r.pool, &r.image, pos, q.expect_epoch)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_status_report(
        &self,
        req: Request<pb::MirrorStatusReportRequest>,
    ) -> SResult<pb::Empty> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::MirrorPeer(&pool))?;
        let r = req.into_inner();
        let s = r
            .status
            .ok_or_else(|| status_of(Error::invalid("no status given")))?;
        let rec = mirror::SiteStatus {
            site_name: s.site_name,
            mirror_uuids: s.mirror_uuids,
            state: s.state,
            description: s.description,
            last_update: s.last_update,
            reason: s.reason,
            lag_seconds: s.lag_seconds,
            last_sync: s.last_sync,
            progress: s.progress,
            daemon_id: s.daemon_id,
            bytes_synced: s.bytes_synced,
            received: 0,
        };
        let m = self.mirror();
        let daemon = r.daemon;
        blocking(move || {
            m.store_status(&r.global_id, rec)?;
            if let Some(d) = daemon {
                m.heartbeat(daemon_rec(d))?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_daemon_heartbeat(
        &self,
        req: Request<pb::MirrorDaemonInfo>,
    ) -> SResult<pb::Empty> {
        self.check(&req, Need::SiteRead)?;
        let d = daemon_rec(req.into_inner());
        let m = self.mirror();
        blocking(move || m.heartbeat(d)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_image_adopt(
        &self,
        req: Request<pb::MirrorImageAdoptRequest>,
    ) -> SResult<pb::MirrorImageInfo> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::MirrorDaemon(&pool))?;
        let r = req.into_inner();
        let m = self.mirror();
        let r2 = r.clone();
        blocking(move || {
            validate_name("image", &r2.name)?;
            let layout = Layout::new(r2.object_size, Some(r2.stripe_unit), Some(r2.stripe_count))?;
            let opts = CreateOpts {
                size: r2.size,
                layout,
                features: Features(r2.features & 0x7f),
            };
            m.adopt(
                &r2.pool,
                &r2.name,
                &r2.global_id,
                &r2.mode,
                &opts,
                &r2.primary_mirror_uuid,
            )
        })
        .await?;
        let found = {
            let m = self.mirror();
            let (p, g) = (r.pool.clone(), r.global_id.clone());
            blocking(move || m.find_by_global(&p, &g)).await?
        };
        let (img, _) = found
            .ok_or_else(|| status_of(Error::new(ErrorKind::Internal, "adopted image vanished")))?;
        self.mirror_image_info(&pb::ImageRef {
            pool: r.pool,
            image: img.name,
            snap: String::new(),
        })
        .await
        .map(Response::new)
    }

    async fn mirror_sync_begin(
        &self,
        req: Request<pb::MirrorSyncBeginRequest>,
    ) -> SResult<pb::MirrorSyncState> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::MirrorDaemon(&r.pool))?;
        let q = req.into_inner();
        let m = self.mirror();
        let s = blocking(move || m.sync_begin(&r.pool, &r.image, &q)).await?;
        Ok(Response::new(pb::MirrorSyncState {
            primary_snap_id: s.primary_snap_id,
            last_copied_object_number: s.last_copied_object_number,
            resumed: s.last_copied_object_number > 0,
            primary_mirror_uuid: s.primary_mirror_uuid,
        }))
    }

    async fn mirror_sync_progress(
        &self,
        req: Request<pb::MirrorSyncProgressRequest>,
    ) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::MirrorDaemon(&r.pool))?;
        let q = req.into_inner();
        let m = self.mirror();
        blocking(move || {
            m.sync_progress(
                &r.pool,
                &r.image,
                q.snap_id,
                q.last_copied_object_number,
                false,
                "",
                q.expect_epoch,
            )
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mirror_sync_complete(
        &self,
        req: Request<pb::MirrorSyncProgressRequest>,
    ) -> SResult<pb::SnapInfo> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::MirrorDaemon(&r.pool))?;
        let q = req.into_inner();
        let m = self.mirror();
        let s = blocking(move || {
            m.sync_progress(
                &r.pool,
                &r.image,
                q.snap_id,
                q.last_copied_object_number,
                true,
                &q.resync_summary,
                q.expect_epoch,
            )
        })
        .await?;
        Ok(Response::new(snap_pb(&s)))
    }

    async fn mirror_snapshot_ack(
        &self,
        req: Request<pb::MirrorSnapshotAckRequest>,
    ) -> SResult<pb::Empty> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::MirrorPeer(&pool))?;
        let r = req.into_inner();
        let m = self.mirror();
        blocking(move || {
            // The caller names itself by its mirror uuid; acks are kept per peer uuid.
            let p = m.pool_enabled(&r.pool)?;
            let peer = p
                .peers
                .iter()
                .find(|x| x.mirror_uuid == r.peer_mirror_uuid)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "no peer with mirror uuid {} on pool '{}'",
                            r.peer_mirror_uuid, r.pool
                        ),
                    )
                })?;
            m.ack(&r.pool, &r.global_id, &peer.uuid, r.primary_snap_id)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }
}

/// Sends [start, end) of an image as chunks: holes and all-zero blocks as
/// zero runs (merged), data in pieces of at most `chunk` bytes.
async fn stream_out(
    img: Arc<Image>,
    snap: Option<u64>,
    start: u64,
    end: u64,
    chunk: u64,
    tx: &crate::budget::Tx<pb::DataChunk>,
    c: &PoolCounters,
) -> Result<(), Status> {
    // Ask for the allocation map in windows that double while they come
    // back empty: a window of more than a few hundred objects costs one
    // directory listing, so a sparse image costs what its data costs (64
    // TiB empty: a dozen listings, where fixed 1 GiB windows probed 16
    // million absent objects before the first byte went out).
    const WINDOW: u64 = 1 << 30;
    let mut window = WINDOW;
    let mut pos = start;
    let mut zero_run = 0u64; // pending zeros starting at pos - zero_run
    let zeros = |offset: u64, length: u64| pb::DataChunk {
        offset,
        length,
        zero: true,
        data: bytes::Bytes::new(),
    };
    let gone = || Status::cancelled("the client went away");
    while pos < end {
        // A client that hung up must not keep this loop (and a core) busy
        // until the image ends: sends alone notice only when data flows.
        if tx.is_closed() {
            return Err(gone());
        }
        let wend = pos.saturating_add(window).min(end);
        let i = img.clone();
        let (p, n) = (pos, wend - pos);
        let extents = blocking(move || i.allocated_extents_at(snap, p, n).map_err(serr)).await?;
        window = if extents.is_empty() {
            window.saturating_mul(2)
        } else {
            WINDOW
        };
        let mut cur = pos;
        for (eoff, elen) in extents.into_iter().chain(std::iter::once((wend, 0))) {
            if eoff > cur {
                zero_run += eoff - cur;
                cur = eoff;
            }
            let eend = eoff + elen;
            while cur < eend {
                let n = chunk.min(eend - cur);
                // Room first: what is read is charged until the client
                // has taken it.
                let mut room = tx.reserve(n as usize).await?;
                let i = img.clone();
                let at = cur;
                let buf = blocking(move || {
                    let mut b = vec![0u8; n as usize];
                    i.read_at(snap, at, &mut b).map_err(serr)?;
                    Ok(bytes::Bytes::from(b))
                })
                .await?;
                c.read_ops.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(n, Ordering::Relaxed);
                if tx.is_closed() {
                    return Err(gone());
                }
                for (off, len, zero) in tern_client::transfer::zero_runs(&buf) {
                    if zero {
                        zero_run += len as u64;
                        continue;
                    }
                    if zero_run > 0 {
                        tx.push(&mut room, zeros(at + off as u64 - zero_run, zero_run));
                        zero_run = 0;
                    }
                    tx.push(
                        &mut room,
                        pb::DataChunk {
                            offset: at + off as u64,
                            length: len as u64,
                            zero: false,
                            data: buf.slice(off..off + len),
                        },
                    );
                }
                cur += n;
            }
        }
        pos = wend;
        // The hole so far goes out now rather than with the next data, so
        // the client sees progress (and its first byte) at once.
        if zero_run > 0 && pos < end {
            tx.send(zeros(pos - zero_run, zero_run)).await?;
            zero_run = 0;
        }
    }
    if zero_run > 0 {
        tx.send(zeros(end - zero_run, zero_run)).await?;
    }
    Ok(())
}

/// Sends only what changed between `from` and `to` inside [start, end):
/// changed data as data chunks, changed-to-zero ranges as zero runs.
/// Sorted, non-overlapping, adjacent ranges joined.
fn merge_extents(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|e| e.1 > 0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => {
                last.1 = last.1.max(o + l - last.0);
            }
            _ => out.push((o, l)),
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn stream_diff(
    img: Arc<Image>,
    from: Option<u64>,
    to: Option<u64>,
    start: u64,
    end: u64,
    chunk: u64,
    whole_object: bool,
    extra: Vec<(u64, u64)>,
    tx: &crate::budget::Tx<pb::DataChunk>,
    c: &PoolCounters,
) -> Result<(), Status> {
    let i = img.clone();
    let mut extents = blocking(move || {
        i.diff(from, to, start, end - start, whole_object)
            .map_err(serr)
    })
    .await?;
    if !extra.is_empty() {
        // Extra ranges are read like changed data (zeros in them go as
        // zero runs); where they overlap a changed extent, one read.
        let mut all: Vec<(u64, u64, bool)> = extents
            .iter()
            .map(|e| (e.offset, e.length, e.data))
            .chain(extra.into_iter().map(|(o, l)| (o, l, true)))
            .filter(|e| e.1 > 0)
            .collect();
        all.sort_unstable_by_key(|e| e.0);
        let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(all.len());
        for (o, l, d) in all {
            match merged.last_mut() {
                Some(last) if o < last.0 + last.1 || (o == last.0 + last.1 && d == last.2) => {
                    last.1 = last.1.max(o + l - last.0);
                    last.2 |= d;
                }
                _ => merged.push((o, l, d)),
            }
        }
        extents = merged
            .into_iter()
            .map(|(offset, length, data)| tern_store::DiffExtent {
                offset,
                length,
                data,
            })
            .collect();
    }
    for e in extents {
        if !e.data {
            tx.send(pb::DataChunk {
                offset: e.offset,
                length: e.length,
                zero: true,
                data: bytes::Bytes::new(),
            })
            .await?;
            continue;
        }
        let mut cur = e.offset;
        let eend = e.offset + e.length;
        while cur < eend {
            let n = chunk.min(eend - cur);
            let mut room = tx.reserve(n as usize).await?;
            let (i, at) = (img.clone(), cur);
            let buf = blocking(move || {
                let mut b = vec![0u8; n as usize];
                i.read_at(to, at, &mut b).map_err(serr)?;
                Ok(bytes::Bytes::from(b))
            })
            .await?;
            c.read_ops.fetch_add(1, Ordering::Relaxed);
            c.read_bytes.fetch_add(n, Ordering::Relaxed);
            for (off, len, zero) in tern_client::transfer::zero_runs(&buf) {
                let offset = at + off as u64;
                let ch = if zero {
                    pb::DataChunk {
                        offset,
                        length: len as u64,
                        zero: true,
                        data: bytes::Bytes::new(),
                    }
                } else {
                    pb::DataChunk {
                        offset,
                        length: len as u64,
                        zero: false,
                        data: buf.slice(off..off + len),
                    }
                };
                tx.push(&mut room, ch);
            }
            cur += n;
        }
    }
    Ok(())
}

fn snap_pb(s: &SnapInfo) -> pb::SnapInfo {
    let mut out = pb::SnapInfo {
        id: s.id,
        name: s.name.clone(),
        size: s.size,
        created: s.created,
        protected: s.protected,
        namespace: "user".into(),
        ..Default::default()
    };
    if let SnapNamespace::Mirror(m) = &s.namespace {
        out.namespace = "mirror".into();
        out.mirror_state = m.state.to_string();
        out.mirror_complete = m.complete;
        out.mirror_peer_uuids = m.mirror_peer_uuids.clone();
        out.primary_snap_id = m.primary_snap_id;
        out.primary_mirror_uuid = m.primary_mirror_uuid.clone();
    }
    out
}

fn lock_pb(l: &crate::locks::Lock, lease: std::time::Duration) -> pb::LockInfo {
    let now = std::time::Instant::now();
    pb::LockInfo {
        locker: l.entity.clone(),
        id: l.cookie.clone(),
        address: l.address.clone(),
        age_secs: now.duration_since(l.acquired).as_secs(),
        lease_ms: lease.as_millis() as u64,
        expires_in_ms: l.expires.saturating_duration_since(now).as_millis() as u64,
    }
}

/// One import in progress. A created image lives under a hidden name
/// (`.import-…`, which no user name can collide with) until commit.
struct Import {
    site: Arc<Site>,
    img: Arc<Image>,
    target: pb::ImageRef,
    hidden: Option<String>,
    data: u64,
    zeros: u64,
    /// For an export-diff: the snapshot to roll back to if it fails.
    safety: Option<String>,
    diff_to: Option<String>,
    /// No chunk may reach past this (the diff's declared size).
    limit: u64,
    /// A mirror daemon's sync: each chunk is written only while the image
    /// is still the non-primary copy the sync began on.
    fence: Option<SyncFence>,
}

#[derive(Clone)]
struct SyncFence {
    image_id: String,
    spec: String,
    expect_epoch: Option<u64>,
}

impl SyncFence {
    fn write<T>(&self, site: &Arc<Site>, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        let m = mirror::Mirror { site: site.clone() };
        m.sync_write(&self.image_id, &self.spec, self.expect_epoch, f)
    }
}

/// Runs `f`, under the sync fence when there is one.
fn fenced<T>(
    fence: &Option<SyncFence>,
    site: &Arc<Site>,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    match fence {
        Some(x) => x.write(site, f),
        None => f(),
    }
}

const SAFETY_PREFIX: &str = ".import-diff-";

impl Import {
    async fn create(
        site: &Arc<Site>,
        svc: &Service,
        req: pb::ImageCreateRequest,
    ) -> Result<Import, Status> {
        let mut sized = req.clone();
        if sized.size == 0 {
            sized.size = IMPORT_MAX_SIZE;
        }
        let opts = svc.default_create(&sized).map_err(status_of)?;
        let hidden = format!(".import-{}", uuid::Uuid::new_v4().simple());
        let s = site.clone();
        let (pool, name, h) = (req.pool.clone(), req.image.clone(), hidden.clone());
        let img = blocking(move || {
            match s.store.image_info(&pool, &name) {
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("image '{pool}/{name}' already exists"),
                    ));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(serr(e)),
            }
            s.store.image_create(&pool, &h, &opts).map_err(serr)?;
            s.store.open_image(&pool, &h).map_err(serr)
        })
        .await?;
        Ok(Import {
            site: site.clone(),
            img,
            target: pb::ImageRef {
                pool: req.pool,
                image: req.image,
                snap: String::new(),
            },
            hidden: Some(hidden),
            data: 0,
            zeros: 0,
            safety: None,
            diff_to: None,
            limit: u64::MAX,
            fence: None,
        })
    }

    async fn chunk(&mut self, ch: pb::DataChunk) -> Result<(), Status> {
        if ch
            .offset
            .checked_add(ch.length)
            .is_none_or(|e| e > self.limit)
        {
            return Err(status_of(Error::invalid(format!(
                "the diff writes {}+{} past its declared image size {}: refused, the image was rolled back",
                ch.offset, ch.length, self.limit
            ))));
        }
        let img = self.img.clone();
        let (fence, site) = (self.fence.clone(), self.site.clone());
        if ch.zero {
            self.zeros += ch.length;
            // A new image is all zeros already.
            if self.hidden.is_none() {
                blocking(move || {
                    fenced(&fence, &site, || {
                        img.write_zeroes(ch.offset, ch.length).map_err(serr)
                    })
                })
                .await?;
            }
            return Ok(());
        }
        if ch.data.len() as u64 != ch.length {
            return Err(status_of(Error::invalid(
                "chunk length does not match its data",
            )));
        }
        self.data += ch.length;
        blocking(move || {
            fenced(&fence, &site, || {
                img.write(ch.offset, &ch.data, false).map_err(serr)
            })
        })
        .await
    }

    /// Checks an export-diff against the target and takes the safety snapshot.
    async fn begin_diff(&mut self, d: pb::DiffTarget) -> Result<(), Status> {
        let site = self.site.clone();
        let t = self.target.clone();
        let img = self.img.clone();
        let safety = format!("{SAFETY_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let (s2, d2) = (safety.clone(), d.clone());
        blocking(move || {
            let spec = format!("{}/{}", t.pool, t.image);
            if !d2.from_snap.is_empty() && site.store.snap_get(&t.pool, &t.image, &d2.from_snap).is_err() {
                return Err(Error::invalid(format!(
                    "the diff starts at snapshot '{}', which {spec} does not have: import the diffs in order",
                    d2.from_snap
                )));
            }
            if !d2.to_snap.is_empty() {
                validate_name("snapshot", &d2.to_snap)?;
                if site.store.snap_get(&t.pool, &t.image, &d2.to_snap).is_ok() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("{spec} already has snapshot '{}': this diff was imported before", d2.to_snap),
                    ));
                }
            }
            if d2.size == 0 {
                return Err(Error::invalid("the diff declares no image size (no 's' record)"));
            }
            site.store.snap_create(&t.pool, &t.image, &s2, SnapNamespace::User).map_err(serr)?;
            if d2.size != img.size() {
                site.store.image_resize(&t.pool, &t.image, d2.size, true).map_err(serr)?;
            }
            Ok(())
        })
        .await?;
        self.safety = Some(safety);
        self.limit = d.size;
        self.diff_to = if d.to_snap.is_empty() {
            None
        } else {
            Some(d.to_snap)
        };
        Ok(())
    }

    async fn commit(mut self, cm: pb::WriteStreamCommit) -> Result<pb::WriteStreamReply, Status> {
        if self.data + self.zeros != cm.total_bytes {
            self.abort().await;
            return Err(status_of(Error::invalid(format!(
                "import incomplete: {} of {} bytes arrived; nothing was kept",
                self.data + self.zeros,
                cm.total_bytes
            ))));
        }
        let site = self.site.clone();
        let img = self.img.clone();
        let target = self.target.clone();
        let hidden = self.hidden.clone();
        let (safety, diff_to) = (self.safety.clone(), self.diff_to.clone());
        let published = blocking(move || {
            if let Some(h) = &hidden {
                if cm.final_size == 0 {
                    return Err(Error::invalid(
                        "cannot import an empty input: an image needs a size > 0",
                    ));
                }
                site.store
                    .image_resize(&target.pool, h, cm.final_size, true)
                    .map_err(serr)?;
            }
            img.flush().map_err(serr)?;
            // The rename is the last step: until it succeeds the hidden image is ours to remove.
            if let Some(h) = &hidden {
                site.store
                    .image_rename(&target.pool, h, &target.image)
                    .map_err(serr)?;
            }
            if let Some(to) = &diff_to {
                site.store
                    .snap_create(&target.pool, &target.image, to, SnapNamespace::User)
                    .map_err(serr)?;
            }
            if let Some(sf) = &safety {
                site.store
                    .snap_remove(&target.pool, &target.image, sf, false)
                    .map_err(serr)?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = published {
            self.abort().await;
            return Err(e);
        }
        self.hidden = None;
        self.safety = None;
        let site = self.site.clone();
        let target = self.target.clone();
        let (data, zeros) = (self.data, self.zeros);
        blocking(move || {
            let info = site
                .store
                .image_info(&target.pool, &target.image)
                .map_err(serr)?;
            Ok(pb::WriteStreamReply {
                bytes_written: data,
                bytes_zero: zeros,
                image: Some(image_info_pb(&info, None)),
            })
        })
        .await
    }

    async fn abort(&mut self) {
        if let Some(sf) = self.safety.take() {
            let site = self.site.clone();
            let t = self.target.clone();
            let to = self.diff_to.clone();
            let _ = tokio::task::spawn_blocking(move || {
                undo_diff(&site, &t.pool, &t.image, &sf, to.as_deref())
            })
            .await;
            tracing::warn!(image = %format!("{}/{}", self.target.pool, self.target.image), "import-diff rolled back");
        }
        if let Some(h) = self.hidden.take() {
            let site = self.site.clone();
            let pool = self.target.pool.clone();
            let _ = tokio::task::spawn_blocking(move || site.store.image_remove(&pool, &h)).await;
            tracing::warn!(image = %format!("{}/{}", self.target.pool, self.target.image), "import discarded");
        }
    }
}

/// Puts an image back as it was before an export-diff started.
fn undo_diff(site: &Site, pool: &str, image: &str, safety: &str, to: Option<&str>) {
    if let Some(to) = to {
        let _ = site.store.snap_remove(pool, image, to, false);
    }
    if let Err(e) = site.store.snap_rollback(pool, image, safety) {
        tracing::error!(%pool, %image, error = %e, "cannot roll back an interrupted import-diff");
        return;
    }
    let _ = site.store.snap_remove(pool, image, safety, false);
}

/// Removes imports that a crash interrupted (hidden `.import-*` images) and
/// rolls back export-diffs that a crash cut short.
pub fn clean_interrupted_imports(site: &Site) {
    let Ok(pools) = site.store.pool_list() else {
        return;
    };
    for p in &pools {
        let Ok(images) = site.store.image_list(&p.name) else {
            continue;
        };
        for img in images {
            let Ok(snaps) = site.store.snap_list(&p.name, &img.name) else {
                continue;
            };
            for s in snaps.iter().filter(|s| s.name.starts_with(SAFETY_PREFIX)) {
                tracing::warn!(pool = %p.name, image = %img.name, "rolling back an import-diff interrupted by a crash");
                undo_diff(site, &p.name, &img.name, &s.name, None);
            }
        }
    }
    for p in pools {
        if let Ok(names) = site.store.hidden_images(&p.name) {
            for n in names.into_iter().filter(|n| n.starts_with(".import-")) {
                tracing::warn!(pool = %p.name, image = %n, "removing an import interrupted by a crash");
                let _ = site.store.image_remove(&p.name, &n);
            }
        }
    }
}

fn peer_caps() -> BTreeMap<String, String> {
    [("mon", "profile rbd-mirror-peer"), ("osd", "profile rbd")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn site_endpoints(site: &Site) -> Result<Vec<String>, Error> {
    Ok(site
        .store
        .kv_get(KvTable::Site, "endpoints")
        .map_err(serr)?
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_default())
}

/// Turns a failure to use a token into advice.
fn token_error(t: &mirror::Token, e: tern_client::ClientError) -> Error {
    let msg = match e.kind {
        ErrorKind::Unauthenticated if e.message.contains("fingerprint") => format!(
            "the site at {} does not have the certificate the token pins: the token was altered or the site re-initialised ({})",
            t.mon_host, e.message
        ),
        ErrorKind::Unauthenticated => format!(
            "site {} refused the token's key for client.{}: the token was altered, or its peer user was removed \
             (create a new token there with `tern mirror pool peer bootstrap create`)",
            t.site_name, t.client_id
        ),
        ErrorKind::Unavailable => format!(
            "cannot reach the token's site at {}: {}",
            t.mon_host, e.message
        ),
        _ => e.message.clone(),
    };
    Error::new(e.kind, msg)
}

fn peer_rec(p: pb::MirrorPeer) -> mirror::PeerRec {
    mirror::PeerRec {
        uuid: p.uuid,
        site_name: p.site_name,
        client_name: if p.client_name.is_empty() {
            mirror::PEER_CLIENT.into()
        } else {
            p.client_name
        },
        direction: if p.direction.is_empty() {
            "rx-tx".into()
        } else {
            p.direction
        },
        mirror_uuid: p.mirror_uuid,
        fsid: p.fsid,
        mon_host: p.mon_host,
        tls_fingerprint: p.tls_fingerprint,
        remote_pool: p.remote_pool,
        key: p.key,
    }
}

fn peer_pb(p: &mirror::PeerRec, with_key: bool) -> pb::MirrorPeer {
    pb::MirrorPeer {
        uuid: p.uuid.clone(),
        site_name: p.site_name.clone(),
        client_name: p.client_name.clone(),
        direction: p.direction.clone(),
        mirror_uuid: p.mirror_uuid.clone(),
        fsid: p.fsid.clone(),
        mon_host: p.mon_host.clone(),
        tls_fingerprint: p.tls_fingerprint.clone(),
        remote_pool: p.remote_pool.clone(),
        key: if with_key {
            p.key.clone()
        } else {
            String::new()
        },
    }
}

fn daemon_rec(d: pb::MirrorDaemonInfo) -> mirror::Daemon {
    mirror::Daemon {
        service_id: d.service_id,
        instance_id: d.instance_id,
        client_id: d.client_id,
        hostname: d.hostname,
        version: d.version,
        site_name: d.site_name,
        last_heartbeat: d.last_heartbeat,
        received_ms: 0,
    }
}

fn mirror_info_pb(
    img: &tern_store::ImageInfo,
    im: &mirror::ImageMirror,
    snaps: &[(SnapInfo, tern_store::MirrorSnap)],
) -> pb::MirrorImageInfo {
    pb::MirrorImageInfo {
        pool: img.pool.clone(),
        name: img.name.clone(),
        global_id: im.global_id.clone(),
        mode: im.mode.clone(),
        state: im.state.clone(),
        primary: im.primary,
        epoch: im.epoch,
        mirror_snaps: snaps.iter().map(|(s, _)| snap_pb(s)).collect(),
        size: img.size,
        object_size: img.layout.object_size,
        stripe_unit: img.layout.stripe_unit,
        stripe_count: img.layout.stripe_count,
        features: img.features.0,
        image_id: img.id.to_string(),
        demoted: im.demoted,
        journal_primary_uuid: im
            .journal_pos
            .as_ref()
            .map(|p| p.primary_mirror_uuid.clone())
            .unwrap_or_default(),
        journal_tid: im.journal_pos.as_ref().map_or(0, |p| p.tid),
        journal_skip_to: im
            .journal_pos
            .as_ref()
            .map(|p| p.skip_to.clone())
            .unwrap_or_default(),
        primary_mirror_uuid: im.primary_mirror_uuid.clone(),
        resync_requested: im.resync_requested,
        resync_full: im.resync_full,
        fork_mirror_uuid: im
            .fork
            .as_ref()
            .map(|f| f.from_mirror_uuid.clone())
            .unwrap_or_default(),
        fork_journal_tid: im.fork.as_ref().map_or(0, |f| f.journal_tid),
        fork_snap_id: im.fork.as_ref().map_or(0, |f| f.snap_id),
        fork_forced: im.fork.as_ref().is_some_and(|f| f.forced),
        fork_data_as_of_us: im.fork.as_ref().map_or(0, |f| f.data_as_of_us),
        fork_at: im.fork.as_ref().map_or(0, |f| f.at),
        last_resync: im.last_resync.clone(),
        primary_epoch: im.primary_epoch,
    }
}

/// A daemon counts as up while its heartbeats keep coming: two missed
/// intervals (plus slack for scheduling) and it is down.
const STALE_MS: u64 = 2500;

fn strip_state(s: &str) -> &str {
    s.trim_start_matches("up+").trim_start_matches("down+")
}

/// Builds an image's status from what daemons reported, never from the
/// image itself, and never showing a silent daemon's last state as live.
fn build_status(
    m: &Mirror,
    pool: &str,
    img: &tern_store::ImageInfo,
    im: &mirror::ImageMirror,
    pm: &mirror::PoolMirror,
    daemons: &[mirror::Daemon],
) -> Result<pb::MirrorImageStatus, Error> {
    let now = mirror::now_ms();
    let statuses = m.statuses(&im.global_id)?;
    let local_daemon = daemons
        .iter()
        .filter(|d| d.site_name == pm.site_name && now.saturating_sub(d.received_ms) <= STALE_MS)
        .max_by_key(|d| d.received_ms);
    let site_status = |name: &str| statuses.iter().find(|s| s.site_name == name);
    let mut local = match site_status(&pm.site_name) {
        Some(s) => s.clone(),
        None if im.primary => mirror::SiteStatus {
            state: "stopped".into(),
            description: "local image is primary".into(),
            reason: "primary".into(),
            ..Default::default()
        },
        None => mirror::SiteStatus {
            state: "unknown".into(),
            description: "no status reported yet".into(),
            reason: "unknown".into(),
            ..Default::default()
        },
    };
    if im.primary && local.reason != "split-brain" && local.reason != "error" {
        local.state = "stopped".into();
        local.description = "local image is primary".into();
        local.reason = "primary".into();
    }
    let local_up = local_daemon.is_some();
    let to_pb =
        |s: &mirror::SiteStatus, up: bool, site_name: &str, uuid: &str| pb::MirrorSiteStatus {
            site_name: site_name.to_string(),
            mirror_uuids: uuid.to_string(),
            state: format!(
                "{}+{}",
                if up { "up" } else { "down" },
                strip_state(&s.state)
            ),
            description: s.description.clone(),
            last_update: if s.last_update == 0 {
                now / 1000
            } else {
                s.last_update
            },
            reason: if up {
                s.reason.clone()
            } else {
                "daemon-down".into()
            },
            lag_seconds: s.lag_seconds,
            last_sync: s.last_sync,
            progress: s.progress,
            daemon_id: s.daemon_id.clone(),
            bytes_synced: s.bytes_synced,
            up,
        };
    let local_pb = to_pb(&local, local_up, &pm.site_name, &pm.mirror_uuid);
    let mut peers = Vec::new();
    for p in &pm.peers {
        let st = match site_status(&p.site_name) {
            Some(s) => {
                let age = now.saturating_sub(s.received);
                let mut x = to_pb(s, age <= STALE_MS, &p.site_name, &p.mirror_uuid);
                if age > STALE_MS {
                    x.reason = "unreachable".into();
                    x.description = format!(
                        "no report from {}'s mirror daemon for {:.0} s (it said: {})",
                        p.site_name,
                        age as f64 / 1000.0,
                        s.description
                    );
                }
                x
            }
            None => pb::MirrorSiteStatus {
                site_name: p.site_name.clone(),
                mirror_uuids: p.mirror_uuid.clone(),
                state: "down+unknown".into(),
                description: format!("no report from {}'s mirror daemon yet", p.site_name),
                last_update: 0,
                reason: "unreachable".into(),
                up: false,
                ..Default::default()
            },
        };
        let mut st = st;
        if im.primary
            && let Some(b) = m.behind(&im.global_id, &p.uuid)?
        {
            st.reason = "behind".into();
            st.description = format!(
                "fell behind: {} mirror snapshot(s) {} had not synced were pruned (rbd_mirroring_max_mirroring_snapshots={}); {} (it said: {})",
                b.pruned_unsynced,
                p.site_name,
                b.cap,
                if b.base_lost {
                    format!(
                        "its last synced snapshot {} was pruned too, so its next sync is a full copy",
                        b.acked
                    )
                } else if b.acked > 0 {
                    format!(
                        "it catches up by a delta from snapshot {} to the newest",
                        b.acked
                    )
                } else {
                    "its first sync copies the newest".to_string()
                },
                st.description
            );
        }
        peers.push(st);
    }
    let _ = pool;
    Ok(pb::MirrorImageStatus {
        name: img.name.clone(),
        global_id: im.global_id.clone(),
        local: Some(local_pb),
        peer_sites: peers,
        daemon_id: local_daemon
            .map(|d| d.service_id.clone())
            .unwrap_or_default(),
    })
}

impl Service {
    fn mirror(&self) -> Mirror {
        Mirror {
            site: self.site.clone(),
        }
    }

    fn pool_info_pb(
        &self,
        pool: &str,
        p: &mirror::PoolMirror,
        with_keys: bool,
    ) -> pb::MirrorPoolInfo {
        pb::MirrorPoolInfo {
            pool: pool.to_string(),
            mode: if p.mode.is_empty() {
                "disabled".into()
            } else {
                p.mode.clone()
            },
            site_name: p.site_name.clone(),
            mirror_uuid: p.mirror_uuid.clone(),
            peers: p.peers.iter().map(|x| peer_pb(x, with_keys)).collect(),
            fsid: self.site.site_id.clone(),
        }
    }

    /// Asks every peer of the pool what its copy of an image is now (its
    /// role and promotion epoch), for a plain promotion here. Peers are
    /// asked at once, each for at most a few seconds.
    async fn peer_view(&self, pool: &str, image: &str) -> Result<mirror::PeerView, Status> {
        let m = self.mirror();
        let (p, n) = (pool.to_string(), image.to_string());
        let (global_id, peers) = blocking(move || {
            let (_, im) = m.image_of(&p, &n)?;
            let im = im.ok_or_else(|| {
                Error::invalid(format!("mirroring is not enabled on image '{p}/{n}'"))
            })?;
            Ok((im.global_id, m.pool_enabled(&p)?.peers))
        })
        .await?;
        let asks: Vec<_> = peers
            .into_iter()
            .filter(|p| !p.key.is_empty())
            .map(|peer| {
                let (gid, name) = (global_id.clone(), image.to_string());
                tokio::spawn(async move {
                    let ask = async {
                        let ep = peer.mon_host.first().ok_or_else(|| {
                            tern_client::ClientError::new(ErrorKind::InvalidArgument, "no endpoint")
                        })?;
                        let tls =
                            tern_client::config::TlsMode::Pinned(peer.tls_fingerprint.clone());
                        let c = tern_client::SiteClient::connect_with(
                            ep,
                            &tls,
                            &peer.client_name,
                            &peer.key,
                        )?;
                        let by_name = c
                            .mirror_image_get(pb::ImageRef {
                                pool: peer.remote_pool.clone(),
                                image: name,
                                snap: String::new(),
                            })
                            .await;
                        match by_name {
                            Ok(i) if i.global_id == gid => return Ok(Some(i)),
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind,
                                    ErrorKind::NotFound | ErrorKind::InvalidArgument
                                ) => {}
                            Err(e) => return Err(e),
                        }
                        // Renamed there, or not mirrored under this name.
                        let list = c
                            .mirror_image_list(pb::PoolRequest {
                                pool: peer.remote_pool.clone(),
                            })
                            .await?;
                        Ok(list.images.into_iter().find(|i| i.global_id == gid))
                    };
                    let r = tokio::time::timeout(std::time::Duration::from_secs(5), ask).await;
                    (peer.site_name, r)
                })
            })
            .collect();
        let mut view = mirror::PeerView::default();
        for a in asks {
            let Ok((site, r)) = a.await else { continue };
            match r {
                Ok(Ok(Some(i))) => {
                    if i.primary {
                        view.primary_at.push(site.clone());
                    }
                    if i.epoch > view.max_epoch {
                        view.max_epoch = i.epoch;
                        view.max_epoch_site = site;
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => view.unreachable.push((site, e.message)),
                Err(_) => view
                    .unreachable
                    .push((site, "no answer within 5 seconds".into())),
            }
        }
        Ok(view)
    }

    async fn mirror_image_info(&self, r: &pb::ImageRef) -> Result<pb::MirrorImageInfo, Status> {
        let m = self.mirror();
        let r = r.clone();
        blocking(move || {
            let (img, im) = m.image_of(&r.pool, &r.image)?;
            let im = im.ok_or_else(|| {
                Error::invalid(format!(
                    "mirroring is not enabled on image '{}/{}'",
                    r.pool, r.image
                ))
            })?;
            let snaps = m.mirror_snaps(&r.pool, &r.image)?;
            Ok(mirror_info_pb(&img, &im, &snaps))
        })
        .await
    }

    async fn status_of_image(
        &self,
        pool: &str,
        image: &str,
    ) -> Result<pb::MirrorImageStatus, Status> {
        let m = self.mirror();
        let (pool, image) = (pool.to_string(), image.to_string());
        blocking(move || {
            let pm = m.pool_enabled(&pool)?;
            let (img, im) = m.image_of(&pool, &image)?;
            let im = im.ok_or_else(|| {
                Error::invalid(format!(
                    "mirroring is not enabled on image '{pool}/{image}'"
                ))
            })?;
            let daemons = m.daemons()?;
            build_status(&m, &pool, &img, &im, &pm, &daemons)
        })
        .await
    }

    async fn pool_status(&self, pool: &str) -> Result<pb::MirrorPoolStatusReply, Status> {
        let m = self.mirror();
        let pool = pool.to_string();
        blocking(move || {
            let pm = m.pool_enabled(&pool)?;
            let daemons = m.daemons()?;
            let now = mirror::now_ms();
            let mut images = Vec::new();
            let mut states: std::collections::HashMap<String, u64> =
                std::collections::HashMap::new();
            let (mut errors, mut warnings) = (0, 0);
            for img in m.site.store.image_list(&pool).map_err(serr)? {
                let Some(im) = m.image(&img.id.to_string())? else {
                    continue;
                };
                let st = build_status(&m, &pool, &img, &im, &pm, &daemons)?;
                // Count what matters for the image: its copies' states on a
                // primary, its own state on a non-primary.
                let mut counted: Vec<&pb::MirrorSiteStatus> = if im.primary {
                    st.peer_sites.iter().collect()
                } else {
                    st.local.iter().collect()
                };
                // A primary in split-brain is in error itself, whatever
                // its peers last said.
                if im.primary
                    && let Some(l) = st.local.as_ref()
                    && l.up
                    && strip_state(&l.state) == "error"
                {
                    counted.push(l);
                }
                for c in counted {
                    let key = if c.up {
                        strip_state(&c.state).to_string()
                    } else {
                        "unknown".to_string()
                    };
                    match key.as_str() {
                        "error" => errors += 1,
                        "replaying" | "stopped" => {}
                        _ => warnings += 1,
                    }
                    *states.entry(key).or_default() += 1;
                }
                images.push(st);
            }
            let mine: Vec<&mirror::Daemon> = daemons
                .iter()
                .filter(|d| d.site_name == pm.site_name)
                .collect();
            let daemon_pb: Vec<pb::MirrorDaemonInfo> = mine
                .iter()
                .map(|d| {
                    let up = now.saturating_sub(d.received_ms) <= STALE_MS;
                    pb::MirrorDaemonInfo {
                        service_id: d.service_id.clone(),
                        instance_id: d.instance_id.clone(),
                        client_id: d.client_id.clone(),
                        hostname: d.hostname.clone(),
                        version: d.version.clone(),
                        last_heartbeat: d.received_ms / 1000,
                        up,
                        health: if up { "OK".into() } else { "ERROR".into() },
                        site_name: d.site_name.clone(),
                    }
                })
                .collect();
            let daemon_health = if daemon_pb.iter().any(|d| d.up) {
                "OK"
            } else {
                "WARNING"
            };
            let image_health = if errors > 0 {
                "ERROR"
            } else if warnings > 0 {
                "WARNING"
            } else {
                "OK"
            };
            let rank = |h: &str| match h {
                "ERROR" => 2,
                "WARNING" => 1,
                _ => 0,
            };
            let health = if rank(daemon_health) >= rank(image_health) {
                daemon_health
            } else {
                image_health
            };
            Ok(pb::MirrorPoolStatusReply {
                health: health.into(),
                daemon_health: daemon_health.into(),
                image_health: image_health.into(),
                states: states.into_iter().collect(),
                // Live daemons, and for ten minutes the ones that went
                // silent (shown down): a restarted daemon has a new id.
                daemons: daemon_pb
                    .into_iter()
                    .filter(|d| {
                        d.up || now.saturating_sub(d.last_heartbeat * 1000)
                            < mirror::DAEMON_FORGET_MS
                    })
                    .collect(),
                images,
            })
        })
        .await
    }
}
