//! The one place in ternd where synchronous work (the store, the file
//! system) meets async code (STYLE §6).

use tern_types::ErrorKind;
use tern_types::error::Error;

/// Runs `f` on tokio's blocking pool (its size is bounded in main.rs by
/// `max_blocking_threads`) and returns what it returned, its error as the
/// boundary [`Error`]. A worker that panicked is an internal error.
pub async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, Error>
where
    T: Send + 'static,
    E: Into<Error> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(Error::new(
            ErrorKind::Internal,
            format!("worker failed: {e}"),
        )),
    }
}
