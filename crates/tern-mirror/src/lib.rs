//! The mirror daemon. One loop per daemon: every tick it heartbeats, reads
//! the local pools' mirroring config (with the peers' keys, which only the
//! local daemon and admins may read), asks every peer which images it holds
//! as primary, and makes sure one replayer task per image keeps the local
//! non-primary copy up to date. Replayers copy the exact delta between the
//! last mirror snapshot both sites share and the primary's newest one, and
//! resume an interrupted copy where it stopped.
//!
//! Status: every image's local state is reported to the local site and to
//! every peer site, on each change and on every heartbeat, so a site shows a
//! silent peer as down 2.5 s after its last report instead of its last good state.

mod journal;
mod limit;
mod metrics;
mod replay;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tern_client::config::TlsMode;
use tern_client::{ClientError, ClusterConfig, SiteClient};
use tern_daemon::Tasks;
use tern_types::ErrorKind;
use tern_types::api::{
    MirrorDaemonInfo, MirrorImageInfo, MirrorImageList, MirrorPeer, MirrorPoolInfo,
    MirrorSiteStatus, StatusReport,
};
use tern_types::mirror::{
    MirrorHealth, MirrorStatusState as State, PeerDirection, PoolMirrorMode, StatusReason as Reason,
};
use tern_types::site::Profile;
use tokio::sync::{Mutex, Semaphore};

pub struct Options {
    pub cluster: Option<String>,
    pub conf: Option<PathBuf>,
    pub id: String,
    pub keyring: Option<PathBuf>,
    /// Prometheus metrics listener (loopback unless allowed); None: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub metrics_allow_remote: bool,
}

pub(crate) const HEARTBEAT: Duration = Duration::from_millis(1000);

/// What a daemon knows about itself, sent with heartbeats and reports.
#[derive(Clone)]
pub(crate) struct DaemonIdentity {
    pub service_id: String,
    pub instance_id: String,
    pub client_id: String,
    pub hostname: String,
}

impl DaemonIdentity {
    pub fn info(&self, site_name: &str) -> MirrorDaemonInfo {
        MirrorDaemonInfo {
            service_id: self.service_id.clone(),
            instance_id: self.instance_id.clone(),
            client_id: self.client_id.clone(),
            hostname: self.hostname.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            last_heartbeat: now(),
            up: true,
            health: MirrorHealth::Ok,
            site_name: site_name.into(),
        }
    }
}

/// A test fault point: with `TERN_TEST_HOLD_DIR` set and the file
/// `<dir>/<point>` present (armed by a test), the daemon removes it, says
/// it got here (`<point>.held`) and waits until the test writes
/// `<point>.go` (two minutes at most), so a test can act between two steps
/// of a sync or a replay batch. Without the variable, nothing happens.
pub(crate) async fn hold(point: &str) {
    let Some(dir) = std::env::var_os("TERN_TEST_HOLD_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    if std::fs::remove_file(dir.join(point)).is_err() {
        return;
    }
    tracing::info!(point, "test fault point: holding");
    let _ = std::fs::write(dir.join(format!("{point}.held")), b"");
    let go = dir.join(format!("{point}.go"));
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while !go.exists() && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(go);
    tracing::info!(point, "test fault point: released");
}

pub(crate) use tern_types::time::now_secs as now;

/// (pool, image, source site) of the replication counters.
pub(crate) type ReplicaKey = (String, String, String);

/// The last status a replayer set for an image, re-sent on every heartbeat.
#[derive(Clone, Default)]
pub(crate) struct Reported {
    pub pool: String,
    pub global_id: String,
    /// For metrics: the image's name and the site it copies from.
    pub image: String,
    pub source: String,
    pub status: MirrorSiteStatus,
    /// (peer client, peer's pool) to report to as well.
    pub peers: Vec<(SiteClient, String)>,
}

