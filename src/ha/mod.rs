//! Running Ward as several replicas in Kubernetes.
//!
//! Every replica watches the cluster and serves xDS from the same state;
//! one of them, the leader (a `coordination.k8s.io/v1` Lease), does the
//! writes that must happen once: publishing the trust bundle to each meshed
//! namespace and reporting rejected policy as Events.
//!
//! - [`leader`]: [`LeaderElector`], Lease acquire/renew/takeover with
//!   resourceVersion-conditional updates.
//! - [`ca_secret`]: the CA root (or plugged-in intermediate) in a Secret,
//!   created with create-if-absent semantics so replicas can never end up
//!   with two roots.
//! - [`trust_bundle`]: [`TrustBundlePublisher`], ConfigMap
//!   `ward-trust-bundle` in each meshed namespace.
//! - [`events`]: [`PolicyEvents`], an `InvalidPolicy` Event for each
//!   rejected policy ConfigMap.
//! - [`API_CALLS`]: every (verb, resource) Ward asks the API server for;
//!   the RBAC manifests are tested against it.

pub mod ca_secret;
pub mod events;
pub mod leader;
pub mod trust_bundle;

pub use ca_secret::{CA_SECRET, XDS_CA_SECRET, load_or_create_ca};
pub use events::{PolicyEvents, REASON_INVALID_POLICY};
pub use leader::{LeaderConfig, LeaderElector};
pub use trust_bundle::{
    TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY, TRUST_BUNDLE_XDS_KEY, TrustBundlePublisher,
};

/// Name of the leader-election Lease in Ward's namespace.
pub const LEADER_LEASE: &str = "ward-leader";

/// Where a call applies, as RBAC grants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every namespace (a ClusterRole).
    Cluster,
    /// Ward's own namespace only (a Role there).
    WardNamespace,
}

/// One kind of request Ward makes to the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiCall {
    pub scope: Scope,
    /// API group (`""` for core).
    pub group: &'static str,
    /// Plural resource name.
    pub resource: &'static str,
    pub verb: &'static str,
    /// The only object name the call touches, when RBAC can pin it
    /// (`resourceNames`; never possible for list, watch and create).
    pub name: Option<&'static str>,
}

const fn call(
    scope: Scope,
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    name: Option<&'static str>,
) -> ApiCall {
    ApiCall {
        scope,
        group,
        resource,
        verb,
        name,
    }
}

/// Every request Ward makes: the single list RBAC is checked against (a test
/// compares it with `manifests/rbac.yaml`, and the fake API server tests
/// check every request they see is on it).
pub const API_CALLS: &[ApiCall] = &[
    // Discovery (every replica): read-only watches.
    call(Scope::Cluster, "", "services", "list", None),
    call(Scope::Cluster, "", "services", "watch", None),
    call(Scope::Cluster, "", "pods", "list", None),
    call(Scope::Cluster, "", "pods", "watch", None),
    call(Scope::Cluster, "", "namespaces", "list", None),
    call(Scope::Cluster, "", "namespaces", "watch", None),
    call(Scope::Cluster, "", "configmaps", "list", None),
    call(Scope::Cluster, "", "configmaps", "watch", None),
    call(
        Scope::Cluster,
        "discovery.k8s.io",
        "endpointslices",
        "list",
        None,
    ),
    call(
        Scope::Cluster,
        "discovery.k8s.io",
        "endpointslices",
        "watch",
        None,
    ),
    // Trust bundle (leader): its own ConfigMap in each meshed namespace.
    call(Scope::Cluster, "", "configmaps", "create", None),
    call(
        Scope::Cluster,
        "",
        "configmaps",
        "get",
        Some(TRUST_BUNDLE_CONFIGMAP),
    ),
    call(
        Scope::Cluster,
        "",
        "configmaps",
        "update",
        Some(TRUST_BUNDLE_CONFIGMAP),
    ),
    // Feedback on policy ConfigMaps (leader), in their namespace.
    call(Scope::Cluster, "", "events", "create", None),
    // The credential endpoint (`ward sidecar-init`): who is this token?
    call(
        Scope::Cluster,
        "authentication.k8s.io",
        "tokenreviews",
        "create",
        None,
    ),
    // The CA Secret (create-if-absent, every replica at start).
    call(Scope::WardNamespace, "", "secrets", "get", Some(CA_SECRET)),
    call(
        Scope::WardNamespace,
        "",
        "secrets",
        "get",
        Some(XDS_CA_SECRET),
    ),
    call(Scope::WardNamespace, "", "secrets", "create", None),
    // Leader election.
    call(
        Scope::WardNamespace,
        "coordination.k8s.io",
        "leases",
        "get",
        Some(LEADER_LEASE),
    ),
    call(
        Scope::WardNamespace,
        "coordination.k8s.io",
        "leases",
        "update",
        Some(LEADER_LEASE),
    ),
    call(
        Scope::WardNamespace,
        "coordination.k8s.io",
        "leases",
        "create",
        None,
    ),
];

/// Failures talking to the Kubernetes API or reading what it holds.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("{object}: {source}")]
    Api {
        /// `Kind namespace/name` of the object involved.
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("{object}: key {key}: {message}")]
    BadData {
        object: String,
        key: String,
        message: String,
    },
    #[error("{object}: {source}")]
    Ca {
        object: String,
        #[source]
        source: crate::ca::CaError,
    },
    #[error("{object}: still conflicting after {attempts} attempts")]
    Contended { object: String, attempts: u32 },
}

/// Is this API error an HTTP status with this code?
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}
