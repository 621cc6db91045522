//! The daemon's Prometheus metrics (`--metrics-listen`, default
//! 127.0.0.1:9283, the seed's port): what each replayer last reported and what it moved.
//! The site's own exporter (ternd, 9284) shows every daemon's reports as
//! the site received them; this one is the daemon's own view, and it
//! disappears with the daemon, which is what the "daemon down" alert keys on.

use crate::DaemonState;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tern_client::ClientError;
use tern_daemon::Tasks;
use tern_daemon::metrics::{Labels, entries_behind};
use tern_types::mirror::StatusReason;

type FGauge = Gauge<f64, AtomicU64>;

async fn render(sh: &DaemonState, site: &str) -> String {
    let mut reg = Registry::with_prefix("tern_mirror_daemon");
    let info = Family::<Labels, Gauge>::default();
    reg.register(
        "info",
        "The daemon: site, service id, version (always 1)",
        info.clone(),
    );
    info.get_or_create(&vec![
        ("site".into(), site.into()),
        ("service_id".into(), sh.me.service_id.as_str().into()),
        ("version".into(), env!("CARGO_PKG_VERSION").into()),
    ])
    .set(1);
    let state = Family::<Labels, FGauge>::default();
    let lag = Family::<Labels, FGauge>::default();
    let behind = Family::<Labels, FGauge>::default();
    let progress = Family::<Labels, FGauge>::default();
    let bytes = Family::<Labels, Counter>::default();
    let entries = Family::<Labels, Counter>::default();
    reg.register(
        "image_state",
        "1 for the state this daemon reports for an image",
        state.clone(),
    );
    reg.register(
        "image_replay_lag_seconds",
        "Age of the newest primary write the local copy lacks (the RPO estimate)",
        lag.clone(),
    );
    reg.register(
        "image_entries_behind",
        "Journal entries of the primary not replayed yet",
        behind.clone(),
    );
    reg.register(
        "image_sync_progress",
        "Progress of a running sync, 0..1",
        progress.clone(),
    );
    reg.register(
        "replicated_bytes",
        "Bytes copied or replayed into local copies since the daemon started",
        bytes.clone(),
    );
    reg.register(
        "replicated_entries",
        "Journal entries replayed since the daemon started",
        entries.clone(),
    );
    let statuses: Vec<crate::Reported> = sh.statuses.lock().await.values().cloned().collect();
    for r in statuses {
        let l: Labels = vec![
            ("pool".into(), r.pool.as_str().into()),
            ("image".into(), r.image.as_str().into()),
            ("source".into(), r.source.as_str().into()),
        ];
        let mut ls = l.clone();
        let primary = r.status.reason == StatusReason::Primary;
        let st = if primary {
            "primary"
        } else {
            r.status.state.as_str()
        };
        ls.push(("state".into(), st.into()));
        state.get_or_create(&ls).set(1.0);
        if primary {
            continue;
        }
        lag.get_or_create(&l).set(r.status.lag_seconds);
        if let Some(b) = entries_behind(&r.status.description) {
            behind.get_or_create(&l).set(b);
        }
        progress.get_or_create(&l).set(r.status.progress);
    }
    let counted: Vec<_> = sh
        .replicated
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    for ((pool, image, source), (b, e)) in counted {
        let l: Labels = vec![
            ("pool".into(), pool.into()),
            ("image".into(), image.into()),
            ("source".into(), source.into()),
        ];
        bytes.get_or_create(&l).inc_by(b);
        entries.get_or_create(&l).inc_by(e);
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

pub(crate) async fn serve(
    tasks: &Tasks,
    sh: Arc<DaemonState>,
    addr: std::net::SocketAddr,
    allow_remote: bool,
    site: &str,
) -> Result<(), ClientError> {
    use tern_daemon::http;
    http::refuse_remote(
        addr,
        allow_remote,
        "--metrics-listen",
        "metrics",
        "--metrics-allow-remote",
    )?;
    let (listener, local) = http::bind(addr, "metrics").await?;
    let site = site.to_string();
    let render = move || {
        let (sh, site) = (sh.clone(), site.clone());
        async move { render(&sh, &site).await }
    };
    let app = axum::Router::new().route("/metrics", tern_daemon::metrics::route(render));
    tracing::info!(addr = %local, "metrics serving");
    http::serve(tasks, listener, app, "metrics");
    Ok(())
}
