//! `Mirror`: mirroring as operators see it: pool modes, peers, bootstrap
//! tokens, per-image mirroring and roles, status and snapshot schedules.

use super::{Api, Ctx, Reply, image, status_of};
use crate::auth::{Need, Profile};
use crate::convert::{mirror_info_pb, peer_pb, peer_rec, pool_mirror_pb, snap_pb};
use crate::mirror::ImageMirrorMode;
use crate::{bootstrap, mirror, schedule};
use tern_proto::convert::{FromWire, IntoWire};
use tern_proto::v1 as pb;
use tern_types::ErrorKind;
use tern_types::error::Error;
use tonic::{Request, Response, Status};

/// An image's mirroring record as the API shows it.
pub(super) fn image_info(c: &Ctx, r: &pb::ImageRef) -> Result<pb::MirrorImageInfo, Error> {
    let m = c.mirror();
    let (img, im) = m.image_of(&r.pool, &r.image)?;
    let im = im.ok_or_else(|| {
        Error::invalid(format!(
            "mirroring is not enabled on image '{}/{}'",
            r.pool, r.image
        ))
    })?;
    let snaps = m.mirror_snaps(&r.pool, &r.image)?;
    Ok(mirror_info_pb(&img, &im, &snaps))
}

#[tonic::async_trait]
impl pb::mirror_server::Mirror for Api {
    async fn mirror_pool_enable(
        &self,
        req: Request<pb::MirrorPoolEnableRequest>,
    ) -> Reply<pb::MirrorPoolInfo> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                let p =
                    c.mirror()
                        .pool_enable(&r.pool, FromWire::from_wire(r.mode)?, &r.site_name)?;
                Ok(pool_mirror_pb(&c.site.site_id, &r.pool, &p, false))
            },
        )
        .await
    }

    async fn mirror_pool_disable(&self, req: Request<pb::PoolRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                c.mirror().pool_disable(&r.pool)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_pool_get(
        &self,
        req: Request<pb::MirrorPoolInfoRequest>,
    ) -> Reply<pb::MirrorPoolInfo> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let with_keys =
                    r.with_keys && matches!(c.who.profile, Profile::Admin | Profile::RbdMirror);
                let p = c.mirror().pool(&r.pool)?.unwrap_or_default();
                Ok(pool_mirror_pb(&c.site.site_id, &r.pool, &p, with_keys))
            },
        )
        .await
    }

    async fn mirror_peer_add(
        &self,
        req: Request<pb::MirrorPeerAddRequest>,
    ) -> Reply<pb::MirrorPeer> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                let peer = r.peer.ok_or_else(|| Error::invalid("no peer given"))?;
                let rec = c.mirror().peer_upsert(&r.pool, peer_rec(peer)?)?;
                Ok(peer_pb(&rec, false))
            },
        )
        .await
    }

    async fn mirror_peer_remove(
        &self,
        req: Request<pb::MirrorPeerRemoveRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                c.mirror().peer_remove(&r.pool, &r.uuid)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_peer_set(&self, req: Request<pb::MirrorPeerSetRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                c.mirror().peer_set(&r.pool, &r.uuid, &r.key, &r.value)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_bootstrap_create(
        &self,
        req: Request<pb::MirrorBootstrapCreateRequest>,
    ) -> Reply<pb::MirrorBootstrapToken> {
        self.run(
            req,
            |_| Ok(Need::Admin),
            |c, r| {
                let token = bootstrap::create(&c.site, &r.pool, &r.site_name)?;
                Ok(pb::MirrorBootstrapToken { token })
            },
        )
        .await
    }

    async fn mirror_bootstrap_import(
        &self,
        req: Request<pb::MirrorBootstrapImportRequest>,
    ) -> Reply<pb::MirrorPeer> {
        let c = self.call(&req, Need::Admin)?;
        let peer = bootstrap::import(&c.site, req.into_inner())
            .await
            .map_err(status_of)?;
        Ok(Response::new(peer_pb(&peer, false)))
    }

    async fn mirror_image_enable(
        &self,
        req: Request<pb::MirrorImageEnableRequest>,
    ) -> Reply<pb::MirrorImageInfo> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                c.mirror()
                    .image_enable(&r.pool, &r.image, FromWire::from_wire(q.mode)?)?;
                image_info(c, &r)
            },
        )
        .await
    }

    async fn mirror_image_disable(
        &self,
        req: Request<pb::MirrorImageDisableRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                c.mirror().image_disable(&r.pool, &r.image, q.force)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_image_promote(
        &self,
        req: Request<pb::MirrorImagePromoteRequest>,
    ) -> Reply<pb::MirrorImageInfo> {
        let c = self.call(&req, Need::Write(&image(&req.get_ref().image)?.pool))?;
        let q = req.into_inner();
        let r = q.image.unwrap_or_default();
        let force = q.force;
        // A plain promotion asks every peer first: one promoted after the
        // demotion this site holds has writes this site lacks.
        let peers = if force {
            mirror::PeerView::default()
        } else {
            peer_view(&c, &r).await?
        };
        let info = c
            .run(move |c| {
                c.mirror().promote(&r.pool, &r.image, force, &peers)?;
                tracing::warn!(image = %format!("{}/{}", r.pool, r.image), force, "image promoted to primary");
                image_info(c, &r)
            })
            .await?;
        Ok(Response::new(info))
    }

    async fn mirror_image_demote(&self, req: Request<pb::ImageRef>) -> Reply<pb::MirrorImageInfo> {
        self.run(req, |r| Ok(Need::Write(&r.pool)), |c, r| {
            c.mirror().demote(&r.pool, &r.image)?;
            tracing::warn!(image = %format!("{}/{}", r.pool, r.image), "image demoted to non-primary");
            image_info(c, &r)
        })
        .await
    }

    async fn mirror_image_resync(
        &self,
        req: Request<pb::MirrorImageResyncRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(q.image.as_ref().map_or("", |r| &r.pool))),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let m = c.mirror();
                let (info, _) = m.image_of(&r.pool, &r.image)?;
                m.update_image(&info.id.to_string(), |im| {
                    if im.primary {
                        return Err(Error::invalid(format!(
                            "'{}/{}' is primary: resync runs on a demoted (non-primary) image",
                            r.pool, r.image
                        )));
                    }
                    im.resync_requested = true;
                    im.resync_full |= q.full;
                    Ok(())
                })?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_image_snapshot(&self, req: Request<pb::ImageRef>) -> Reply<pb::SnapInfo> {
        // A peer's journal replayer takes sync-point snapshots here (as
        // rbd-mirror does); it cannot write image data. That is all a peer
        // key needs: on snapshot-mode images only writers (the schedule,
        // an operator) take them. Either way the cap bounds how many exist.
        let pool = req.get_ref().pool.clone();
        let c = match self.call(&req, Need::Write(&pool)) {
            Ok(c) => c,
            Err(_) => self.call(&req, Need::MirrorPeer(&pool))?,
        };
        let r = req.into_inner();
        let s = c
            .run(move |c| {
                let m = c.mirror();
                if !c.who.allows(Need::Write(&r.pool)) {
                    let (_, im) = m.image_of(&r.pool, &r.image)?;
                    if im.is_some_and(|im| im.mode != ImageMirrorMode::Journal) {
                        return Err(Error::new(
                            ErrorKind::PermissionDenied,
                            format!(
                                "a mirror peer may take sync-point snapshots of journal-mode images only; '{}/{}' is in snapshot mode: its snapshots come from its schedule or an operator",
                                r.pool, r.image
                            ),
                        ));
                    }
                }
                m.store_flush(&r.pool, &r.image)?;
                m.primary_snapshot(&r.pool, &r.image, tern_store::MirrorSnapState::Primary)
            })
            .await?;
        Ok(Response::new(snap_pb(&s)))
    }

    async fn mirror_image_get(&self, req: Request<pb::ImageRef>) -> Reply<pb::MirrorImageInfo> {
        self.run(req, |r| Ok(Need::Read(&r.pool)), |c, r| image_info(c, &r))
            .await
    }

    async fn mirror_image_list(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Reply<pb::MirrorImageListReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let m = c.mirror();
                let p = m.pool(&r.pool)?.unwrap_or_default();
                let mut images = Vec::new();
                for img in c.site.store.image_list(&r.pool)? {
                    if let Some(im) = m.image(&img.id.to_string())? {
                        let snaps = m.mirror_snaps(&r.pool, &img.name)?;
                        images.push(mirror_info_pb(&img, &im, &snaps));
                    }
                }
                Ok(pb::MirrorImageListReply {
                    images,
                    mirror_uuid: p.mirror_uuid,
                    site_name: p.site_name,
                })
            },
        )
        .await
    }

    async fn mirror_image_status_get(
        &self,
        req: Request<pb::ImageRef>,
    ) -> Reply<pb::MirrorImageStatus> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| crate::status::image(&c.mirror(), &r.pool, &r.image).map(IntoWire::into_wire),
        )
        .await
    }

    async fn mirror_pool_status(
        &self,
        req: Request<pb::MirrorPoolStatusRequest>,
    ) -> Reply<pb::MirrorPoolStatusReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| crate::status::pool(&c.mirror(), &r.pool).map(IntoWire::into_wire),
        )
        .await
    }

    async fn mirror_schedule_add(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |r| Ok(Need::Write(&r.pool)),
            |c, r| {
                let s = schedule::Schedule::parse(&r.interval, &r.start_time)?;
                c.mirror().schedule_add(&r.pool, &r.image, s)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_schedule_remove(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |r| Ok(Need::Write(&r.pool)),
            |c, r| {
                // No interval: every schedule at this level.
                let s = if r.interval.is_empty() {
                    None
                } else {
                    Some(schedule::Schedule::parse(&r.interval, &r.start_time)?)
                };
                c.mirror().schedule_rm(&r.pool, &r.image, s)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_schedule_list(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> Reply<pb::MirrorScheduleListReply> {
        self.run(
            req,
            |_| Ok(Need::SiteRead),
            |c, r| {
                let mut schedules = Vec::new();
                for (p, i, ss) in c.mirror().all_schedules()? {
                    let level_match = if r.recursive {
                        (r.pool.is_empty() || p == r.pool) && (r.image.is_empty() || i == r.image)
                    } else {
                        p == r.pool && i == r.image
                    };
                    if level_match {
                        for s in ss {
                            schedules.push(pb::MirrorScheduleEntry {
                                pool: p.clone(),
                                image: i.clone(),
                                interval: schedule::fmt_interval(s.interval),
                                start_time: s.start.map(schedule::fmt_start).unwrap_or_default(),
                            });
                        }
                    }
                }
                Ok(pb::MirrorScheduleListReply { schedules })
            },
        )
        .await
    }

    async fn mirror_schedule_status(
        &self,
        req: Request<pb::MirrorScheduleRequest>,
    ) -> Reply<pb::MirrorScheduleStatusReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let v = schedule::status(&c.mirror(), &r.pool, &r.image, crate::site::now_secs())?;
                Ok(pb::MirrorScheduleStatusReply {
                    scheduled: v
                        .into_iter()
                        .map(|(image, time)| pb::MirrorScheduleNext { image, time })
                        .collect(),
                })
            },
        )
        .await
    }
}

/// Asks every peer of the pool what its copy of an image is now (its
/// role and promotion epoch), for a plain promotion here. Peers are
/// asked at once, each for at most a few seconds.
async fn peer_view(c: &Ctx, r: &pb::ImageRef) -> Result<mirror::PeerView, Status> {
    let (p, n) = (r.pool.clone(), r.image.clone());
    let (global_id, peers) = c
        .run(move |c| {
            let m = c.mirror();
            let (_, im) = m.image_of(&p, &n)?;
            let im = im.ok_or_else(|| {
                Error::invalid(format!("mirroring is not enabled on image '{p}/{n}'"))
            })?;
            Ok((im.global_id, m.pool_enabled(&p)?.peers))
        })
        .await?;
    let asks: Vec<_> = peers
        .into_iter()
        .filter(|p| !p.key.is_empty())
        .map(|peer| {
            let (gid, name) = (global_id.clone(), r.image.clone());
            tokio::spawn(async move {
                let ask = ask_peer(&peer, name, gid);
                let r = tokio::time::timeout(std::time::Duration::from_secs(5), ask).await;
                (peer.site_name, r)
            })
        })
        .collect();
    let mut view = mirror::PeerView::default();
    for a in asks {
        let Ok((site, r)) = a.await else { continue };
        match r {
            Ok(Ok(Some(i))) => {
                if i.primary {
                    view.primary_at.push(site.clone());
                }
                if i.epoch > view.max_epoch {
                    view.max_epoch = i.epoch;
                    view.max_epoch_site = site;
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => view.unreachable.push((site, e.message)),
            Err(_) => view
                .unreachable
                .push((site, "no answer within 5 seconds".into())),
        }
    }
    Ok(view)
}

/// One peer's copy of the image with global id `gid`, if it has one.
async fn ask_peer(
    peer: &mirror::PeerRec,
    name: String,
    gid: String,
) -> Result<Option<tern_types::api::MirrorImageInfo>, tern_client::ClientError> {
    let ep = peer
        .mon_host
        .first()
        .ok_or_else(|| tern_client::ClientError::new(ErrorKind::InvalidArgument, "no endpoint"))?;
    let tls = tern_client::config::TlsMode::Pinned(peer.tls_fingerprint.clone());
    let c = tern_client::SiteClient::connect_with(ep, &tls, &peer.client_name, &peer.key)?;
    let by_name = c
        .mirror()
        .image_info(&tern_types::ImageSpec::new(&peer.remote_pool, &name))
        .await;
    match by_name {
        Ok(i) if i.global_id == gid => return Ok(Some(i)),
        Ok(_) => {}
        Err(e) if matches!(e.kind, ErrorKind::NotFound | ErrorKind::InvalidArgument) => {}
        Err(e) => return Err(e),
    }
    // Renamed there, or not mirrored under this name.
    let list = c.mirror().image_list(&peer.remote_pool).await?;
    Ok(list.images.into_iter().find(|i| i.global_id == gid))
}
