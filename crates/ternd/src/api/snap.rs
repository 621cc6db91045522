//! `Snap`: user snapshots, and diffs between two points of an image.

use super::{Api, Reply, image};
use crate::auth::Need;
use crate::convert::snap_pb;
use tern_proto::v1 as pb;
use tern_store::SnapNamespace;
use tern_types::error::Error;
use tern_types::validate_name;
use tonic::Request;

#[tonic::async_trait]
impl pb::snap_server::Snap for Api {
    async fn snap_create(&self, req: Request<pb::SnapRequest>) -> Reply<pb::SnapInfo> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                validate_name("snapshot", &q.snap)?;
                let info =
                    c.site
                        .store
                        .snap_create(&r.pool, &r.image, &q.snap, SnapNamespace::User)?;
                Ok(snap_pb(&info))
            },
        )
        .await
    }

    async fn snap_list(&self, req: Request<pb::SnapListRequest>) -> Reply<pb::SnapListReply> {
        self.run(
            req,
            |q| Ok(Need::Read(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let snaps = c.site.store.snap_list(&r.pool, &r.image)?;
                let snaps = snaps
                    .iter()
                    .filter(|s| {
                        q.all
                            || (matches!(s.namespace, SnapNamespace::User)
                                && !s.name.starts_with('.'))
                    })
                    .map(snap_pb)
                    .collect();
                Ok(pb::SnapListReply { snaps })
            },
        )
        .await
    }

    async fn snap_remove(&self, req: Request<pb::SnapRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                c.site
                    .store
                    .snap_remove(&r.pool, &r.image, &q.snap, false)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn snap_rename(&self, req: Request<pb::SnapRenameRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                validate_name("snapshot", &q.new_name)?;
                c.site
                    .store
                    .snap_rename(&r.pool, &r.image, &q.snap, &q.new_name)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn snap_rollback(&self, req: Request<pb::SnapRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                // A rollback rewrites the image: it must not race a lock holder.
                let head = pb::ImageRef {
                    snap: String::new(),
                    ..r.clone()
                };
                c.open_for_write(&head, "")?;
                c.site.store.snap_rollback(&r.pool, &r.image, &q.snap)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn snap_protect(&self, req: Request<pb::SnapProtectRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                c.site
                    .store
                    .snap_set_protected(&r.pool, &r.image, &q.snap, q.protect)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn snap_purge(&self, req: Request<pb::ImageRef>) -> Reply<pb::SnapPurgeReply> {
        self.run(
            req,
            |r| Ok(Need::Write(&r.pool)),
            |c, r| {
                let removed = c.site.store.snap_purge(&r.pool, &r.image)?;
                Ok(pb::SnapPurgeReply { removed })
            },
        )
        .await
    }

    async fn diff(&self, req: Request<pb::DiffRequest>) -> Reply<pb::DiffReply> {
        self.run(req, |q| Ok(Need::Read(&image(&q.image)?.pool)), |c, q| {
            let r = q.image.unwrap_or_default();
            let (img, to) = c.open_at(&r)?;
            let from = if q.from_snap.is_empty() {
                None
            } else {
                Some(c.site.store.snap_get(&r.pool, &r.image, &q.from_snap)?)
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
            let len = if q.length == 0 {
                size.saturating_sub(q.offset)
            } else {
                q.length
            };
            let extents = img
                .diff(from.map(|f| f.id), to.map(|t| t.id), q.offset, len, q.whole_object)?
                .into_iter()
                .map(|e| pb::DiffExtent {
                    offset: e.offset,
                    length: e.length,
                    data: e.data,
                })
                .collect();
            Ok(pb::DiffReply {
                extents,
                size,
                granularity: img.diff_granularity(),
            })
        })
        .await
    }
}
