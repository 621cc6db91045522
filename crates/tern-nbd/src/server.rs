//! Accept loop, per-connection lifecycle and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::device::Exports;
use crate::handshake::{self, HandshakeEnd, OpenDevice};
use crate::transmission;
use crate::wire::WireError;

pub struct ServerConfig {
    /// Offer NBD_OPT_STARTTLS with this acceptor.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Refuse every option but STARTTLS and ABORT until TLS is up (FORCEDTLS mode).
    pub require_tls: bool,
    /// Requests served concurrently per connection; further requests are not read
    /// from the socket until one completes.
    pub max_in_flight: usize,
    /// A client must reach transmission (or leave) within this time.
    pub handshake_timeout: Duration,
    /// READ/WRITE payload bytes in flight across every connection of the
    /// server. A connection that would exceed it stops reading requests
    /// until replies drain, so the total, not only each connection's
    /// share, stays bounded.
    pub memory: Arc<MemoryBudget>,
    /// Connections served at once; further clients are closed at accept.
    pub max_connections: usize,
    /// A client that takes no reply bytes for this long is disconnected,
    /// so one that pipelines reads and never reads the answers cannot hold
    /// the shared budget for ever.
    pub reply_timeout: Duration,
}

/// The server-wide byte budget, one permit per byte.
pub struct MemoryBudget {
    pub(crate) sem: Arc<tokio::sync::Semaphore>,
    /// Most one connection may hold: half the budget (at least one
    /// maximal payload), so one connection never takes all of it.
    pub(crate) per_connection: u32,
}

