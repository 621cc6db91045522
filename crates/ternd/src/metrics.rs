//! What a site shows operators (DESIGN §7): Prometheus metrics and a
//! read-only status page, both on one small HTTP listener
//! (`--http-listen`, default 127.0.0.1:9284; the mirror daemon has the
//! seed's 9283).
//! Everything is computed at scrape time from what the site already keeps
//! (daemon reports, journals, I/O counters), so a scrape never disagrees
//! with `tern mirror pool status`.

use crate::api::Api;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tern_daemon::metrics::{LabelValue, Labels, entries_behind};
use tern_types::api::{MirrorPoolStatus, MirrorSiteStatus};
use tern_types::error::Error;
use tern_types::mirror::{MirrorHealth, MirrorStatusState, StatusReason};

type FGauge = Gauge<f64, AtomicU64>;

fn new_histogram() -> Histogram {
    // 25 µs .. about 3.3 s.
    Histogram::new(exponential_buckets(0.000_025, 2.0, 18))
}

/// NBD I/O served by the site, per pool and operation; kept for the
/// process's life (counters and histograms accumulate).
pub struct IoMetrics {
    pub latency: Family<Labels, Histogram, fn() -> Histogram>,
    pub ops: Family<Labels, Counter>,
    pub bytes: Family<Labels, Counter>,
}

impl Default for IoMetrics {
    fn default() -> Self {
        IoMetrics {
            latency: Family::new_with_constructor(new_histogram as fn() -> Histogram),
            ops: Family::default(),
            bytes: Family::default(),
        }
    }
}

impl IoMetrics {
    pub fn record(&self, pool: &str, op: &str, bytes: u64, secs: f64) {
        let l = vec![
            ("pool".to_string(), pool.into()),
            ("op".to_string(), op.into()),
        ];
        self.latency.get_or_create(&l).observe(secs);
        self.ops.get_or_create(&l).inc();
        if bytes > 0 {
            self.bytes.get_or_create(&l).inc_by(bytes);
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), LabelValue::from(*v)))
        .collect()
}

fn health_value(h: MirrorHealth) -> f64 {
    match h {
        MirrorHealth::Error => 2.0,
        MirrorHealth::Warning => 1.0,
        MirrorHealth::Ok => 0.0,
    }
}

/// The state a site's copy is shown in: what its daemon does, or down.
fn shown_state(s: &MirrorSiteStatus) -> &'static str {
    if s.up { s.state.as_str() } else { "down" }
}

/// Every mirrored pool's status, as `mirror pool status --verbose` has it.
pub async fn mirrored_pools(svc: &Api) -> Vec<(String, MirrorPoolStatus)> {
    let pools = svc.site.store.pool_list().unwrap_or_default();
    let mut out = Vec::new();
    for p in pools {
        let m = crate::mirror::Mirror {
            site: svc.site.clone(),
        };
        let pool = p.name.clone();
        if let Ok(st) = crate::work::blocking(move || crate::status::pool(&m, &pool)).await {
            out.push((p.name, st));
        }
    }
    out
}

