//! The wire API of a tern site. `proto/tern.proto` is the one place that
//! defines it; [`API_VERSION`](tern_types::API_VERSION) is carried in the
//! `x-tern-api-version` header of every call and in `Hello`.

pub mod convert;

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("tern.v1");
}

/// Request metadata keys.
pub mod headers {
    pub const API_VERSION: &str = "x-tern-api-version";
    pub const ENTITY: &str = "x-tern-entity";
    pub const KEY: &str = "x-tern-key";
    /// Error kind of a failed call (tern_types::ErrorKind::as_str).
    pub const ERROR_KIND: &str = "x-tern-error-kind";
}

/// Largest message either side accepts: bulk data moves in 1–4 MiB chunks.
pub const MAX_MESSAGE: usize = 16 << 20;
