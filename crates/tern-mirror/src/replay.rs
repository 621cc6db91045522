//! One image's snapshot replay: bring the local non-primary copy to the
//! primary's newest complete mirror snapshot by copying only the extents
//! that changed since the newest snapshot both sites share.

use crate::{DaemonState, Reported};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;
use tern_client::{ClientError, SiteClient};
use tern_types::ImageSpec;
use tern_types::api::{
    DataChunk, DiffExtent, DiffRequest, ImageAdopt, MirrorImageInfo, MirrorPeer, MirrorSiteStatus,
    ReadStream, SnapInfo, SnapshotAck, SyncBegin, SyncProgress, WriteMessage, WriteOpen, Written,
};
use tern_types::mirror::{
    ImageMirrorMode, MirrorSnapState, MirrorStatusState as State, SnapNamespaceType,
    StatusReason as Reason,
};

pub(crate) struct ImageReplay {
    pub pool: String,
    pub local_mirror_uuid: String,
    pub site_name: String,
    pub peer: MirrorPeer,
    pub remote: SiteClient,
    pub remote_mirror_uuid: String,
    pub remote_image: MirrorImageInfo,
    pub local_image: Option<MirrorImageInfo>,
    pub report_to: Vec<(SiteClient, String)>,
}

impl ImageReplay {
    pub(crate) fn status(&self, state: State, reason: Reason, description: String) -> Reported {
        Reported {
            pool: self.pool.clone(),
            global_id: self.remote_image.global_id.clone(),
            image: self.remote_image.name.clone(),
            source: self.peer.site_name.clone(),
            status: MirrorSiteStatus {
                site_name: self.site_name.clone(),
                mirror_uuids: self.local_mirror_uuid.clone(),
                state,
                description,
                reason,
                up: true,
                ..Default::default()
            },
            peers: self.report_to.clone(),
        }
    }

    pub(crate) fn spec(&self) -> String {
        format!("{}/{}", self.pool, self.remote_image.name)
    }
}

pub(crate) async fn run(sh: &Arc<DaemonState>, job: ImageReplay) {
    if let Err(e) = replay(sh, &job).await {
        // Promoted here meanwhile (the site fenced a step begun before):
        // the image is no longer ours to write. Stop; the next pass reports
        // its new role.
        let local_ref = ImageSpec::new(&job.pool, &job.remote_image.name);
        let promoted = match sh.local.mirror().image_info(&local_ref).await {
            Ok(now) => {
                now.primary
                    || job
                        .local_image
                        .as_ref()
                        .is_some_and(|l| l.epoch != now.epoch)
            }
            Err(_) => false,
        };
        if promoted || e.kind == tern_types::ErrorKind::Fenced && e.message.contains("changed role")
        {
            tracing::info!(image = %job.spec(), reason = %e, "stopped: the image changed role here");
            return;
        }
        tracing::warn!(image = %job.spec(), error = %e.chain(), "replay failed");
        let r = job.status(State::Error, Reason::Error, format!("error: {}", e.message));
        sh.report(r).await;
    }
}

