//! Explain a service's mTLS: per port, the effective mode, the chain of
//! policies that produced it, what servers accept and clients send right
//! now, the rollout step in progress, and (when the server sidecars' Envoy
//! admin can be reached) how many mTLS and plaintext connections they saw.
//! `ward describe service` prints it; `/debug/policy` serves it as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::resolve::{ChainLink, Level, Resolved};
use crate::model::{
    ClientTls, Mesh, MtlsMode, ObjectKey, Service, ServicePortKey, TargetPort, Workload,
};
use crate::translate::listener::inbound_chain_stat_prefix;

/// Where `ward bootstrap` puts a sidecar's Envoy admin by default (on the pod IP).
pub const DEFAULT_ENVOY_ADMIN_PORT: u16 = 15000;

/// Why connection counts or a remote explanation could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("service {0} does not exist")]
    UnknownService(ObjectKey),
    #[error("Ward admin at {addr}: {message}")]
    Admin { addr: String, message: String },
}

/// Connections a port's server sidecars accepted, by kind, summed over the
/// sidecars that could be asked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCounts {
    /// Mesh mTLS connections (`*_mtls` filter chains).
    pub mtls: u64,
    /// Plaintext connections (`*_plaintext`).
    pub plaintext: u64,
    /// An application's own TLS passed through (`*_passthrough`).
    pub passthrough: u64,
    /// Sidecars whose stats are included.
    pub from: Vec<String>,
    /// Sidecars that could not be asked, with the reason.
    pub unavailable: Vec<String>,
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortExplain {
    pub port: u16,
    pub name: String,
    pub target_port: TargetPort,
    /// The effective (target) mode.
    pub mode: MtlsMode,
    /// Which level decided it; `None` = Ward's mesh default (PERMISSIVE).
    pub decided_by: Option<Level>,
    /// mesh → namespace → service → port.
    pub chain: Vec<ChainLink>,
    /// What the server sidecars accept now (differs from `mode` mid-rollout).
    pub servers_accept: MtlsMode,
    /// What client sidecars originate now.
    pub clients_send: ClientTls,
    /// The rollout step in progress for this port, if any.
    pub rollout_step: Option<String>,
    /// Filled by [`gather_counts`] when the sidecars can be reached.
    pub connections: Option<ConnectionCounts>,
}

/// A server sidecar of the service and the target port of each service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub pod: ObjectKey,
    pub ip: IpAddr,
    /// Service port → resolved target port on this pod.
    pub target_ports: BTreeMap<u16, u16>,
}

/// One service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceExplain {
    pub service: ObjectKey,
    /// Clients send plaintext to a service without sidecars (unless STRICT).
    pub has_sidecars: bool,
    pub ports: Vec<PortExplain>,
    pub backends: Vec<Backend>,
}

/// Explain `service` from a mesh whose `mtls` holds the applied state,
/// the resolution and the steps in progress (by service port).
pub fn explain_service(
    mesh: &Mesh,
    resolved: &BTreeMap<ServicePortKey, Resolved>,
    steps: &BTreeMap<ServicePortKey, String>,
    service: &ObjectKey,
) -> Result<ServiceExplain, ExplainError> {
    let svc = mesh
        .services
        .get(service)
        .ok_or_else(|| ExplainError::UnknownService(service.clone()))?;
    Ok(explain_with(
        mesh,
        resolved,
        steps,
        svc,
        mesh.workloads.values(),
        mesh.has_sidecars(&svc.key),
    ))
}

/// [`explain_service`] for every service of the mesh, by `namespace/name`.
/// Selector matching goes through an index of workloads by label, so this
/// is O(workloads × labels), not O(services × workloads): the policy
/// controller refreshes it on every mesh change.
pub fn explain_services(
    mesh: &Mesh,
    resolved: &BTreeMap<ServicePortKey, Resolved>,
    steps: &BTreeMap<ServicePortKey, String>,
) -> BTreeMap<String, ServiceExplain> {
    let accounts = mesh.service_accounts_by_service();
    let mut by_label: std::collections::HashMap<(&str, &str, &str), Vec<&Workload>> =
        std::collections::HashMap::new();
    for w in mesh.workloads.values() {
        for (k, v) in &w.labels {
            by_label
                .entry((w.key.namespace.as_str(), k.as_str(), v.as_str()))
                .or_default()
                .push(w);
        }
    }
    mesh.services
        .values()
        .map(|svc| {
            // Every workload a selector picks carries its first label.
            let candidates = svc
                .selector
                .iter()
                .next()
                .and_then(|(k, v)| {
                    by_label.get(&(svc.key.namespace.as_str(), k.as_str(), v.as_str()))
                })
                .map(Vec::as_slice)
                .unwrap_or_default();
            let has_sidecars = accounts.get(&svc.key).is_some_and(|a| !a.is_empty());
            (
                svc.key.to_string(),
                explain_with(
                    mesh,
                    resolved,
                    steps,
                    svc,
                    candidates.iter().copied(),
                    has_sidecars,
                ),
            )
        })
        .collect()
}

