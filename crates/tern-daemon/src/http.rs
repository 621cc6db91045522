//! Listening: binding with an error a person can act on, the loopback rule
//! of the unauthenticated listeners, and serving a small HTTP app as one of
//! the process's tasks.

use crate::Tasks;
use std::net::SocketAddr;
use tern_types::ErrorKind;
use tern_types::error::Error;
use tokio::net::TcpListener;

/// Binds `addr`; `what` names the listener in the error ("HTTP", "NBD"),
/// or is empty for the daemon's main one. Returns the listener and the
/// address it got (port 0 picks one).
pub async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), Error> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        let message = if what.is_empty() {
            format!("cannot listen on {addr}: {e}")
        } else {
            format!("cannot listen for {what} on {addr}: {e}")
        };
        Error::with_source(ErrorKind::Unavailable, message, e)
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::with_source(ErrorKind::Internal, e.to_string(), e))?;
    Ok((listener, local))
}

/// An unauthenticated listener (`flag` ADDR) stays on loopback unless
/// `allow_flag` was given. `what` says what would be exposed, as the
/// subject of "have no authentication".
pub fn refuse_remote(
    addr: SocketAddr,
    allowed: bool,
    flag: &str,
    what: &str,
    allow_flag: &str,
) -> Result<(), Error> {
    if addr.ip().is_loopback() || allowed {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{flag} {addr} is not a loopback address: {what} have no authentication; \
         add {allow_flag} to serve them there anyway"
    )))
}

/// Serves `app` as a task of `tasks` until they stop; connections in
/// progress then finish their request. `name` says which listener failed
/// in the log.
pub fn serve<L>(tasks: &Tasks, listener: L, app: axum::Router, name: &'static str)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let stop = tasks.stopping();
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %tern_types::error::chain(&e), "{name} listener failed");
        }
    });
}
