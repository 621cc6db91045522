//! Import and import-diff: the write stream's transaction. The first
//! message opens (and may create) the target, chunks write it, commit
//! publishes it; a stream that ends otherwise leaves nothing behind. A
//! created image lives under a hidden name (`.import-…`, which no user name
//! can collide with) until commit; an export-diff applied to an image is
//! undone from a safety snapshot. An export-diff's commit point is its end
//! snapshot: a crash before it rolls the image back to the safety
//! snapshot, a crash after it finishes the import (the site remembers which
//! end snapshot belongs to which safety snapshot, so it can tell).

use crate::api::{Ctx, PoolCounters, status_of};
use crate::auth::Need;
use crate::convert::image_info_pb;
use crate::site::Site;
use crate::work::blocking;
use std::sync::Arc;
use tern_proto::v1 as pb;
use tern_store::{Image, KvTable, SnapNamespace, Store};
use tern_types::error::Error;
use tern_types::{ErrorKind, validate_name};
use tonic::Status;

/// Largest image an import of unknown length may grow to before commit.
const IMPORT_MAX_SIZE: u64 = 1 << 50;
const SAFETY_PREFIX: &str = ".import-diff-";

/// Where the end snapshot of the import-diff behind `safety` is recorded.
fn end_snap_key(pool: &str, image: &str, safety: &str) -> String {
    format!("import-diff/{pool}/{image}/{safety}")
}

/// Runs store work for an import on the blocking pool, its error as a status.
async fn work<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    blocking(f).await.map_err(status_of)
}

/// One import in progress.
pub struct Import {
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
    counters: Arc<PoolCounters>,
}

#[derive(Clone)]
struct SyncFence {
    image_id: String,
    spec: String,
    expect_epoch: Option<u64>,
}

/// Runs `f`, under the sync fence when there is one.
fn fenced<T>(
    fence: &Option<SyncFence>,
    site: &Arc<Site>,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    match fence {
        Some(x) => {
            let m = crate::mirror::Mirror { site: site.clone() };
            m.sync_write(&x.image_id, &x.spec, x.expect_epoch, f)
        }
        None => f(),
    }
}

impl Import {
    /// Opens the import the first message of a write stream asks for,
    /// checking the caller may write there.
    pub async fn open(c: &Ctx, open: pb::WriteStreamOpen) -> Result<Import, Status> {
        let authorize = |need| c.site.authorize(&c.who, need).map_err(status_of);
        match (open.create, open.image) {
            (Some(create), _) => {
                authorize(Need::Write(&create.pool))?;
                Import::create(c, create).await
            }
            (None, Some(r)) => {
                authorize(Need::Write(&r.pool))?;
                if open.mirror_sync {
                    authorize(Need::MirrorDaemon(&r.pool))?;
                }
                let (c2, r2) = (c.clone(), r.clone());
                let (img, fence) = c
                    .run(move |c| {
                        if !open.mirror_sync {
                            return Ok((c.open_for_write(&r2, &open.lock_cookie)?, None));
                        }
                        let img = c.open_for_sync(&r2)?;
                        let fence = SyncFence {
                            image_id: img.info().id.to_string(),
                            spec: format!("{}/{}", r2.pool, r2.image),
                            expect_epoch: open.expect_epoch,
                        };
                        Ok((img, Some(fence)))
                    })
                    .await?;
                let mut import = Import {
                    img,
                    counters: c2.counters.of(&r.pool),
                    target: r,
                    hidden: None,
                    site: c2.site.clone(),
                    data: 0,
                    zeros: 0,
                    safety: None,
                    diff_to: None,
                    limit: u64::MAX,
                    fence,
                };
                if let Some(d) = open.diff {
                    import.begin_diff(d).await?;
                }
                Ok(import)
            }
            (None, None) => Err(status_of(Error::invalid("open names no image"))),
        }
    }