async fn replay(sh: &Arc<DaemonState>, job: &ImageReplay) -> Result<(), ClientError> {
    let rimg = &job.remote_image;
    // The local copy: adopt the image the first time.
    let local = match &job.local_image {
        Some(l) => l.clone(),
        None => {
            sh.report(job.status(
                State::StartingReplay,
                Reason::Starting,
                "starting replay: creating the local copy".into(),
            ))
            .await;
            tracing::info!(image = %job.spec(), from = %job.peer.site_name, "creating the local non-primary image");
            sh.local
                .mirror_daemon()
                .adopt(ImageAdopt {
                    pool: job.pool.clone(),
                    name: rimg.name.clone(),
                    global_id: rimg.global_id.clone(),
                    mode: rimg.mode,
                    size: rimg.size,
                    object_size: rimg.object_size,
                    stripe_unit: rimg.stripe_unit,
                    stripe_count: rimg.stripe_count,
                    features: rimg.features,
                    primary_mirror_uuid: job.remote_mirror_uuid.clone(),
                })
                .await?
        }
    };
    if local.primary && !rimg.primary {
        // We are the primary; the peer is our demoted former primary and pulls from us.
        return Ok(());
    }
    if local.primary {
        let r = job.status(
            State::Error,
            Reason::SplitBrain,
            format!(
                "split-brain: the image is primary both here and at {}. Neither side was overwritten. \
                 Demote the side whose writes you give up, then `tern mirror image resync` it",
                job.peer.site_name
            ),
        );
        sh.report(r).await;
        return Ok(());
    }
    let plan = match assess(sh, job, &local).await? {
        Standing::Follows(plan) => plan,
        Standing::Diverged(why) => {
            let spec = job.spec();
            tracing::warn!(image = %spec, peer = %job.peer.site_name, "split-brain: {why}");
            let r = job.status(
                State::Error,
                Reason::SplitBrain,
                format!(
                    "split-brain: {why}. Nothing was overwritten. To keep {peer}'s data, run `tern mirror image resync {spec}` here: only what diverged is copied",
                    peer = job.peer.site_name
                ),
            );
            sh.report(r).await;
            return Ok(());
        }
    };
    if rimg.mode == ImageMirrorMode::Journal {
        return crate::journal::run(sh, job, local, plan).await;
    }
    snapshot_pass(sh, job, &local, &plan).await
}

/// One pass of snapshot replay: bring the copy to the primary's newest
/// complete mirror snapshot (a demoted primary's newest is its demotion).
pub(crate) async fn snapshot_pass(
    sh: &Arc<DaemonState>,
    job: &ImageReplay,
    local: &MirrorImageInfo,
    plan: &Plan,
) -> Result<(), ClientError> {
    let rimg = &job.remote_image;
    let Some(target) = rimg
        .mirror_snaps
        .iter()
        .filter(|s| {
            s.namespace == SnapNamespaceType::Mirror
                && s.is_complete_mirror(MirrorSnapState::is_primary)
        })
        .max_by_key(|s| s.id)
    else {
        sh.report(job.status(
            State::StartingReplay,
            Reason::Starting,
            "waiting for the primary's first mirror snapshot".into(),
        ))
        .await;
        return Ok(());
    };
    // The newest point both sites hold with the same content.
    let local_synced = local
        .mirror_snaps
        .iter()
        .filter(|s| {
            s.is_complete_mirror(|m| !m.is_primary())
                && s.primary_mirror_uuid == job.remote_mirror_uuid
        })
        .max_by_key(|s| s.id);
    if local_synced.is_some_and(|s| s.primary_snap_id == target.id) && plan.resync.is_none() {
        report_idle(sh, job, local, target).await;
        return Ok(());
    }
    let (sent, secs) = sync_to(sh, job, local, rimg, target, plan).await?;
    let local_ref = ImageSpec::new(&job.pool, &local.name);
    let local_now = sh.local.mirror().image_info(&local_ref).await?;
    let mut r = job.status(
        State::Replaying,
        Reason::Replaying,
        replaying_description(&local_now, target, sent, secs),
    );
    r.status.bytes_synced = sent;
    r.status.last_sync = crate::now();
    sh.report(r).await;
    Ok(())
}

