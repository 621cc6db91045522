//! The tern site daemon as a library: the binary only parses flags and calls
//! [`run`], so tests and the lab can reach the same code.

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod budget;
pub mod client_files;
pub mod convert;
pub mod export;
pub mod import;
pub mod listen;
pub mod locks;
pub mod metrics;
pub mod mirror;
pub mod nbd;
pub mod options;
pub mod schedule;
pub mod site;
pub mod status;
pub use tern_store::testpoint;
pub mod tls;
pub mod work;

use site::Site;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tern_daemon::{SHUTDOWN_BOUND, Tasks, http};
use tern_store::KvTable;
use tern_types::ErrorKind;
use tern_types::error::Error;

pub struct Options {
    pub data: PathBuf,
    pub cluster: String,
    pub site_name: Option<String>,
    pub listen: SocketAddr,
    pub conf_dir: PathBuf,
    pub insecure: bool,
    /// NBD listener; None disables NBD.
    pub nbd_listen: Option<SocketAddr>,
    /// Metrics and status page listener; None disables it.
    pub http_listen: Option<SocketAddr>,
    /// Allow a non-loopback http listener (it has no authentication).
    pub http_allow_remote: bool,
    /// Connection cap and deadlines of the API listener.
    pub api_limits: listen::Limits,
    /// Connection cap and deadlines of the metrics/status listener.
    pub http_limits: listen::Limits,
    /// NBD connections served at once.
    pub nbd_max_connections: usize,
    /// NBD READ/WRITE payload bytes in flight across all connections.
    pub nbd_memory_budget: usize,
    /// Bytes read for API read streams (exports, diffs, syncs, journal
    /// reads) and not yet taken by their clients, all streams together.
    pub api_memory_budget: usize,
    /// A client that takes no data for this long (NBD replies, an API
    /// read stream) loses its connection.
    pub stall_timeout: std::time::Duration,
}

impl Options {
    /// Defaults for the listener limits, as `ternd` documents them.
    pub const API_MAX_CONNECTIONS: usize = 256;
    pub const HTTP_MAX_CONNECTIONS: usize = 32;
    pub const HANDSHAKE_TIMEOUT_SECS: u64 = 10;
    pub const IDLE_TIMEOUT_SECS: u64 = 300;
    pub const STALL_TIMEOUT_SECS: u64 = 60;
}