pub(crate) struct DaemonState {
    pub local: SiteClient,
    pub me: DaemonIdentity,
    pub statuses: Mutex<HashMap<String, Reported>>,
    pub busy: Mutex<HashSet<String>>,
    pub syncs: Semaphore,
    /// Replication bandwidth for the whole daemon and per peer (uuid).
    pub limit: limit::Limiter,
    pub peer_limits: Mutex<HashMap<String, Arc<limit::Limiter>>>,
    pub peer_rate: std::sync::atomic::AtomicU64,
    /// rbd_mirror_memory_target: bounds the unapplied journal data a
    /// replayer holds (see `journal`).
    pub memory_target: std::sync::atomic::AtomicU64,
    pub compress: std::sync::atomic::AtomicBool,
    /// Bytes and journal entries replicated, per (pool, image, source site).
    pub replicated: std::sync::Mutex<HashMap<ReplicaKey, (u64, u64)>>,
}

impl DaemonState {
    /// The bandwidth limiter shared by every copy from one peer.
    pub async fn peer_limiter(&self, peer_uuid: &str) -> Arc<limit::Limiter> {
        let mut m = self.peer_limits.lock().await;
        m.entry(peer_uuid.to_string())
            .or_insert_with(|| {
                Arc::new(limit::Limiter::new(
                    self.peer_rate.load(std::sync::atomic::Ordering::Relaxed),
                ))
            })
            .clone()
    }

    pub fn count_replicated(
        &self,
        pool: &str,
        image: &str,
        source: &str,
        bytes: u64,
        entries: u64,
    ) {
        let mut m = self.replicated.lock().expect("lock");
        let e = m
            .entry((pool.to_string(), image.to_string(), source.to_string()))
            .or_default();
        e.0 += bytes;
        e.1 += entries;
    }

    /// Records a status and pushes it at once to the local site and peers.
    pub async fn report(&self, mut r: Reported) {
        r.status.last_update = now();
        r.status.daemon_id = self.me.service_id.clone();
        let key = format!("{}/{}", r.pool, r.global_id);
        self.statuses.lock().await.insert(key, r.clone());
        push(self, &r).await;
    }
}