fn explain_with<'a>(
    mesh: &Mesh,
    resolved: &BTreeMap<ServicePortKey, Resolved>,
    steps: &BTreeMap<ServicePortKey, String>,
    svc: &Service,
    backends: impl Iterator<Item = &'a Workload>,
    has_sidecars: bool,
) -> ServiceExplain {
    let ports = svc
        .ports
        .iter()
        .map(|p| {
            let key = (svc.key.clone(), p.port);
            let applied = mesh.port_policy(&svc.key, p.port);
            let r = resolved.get(&key);
            PortExplain {
                port: p.port,
                name: p.name.clone(),
                target_port: p.target_port.clone(),
                mode: r.map_or(applied.mode, |r| r.mode),
                decided_by: r.and_then(|r| r.decided_by),
                chain: r.map(|r| r.chain.clone()).unwrap_or_default(),
                servers_accept: applied.server,
                clients_send: if crate::translate::cluster::originates_mtls_with(
                    mesh,
                    svc,
                    p,
                    has_sidecars,
                ) {
                    ClientTls::Mtls
                } else {
                    ClientTls::Plaintext
                },
                rollout_step: steps.get(&key).cloned(),
                connections: None,
            }
        })
        .collect();
    let backends = backends
        .filter(|w| svc.selects(w))
        .map(|w| Backend {
            pod: w.key.clone(),
            ip: w.ip,
            target_ports: svc
                .ports
                .iter()
                .filter_map(|p| w.resolve_target_port(&p.target_port).map(|t| (p.port, t)))
                .collect(),
        })
        .collect();
    ServiceExplain {
        service: svc.key.clone(),
        has_sidecars,
        ports,
        backends,
    }
}

/// Ask each backend's Envoy admin (`<pod IP>:<envoy_admin_port>`) for the
/// per-filter-chain connection counters and fill `connections`.
pub async fn gather_counts(explain: &mut ServiceExplain, envoy_admin_port: u16) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    // One stats fetch per backend, shared by every port.
    let mut stats: BTreeMap<ObjectKey, Result<String, String>> = BTreeMap::new();
    for b in &explain.backends {
        let addr = SocketAddr::new(b.ip, envoy_admin_port);
        let res = async {
            http.get(format!("http://{addr}/stats?filter=inbound_"))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        stats.insert(
            b.pod.clone(),
            res.map_err(|e| format!("{} ({addr}): {e}", b.pod)),
        );
    }
    for port in &mut explain.ports {
        let mut counts = ConnectionCounts::default();
        for b in &explain.backends {
            let Some(target) = b.target_ports.get(&port.port) else {
                continue;
            };
            match &stats[&b.pod] {
                Ok(text) => {
                    counts.mtls += counter(text, *target, "mtls");
                    counts.plaintext += counter(text, *target, "plaintext");
                    counts.passthrough += counter(text, *target, "passthrough");
                    counts.from.push(b.pod.to_string());
                }
                Err(e) => counts.unavailable.push(e.clone()),
            }
        }
        port.connections = Some(counts);
    }
}

/// `downstream_cx_total` of one inbound filter chain kind, HTTP or TCP.
fn counter(stats: &str, target_port: u16, kind: &str) -> u64 {
    let prefix = inbound_chain_stat_prefix(target_port, kind);
    stats
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(name, _)| {
            [
                format!("http.{prefix}.downstream_cx_total"),
                format!("tcp.{prefix}.downstream_cx_total"),
            ]
            .iter()
            .any(|n| n == name)
        })
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// Human-readable form for `ward describe service`.
pub fn render(e: &ServiceExplain) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "service {}  ({})",
        e.service,
        if e.has_sidecars {
            format!("{} server sidecar(s)", e.backends.len())
        } else {
            "no sidecars: outside the mesh".into()
        }
    );
    for p in &e.ports {
        let target = match &p.target_port {
            TargetPort::Number(n) => n.to_string(),
            TargetPort::Name(n) => n.clone(),
        };
        let name = if p.name.is_empty() { "-" } else { &p.name };
        let _ = writeln!(
            out,
            "\nport {} (name {name}, targetPort {target}): {}",
            p.port, p.mode
        );
        let chain: Vec<String> = p
            .chain
            .iter()
            .map(|l| match (&l.config_map, l.mode) {
                (Some(cm), Some(m)) => format!("{} {m} (ConfigMap {cm})", l.level.as_str()),
                _ => format!("{} unset", l.level.as_str()),
            })
            .collect();
        let by = match p.decided_by {
            Some(l) => format!("decided at the {} level", l.as_str()),
            None => format!("no policy sets it: mesh default {}", MtlsMode::MESH_DEFAULT),
        };
        let _ = writeln!(
            out,
            "  chain:          {}  => {} ({by})",
            chain.join(" -> "),
            p.mode
        );
        let _ = writeln!(out, "  servers accept: {}", accept(p.servers_accept));
        let _ = writeln!(
            out,
            "  clients send:   {}",
            match p.clients_send {
                ClientTls::Mtls => "mTLS",
                ClientTls::Plaintext => "plaintext",
            }
        );
        let _ = writeln!(
            out,
            "  rollout:        {}",
            p.rollout_step
                .as_deref()
                .unwrap_or("none in progress (converged)")
        );
        let conns = match &p.connections {
            None => "not available (run with --admin-addr and reachable sidecar admin ports to see them)".to_string(),
            Some(c) if c.from.is_empty() => format!(
                "not available: no server sidecar's Envoy admin answered ({})",
                if c.unavailable.is_empty() { "no backends".to_string() } else { c.unavailable.join("; ") }
            ),
            Some(c) => {
                let mut s = format!(
                    "mTLS {}, plaintext {}, TLS passed through {} (from {} of {} sidecars)",
                    c.mtls,
                    c.plaintext,
                    c.passthrough,
                    c.from.len(),
                    c.from.len() + c.unavailable.len()
                );
                if c.plaintext == 0 && p.mode != MtlsMode::Strict {
                    s.push_str("; no plaintext seen: going STRICT would refuse no one seen so far");
                }
                s
            }
        };
        let _ = writeln!(out, "  connections:    {conns}");
    }
    out
}

