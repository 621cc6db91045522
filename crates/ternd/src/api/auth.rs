//! `Auth`: entities, their keys and caps.

use super::{Api, Reply};
use crate::auth::Need;
use crate::convert::entity_pb;
use std::collections::BTreeMap;
use tern_proto::v1 as pb;
use tonic::Request;

#[tonic::async_trait]
impl pb::auth_server::Auth for Api {
    async fn auth_get_or_create(
        &self,
        req: Request<pb::AuthGetOrCreateRequest>,
    ) -> Reply<pb::AuthEntity> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                let caps: BTreeMap<String, String> = r.caps.into_iter().collect();
                let (rec, created) = c.site.get_or_create_user(&r.entity, &caps)?;
                Ok(entity_pb(&c.site, &rec, created))
            },
        )
        .await
    }

    async fn auth_get(&self, req: Request<pb::AuthName>) -> Reply<pb::AuthEntity> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                let rec = c.site.get_user(&r.entity)?;
                Ok(entity_pb(&c.site, &rec, false))
            },
        )
        .await
    }

    async fn auth_list(&self, req: Request<pb::Empty>) -> Reply<pb::AuthListReply> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, _| {
                let users = c.site.list_users();
                Ok(pb::AuthListReply {
                    entities: users.iter().map(|r| entity_pb(&c.site, r, false)).collect(),
                })
            },
        )
        .await
    }

    async fn auth_remove(&self, req: Request<pb::AuthName>) -> Reply<pb::Empty> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                c.site.remove_user(&r.entity, &c.who.entity)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn auth_caps(&self, req: Request<pb::AuthGetOrCreateRequest>) -> Reply<pb::AuthEntity> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                let caps: BTreeMap<String, String> = r.caps.into_iter().collect();
                let rec = c.site.set_user_caps(&r.entity, &caps, &c.who.entity)?;
                Ok(entity_pb(&c.site, &rec, false))
            },
        )
        .await
    }
}