/// Copies the primary's snapshot `target` into the local non-primary image:
/// only the extents changed since the newest snapshot both sites hold (all
/// of it the first time), resumable per object. Returns bytes sent and
/// seconds taken. Every step carries `local.epoch`: once the image is
/// promoted here, the site refuses the rest.
pub(crate) async fn sync_to(
    sh: &Arc<DaemonState>,
    job: &ImageReplay,
    local: &MirrorImageInfo,
    rimg: &MirrorImageInfo,
    target: &SnapInfo,
    plan: &Plan,
) -> Result<(u64, f64), ClientError> {
    let base = plan.base.clone();
    let fence = Some(local.epoch);
    let _permit = sh.syncs.acquire().await.expect("semaphore");
    let local_ref = ImageSpec::new(&job.pool, &local.name);
    let state = sh
        .local
        .mirror_daemon()
        .sync_begin(SyncBegin {
            image: local_ref.clone(),
            snap_name: target.name.clone(),
            primary_mirror_uuid: job.remote_mirror_uuid.clone(),
            primary_snap_id: target.id,
            size: target.size,
            demoted: target.mirror_state == Some(MirrorSnapState::PrimaryDemoted),
            expect_epoch: fence,
            primary_epoch: rimg.epoch,
        })
        .await?;
    let unit = rimg.object_size.max(4096);
    let resume_from = state.last_copied_object_number * unit;
    let full = base.is_none();
    tracing::info!(
        image = %job.spec(), target = target.id, base = ?base, resume_from, full,
        extra = plan.extra.len(), resync = ?plan.resync,
        "syncing from {}", job.peer.site_name
    );
    let started = Instant::now();
    let mut stream = job
        .remote
        .io()
        .read_stream(ReadStream {
            image: ImageSpec {
                snap: Some(target.name.clone()),
                ..ImageSpec::new(&job.peer.remote_pool, &rimg.name)
            },
            diff: true,
            diff_from: base.clone().unwrap_or_default(),
            extra: plan.extra.clone(),
            ..Default::default()
        })
        .await?;
    let peer_limit = sh.peer_limiter(&job.peer.uuid).await;
    let mut writer: Option<Writer> = None;
    let (mut sent, mut since_ckpt) = (0u64, 0u64);
    let mut pos;
    let mut last_report = Instant::now();
    while let Some(ch) = stream.next().await.transpose()? {
        let end = ch.offset + ch.length;
        if end <= resume_from {
            continue;
        }
        if writer.is_none() {
            writer = Some(Writer::open(&sh.local, local_ref.clone(), fence).await?);
        }
        let w = writer.as_mut().expect("writer");
        if !ch.zero {
            let n = ch.data.len() as u64;
            sh.limit.take(n).await;
            peer_limit.take(n).await;
            sent += ch.data.len() as u64;
            since_ckpt += ch.data.len() as u64;
            sh.count_replicated(&job.pool, &rimg.name, &job.peer.site_name, n, 0);
        }
        w.send(ch).await?;
        crate::hold("sync-chunk").await;
        pos = end;
        // A checkpoint per object's worth of data: an interrupted sync redoes at most one object.
        if since_ckpt >= unit {
            writer.take().expect("writer").commit().await?;
            since_ckpt = 0;
            sh.local
                .mirror_daemon()
                .sync_progress(SyncProgress {
                    image: local_ref.clone(),
                    snap_id: target.id,
                    last_copied_object_number: pos / unit,
                    resync_summary: String::new(),
                    expect_epoch: fence,
                })
                .await?;
        }
        if last_report.elapsed().as_millis() >= 500 {
            last_report = Instant::now();
            let pct = if target.size > 0 {
                pos as f64 / target.size as f64
            } else {
                0.0
            };
            let what = match &plan.resync {
                Some(kind) => format!("resyncing from {} by {kind}", job.peer.site_name),
                None => "syncing".into(),
            };
            let mut r = job.status(
                State::Syncing,
                Reason::Syncing,
                format!("{what}, {:.0}% ({} bytes copied)", pct * 100.0, sent),
            );
            r.status.progress = pct;
            r.status.bytes_synced = sent;
            sh.report(r).await;
        }
    }
    if let Some(w) = writer {
        w.commit().await?;
    }
    let resync_summary = plan.resync.as_ref().map_or(String::new(), |kind| {
        format!(
            "{kind} from {}: {sent} bytes copied ({:.2}% of the image)",
            job.peer.site_name,
            if target.size > 0 {
                sent as f64 * 100.0 / target.size as f64
            } else {
                0.0
            }
        )
    });
    if !resync_summary.is_empty() {
        tracing::warn!(image = %job.spec(), "resync done: {resync_summary}");
    }
    sh.local
        .mirror_daemon()
        .sync_complete(SyncProgress {
            image: local_ref.clone(),
            snap_id: target.id,
            last_copied_object_number: target.size.div_ceil(unit),
            resync_summary,
            expect_epoch: fence,
        })
        .await?;
    // Tell the primary we hold this snapshot, so it may prune older ones but never this base.
    let _ = job
        .remote
        .mirror_daemon()
        .snapshot_ack(SnapshotAck {
            pool: job.peer.remote_pool.clone(),
            global_id: rimg.global_id.clone(),
            peer_mirror_uuid: job.local_mirror_uuid.clone(),
            primary_snap_id: target.id,
        })
        .await;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(image = %job.spec(), target = target.id, bytes = sent, secs, "synced");
    Ok((sent, secs))
}

