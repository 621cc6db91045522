//! `tern dr failover|failback`: the seed's failover.sh and failback.sh done
//! right. Every run checks before it changes anything, acts per image,
//! waits with a timeout and shows progress, logs to a file, and ends with
//! a report. Runs are idempotent: the state lives on the sites, so a run
//! that was interrupted is finished by running it again.

use crate::cli::{DrArgs, DrCmd};
use crate::ctx::{Ctx, Result, invalid};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tern_client::config::TlsMode;
use tern_client::{ClientError, ClusterConfig, SiteClient};
use tern_types::ErrorKind;
use tern_types::ImageSpec;
use tern_types::api::{MirrorImageInfo, MirrorPeer, MirrorPoolInfo};
use tern_types::mirror::{MirrorSnapState, PoolMirrorMode, StatusReason};

pub async fn run(ctx: &Ctx, c: DrCmd) -> Result<()> {
    match c {
        DrCmd::Failover(a) => failover(ctx, a).await,
        DrCmd::Failback(a) => failback(ctx, a).await,
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Lines to stderr and to the log file, each with its time.
struct Log {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Log {
    fn open(kind: &str, path: Option<PathBuf>) -> Log {
        let stamp = tern_types::time::datetime(now_us() / 1_000_000)
            .replace([' ', ':'], "-")
            .replace("--", "-");
        let name = format!("dr-{kind}-{stamp}.log");
        let candidates = match path {
            Some(p) => vec![p],
            None => vec![
                PathBuf::from("/var/log/tern").join(&name),
                PathBuf::from(&name),
            ],
        };
        for p in candidates {
            if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(d);
            }
            if let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
            {
                return Log {
                    file: Some(f),
                    path: p,
                };
            }
        }
        eprintln!("warning: no log file could be opened; logging to stderr only");
        Log {
            file: None,
            path: PathBuf::new(),
        }
    }

    fn line(&mut self, msg: impl AsRef<str>) {
        let l = format!(
            "[{}] {}",
            tern_types::time::datetime(now_us() / 1_000_000),
            msg.as_ref()
        );
        eprintln!("{l}");
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{l}");
        }
    }
}

/// A peer site as seen from here: its client and what it holds.
struct PeerView {
    peer: MirrorPeer,
    client: Option<SiteClient>,
    /// Its mirrored images by global id; None: unreachable (why).
    images: std::result::Result<BTreeMap<String, MirrorImageInfo>, String>,
}

async fn peers(c: &SiteClient, pool: &str) -> Result<(MirrorPoolInfo, Vec<PeerView>)> {
    let info = c.mirror().pool_info(pool, true).await?;
    if info.mode == PoolMirrorMode::Disabled {
        return Err(invalid(format!(
            "mirroring is not enabled on pool '{pool}' here"
        )));
    }
    let mut out = Vec::new();
    for p in &info.peers {
        let client = p.mon_host.first().and_then(|ep| {
            SiteClient::connect_with(
                ep,
                &TlsMode::Pinned(p.tls_fingerprint.clone()),
                &p.client_name,
                &p.key,
            )
            .ok()
        });
        let images = match &client {
            None => Err("no usable endpoint".to_string()),
            Some(cl) => match tokio::time::timeout(
                Duration::from_secs(5),
                cl.mirror().image_list(&p.remote_pool),
            )
            .await
            {
                Ok(Ok(l)) => Ok(l
                    .images
                    .into_iter()
                    .map(|i| (i.global_id.clone(), i))
                    .collect()),
                Ok(Err(e)) => Err(e.message),
                Err(_) => Err("no answer within 5 s".into()),
            },
        };
        out.push(PeerView {
            peer: p.clone(),
            client,
            images,
        });
    }
    Ok((info, out))
}

/// Logs the preflight's problems and refuses to go on if there are any.
fn preflight_verdict(log: &mut Log, problems: &[String]) -> Result<()> {
    if problems.is_empty() {
        log.line("preflight checks passed");
        return Ok(());
    }
    for p in problems {
        log.line(format!("ERROR: {p}"));
    }
    log.line("preflight failed: nothing was changed");
    Err(ClientError::new(
        ErrorKind::Busy,
        format!(
            "preflight failed for {} image(s): nothing was changed (see the log: {})",
            problems.len(),
            log.path.display()
        ),
    ))
}

struct Outcome {
    image: String,
    result: String,
    ok: bool,
    rpo_seconds: Option<f64>,
    data_as_of: Option<u64>,
}

fn report(ctx: &Ctx, log: &mut Log, kind: &str, pool: &str, out: &[Outcome]) {
    log.line(format!("{kind} report for pool {pool}:"));
    for o in out {
        let rpo = match (o.rpo_seconds, o.data_as_of) {
            (Some(r), Some(t)) => format!(
                "RPO {r:.1} s (newest write held is from {})",
                tern_types::time::datetime(t / 1_000_000)
            ),
            (Some(r), None) => format!("RPO {r:.1} s"),
            _ => "RPO unknown".into(),
        };
        log.line(format!("  {:<24} {}; {rpo}", o.image, o.result));
    }
    let failed = out.iter().filter(|o| !o.ok).count();
    log.line(format!(
        "{kind} complete: {} succeeded, {failed} failed. Log: {}",
        out.len() - failed,
        log.path.display()
    ));
    if ctx.json() {
        let v = serde_json::json!({
            "pool": pool,
            "operation": kind,
            "log": log.path.display().to_string(),
            "images": out.iter().map(|o| serde_json::json!({
                "name": o.image,
                "ok": o.ok,
                "result": o.result,
                "rpo_seconds": o.rpo_seconds,
                "data_as_of_us": o.data_as_of,
            })).collect::<Vec<_>>(),
        });
        ctx.print_json(&v);
    }
}

async fn local_status(c: &SiteClient, pool: &str, name: &str) -> String {
    match c.mirror().image_status(&ImageSpec::new(pool, name)).await {
        Ok(s) => format!("{}: {}", s.local.state_label(), s.local.description),
        Err(e) => e.message,
    }
}

async fn failover(ctx: &Ctx, a: DrArgs) -> Result<()> {
    if a.to.is_some() {
        return Err(invalid("--to is for failback"));
    }
    let mut log = Log::open("failover", a.log.clone());
    let pool = a.pool.clone();
    log.line(format!(
        "failover of pool {pool} started (force: {}, dry run: {})",
        a.force, a.dry_run
    ));
    // Preflight: nothing changes until every check has passed.
    let c = ctx.connect().await?;
    let hello = c.hello().await.inspect_err(|e| {
        log.line(format!("ERROR: cannot reach the local site: {}", e.message));
    })?;
    let (info, views) = peers(&c, &pool).await.inspect_err(|e| {
        log.line(format!("ERROR: {}", e.message));
    })?;
    log.line(format!("local site {} reachable", hello.site_name));
    for v in &views {
        match &v.images {
            Ok(m) => log.line(format!(
                "peer {} reachable ({} mirrored images)",
                v.peer.site_name,
                m.len()
            )),
            Err(e) => log.line(format!("peer {} unreachable: {e}", v.peer.site_name)),
        }
    }
    let list = c.mirror().image_list(&pool).await?;
    if list.images.is_empty() {
        log.line(format!("ERROR: no mirrored images in pool {pool}"));
        return Err(invalid(format!("no mirrored images in pool {pool}")));
    }
    let mut images = list.images.clone();
    images.sort_by(|x, y| x.name.cmp(&y.name));
    let mut problems = Vec::new();
    let mut plan: Vec<(MirrorImageInfo, &'static str)> = Vec::new();
    for img in &images {
        if img.primary {
            plan.push((img.clone(), "skip: already primary here"));
            continue;
        }
        let src = views
            .iter()
            .find(|v| v.peer.mirror_uuid == img.primary_mirror_uuid)
            .or(views.first());
        let remote = src.map(|v| (v, v.images.as_ref().map(|m| m.get(&img.global_id))));
        match (a.force, remote) {
            (true, Some((v, Ok(Some(r))))) if r.primary => {
                log.line(format!(
                    "WARNING: {}/{} is still primary at {}, which is reachable: forcing makes a split-brain; \
                     its writes from now on are discarded when it is resynced",
                    pool, img.name, v.peer.site_name
                ));
                plan.push((img.clone(), "promote --force"));
            }
            (true, _) => plan.push((img.clone(), "promote --force")),
            (false, Some((_, Ok(Some(r))))) if r.demoted && !r.primary => {
                plan.push((img.clone(), "promote (after its demotion is replayed here)"))
            }
            (false, Some((v, Ok(Some(r))))) if r.primary => problems.push(format!(
                "{}/{} is still primary at {}: demote it there first (`tern mirror pool demote {}` on {}), \
                 or use --force if {} is lost",
                pool, img.name, v.peer.site_name, v.peer.remote_pool, v.peer.site_name, v.peer.site_name
            )),
            (false, Some((_, Ok(_)))) => {
                // Demoted there and promoted nowhere yet, or gone: a plain
                // promote decides (it refuses unless nothing is lost).
                plan.push((img.clone(), "promote"))
            }
            (false, Some((v, Err(e)))) => problems.push(format!(
                "{}/{}: its primary site {} cannot be reached ({e}): if {} is lost, run again with --force \
                 (writes it had not replicated are lost; the report says how much)",
                pool, img.name, v.peer.site_name, v.peer.site_name
            )),
            (false, None) => problems.push(format!(
                "{}/{}: no peer site is configured for pool {pool}",
                pool, img.name
            )),
        }
    }
    for (img, action) in &plan {
        log.line(format!("plan: {}/{}: {action}", pool, img.name));
    }
    preflight_verdict(&mut log, &problems)?;
    if a.dry_run {
        log.line("dry run: nothing was changed");
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut out = Vec::new();
    for (img, action) in plan {
        let name = img.name.clone();
        if action.starts_with("skip") {
            out.push(Outcome {
                image: name,
                result: "already primary here (skipped)".into(),
                ok: true,
                rpo_seconds: None,
                data_as_of: None,
            });
            continue;
        }
        log.line(format!(
            "promoting {pool}/{name}{}",
            if a.force { " (forced)" } else { "" }
        ));
        let mut last_note = Instant::now();
        let res = loop {
            let r = c
                .mirror()
                .image_promote(&ImageSpec::new(&pool, &name), a.force)
                .await;
            match r {
                Err(e) if e.kind == ErrorKind::Busy && !a.force && Instant::now() < deadline => {
                    if last_note.elapsed() >= Duration::from_secs(5) {
                        last_note = Instant::now();
                        log.line(format!(
                            "  {name}: waiting for the demotion to be replayed here ({})",
                            local_status(&c, &pool, &name).await
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) if e.message.contains("already primary") => {
                    break Ok(None);
                }
                other => break other.map(Some),
            }
        };
        let at = now_us();
        match res {
            Ok(Some(m)) => {
                let (rpo, as_of) = if !a.force {
                    (Some(0.0), None)
                } else if m.fork_data_as_of_us > 0 {
                    (
                        Some(at.saturating_sub(m.fork_data_as_of_us) as f64 / 1e6),
                        Some(m.fork_data_as_of_us),
                    )
                } else {
                    (None, None)
                };
                let what = if a.force {
                    if m.fork_journal_tid > 0 {
                        format!(
                            "promoted (forced; epoch {}, holds the old primary's journal to entry {})",
                            m.epoch, m.fork_journal_tid
                        )
                    } else {
                        format!("promoted (forced; epoch {})", m.epoch)
                    }
                } else {
                    format!(
                        "promoted (epoch {}; demotion replayed: no data lost)",
                        m.epoch
                    )
                };
                log.line(format!("SUCCESS: {pool}/{name} {what}"));
                out.push(Outcome {
                    image: name,
                    result: what,
                    ok: true,
                    rpo_seconds: rpo,
                    data_as_of: as_of,
                });
            }
            Ok(None) => out.push(Outcome {
                image: name,
                result: "already primary here (skipped)".into(),
                ok: true,
                rpo_seconds: None,
                data_as_of: None,
            }),
            Err(e) => {
                log.line(format!("ERROR: {pool}/{name} not promoted: {}", e.message));
                out.push(Outcome {
                    image: name,
                    result: format!("FAILED: {}", e.message),
                    ok: false,
                    rpo_seconds: None,
                    data_as_of: None,
                });
            }
        }
    }
    if let Ok(s) = c.mirror().pool_status(&pool, false).await {
        log.line(format!(
            "pool health: {} (daemon {}, images {})",
            s.health, s.daemon_health, s.image_health
        ));
    }
    let _ = info;
    report(ctx, &mut log, "failover", &pool, &out);
    let failed = out.iter().filter(|o| !o.ok).count();
    if failed > 0 {
        return Err(ClientError::new(
            ErrorKind::Busy,
            format!(
                "{failed} image(s) not promoted; run again to retry (promoted ones are skipped)"
            ),
        ));
    }
    Ok(())
}

async fn failback(ctx: &Ctx, a: DrArgs) -> Result<()> {
    if a.force {
        return Err(invalid(
            "failback is always orderly: it hands over only what the other site has replayed",
        ));
    }
    let mut log = Log::open("failback", a.log.clone());
    let pool = a.pool.clone();
    log.line(format!(
        "failback of pool {pool} started (dry run: {})",
        a.dry_run
    ));
    let c = ctx.connect().await?;
    let hello = c.hello().await?;
    let (info, views) = peers(&c, &pool).await.inspect_err(|e| {
        log.line(format!("ERROR: {}", e.message));
    })?;
    // The site to hand back to: named by --to (its config), or the only peer.
    let to_client = match &a.to {
        Some(cluster) => {
            let conf = ClusterConfig::load(Some(cluster), None)?;
            Some(SiteClient::connect(&conf, &ctx.entity(), None)?)
        }
        None => None,
    };
    let target_name = match &to_client {
        Some(t) => Some(t.hello().await?.site_name),
        None => None,
    };
    let view = match &target_name {
        Some(n) => views.iter().find(|v| &v.peer.site_name == n),
        None if views.len() == 1 => views.first(),
        None => None,
    };
    let Some(view) = view else {
        let msg = match target_name {
            Some(n) => format!("site {n} is not a peer of pool {pool} here"),
            None => format!(
                "pool {pool} has {} peers: name the site to hand back to with --to CLUSTER",
                views.len()
            ),
        };
        log.line(format!("ERROR: {msg}"));
        return Err(invalid(msg));
    };
    let site = view.peer.site_name.clone();
    let remote = match &view.images {
        Ok(m) => m.clone(),
        Err(e) => {
            let msg = format!("{site} cannot be reached ({e}): a failback needs it up and in sync");
            log.line(format!("ERROR: {msg}"));
            return Err(ClientError::new(ErrorKind::Unavailable, msg));
        }
    };
    log.line(format!(
        "local site {} and {site} reachable",
        hello.site_name
    ));
    let mut images = c.mirror().image_list(&pool).await?.images;
    images.sort_by(|x, y| x.name.cmp(&y.name));
    let mut problems = Vec::new();
    for img in &images {
        let r = remote.get(&img.global_id);
        let action = match r {
            None => {
                problems.push(format!(
                    "{pool}/{}: {site} holds no copy of it yet",
                    img.name
                ));
                continue;
            }
            Some(r) if r.primary && img.primary => {
                problems.push(format!(
                    "{pool}/{}: primary both here and at {site} (split-brain): demote it at {site} and \
                     run `tern mirror image resync {}/{}` there first",
                    img.name, view.peer.remote_pool, r.name
                ));
                continue;
            }
            Some(r) if r.primary => "skip: already primary at the other site",
            Some(_) if !img.primary => "wait for the demotion to be replayed there",
            Some(_) => "wait in sync, demote here, wait for the demotion to be replayed there",
        };
        if img.primary {
            let st = c
                .mirror()
                .image_status(&ImageSpec::new(&pool, &img.name))
                .await?;
            if let Some(p) = st.peer_sites.iter().find(|p| p.site_name == site)
                && p.reason == StatusReason::SplitBrain
            {
                problems.push(format!(
                    "{pool}/{}: {site} reports split-brain ({}): run `tern mirror image resync {}/{}` there first",
                    img.name, p.description, view.peer.remote_pool, img.name
                ));
                continue;
            }
        }
        log.line(format!("plan: {pool}/{}: {action}", img.name));
    }
    preflight_verdict(&mut log, &problems)?;
    if a.dry_run {
        log.line("dry run: nothing was changed");
        return Ok(());
    }
    let remote_client = view.client.clone().expect("reachable peer has a client");
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let remote_get = |name: &str| {
        let rc = remote_client.clone();
        let r = ImageSpec::new(&view.peer.remote_pool, name);
        async move { rc.mirror().image_info(&r).await }
    };
    // Phase 1: every copy at the other site replaying (not syncing, not in error).
    log.line(format!("phase 1: waiting until {site} is in sync"));
    for img in images.iter().filter(|i| i.primary) {
        let mut last_note = Instant::now() - Duration::from_secs(10);
        loop {
            let st = c
                .mirror()
                .image_status(&ImageSpec::new(&pool, &img.name))
                .await?;
            let p = st.peer_sites.iter().find(|p| p.site_name == site).cloned();
            let state = p.as_ref().map(|p| p.state_label()).unwrap_or_default();
            if state.ends_with("replaying") {
                log.line(format!("  {}: {site} is replaying", img.name));
                break;
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "{}: {site} is not in sync after {} s ({state}): nothing was demoted",
                    img.name, a.timeout
                );
                log.line(format!("ERROR: {msg}"));
                return Err(ClientError::new(ErrorKind::Busy, msg));
            }
            if last_note.elapsed() >= Duration::from_secs(5) {
                last_note = Instant::now();
                log.line(format!(
                    "  {}: {site}: {}",
                    img.name,
                    p.map(|p| format!("{}: {}", p.state_label(), p.description))
                        .unwrap_or_else(|| "no status yet".into())
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Phase 2: demote here (idempotent: demoted ones are skipped).
    log.line("phase 2: demoting here");
    for img in images.iter().filter(|i| i.primary) {
        c.mirror()
            .image_demote(&ImageSpec::new(&pool, &img.name))
            .await
            .inspect_err(|e| log.line(format!("ERROR: {}: {}", img.name, e.message)))?;
        log.line(format!("  {}: demoted", img.name));
    }
    // Phase 3: the other site holds every demotion.
    log.line(format!(
        "phase 3: waiting until {site} has replayed the demotions"
    ));
    let mut out = Vec::new();
    for img in &images {
        let mine = c
            .mirror()
            .image_info(&ImageSpec::new(&pool, &img.name))
            .await?;
        if mine.primary {
            continue;
        }
        let Some(demotion) = mine
            .mirror_snaps
            .iter()
            .filter(|s| s.is_complete_mirror(|m| m == MirrorSnapState::PrimaryDemoted))
            .max_by_key(|s| s.id)
            .cloned()
        else {
            // Primary there already: handed back in an earlier run.
            out.push(Outcome {
                image: img.name.clone(),
                result: format!("already handed back to {site}"),
                ok: true,
                rpo_seconds: Some(0.0),
                data_as_of: None,
            });
            continue;
        };
        let mut last_note = Instant::now();
        let done = loop {
            let r = remote_get(&img.name).await?;
            if r.primary {
                break true;
            }
            let has = r.mirror_snaps.iter().any(|s| {
                s.mirror_complete
                    && s.primary_mirror_uuid == info.mirror_uuid
                    && s.primary_snap_id == demotion.id
            });
            if has {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            if last_note.elapsed() >= Duration::from_secs(5) {
                last_note = Instant::now();
                log.line(format!(
                    "  {}: waiting for {site} to replay the demotion",
                    img.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        if !done {
            log.line(format!(
                "ERROR: {}: {site} did not replay the demotion in time",
                img.name
            ));
            out.push(Outcome {
                image: img.name.clone(),
                result: format!("FAILED: {site} did not replay the demotion in time; run again"),
                ok: false,
                rpo_seconds: None,
                data_as_of: None,
            });
            continue;
        }
        log.line(format!("  {}: {site} holds the demotion", img.name));
        let mut result = format!("demoted here; {site} holds every write");
        if let Some(t) = &to_client {
            let r = t
                .mirror()
                .image_promote(&ImageSpec::new(&view.peer.remote_pool, &img.name), false)
                .await;
            match r {
                Ok(_) => result = format!("handed back: primary at {site} again, no data lost"),
                Err(e) if e.message.contains("already primary") => {
                    result = format!("handed back: primary at {site} again, no data lost")
                }
                Err(e) => {
                    log.line(format!(
                        "ERROR: {}: promote at {site}: {}",
                        img.name, e.message
                    ));
                    out.push(Outcome {
                        image: img.name.clone(),
                        result: format!("FAILED: promote at {site}: {}", e.message),
                        ok: false,
                        rpo_seconds: None,
                        data_as_of: None,
                    });
                    continue;
                }
            }
        }
        log.line(format!("SUCCESS: {}: {result}", img.name));
        out.push(Outcome {
            image: img.name.clone(),
            result,
            ok: true,
            rpo_seconds: Some(0.0),
            data_as_of: None,
        });
    }
    if to_client.is_none() {
        log.line(format!(
            "now promote at {site}: `tern dr failover --pool {}` there (its demotions are replayed, \
             so no data is lost)",
            view.peer.remote_pool
        ));
    }
    report(ctx, &mut log, "failback", &pool, &out);
    let failed = out.iter().filter(|o| !o.ok).count();
    if failed > 0 {
        return Err(ClientError::new(
            ErrorKind::Busy,
            format!("{failed} image(s) not handed back; run again to finish"),
        ));
    }
    Ok(())
}
