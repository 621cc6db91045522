//! Journal-mode replay of one image: the primary's journal entries,
//! pushed by the primary as they commit, applied in order to the local
//! non-primary image.
//!
//! Start (or restart after the journal was lost to us): register as a
//! client of the primary's journal (which holds back trimming from there),
//! have the primary take a sync-point snapshot, copy it (a delta from the
//! newest snapshot both sites hold, all of it the first time), then read
//! the journal from the registration point, skipping entries up to the
//! sync point's own snapshot entry (they are in the copy). Resume after a
//! restart of either side: from the position recorded locally. The
//! position is recorded here and committed to the primary once a second,
//! after the applied writes are durable here; entries applied again after
//! a crash change nothing, since each one sets state in journal order.
//!
//! Memory: one chunk of entries is held at a time, of at most
//! `rbd_mirror_memory_target` / 64 (4 MiB with the default 256 MiB, at
//! least 64 KiB), and the primary's stream waits while we apply (gRPC flow
//! control, and the primary reads ahead at most four chunks), so a slow
//! local disk slows the stream instead of growing memory.

use crate::replay::{ImageReplay, Plan, sync_to};
use crate::{DaemonState, now};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_client::ClientError;
use tern_store::journal::{JournalEntry, JournalOp};
use tern_types::ImageSpec;
use tern_types::api::{JournalApply, JournalPosition, MirrorImageInfo};
use tern_types::error::ErrorKind;
use tern_types::journal::JournalClientAction as Action;
use tern_types::mirror::{MirrorStatusState as State, StatusReason as Reason};

const COMMIT_EVERY: Duration = Duration::from_secs(1);
const REPORT_EVERY: Duration = Duration::from_secs(1);

use tern_types::time::now_us;

/// Rates over the last few seconds, for the status.
struct Rates {
    window: std::collections::VecDeque<(Instant, u64, u64)>,
}

impl Rates {
    fn new() -> Rates {
        Rates {
            window: std::collections::VecDeque::new(),
        }
    }

    fn add(&mut self, entries: u64, bytes: u64) {
        let now = Instant::now();
        self.window.push_back((now, entries, bytes));
        while self
            .window
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.window.pop_front();
        }
    }

    /// (entries per second, bytes per second)
    fn per_second(&self) -> (f64, f64) {
        let Some((first, _, _)) = self.window.front() else {
            return (0.0, 0.0);
        };
        let secs = first.elapsed().as_secs_f64().max(1.0);
        let (e, b) = self
            .window
            .iter()
            .fold((0, 0), |(e, b), (_, x, y)| (e + x, b + y));
        (e as f64 / secs, b as f64 / secs)
    }
}

/// The "replaying, {json}" status with rbd's keys and ours.
fn replaying_status(
    job: &ImageReplay,
    rates: &Rates,
    applied_tid: u64,
    applied_ts: u64,
    primary_tid: u64,
) -> crate::Reported {
    let (eps, bps) = rates.per_second();
    let behind = primary_tid.saturating_sub(applied_tid);
    // The RPO estimate: how old the last applied write is while the
    // primary has newer ones; nothing while caught up.
    let lag = if behind > 0 && applied_ts > 0 {
        now_us().saturating_sub(applied_ts) as f64 / 1e6
    } else {
        0.0
    };
    let d = serde_json::json!({
        "bytes_per_second": bps,
        "entries_behind_primary": behind,
        "entries_per_second": eps,
        "seconds_until_synced": if eps > 0.0 { behind as f64 / eps } else if behind == 0 { 0.0 } else { -1.0 },
        "non_primary_position": {"entry_tid": applied_tid, "timestamp": applied_ts / 1_000_000},
        "primary_position": {"entry_tid": primary_tid},
        "replay_lag_seconds": lag,
        "replay_state": if behind > 0 { "replaying" } else { "idle" },
    });
    let mut r = job.status(
        State::Replaying,
        Reason::Replaying,
        format!("replaying, {d}"),
    );
    r.status.lag_seconds = lag;
    r.status.last_sync = now();
    r
}

