//! `Site`: who the site is, and how it is.

use super::{Api, Reply};
use crate::auth::Need;
use tern_proto::convert::IntoWire;
use tern_proto::v1 as pb;
use tern_types::API_VERSION;
use tonic::Request;

#[tonic::async_trait]
impl pb::site_server::Site for Api {
    async fn hello(&self, req: Request<pb::HelloRequest>) -> Reply<pb::HelloReply> {
        self.run(
            req,
            |_| Ok(Need::SiteRead),
            |c, _| {
                Ok(pb::HelloReply {
                    api_version: API_VERSION,
                    site_id: c.site.site_id.clone(),
                    site_name: c.site.site_name.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    entity: c.who.entity.clone(),
                    profile: c.who.profile.into_wire(),
                })
            },
        )
        .await
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Reply<pb::StatusReply> {
        self.run(
            req,
            |_| Ok(Need::SiteRead),
            |c, _| crate::status::site(&c.site).map(IntoWire::into_wire),
        )
        .await
    }
}
