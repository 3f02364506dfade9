//! The mesh as Ward sees it: services, workloads, endpoints and identities.
//!
//! No Kubernetes or Envoy types appear here. Discovery (`crate::discovery`)
//! converts Kubernetes objects into a [`Mesh`]; translation
//! (`crate::translate`) turns a `Mesh` into Envoy resources. Every map is a
//! `BTreeMap` so iteration order — and therefore generated config — is
//! deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

/// Default SPIFFE trust domain, as in Istio and Linkerd.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// `namespace/name` of a namespaced object (a Service or a Pod).
/// Serialized as the string `namespace/name`, so maps keyed by it render as
/// JSON objects in the admin API.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl serde::Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ObjectKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parse error for `NAMESPACE/NAME`.
#[derive(Debug, thiserror::Error)]
#[error("expected NAMESPACE/NAME, got {0:?}")]
pub struct ObjectKeyParseError(String);

impl std::str::FromStr for ObjectKey {
    type Err = ObjectKeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(ns, name))
            }
            _ => Err(ObjectKeyParseError(s.to_string())),
        }
    }
}

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The URI form placed in the certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Application protocol of a service port; decides HTTP connection manager
/// (with routes) versus tcp_proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

impl Protocol {
    /// Kubernetes conventions, in order: `appProtocol` (`http`, `http2`,
    /// `grpc`, `kubernetes.io/h2c`, ...), then the Istio port-name prefix
    /// (`http`, `http-web`, `grpc-api`, ...). Everything else is opaque TCP.
    pub fn detect(app_protocol: Option<&str>, port_name: Option<&str>) -> Self {
        let is_http = |s: &str| {
            let s = s.to_ascii_lowercase();
            let prefix = s.split(['-', '_']).next().unwrap_or_default().to_string();
            matches!(
                prefix.as_str(),
                "http" | "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c"
            ) || s == "kubernetes.io/h2c"
        };
        match app_protocol {
            Some(p) if !p.is_empty() => {
                if is_http(p) {
                    Protocol::Http
                } else {
                    Protocol::Tcp
                }
            }
            _ => match port_name {
                Some(n) if is_http(n) => Protocol::Http,
                _ => Protocol::Tcp,
            },
        }
    }
}

/// `targetPort` of a Service port: a number, or the name of a container port.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServicePort {
    /// Port name; empty when the Service has a single unnamed port.
    pub name: String,
    /// The port clients call.
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub key: ObjectKey,
    /// Sorted by port number.
    pub ports: Vec<ServicePort>,
    /// Empty selector = the Service has no selector (endpoints come only
    /// from EndpointSlices).
    pub selector: BTreeMap<String, String>,
    /// `spec.clusterIPs` (or `spec.clusterIP`): the virtual addresses apps
    /// call. Sidecars with redirected traffic ([`Interception::Redirect`])
    /// recognise a call to the service by its original destination
    /// `clusterIP:port`. Empty for headless Services and hand-written YAML
    /// without one.
    pub cluster_ips: Vec<IpAddr>,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub fn port_by_name(&self, name: &str) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// Does this Service's selector pick the workload? A Service with no
    /// selector selects nothing (as in Kubernetes).
    pub fn selects(&self, w: &Workload) -> bool {
        w.key.namespace == self.key.namespace
            && !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }

    /// `name.namespace.svc.cluster.local`, used for HTTP virtual host domains.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.key.name, self.key.namespace)
    }
}

/// A container port declared by a pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
}

