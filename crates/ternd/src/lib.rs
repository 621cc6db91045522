//! The tern site daemon as a library: the binary only parses flags and calls
//! [`run`], so tests and the lab can reach the same code.

pub mod auth;
pub mod locks;
pub mod options;
pub mod service;
pub mod site;

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
    let site = tokio::task::spawn_blocking(move || Site::open_or_init(&data, &name))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
    let site = Arc::new(site);
    if let Some(n) = &opts.site_name
        && n != &site.site_name
    {
        tracing::warn!(stored = %site.site_name, asked = %n, "--site-name differs from the name this site was created with; keeping the stored one");
    }
    service::clean_interrupted_imports(&site);

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
    site.store
        .kv_put(KvTable::Site, "endpoints", &endpoint)
        .map_err(|e| Error::new(e.kind(), e.to_string()))?;
    write_client_files(&site, &opts, &endpoint)?;

    let svc = tern_proto::v1::site_server::SiteServer::new(service::Service::new(site.clone()))
        .max_decoding_message_size(tern_proto::MAX_MESSAGE)
        .max_encoding_message_size(tern_proto::MAX_MESSAGE);
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    if !opts.insecure {
        let identity = tonic::transport::Identity::from_pem(&site.tls.cert_pem, &site.tls.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| Error::new(ErrorKind::Internal, format!("TLS setup: {e}")))?;
    }
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
    // serve_with_incoming ignores the builder's tcp_nodelay: set it here, or
    // small replies wait out delayed ACKs (40 ms per 4 KiB read).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    builder
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("server failed: {e}")))?;
    tracing::info!("shutting down: flushing open images");
    let s = site.clone();
    let _ = tokio::task::spawn_blocking(move || s.store.flush_all()).await;
    let _ = std::fs::remove_file(&addr_file);
    tracing::info!("ternd stopped");
    Ok(())
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
