//! `MirrorDaemon`: what mirror daemons and peer sites call on a site:
//! registering the reverse peer, status reports and heartbeats, adopting a
//! remote image, snapshot syncs and acks, journal replay.

use super::{Api, Reply, image};
use crate::auth::Need;
use crate::convert::{applied_pb, daemon_rec, peer_pb, peer_rec, site_status_rec, snap_pb};
use crate::mirror;
use tern_proto::convert::FromWire;
use tern_proto::v1 as pb;
use tern_store::CreateOpts;
use tern_types::error::Error;
use tern_types::{ErrorKind, Features, Layout, validate_name};
use tonic::Request;

#[tonic::async_trait]
impl pb::mirror_daemon_server::MirrorDaemon for Api {
    async fn mirror_peer_register(
        &self,
        req: Request<pb::MirrorPeerRegisterRequest>,
    ) -> Reply<pb::MirrorPeerRegisterReply> {
        self.run(
            req,
            |r| Ok(Need::MirrorPeer(&r.pool)),
            |c, r| {
                let peer = peer_rec(r.peer.ok_or_else(|| Error::invalid("no peer given"))?)?;
                let m = c.mirror();
                let stored = m.peer_upsert(&r.pool, peer)?;
                let p = m.pool_enabled(&r.pool)?;
                Ok(pb::MirrorPeerRegisterReply {
                    peer: Some(peer_pb(&stored, false)),
                    mirror_uuid: p.mirror_uuid,
                    site_name: p.site_name,
                })
            },
        )
        .await
    }

    async fn mirror_status_report(
        &self,
        req: Request<pb::MirrorStatusReportRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |r| Ok(Need::MirrorPeer(&r.pool)),
            |c, r| {
                let s = r.status.ok_or_else(|| Error::invalid("no status given"))?;
                let m = c.mirror();
                m.store_status(&r.global_id, site_status_rec(s)?)?;
                if let Some(d) = r.daemon {
                    m.heartbeat(daemon_rec(d))?;
                }
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_daemon_heartbeat(
        &self,
        req: Request<pb::MirrorDaemonInfo>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |_| Ok(Need::SiteRead),
            |c, d| {
                c.mirror().heartbeat(daemon_rec(d))?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_image_adopt(
        &self,
        req: Request<pb::MirrorImageAdoptRequest>,
    ) -> Reply<pb::MirrorImageInfo> {
        self.run(
            req,
            |r| Ok(Need::MirrorDaemon(&r.pool)),
            |c, r| {
                validate_name("image", &r.name)?;
                let layout = Layout::new(r.object_size, Some(r.stripe_unit), Some(r.stripe_count))?;
                let opts = CreateOpts {
                    size: r.size,
                    layout,
                    features: Features(r.features & 0x7f),
                };
                let m = c.mirror();
                m.adopt(
                    &r.pool,
                    &r.name,
                    &r.global_id,
                    FromWire::from_wire(r.mode)?,
                    &opts,
                    &r.primary_mirror_uuid,
                )?;
                let (img, _) = m
                    .find_by_global(&r.pool, &r.global_id)?
                    .ok_or_else(|| Error::new(ErrorKind::Internal, "adopted image vanished"))?;
                let adopted = pb::ImageRef {
                    pool: r.pool,
                    image: img.name,
                    snap: String::new(),
                };
                super::mirror::image_info(c, &adopted)
            },
        )
        .await
    }

    async fn mirror_sync_begin(
        &self,
        req: Request<pb::MirrorSyncBeginRequest>,
    ) -> Reply<pb::MirrorSyncState> {
        self.run(
            req,
            |q| Ok(Need::MirrorDaemon(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.clone().unwrap_or_default();
                let s = c.mirror().sync_begin(&r.pool, &r.image, &q)?;
                Ok(pb::MirrorSyncState {
                    primary_snap_id: s.primary_snap_id,
                    last_copied_object_number: s.last_copied_object_number,
                    resumed: s.last_copied_object_number > 0,
                    primary_mirror_uuid: s.primary_mirror_uuid,
                })
            },
        )
        .await
    }

    async fn mirror_sync_progress(
        &self,
        req: Request<pb::MirrorSyncProgressRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::MirrorDaemon(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let done = (q.snap_id, q.last_copied_object_number);
                c.mirror().sync_progress(
                    &r.pool,
                    &r.image,
                    done.0,
                    done.1,
                    false,
                    "",
                    q.expect_epoch,
                )?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_sync_complete(
        &self,
        req: Request<pb::MirrorSyncProgressRequest>,
    ) -> Reply<pb::SnapInfo> {
        self.run(
            req,
            |q| Ok(Need::MirrorDaemon(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let done = (q.snap_id, q.last_copied_object_number);
                let s = c.mirror().sync_progress(
                    &r.pool,
                    &r.image,
                    done.0,
                    done.1,
                    true,
                    &q.resync_summary,
                    q.expect_epoch,
                )?;
                Ok(snap_pb(&s))
            },
        )
        .await
    }

    async fn mirror_snapshot_ack(
        &self,
        req: Request<pb::MirrorSnapshotAckRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |r| Ok(Need::MirrorPeer(&r.pool)),
            |c, r| {
                // The caller names itself by its mirror uuid; acks are kept per peer uuid.
                let m = c.mirror();
                let p = m.pool_enabled(&r.pool)?;
                let peer = p
                    .peers
                    .iter()
                    .find(|x| x.mirror_uuid == r.peer_mirror_uuid)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "no peer with mirror uuid {} on pool '{}'",
                                r.peer_mirror_uuid, r.pool
                            ),
                        )
                    })?;
                m.ack(&r.global_id, &peer.uuid, r.primary_snap_id)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn mirror_journal_apply(
        &self,
        req: Request<pb::MirrorJournalApplyRequest>,
    ) -> Reply<pb::MirrorJournalApplyReply> {
        self.run(
            req,
            |q| Ok(Need::MirrorDaemon(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let a = c.mirror().journal_apply(
                    &r.pool,
                    &r.image,
                    &q.primary_mirror_uuid,
                    &q.entries,
                    q.persist,
                    (q.expect_epoch, q.primary_epoch),
                )?;
                Ok(applied_pb(a))
            },
        )
        .await
    }

    async fn mirror_journal_position(
        &self,
        req: Request<pb::MirrorJournalPositionRequest>,
    ) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::MirrorDaemon(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let pos = (q.tid > 0).then_some(mirror::JournalPos {
                    primary_mirror_uuid: q.primary_mirror_uuid,
                    tid: q.tid,
                    skip_to: q.skip_to,
                    timestamp_us: q.timestamp_us,
                });
                c.mirror()
                    .journal_pos_set(&r.pool, &r.image, pos, q.expect_epoch)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }
}
