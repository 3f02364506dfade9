//! Ward: an Envoy xDS control plane that gives every service in a mesh
//! mutual TLS.
//!
//! Data flow:
//!
//! ```text
//! discovery (kube | dir) ──► model::Mesh (Arc, watch channel)
//!                                 │
//! ca (issue / rotate) ───────────►│
//!                                 ▼
//!                      translate (pure: mesh + proxy + certs → resources)
//!                                 ▼
//!                      xds cache (versioned resources per proxy and type)
//!                                 ▼
//!                      xds streams (ADS) ──► Envoy ──► ACK/NACK
//!                                 ▼
//!                      admin (health, metrics, debug)
//! ```
//!
//! - [`model`]: services, workloads, endpoints, identities; no k8s/Envoy types.
//! - [`discovery`]: Kubernetes objects (a directory, or the API) → [`model::Mesh`].
//! - [`ha`]: Kubernetes replicas: Lease leader, CA Secret, trust bundle, Events.
//! - [`policy`]: mTLS modes from policy ConfigMaps, precedence, safe rollout, explain.
//! - [`ca`]: the built-in certificate authority and per-proxy certificates.
//! - [`translate`]: the pure model → Envoy resources function; [`translate::names`]
//!   builds every resource name.
//! - [`xds`]: snapshot cache and the ADS gRPC server.
//! - [`credential`]: Kubernetes mode: the TokenReview-checked credential
//!   endpoint for `ward sidecar-init`, and that client.
//! - [`admin`]: HTTP health, readiness, metrics and debug endpoints.
//! - [`app`]: wiring: spawns every task and shuts them down together.
//! - [`meshgen`]: generated meshes for load tests and benchmarks.

pub mod admin;
pub mod app;
pub mod bootstrap;
pub mod ca;
pub mod credential;
pub mod demo;
pub mod discovery;
pub mod ha;
pub mod local;
pub mod meshgen;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod probe;
pub mod redirect_init;
pub mod sample_app;
pub mod translate;
pub mod xds;
