//! The gRPC service: authenticates and authorises every call, then runs the
//! store's synchronous work on the blocking pool (the one place where
//! blocking I/O meets async, STYLE §6).

use crate::auth::{Need, UserRecord};
use crate::locks::Locks;
use crate::options;
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
use tokio_stream::wrappers::ReceiverStream;
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
}

type SResult<T> = Result<Response<T>, Status>;

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

fn image_ref(r: Option<pb::ImageRef>) -> Result<pb::ImageRef, Status> {
    r.ok_or_else(|| status_of(Error::invalid("the request names no image")))
}

impl Service {
    pub fn new(site: Arc<Site>, locks: Arc<Locks>) -> Service {
        Service {
            site,
            counters: Mutex::new(HashMap::new()),
            locks,
        }
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
            .authenticate(get(headers::ENTITY), get(headers::KEY))
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
        let opt = options::find(key)?;
        for w in options::lookup_chain(who) {
            if let Some(v) = self
                .site
                .store
                .kv_get(KvTable::Config, &format!("{w}\0{key}"))
                .map_err(serr)?
            {
                return Ok(v);
            }
        }
        Ok(opt.default.to_string())
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

    async fn image_create(&self, req: Request<pb::ImageCreateRequest>) -> SResult<pb::ImageInfo> {
        let pool = req.get_ref().pool.clone();
        self.check(&req, Need::Write(&pool))?;
        let r = req.into_inner();
        let opts = self.default_create(&r).map_err(status_of)?;
        let site = self.site.clone();
        let info = blocking(move || {
            site.store
                .image_create(&r.pool, &r.image, &opts)
                .map_err(serr)
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
        let site = self.site.clone();
        blocking(move || site.store.image_remove(&r.pool, &r.image).map_err(serr)).await?;
        Ok(Response::new(pb::Empty {}))
    }

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

    type ReadStreamStream = ReceiverStream<Result<pb::DataChunk, Status>>;

    async fn read_stream(
        &self,
        req: Request<pb::ReadStreamRequest>,
    ) -> SResult<Self::ReadStreamStream> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Read(&r.pool))?;
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
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let c = self.counters(&r.pool);
        let (diff, whole) = (q.diff, q.whole_object);
        tokio::spawn(async move {
            let res = if diff {
                stream_diff(img, from, to, q.offset, end, chunk, whole, &tx, &c).await
            } else {
                stream_out(img, to, q.offset, end, chunk, &tx, &c).await
            };
            if let Err(e) = res {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
                let img = self
                    .open_for_write(&r, &open.lock_cookie, &who)
                    .map_err(status_of)?;
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

    async fn config_set(&self, req: Request<pb::ConfigSetRequest>) -> SResult<pb::Empty> {
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
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
                .map_err(serr)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn config_get(&self, req: Request<pb::ConfigGetRequest>) -> SResult<pb::ConfigListReply> {
        self.check(&req, Need::SiteRead)?;
        let r = req.into_inner();
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
        self.check(&req, Need::Admin)?;
        let r = req.into_inner();
        options::find(&r.key).map_err(status_of)?;
        self.site
            .store
            .kv_delete(KvTable::Config, &format!("{}\0{}", r.who, r.key))
            .map_err(|e| status_of(serr(e)))?;
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

/// Sends [start, end) of an image as chunks: holes and all-zero blocks as
/// zero runs (merged), data in pieces of at most `chunk` bytes.
async fn stream_out(
    img: Arc<Image>,
    snap: Option<u64>,
    start: u64,
    end: u64,
    chunk: u64,
    tx: &tokio::sync::mpsc::Sender<Result<pb::DataChunk, Status>>,
    c: &PoolCounters,
) -> Result<(), Status> {
    // Ask for the allocation map in large windows so a sparse 10 TiB image
    // costs a few calls, not one per chunk.
    const WINDOW: u64 = 1 << 30;
    let mut pos = start;
    let mut zero_run = 0u64; // pending zeros starting at pos - zero_run
    let send = |ch: pb::DataChunk| async move {
        tx.send(Ok(ch))
            .await
            .map_err(|_| Status::cancelled("receiver gone"))
    };
    while pos < end {
        let wend = (pos + WINDOW).min(end);
        let i = img.clone();
        let (p, n) = (pos, wend - pos);
        let extents = blocking(move || i.allocated_extents_at(snap, p, n).map_err(serr)).await?;
        let mut cur = pos;
        for (eoff, elen) in extents.into_iter().chain(std::iter::once((wend, 0))) {
            if eoff > cur {
                zero_run += eoff - cur;
                cur = eoff;
            }
            let eend = eoff + elen;
            while cur < eend {
                let n = chunk.min(eend - cur);
                let i = img.clone();
                let at = cur;
                let buf = blocking(move || {
                    let mut b = vec![0u8; n as usize];
                    i.read_at(snap, at, &mut b).map_err(serr)?;
                    Ok(b)
                })
                .await?;
                c.read_ops.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(n, Ordering::Relaxed);
                for (off, len, zero) in tern_client::transfer::zero_runs(&buf) {
                    if zero {
                        zero_run += len as u64;
                        continue;
                    }
                    if zero_run > 0 {
                        send(pb::DataChunk {
                            offset: at + off as u64 - zero_run,
                            length: zero_run,
                            zero: true,
                            data: vec![],
                        })
                        .await?;
                        zero_run = 0;
                    }
                    send(pb::DataChunk {
                        offset: at + off as u64,
                        length: len as u64,
                        zero: false,
                        data: buf[off..off + len].to_vec(),
                    })
                    .await?;
                }
                cur += n;
            }
        }
        pos = wend;
    }
    if zero_run > 0 {
        send(pb::DataChunk {
            offset: end - zero_run,
            length: zero_run,
            zero: true,
            data: vec![],
        })
        .await?;
    }
    Ok(())
}

/// Sends only what changed between `from` and `to` inside [start, end):
/// changed data as data chunks, changed-to-zero ranges as zero runs.
#[allow(clippy::too_many_arguments)]
async fn stream_diff(
    img: Arc<Image>,
    from: Option<u64>,
    to: Option<u64>,
    start: u64,
    end: u64,
    chunk: u64,
    whole_object: bool,
    tx: &tokio::sync::mpsc::Sender<Result<pb::DataChunk, Status>>,
    c: &PoolCounters,
) -> Result<(), Status> {
    let send = |ch: pb::DataChunk| async move {
        tx.send(Ok(ch))
            .await
            .map_err(|_| Status::cancelled("receiver gone"))
    };
    let i = img.clone();
    let extents = blocking(move || {
        i.diff(from, to, start, end - start, whole_object)
            .map_err(serr)
    })
    .await?;
    for e in extents {
        if !e.data {
            send(pb::DataChunk {
                offset: e.offset,
                length: e.length,
                zero: true,
                data: vec![],
            })
            .await?;
            continue;
        }
        let mut cur = e.offset;
        let eend = e.offset + e.length;
        while cur < eend {
            let n = chunk.min(eend - cur);
            let (i, at) = (img.clone(), cur);
            let buf = blocking(move || {
                let mut b = vec![0u8; n as usize];
                i.read_at(to, at, &mut b).map_err(serr)?;
                Ok(b)
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
                        data: vec![],
                    }
                } else {
                    pb::DataChunk {
                        offset,
                        length: len as u64,
                        zero: false,
                        data: buf[off..off + len].to_vec(),
                    }
                };
                send(ch).await?;
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
        if ch.zero {
            self.zeros += ch.length;
            // A new image is all zeros already.
            if self.hidden.is_none() {
                blocking(move || img.write_zeroes(ch.offset, ch.length).map_err(serr)).await?;
            }
            return Ok(());
        }
        if ch.data.len() as u64 != ch.length {
            return Err(status_of(Error::invalid(
                "chunk length does not match its data",
            )));
        }
        self.data += ch.length;
        blocking(move || img.write(ch.offset, &ch.data, false).map_err(serr)).await
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
