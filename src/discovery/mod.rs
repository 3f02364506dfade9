//! Service discovery: Kubernetes-style objects (from a directory or the API)
//! converted into a [`crate::model::Mesh`].
//!
//! Every source first produces an [`ObjectSet`] — the raw Kubernetes objects
//! Ward reads, keyed by namespace and name — and one pure function,
//! [`convert::build_mesh`], turns it into the model. The directory source
//! ([`dir::DirSource`]) and the later Kubernetes source therefore agree on
//! every rule (default `targetPort`, readiness, which pods count, ...).
//!
//! - [`objects`]: [`ObjectSet`] and [`KubeObject`].
//! - [`convert`]: `ObjectSet` → `Mesh`, with validation errors naming the
//!   object and field ([`ConfigError`]).
//! - [`dir`]: a directory of YAML/JSON manifests, watched with `notify`, with
//!   per-file last-good semantics.
//! - [`kube`](self::kube): the Kubernetes API (kube-runtime watchers and
//!   reflectors), same outputs as the directory source.

pub mod convert;
pub mod dir;
pub mod kube;
pub mod objects;

use std::fmt;
use std::path::PathBuf;

pub use self::kube::{KubeSource, MeshNamespaces};

/// Publish `value` on `tx` unless it equals the current value (`force`
/// publishes anyway). Returns whether readers were notified. Shared by the
/// directory and Kubernetes sources so a no-op reload never wakes anyone.
pub(crate) fn publish_if_changed<T: PartialEq>(
    tx: &tokio::sync::watch::Sender<std::sync::Arc<T>>,
    value: T,
    force: bool,
) -> bool {
    tx.send_if_modified(|current| {
        if !force && **current == value {
            return false;
        }
        *current = std::sync::Arc::new(value);
        true
    })
}
pub use convert::build_mesh;
pub use dir::DirSource;
pub use objects::{KubeObject, ObjectCounts, ObjectKind, ObjectSet};

/// Label that marks a ConfigMap as Ward policy; only those ConfigMaps are
/// kept in an [`ObjectSet`] so unrelated ConfigMaps never cost memory or
/// produce errors.
pub const POLICY_LABEL: &str = "ward.io/policy";

/// Annotation: where the local application listens (default `127.0.0.1`, or
/// the pod IP with redirected traffic).
pub const APP_IP_ANNOTATION: &str = "ward.io/app-ip";

/// Annotation: where the sidecar's outbound listeners bind (default the pod IP).
pub const OUTBOUND_IP_ANNOTATION: &str = "ward.io/outbound-ip";

/// Annotation: how the pod's traffic reaches its sidecar, `explicit`
/// (default) or `redirect` (iptables set up by `ward redirect-init`).
pub const INTERCEPTION_ANNOTATION: &str = "ward.io/interception";

/// Label by which an EndpointSlice names its Service (set by Kubernetes).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A problem with user configuration, precise enough to fix without reading
/// Ward's code: which file, which object, which field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ConfigError {
    /// The file the object came from; `None` for objects read from the
    /// Kubernetes API.
    pub source: Option<PathBuf>,
    /// `Kind namespace/name` (e.g. `Service demo/server`), or `document N`
    /// when the document is too broken to know what it is.
    pub object: String,
    /// Field path inside the object (e.g. `spec.ports[0].targetPort`); empty
    /// when the problem is the object or document as a whole.
    pub field: String,
    /// What is wrong, in words.
    pub message: String,
}

impl ConfigError {
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            source: None,
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn with_source(mut self, source: impl Into<PathBuf>) -> Self {
        self.source = Some(source.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(source) = &self.source {
            write!(f, "{}: ", source.display())?;
        }
        write!(f, "{}: ", self.object)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// What a discovery source reports about itself, for `/readyz` and the
/// admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiscoveryStatus {
    /// Where objects come from (`dir:<path>` or `kubernetes`), so an operator
    /// sees which source this is.
    pub source: String,
    /// The first load finished; until then the published mesh is empty and
    /// Ward must not push it to proxies.
    pub synced: bool,
    /// Number of distinct meshes published so far (1 after the first load);
    /// lets readers tell whether a change they made has been picked up.
    pub generation: u64,
    /// Number of reloads done, including those that changed nothing; lets
    /// tests and operators see that an event was processed.
    pub reloads: u64,
    /// Every current configuration problem. Objects with errors are left
    /// out (or their last good version stays in force).
    pub errors: Vec<ConfigError>,
    /// How many objects of each kind are in force.
    pub objects: ObjectCounts,
}

/// Failures of a discovery source itself (as opposed to [`ConfigError`]s
/// in the configuration it reads).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("discovery directory {}: does not exist", dir.display())]
    DirNotFound { dir: PathBuf },
    #[error("discovery directory {}: is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("discovery directory {}: cannot be read: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("discovery directory {}: cannot be watched: {source}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("discovery directory {}: reload task failed: {message}", dir.display())]
    Reload { dir: PathBuf, message: String },
    #[error("kubernetes discovery: {0}")]
    Kube(String),
}
