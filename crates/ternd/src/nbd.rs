//! ternd's NBD exports: `pool/image` read-write (holding the image's
//! exclusive lock for as long as the connection lives), `pool/image@snap`
//! read-only. Block status offers `base:allocation` from the store's
//! allocation map and `tern:changed-since:<snap>` from its diff, with the
//! meaning of qemu's `qemu:dirty-bitmap:` (flag 1 = changed), so backup
//! tools that pull deltas over NBD work unchanged.

use crate::locks::{Claim, Locks};
use crate::site::Site;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tern_nbd::wire::{
    NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EPERM, NBD_ESHUTDOWN, STATE_HOLE, STATE_ZERO,
};
use tern_nbd::{BlockDevice, DeviceError, Exports, MetaContext, ReadChunk};
use tern_store::{Image, SnapNamespace, StoreError};
use tern_types::error::Error;
use tern_types::{ErrorKind, Features, ImageSpec};

pub const CHANGED_SINCE: &str = "tern:changed-since:";

pub struct SiteExports {
    pub site: Arc<Site>,
    pub locks: Arc<Locks>,
    pub lease: Arc<dyn Fn() -> Duration + Send + Sync>,
    /// Where lock renewers live, so a shutdown stops them.
    pub tasks: tern_daemon::Tasks,
}

fn dev_err(e: impl Into<Error>) -> DeviceError {
    let e: Error = e.into();
    let errno = match e.kind {
        ErrorKind::InvalidArgument => NBD_EINVAL,
        ErrorKind::NoSpace => NBD_ENOSPC,
        ErrorKind::ReadOnly | ErrorKind::PermissionDenied => NBD_EPERM,
        ErrorKind::Fenced => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    };
    DeviceError::new(errno, e.message)
}

/// Store work on the blocking pool, its error as an NBD error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, DeviceError> {
    crate::work::blocking(f).await.map_err(dev_err)
}