async fn push(sh: &DaemonState, r: &Reported) {
    let req = |pool: &str| StatusReport {
        pool: pool.to_string(),
        global_id: r.global_id.clone(),
        status: r.status.clone(),
        daemon: None,
    };
    if let Err(e) = sh.local.mirror_daemon().status_report(req(&r.pool)).await {
        tracing::debug!(error = %e, "status report to the local site failed");
    }
    for (peer, pool) in &r.peers {
        if let Err(e) = peer.mirror_daemon().status_report(req(pool)).await {
            tracing::debug!(peer = %peer.endpoint(), error = %e, "status report to a peer failed");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub async fn run(opts: Options) -> Result<(), ClientError> {
    let conf = ClusterConfig::load(opts.cluster.as_deref(), opts.conf.as_deref())?;
    let entity = format!("client.{}", opts.id);
    let local = SiteClient::connect(&conf, &entity, opts.keyring.as_deref())?;
    let hello = local.hello().await?;
    if !matches!(hello.profile, Profile::RbdMirror | Profile::Admin) {
        return Err(ClientError::new(
            ErrorKind::PermissionDenied,
            format!(
                "{entity} has profile {}: the mirror daemon needs mon 'profile rbd-mirror' osd 'profile rbd' \
                 (tern auth get-or-create {entity} mon 'profile rbd-mirror' osd 'profile rbd')",
                hello.profile
            ),
        ));
    }
    let syncs = local
        .config()
        .get(&entity, "rbd_mirror_concurrent_image_syncs")
        .await
        .ok()
        .and_then(|r| r.first().and_then(|e| e.value.parse::<usize>().ok()))
        .unwrap_or(tern_types::defaults::MIRROR_CONCURRENT_IMAGE_SYNCS as usize)
        .max(1);
    let me = DaemonIdentity {
        service_id: format!("{}", rand::random::<u32>()),
        instance_id: std::process::id().to_string(),
        client_id: opts.id.clone(),
        hostname: hostname(),
    };
    tracing::info!(site = %hello.site_name, service_id = %me.service_id, concurrent_syncs = syncs, "tern-mirror started");
    let sh = Arc::new(DaemonState {
        local,
        me,
        statuses: Mutex::new(HashMap::new()),
        busy: Mutex::new(HashSet::new()),
        syncs: Semaphore::new(syncs),
        limit: limit::Limiter::new(0),
        peer_limits: Mutex::new(HashMap::new()),
        peer_rate: std::sync::atomic::AtomicU64::new(0),
        memory_target: std::sync::atomic::AtomicU64::new(
            tern_types::defaults::MIRROR_MEMORY_TARGET,
        ),
        compress: std::sync::atomic::AtomicBool::new(false),
        replicated: std::sync::Mutex::new(HashMap::new()),
    });
    let tasks = Tasks::new();
    tasks.stop_on_signal();
    if let Some(addr) = opts.metrics_listen {
        metrics::serve(
            &tasks,
            sh.clone(),
            addr,
            opts.metrics_allow_remote,
            &hello.site_name,
        )
        .await?;
    }
    let mut peers: HashMap<String, SiteClient> = HashMap::new();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tasks.stopping() => break,
            _ = tick.tick() => {}
        }
        refresh_limits(&sh, &entity).await;
        if let Err(e) = scan(&sh, &tasks, &mut peers).await {
            tracing::warn!(error = %e.chain(), "scan failed");
        }
        // Heartbeat: re-send every status so sites see this daemon alive.
        let all: Vec<Reported> = sh.statuses.lock().await.values().cloned().collect();
        for r in &all {
            push(&sh, r).await;
        }
    }
    tracing::info!("tern-mirror stopping");
    // Replayers stop at their next await: each resumes from what the
    // sites recorded, as after a crash, but without one.
    let left = tasks.shutdown(tern_daemon::SHUTDOWN_BOUND).await;
    if left > 0 {
        tracing::warn!(tasks = left, "tasks still running at the shutdown deadline");
    }
    Ok(())
}

fn peer_client(p: &MirrorPeer, compress: bool) -> Result<SiteClient, ClientError> {
    let ep = p
        .mon_host
        .first()
        .ok_or_else(|| ClientError::new(ErrorKind::InvalidArgument, "peer has no mon_host"))?;
    let c = SiteClient::connect_with(
        ep,
        &TlsMode::Pinned(p.tls_fingerprint.clone()),
        &p.client_name,
        &p.key,
    )?;
    Ok(if compress { c.compressed() } else { c })
}

/// Reads the bandwidth and compression options (`tern config set
/// client.rbd-mirror …`); changes apply within a tick.
async fn refresh_limits(sh: &Arc<DaemonState>, entity: &str) {
    use std::sync::atomic::Ordering;
    let get = |key: &'static str| {
        let local = sh.local.clone();
        let who = entity.to_string();
        async move {
            local
                .config()
                .get(&who, key)
                .await
                .ok()
                .and_then(|r| r.first().map(|e| e.value.clone()))
                .unwrap_or_default()
        }
    };
    let daemon_rate = get("rbd_mirror_bandwidth_limit").await.parse().unwrap_or(0);
    sh.limit.set_rate(daemon_rate).await;
    let peer_rate: u64 = get("rbd_mirror_peer_bandwidth_limit")
        .await
        .parse()
        .unwrap_or(0);
    sh.peer_rate.store(peer_rate, Ordering::Relaxed);
    for l in sh.peer_limits.lock().await.values() {
        l.set_rate(peer_rate).await;
    }
    sh.compress.store(
        get("rbd_mirror_compression").await == "zstd",
        Ordering::Relaxed,
    );
    if let Ok(m) = get("rbd_mirror_memory_target").await.parse::<u64>() {
        sh.memory_target.store(m, Ordering::Relaxed);
    }
}