/// What a sync into the local copy must do.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    /// The primary's snapshot the delta starts from (None: all of it).
    pub base: Option<String>,
    /// Local ranges to bring back to the primary's content as well: what
    /// this copy holds beyond the common point.
    pub extra: Vec<DiffExtent>,
    /// A requested resync: "delta …" or "full copy …", for status.
    pub resync: Option<String>,
}

pub(crate) enum Standing {
    /// The local copy holds a point of the primary's history.
    Follows(Plan),
    /// It does not, and no resync was asked for: why, in words.
    Diverged(String),
}

/// A complete mirror snapshot's identity across sites: the site (mirror
/// uuid) and snapshot id where its content was taken. A copy's content is
/// its origin's.
fn origin(s: &SnapInfo, site_uuid: &str) -> Option<(String, u64)> {
    if s.namespace != SnapNamespaceType::Mirror || !s.mirror_complete {
        return None;
    }
    Some(if s.mirror_state.is_some_and(MirrorSnapState::is_primary) {
        (site_uuid.to_string(), s.id)
    } else {
        (s.primary_mirror_uuid.clone(), s.primary_snap_id)
    })
}

/// The newest snapshot both sites hold with the same content: (local
/// snapshot, the primary's snapshot name).
fn common_point<'a>(
    local: &'a MirrorImageInfo,
    rimg: &MirrorImageInfo,
    local_uuid: &str,
    remote_uuid: &str,
) -> Option<(&'a SnapInfo, String)> {
    let remote: std::collections::HashMap<(String, u64), &SnapInfo> = rimg
        .mirror_snaps
        .iter()
        .filter_map(|s| origin(s, remote_uuid).map(|o| (o, s)))
        .collect();
    local
        .mirror_snaps
        .iter()
        .filter_map(|s| origin(s, local_uuid).map(|o| (o, s)))
        .filter_map(|(o, s)| remote.get(&o).map(|r| (s, r.name.clone())))
        .max_by_key(|(s, _)| s.id)
}

/// Ranges of the local image changed since `from` (a snapshot; None: since
/// it was created).
async fn local_changes(
    sh: &DaemonState,
    job: &ImageReplay,
    local: &MirrorImageInfo,
    from: Option<&str>,
) -> Result<Vec<DiffExtent>, ClientError> {
    let d = sh
        .local
        .snap()
        .diff(DiffRequest {
            image: ImageSpec::new(&job.pool, &local.name),
            from_snap: from.unwrap_or_default().to_string(),
            ..Default::default()
        })
        .await?;
    Ok(d.extents)
}