/// Starts the site and serves until SIGTERM or SIGINT; then stops taking
/// work, lets what is in progress finish (boundedly), and closes the
/// store so its journals are checkpointed.
pub async fn run(opts: Options) -> Result<(), Error> {
    if opts.insecure && !opts.listen.ip().is_loopback() {
        return Err(Error::invalid(format!(
            "--insecure serves plaintext and is allowed only on a loopback address, not {}",
            opts.listen
        )));
    }
    let data = opts.data.clone();
    let name = opts
        .site_name
        .clone()
        .unwrap_or_else(|| opts.cluster.clone());
    let site = work::blocking(move || Site::open_or_init(&data, &name)).await?;
    let site = Arc::new(site);
    if let Some(n) = &opts.site_name
        && n != &site.site_name
    {
        tracing::warn!(stored = %site.site_name, asked = %n, "--site-name differs from the name this site was created with; keeping the stored one");
    }
    import::clean_interrupted_imports(&site);
    mirror::Mirror { site: site.clone() }.settle_interrupted();
    site.apply_journal_config()?;

    let (listener, addr) = http::bind(opts.listen, "").await?;
    let endpoint = addr.to_string();
    site.store.kv_put(KvTable::Site, "endpoints", &endpoint)?;
    client_files::write(&site, &opts, &endpoint)?;

    let tasks = Tasks::new();
    tasks.stop_on_signal();
    let locks = Arc::new(locks::Locks::default());
    if opts.nbd_listen.is_none() {
        site.store.kv_delete(KvTable::Site, "nbd_endpoint")?;
    }
    start_schedules(&tasks, &site);
    if let Some(addr) = opts.nbd_listen {
        start_nbd(&tasks, &site, &locks, addr, &opts).await?;
    }
    let budget = budget::StreamBudget::new(opts.api_memory_budget, opts.stall_timeout);
    let api = Arc::new(api::Api::new(
        site.clone(),
        locks.clone(),
        budget,
        tasks.clone(),
    ));
    if let Some(addr) = opts.http_listen {
        start_http(&tasks, api.clone(), addr, &opts).await?;
    }
    let servers = api::Servers::new(api);
    let builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    // TLS is terminated by our own accept loop rather than tonic's, so a
    // handshake that never comes costs a slot for a bounded time only.
    let tls = if opts.insecure {
        None
    } else {
        Some(tls::api_acceptor(&site).map_err(|e| Error::new(ErrorKind::Internal, e))?)
    };
    // Written after the listener is up: tests and scripts wait for this file.
    let addr_file = opts.data.join("ternd.addr");
    write_addr_file(&addr_file, &endpoint)?;
    tracing::info!(
        site = %site.site_name, site_id = %site.site_id, %endpoint,
        tls = !opts.insecure, fingerprint = %site.tls.fingerprint, "ternd serving"
    );
    // The accept loop sets TCP_NODELAY itself (serve_with_incoming ignores
    // the builder's): small replies must not wait out delayed ACKs.
    let incoming = listen::api_incoming(&tasks, listener, tls, opts.api_limits);
    let serving = builder
        .layer(listen::ActivityLayer)
        .add_service(servers.site)
        .add_service(servers.pool)
        .add_service(servers.image)
        .add_service(servers.io)
        .add_service(servers.journal)
        .add_service(servers.snap)
        .add_service(servers.lock)
        .add_service(servers.auth)
        .add_service(servers.config)
        .add_service(servers.mirror)
        .add_service(servers.mirror_daemon)
        .serve_with_incoming_shutdown(incoming, tasks.stopping());
    let stop = tasks.clone();
    let server = tasks.spawn(async move {
        let r = serving.await;
        // The API is the daemon: if it fails, everything stops.
        stop.stop();
        r
    });
    tasks.stopping().await;
    tracing::info!("shutting down: waiting for requests and connections to finish");
    let left = tasks.shutdown(SHUTDOWN_BOUND).await;
    if left > 0 {
        tracing::warn!(
            tasks = left,
            "tasks still running at the shutdown deadline; closing the store without them"
        );
    }
    let served = if server.is_finished() {
        match server.await {
            Ok(r) => r.map_err(|e| {
                let message = format!("server failed: {e}");
                Error::with_source(ErrorKind::Internal, message, e)
            }),
            Err(e) => Err(Error::new(
                ErrorKind::Internal,
                format!("server failed: {e}"),
            )),
        }
    } else {
        Ok(())
    };
    tracing::info!("shutting down: flushing open images");
    if let Err(e) = work::blocking(move || close_store(site)).await {
        tracing::error!(error = %e.chain(), "flushing open images at shutdown");
    }
    let _ = std::fs::remove_file(&addr_file);
    served?;
    tracing::info!("ternd stopped");
    Ok(())
}

/// Puts the store away: every image flushed and its journal checkpointed,
/// then the clean-shutdown marker.
fn close_store(site: Arc<Site>) -> Result<(), tern_store::StoreError> {
    let store = match Arc::try_unwrap(site) {
        Ok(site) => site.store,
        Err(site) => site.store.clone(),
    };
    match Arc::try_unwrap(store) {
        Ok(store) => store.close(),
        // Work past the shutdown deadline still holds the store: the last
        // holder's drop writes the marker if nothing changed after this.
        Err(store) => store.flush_all(),
    }
}

