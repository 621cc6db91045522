use crate::header::HeaderError;
use std::io;
use std::path::PathBuf;
use tern_types::ErrorKind;

/// Everything a store operation can fail with. Each variant is one failed
/// operation; [`StoreError::kind`] tells the caller what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "store {path} is in use by another opening (another ternd on the same data directory?)"
    )]
    InUse { path: PathBuf },
    #[error("cannot open metadata database {path}: {source}")]
    OpenMeta {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error(
        "store {path} has format version {found}, but this tern understands up to {supported}: upgrade tern"
    )]
    FormatTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("store {path} has an unreadable format version '{found}'")]
    BadFormat { path: PathBuf, found: String },
    #[error("metadata database: {op} failed: {source}")]
    Meta {
        op: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("metadata record '{key}' in table '{table}' is unreadable: {source}")]
    BadRecord {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot remove orphaned data directory {path}: {source}")]
    RemoveOrphan {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} name '{name}' is not valid: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("pool '{pool}' does not exist")]
    PoolNotFound { pool: String },
    #[error("pool '{pool}' already exists")]
    PoolExists { pool: String },
    #[error("pool '{pool}' has {images} images; remove them or use --force")]
    PoolNotEmpty { pool: String, images: u64 },
    #[error("image '{spec}' does not exist")]
    ImageNotFound { spec: String },
    #[error("image '{spec}' already exists")]
    ImageExists { spec: String },
    #[error("image '{spec}' was removed; this handle can no longer be used")]
    ImageRemoved { spec: String },
    #[error("size {size} of image '{spec}' is not valid: {reason}")]
    InvalidSize {
        spec: String,
        size: u64,
        reason: &'static str,
    },
    #[error("layout of image '{spec}' is not valid: {source}")]
    InvalidLayout {
        spec: String,
        #[source]
        source: tern_types::error::Error,
    },
    #[error("features of image '{spec}' are not valid: {source}")]
    InvalidFeatures {
        spec: String,
        #[source]
        source: tern_types::error::Error,
    },
    #[error("{op} of {len} bytes at offset {off} is past the end of image '{spec}' (size {size})")]
    OutOfRange {
        op: &'static str,
        spec: String,
        off: u64,
        len: u64,
        size: u64,
    },
    #[error("shrinking image '{spec}' from {from} to {to} loses data: use --allow-shrink")]
    ShrinkNotAllowed { spec: String, from: u64, to: u64 },
    #[error("no space left on device {doing} image '{spec}'")]
    NoSpace {
        doing: &'static str,
        spec: String,
        #[source]
        source: io::Error,
    },
    #[error("object file {path} of image '{spec}' is corrupt: {source}")]
    CorruptObject {
        spec: String,
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("cannot open object file {path} of image '{spec}': {source}")]
    OpenObject {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read of image '{spec}' failed in {path}: {source}")]
    Read {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write to image '{spec}' failed in {path}: {source}")]
    Write {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("discard of image '{spec}' failed in {path}: {source}")]
    Discard {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("flush of image '{spec}' failed on {path}: {source}")]
    Flush {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resize of image '{spec}' failed on {path}: {source}")]
    Resize {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect data of image '{spec}' at {path}: {source}")]
    Scan {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot '{spec}' does not exist")]
    SnapNotFound { spec: String },
    #[error("snapshot '{spec}' already exists")]
    SnapExists { spec: String },
    #[error("snapshot '{spec}' is protected: unprotect it first")]
    SnapProtected { spec: String },
    #[error("snapshot '{spec}' is a mirror snapshot; it is removed by mirroring, not by hand")]
    MirrorSnapshot { spec: String },
    #[error("image '{spec}' has snapshots: remove them with `tern snap purge {spec}` first")]
    ImageHasSnapshots { spec: String },
    #[error("image '{spec}' has protected snapshots ({names}): unprotect them first")]
    ProtectedSnapshots { spec: String, names: String },
    #[error("diff of image '{spec}' is not valid: {reason}")]
    InvalidDiff { spec: String, reason: String },
    #[error("snapshot data of image '{spec}' failed at {path}: {source}")]
    SnapshotData {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot update the clean-shutdown marker {path}: {source}")]
    Marker {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal of image '{spec}' failed at {path}: {source}")]
    JournalIo {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "journal of image '{spec}' is damaged at {path}: {reason}; disable and re-enable journaling to start a new one (peers must resync)"
    )]
    JournalCorrupt {
        spec: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "journal of image '{spec}' no longer holds entry {tid} (it starts at {first}): the client was disconnected or is too far behind and must resync"
    )]
    JournalTrimmed { spec: String, tid: u64, first: u64 },
    #[error(
        "image '{spec}': writes acknowledged earlier (from journal entry {tid} on) are safe in the journal but cannot be applied to the image's files ({source}); tern retries them, and until they are applied new writes and reads of their ranges fail"
    )]
    JournalApply {
        spec: String,
        tid: u64,
        source: std::sync::Arc<StoreError>,
    },
    #[error("journal of image '{spec}' has no client '{client}'")]
    JournalClientNotFound { spec: String, client: String },
    #[error(
        "journal client '{client}' of image '{spec}' was disconnected for falling too far behind: resync it, then register it again"
    )]
    JournalClientDisconnected { spec: String, client: String },
    #[error(
        "journal client '{client}' of image '{spec}' cannot commit tid {tid}: the last durable entry is {last}"
    )]
    JournalCommitAhead {
        spec: String,
        client: String,
        tid: u64,
        last: u64,
    },
    #[error("image '{spec}' has no journal: enable the journaling feature first")]
    JournalingDisabled { spec: String },
    #[error("cannot change features of image '{spec}': {reason}")]
    FeatureChange { spec: String, reason: String },
    #[error("cannot remove data of image '{spec}' at {path}: {source}")]
    RemoveData {
        spec: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An error met by the journal's committer on behalf of a writer, who
    /// gets it when it collects its result; one error may answer several.
    #[error("{0}")]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        use StoreError as E;
        match self {
            E::PoolNotFound { .. }
            | E::ImageNotFound { .. }
            | E::ImageRemoved { .. }
            | E::SnapNotFound { .. } => ErrorKind::NotFound,
            E::PoolExists { .. } | E::ImageExists { .. } | E::SnapExists { .. } => {
                ErrorKind::AlreadyExists
            }
            E::MirrorSnapshot { .. } | E::InvalidDiff { .. } => ErrorKind::InvalidArgument,
            E::JournalClientNotFound { .. } => ErrorKind::NotFound,
            // The client lost its place through no request of its own, as a
            // fenced lock owner did: what it must do is resync.
            E::JournalTrimmed { .. } | E::JournalClientDisconnected { .. } => ErrorKind::Fenced,
            E::JournalCommitAhead { .. }
            | E::JournalingDisabled { .. }
            | E::FeatureChange { .. } => ErrorKind::InvalidArgument,
            E::JournalCorrupt { .. } => ErrorKind::Corrupt,
            E::SnapProtected { .. }
            | E::ImageHasSnapshots { .. }
            | E::ProtectedSnapshots { .. } => ErrorKind::Busy,
            E::InvalidName { .. }
            | E::InvalidSize { .. }
            | E::InvalidLayout { .. }
            | E::InvalidFeatures { .. }
            | E::OutOfRange { .. }
            | E::ShrinkNotAllowed { .. } => ErrorKind::InvalidArgument,
            E::PoolNotEmpty { .. } => ErrorKind::Busy,
            E::NoSpace { .. } => ErrorKind::NoSpace,
            E::FormatTooNew { .. } => ErrorKind::VersionMismatch,
            E::BadFormat { .. } | E::BadRecord { .. } | E::CorruptObject { .. } => {
                ErrorKind::Corrupt
            }
            E::InUse { .. } => ErrorKind::Busy,
            E::OpenMeta { source, .. } => match source {
                redb::DatabaseError::DatabaseAlreadyOpen => ErrorKind::Busy,
                redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => {
                    ErrorKind::Corrupt
                }
                _ => ErrorKind::Internal,
            },
            E::Meta { source, .. } => match source {
                redb::Error::Corrupted(_) => ErrorKind::Corrupt,
                redb::Error::Io(e) if is_no_space(e) => ErrorKind::NoSpace,
                _ => ErrorKind::Internal,
            },
            E::CreateDir { .. }
            | E::RemoveOrphan { .. }
            | E::OpenObject { .. }
            | E::Read { .. }
            | E::Write { .. }
            | E::Discard { .. }
            | E::Flush { .. }
            | E::Resize { .. }
            | E::Scan { .. }
            | E::SnapshotData { .. }
            | E::Marker { .. }
            | E::JournalIo { .. }
            | E::RemoveData { .. } => ErrorKind::Internal,
            E::Shared(e) => e.kind(),
            E::JournalApply { source, .. } => source.kind(),
        }
    }
}

