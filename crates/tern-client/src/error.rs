use tern_types::ErrorKind;

/// A failed call: what to do about it (`kind`) and a sentence for a person.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ClientError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ClientError {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn from_status(status: tonic::Status, endpoint: &str) -> ClientError {
        if let Some(kind) = status
            .metadata()
            .get(tern_proto::headers::ERROR_KIND)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorKind::parse)
        {
            return ClientError::new(kind, status.message().to_string());
        }
        let chain = error_chain(&status);
        if let Some(pos) = chain.find("fingerprint mismatch") {
            return ClientError::new(
                ErrorKind::Unauthenticated,
                format!(
                    "refusing site at {endpoint}: TLS certificate {}. The config pins another \
                     site's certificate: check tls_fingerprint in the cluster config",
                    chain[pos..]
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim_end_matches(')')
                ),
            );
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
        ClientError::new(kind, message)
    }
}

/// The status message followed by its sources, since tonic often puts the
/// useful part (connection refused, TLS failure) in the source chain.
fn error_chain(status: &tonic::Status) -> String {
    let mut out = status.message().to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(e) = src {
        let s = e.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        src = e.source();
    }
    out
}

impl From<tern_types::error::Error> for ClientError {
    fn from(e: tern_types::error::Error) -> Self {
        ClientError::new(e.kind, e.message)
    }
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