/// The site's metrics in the Prometheus (OpenMetrics) text format.
pub async fn render(svc: &Arc<Api>) -> String {
    let site = svc.site.clone();
    let mut reg = Registry::with_prefix("tern");
    let info = Family::<Labels, Gauge>::default();
    reg.register(
        "site_info",
        "The site: name, id and version (always 1)",
        info.clone(),
    );
    info.get_or_create(&labels(&[
        ("site", &site.site_name),
        ("site_id", &site.site_id),
        ("version", env!("CARGO_PKG_VERSION")),
    ]))
    .set(1);
    let uptime = FGauge::default();
    reg.register(
        "site_uptime_seconds",
        "Seconds since ternd started",
        uptime.clone(),
    );
    uptime.set(site.started.elapsed().as_secs_f64());
    let budget = &svc.budget;
    let (in_use, total) = (Gauge::<i64>::default(), Gauge::<i64>::default());
    reg.register(
        "api_stream_memory_bytes",
        "Bytes read for API read streams and not yet taken by their clients",
        in_use.clone(),
    );
    reg.register(
        "api_stream_memory_budget_bytes",
        "The budget those bytes are held within (--api-memory-budget)",
        total.clone(),
    );
    in_use.set(budget.in_use() as i64);
    total.set(budget.total() as i64);

    // API I/O counters (gRPC reads and writes), per pool.
    let api_ops = Family::<Labels, Counter>::default();
    let api_bytes = Family::<Labels, Counter>::default();
    reg.register(
        "api_io_ops",
        "Reads and writes served over the API",
        api_ops.clone(),
    );
    reg.register(
        "api_io_bytes",
        "Bytes read and written over the API",
        api_bytes.clone(),
    );
    for (pool, c) in svc.counters.all() {
        use std::sync::atomic::Ordering::Relaxed;
        for (op, n, b) in [
            ("read", c.read_ops.load(Relaxed), c.read_bytes.load(Relaxed)),
            (
                "write",
                c.write_ops.load(Relaxed),
                c.write_bytes.load(Relaxed),
            ),
        ] {
            let l = labels(&[("pool", &pool), ("op", op)]);
            api_ops.get_or_create(&l).inc_by(n);
            api_bytes.get_or_create(&l).inc_by(b);
        }
    }
    // NBD I/O: counters and latency histograms kept since start.
    reg.register("nbd_requests", "NBD requests served", site.io.ops.clone());
    reg.register(
        "nbd_bytes",
        "NBD bytes read and written",
        site.io.bytes.clone(),
    );
    reg.register(
        "nbd_request_duration_seconds",
        "NBD request latency, from the request to its reply",
        site.io.latency.clone(),
    );

    // Pools, images, journals.
    let images = Family::<Labels, Gauge>::default();
    let journal_bytes = Family::<Labels, Gauge>::default();
    let journal_behind = Family::<Labels, Gauge>::default();
    reg.register("pool_images", "Images in the pool", images.clone());
    reg.register(
        "journal_bytes",
        "Bytes in an image's journal segments",
        journal_bytes.clone(),
    );
    reg.register(
        "journal_client_entries_behind",
        "Journal entries a client (the local image or a peer) has not committed",
        journal_behind.clone(),
    );
    let st2 = site.clone();
    let journals = crate::work::blocking(move || {
        let mut out = Vec::new();
        for p in st2.store.pool_list().unwrap_or_default() {
            let list = st2.store.image_list(&p.name).unwrap_or_default();
            out.push((p.name.clone(), list.len(), Vec::new()));
            for img in list {
                if !img.features.has(tern_types::Features::JOURNALING) {
                    continue;
                }
                if let Ok(j) = st2.store.journal(&p.name, &img.name) {
                    let i = j.info();
                    let clients: Vec<(String, u64)> = i
                        .clients
                        .iter()
                        .map(|c| (c.id.clone(), c.entries_behind))
                        .collect();
                    if let Some(last) = out.last_mut() {
                        last.2.push((img.name.clone(), i.bytes, clients));
                    }
                }
            }
        }
        Ok::<_, Error>(out)
    })
    .await
    .unwrap_or_default();
    for (pool, n, js) in journals {
        images
            .get_or_create(&labels(&[("pool", &pool)]))
            .set(n as i64);
        for (image, bytes, clients) in js {
            journal_bytes
                .get_or_create(&labels(&[("pool", &pool), ("image", &image)]))
                .set(bytes as i64);
            for (client, behind) in clients {
                journal_behind
                    .get_or_create(&labels(&[
                        ("pool", &pool),
                        ("image", &image),
                        ("client", &client),
                    ]))
                    .set(behind as i64);
            }
        }
    }

    // Mirroring: what the daemons reported, as pool status shows it.
    let pool_health = Family::<Labels, FGauge>::default();
    let daemon_up = Family::<Labels, FGauge>::default();
    let daemons_up = Family::<Labels, FGauge>::default();
    let daemon_age = Family::<Labels, FGauge>::default();
    let img_primary = Family::<Labels, FGauge>::default();
    let img_state = Family::<Labels, FGauge>::default();
    let img_up = Family::<Labels, FGauge>::default();
    let img_lag = Family::<Labels, FGauge>::default();
    let img_behind = Family::<Labels, FGauge>::default();
    let img_bytes = Family::<Labels, FGauge>::default();
    let img_progress = Family::<Labels, FGauge>::default();
    let img_last_sync = Family::<Labels, FGauge>::default();
    reg.register(
        "mirror_pool_health",
        "Mirroring health of a pool: 0 OK, 1 WARNING, 2 ERROR (kind: health, daemon, image)",
        pool_health.clone(),
    );
    reg.register(
        "mirror_daemon_up",
        "1 while a mirror daemon of this site heartbeats, 0 once its heartbeat is stale",
        daemon_up.clone(),
    );
    reg.register(
        "mirror_daemons_up",
        "Mirror daemons of this site heartbeating for the pool (0: none is replicating into it)",
        daemons_up.clone(),
    );
    reg.register(
        "mirror_daemon_heartbeat_age_seconds",
        "Seconds since the daemon's last heartbeat reached the site",
        daemon_age.clone(),
    );
    reg.register(
        "mirror_image_primary",
        "1 if the image is primary at this site",
        img_primary.clone(),
    );
    reg.register(
        "mirror_image_state",
        "1 for the state a site's daemon reports for the image (replaying, syncing, stopped, error, ...)",
        img_state.clone(),
    );
    reg.register(
        "mirror_image_up",
        "1 while the reporting daemon is up",
        img_up.clone(),
    );
    reg.register(
        "mirror_image_replay_lag_seconds",
        "Replication lag of a copy: the age of the newest primary write it lacks (the RPO estimate)",
        img_lag.clone(),
    );
    reg.register(
        "mirror_image_entries_behind",
        "Journal entries a copy has not replayed yet",
        img_behind.clone(),
    );
    reg.register(
        "mirror_image_last_sync_bytes",
        "Bytes copied by the copy's last sync",
        img_bytes.clone(),
    );
    reg.register(
        "mirror_image_sync_progress",
        "Progress of a running sync, 0..1",
        img_progress.clone(),
    );
    reg.register(
        "mirror_image_last_sync_timestamp_seconds",
        "When the copy last completed a sync (unix seconds)",
        img_last_sync.clone(),
    );
    let now_ms = crate::mirror::now_ms();
    for (pool, st) in mirrored_pools(svc).await {
        for (kind, h) in [
            ("health", st.health),
            ("daemon", st.daemon_health),
            ("image", st.image_health),
        ] {
            pool_health
                .get_or_create(&labels(&[("pool", &pool), ("kind", kind)]))
                .set(health_value(h));
        }
        daemons_up
            .get_or_create(&labels(&[("pool", &pool)]))
            .set(st.daemons.iter().filter(|d| d.up).count() as f64);
        for d in &st.daemons {
            let l = labels(&[
                ("pool", &pool),
                ("site", &d.site_name),
                ("daemon", &d.service_id),
            ]);
            daemon_up
                .get_or_create(&l)
                .set(if d.up { 1.0 } else { 0.0 });
            daemon_age
                .get_or_create(&l)
                .set((now_ms / 1000).saturating_sub(d.last_heartbeat) as f64);
        }
        for img in &st.images {
            let l = &img.local;
            let primary =
                l.reason == StatusReason::Primary || l.description == "local image is primary";
            img_primary
                .get_or_create(&labels(&[("pool", &pool), ("image", &img.name)]))
                .set(if primary { 1.0 } else { 0.0 });
            for s in std::iter::once(&img.local).chain(img.peer_sites.iter()) {
                if s.site_name.is_empty() {
                    continue;
                }
                let l = labels(&[
                    ("pool", &pool),
                    ("image", &img.name),
                    ("site", &s.site_name),
                ]);
                let state = shown_state(s);
                let mut ls = l.clone();
                ls.push(("state".into(), state.into()));
                img_state.get_or_create(&ls).set(1.0);
                img_up.get_or_create(&l).set(if s.up { 1.0 } else { 0.0 });
                if s.reason == StatusReason::Primary {
                    continue;
                }
                img_lag.get_or_create(&l).set(s.lag_seconds);
                if let Some(b) = entries_behind(&s.description) {
                    img_behind.get_or_create(&l).set(b);
                }
                img_bytes.get_or_create(&l).set(s.bytes_synced as f64);
                img_progress.get_or_create(&l).set(s.progress);
                if s.last_sync > 0 {
                    img_last_sync.get_or_create(&l).set(s.last_sync as f64);
                }
            }
        }
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ago(now: u64, t: u64) -> String {
    if t == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(t);
    match d {
        0..=1 => "just now".into(),
        2..=119 => format!("{d} s ago"),
        120..=7199 => format!("{} min ago", d / 60),
        _ => format!("{} h ago", d / 3600),
    }
}

/// The read-only status page: sites, pools, images, state, lag, last
/// sync. One self-contained HTML document (no scripts, fonts or images
/// from anywhere), refreshing itself every 2 s.
pub async fn page(svc: &Arc<Api>) -> String {
    let site = svc.site.clone();
    let now = crate::site::now_secs();
    let pools = mirrored_pools(svc).await;
    let mut h = String::new();
    h.push_str(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="2"><meta name="viewport" content="width=device-width">
<title>tern · "#,
    );
    h.push_str(&esc(&site.site_name));
    h.push_str(
        r#"</title><style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.sub{color:#57606a;margin-bottom:16px}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0002}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e5e7eb;vertical-align:top}
th{background:#eef1f4;font-weight:600}
.b{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;color:#fff}
.OK,.replaying,.stopped{background:#1a7f37}.WARNING,.syncing,.starting_replay,.unknown{background:#bf8700}
.ERROR,.error,.down{background:#cf222e}.primary{background:#0969da}
.bar{width:120px;height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden;display:inline-block;vertical-align:middle}
.bar i{display:block;height:100%;background:#0969da}
.d{color:#57606a;font-size:12px;max-width:520px;word-break:break-word}
</style></head><body>"#,
    );
    h.push_str(&format!(
        "<h1>tern site {}</h1><div class=\"sub\">site id {} · ternd {} · up {} s · page generated {}</div>",
        esc(&site.site_name),
        esc(&site.site_id),
        env!("CARGO_PKG_VERSION"),
        site.started.elapsed().as_secs(),
        tern_types::time::datetime(now)
    ));
    if pools.is_empty() {
        h.push_str("<p>No pool has mirroring enabled.</p>");
    }
    for (pool, st) in &pools {
        h.push_str(&format!(
            "<h2>Pool {} <span class=\"b {}\">{}</span></h2>",
            esc(pool),
            st.health,
            st.health
        ));
        h.push_str(&format!(
            "<div class=\"sub\">daemon health <span class=\"b {0}\">{0}</span> · image health <span class=\"b {1}\">{1}</span> · ",
            st.daemon_health, st.image_health
        ));
        if st.daemons.is_empty() {
            h.push_str("no mirror daemon has reported");
        }
        for d in &st.daemons {
            h.push_str(&format!(
                "mirror daemon {} on {} ({}, heartbeat {}) ",
                esc(&d.service_id),
                esc(&d.hostname),
                if d.up { "up" } else { "DOWN" },
                ago(now, d.last_heartbeat)
            ));
        }
        h.push_str("</div><table><tr><th>image</th><th>site</th><th>state</th><th>lag</th><th>last sync</th><th>progress</th><th>description</th></tr>");
        for img in &st.images {
            let rows: Vec<&MirrorSiteStatus> = std::iter::once(&img.local)
                .chain(img.peer_sites.iter())
                .collect();
            for (i, s) in rows.iter().enumerate() {
                let primary = s.reason == StatusReason::Primary;
                let label = if primary { "primary" } else { shown_state(s) };
                let class = label;
                h.push_str("<tr>");
                if i == 0 {
                    h.push_str(&format!(
                        "<td rowspan=\"{}\"><b>{}</b></td>",
                        rows.len(),
                        esc(&img.name)
                    ));
                }
                let progress = if s.state == MirrorStatusState::Syncing {
                    format!(
                        "<span class=\"bar\"><i style=\"width:{:.0}%\"></i></span> {:.0}%",
                        s.progress * 100.0,
                        s.progress * 100.0
                    )
                } else {
                    String::new()
                };
                let lag = if primary {
                    String::new()
                } else {
                    format!("{:.1} s", s.lag_seconds)
                };
                let mut desc = s.description.clone();
                if desc.len() > 220 {
                    let mut cut = 220;
                    while !desc.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    desc.truncate(cut);
                    desc.push('…');
                }
                h.push_str(&format!(
                    "<td>{}</td><td><span class=\"b {}\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td class=\"d\">{}</td></tr>",
                    esc(&s.site_name),
                    esc(class),
                    esc(label),
                    lag,
                    if primary { String::new() } else { ago(now, s.last_sync) },
                    progress,
                    esc(&desc)
                ));
            }
        }
        h.push_str("</table>");
    }
    h.push_str("<p class=\"sub\">Read-only. Metrics: <a href=\"/metrics\">/metrics</a>.</p></body></html>\n");
    h
}
