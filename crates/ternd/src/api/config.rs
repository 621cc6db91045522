//! `Config`: site options, globally, per section and per image.

use super::{Api, Ctx, Reply, status_of};
use crate::auth::Need;
use crate::options;
use tern_proto::v1 as pb;
use tern_store::KvTable;
use tern_types::Features;
use tern_types::error::Error;
use tonic::{Request, Response, Status};

/// What changing config section `who` needs: `image:POOL/IMAGE` (rbd
/// config image) a writer of the pool, any other section an admin.
fn need_to_change(who: &str) -> Result<Need<'_>, Status> {
    let Some(spec) = who.strip_prefix("image:") else {
        return Ok(Need::Admin);
    };
    let (pool, _) = spec.split_once('/').ok_or_else(|| {
        status_of(Error::invalid(format!(
            "'{spec}' is not an image spec: use POOL/IMAGE"
        )))
    })?;
    Ok(Need::Write(pool))
}

/// The stored form of section `who`: `image:POOL/IMAGE` becomes
/// `image.<id>`, so the setting follows the image through renames.
fn stored_who(c: &Ctx, who: &str, key: &str) -> Result<String, Error> {
    let Some(spec) = who.strip_prefix("image:") else {
        return Ok(who.to_string());
    };
    let (pool, image) = spec.split_once('/').unwrap_or((spec, ""));
    if !key.is_empty() && !key.starts_with("rbd_") {
        return Err(Error::invalid(format!(
            "'{key}' is not an image option: only rbd_* options can be set per image"
        )));
    }
    let info = c.site.store.image_info(pool, image)?;
    Ok(format!("image.{}", info.id))
}

#[tonic::async_trait]
impl pb::config_server::Config for Api {
    async fn config_set(&self, req: Request<pb::ConfigSetRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |r| need_to_change(&r.who),
            |c, r| {
                let who = stored_who(c, &r.who, &r.key)?;
                options::validate_who(&who)?;
                let opt = options::find(&r.key)?;
                let v = options::check_value(opt, &r.value)?;
                if opt.name == "rbd_default_features" {
                    Features::parse_list(std::slice::from_ref(&v))?.validate()?;
                }
                c.site
                    .store
                    .kv_put(KvTable::Config, &format!("{}\0{}", who, r.key), &v)?;
                if opt.name.starts_with("rbd_journal_") {
                    c.site.apply_journal_config()?;
                }
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn config_get(&self, req: Request<pb::ConfigGetRequest>) -> Reply<pb::ConfigListReply> {
        let c = self.call(&req, Need::SiteRead)?;
        if req.get_ref().who.starts_with("image:") {
            self.call(&req, need_to_change(&req.get_ref().who)?)?;
        }
        let r = req.into_inner();
        let reply = c
            .run(move |c| {
                let who = stored_who(c, &r.who, &r.key)?;
                options::validate_who(&who)?;
                let mut entries = Vec::new();
                if r.key.is_empty() {
                    for opt in options::OPTIONS {
                        entries.push(pb::ConfigEntry {
                            who: who.clone(),
                            key: opt.name.into(),
                            value: c.site.config_value(&who, opt.name)?,
                        });
                    }
                } else {
                    let value = c.site.config_value(&who, &r.key)?;
                    entries.push(pb::ConfigEntry {
                        who,
                        key: r.key,
                        value,
                    });
                }
                Ok(pb::ConfigListReply { entries })
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn config_remove(&self, req: Request<pb::ConfigGetRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |r| need_to_change(&r.who),
            |c, r| {
                let who = stored_who(c, &r.who, &r.key)?;
                let opt = options::find(&r.key)?;
                c.site
                    .store
                    .kv_delete(KvTable::Config, &format!("{}\0{}", who, r.key))?;
                if opt.name.starts_with("rbd_journal_") {
                    if let Some(id) = who
                        .strip_prefix("image.")
                        .and_then(|i| tern_types::ImageId::parse(i).ok())
                    {
                        c.site.store.set_image_journal_options(&id, None);
                    }
                    c.site.apply_journal_config()?;
                }
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn config_dump(&self, req: Request<pb::Empty>) -> Reply<pb::ConfigListReply> {
        self.run(
            req,
            |_| Ok(Need::SiteRead),
            |c, _| {
                let list = c.site.store.kv_list(KvTable::Config, "")?;
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
                Ok(pb::ConfigListReply { entries })
            },
        )
        .await
    }
}