impl MemoryBudget {
    /// Bytes not held by any request now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// Default for [`ServerConfig::memory`]: room for a few connections'
/// worth of large pipelined reads.
pub const DEFAULT_MEMORY_BUDGET: usize = 512 << 20;
/// Default for [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// A byte budget for [`ServerConfig::memory`], never below one maximal
/// payload (32 MiB).
pub fn memory_budget(bytes: usize) -> Arc<MemoryBudget> {
    let max = crate::wire::MAX_PAYLOAD as usize;
    let total = bytes.max(max);
    Arc::new(MemoryBudget {
        sem: Arc::new(tokio::sync::Semaphore::new(total)),
        per_connection: (total / 2).clamp(max, u32::MAX as usize) as u32,
    })
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tls: None,
            require_tls: false,
            max_in_flight: 128,
            handshake_timeout: Duration::from_secs(30),
            memory: memory_budget(DEFAULT_MEMORY_BUDGET),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            reply_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a connection ended abnormally. Every variant ends only that connection.
#[derive(Debug, Error)]
pub enum NbdError {
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("malformed message from client")]
    Wire(#[source] WireError),
    #[error("option {option} carries {len} bytes, over the limit")]
    OptionTooLarge { option: u32, len: u32 },
    #[error("connection refused during handshake: {0}")]
    Refused(String),
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("handshake did not finish in time")]
    HandshakeTimeout,
    #[error("the client stopped taking replies (or went away)")]
    ReplyTimeout,
    #[error("i/o error during handshake")]
    HandshakeIo(#[source] std::io::Error),
    #[error("write payload of {0} bytes exceeds the 32 MiB limit")]
    PayloadTooLarge(u32),
    #[error("i/o error during transmission")]
    TransmissionIo(#[source] std::io::Error),
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// The connection's stream; boxed because STARTTLS swaps it for a TLS stream mid-handshake.
pub(crate) type BoxIo = Box<dyn Io>;

/// Level-triggered shutdown signal shared by every connection of a server.
#[derive(Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub async fn wait(&mut self) {
        // A dropped sender means nobody can ask for shutdown any more.
        if self.0.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// Serves one client on an already-accepted stream until it disconnects.
pub async fn serve_connection<S>(
    io: S,
    exports: Arc<dyn Exports>,
    cfg: Arc<ServerConfig>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection_until(io, exports, cfg, std::future::pending()).await
}

/// Like [`serve_connection`], but when `shutdown` completes the connection stops
/// reading requests, answers those in flight, and closes.
pub async fn serve_connection_until<S>(
    io: S,
    exports: Arc<dyn Exports>,
    cfg: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = watch::channel(false);
    let trigger = tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let res = connection(Box::new(io), exports, cfg, Shutdown(rx)).await;
    trigger.abort();
    res
}

async fn connection(
    io: BoxIo,
    exports: Arc<dyn Exports>,
    cfg: Arc<ServerConfig>,
    mut shutdown: Shutdown,
) -> Result<(), NbdError> {
    let mut open = OpenDevice::default();
    let hs = tokio::select! {
        biased;
        _ = shutdown.wait() => Ok(Ok(HandshakeEnd::Closed)),
        r = tokio::time::timeout(
            cfg.handshake_timeout,
            handshake::negotiate(io, exports.as_ref(), &cfg, &mut open),
        ) => r,
    };
    let res = match hs {
        Err(_) => Err(NbdError::HandshakeTimeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok(HandshakeEnd::Closed)) => Ok(()),
        Ok(Ok(HandshakeEnd::Transmission(io, neg))) => {
            transmission::run(io, neg, &cfg, shutdown).await
        }
    };
    // The device is closed only after every request on it has been answered.
    open.close().await;
    res
}

/// Accepts NBD clients on `listener` until `shutdown` completes, then waits for
/// every connection to finish its in-flight requests.
pub async fn serve(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    cfg: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (tx, rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    info!(addr = ?listener.local_addr().ok(), "nbd: listening");
    let mut errors = AcceptErrors::default();
    let mut refused = AcceptErrors::default();
    loop {
        while conns.try_join_next().is_some() {}
        let (sock, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE/ECONNABORTED: transient, so back off
                    // rather than exit, and rather than spin or flood the log.
                    let pause = errors.failed(|n| warn!(error = %e, failures = n, "nbd: accept failed"));
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            },
        };
        errors.ok();
        // Connections that ended while accept waited no longer count.
        while conns.try_join_next().is_some() {}
        if conns.len() >= cfg.max_connections {
            // Closed unanswered: the client sees EOF before the greeting.
            refused.failed(|n| {
                warn!(%peer, limit = cfg.max_connections, refused = n,
                    "nbd: connection limit reached, closing new connections")
            });
            drop(sock);
            continue;
        }
        // Small request/reply messages: Nagle would add ~40 ms at QD1.
        let _ = sock.set_nodelay(true);
        let (exports, cfg, rx) = (exports.clone(), cfg.clone(), rx.clone());
        conns.spawn(async move {
            info!(%peer, "nbd: client connected");
            match connection(Box::new(sock), exports, cfg, Shutdown(rx)).await {
                Ok(()) => info!(%peer, "nbd: client disconnected"),
                Err(e) => info!(%peer, error = %e, "nbd: connection closed on error"),
            }
        });
    }
    let _ = tx.send(true);
    debug!(
        connections = conns.len(),
        "nbd: shutting down, draining connections"
    );
    while conns.join_next().await.is_some() {}
    info!("nbd: stopped");
    Ok(())
}

/// Backoff and log rate for a failing accept loop: at most one line per
/// [`AcceptErrors::LOG_EVERY`] (with the count since the last), and a
/// pause that doubles from 10 ms to 1 s while failures continue.
#[derive(Default)]
pub struct AcceptErrors {
    streak: u32,
    since_log: u64,
    last_log: Option<std::time::Instant>,
}

impl AcceptErrors {
    pub const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Records a failure; calls `log` with the failures since the last
    /// line if a line is due; returns how long to pause.
    pub fn failed(&mut self, log: impl FnOnce(u64)) -> Duration {
        self.since_log += 1;
        let now = std::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Self::LOG_EVERY)
        {
            log(self.since_log);
            self.since_log = 0;
            self.last_log = Some(now);
        }
        let pause = Duration::from_millis(10u64 << self.streak.min(7)).min(Duration::from_secs(1));
        self.streak += 1;
        pause
    }

    pub fn ok(&mut self) {
        self.streak = 0;
    }
}