pub(crate) async fn run(
    sh: &Arc<DaemonState>,
    job: &ImageReplay,
    local: MirrorImageInfo,
    plan: Plan,
) -> Result<(), ClientError> {
    let remote_ref = ImageSpec::new(&job.peer.remote_pool, &job.remote_image.name);
    let peer_limit = sh.peer_limiter(&job.peer.uuid).await;
    let local_ref = ImageSpec::new(&job.pool, &local.name);
    // Every step into the local copy carries the epoch it had when this
    // run began: once it is promoted here, the site refuses the rest.
    let fence = Some(local.epoch);
    let me = job.local_mirror_uuid.clone();
    let (rr, me) = (&remote_ref, &me);
    let journal_client =
        move |action, tid| async move { job.remote.journal().client(rr, me, action, tid).await };
    let position = |tid, skip_to, timestamp_us| JournalPosition {
        image: local_ref.clone(),
        primary_mirror_uuid: job.remote_mirror_uuid.clone(),
        tid,
        skip_to,
        timestamp_us,
        expect_epoch: fence,
    };
    let apply = |entries, persist| JournalApply {
        image: local_ref.clone(),
        primary_mirror_uuid: job.remote_mirror_uuid.clone(),
        entries,
        persist,
        expect_epoch: fence,
        primary_epoch: job.remote_image.epoch,
    };
    // The site we follow now registered on this copy's journal while it
    // followed us: it reads from us no more, and its position would hold
    // back trimming here until rbd_journal_max_size cut it off.
    match sh
        .local
        .journal()
        .client(&local_ref, &job.remote_mirror_uuid, Action::Unregister, 0)
        .await
    {
        Ok(_) => {
            tracing::info!(image = %job.spec(), "dropped {}'s stale client from this copy's journal", job.peer.site_name)
        }
        Err(e) if matches!(e.kind, ErrorKind::NotFound | ErrorKind::InvalidArgument) => {}
        Err(e) => {
            tracing::warn!(image = %job.spec(), error = %e, "could not drop {}'s stale journal client", job.peer.site_name)
        }
    }
    // Resume where we were, if the primary kept our place (not when a
    // resync was asked for: that starts over from a new sync point).
    let mut resume = None;
    if local.journal_primary_uuid == job.remote_mirror_uuid
        && local.journal_tid > 0
        && plan.resync.is_none()
    {
        match journal_client(Action::Get, 0).await {
            Ok(c) if !c.disconnected && c.commit_tid <= local.journal_tid => {
                resume = Some(local.journal_tid);
            }
            Ok(c) if c.disconnected => {
                tracing::warn!(image = %job.spec(), "fell behind the primary's journal: catching up by a delta copy");
                let r = job.status(
                    State::Syncing,
                    Reason::CatchingUp,
                    format!(
                        "fell behind: {} disconnected this site from its journal (past rbd_journal_max_size) \
                         at tid {}; catching up by copying the extents changed since the last common snapshot",
                        job.peer.site_name, c.commit_tid
                    ),
                );
                sh.report(r).await;
            }
            _ => {}
        }
    }
    let (next, mut skip_to) = match resume {
        // Still skipping to a sync point: read from the recorded point
        // itself (skipping it again costs nothing).
        Some(tid) if !local.journal_skip_to.is_empty() => {
            (tid, Some(local.journal_skip_to.clone()))
        }
        Some(tid) => (tid + 1, None),
        // Demoted before this copy followed its journal: its demotion
        // snapshot holds all it wrote. Copying it (a delta) puts the
        // demotion here, so a plain promote here loses nothing.
        None if !job.remote_image.primary => {
            return crate::replay::snapshot_pass(sh, job, &local, &plan).await;
        }
        None => {
            let reg = journal_client(Action::Register, 0).await?;
            let point = job.remote.mirror().image_snapshot(&remote_ref).await?;
            let rimg = job.remote.mirror().image_info(&remote_ref).await?;
            let target = rimg
                .mirror_snaps
                .iter()
                .find(|s| s.id == point.id)
                .cloned()
                .ok_or_else(|| {
                    ClientError::new(
                        ErrorKind::NotFound,
                        "the sync-point snapshot vanished on the primary".to_string(),
                    )
                })?;
            sync_to(sh, job, &local, &rimg, &target, &plan).await?;
            // The copy holds everything up to the sync point: from the
            // registration point on, skip to the snapshot's own entry.
            sh.local
                .mirror_daemon()
                .journal_position(position(reg.commit_tid.max(1), target.name.clone(), 0))
                .await?;
            (reg.commit_tid + 1, Some(target.name))
        }
    };
    tracing::info!(image = %job.spec(), from = next, skipping_to = ?skip_to, "replaying the journal of {}", job.peer.site_name);
    let max_bytes =
        (sh.memory_target.load(std::sync::atomic::Ordering::Relaxed) / 64).clamp(64 << 10, 4 << 20);
    let mut stream = job
        .remote
        .journal()
        .read(
            &remote_ref,
            next,
            true,
            max_bytes,
            skip_to.as_deref().unwrap_or(""),
        )
        .await?;
    let mut rates = Rates::new();
    let (mut last_commit, mut last_report) = (Instant::now(), Instant::now() - REPORT_EVERY);
    let (mut applied_tid, mut applied_ts) = (next - 1, 0u64);
    let mut primary_tid = next - 1;
    let mut committed = applied_tid;
    let mut pending_commit = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
        let chunk = match msg {
            Ok(Some(Ok(c))) => Some(c),
            Ok(None) => {
                return Err(ClientError::new(
                    ErrorKind::Unavailable,
                    "the primary ended the journal stream".to_string(),
                ));
            }
            Ok(Some(Err(e))) => {
                if e.kind == ErrorKind::Fenced {
                    // Disconnected for falling behind: the next run catches
                    // up by a delta copy instead of the lost entries.
                    let forget = JournalPosition {
                        primary_mirror_uuid: String::new(),
                        ..position(0, String::new(), 0)
                    };
                    let _ = sh.local.mirror_daemon().journal_position(forget).await;
                }
                return Err(e);
            }
            Err(_) => None,
        };
        let mut demoted = false;
        if let Some(c) = chunk {
            primary_tid = primary_tid.max(c.durable_tid);
            // The WAN limits hold for journal replay as for snapshot copies.
            // While throttled, status keeps saying how far behind we are.
            let n = c.entries.len() as u64;
            let wait = async {
                sh.limit.take(n).await;
                peer_limit.take(n).await;
            };
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    _ = tokio::time::sleep(REPORT_EVERY) => {
                        if let Ok(ci) = journal_client(Action::Get, 0).await {
                            primary_tid = primary_tid.max(ci.commit_tid + ci.entries_behind);
                        }
                        if skip_to.is_none() {
                            let r = replaying_status(job, &rates, applied_tid, applied_ts, primary_tid);
                            sh.report(r).await;
                            last_report = Instant::now();
                        }
                    }
                }
            }
            let mut bytes = &c.entries[..];
            if let Some(name) = &skip_to {
                // Entries up to the sync point's snapshot are in the copy.
                while !bytes.is_empty() {
                    let (e, used) = JournalEntry::decode(bytes).map_err(|e| {
                        ClientError::new(ErrorKind::Corrupt, format!("journal stream: {e}"))
                    })?;
                    bytes = &bytes[used..];
                    applied_tid = e.tid;
                    if matches!(&e.op, JournalOp::SnapCreate { name: n, .. } if n == name) {
                        skip_to = None;
                        pending_commit = true;
                        break;
                    }
                }
            }
            if !bytes.is_empty() {
                let persist = last_commit.elapsed() >= COMMIT_EVERY;
                let a = sh
                    .local
                    .mirror_daemon()
                    .journal_apply(apply(bytes.to_vec(), persist))
                    .await?;
                rates.add(a.entries, a.bytes);
                sh.count_replicated(
                    &job.pool,
                    &job.remote_image.name,
                    &job.peer.site_name,
                    a.bytes,
                    a.entries,
                );
                applied_tid = a.last_tid;
                applied_ts = a.last_timestamp_us;
                demoted = a.demoted;
                pending_commit = true;
                if persist || demoted {
                    committed = applied_tid;
                }
            }
        }
        // Durable here first (persist flushed it), then the primary may trim.
        if pending_commit && (last_commit.elapsed() >= COMMIT_EVERY || demoted) {
            if committed < applied_tid {
                let daemon = sh.local.mirror_daemon();
                daemon.journal_apply(apply(Vec::new(), true)).await?;
                daemon
                    .journal_position(position(
                        applied_tid,
                        skip_to.clone().unwrap_or_default(),
                        applied_ts,
                    ))
                    .await?;
                committed = applied_tid;
            }
            if skip_to.is_none() {
                journal_client(Action::Commit, committed).await?;
            }
            last_commit = Instant::now();
            pending_commit = false;
        }
        if demoted {
            let r = job.status(
                State::Stopped,
                Reason::Demoted,
                format!(
                    "replay stopped: {} demoted the image (journal tid {applied_tid} replayed); \
                     promote here to fail over without data loss",
                    job.peer.site_name
                ),
            );
            sh.report(r).await;
            return Ok(());
        }
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            if skip_to.is_none() {
                // What the primary holds now, not only what reached us: a
                // backed-up stream must not look caught up.
                if let Ok(ci) = journal_client(Action::Get, 0).await {
                    primary_tid = primary_tid.max(ci.commit_tid + ci.entries_behind);
                }
                let r = replaying_status(job, &rates, applied_tid, applied_ts, primary_tid);
                sh.report(r).await;
            }
            // Promoted here meanwhile: stop replaying into it. Asked to
            // resync: stop, and the next pass starts over with a resync.
            let me_now = sh.local.mirror().image_info(&local_ref).await?;
            if me_now.primary {
                return Ok(());
            }
            if me_now.resync_requested {
                tracing::warn!(image = %job.spec(), "resync requested: restarting replay from a new sync point");
                let r = job.status(
                    State::Syncing,
                    Reason::ResyncRequested,
                    format!(
                        "resync requested: replay of {}'s journal stopped at entry {applied_tid}; \
                         starting over from a new sync point",
                        job.peer.site_name
                    ),
                );
                sh.report(r).await;
                return Ok(());
            }
        }
    }
}
