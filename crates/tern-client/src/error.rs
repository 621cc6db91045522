use tern_types::ErrorKind;

/// A failed call: the boundary error itself, so what the site said, what
/// the client met and what the daemons log are one type with one cause chain.
pub use tern_types::error::Error as ClientError;

/// The error a site's reply carries: its kind from `x-tern-error-kind`
/// when the site set it, else guessed from the gRPC code; the status itself
/// kept as the cause.
pub(crate) fn from_status(status: tonic::Status, endpoint: &str) -> ClientError {
    if let Some(kind) = status
        .metadata()
        .get(tern_proto::headers::ERROR_KIND)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse)
    {
        let message = status.message().to_string();
        return ClientError::with_source(kind, message, status);
    }
    let chain = error_chain(&status);
    if let Some(pos) = chain.find("fingerprint mismatch") {
        let message = format!(
            "refusing site at {endpoint}: TLS certificate {}. The config pins another \
             site's certificate: check tls_fingerprint in the cluster config",
            chain[pos..]
                .lines()
                .next()
                .unwrap_or("")
                .trim_end_matches(')')
        );
        return ClientError::with_source(ErrorKind::Unauthenticated, message, status);
    }
    let kind = match status.code() {
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::AlreadyExists => ErrorKind::AlreadyExists,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorKind::InvalidArgument,
        tonic::Code::Unauthenticated => ErrorKind::Unauthenticated,
        tonic::Code::PermissionDenied => ErrorKind::PermissionDenied,
        tonic::Code::FailedPrecondition => ErrorKind::Busy,
        tonic::Code::ResourceExhausted => ErrorKind::NoSpace,
        tonic::Code::DataLoss => ErrorKind::Corrupt,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Internal,
    };
    let message = if kind == ErrorKind::Unavailable {
        format!("cannot reach the site at {endpoint} ({chain}): is ternd running there?")
    } else {
        chain
    };
    ClientError::with_source(kind, message, status)
}

/// The status message followed by its sources, since tonic often puts the
/// useful part (connection refused, TLS failure) in the source chain.
fn error_chain(status: &tonic::Status) -> String {
    tern_types::error::chain_after(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

/// The kind of a local file error: a full disk or quota (or a file past
/// the filesystem's size limit) is `NoSpace`, exit code 28, as the README
/// promises; a missing file `NotFound`; anything else is the caller's input.
pub fn io_error_kind(e: &std::io::Error) -> ErrorKind {
    const ENOSPC: i32 = 28;
    const EFBIG: i32 = 27;
    const EDQUOT: i32 = 122;
    match (e.kind(), e.raw_os_error()) {
        (std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded, _)
        | (std::io::ErrorKind::FileTooLarge, _) => ErrorKind::NoSpace,
        (_, Some(ENOSPC | EFBIG | EDQUOT)) => ErrorKind::NoSpace,
        (std::io::ErrorKind::NotFound, _) => ErrorKind::NotFound,
        _ => ErrorKind::InvalidArgument,
    }
}
