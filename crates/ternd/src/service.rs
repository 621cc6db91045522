//! The gRPC service: authenticates and authorises every call, then runs the
//! store's synchronous work on the blocking pool (the one place where
//! blocking I/O meets async, STYLE §6).

use crate::auth::{Need, UserRecord};
use crate::options;
use crate::site::Site;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tern_proto::headers;
use tern_proto::v1 as pb;
use tern_store::{CreateOpts, Image, KvTable};
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
    pub fn new(site: Arc<Site>) -> Service {
        Service {
            site,
            counters: Mutex::new(HashMap::new()),
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
            Ok(image_info_pb(&info, Some(used)))
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
        let img = self.open(&r).map_err(status_of)?;
        let c = self.counters(&r.pool);
        let data = blocking(move || {
            let mut buf = vec![0u8; q.length as usize];
            img.read(q.offset, &mut buf).map_err(serr)?;
            Ok(buf)
        })
        .await?;
        c.read_ops.fetch_add(1, Ordering::Relaxed);
        c.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Response::new(pb::ReadReply { data }))
    }

    async fn write(&self, req: Request<pb::WriteRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let img = self.open(&r).map_err(status_of)?;
        let c = self.counters(&r.pool);
        let n = q.data.len() as u64;
        blocking(move || img.write(q.offset, &q.data, q.fua).map_err(serr)).await?;
        c.write_ops.fetch_add(1, Ordering::Relaxed);
        c.write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(Response::new(pb::Empty {}))
    }

    async fn discard(&self, req: Request<pb::RangeRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let img = self.open(&r).map_err(status_of)?;
        blocking(move || img.discard(q.offset, q.length).map_err(serr)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn write_zeroes(&self, req: Request<pb::RangeRequest>) -> SResult<pb::Empty> {
        let r = image_ref(req.get_ref().image.clone())?;
        self.check(&req, Need::Write(&r.pool))?;
        let q = req.into_inner();
        let img = self.open(&r).map_err(status_of)?;
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
        let img = self.open(&r).map_err(status_of)?;
        let size = img.size();
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
        let chunk = if q.chunk_size == 0 {
            DATA_CHUNK
        } else {
            (q.chunk_size as u64).clamp(4096, 8 << 20)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let c = self.counters(&r.pool);
        tokio::spawn(async move {
            let res = stream_out(img, q.offset, end, chunk, &tx, &c).await;
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
                Import {
                    img: self.open(&r).map_err(status_of)?,
                    target: r,
                    hidden: None,
                    site: self.site.clone(),
                    data: 0,
                    zeros: 0,
                }
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
}

/// Sends [start, end) of an image as chunks: holes and all-zero blocks as
/// zero runs (merged), data in pieces of at most `chunk` bytes.
async fn stream_out(
    img: Arc<Image>,
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
        let extents = blocking(move || i.allocated_extents(p, n).map_err(serr)).await?;
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
                    i.read(at, &mut b).map_err(serr)?;
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

/// One import in progress. A created image lives under a hidden name
/// (`.import-…`, which no user name can collide with) until commit.
struct Import {
    site: Arc<Site>,
    img: Arc<Image>,
    target: pb::ImageRef,
    hidden: Option<String>,
    data: u64,
    zeros: u64,
}

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
            },
            hidden: Some(hidden),
            data: 0,
            zeros: 0,
        })
    }

    async fn chunk(&mut self, ch: pb::DataChunk) -> Result<(), Status> {
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
            Ok(())
        })
        .await;
        if let Err(e) = published {
            self.abort().await;
            return Err(e);
        }
        self.hidden = None;
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
        if let Some(h) = self.hidden.take() {
            let site = self.site.clone();
            let pool = self.target.pool.clone();
            let _ = tokio::task::spawn_blocking(move || site.store.image_remove(&pool, &h)).await;
            tracing::warn!(image = %format!("{}/{}", self.target.pool, self.target.image), "import discarded");
        }
    }
}

/// Removes imports that a crash interrupted (hidden `.import-*` images).
pub fn clean_interrupted_imports(site: &Site) {
    let Ok(pools) = site.store.pool_list() else {
        return;
    };
    for p in pools {
        if let Ok(names) = site.store.hidden_images(&p.name) {
            for n in names.into_iter().filter(|n| n.starts_with(".import-")) {
                tracing::warn!(pool = %p.name, image = %n, "removing an import interrupted by a crash");
                let _ = site.store.image_remove(&p.name, &n);
            }
        }
    }
}