/// Decides whether the local copy may follow the remote primary, and how:
/// a delta from the newest common point, plus whatever the local copy
/// holds beyond that point (after a change of primary), or a resync when
/// its history left the primary's and the operator asked for one.
pub(crate) async fn assess(
    sh: &DaemonState,
    job: &ImageReplay,
    local: &MirrorImageInfo,
) -> Result<Standing, ClientError> {
    let (lu, ru) = (&job.local_mirror_uuid, &job.remote_mirror_uuid);
    let rimg = &job.remote_image;
    if local.resync_requested && local.resync_full {
        // Asked for everything: no point is trusted. Every extent the
        // primary holds, and every one held here (the primary sends what it
        // has there: data or zeros).
        return Ok(Standing::Follows(Plan {
            base: None,
            extra: local_changes(sh, job, local, None).await?,
            resync: Some("full copy (requested with --full)".into()),
        }));
    }
    let common = common_point(local, rimg, lu, ru);
    let newest = local
        .mirror_snaps
        .iter()
        .filter(|s| origin(s, lu).is_some())
        .max_by_key(|s| s.id);
    let holds_newest = match (newest, &common) {
        (None, _) => true,
        (Some(n), Some((c, _))) => n.id == c.id,
        (Some(_), None) => false,
    };
    let peer = &job.peer.site_name;
    // Journal replay may have taken this copy past its newest snapshot.
    let journal_src = (!local.journal_primary_uuid.is_empty() && local.journal_tid > 0)
        .then_some((&local.journal_primary_uuid, local.journal_tid));
    let switching = local.primary_mirror_uuid != *ru;
    // A copy that only ever received from this primary is a prefix of it
    // by construction; the question arises when the primary changed.
    let diverged: Option<String> = match journal_src {
        _ if !switching => None,
        Some((src, _)) if src == ru => None,
        Some((src, tid)) if rimg.fork_mirror_uuid == *src && rimg.fork_journal_tid >= tid => None,
        Some((_, tid)) => {
            let beyond = match newest {
                Some(n) => !local_changes(sh, job, local, Some(&n.name))
                    .await?
                    .is_empty(),
                None => true,
            };
            (beyond || !holds_newest).then(|| {
                format!(
                    "this copy replayed its former primary's journal up to entry {tid}, which {peer} does not hold (it was promoted {})",
                    if rimg.fork_journal_tid > 0 {
                        format!("at entry {}", rimg.fork_journal_tid)
                    } else {
                        "from an earlier point".into()
                    }
                )
            })
        }
        None if holds_newest => None,
        None => Some(match newest {
            Some(n) if n.mirror_state.is_some_and(MirrorSnapState::is_primary) => format!(
                "this image was primary here until it was demoted, and {peer} was promoted without its last writes (a forced promotion): this site's writes after {} are not on {peer}",
                common
                    .as_ref()
                    .map_or("the first sync".to_string(), |(c, _)| format!(
                        "snapshot {}",
                        c.id
                    ))
            ),
            _ => format!(
                "this copy holds a newer state of its former primary than {peer} does ({peer} was promoted from an older point)"
            ),
        }),
    };
    match diverged {
        None => {
            let mut plan = Plan {
                base: common.as_ref().map(|(_, r)| r.clone()),
                ..Plan::default()
            };
            // A new primary: what this copy holds beyond the common point
            // (an unfinished copy, replayed entries) goes back too. So does
            // everything it holds when no common point is left (the
            // primary pruned this copy's base under its snapshot cap): a
            // full copy alone would leave what the primary has since
            // discarded.
            if switching || local.resync_requested || common.is_none() {
                plan.extra = local_changes(
                    sh,
                    job,
                    local,
                    common.as_ref().map(|(c, _)| c.name.as_str()),
                )
                .await?;
            }
            if local.resync_requested {
                plan.resync = Some(match &common {
                    Some((c, _)) => format!("delta from snapshot {} (no divergence found)", c.id),
                    None => "full copy (no common point)".into(),
                });
            }
            Ok(Standing::Follows(plan))
        }
        Some(why) if !local.resync_requested => Ok(Standing::Diverged(why)),
        Some(_) => {
            // The primary was promoted from this site's journal: the
            // entries after that point are exactly what diverged here.
            if rimg.fork_mirror_uuid == *lu
                && rimg.fork_journal_tid > 0
                && let Some(fork_snap) =
                    rimg.mirror_snaps.iter().find(|s| s.id == rimg.fork_snap_id)
            {
                match sh
                    .local
                    .journal()
                    .extents(
                        &ImageSpec::new(&job.pool, &local.name),
                        rimg.fork_journal_tid,
                    )
                    .await
                {
                    Ok(d) => {
                        let mine: u64 = d.extents.iter().map(|e| e.length).sum();
                        return Ok(Standing::Follows(Plan {
                            base: Some(fork_snap.name.clone()),
                            extra: d.extents,
                            resync: Some(format!(
                                "delta from {peer}'s promotion point (entry {} of this site's journal; {mine} bytes written here after it)",
                                rimg.fork_journal_tid
                            )),
                        }));
                    }
                    Err(e) => {
                        tracing::info!(image = %job.spec(), error = %e, "journal cannot give the divergent writes: using snapshots");
                    }
                }
            }
            let from = common.as_ref().map(|(c, _)| c.name.as_str());
            let extra = local_changes(sh, job, local, from).await?;
            let mine: u64 = extra.iter().map(|e| e.length).sum();
            Ok(Standing::Follows(Plan {
                base: common.as_ref().map(|(_, r)| r.clone()),
                extra,
                resync: Some(match &common {
                    Some((c, _)) => format!(
                        "delta from snapshot {} ({mine} bytes changed here since)",
                        c.id
                    ),
                    None => format!("full copy (no common point with {peer})"),
                }),
            }))
        }
    }
}