/// A pod: something that runs a sidecar and has an identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub key: ObjectKey,
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName`, `default` when unset (as in Kubernetes).
    pub service_account: String,
    /// `status.podIP`: where the sidecar accepts mesh (inbound) traffic.
    pub ip: IpAddr,
    /// Ready as Kubernetes reports it; unready pods are not load-balanced to.
    pub ready: bool,
    pub ports: Vec<ContainerPort>,
    /// Where the local application listens; the sidecar's inbound listener
    /// forwards to `app_ip:<targetPort>`. Annotation `ward.io/app-ip`,
    /// default `127.0.0.1` (the app shares the pod's network namespace).
    pub app_ip: IpAddr,
    /// Where the sidecar's outbound listeners bind: one per upstream service
    /// port at `outbound_ip:<service port>`. Annotation `ward.io/outbound-ip`,
    /// default the pod IP.
    pub outbound_ip: IpAddr,
    /// How the app's traffic reaches the sidecar. Annotation
    /// `ward.io/interception`, default explicit.
    pub interception: Interception,
}

/// How a pod's traffic reaches its sidecar, which decides the shape of its
/// listeners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interception {
    /// No packet redirection: the sidecar listens on `ip:<target port>` for
    /// mesh traffic and on `outbound_ip:<service port>` for the app's
    /// calls, so the app calls its sidecar's address.
    #[default]
    Explicit,
    /// `ward redirect-init` redirected the pod's TCP traffic with iptables:
    /// everything the app sends goes to the sidecar's port 15001, everything
    /// arriving at the pod to port 15006, and the sidecar finds the real
    /// destination with `original_dst`. The app calls services by name.
    Redirect,
}

impl Interception {
    pub fn as_str(self) -> &'static str {
        match self {
            Interception::Explicit => "explicit",
            Interception::Redirect => "redirect",
        }
    }

    /// `explicit` or `redirect` (case-insensitive); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "explicit" => Some(Interception::Explicit),
            "redirect" => Some(Interception::Redirect),
            _ => None,
        }
    }
}

impl Workload {
    pub fn spiffe_id(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, &self.key.namespace, &self.service_account)
    }

    /// Resolve a Service `targetPort` against this pod's container ports.
    pub fn resolve_target_port(&self, target: &TargetPort) -> Option<u16> {
        match target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => self
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.port),
        }
    }
}

/// One backend address of a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The resolved target port on the backend.
    pub port: u16,
    pub ready: bool,
    /// The pod behind the address, when known; its service account is the
    /// identity clients expect the server to present.
    pub workload: Option<ObjectKey>,
    pub service_account: Option<String>,
}

/// `(service, service port)`.
pub type ServicePortKey = (ObjectKey, u16);

/// mTLS mode of a port, as the seed (Istio's PeerAuthentication) spells it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mesh mTLS (a client certificate chained to the mesh root).
    Strict,
    /// Mesh mTLS and plaintext on the same port.
    Permissive,
    /// Plaintext only.
    Disable,
    /// Unset: inherit from the next wider scope.
    Default,
}

impl MtlsMode {
    /// The mesh-wide mode when no policy sets one.
    pub const MESH_DEFAULT: MtlsMode = MtlsMode::Permissive;

    /// Canonical (uppercase) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Default => "DEFAULT",
        }
    }

    /// Case-insensitive parse; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_uppercase().as_str() {
            "STRICT" => Some(MtlsMode::Strict),
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            "DISABLE" => Some(MtlsMode::Disable),
            "DEFAULT" => Some(MtlsMode::Default),
            _ => None,
        }
    }

    /// `Some(self)` unless DEFAULT (which means "not set here").
    pub fn set(self) -> Option<Self> {
        (self != MtlsMode::Default).then_some(self)
    }

    /// Ordering by strictness, for merging modes that land on one listener.
    pub fn strictness(self) -> u8 {
        match self {
            MtlsMode::Strict => 3,
            MtlsMode::Permissive | MtlsMode::Default => 2,
            MtlsMode::Disable => 1,
        }
    }

    /// What clients send toward a port in this (effective) mode.
    pub fn client(self) -> ClientTls {
        match self {
            MtlsMode::Disable => ClientTls::Plaintext,
            _ => ClientTls::Mtls,
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client sidecar originates toward a destination port.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum ClientTls {
    /// Mesh mTLS with ALPN `ward-mtls` and the server's SPIFFE ids checked.
    #[serde(rename = "mTLS")]
    Mtls,
    #[serde(rename = "plaintext")]
    Plaintext,
}

/// What a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyScope {
    /// Every service of the mesh (only one such policy may exist).
    Mesh,
    /// Every service of a namespace.
    Namespace(String),
    /// One service (and, through `ports`, its ports).
    Service(ObjectKey),
}

impl fmt::Display for PolicyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyScope::Mesh => f.write_str("mesh"),
            PolicyScope::Namespace(ns) => write!(f, "namespace {ns}"),
            PolicyScope::Service(s) => write!(f, "service {s}"),
        }
    }
}

impl serde::Serialize for PolicyScope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A service port named by number or by name in a policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(untagged)]
pub enum PortSelector {
    Number(u16),
    Name(String),
}

impl PortSelector {
    pub fn matches(&self, port: &ServicePort) -> bool {
        match self {
            PortSelector::Number(n) => port.port == *n,
            PortSelector::Name(name) => port.name == *name,
        }
    }
}

impl fmt::Display for PortSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSelector::Number(n) => write!(f, "{n}"),
            PortSelector::Name(n) => f.write_str(n),
        }
    }
}

/// One mTLS policy, read from one ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    /// The ConfigMap it came from: errors and explanations name it.
    pub config_map: ObjectKey,
    pub scope: PolicyScope,
    /// Mode for the whole scope; DEFAULT = inherit.
    pub mode: MtlsMode,
    /// Per-port modes (service scope only), by port number or name.
    pub ports: BTreeMap<PortSelector, MtlsMode>,
}

/// The mTLS state of one service port: the effective mode policy asks for,
/// and what proxies are configured with right now. The two differ only
/// while a change is being rolled out (see `crate::policy::rollout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortPolicy {
    /// Effective mode after precedence (never DEFAULT).
    pub mode: MtlsMode,
    /// What the server sidecars' inbound listeners accept now.
    pub server: MtlsMode,
    /// What client sidecars originate toward the port now.
    pub client: ClientTls,
}

