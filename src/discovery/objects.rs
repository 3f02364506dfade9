//! The raw Kubernetes objects Ward reads, as every discovery source
//! produces them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::POLICY_LABEL;
use crate::model::ObjectKey;

/// The kinds of object Ward reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ObjectKind {
    Service,
    Pod,
    EndpointSlice,
    ConfigMap,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::Pod => "Pod",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::ConfigMap => "ConfigMap",
        }
    }

    /// `Kind namespace/name`, the way errors name an object.
    pub fn describe(self, key: &ObjectKey) -> String {
        format!("{self} {key}")
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object of a kind Ward reads.
// Boxing the Pod would save little: objects live in per-kind maps, and this
// enum only carries them there.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum KubeObject {
    Service(Service),
    Pod(Pod),
    EndpointSlice(EndpointSlice),
    ConfigMap(ConfigMap),
}

impl KubeObject {
    pub fn kind(&self) -> ObjectKind {
        match self {
            KubeObject::Service(_) => ObjectKind::Service,
            KubeObject::Pod(_) => ObjectKind::Pod,
            KubeObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            KubeObject::ConfigMap(_) => ObjectKind::ConfigMap,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            KubeObject::Service(o) => &o.metadata,
            KubeObject::Pod(o) => &o.metadata,
            KubeObject::EndpointSlice(o) => &o.metadata,
            KubeObject::ConfigMap(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            KubeObject::Service(o) => &mut o.metadata,
            KubeObject::Pod(o) => &mut o.metadata,
            KubeObject::EndpointSlice(o) => &mut o.metadata,
            KubeObject::ConfigMap(o) => &mut o.metadata,
        }
    }
}

/// Does this ConfigMap carry Ward policy? Only those are kept.
pub fn is_policy_config_map(cm: &ConfigMap) -> bool {
    cm.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(POLICY_LABEL))
}

/// The raw objects Ward reads, keyed by (namespace, name). Sorted maps keep
/// conversion deterministic whatever order the source delivered them in.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectSet {
    /// Services: ports and selectors.
    pub services: BTreeMap<ObjectKey, Service>,
    /// Pods: the workloads (IP, labels, service account, readiness).
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// EndpointSlices: when a Service has any, they are its endpoints
    /// (instead of the pods its selector picks), as kube-proxy does.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// ConfigMaps labelled [`POLICY_LABEL`], for the policy module.
    pub config_maps: BTreeMap<ObjectKey, ConfigMap>,
    /// The file each object came from (directory mode only), so errors
    /// found during conversion can name it.
    pub origins: BTreeMap<(ObjectKind, ObjectKey), PathBuf>,
}

impl ObjectSet {
    /// Insert an object under `key`, returning the one it replaced.
    /// ConfigMaps without [`POLICY_LABEL`] are not stored (`None` is
    /// returned).
    pub fn insert(&mut self, key: ObjectKey, obj: KubeObject) -> Option<KubeObject> {
        match obj {
            KubeObject::Service(o) => self.services.insert(key, o).map(KubeObject::Service),
            KubeObject::Pod(o) => self.pods.insert(key, o).map(KubeObject::Pod),
            KubeObject::EndpointSlice(o) => self
                .endpoint_slices
                .insert(key, o)
                .map(KubeObject::EndpointSlice),
            KubeObject::ConfigMap(o) => {
                if is_policy_config_map(&o) {
                    self.config_maps.insert(key, o).map(KubeObject::ConfigMap)
                } else {
                    None
                }
            }
        }
    }

    pub fn contains(&self, kind: ObjectKind, key: &ObjectKey) -> bool {
        match kind {
            ObjectKind::Service => self.services.contains_key(key),
            ObjectKind::Pod => self.pods.contains_key(key),
            ObjectKind::EndpointSlice => self.endpoint_slices.contains_key(key),
            ObjectKind::ConfigMap => self.config_maps.contains_key(key),
        }
    }

    /// The file an object came from, if it came from a file.
    pub fn origin(&self, kind: ObjectKind, key: &ObjectKey) -> Option<&Path> {
        self.origins.get(&(kind, key.clone())).map(PathBuf::as_path)
    }

    pub fn counts(&self) -> ObjectCounts {
        ObjectCounts {
            services: self.services.len(),
            pods: self.pods.len(),
            endpoint_slices: self.endpoint_slices.len(),
            config_maps: self.config_maps.len(),
        }
    }
}

/// Object counts per kind, for status displays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ObjectCounts {
    /// Services in force.
    pub services: usize,
    /// Pods in force (including those not yet workloads, e.g. without an IP).
    pub pods: usize,
    /// EndpointSlices in force.
    pub endpoint_slices: usize,
    /// Policy ConfigMaps in force.
    pub config_maps: usize,
}
