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

/// An error that crossed a boundary: a kind and a sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }
}