fn replaying_description(
    local: &MirrorImageInfo,
    target: &SnapInfo,
    bytes: u64,
    secs: f64,
) -> String {
    let local_ts = local
        .mirror_snaps
        .iter()
        .map(|s| s.created)
        .max()
        .unwrap_or(0);
    let d = serde_json::json!({
        "bytes_per_second": if secs > 0.0 { bytes as f64 / secs } else { 0.0 },
        "bytes_per_snapshot": bytes as f64,
        "last_snapshot_bytes": bytes,
        "last_snapshot_sync_seconds": secs.round() as u64,
        "local_snapshot_timestamp": local_ts,
        "remote_snapshot_timestamp": target.created,
        "replay_state": "idle",
    });
    format!("replaying, {d}")
}

async fn report_idle(
    sh: &Arc<DaemonState>,
    job: &ImageReplay,
    local: &MirrorImageInfo,
    target: &SnapInfo,
) {
    let key = format!("{}/{}", job.pool, job.remote_image.global_id);
    let prev = sh.statuses.lock().await.get(&key).map(|r| r.status.clone());
    // Keep the byte figures of the last sync in the description.
    if let Some(p) = &prev
        && p.state == State::Replaying
        && p.reason == Reason::Replaying
    {
        return;
    }
    let last_sync = local
        .mirror_snaps
        .iter()
        .map(|s| s.created)
        .max()
        .unwrap_or(0);
    let mut r = job.status(
        State::Replaying,
        Reason::Replaying,
        replaying_description(local, target, 0, 0.0),
    );
    r.status.last_sync = last_sync;
    sh.report(r).await;
}

/// A write stream into the local non-primary image (mirror sync mode).
struct Writer {
    tx: tokio::sync::mpsc::Sender<WriteMessage>,
    call: tokio::task::JoinHandle<Result<Written, ClientError>>,
    total: u64,
}

