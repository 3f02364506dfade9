//! Translation: a pure function from the mesh model (plus a proxy's
//! certificates) to Envoy resources. Deterministic: the same input gives the
//! same bytes, so resource versions are content hashes and golden files are
//! stable.

pub mod names;

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use sha2::{Digest, Sha256};

/// xDS type URLs Ward serves, in make-before-break push order
/// (xDS protocol doc, "Eventual consistency considerations"): secrets before
/// the clusters and listeners that use them, clusters before their
/// endpoints, listeners before their routes.
pub mod type_url {
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

    /// Push order.
    pub const ORDER: [&str; 5] = [SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE];

    /// Short name for logs, metrics and the admin API.
    pub fn short(type_url: &str) -> &'static str {
        match type_url {
            SECRET => "sds",
            CLUSTER => "cds",
            ENDPOINT => "eds",
            LISTENER => "lds",
            ROUTE => "rds",
            _ => "unknown",
        }
    }

    /// LDS and CDS are wildcard-capable; the rest are requested by name.
    pub fn is_wildcard_type(type_url: &str) -> bool {
        type_url == LISTENER || type_url == CLUSTER
    }
}

/// One encoded resource, shared (`Arc`) by every proxy that receives it.
/// `Debug` omits the encoded bytes: a secret's bytes hold a private key.
#[derive(Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    /// The packed resource; `type_url` is one of [`type_url`].
    pub any: Any,
    /// Content hash (hex), used as the per-resource version in delta xDS and
    /// to derive SotW versions.
    pub version: String,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("type_url", &self.any.type_url)
            .field("version", &self.version)
            .field("bytes", &self.any.value.len())
            .finish()
    }
}

impl Resource {
    pub fn new<T: prost::Name + prost::Message>(name: impl Into<String>, msg: T) -> Self {
        let any = envoy_types::util::pack_any(msg);
        let version = content_hash(&[any.type_url.as_bytes(), &any.value]);
        Self {
            name: name.into(),
            any,
            version,
        }
    }
}

/// Hex SHA-256 prefix (16 hex chars) of the concatenated parts.
pub fn content_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

/// Resources of one type, by name (sorted).
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// Everything one proxy can be served, by type URL.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyResources {
    pub by_type: BTreeMap<&'static str, ResourceMap>,
}

impl ProxyResources {
    pub fn get(&self, type_url: &str) -> Option<&ResourceMap> {
        self.by_type.get(type_url)
    }
}

pub mod cluster;
pub mod consistency;
pub mod endpoint;
pub mod listener;
pub mod proxy;
pub mod redirect;
pub mod route;
pub mod secret;
pub mod tls;

#[cfg(test)]
mod tests;

pub use consistency::{DanglingRef, RefKind, check_consistency};
pub use proxy::{
    MeshResources, ProxyTranslation, SplitTranslation, mesh_resources, outbound_listeners,
    proxy_resources, proxy_resources_with, split_translation,
};
pub use secret::secrets;

/// Why a proxy's resources could not be produced or do not hang together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The proxy's pod is not (or no longer) in the mesh.
    #[error("proxy {0}: no such pod in the mesh")]
    UnknownProxy(crate::model::ObjectKey),
    /// `MeshResources` reused with another trust domain than they were
    /// built for: their SAN matchers would be wrong.
    #[error("mesh resources were built for trust domain {built:?}, not {requested:?}")]
    TrustDomainMismatch { built: String, requested: String },
    /// References that do not resolve (all of them, sorted).
    #[error("{} dangling reference(s): {}", .0.len(), join(.0))]
    Dangling(Vec<DanglingRef>),
    /// A resource in a checked snapshot is not the type its map says.
    #[error("{resource}: cannot decode: {message}")]
    Decode { resource: String, message: String },
}

fn join(refs: &[DanglingRef]) -> String {
    refs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