impl PortPolicy {
    /// The end state for `mode`: servers and clients both at the target.
    pub fn converged(mode: MtlsMode) -> Self {
        let mode = mode.set().unwrap_or(MtlsMode::MESH_DEFAULT);
        Self {
            mode,
            server: mode,
            client: mode.client(),
        }
    }

    pub fn is_converged(&self) -> bool {
        *self == Self::converged(self.mode)
    }
}

/// The whole mesh at one point in time. Immutable once built; shared as
/// `Arc<Mesh>` through a `watch` channel.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Mesh {
    pub services: BTreeMap<ObjectKey, Service>,
    pub workloads: BTreeMap<ObjectKey, Workload>,
    /// Resolved endpoints per service port, sorted.
    #[serde(serialize_with = "ser_port_map")]
    pub endpoints: BTreeMap<ServicePortKey, Vec<Endpoint>>,
    /// Valid policy ConfigMaps, by ConfigMap key (as parsed; checked
    /// against services and resolved by `crate::policy`).
    pub policies: BTreeMap<ObjectKey, Policy>,
    /// mTLS per service port; translation reads it. A port missing here is
    /// [`PortPolicy::converged`] at the mesh default.
    #[serde(serialize_with = "ser_port_map")]
    pub mtls: BTreeMap<ServicePortKey, PortPolicy>,
}

fn ser_port_map<S: serde::Serializer, T: serde::Serialize>(
    m: &BTreeMap<ServicePortKey, T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for ((svc, port), v) in m {
        map.serialize_entry(&format!("{svc}:{port}"), v)?;
    }
    map.end()
}

impl Mesh {
    /// Services whose selector picks this workload, in key order.
    pub fn services_selecting<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Service> {
        self.services.values().filter(move |s| s.selects(w))
    }

    pub fn endpoints(&self, service: &ObjectKey, port: u16) -> &[Endpoint] {
        self.endpoints
            .get(&(service.clone(), port))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Service accounts that back a service (across all its ports): the
    /// SPIFFE identities a client accepts from the server. Empty when no
    /// backend is known.
    pub fn service_accounts(&self, service: &ObjectKey) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .endpoints
            .range((service.clone(), 0)..=(service.clone(), u16::MAX))
            .flat_map(|(_, eps)| eps.iter().filter_map(|e| e.service_account.clone()))
            .collect();
        if let Some(svc) = self.services.get(service) {
            out.extend(
                self.workloads
                    .values()
                    .filter(|w| svc.selects(w))
                    .map(|w| w.service_account.clone()),
            );
        }
        out
    }