/// One pass over every mirrored pool.
async fn scan(
    sh: &Arc<DaemonState>,
    tasks: &Tasks,
    peers: &mut HashMap<String, SiteClient>,
) -> Result<(), ClientError> {
    let pools = sh.local.pool().list().await?;
    for p in pools {
        let info = sh.local.mirror().pool_info(&p.name, true).await?;
        if info.mode == PoolMirrorMode::Disabled {
            continue;
        }
        // Send heartbeats under the pool's site name so the site matches them.
        let _ = sh
            .local
            .mirror_daemon()
            .heartbeat(sh.me.info(&info.site_name))
            .await;
        let local_list = sh.local.mirror().image_list(&p.name).await?;
        let mut peer_clients = Vec::new();
        for peer in &info.peers {
            let compress = sh.compress.load(std::sync::atomic::Ordering::Relaxed);
            let key = format!(
                "{}/{}/{}/{compress}",
                peer.uuid, peer.key, peer.tls_fingerprint
            );
            if !peers.contains_key(&key) {
                match peer_client(peer, compress) {
                    Ok(c) => {
                        peers.insert(key.clone(), c);
                    }
                    Err(e) => {
                        tracing::warn!(peer = %peer.site_name, error = %e, "cannot set up peer client");
                        continue;
                    }
                }
            }
            peer_clients.push((peer.clone(), peers[&key].clone()));
        }
        let report_to: Vec<(SiteClient, String)> = peer_clients
            .iter()
            .map(|(p, c)| (c.clone(), p.remote_pool.clone()))
            .collect();
        // Local primaries: report them as such (peers show our state from this).
        for img in local_list.images.iter().filter(|i| i.primary) {
            let r = Reported {
                pool: p.name.clone(),
                global_id: img.global_id.clone(),
                image: img.name.clone(),
                source: String::new(),
                status: MirrorSiteStatus {
                    site_name: info.site_name.clone(),
                    mirror_uuids: info.mirror_uuid.clone(),
                    state: State::Stopped,
                    description: "local image is primary".into(),
                    reason: Reason::Primary,
                    up: true,
                    ..Default::default()
                },
                peers: report_to.clone(),
            };
            let key = format!("{}/{}", r.pool, r.global_id);
            // A split-brain found by this image's replayer (re-reported by
            // it every pass while it lasts) is not overwritten with "primary":
            // flapping between the two would make status lie half the time.
            let split_brain = |old: &Reported| {
                old.status.reason == Reason::SplitBrain
                    && now().saturating_sub(old.status.last_update) <= 3
            };
            let (changed, keep) = match sh.statuses.lock().await.get(&key) {
                None => (true, false),
                Some(old) => (old.status.state != State::Stopped, split_brain(old)),
            };
            if keep {
                continue;
            }
            if changed {
                sh.report(r).await;
            } else {
                sh.statuses.lock().await.insert(key, r);
            }
        }
        // What every peer holds as primary (or has just demoted), by image.
        let mut sources: HashMap<String, Vec<(usize, MirrorImageInfo, String)>> = HashMap::new();
        for (i, (peer, client)) in peer_clients.iter().enumerate() {
            if peer.direction == PeerDirection::TxOnly {
                continue;
            }
            let remote = match client.mirror().image_list(&peer.remote_pool).await {
                Ok(r) => r,
                Err(e) => {
                    mark_unreachable(sh, &p.name, &info, &local_list, peer, &report_to, &e).await;
                    continue;
                }
            };
            // A demoted image is followed too, so its final (demotion) snapshot
            // reaches us and a plain promote here loses nothing.
            for rimg in remote.images.iter().filter(|i| i.primary || i.demoted) {
                sources.entry(rimg.global_id.clone()).or_default().push((
                    i,
                    rimg.clone(),
                    remote.mirror_uuid.clone(),
                ));
            }
        }
        for (global_id, cands) in sources {
            let local_image = local_list
                .images
                .iter()
                .find(|i| i.global_id == global_id)
                .cloned();
            // Several sites: follow the one that is primary for the image;
            // a demoted one only while no other is primary (to receive its
            // demotion), preferring the one this copy followed.
            let primaries: Vec<_> = cands.iter().filter(|c| c.1.primary).collect();
            let chosen = match primaries.len() {
                0 => cands
                    .iter()
                    .find(|c| {
                        local_image
                            .as_ref()
                            .is_some_and(|l| l.primary_mirror_uuid == c.2)
                    })
                    .or(cands.first()),
                1 => Some(primaries[0]),
                _ => {
                    if !local_image.as_ref().is_some_and(|l| l.primary) {
                        let names: Vec<&str> = primaries
                            .iter()
                            .map(|c| peer_clients[c.0].0.site_name.as_str())
                            .collect();
                        let r = Reported {
                            pool: p.name.clone(),
                            global_id: global_id.clone(),
                            image: cands[0].1.name.clone(),
                            source: String::new(),
                            status: MirrorSiteStatus {
                                site_name: info.site_name.clone(),
                                mirror_uuids: info.mirror_uuid.clone(),
                                state: State::Error,
                                description: format!(
                                    "split-brain: {} all claim to be primary for this image. Nothing was \
                                     overwritten. Demote all but one of them, then resync the demoted ones",
                                    names.join(" and ")
                                ),
                                reason: Reason::SplitBrain,
                                up: true,
                                ..Default::default()
                            },
                            peers: report_to.clone(),
                        };
                        sh.report(r).await;
                        continue;
                    }
                    Some(primaries[0])
                }
            };
            let Some((i, rimg, remote_uuid)) = chosen.cloned() else {
                continue;
            };
            let (peer, client) = &peer_clients[i];
            let key = format!("{}/{}", p.name, global_id);
            if !sh.busy.lock().await.insert(key.clone()) {
                continue;
            }
            let job = replay::ImageReplay {
                pool: p.name.clone(),
                local_mirror_uuid: info.mirror_uuid.clone(),
                site_name: info.site_name.clone(),
                peer: peer.clone(),
                remote: client.clone(),
                remote_mirror_uuid: remote_uuid,
                remote_image: rimg,
                local_image,
                report_to: report_to.clone(),
            };
            let sh2 = sh.clone();
            tasks.spawn_until_stop(async move {
                replay::run(&sh2, job).await;
                sh2.busy.lock().await.remove(&key);
            });
        }
    }
    Ok(())
}