#[async_trait]
impl Exports for SiteExports {
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        let spec = ImageSpec::parse(name).map_err(|e| DeviceError::new(NBD_EINVAL, e.message))?;
        let site = self.site.clone();
        let s2 = spec.clone();
        let (img, snap, snaps) = blocking(move || {
            let img = site.store.open_image(&s2.pool, &s2.image)?;
            let snap = match &s2.snap {
                Some(n) => Some(site.store.snap_get(&s2.pool, &s2.image, n)?),
                None => None,
            };
            let snaps = site.store.snap_list(&s2.pool, &s2.image)?;
            Ok((img, snap, snaps))
        })
        .await?;
        let upto = snap.as_ref().map(|s| s.id).unwrap_or(u64::MAX);
        let contexts = snaps
            .iter()
            .filter(|s| {
                s.id < upto
                    && matches!(s.namespace, SnapNamespace::User)
                    && !s.name.starts_with('.')
            })
            .map(|s| (format!("{CHANGED_SINCE}{}", s.name), s.id))
            .collect();
        let info = img.info();
        let non_primary = crate::mirror::Mirror {
            site: self.site.clone(),
        }
        .image(&info.id.to_string())
        .map_err(|e| DeviceError::io(e.message))?
        .is_some_and(|m| !m.primary);
        let mut dev = StoreDevice {
            read_only: snap.is_some() || non_primary,
            spec: spec.to_string(),
            size: snap.as_ref().map(|s| s.size).unwrap_or(info.size),
            snap: snap.map(|s| s.id),
            img,
            contexts,
            lock: None,
            io: self.site.clone(),
            watch: None,
        };
        if !dev.read_only && info.features.has(Features::EXCLUSIVE_LOCK) {
            let cookie = format!("nbd {}", uuid::Uuid::new_v4().simple());
            let image_id = info.id.to_string();
            let lease = (self.lease)();
            let claim = Claim {
                cookie: &cookie,
                entity: "nbd",
                address: "nbd export",
            };
            match self
                .locks
                .acquire(&self.site.store, &image_id, &dev.spec, claim, lease)
            {
                Ok(_) => {}
                // Another writer holds the image: this client may still read.
                // NBD has no way to ask for read-only access, so the export is
                // offered read-only and a writable open is refused by the client.
                Err(e) if e.kind == ErrorKind::Busy => {
                    tracing::info!(export = %dev.spec, reason = %e.message, "nbd export opened read-only");
                    dev.read_only = true;
                    dev.watch = Some(self.locks.watch(
                        &image_id,
                        format!("an NBD client (read-only) of {}", dev.spec),
                    ));
                    return Ok(Arc::new(dev));
                }
                Err(e) => return Err(DeviceError::new(NBD_EPERM, e.message)),
            }
            // Renew while the connection lives; a broken (fenced) lock stops renewing.
            let (locks, site, id, c, spec_s, lease_fn) = (
                self.locks.clone(),
                self.site.clone(),
                image_id.clone(),
                cookie.clone(),
                dev.spec.clone(),
                self.lease.clone(),
            );
            let renewer = self.tasks.spawn_until_stop(async move {
                loop {
                    let lease = lease_fn();
                    tokio::time::sleep(lease / 3).await;
                    let claim = Claim {
                        cookie: &c,
                        entity: "nbd",
                        address: "nbd export",
                    };
                    if locks
                        .acquire(&site.store, &id, &spec_s, claim, lease)
                        .is_err()
                    {
                        return;
                    }
                }
            });
            dev.lock = Some(NbdLock {
                locks: self.locks.clone(),
                image_id,
                cookie,
                renewer,
            });
        }
        let who = match &dev.lock {
            Some(l) => format!(
                "an NBD client writing to {} (exclusive lock {})",
                dev.spec, l.cookie
            ),
            None if dev.read_only => format!("an NBD client (read-only) of {}", dev.spec),
            None => format!("an NBD client writing to {}", dev.spec),
        };
        dev.watch = Some(self.locks.watch(&info.id.to_string(), who));
        tracing::info!(export = %dev.spec, read_only = dev.snap.is_some(), "nbd export opened");
        Ok(Arc::new(dev))
    }

    async fn list(&self) -> Vec<(String, String)> {
        let site = self.site.clone();
        let r = crate::work::blocking(move || {
            let mut out = Vec::new();
            for p in site.store.pool_list().unwrap_or_default() {
                for i in site.store.image_list(&p.name).unwrap_or_default() {
                    out.push((
                        format!("{}/{}", p.name, i.name),
                        format!("tern image, {} bytes", i.size),
                    ));
                    for s in site.store.snap_list(&p.name, &i.name).unwrap_or_default() {
                        if matches!(s.namespace, SnapNamespace::User) && !s.name.starts_with('.') {
                            out.push((
                                format!("{}/{}@{}", p.name, i.name, s.name),
                                "read-only snapshot".into(),
                            ));
                        }
                    }
                }
            }
            Ok::<_, Error>(out)
        })
        .await;
        r.unwrap_or_default()
    }
}

struct NbdLock {
    locks: Arc<Locks>,
    image_id: String,
    cookie: String,
    renewer: tokio::task::JoinHandle<Option<()>>,
}

struct StoreDevice {
    read_only: bool,
    spec: String,
    img: Arc<Image>,
    snap: Option<u64>,
    size: u64,
    contexts: Vec<(String, u64)>,
    lock: Option<NbdLock>,
    /// The site, for its I/O metrics.
    io: Arc<Site>,
    /// Makes `rm` refuse while this export is open.
    watch: Option<crate::locks::Watch>,
}

impl StoreDevice {
    fn record(&self, op: &str, bytes: u64, since: std::time::Instant) {
        let pool = self.spec.split('/').next().unwrap_or("");
        self.io
            .io
            .record(pool, op, bytes, since.elapsed().as_secs_f64());
    }