fn write_addr_file(path: &Path, addr: &str) -> Result<(), Error> {
    std::fs::write(path, format!("{addr}\n")).map_err(|e| {
        let message = format!("cannot write {}: {e}", path.display());
        Error::with_source(ErrorKind::Internal, message, e)
    })
}

/// Mirror snapshot schedules: a pass every second.
fn start_schedules(tasks: &Tasks, site: &Arc<Site>) {
    let m = Arc::new(mirror::Mirror { site: site.clone() });
    let stopping = tasks.stopping();
    tasks.spawn(async move {
        tokio::pin!(stopping);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopping => return,
            }
            let m = m.clone();
            let r = work::blocking(move || m.run_schedules(site::now_secs())).await;
            if let Err(e) = r {
                tracing::warn!(error = %e.chain(), "snapshot schedules");
            }
        }
    });
}

/// Starts the NBD listener. Plaintext NBD has no authentication, so on a
/// non-loopback address clients must upgrade to TLS first (STARTTLS).
async fn start_nbd(
    tasks: &Tasks,
    site: &Arc<Site>,
    locks: &Arc<locks::Locks>,
    addr: SocketAddr,
    opts: &Options,
) -> Result<(), Error> {
    let (listener, local) = http::bind(addr, "NBD").await?;
    let acceptor = tls::nbd_acceptor(site).map_err(|e| Error::new(ErrorKind::Internal, e))?;
    let cfg = Arc::new(tern_nbd::ServerConfig {
        tls: Some(acceptor),
        require_tls: !local.ip().is_loopback(),
        memory: tern_nbd::memory_budget(opts.nbd_memory_budget),
        max_connections: opts.nbd_max_connections.max(1),
        handshake_timeout: opts.api_limits.handshake_timeout,
        reply_timeout: opts.stall_timeout,
        ..Default::default()
    });
    let store_for_lease = site.clone();
    let exports = Arc::new(nbd::SiteExports {
        site: site.clone(),
        locks: locks.clone(),
        lease: Arc::new(move || api::lock_lease(&store_for_lease.store)),
        tasks: tasks.clone(),
    });
    site.store
        .kv_put(KvTable::Site, "nbd_endpoint", &local.to_string())?;
    write_addr_file(&opts.data.join("nbd.addr"), &local.to_string())?;
    tracing::info!(endpoint = %local, tls_required = cfg.require_tls, "nbd serving");
    // On a stop the listener closes, each connection answers what it has
    // in flight, and its export flushes and gives its lock back.
    let stop = tasks.stopping();
    tasks.spawn(async move {
        if let Err(e) = tern_nbd::serve(listener, exports, cfg, stop).await {
            tracing::error!(error = %tern_types::error::chain(&e), "nbd listener failed");
        }
    });
    Ok(())
}

/// Serves /metrics (Prometheus) and / (the status page). Read-only and
/// unauthenticated, so loopback only unless asked for explicitly.
async fn start_http(
    tasks: &Tasks,
    svc: Arc<api::Api>,
    addr: SocketAddr,
    opts: &Options,
) -> Result<(), Error> {
    http::refuse_remote(
        addr,
        opts.http_allow_remote,
        "--http-listen",
        "the metrics and status page",
        "--http-allow-remote",
    )?;
    let (listener, local) = http::bind(addr, "HTTP").await?;
    let m = svc.clone();
    let render = move || {
        let m = m.clone();
        async move { metrics::render(&m).await }
    };
    let page = move || {
        let p = svc.clone();
        async move { axum::response::Html(metrics::page(&p).await) }
    };
    let app = axum::Router::new()
        .route("/metrics", tern_daemon::metrics::route(render))
        .route("/", axum::routing::get(page));
    write_addr_file(&opts.data.join("http.addr"), &local.to_string())?;
    tracing::info!(endpoint = %local, "metrics and status page serving");
    let listener = listen::HttpListener::new(listener, opts.http_limits);
    http::serve(tasks, listener, app, "http");
    Ok(())
}
