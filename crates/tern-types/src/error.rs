use serde::{Deserialize, Serialize};

/// What a caller should do about a failure. Every crate maps its own error
/// enum onto this exhaustively; the API carries it, and the CLI turns it into
/// an exit code and advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The named thing does not exist.
    NotFound,
    /// The named thing exists already.
    AlreadyExists,
    /// The request itself is wrong: fix the input.
    InvalidArgument,
    /// No or a wrong key.
    Unauthenticated,
    /// The key is good but its capabilities do not allow this.
    PermissionDenied,
    /// The target refuses writes (snapshot, non-primary image, read-only user).
    ReadOnly,
    /// Another holder (lock, non-empty pool, open image) prevents this now.
    Busy,
    /// This writer lost its lock; its writes are refused.
    Fenced,
    /// The disk is full.
    NoSpace,
    /// Stored data failed a check.
    Corrupt,
    /// The peer or site cannot be reached: retry later.
    Unavailable,
    /// The client and server speak different API versions.
    VersionMismatch,
    /// A bug or an unexpected system error.
    Internal,
}

impl ErrorKind {
    /// Exit code used by the CLI, errno-like so scripts can tell cases apart.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::NotFound => 2,         // ENOENT
            ErrorKind::AlreadyExists => 17,   // EEXIST
            ErrorKind::InvalidArgument => 22, // EINVAL
            ErrorKind::Unauthenticated => 13, // EACCES
            ErrorKind::PermissionDenied => 1, // EPERM
            ErrorKind::ReadOnly => 30,        // EROFS
            ErrorKind::Busy => 16,            // EBUSY
            ErrorKind::Fenced => 108,         // ESHUTDOWN
            ErrorKind::NoSpace => 28,         // ENOSPC
            ErrorKind::Corrupt => 74,         // EBADMSG
            ErrorKind::Unavailable => 111,    // ECONNREFUSED
            ErrorKind::VersionMismatch => 71, // EPROTO
            ErrorKind::Internal => 5,         // EIO
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Busy => "busy",
            ErrorKind::Fenced => "fenced",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::VersionMismatch => "version-mismatch",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorKind> {
        Some(match s {
            "not-found" => ErrorKind::NotFound,
            "already-exists" => ErrorKind::AlreadyExists,
            "invalid-argument" => ErrorKind::InvalidArgument,
            "unauthenticated" => ErrorKind::Unauthenticated,
            "permission-denied" => ErrorKind::PermissionDenied,
            "read-only" => ErrorKind::ReadOnly,
            "busy" => ErrorKind::Busy,
            "fenced" => ErrorKind::Fenced,
            "no-space" => ErrorKind::NoSpace,
            "corrupt" => ErrorKind::Corrupt,
            "unavailable" => ErrorKind::Unavailable,
            "version-mismatch" => ErrorKind::VersionMismatch,
            "internal" => ErrorKind::Internal,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cause kept behind a boundary error, shareable so the error stays `Clone`.
pub type Source = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// An error that crossed a boundary: a kind and a sentence for a person,
/// and the error that caused it, if any, for logs. Two errors are equal when
/// kind and sentence are: the cause is for people reading logs, not for
/// callers deciding what to do.
///
/// `{}` shows the sentence; `{:#}` the sentence followed by every cause it
/// does not already say (see [`Error::chain`]).
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub source: Option<Source>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error caused by `source`, which stays reachable through
    /// [`std::error::Error::source`].
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(std::sync::Arc::new(source)),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// The sentence and its causes on one line, for logs.
    pub fn chain(&self) -> Chain<'_> {
        Chain(self)
    }
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if f.alternate() {
            write!(f, "{}", chain(self))
        } else {
            f.write_str(&self.message)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// An error and its causes, as [`Error::chain`] shows them.
pub struct Chain<'a>(&'a Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&chain(self.0))
    }
}

/// `e` followed by each of its causes, `: `-separated. A cause whose text
/// the line already holds is left out: messages often quote their cause
/// (a store error's sentence ends with the I/O error it met).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    chain_after(e.to_string(), e.source())
}

/// `head` followed by `source` and its causes, as [`chain`] writes them.
pub fn chain_after(head: String, source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut out = head;
    let mut src = source;
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Cause(&'static str, Option<Box<Cause>>);
    impl std::fmt::Display for Cause {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Cause {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn keeps_its_cause() {
        let io = Cause("disk on fire", None);
        let e = Error::with_source(
            ErrorKind::Internal,
            "cannot write x",
            Cause("writing object 3", Some(Box::new(io))),
        );
        assert_eq!(e.to_string(), "cannot write x");
        assert_eq!(
            format!("{e:#}"),
            "cannot write x: writing object 3: disk on fire"
        );
        assert_eq!(e.chain().to_string(), format!("{e:#}"));
        let src = std::error::Error::source(&e).expect("a source");
        assert_eq!(src.to_string(), "writing object 3");
        // A cause the message already quotes is not said twice.
        let e = Error::with_source(
            ErrorKind::Internal,
            "read failed: disk on fire",
            Cause("disk on fire", None),
        );
        assert_eq!(format!("{e:#}"), "read failed: disk on fire");
        // Equality is what callers act on: kind and sentence.
        assert_eq!(
            e.clone(),
            Error::new(ErrorKind::Internal, "read failed: disk on fire")
        );
    }
}
