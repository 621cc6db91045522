//! `Lock`: exclusive locks on images (held in memory, see crate::locks).

use super::{Api, Reply, image};
use crate::auth::Need;
use crate::convert::lock_pb;
use tern_proto::v1 as pb;
use tern_types::Features;
use tern_types::error::Error;
use tonic::Request;

#[tonic::async_trait]
impl pb::lock_server::Lock for Api {
    async fn lock_acquire(&self, req: Request<pb::LockRequest>) -> Reply<pb::LockInfo> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                if q.cookie.is_empty() {
                    return Err(Error::invalid("a lock needs a cookie"));
                }
                let info = c.open(&r)?.info();
                if !info.features.has(Features::EXCLUSIVE_LOCK) {
                    return Err(Error::invalid(format!(
                        "{}/{} does not have the exclusive-lock feature",
                        r.pool, r.image
                    )));
                }
                let lease = c.lease();
                let spec = format!("{}/{}", r.pool, r.image);
                let claim = crate::locks::Claim {
                    cookie: &q.cookie,
                    entity: &c.who.entity,
                    address: &q.address,
                };
                let l = c
                    .locks
                    .acquire(&c.site.store, info.id.as_str(), &spec, claim, lease)?;
                Ok(lock_pb(&l, lease))
            },
        )
        .await
    }

    async fn lock_release(&self, req: Request<pb::LockRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let img = c.open(&q.image.unwrap_or_default())?;
                c.locks.release(img.info().id.as_str(), &q.cookie);
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn lock_list(&self, req: Request<pb::ImageRef>) -> Reply<pb::LockListReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let img = c.open(&r)?;
                let lease = c.lease();
                let locks = c
                    .locks
                    .list(img.info().id.as_str())
                    .iter()
                    .map(|l| lock_pb(l, lease))
                    .collect();
                Ok(pb::LockListReply { locks })
            },
        )
        .await
    }

    async fn lock_break(&self, req: Request<pb::LockBreakRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let img = c.open(&r)?;
                let spec = format!("{}/{}", r.pool, r.image);
                c.locks.break_lock(
                    &c.site.store,
                    img.info().id.as_str(),
                    &spec,
                    &q.id,
                    &q.locker,
                )?;
                Ok(pb::Empty {})
            },
        )
        .await
    }
}
