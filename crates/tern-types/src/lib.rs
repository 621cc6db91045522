//! Types shared by every tern crate: names and ids, `pool/image@snap` specs,
//! byte sizes with rbd's suffixes, image features with rbd's dependency rules,
//! the striping layout, and the small stable [`ErrorKind`] that crosses crate
//! and API boundaries. Nothing here does I/O.

pub mod defaults;
#[macro_use]
pub mod named;

pub mod api;
pub mod error;
pub mod features;
pub mod ids;
pub mod journal;
pub mod layout;
pub mod mirror;
pub mod mutate;
pub mod site;
pub mod size;
pub mod spec;
pub mod text;
pub mod time;

pub use error::ErrorKind;
pub use features::Features;
pub use ids::{ImageId, PoolId, SiteId};
pub use layout::{Layout, ObjectExtent};
pub use size::{format_size, parse_size};
pub use spec::{ImageSpec, validate_name};
pub use text::{escaped, validate_visible};

/// Version of the wire API. A client and a site must agree on the major part.
pub const API_VERSION: u32 = 3;