    async fn create(c: &Ctx, req: pb::ImageCreateRequest) -> Result<Import, Status> {
        let mut sized = req.clone();
        if sized.size == 0 {
            sized.size = IMPORT_MAX_SIZE;
        }
        let opts = c.default_create(&sized).map_err(status_of)?;
        let hidden = format!(".import-{}", uuid::Uuid::new_v4().simple());
        let s = c.site.clone();
        let (pool, name, h) = (req.pool.clone(), req.image.clone(), hidden.clone());
        let img = work(move || {
            match s.store.image_info(&pool, &name) {
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("image '{pool}/{name}' already exists"),
                    ));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            s.store.image_create(&pool, &h, &opts)?;
            Ok(s.store.open_image(&pool, &h)?)
        })
        .await?;
        Ok(Import {
            site: c.site.clone(),
            img,
            counters: c.counters.of(&req.pool),
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

    /// Writes one chunk (a zero run on an image that is new costs nothing).
    pub async fn chunk(&mut self, ch: pb::DataChunk) -> Result<(), Status> {
        let n = ch.length;
        let r = self.write_chunk(ch).await;
        PoolCounters::count(&self.counters.write_ops, 1);
        PoolCounters::count(&self.counters.write_bytes, n);
        r
    }

    async fn write_chunk(&mut self, ch: pb::DataChunk) -> Result<(), Status> {
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
                work(move || {
                    fenced(
                        &fence,
                        &site,
                        || Ok(img.write_zeroes(ch.offset, ch.length)?),
                    )
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
        work(move || {
            fenced(&fence, &site, || Ok(img.write(ch.offset, &ch.data, false)?))?;
            crate::testpoint::reached("import-data");
            Ok(())
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
        work(move || {
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
            if !d2.to_snap.is_empty() {
                site.store.kv_put(KvTable::Site, &end_snap_key(&t.pool, &t.image, &s2), &d2.to_snap)?;
            }
            site.store.snap_create(&t.pool, &t.image, &s2, SnapNamespace::User)?;
            if d2.size != img.size() {
                site.store.image_resize(&t.pool, &t.image, d2.size, true)?;
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

    /// Publishes the import if every byte it announced arrived.
    pub async fn commit(
        mut self,
        cm: pb::WriteStreamCommit,
    ) -> Result<pb::WriteStreamReply, Status> {
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
        let published = work(move || {
            let store = &site.store;
            if let Some(h) = &hidden {
                if cm.final_size == 0 {
                    return Err(Error::invalid(
                        "cannot import an empty input: an image needs a size > 0",
                    ));
                }
                store.image_resize(&target.pool, h, cm.final_size, true)?;
            }
            img.flush()?;
            // The rename is the last step: until it succeeds the hidden image is ours to remove.
            if let Some(h) = &hidden {
                store.image_rename(&target.pool, h, &target.image)?;
            }
            if let Some(to) = &diff_to {
                crate::testpoint::reached("import-diff-end-snap");
                store.snap_create(&target.pool, &target.image, to, SnapNamespace::User)?;
            }
            if let Some(sf) = &safety {
                crate::testpoint::reached("import-diff-drop-safety");
                // Past the commit point: a failure from here on must not undo the import.
                if let Err(e) = finish_diff(store, &target.pool, &target.image, sf) {
                    tracing::warn!(image = %format!("{}/{}", target.pool, target.image), error = %e.chain(), "import-diff done; its safety snapshot stays until the next start");
                }
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
        work(move || {
            let info = site.store.image_info(&target.pool, &target.image)?;
            Ok(pb::WriteStreamReply {
                bytes_written: data,
                bytes_zero: zeros,
                image: Some(image_info_pb(&info, None)),
            })
        })
        .await
    }

    /// Undoes whatever the import did so far.
    pub async fn abort(&mut self) {
        let spec = format!("{}/{}", self.target.pool, self.target.image);
        if let Some(sf) = self.safety.take() {
            let site = self.site.clone();
            let t = self.target.clone();
            let to = self.diff_to.clone();
            let undone = blocking(move || {
                undo_diff(&site, &t.pool, &t.image, &sf, to.as_deref());
                Ok::<_, Error>(())
            })
            .await;
            if let Err(e) = undone {
                tracing::error!(image = %spec, error = %e.chain(), "cannot roll back an interrupted import-diff");
            }
            tracing::warn!(image = %spec, "import-diff rolled back");
        }
        if let Some(h) = self.hidden.take() {
            let site = self.site.clone();
            let pool = self.target.pool.clone();
            if let Err(e) = blocking(move || site.store.image_remove(&pool, &h)).await {
                tracing::warn!(image = %spec, error = %e.chain(), "cannot remove a discarded import");
            }
            tracing::warn!(image = %spec, "import discarded");
        }
    }
}

/// Drops the safety snapshot of an export-diff that reached its end, then
/// the record of its end snapshot.
fn finish_diff(store: &Store, pool: &str, image: &str, safety: &str) -> Result<(), Error> {
    store.snap_remove(pool, image, safety, false)?;
    crate::testpoint::reached("import-diff-forget");
    store.kv_delete(KvTable::Site, &end_snap_key(pool, image, safety))?;
    Ok(())
}

/// Puts an image back as it was before an export-diff started.
fn undo_diff(site: &Site, pool: &str, image: &str, safety: &str, to: Option<&str>) {
    if let Some(to) = to {
        let _ = site.store.snap_remove(pool, image, to, false);
    }
    if let Err(e) = site.store.snap_rollback(pool, image, safety) {
        tracing::error!(%pool, %image, error = %tern_types::error::chain(&e), "cannot roll back an interrupted import-diff");
        return;
    }
    let _ = site.store.snap_remove(pool, image, safety, false);
    let _ = site
        .store
        .kv_delete(KvTable::Site, &end_snap_key(pool, image, safety));
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
                let key = end_snap_key(&p.name, &img.name, &s.name);
                let end = site.store.kv_get(KvTable::Site, &key).ok().flatten();
                // The end snapshot exists only once the diff's data is durable.
                let reached_end = end
                    .as_deref()
                    .is_some_and(|to| snaps.iter().any(|x| x.name == to && x.id > s.id));
                if reached_end {
                    tracing::warn!(pool = %p.name, image = %img.name, snap = end.as_deref().unwrap_or(""), "finishing an import-diff a crash interrupted after its end snapshot");
                    if let Err(e) = finish_diff(&site.store, &p.name, &img.name, &s.name) {
                        tracing::error!(pool = %p.name, image = %img.name, error = %e.chain(), "cannot finish an interrupted import-diff");
                    }
                } else {
                    tracing::warn!(pool = %p.name, image = %img.name, "rolling back an import-diff interrupted by a crash");
                    undo_diff(site, &p.name, &img.name, &s.name, None);
                }
            }
        }
    }
    // Records whose safety snapshot is gone: the crash came after it.
    if let Ok(recs) = site.store.kv_list(KvTable::Site, "import-diff/") {
        for (key, _) in recs {
            let mut parts = key.splitn(4, '/').skip(1);
            let (Some(pool), Some(image), Some(safety)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if site.store.snap_get(pool, image, safety).is_err() {
                let _ = site.store.kv_delete(KvTable::Site, &key);
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
