//! The ADS server.
//!
//! - [`cache`]: mesh snapshots shared by all proxies, and per-proxy assembly
//!   (no gRPC here).
//! - [`sotw`]: the state-of-the-world protocol for one stream, as a pure
//!   state machine.
//! - [`delta`]: the incremental (delta) protocol, likewise.
//! - [`server`]: tonic service, connection authentication, stream tasks.
//! - [`status`]: per-proxy status for the admin API.

pub mod cache;
pub mod delta;
pub mod server;
pub mod sotw;
pub mod status;

pub use cache::{MeshCache, MeshSnapshot, ProxyBuilder, ProxySnapshot};
pub use server::{TaskCounter, XdsContext, XdsError, XdsTls, serve};
pub use status::{ProxyRegistry, ProxyStatus};
