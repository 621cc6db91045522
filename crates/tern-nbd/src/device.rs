//! What the protocol needs from storage: a block device and a way to find one by name.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::wire;

/// A metadata context selected by the client for NBD_CMD_BLOCK_STATUS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: flags are `NBD_STATE_HOLE` (1) | `NBD_STATE_ZERO` (2).
    BaseAllocation,
    /// A context the device offered through [`BlockDevice::meta_contexts`], by full
    /// name (e.g. `tern:changed-since:snap1`, where flag 1 means "changed").
    Device(String),
}

impl MetaContext {
    pub const BASE_ALLOCATION: &'static str = "base:allocation";

    pub fn name(&self) -> &str {
        match self {
            MetaContext::BaseAllocation => Self::BASE_ALLOCATION,
            MetaContext::Device(n) => n,
        }
    }
}

/// A piece of a sparse read, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    Data(Vec<u8>),
    /// This many bytes read as zero (sent as NBD_REPLY_TYPE_OFFSET_HOLE).
    Zero(u32),
}

/// A failed device operation, reported to the client as an NBD error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError {
    /// One of the `NBD_E*` values in [`crate::wire`]; anything else is sent as EIO.
    pub errno: u32,
    pub message: String,
    /// Where inside the request the failure happened, if known (reads then use
    /// NBD_REPLY_TYPE_ERROR_OFFSET so the client keeps the good prefix).
    pub offset: Option<u64>,
}

impl DeviceError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        DeviceError {
            errno,
            message: message.into(),
            offset: None,
        }
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(wire::NBD_EIO, message)
    }
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// The spec only allows a fixed set of error values on the wire.
    pub(crate) fn wire_errno(&self) -> u32 {
        match self.errno {
            wire::NBD_EPERM
            | wire::NBD_EIO
            | wire::NBD_ENOMEM
            | wire::NBD_EINVAL
            | wire::NBD_ENOSPC
            | wire::NBD_EOVERFLOW
            | wire::NBD_ENOTSUP
            | wire::NBD_ESHUTDOWN => self.errno,
            _ => wire::NBD_EIO,
        }
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "errno {}: {}", self.errno, self.message)
    }
}

impl std::error::Error for DeviceError {}

/// A byte-addressed device the server exports. Offsets and lengths are already
/// checked against [`size`](Self::size) and the 32 MiB payload limit when a method
/// is called. Calls arrive concurrently, possibly overlapping.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// True when flush/FUA on one connection is visible on all (shared cache or none).
    fn can_multi_conn(&self) -> bool {
        false
    }
    /// True when write_zeroes never falls back to writing zero buffers; otherwise
    /// requests with NBD_CMD_FLAG_FAST_ZERO fail fast with ENOTSUP.
    fn fast_zero(&self) -> bool {
        false
    }
    /// Must return exactly `len` bytes.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError>;
    /// Like `read`, but may describe zero runs without materialising them; used for
    /// structured replies. Chunks must cover exactly `len` bytes. Override only when
    /// the device knows its holes cheaply.
    async fn read_sparse(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, DeviceError> {
        Ok(vec![ReadChunk::Data(self.read(offset, len).await?)])
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError>;
    async fn flush(&self) -> Result<(), DeviceError>;
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError>;
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError>;
    /// Extents covering `[offset, offset+len)` in order, as `(length, flags)`; may
    /// stop early but must return at least one non-empty extent.
    async fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, DeviceError>;
    /// Device-specific meta contexts offered besides `base:allocation`, by full name.
    fn meta_contexts(&self) -> Vec<String> {
        vec![]
    }
    /// Called once when the connection that opened the device stops using it
    /// (connection end, or the client switched exports during the handshake).
    async fn close(&self) {}
}

/// The export namespace: resolves names sent by clients.
#[async_trait]
pub trait Exports: Send + Sync + 'static {
    /// The error's message becomes the NBD_REP_ERR_UNKNOWN text shown to the client.
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError>;
    /// `(name, description)` for NBD_OPT_LIST.
    async fn list(&self) -> Vec<(String, String)>;
    /// What the empty export name means, if anything.
    fn default_export(&self) -> Option<String> {
        None
    }
}
