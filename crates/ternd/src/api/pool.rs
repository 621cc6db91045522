//! `Pool`: pools and their statistics.

use super::{Api, Reply};
use crate::auth::Need;
use crate::convert::pool_pb;
use std::sync::atomic::Ordering;
use tern_proto::v1 as pb;
use tern_types::validate_name;
use tonic::Request;

#[tonic::async_trait]
impl pb::pool_server::Pool for Api {
    async fn pool_create(&self, req: Request<pb::PoolRequest>) -> Reply<pb::PoolInfo> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                validate_name("pool", &r.pool)?;
                let p = c.site.store.pool_create(&r.pool)?;
                tracing::info!(pool = %p.name, "pool created");
                Ok(pool_pb(p))
            },
        )
        .await
    }

    async fn pool_init(&self, req: Request<pb::PoolInitRequest>) -> Reply<pb::PoolInfo> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                let app = if r.application.is_empty() {
                    "rbd"
                } else {
                    &r.application
                };
                Ok(pool_pb(c.site.store.pool_init(&r.pool, app)?))
            },
        )
        .await
    }

    async fn pool_list(&self, req: Request<pb::Empty>) -> Reply<pb::PoolListReply> {
        self.run(
            req,
            |_| Ok(Need::SiteRead),
            |c, _| {
                let pools = c.site.store.pool_list()?;
                Ok(pb::PoolListReply {
                    pools: pools.into_iter().map(pool_pb).collect(),
                })
            },
        )
        .await
    }

    async fn pool_stats(&self, req: Request<pb::PoolRequest>) -> Reply<pb::PoolStatsReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let st = c.site.store.pool_stats(&r.pool)?;
                let n = c.counters.of(&r.pool);
                Ok(pb::PoolStatsReply {
                    images: st.images,
                    provisioned_bytes: st.provisioned_bytes,
                    used_bytes: st.used_bytes,
                    objects: st.objects,
                    read_ops: n.read_ops.load(Ordering::Relaxed),
                    write_ops: n.write_ops.load(Ordering::Relaxed),
                    read_bytes: n.read_bytes.load(Ordering::Relaxed),
                    write_bytes: n.write_bytes.load(Ordering::Relaxed),
                    pool: r.pool,
                })
            },
        )
        .await
    }

    async fn pool_remove(&self, req: Request<pb::PoolRemoveRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                c.site.store.pool_remove(&r.pool, r.force)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }
}