/// The one mapping onto the boundary error: its kind and sentence, and the
/// store error itself kept as the cause, so a log can show what lies under
/// the sentence (the I/O or database error).
impl From<StoreError> for tern_types::error::Error {
    fn from(e: StoreError) -> Self {
        tern_types::error::Error::with_source(e.kind(), e.to_string(), e)
    }
}

pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps a data-path I/O error, turning a full disk into [`StoreError::NoSpace`]
/// so the caller sees one actionable kind whatever the operation was.
pub(crate) fn data_io(
    doing: &'static str,
    spec: &str,
    path: PathBuf,
    e: io::Error,
    make: fn(String, PathBuf, io::Error) -> StoreError,
) -> StoreError {
    if is_no_space(&e) {
        StoreError::NoSpace {
            doing,
            spec: spec.to_string(),
            source: e,
        }
    } else {
        make(spec.to_string(), path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_is_its_own_kind() {
        let e = data_io(
            "writing",
            "p/i",
            PathBuf::from("/x"),
            io::Error::from_raw_os_error(libc::ENOSPC),
            |spec, path, source| StoreError::Write { spec, path, source },
        );
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.to_string(), "no space left on device writing image 'p/i'");
        let e = data_io(
            "writing",
            "p/i",
            PathBuf::from("/x"),
            io::Error::from_raw_os_error(libc::EIO),
            |spec, path, source| StoreError::Write { spec, path, source },
        );
        assert_eq!(e.kind(), ErrorKind::Internal);
    }

    #[test]
    fn messages() {
        let e = StoreError::OutOfRange {
            op: "write",
            spec: "p/i".into(),
            off: 8192,
            len: 4096,
            size: 10000,
        };
        assert_eq!(
            e.to_string(),
            "write of 4096 bytes at offset 8192 is past the end of image 'p/i' (size 10000)"
        );
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = StoreError::PoolNotEmpty {
            pool: "x".into(),
            images: 2,
        };
        assert_eq!(
            e.to_string(),
            "pool 'x' has 2 images; remove them or use --force"
        );
        assert_eq!(e.kind(), ErrorKind::Busy);
    }
}
