//! NBD server protocol for tern exports.
//!
//! The crate speaks the NBD fixed newstyle protocol (option haggling, optional
//! STARTTLS, INFO/GO, structured replies, meta contexts and block status) on top
//! of [`BlockDevice`] and [`Exports`]; it knows nothing about tern's store.
//!
//! Layout: [`wire`] holds constants and pure codecs, `handshake` the option
//! state machine, `transmission` the concurrent request engine, `server` the
//! accept loop and lifecycle.

mod device;
mod handshake;
mod server;
mod transmission;
pub mod wire;

pub use device::{BlockDevice, DeviceError, Exports, MetaContext, ReadChunk};
pub use server::{
    AcceptErrors, DEFAULT_MAX_CONNECTIONS, DEFAULT_MEMORY_BUDGET, MemoryBudget, NbdError,
    ServerConfig, memory_budget, serve, serve_connection, serve_connection_until,
};