impl Writer {
    async fn open(
        local: &SiteClient,
        image: ImageSpec,
        expect_epoch: Option<u64>,
    ) -> Result<Writer, ClientError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteMessage>(8);
        let open = WriteOpen {
            image: Some(image),
            mirror_sync: true,
            expect_epoch,
            ..Default::default()
        };
        tx.send(WriteMessage::Open(Box::new(open))).await.ok();
        let c = local.clone();
        let call = tokio::spawn(async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            c.io().write_stream(stream).await
        });
        Ok(Writer { tx, call, total: 0 })
    }

    async fn send(&mut self, ch: DataChunk) -> Result<(), ClientError> {
        self.total += ch.length;
        if self.tx.send(WriteMessage::Chunk(ch)).await.is_err() {
            // The local site ended the call: its status says why.
            return Err(match (&mut self.call).await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => ClientError::new(
                    tern_types::ErrorKind::Internal,
                    "the local write stream ended early",
                ),
                Err(e) => ClientError::new(tern_types::ErrorKind::Internal, e.to_string()),
            });
        }
        Ok(())
    }

    async fn commit(self) -> Result<(), ClientError> {
        let commit = WriteMessage::Commit {
            final_size: 0,
            total_bytes: self.total,
        };
        let _ = self.tx.send(commit).await;
        drop(self.tx);
        match self.call.await {
            Ok(r) => r.map(|_| ()),
            Err(e) => Err(ClientError::new(
                tern_types::ErrorKind::Internal,
                e.to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, state: &str, origin: Option<(&str, u64)>) -> SnapInfo {
        SnapInfo {
            id,
            name: format!("s{id}"),
            namespace: SnapNamespaceType::Mirror,
            mirror_state: MirrorSnapState::parse(state),
            mirror_complete: true,
            primary_mirror_uuid: origin.map(|o| o.0.to_string()).unwrap_or_default(),
            primary_snap_id: origin.map_or(0, |o| o.1),
            ..Default::default()
        }
    }

    fn image(snaps: Vec<SnapInfo>) -> MirrorImageInfo {
        MirrorImageInfo {
            mirror_snaps: snaps,
            ..Default::default()
        }
    }

    #[test]
    fn common_point_after_a_forced_promotion() {
        // A took 1, 2, 3 and its demotion 4; B copied 1 and 2, then was
        // promoted (its own 7, 8).
        let a = image(vec![
            snap(1, "primary", None),
            snap(2, "primary", None),
            snap(3, "primary", None),
            snap(4, "demoted", None),
        ]);
        let b = image(vec![
            snap(5, "non-primary", Some(("A", 1))),
            snap(6, "non-primary", Some(("A", 2))),
            snap(7, "primary", None),
            snap(8, "primary", None),
        ]);
        let (l, r) = common_point(&a, &b, "A", "B").unwrap();
        assert_eq!((l.id, r.as_str()), (2, "s6"));
    }

    #[test]
    fn common_point_between_two_copies_of_a_third_site() {
        // B and C both copied A's snapshot 9 (and C also 10); C is primary now.
        let b = image(vec![
            snap(3, "non-primary", Some(("A", 8))),
            snap(4, "non-primary demoted", Some(("A", 9))),
        ]);
        let c = image(vec![
            snap(20, "non-primary", Some(("A", 9))),
            snap(21, "non-primary", Some(("A", 10))),
            snap(22, "primary", None),
        ]);
        let (l, r) = common_point(&b, &c, "B", "C").unwrap();
        assert_eq!((l.id, r.as_str()), (4, "s20"));
        // And C's own snapshot as B's copy of it: the failback case.
        let b2 = image(vec![snap(5, "non-primary", Some(("C", 22)))]);
        let (l, r) = common_point(&b2, &c, "B", "C").unwrap();
        assert_eq!((l.id, r.as_str()), (5, "s22"));
    }

    #[test]
    fn no_common_point_means_a_full_copy() {
        let a = image(vec![snap(1, "primary", None), snap(2, "demoted", None)]);
        // B's copies of A's snapshots were all pruned; incomplete or user
        // snapshots never count.
        let mut incomplete = snap(9, "non-primary", Some(("A", 2)));
        incomplete.mirror_complete = false;
        let mut user = snap(10, "", None);
        user.namespace = SnapNamespaceType::User;
        let b = image(vec![incomplete, user, snap(11, "primary", None)]);
        assert!(common_point(&a, &b, "A", "B").is_none());
    }
}
