//! A typed async client of one tern site, used by the CLI, the mirror daemon
//! and the tests. It reads the cluster config and keyring (like ceph.conf and
//! a Ceph keyring), connects over TLS pinned to the site's certificate
//! fingerprint, and sends the caller's identity with every call.

mod api;
pub mod config;
pub mod connect;
mod error;
pub mod lock;
pub mod rbd_diff;
mod site;
pub mod transfer;

pub use api::*;
pub use config::{ClusterConfig, Keyring};
pub use error::{ClientError, io_error_kind};
pub use site::{SiteClient, Transport, Wire};
