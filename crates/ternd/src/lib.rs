//! The tern site daemon as a library: the binary only parses flags and calls
//! [`run`], so tests and the lab can reach the same code.

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod budget;
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
pub mod work;

use site::Site;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tern_client::config::{ClusterConfig, Keyring, KeyringEntry, TlsMode, write_private};
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

/// Starts the site and serves until SIGTERM or SIGINT.
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
    site.apply_journal_config()?;

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot listen on {}: {e}", opts.listen),
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let endpoint = addr.to_string();
    site.store.kv_put(KvTable::Site, "endpoints", &endpoint)?;
    write_client_files(&site, &opts, &endpoint)?;

    let locks = Arc::new(locks::Locks::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    if opts.nbd_listen.is_none() {
        site.store.kv_delete(KvTable::Site, "nbd_endpoint")?;
    }
    // Mirror snapshot schedules: a pass every second.
    {
        let m = mirror::Mirror { site: site.clone() };
        let m = Arc::new(m);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let m = m.clone();
                let r = work::blocking(move || m.run_schedules(site::now_secs())).await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "snapshot schedules");
                }
            }
        });
    }
    let nbd_task = match opts.nbd_listen {
        Some(addr) => Some(start_nbd(&site, &locks, addr, &opts, stopped(stop_rx.clone())).await?),
        None => None,
    };
    let budget = budget::StreamBudget::new(opts.api_memory_budget, opts.stall_timeout);
    let api = Arc::new(api::Api::new(site.clone(), locks.clone(), budget));
    let http_task = match opts.http_listen {
        Some(addr) => Some(start_http(api.clone(), addr, &opts, stopped(stop_rx.clone())).await?),
        None => None,
    };
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
        Some(api_tls_acceptor(&site).map_err(|e| Error::new(ErrorKind::Internal, e))?)
    };
    // Written after the listener is up: tests and scripts wait for this file.
    let addr_file = opts.data.join("ternd.addr");
    std::fs::write(&addr_file, format!("{endpoint}\n")).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("cannot write {}: {e}", addr_file.display()),
        )
    })?;
    tracing::info!(
        site = %site.site_name, site_id = %site.site_id, %endpoint,
        tls = !opts.insecure, fingerprint = %site.tls.fingerprint, "ternd serving"
    );
    // The accept loop sets TCP_NODELAY itself (serve_with_incoming ignores
    // the builder's): small replies must not wait out delayed ACKs.
    let incoming = listen::api_incoming(listener, tls, opts.api_limits);
    builder
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
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("server failed: {e}")))?;
    if let Some(t) = nbd_task {
        let _ = t.await;
    }
    if let Some(t) = http_task {
        let _ = t.await;
    }
    tracing::info!("shutting down: flushing open images");
    let s = site.clone();
    if let Err(e) = work::blocking(move || s.store.flush_all()).await {
        tracing::error!(error = %e, "flushing open images at shutdown");
    }
    let _ = std::fs::remove_file(&addr_file);
    tracing::info!("ternd stopped");
    Ok(())
}

/// Starts the NBD listener. Plaintext NBD has no authentication, so on a
/// non-loopback address clients must upgrade to TLS first (STARTTLS).
async fn start_nbd(
    site: &Arc<Site>,
    locks: &Arc<locks::Locks>,
    addr: SocketAddr,
    opts: &Options,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot listen for NBD on {addr}: {e}"),
        )
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let acceptor = nbd::tls_acceptor(site).map_err(|e| Error::new(ErrorKind::Internal, e))?;
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
    });
    site.store
        .kv_put(KvTable::Site, "nbd_endpoint", &local.to_string())?;
    let f = opts.data.join("nbd.addr");
    std::fs::write(&f, format!("{local}\n")).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("cannot write {}: {e}", f.display()),
        )
    })?;
    tracing::info!(endpoint = %local, tls_required = cfg.require_tls, "nbd serving");
    Ok(tokio::spawn(async move {
        if let Err(e) = tern_nbd::serve(listener, exports, cfg, stop).await {
            tracing::error!(error = %e, "nbd listener failed");
        }
    }))
}

/// Serves /metrics (Prometheus) and / (the status page). Read-only and
/// unauthenticated, so loopback only unless asked for explicitly.
async fn start_http(
    svc: Arc<api::Api>,
    addr: SocketAddr,
    opts: &Options,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    if !addr.ip().is_loopback() && !opts.http_allow_remote {
        return Err(Error::invalid(format!(
            "--http-listen {addr} is not a loopback address: the metrics and status page have no \
             authentication; add --http-allow-remote to serve them there anyway"
        )));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot listen for HTTP on {addr}: {e}"),
        )
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    use axum::response::IntoResponse;
    let m = svc.clone();
    let p = svc.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics::render(&m).await,
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/",
            axum::routing::get(move || {
                let p = p.clone();
                async move { axum::response::Html(metrics::page(&p).await).into_response() }
            }),
        );
    let f = opts.data.join("http.addr");
    std::fs::write(&f, format!("{local}\n")).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("cannot write {}: {e}", f.display()),
        )
    })?;
    tracing::info!(endpoint = %local, "metrics and status page serving");
    let listener = listen::HttpListener::new(listener, opts.http_limits);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "http listener failed");
        }
    }))
}

/// The API's TLS configuration: the site certificate, offering HTTP/2
/// only (gRPC clients require it by ALPN).
fn api_tls_acceptor(site: &Site) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(site.tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("site certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(site.tls.key_pem.as_bytes())
        .map_err(|e| format!("site key: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("TLS setup: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Writes `<conf dir>/<cluster>.conf` and the admin keyring, so `tern
/// --cluster NAME` works at once on this machine.
fn write_client_files(site: &Site, opts: &Options, endpoint: &str) -> Result<(), Error> {
    let conf = ClusterConfig {
        cluster: opts.cluster.clone(),
        path: None,
        fsid: site.site_id.clone(),
        site_name: site.site_name.clone(),
        endpoints: vec![endpoint.to_string()],
        tls: if opts.insecure {
            TlsMode::Insecure
        } else {
            TlsMode::Pinned(site.tls.fingerprint.clone())
        },
        keyring: None,
    };
    let admin = site.get_user(site::ADMIN)?;
    let ring = Keyring {
        entries: vec![KeyringEntry {
            entity: admin.entity.clone(),
            key: site.key_of(&admin),
            caps: admin
                .caps
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
        }],
    };
    let conf_path = opts.conf_dir.join(format!("{}.conf", opts.cluster));
    let ring_path = opts
        .conf_dir
        .join(format!("{}.{}.keyring", opts.cluster, site::ADMIN));
    let werr = |p: &std::path::Path, e: std::io::Error| {
        Error::new(
            ErrorKind::Internal,
            format!("cannot write {}: {e}", p.display()),
        )
    };
    write_private(&conf_path, &conf.render()).map_err(|e| werr(&conf_path, e))?;
    write_private(&ring_path, &ring.render()).map_err(|e| werr(&ring_path, e))?;
    tracing::info!(conf = %conf_path.display(), keyring = %ring_path.display(), "client config written");
    Ok(())
}
