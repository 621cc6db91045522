//! `Image`: creating, listing, changing and removing images; checksums.

use super::{Api, Reply, image};
use crate::auth::Need;
use crate::convert::image_info_pb;
use crate::mirror::{ImageMirrorMode, PoolMirrorMode};
use tern_proto::v1 as pb;
use tern_types::error::Error;
use tern_types::{Features, validate_name};
use tonic::Request;

#[tonic::async_trait]
impl pb::image_server::Image for Api {
    async fn image_create(&self, req: Request<pb::ImageCreateRequest>) -> Reply<pb::ImageInfo> {
        self.run(req, |r| Ok(Need::Write(&r.pool)), |c, r| {
            let opts = c.default_create(&r)?;
            let info = c.site.store.image_create(&r.pool, &r.image, &opts)?;
            // In pool mode every image is mirrored, as with rbd: journaled
            // ones in journal mode, so their RPO is the journal's, not a
            // snapshot schedule's.
            let m = c.mirror();
            if m.pool(&r.pool)?.is_some_and(|p| p.mode == PoolMirrorMode::Pool) {
                m.image_enable(&r.pool, &r.image, ImageMirrorMode::for_features(info.features))?;
            }
            tracing::info!(image = %format!("{}/{}", info.pool, info.name), size = info.size, "image created");
            Ok(image_info_pb(&info, Some(0)))
        })
        .await
    }

    async fn image_list(&self, req: Request<pb::PoolRequest>) -> Reply<pb::ImageListReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let list = c.site.store.image_list(&r.pool)?;
                Ok(pb::ImageListReply {
                    images: list.iter().map(|i| image_info_pb(i, None)).collect(),
                })
            },
        )
        .await
    }

    async fn image_get(&self, req: Request<pb::ImageRef>) -> Reply<pb::ImageInfo> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let store = &c.site.store;
                let info = store.image_info(&r.pool, &r.image)?;
                let used = store
                    .open_image(&r.pool, &r.image)
                    .and_then(|i| i.used_bytes())?;
                let mut out = image_info_pb(&info, Some(used));
                out.snapshot_count = store.snap_list(&r.pool, &r.image)?.len() as u64;
                if !r.snap.is_empty() {
                    let snap = store.snap_get(&r.pool, &r.image, &r.snap)?;
                    out.size = snap.size;
                    out.objects = info.layout.object_count(snap.size);
                    out.snap = snap.name;
                    out.snap_id = snap.id;
                    out.protected = snap.protected;
                }
                Ok(out)
            },
        )
        .await
    }

    async fn image_resize(&self, req: Request<pb::ImageResizeRequest>) -> Reply<pb::ImageInfo> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                if q.size == 0 {
                    return Err(Error::invalid("image size must be greater than 0"));
                }
                let info = c
                    .site
                    .store
                    .image_resize(&r.pool, &r.image, q.size, q.allow_shrink)?;
                Ok(image_info_pb(&info, None))
            },
        )
        .await
    }

    async fn image_rename(&self, req: Request<pb::ImageRenameRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                validate_name("image", &q.new_name)?;
                c.site.store.image_rename(&r.pool, &r.image, &q.new_name)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn image_remove(&self, req: Request<pb::ImageRemoveRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let id = c.site.store.image_info(&r.pool, &r.image)?.id.to_string();
                let spec = format!("{}/{}", r.pool, r.image);
                // A DR copy goes only when asked twice: rm of a copy by
                // mistake loses the site's protection without a word.
                let m = crate::mirror::Mirror {
                    site: c.site.clone(),
                };
                if !q.force
                    && let Some(im) = m.image(&id)?
                    && !im.primary
                {
                    return Err(Error::invalid(format!(
                        "'{spec}' is a non-primary mirror copy: removing it leaves its primary without this copy. \
                         Disable mirroring of it on the primary site, or run `tern rm {spec} --force`"
                    )));
                }
                c.locks.remove_unless_open(&id, &spec, || {
                    Ok(c.site.store.image_remove(&r.pool, &r.image)?)
                })?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn image_features(&self, req: Request<pb::ImageFeaturesRequest>) -> Reply<pb::ImageInfo> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
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
                let info = c
                    .site
                    .store
                    .image_set_features(&r.pool, &r.image, enable, disable)?;
                Ok(image_info_pb(&info, None))
            },
        )
        .await
    }

    async fn image_checksum(&self, req: Request<pb::ChecksumRequest>) -> Reply<pb::ChecksumReply> {
        self.run(
            req,
            |q| Ok(Need::Read(&image(&q.image)?.pool)),
            |c, q| {
                let chunk = if q.chunk_size == 0 {
                    4 << 20
                } else {
                    q.chunk_size.clamp(64 << 10, 64 << 20)
                };
                let (img, snap) = c.open_at(&q.image.unwrap_or_default())?;
                let size = snap.as_ref().map(|s| s.size).unwrap_or_else(|| img.size());
                let at = snap.map(|s| s.id);
                let zero = blake3::hash(&vec![0u8; chunk as usize]);
                let mut hashes = Vec::new();
                let mut buf = vec![0u8; chunk as usize];
                let mut off = 0;
                while off < size {
                    let n = chunk.min(size - off);
                    // Holes need no reading: a chunk with no data hashes as zeros.
                    let allocated = img.allocated_extents_at(at, off, n)?;
                    let h = if allocated.is_empty() && n == chunk {
                        zero
                    } else {
                        img.read_at(at, off, &mut buf[..n as usize])?;
                        blake3::hash(&buf[..n as usize])
                    };
                    hashes.push(h.as_bytes().to_vec());
                    off += n;
                }
                Ok(pb::ChecksumReply {
                    size,
                    chunk_size: chunk,
                    hashes,
                })
            },
        )
        .await
    }
}
