//! The ADS server.
//!
//! - [`cache`]: mesh snapshots shared by all proxies, and per-proxy assembly
//!   (no gRPC here).
//! - [`sotw`]: the state-of-the-world protocol for one stream, as a pure
//!   state machine.
//! - [`server`]: tonic service, connection authentication, stream tasks.
//! - [`status`]: per-proxy status for the admin API.

pub mod cache;
pub mod server;
pub mod sotw;
pub mod status;

pub use cache::{MeshCache, MeshSnapshot};
pub use server::{XdsContext, XdsError, XdsTls, serve};
pub use status::{ProxyRegistry, ProxyStatus};
