//! mTLS policy: STRICT / PERMISSIVE / DISABLE / DEFAULT per mesh, namespace,
//! service and port, from ConfigMaps labelled `ward.io/policy`.
//!
//! - [`schema`]: one ConfigMap → one [`crate::model::Policy`] (keys, modes, YAML).
//! - [`resolve`]: policies against the mesh (unknown services and ports,
//!   one policy per scope, last good version) and precedence
//!   (port > service > namespace > mesh > PERMISSIVE).
//! - [`rollout`]: the single writer that moves proxies from one mode to
//!   the next in a safe order, waiting for ACKs, and publishes the mesh
//!   translation reads.
//! - [`explain`]: per port, the effective mode, the chain that produced it,
//!   what clients send and the rollout step (`ward describe service`,
//!   `/debug/policy`).

pub mod explain;
pub mod resolve;
pub mod rollout;
pub mod schema;

pub use explain::{PortExplain, ServiceExplain};
pub use resolve::{ChainLink, Level, Resolved, Selection};
pub use rollout::{PolicyController, PolicyStatus, RolloutConfig};