fn accept(m: MtlsMode) -> &'static str {
    match m {
        MtlsMode::Strict => "mTLS only (STRICT)",
        MtlsMode::Permissive | MtlsMode::Default => "mTLS and plaintext (PERMISSIVE)",
        MtlsMode::Disable => "plaintext only (DISABLE)",
    }
}

/// Fetch a service's explanation from a running Ward's `/debug/policy`.
pub async fn fetch(admin: &str, service: &ObjectKey) -> Result<ServiceExplain, ExplainError> {
    let err = |message: String| ExplainError::Admin {
        addr: admin.to_string(),
        message,
    };
    let v: serde_json::Value = reqwest::get(format!("http://{admin}/debug/policy"))
        .await
        .map_err(|e| err(format!("is Ward running there? {e}")))?
        .json()
        .await
        .map_err(|e| err(e.to_string()))?;
    let s = v["services"]
        .get(service.to_string())
        .cloned()
        .ok_or_else(|| ExplainError::UnknownService(service.clone()))?;
    serde_json::from_value(s).map_err(|e| err(format!("unexpected /debug/policy JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_services_equals_explain_service_for_each_service() {
        let tmp = tempfile::tempdir().unwrap();
        // Pods spread over services, plus a pod of another namespace and a
        // service whose selector is on two labels.
        let mut yaml = crate::meshgen::mesh_yaml(&crate::meshgen::MeshSpec {
            services: 3,
            pods: 7,
        });
        yaml.push_str(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: pair, namespace: load}\n\
             spec:\n  selector: {app: svc-1, tier: web}\n  ports:\n  - {name: http, port: 9000, targetPort: 9000}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: load, labels: {app: svc-1, tier: web}}\n\
             spec:\n  serviceAccountName: web\n  containers:\n  - name: app\n    ports:\n    - {name: http, containerPort: 9000}\n\
             status: {podIP: 10.9.0.1}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: stray, namespace: other, labels: {app: svc-1}}\n\
             status: {podIP: 10.9.0.2}\n",
        );
        std::fs::write(tmp.path().join("mesh.yaml"), yaml).unwrap();
        let (mesh, _, errors) = crate::discovery::DirSource::load_once(tmp.path()).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let resolved = crate::policy::resolve::resolve(&mesh, &BTreeMap::new());
        let all = explain_services(&mesh, &resolved, &BTreeMap::new());
        assert_eq!(all.len(), mesh.services.len());
        for key in mesh.services.keys() {
            let one = explain_service(&mesh, &resolved, &BTreeMap::new(), key).unwrap();
            assert_eq!(all[&key.to_string()], one, "{key}");
        }
        assert_eq!(all["load/pair"].backends.len(), 1);
        assert_eq!(
            all["load/svc-1"].backends.len(),
            3,
            "2 generated pods + web-1"
        );
    }

    #[test]
    fn counters_are_read_per_chain_kind() {
        let stats = "http.inbound_8080_mtls.downstream_cx_total: 7\n\
                     http.inbound_8080_plaintext.downstream_cx_total: 3\n\
                     http.inbound_8080_plaintext.downstream_cx_active: 1\n\
                     tcp.inbound_8080_passthrough.downstream_cx_total: 2\n\
                     http.inbound_80800_mtls.downstream_cx_total: 99\n";
        assert_eq!(counter(stats, 8080, "mtls"), 7);
        assert_eq!(counter(stats, 8080, "plaintext"), 3);
        assert_eq!(counter(stats, 8080, "passthrough"), 2);
    }
}