    /// [`Mesh::service_accounts`] of every service at once, in
    /// O(workloads × labels) instead of O(services × workloads): each
    /// service is indexed under the first pair of its selector, and a
    /// workload is only checked against the services indexed under one of
    /// its own labels. Translation calls this once per mesh.
    pub fn service_accounts_by_service(&self) -> BTreeMap<&ObjectKey, BTreeSet<&str>> {
        let mut out: BTreeMap<&ObjectKey, BTreeSet<&str>> = BTreeMap::new();
        // (namespace, label key, label value) -> services whose selector starts with it.
        let mut by_first_label: std::collections::HashMap<(&str, &str, &str), Vec<&Service>> =
            std::collections::HashMap::new();
        for svc in self.services.values() {
            let mut accounts = BTreeSet::new();
            for (_, eps) in self
                .endpoints
                .range((svc.key.clone(), 0)..=(svc.key.clone(), u16::MAX))
            {
                accounts.extend(eps.iter().filter_map(|e| e.service_account.as_deref()));
            }
            out.insert(&svc.key, accounts);
            if let Some((k, v)) = svc.selector.iter().next() {
                by_first_label
                    .entry((svc.key.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(svc);
            }
        }
        for w in self.workloads.values() {
            for (k, v) in &w.labels {
                let Some(services) =
                    by_first_label.get(&(w.key.namespace.as_str(), k.as_str(), v.as_str()))
                else {
                    continue;
                };
                for svc in services.iter().filter(|s| s.selects(w)) {
                    if let Some(set) = out.get_mut(&svc.key) {
                        set.insert(w.service_account.as_str());
                    }
                }
            }
        }
        out
    }

    /// mTLS state of a service port (mesh default when no policy resolved it).
    pub fn port_policy(&self, service: &ObjectKey, port: u16) -> PortPolicy {
        self.mtls
            .get(&(service.clone(), port))
            .copied()
            .unwrap_or_else(|| PortPolicy::converged(MtlsMode::MESH_DEFAULT))
    }

    /// Does any pod with a sidecar back this service? Destinations outside
    /// the mesh get plaintext from clients.
    pub fn has_sidecars(&self, service: &ObjectKey) -> bool {
        !self.service_accounts(service).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_uri() {
        let id = SpiffeId::new("cluster.local", "demo", "server");
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/demo/sa/server");
    }

    #[test]
    fn protocol_detection_follows_kubernetes_conventions() {
        assert_eq!(Protocol::detect(Some("http"), None), Protocol::Http);
        assert_eq!(
            Protocol::detect(Some("kubernetes.io/h2c"), None),
            Protocol::Http
        );
        assert_eq!(Protocol::detect(Some("grpc"), Some("tcp")), Protocol::Http);
        assert_eq!(Protocol::detect(Some("tcp"), Some("http")), Protocol::Tcp);
        assert_eq!(Protocol::detect(None, Some("http-web")), Protocol::Http);
        assert_eq!(Protocol::detect(None, Some("grpc-api")), Protocol::Http);
        assert_eq!(Protocol::detect(None, Some("redis")), Protocol::Tcp);
        assert_eq!(Protocol::detect(None, Some("httpx")), Protocol::Tcp);
        assert_eq!(Protocol::detect(None, None), Protocol::Tcp);
    }

    #[test]
    fn mesh_serializes_to_json_with_string_keys() {
        let mut mesh = Mesh::default();
        let w = workload("demo", "s-1", "server", &[("app", "server")]);
        mesh.workloads.insert(w.key.clone(), w);
        let json = serde_json::to_value(&mesh).unwrap();
        assert_eq!(json["workloads"]["demo/s-1"]["service_account"], "server");
        let key: ObjectKey = serde_json::from_str("\"demo/s-1\"").unwrap();
        assert_eq!(key, ObjectKey::new("demo", "s-1"));
    }

    #[test]
    fn object_key_parse() {
        let k: ObjectKey = "demo/server".parse().unwrap();
        assert_eq!(k, ObjectKey::new("demo", "server"));
        assert!("demo".parse::<ObjectKey>().is_err());
        assert!("/x".parse::<ObjectKey>().is_err());
        assert!("a/b/c".parse::<ObjectKey>().is_err());
    }

    fn workload(ns: &str, name: &str, sa: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            key: ObjectKey::new(ns, name),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            service_account: sa.into(),
            ip: "127.0.0.10".parse().unwrap(),
            ready: true,
            ports: vec![ContainerPort {
                name: Some("web".into()),
                port: 8080,
            }],
            app_ip: "127.0.0.1".parse().unwrap(),
            outbound_ip: "127.0.0.10".parse().unwrap(),
            interception: Default::default(),
        }
    }

    #[test]
    fn service_accounts_by_service_matches_the_per_service_scan() {
        let svc = |ns: &str, name: &str, sel: &[(&str, &str)]| Service {
            key: ObjectKey::new(ns, name),
            ports: vec![],
            selector: sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cluster_ips: Vec::new(),
        };
        let mut mesh = Mesh::default();
        for s in [
            svc("demo", "web", &[("app", "web")]),
            // Two labels: the index is on the first, both must match.
            svc("demo", "web-v2", &[("app", "web"), ("version", "v2")]),
            svc("demo", "by-tier", &[("tier", "front")]),
            svc("demo", "no-selector", &[]),
            svc("other", "web", &[("app", "web")]),
        ] {
            mesh.services.insert(s.key.clone(), s);
        }
        for w in [
            workload("demo", "w1", "sa-web", &[("app", "web"), ("version", "v1")]),
            workload(
                "demo",
                "w2",
                "sa-v2",
                &[("app", "web"), ("version", "v2"), ("tier", "front")],
            ),
            workload("other", "w3", "sa-other", &[("app", "web")]),
            workload("demo", "w4", "sa-none", &[("app", "db")]),
        ] {
            mesh.workloads.insert(w.key.clone(), w);
        }
        // A selector-less service gets accounts only from its endpoints.
        mesh.endpoints.insert(
            (ObjectKey::new("demo", "no-selector"), 80),
            vec![Endpoint {
                ip: "10.0.0.9".parse().unwrap(),
                port: 80,
                ready: true,
                workload: None,
                service_account: Some("sa-external".into()),
            }],
        );
        let index = mesh.service_accounts_by_service();
        assert_eq!(index.len(), mesh.services.len());
        for key in mesh.services.keys() {
            let scanned = mesh.service_accounts(key);
            let indexed: BTreeSet<String> = index[key].iter().map(|s| s.to_string()).collect();
            assert_eq!(indexed, scanned, "{key}");
        }
        assert_eq!(
            index[&ObjectKey::new("demo", "web")],
            ["sa-v2", "sa-web"].into()
        );
        assert_eq!(index[&ObjectKey::new("demo", "web-v2")], ["sa-v2"].into());
        assert_eq!(
            index[&ObjectKey::new("demo", "no-selector")],
            ["sa-external"].into()
        );
    }

    #[test]
    fn selection_needs_same_namespace_and_all_labels() {
        let svc = Service {
            key: ObjectKey::new("demo", "server"),
            ports: vec![],
            selector: [("app".to_string(), "server".to_string())].into(),
            cluster_ips: Vec::new(),
        };
        assert!(svc.selects(&workload(
            "demo",
            "s-1",
            "server",
            &[("app", "server"), ("x", "y")]
        )));
        assert!(!svc.selects(&workload("other", "s-1", "server", &[("app", "server")])));
        assert!(!svc.selects(&workload("demo", "c-1", "client", &[("app", "client")])));
        let no_selector = Service {
            selector: BTreeMap::new(),
            cluster_ips: Vec::new(),
            ..svc
        };
        assert!(!no_selector.selects(&workload("demo", "s-1", "server", &[("app", "server")])));
    }

    #[test]
    fn target_port_resolution() {
        let w = workload("demo", "s-1", "server", &[]);
        assert_eq!(w.resolve_target_port(&TargetPort::Number(9000)), Some(9000));
        assert_eq!(
            w.resolve_target_port(&TargetPort::Name("web".into())),
            Some(8080)
        );
        assert_eq!(
            w.resolve_target_port(&TargetPort::Name("nope".into())),
            None
        );
    }
}