    /// Writers must still hold the lock: after `lock rm` they are fenced.
    fn check_write(&self) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::new(
                NBD_EPERM,
                format!("{} is exported read-only", self.spec),
            ));
        }
        if let Some(l) = &self.lock
            && !l.locks.holds(&l.image_id, &l.cookie)
        {
            return Err(DeviceError::new(
                NBD_ESHUTDOWN,
                format!(
                    "the exclusive lock on {} was broken: this export is fenced",
                    self.spec
                ),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for StoreDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // Snapshots never change, so every connection sees the same bytes; a
        // writable export holds the image's exclusive lock, which one connection owns.
        self.snap.is_some()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let (img, snap) = (self.img.clone(), self.snap);
        let t = std::time::Instant::now();
        let r = blocking(move || {
            let mut buf = vec![0u8; len as usize];
            img.read_at(snap, offset, &mut buf)?;
            Ok(buf)
        })
        .await;
        self.record("read", len as u64, t);
        r
    }

    async fn read_sparse(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, DeviceError> {
        let (img, snap) = (self.img.clone(), self.snap);
        blocking(move || {
            let extents = img.allocated_extents_at(snap, offset, len as u64)?;
            let mut out = Vec::new();
            let mut pos = offset;
            for (eo, el) in extents {
                if eo > pos {
                    out.push(ReadChunk::Zero((eo - pos) as u32));
                }
                let mut buf = vec![0u8; el as usize];
                img.read_at(snap, eo, &mut buf)?;
                out.push(ReadChunk::Data(buf));
                pos = eo + el;
            }
            let end = offset + len as u64;
            if pos < end {
                out.push(ReadChunk::Zero((end - pos) as u32));
            }
            Ok(out)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.check_write()?;
        let img = self.img.clone();
        let (t, n) = (std::time::Instant::now(), data.len() as u64);
        // A journaled image takes the write without a blocking thread: it
        // is queued for the journal's committer and awaited.
        let r = match img.try_queue_write(offset, data, fua) {
            Ok(queued) => match queued {
                Ok(ticket) => ticket.wait_async().await.map_err(dev_err),
                Err(e) => Err(dev_err(e)),
            },
            Err(data) => blocking(move || img.write(offset, &data, fua)).await,
        };
        self.record("write", n, t);
        r
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let img = self.img.clone();
        let t = std::time::Instant::now();
        let r = blocking(move || img.flush()).await;
        self.record("flush", 0, t);
        r
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.check_write()?;
        let img = self.img.clone();
        blocking(move || {
            img.discard(offset, len as u64)?;
            if fua { img.flush() } else { Ok(()) }
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.check_write()?;
        let img = self.img.clone();
        blocking(move || {
            if no_hole {
                // The client wants the range allocated: write real zeros.
                let zeros = vec![0u8; (len as usize).min(1 << 20)];
                let mut pos = offset;
                let end = offset + len as u64;
                while pos < end {
                    let n = (end - pos).min(zeros.len() as u64) as usize;
                    img.write(pos, &zeros[..n], false)?;
                    pos += n as u64;
                }
            } else {
                img.write_zeroes(offset, len as u64)?;
            }
            if fua { img.flush() } else { Ok(()) }
        })
        .await
    }

    async fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, DeviceError> {
        let (img, snap) = (self.img.clone(), self.snap);
        let end = (offset + len as u64).min(self.size);
        let since = match context {
            MetaContext::BaseAllocation => None,
            MetaContext::Device(name) => Some(
                self.contexts
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, id)| *id)
                    .ok_or_else(|| {
                        DeviceError::new(NBD_EINVAL, format!("unknown meta context {name}"))
                    })?,
            ),
        };
        blocking(move || {
            // (offset, length) ranges that get the "set" flags.
            let marked: Vec<(u64, u64)> = match since {
                None => img.allocated_extents_at(snap, offset, end - offset)?,
                Some(from) => img
                    .diff(Some(from), snap, offset, end - offset, false)?
                    .into_iter()
                    .map(|d| (d.offset, d.length))
                    .collect(),
            };
            let (set, unset) = match since {
                None => (0, STATE_HOLE | STATE_ZERO),
                Some(_) => (1, 0),
            };
            let mut out = Vec::new();
            let mut pos = offset;
            let push = |out: &mut Vec<(u32, u32)>, mut n: u64, flags: u32| {
                while n > 0 {
                    let k = n.min(1 << 30);
                    out.push((k as u32, flags));
                    n -= k;
                }
            };
            for (o, l) in marked {
                let (o, e) = (o.max(pos), (o + l).min(end));
                if e <= o {
                    continue;
                }
                if o > pos {
                    push(&mut out, o - pos, unset);
                }
                push(&mut out, e - o, set);
                pos = e;
            }
            if pos < end {
                push(&mut out, end - pos, unset);
            }
            Ok(out)
        })
        .await
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.contexts.iter().map(|(n, _)| n.clone()).collect()
    }

    async fn close(&self) {
        if let Some(l) = &self.lock {
            l.renewer.abort();
            l.locks.release(&l.image_id, &l.cookie);
        }
        let img = self.img.clone();
        if let Err(e) = crate::work::blocking(move || img.flush()).await {
            tracing::warn!(export = %self.spec, error = %e.chain(), "flush at close");
        }
        tracing::info!(export = %self.spec, "nbd export closed");
    }
}