/// The primary's site cannot be reached: say so for every copy we hold of
/// its images instead of repeating the last good state.
async fn mark_unreachable(
    sh: &Arc<DaemonState>,
    pool: &str,
    info: &MirrorPoolInfo,
    local: &MirrorImageList,
    peer: &MirrorPeer,
    report_to: &[(SiteClient, String)],
    e: &ClientError,
) {
    // Only the copies this peer is the primary for: with several sites,
    // one lost peer says nothing about images another site serves.
    for img in local.images.iter().filter(|i| {
        !i.primary
            && (peer.mirror_uuid.is_empty()
                || i.primary_mirror_uuid.is_empty()
                || i.primary_mirror_uuid == peer.mirror_uuid)
    }) {
        let r = Reported {
            pool: pool.to_string(),
            global_id: img.global_id.clone(),
            image: img.name.clone(),
            source: peer.site_name.clone(),
            status: MirrorSiteStatus {
                site_name: info.site_name.clone(),
                mirror_uuids: info.mirror_uuid.clone(),
                state: State::Unknown,
                description: format!(
                    "cannot reach the primary site {}: {}",
                    peer.site_name, e.message
                ),
                reason: Reason::PeerUnreachable,
                up: true,
                ..Default::default()
            },
            peers: report_to.to_vec(),
        };
        sh.report(r).await;
    }
}
