//! Accepting connections without letting callers exhaust the daemon: a cap
//! per listener, a deadline for the handshake (TLS, or a first byte on a
//! plaintext listener), an idle deadline, and accept errors (EMFILE) met
//! with backoff and one log line per interval instead of a flood.

use futures::task::AtomicWaker;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tern_daemon::Tasks;
use tern_nbd::AcceptErrors;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// TLS handshake (or, in plaintext, the client's first byte) within this.
    pub handshake_timeout: Duration,
    /// A connection with nothing in progress for this long is closed.
    pub idle_timeout: Duration,
}

/// How a connection counts as busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Any byte read or written (HTTP/1: nothing flows between requests).
    Bytes,
    /// A request in progress, tracked by [`ActivityLayer`] (HTTP/2: the
    /// keepalive pings would otherwise keep every connection "busy").
    Requests,
}

/// What a connection shares with the requests made on it.
#[derive(Debug)]
pub struct ConnState {
    active: AtomicUsize,
    last: Mutex<Instant>,
    /// Set by [`ConnState::kill`]: the connection ends at its next poll.
    killed: AtomicBool,
    reader: AtomicWaker,
}

impl ConnState {
    fn new() -> Arc<ConnState> {
        Arc::new(ConnState {
            active: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            killed: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        })
    }

    /// Closes the connection (and with it every stream on it), as the
    /// server does when one of its streams' clients stopped reading.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.reader.wake();
    }

    fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    fn touch(&self) {
        *self.last.lock() = Instant::now();
    }

    /// Marks a request in progress until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.touch();
        ActiveGuard(self.clone())
    }
}

pub struct ActiveGuard(Arc<ConnState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection info tonic puts into every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo(pub Arc<ConnState>);

/// An accepted connection: holds its listener slot until dropped and ends
/// itself (reads return EOF) once idle past the deadline.
pub struct Conn<S> {
    io: S,
    _slot: OwnedSemaphorePermit,
    state: Arc<ConnState>,
    idle: Idle,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<S> Conn<S> {
    fn new(io: S, slot: OwnedSemaphorePermit, idle: Idle, timeout: Duration) -> Conn<S> {
        Conn {
            io,
            _slot: slot,
            state: ConnState::new(),
            idle,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Whether the idle deadline has passed; otherwise arms the timer so
    /// the reading task wakes when it would.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = if self.state.active.load(Ordering::SeqCst) > 0 {
            // Look again later: the request may end with nothing to read.
            Instant::now() + self.timeout
        } else {
            *self.state.last.lock() + self.timeout
        };
        if Instant::now() >= deadline {
            return true;
        }
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        let _ = self.timer.as_mut().poll(cx);
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.reader.register(cx.waker());
        if this.state.killed() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if this.idle == Idle::Bytes && buf.filled().len() > before {
                    this.state.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if this.expired(cx) {
                    // EOF: the server side closes the connection as it
                    // would for a client that left.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.state.killed() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        let r = Pin::new(&mut this.io).poll_write(cx, data);
        if this.idle == Idle::Bytes && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo(self.state.clone())
    }
}

/// The API's stream: TLS, or plaintext under `--insecure`.
pub enum ApiIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ApiIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_write(cx, b),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts API connections: each takes a slot (or is closed at once), must
/// finish its TLS handshake (or send a first byte) in time, and only then
/// reaches the gRPC server through the returned stream.
pub fn api_incoming(
    tasks: &Tasks,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn<ApiIo>>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (handshakes, stopping) = (tasks.clone(), tasks.stopping());
    tasks.spawn(async move {
        tokio::pin!(stopping);
        let mut errors = AcceptErrors::default();
        let mut refused = AcceptErrors::default();
        loop {
            let (sock, peer) = tokio::select! {
                _ = &mut stopping => return,
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        let pause = errors.failed(|n| {
                            tracing::warn!(error = %e, failures = n, "api: accept failed")
                        });
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                },
            };
            errors.ok();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused.failed(|n| {
                    tracing::warn!(%peer, limit = limits.max_connections, refused = n,
                        "api: connection limit reached, closing new connections")
                });
                continue;
            };
            let _ = sock.set_nodelay(true);
            let (tx, tls) = (tx.clone(), tls.clone());
            handshakes.spawn(async move {
                let hs = async {
                    match tls {
                        Some(acc) => acc.accept(sock).await.map(|s| ApiIo::Tls(Box::new(s))),
                        None => {
                            // The HTTP/2 preface starts with a byte; a peer
                            // that sends none holds a slot for nothing.
                            let mut b = [0u8; 1];
                            sock.peek(&mut b).await?;
                            Ok(ApiIo::Plain(sock))
                        }
                    }
                };
                match tokio::time::timeout(limits.handshake_timeout, hs).await {
                    Ok(Ok(io)) => {
                        let conn = Conn::new(io, slot, Idle::Requests, limits.idle_timeout);
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "api: handshake failed"),
                    Err(_) => tracing::debug!(%peer, "api: handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The HTTP (metrics, status page) listener for axum: slots, backoff, and
/// a byte-activity idle deadline that also bounds a silent new connection.
pub struct HttpListener {
    pub listener: TcpListener,
    pub slots: Arc<Semaphore>,
    pub limits: Limits,
    pub errors: AcceptErrors,
    pub refused: AcceptErrors,
}

impl HttpListener {
    pub fn new(listener: TcpListener, limits: Limits) -> HttpListener {
        HttpListener {
            listener,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            limits,
            errors: AcceptErrors::default(),
            refused: AcceptErrors::default(),
        }
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Conn<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (sock, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    let pause = self.errors.failed(
                        |n| tracing::warn!(error = %e, failures = n, "http: accept failed"),
                    );
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            self.errors.ok();
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                let limit = self.limits.max_connections;
                self.refused.failed(|n| {
                    tracing::warn!(%peer, limit, refused = n,
                        "http: connection limit reached, closing new connections")
                });
                continue;
            };
            // A first request is due as soon as a connection opens, so the
            // shorter deadline applies until bytes flow.
            let t = self.limits.handshake_timeout.min(self.limits.idle_timeout);
            let conn = Conn::new(sock, slot, Idle::Bytes, self.limits.idle_timeout);
            let early = self.limits.idle_timeout - t;
            *conn.state.last.lock() = Instant::now()
                .checked_sub(early)
                .unwrap_or_else(Instant::now);
            return (conn, peer);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Marks each gRPC request as activity on its connection for as long as
/// its response (stream) is open, so [`Idle::Requests`] closes only
/// connections with nothing in progress.
#[derive(Clone, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Activity<S>;
    fn layer(&self, inner: S) -> Activity<S> {
        Activity { inner }
    }
}

#[derive(Clone)]
pub struct Activity<S> {
    inner: S,
}

type HttpReq<B> = tonic::codegen::http::Request<B>;
type HttpResp = tonic::codegen::http::Response<tonic::body::Body>;

impl<S, B> tower::Service<HttpReq<B>> for Activity<S>
where
    S: tower::Service<HttpReq<B>, Response = HttpResp> + Send,
    S::Future: Send + 'static,
{
    type Response = HttpResp;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResp, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpReq<B>) -> Self::Future {
        let guard = req.extensions().get::<ConnInfo>().map(|c| c.0.begin());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match guard {
                Some(g) => resp.map(|b| tonic::body::Body::new(Tracked { inner: b, _g: g })),
                None => resp,
            })
        })
    }
}

/// A response body that keeps its request counted until it is done.
struct Tracked {
    inner: tonic::body::Body,
    _g: ActiveGuard,
}

impl http_body::Body for Tracked {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
