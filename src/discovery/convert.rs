//! Kubernetes objects → the mesh model. Pure and deterministic: the same
//! [`ObjectSet`] always gives the same [`Mesh`] and the same errors, in the
//! same order.
//!
//! Each object is validated on its own; an invalid object is left out and
//! reported, and every other object is unaffected.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::objects::{KubeObject, ObjectKind, ObjectSet};
use super::{
    APP_IP_ANNOTATION, ConfigError, INTERCEPTION_ANNOTATION, OUTBOUND_IP_ANNOTATION,
    SERVICE_NAME_LABEL,
};
use crate::model::{
    ContainerPort, Endpoint, Interception, Mesh, ObjectKey, Protocol, Service, ServicePort,
    TargetPort, Workload,
};

/// The namespace of an object that names none, as `kubectl apply` assumes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where the local application listens when a pod does not say
/// (`ward.io/app-ip`): it shares the pod's network namespace.
pub const DEFAULT_APP_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Build the mesh from raw objects. Returns the mesh made of every valid
/// object and the errors of every invalid one (each naming the object and
/// field; `source` is filled from [`ObjectSet::origins`]).
pub fn build_mesh(objects: &ObjectSet) -> (Mesh, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut report = |kind: ObjectKind, key: &ObjectKey, errs: Vec<ConfigError>| {
        let source = objects.origin(kind, key).map(Path::to_path_buf);
        errors.extend(errs.into_iter().map(|mut e| {
            e.source = source.clone();
            e
        }));
    };

    let mut mesh = Mesh::default();
    for (key, svc) in &objects.services {
        match convert_service(key, svc) {
            Ok(s) => {
                mesh.services.insert(key.clone(), s);
            }
            Err(errs) => report(ObjectKind::Service, key, errs),
        }
    }
    for (key, pod) in &objects.pods {
        match convert_pod(key, pod) {
            Ok(Some(w)) => {
                mesh.workloads.insert(key.clone(), w);
            }
            Ok(None) => {}
            Err(errs) => report(ObjectKind::Pod, key, errs),
        }
    }

    // Valid slices by the Service they belong to: (namespace, service name).
    let mut slices_by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for (key, slice) in &objects.endpoint_slices {
        let errs = check_endpoint_slice(key, slice);
        if !errs.is_empty() {
            report(ObjectKind::EndpointSlice, key, errs);
            continue;
        }
        if let Some(svc) = label(&slice.metadata, SERVICE_NAME_LABEL) {
            slices_by_service
                .entry((key.namespace.as_str(), svc))
                .or_default()
                .push(slice);
        }
    }

    // Workloads by (namespace, label, value), in key order, so selector
    // matching only looks at pods carrying the selector's first label: a
    // scan of the namespace per Service was O(services × pods) per reload.
    let mut workloads_by_label: std::collections::HashMap<(&str, &str, &str), Vec<&Workload>> =
        std::collections::HashMap::new();
    for w in mesh.workloads.values() {
        for (k, v) in &w.labels {
            workloads_by_label
                .entry((w.key.namespace.as_str(), k.as_str(), v.as_str()))
                .or_default()
                .push(w);
        }
    }

    let mut endpoints = BTreeMap::new();
    for svc in mesh.services.values() {
        let slices = slices_by_service.get(&(svc.key.namespace.as_str(), svc.key.name.as_str()));
        // A Service without selector selects nothing (`Service::selects`).
        let candidates = svc
            .selector
            .iter()
            .next()
            .and_then(|(k, v)| {
                workloads_by_label.get(&(svc.key.namespace.as_str(), k.as_str(), v.as_str()))
            })
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in &svc.ports {
            let eps = match slices {
                Some(slices) => endpoints_from_slices(&svc.key.namespace, slices, port, objects),
                None => {
                    let (eps, errs) = endpoints_from_pods(svc, port, candidates, objects);
                    report(ObjectKind::Service, &svc.key, errs);
                    eps
                }
            };
            endpoints.insert((svc.key.clone(), port.port), normalize(eps));
        }
    }
    mesh.endpoints = endpoints;

    // Policy ConfigMaps: parsed, checked against the services, resolved to
    // the converged mode of every port (a rollout, if any, is the policy
    // controller's business: it rewrites `mesh.mtls` while it runs).
    for (key, cm) in &objects.config_maps {
        match crate::policy::schema::parse_config_map(key, cm) {
            Ok(p) => {
                mesh.policies.insert(key.clone(), p);
            }
            Err(errs) => report(ObjectKind::ConfigMap, key, errs),
        }
    }
    // Errors of the selection (unknown service or port, two policies for
    // a scope) are reported by the policy controller, which also knows
    // each ConfigMap's last good version; here the offline view is built.
    let selection = crate::policy::resolve::select(&mesh, &BTreeMap::new());
    mesh.mtls = crate::policy::resolve::converged(&crate::policy::resolve::resolve(
        &mesh,
        &selection.in_force,
    ));
    (mesh, errors)
}

/// The key of an object from its metadata: `metadata.name` is required,
/// `metadata.namespace` defaults to [`DEFAULT_NAMESPACE`]. `object` names
/// the object in the error (e.g. `document 2`).
pub fn object_key(meta: &ObjectMeta, object: &str) -> Result<ObjectKey, ConfigError> {
    let name = match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n,
        _ => return Err(ConfigError::new(object, "metadata.name", "is required")),
    };
    let namespace = match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    };
    Ok(ObjectKey::new(namespace, name))
}

/// Validate one object on its own (what [`build_mesh`] would reject it
/// for). Lets the directory source decide whether a file is good before
/// merging it. Policy ConfigMaps are parsed by `crate::policy::schema`.
pub fn validate_object(key: &ObjectKey, obj: &KubeObject) -> Vec<ConfigError> {
    match obj {
        KubeObject::Service(s) => convert_service(key, s).err().unwrap_or_default(),
        KubeObject::Pod(p) => convert_pod(key, p).err().unwrap_or_default(),
        KubeObject::EndpointSlice(s) => check_endpoint_slice(key, s),
        KubeObject::ConfigMap(c) => crate::policy::schema::parse_config_map(key, c)
            .err()
            .unwrap_or_default(),
    }
}

/// A Kubernetes Service as a model Service: TCP ports only (UDP and SCTP
/// are not proxied), sorted by number, `targetPort` defaulting to `port`.
pub fn convert_service(key: &ObjectKey, svc: &KubeService) -> Result<Service, Vec<ConfigError>> {
    let object = ObjectKind::Service.describe(key);
    let err = |field: String, message: String| ConfigError::new(&object, field, message);
    let mut errors = Vec::new();
    let spec = svc.spec.as_ref();
    let raw_ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();

    let mut ports: Vec<ServicePort> = Vec::new();
    // Index in spec.ports of the first port with a given name / TCP number,
    // to name both in duplicate errors.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut numbers: BTreeMap<i32, usize> = BTreeMap::new();
    for (i, p) in raw_ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let name = p.name.as_deref().unwrap_or_default();
        if name.is_empty() {
            if raw_ports.len() > 1 {
                errors.push(err(
                    field("name"),
                    "is required when a Service has more than one port".into(),
                ));
            }
        } else if let Some(first) = names.insert(name, i) {
            names.insert(name, first);
            errors.push(err(
                field("name"),
                format!("duplicate port name {name:?} (also spec.ports[{first}].name)"),
            ));
        }

        match p.protocol.as_deref() {
            None | Some("TCP") => {}
            // Valid Kubernetes, but Envoy sidecars here proxy TCP only.
            Some("UDP") | Some("SCTP") => continue,
            Some(other) => {
                errors.push(err(
                    field("protocol"),
                    format!("{other:?} is not a protocol (TCP, UDP or SCTP)"),
                ));
                continue;
            }
        }

        let Some(port) = valid_port(p.port) else {
            errors.push(err(
                field("port"),
                format!("must be 1-65535, got {}", p.port),
            ));
            continue;
        };
        if let Some(first) = numbers.insert(p.port, i) {
            numbers.insert(p.port, first);
            errors.push(err(
                field("port"),
                format!("duplicate port {port} (also spec.ports[{first}].port)"),
            ));
        }

        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => match valid_port(*n) {
                Some(n) => TargetPort::Number(n),
                None => {
                    errors.push(err(
                        field("targetPort"),
                        format!("must be 1-65535, got {n}"),
                    ));
                    continue;
                }
            },
            Some(IntOrString::String(s)) => {
                if !is_port_name(s) {
                    errors.push(err(
                        field("targetPort"),
                        format!(
                            "{s:?} is neither a port number nor a port name \
                             (1-15 lowercase letters, digits and '-', at least one letter)"
                        ),
                    ));
                    continue;
                }
                TargetPort::Name(s.clone())
            }
        };
        ports.push(ServicePort {
            name: name.to_string(),
            port,
            target_port,
            protocol: Protocol::detect(p.app_protocol.as_deref(), p.name.as_deref()),
        });
    }
    let cluster_ips = cluster_ips(spec, &err, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    ports.sort_by_key(|p| p.port);
    Ok(Service {
        key: key.clone(),
        ports,
        selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
        cluster_ips,
    })
}

/// `spec.clusterIPs` (falling back to `spec.clusterIP`), without the
/// headless marker `None`; sorted and deduplicated.
fn cluster_ips(
    spec: Option<&k8s_openapi::api::core::v1::ServiceSpec>,
    err: &impl Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) -> Vec<IpAddr> {
    let Some(spec) = spec else {
        return Vec::new();
    };
    let raw: Vec<(String, &str)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        (_, Some(ip)) => vec![("spec.clusterIP".to_string(), ip.as_str())],
        _ => Vec::new(),
    };
    let mut ips = Vec::new();
    for (field, ip) in raw {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match parse_ip(ip) {
            Ok(ip) => ips.push(ip),
            Err(m) => errors.push(err(field, m)),
        }
    }
    ips.sort();
    ips.dedup();
    ips
}

/// A Kubernetes Pod as a model Workload. `Ok(None)` for pods that are not
/// (or no longer) workloads: finished, being deleted, or not yet given an
/// IP.
pub fn convert_pod(key: &ObjectKey, pod: &Pod) -> Result<Option<Workload>, Vec<ConfigError>> {
    let object = ObjectKind::Pod.describe(key);
    let status = pod.status.as_ref();
    if pod.metadata.deletion_timestamp.is_some()
        || matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        )
    {
        return Ok(None);
    }
    let Some(raw_ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
    else {
        return Ok(None);
    };

    let mut errors = Vec::new();
    let ip = parse_ip(raw_ip)
        .map_err(|m| errors.push(ConfigError::new(&object, "status.podIP", m)))
        .ok();
    let annotation = |name: &str| -> Result<Option<IpAddr>, ConfigError> {
        match pod.metadata.annotations.as_ref().and_then(|a| a.get(name)) {
            None => Ok(None),
            Some(v) => parse_ip(v).map(Some).map_err(|m| {
                ConfigError::new(&object, format!("metadata.annotations[{name:?}]"), m)
            }),
        }
    };
    let app_ip = annotation(APP_IP_ANNOTATION)
        .map_err(|e| errors.push(e))
        .ok()
        .flatten();
    let outbound_ip = annotation(OUTBOUND_IP_ANNOTATION)
        .map_err(|e| errors.push(e))
        .ok()
        .flatten();

    let interception = match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INTERCEPTION_ANNOTATION))
    {
        None => Interception::Explicit,
        Some(v) => Interception::parse(v).unwrap_or_else(|| {
            errors.push(ConfigError::new(
                &object,
                format!("metadata.annotations[{INTERCEPTION_ANNOTATION:?}]"),
                format!("{v:?} is not an interception mode (explicit or redirect)"),
            ));
            Interception::Explicit
        }),
    };

    let mut ports = Vec::new();
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    for (i, c) in containers.iter().enumerate() {
        for (j, p) in c.ports.as_deref().unwrap_or_default().iter().enumerate() {
            // Kubernetes resolves a named targetPort only among ports of the
            // Service port's protocol; Ward only proxies TCP.
            if !matches!(p.protocol.as_deref(), None | Some("TCP")) {
                continue;
            }
            match valid_port(p.container_port) {
                Some(port) => ports.push(ContainerPort {
                    name: p.name.clone().filter(|n| !n.is_empty()),
                    port,
                }),
                None => errors.push(ConfigError::new(
                    &object,
                    format!("spec.containers[{i}].ports[{j}].containerPort"),
                    format!("must be 1-65535, got {}", p.container_port),
                )),
            }
        }
    }

    let Some(ip) = ip.filter(|_| errors.is_empty()) else {
        return Err(errors);
    };
    let ready = match status.and_then(|s| s.conditions.as_ref()) {
        // Hand-written directory YAML has no status conditions; a pod there
        // is as ready as its author says by listing it.
        None => true,
        Some(conds) => conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
    };
    Ok(Some(Workload {
        key: key.clone(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account: service_account(pod),
        ip,
        ready,
        ports,
        // With redirected traffic the sidecar forwards to the pod IP, where
        // a Kubernetes app listens (on it or on 0.0.0.0); its own connection
        // is not redirected again (iptables exempts the proxy's uid).
        app_ip: app_ip.unwrap_or(match interception {
            Interception::Explicit => DEFAULT_APP_IP,
            Interception::Redirect => ip,
        }),
        outbound_ip: outbound_ip.unwrap_or(ip),
        interception,
    }))
}

/// Validate an EndpointSlice: address type, port numbers, and (for IP
/// slices) that every address is an IP.
pub fn check_endpoint_slice(key: &ObjectKey, slice: &EndpointSlice) -> Vec<ConfigError> {
    let object = ObjectKind::EndpointSlice.describe(key);
    let mut errors = Vec::new();
    let is_ip = match slice.address_type.as_str() {
        "IPv4" | "IPv6" => true,
        "FQDN" => false,
        other => {
            errors.push(ConfigError::new(
                &object,
                "addressType",
                format!("{other:?} is not an address type (IPv4, IPv6 or FQDN)"),
            ));
            false
        }
    };
    for (i, p) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(n) = p.port
            && valid_port(n).is_none()
        {
            errors.push(ConfigError::new(
                &object,
                format!("ports[{i}].port"),
                format!("must be 1-65535, got {n}"),
            ));
        }
    }
    if is_ip {
        for (i, ep) in slice.endpoints.iter().enumerate() {
            for (j, addr) in ep.addresses.iter().enumerate() {
                if let Err(m) = parse_ip(addr) {
                    errors.push(ConfigError::new(
                        &object,
                        format!("endpoints[{i}].addresses[{j}]"),
                        m,
                    ));
                }
            }
        }
    }
    errors
}

fn endpoints_from_slices(
    namespace: &str,
    slices: &[&EndpointSlice],
    port: &ServicePort,
    objects: &ObjectSet,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        // Kubernetes matches slice ports to Service ports by name ("" for a
        // single unnamed port).
        let Some(target) = slice
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|p| p.name.as_deref().unwrap_or_default() == port.name)
            .filter(|p| matches!(p.protocol.as_deref(), None | Some("TCP")))
            .find_map(|p| p.port.and_then(valid_port))
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let workload = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let name = r.name.as_deref()?;
                    Some(ObjectKey::new(
                        r.namespace.as_deref().unwrap_or(namespace),
                        name,
                    ))
                });
            // The pod's account even when it is no longer a workload (e.g.
            // terminating): clients still verify its certificate.
            let service_account = workload
                .as_ref()
                .and_then(|k| objects.pods.get(k))
                .map(service_account);
            for addr in &ep.addresses {
                // Validated by check_endpoint_slice.
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                out.push(Endpoint {
                    ip,
                    port: target,
                    ready,
                    workload: workload.clone(),
                    service_account: service_account.clone(),
                });
            }
        }
    }
    out
}

fn endpoints_from_pods(
    svc: &Service,
    port: &ServicePort,
    candidates: &[&Workload],
    objects: &ObjectSet,
) -> (Vec<Endpoint>, Vec<ConfigError>) {
    let mut eps = Vec::new();
    let mut errors = Vec::new();
    for w in candidates.iter().filter(|w| svc.selects(w)) {
        match w.resolve_target_port(&port.target_port) {
            Some(p) => eps.push(Endpoint {
                ip: w.ip,
                port: p,
                ready: w.ready,
                workload: Some(w.key.clone()),
                service_account: Some(w.service_account.clone()),
            }),
            None => {
                let index = spec_port_index(objects, &svc.key, port);
                errors.push(ConfigError::new(
                    ObjectKind::Service.describe(&svc.key),
                    format!("spec.ports[{index}].targetPort"),
                    format!(
                        "pod {} has no container port named {:?}; it is not an endpoint of port {}",
                        w.key,
                        match &port.target_port {
                            TargetPort::Name(n) => n.as_str(),
                            TargetPort::Number(_) => "",
                        },
                        port.port
                    ),
                ));
            }
        }
    }
    (eps, errors)
}

/// Sort, and keep one endpoint per address: two slices may list the same
/// address while a pod moves between them; the ready entry wins.
fn normalize(mut eps: Vec<Endpoint>) -> Vec<Endpoint> {
    eps.sort_by(|a, b| {
        (a.ip, a.port, !a.ready, &a.workload, &a.service_account).cmp(&(
            b.ip,
            b.port,
            !b.ready,
            &b.workload,
            &b.service_account,
        ))
    });
    eps.dedup_by(|later, first| later.ip == first.ip && later.port == first.port);
    eps.sort();
    eps
}

/// Index of a model port in the Service's `spec.ports`, for error paths.
fn spec_port_index(objects: &ObjectSet, key: &ObjectKey, port: &ServicePort) -> usize {
    objects
        .services
        .get(key)
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| {
            ports.iter().position(|p| {
                i32::from(port.port) == p.port
                    && matches!(p.protocol.as_deref(), None | Some("TCP"))
            })
        })
        .unwrap_or_default()
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string()
}

fn label<'a>(meta: &'a ObjectMeta, name: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(name).map(String::as_str)
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// Kubernetes' IANA_SVC_NAME rule for named ports: 1-15 characters of
/// `[a-z0-9-]`, at least one letter, no leading, trailing or double `-`.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> KubeService {
        serde_norway::from_str(yaml).unwrap()
    }

    fn pod(yaml: &str) -> Pod {
        serde_norway::from_str(yaml).unwrap()
    }

    fn key(s: &str) -> ObjectKey {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const SERVER_SVC: &str = r#"
metadata: {name: server, namespace: demo}
spec:
  selector: {app: server}
  ports:
    - {name: http, port: 80, targetPort: web}
    - {name: metrics, port: 9090}
"#;

    fn server_pod(name: &str, ip: &str) -> Pod {
        pod(&format!(
            r#"
metadata: {{name: {name}, namespace: demo, labels: {{app: server, tier: be}}}}
spec:
  serviceAccountName: server
  containers:
    - name: app
      ports: [{{name: web, containerPort: 8080}}, {{containerPort: 9090}}]
    - name: side
      ports: [{{name: dns, containerPort: 53, protocol: UDP}}]
status: {{podIP: "{ip}"}}
"#
        ))
    }

    fn objects(services: &[(&str, KubeService)], pods: &[(&str, Pod)]) -> ObjectSet {
        let mut set = ObjectSet::default();
        for (k, s) in services {
            set.services.insert(key(k), s.clone());
        }
        for (k, p) in pods {
            set.pods.insert(key(k), p.clone());
        }
        set
    }

    fn error_strings(errors: &[ConfigError]) -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn service_ports_default_target_port_protocol_and_order() {
        let s = svc(r#"
metadata: {name: s, namespace: demo}
spec:
  selector: {app: s}
  ports:
    - {name: tcp-db, port: 5432}
    - {name: dns, port: 53, protocol: UDP}
    - {name: web, port: 80, targetPort: 8080, appProtocol: http}
    - {name: http-alt, port: 81, targetPort: web}
    - {name: grpc-api, port: 82, protocol: TCP}
"#);
        let out = convert_service(&key("demo/s"), &s).unwrap();
        assert_eq!(out.selector, BTreeMap::from([("app".into(), "s".into())]));
        let got: Vec<_> = out
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.target_port.clone(), p.protocol))
            .collect();
        assert_eq!(
            got,
            vec![
                ("web", 80, TargetPort::Number(8080), Protocol::Http),
                (
                    "http-alt",
                    81,
                    TargetPort::Name("web".into()),
                    Protocol::Http
                ),
                ("grpc-api", 82, TargetPort::Number(82), Protocol::Http),
                ("tcp-db", 5432, TargetPort::Number(5432), Protocol::Tcp),
            ]
        );
    }

    #[test]
    fn single_unnamed_port_is_allowed() {
        let s = svc("metadata: {name: s}\nspec: {ports: [{port: 7000}]}");
        let out = convert_service(&key("demo/s"), &s).unwrap();
        assert_eq!(out.ports[0].name, "");
        assert_eq!(out.ports[0].target_port, TargetPort::Number(7000));
        assert!(out.selector.is_empty());
    }

    #[test]
    fn service_validation_errors_name_the_field() {
        let cases = [
            (
                "ports: [{name: a, port: 80}, {name: b, port: 0}]",
                "Service demo/s: spec.ports[1].port: must be 1-65535, got 0",
            ),
            (
                "ports: [{name: a, port: 70000}]",
                "Service demo/s: spec.ports[0].port: must be 1-65535, got 70000",
            ),
            (
                "ports: [{name: a, port: 80}, {name: b, port: 80}]",
                "Service demo/s: spec.ports[1].port: duplicate port 80 (also spec.ports[0].port)",
            ),
            (
                "ports: [{name: a, port: 80}, {name: a, port: 81}]",
                "Service demo/s: spec.ports[1].name: duplicate port name \"a\" (also spec.ports[0].name)",
            ),
            (
                "ports: [{name: a, port: 80}, {port: 81}]",
                "Service demo/s: spec.ports[1].name: is required when a Service has more than one port",
            ),
            (
                "ports: [{name: a, port: 80, targetPort: 0}]",
                "Service demo/s: spec.ports[0].targetPort: must be 1-65535, got 0",
            ),
            (
                "ports: [{name: a, port: 80, targetPort: \"8080\"}]",
                "Service demo/s: spec.ports[0].targetPort: \"8080\" is neither a port number nor a \
                 port name (1-15 lowercase letters, digits and '-', at least one letter)",
            ),
            (
                "ports: [{name: a, port: 80, protocol: QUIC}]",
                "Service demo/s: spec.ports[0].protocol: \"QUIC\" is not a protocol (TCP, UDP or SCTP)",
            ),
        ];
        for (spec, want) in cases {
            let s = svc(&format!("metadata: {{name: s}}\nspec: {{{spec}}}"));
            let errs = convert_service(&key("demo/s"), &s).unwrap_err();
            assert_eq!(error_strings(&errs), vec![want.to_string()], "{spec}");
        }
    }

    #[test]
    fn udp_port_may_share_a_number_with_a_tcp_port() {
        let s = svc(
            "metadata: {name: dns}\nspec: {ports: [{name: dns-tcp, port: 53}, {name: dns, port: 53, protocol: UDP}]}",
        );
        let out = convert_service(&key("demo/dns"), &s).unwrap();
        assert_eq!(out.ports.len(), 1);
        assert_eq!(out.ports[0].name, "dns-tcp");
    }

    #[test]
    fn cluster_ips_are_read_and_headless_has_none() {
        let s = |spec: &str| {
            svc(&format!(
                "metadata: {{name: s}}\nspec: {{ports: [{{port: 80}}], {spec}}}"
            ))
        };
        let ips = |spec: &str| {
            convert_service(&key("demo/s"), &s(spec))
                .unwrap()
                .cluster_ips
        };
        assert_eq!(ips("clusterIP: 10.96.0.20"), vec![ip("10.96.0.20")]);
        assert_eq!(
            ips("clusterIP: 10.96.0.20, clusterIPs: [fd00::20, 10.96.0.20]"),
            vec![ip("10.96.0.20"), ip("fd00::20")],
            "clusterIPs wins, sorted"
        );
        assert_eq!(ips("clusterIP: None"), Vec::<IpAddr>::new());
        assert_eq!(ips("selector: {app: s}"), Vec::<IpAddr>::new());
        let errs =
            convert_service(&key("demo/s"), &s("clusterIPs: [10.96.0.20, nope]")).unwrap_err();
        assert_eq!(
            error_strings(&errs),
            vec!["Service demo/s: spec.clusterIPs[1]: \"nope\" is not an IP address".to_string()]
        );
    }

    #[test]
    fn interception_annotation() {
        let p = |annotations: &str| {
            pod(&format!(
                "metadata: {{name: p, annotations: {{{annotations}}}}}\nspec: {{containers: [{{name: a}}]}}\nstatus: {{podIP: 10.0.0.7}}"
            ))
        };
        let w = |annotations: &str| convert_pod(&key("demo/p"), &p(annotations));
        let redirect = w("ward.io/interception: redirect").unwrap().unwrap();
        assert_eq!(redirect.interception, Interception::Redirect);
        assert_eq!(
            redirect.app_ip,
            ip("10.0.0.7"),
            "redirected: the app is on the pod IP"
        );
        let pinned = w("ward.io/interception: Redirect, ward.io/app-ip: 127.0.0.1")
            .unwrap()
            .unwrap();
        assert_eq!(pinned.app_ip, ip("127.0.0.1"), "the annotation still wins");
        let explicit = w("ward.io/interception: explicit").unwrap().unwrap();
        assert_eq!(explicit.interception, Interception::Explicit);
        assert_eq!(explicit.app_ip, ip("127.0.0.1"));
        assert_eq!(
            error_strings(&w("ward.io/interception: iptables").unwrap_err()),
            vec![
                "Pod demo/p: metadata.annotations[\"ward.io/interception\"]: \"iptables\" is not \
                 an interception mode (explicit or redirect)"
                    .to_string()
            ]
        );
    }

    #[test]
    fn pod_becomes_workload() {
        let w = convert_pod(&key("demo/server-0"), &server_pod("server-0", "10.0.0.5"))
            .unwrap()
            .unwrap();
        assert_eq!(w.service_account, "server");
        assert_eq!(w.ip, ip("10.0.0.5"));
        assert!(w.ready, "no conditions means ready");
        assert_eq!(w.app_ip, ip("127.0.0.1"));
        assert_eq!(w.outbound_ip, ip("10.0.0.5"));
        assert_eq!(w.labels.get("tier").map(String::as_str), Some("be"));
        assert_eq!(
            w.ports,
            vec![
                ContainerPort {
                    name: Some("web".into()),
                    port: 8080
                },
                ContainerPort {
                    name: None,
                    port: 9090
                },
            ],
            "ports of all containers, TCP only"
        );
    }

    #[test]
    fn pod_defaults_annotations_and_readiness() {
        let p = pod(r#"
metadata:
  name: p
  annotations: {ward.io/app-ip: 127.0.1.7, ward.io/outbound-ip: "::1"}
spec: {containers: [{name: a}]}
status:
  podIP: 127.0.0.7
  conditions: [{type: Ready, status: "False"}, {type: PodScheduled, status: "True"}]
"#);
        let w = convert_pod(&key("default/p"), &p).unwrap().unwrap();
        assert_eq!(w.service_account, "default");
        assert!(!w.ready);
        assert_eq!(w.app_ip, ip("127.0.1.7"));
        assert_eq!(w.outbound_ip, ip("::1"));
        assert!(w.ports.is_empty());

        let ready = pod(
            "metadata: {name: p}\nstatus: {podIP: 10.1.1.1, conditions: [{type: Ready, status: \"True\"}]}",
        );
        assert!(
            convert_pod(&key("default/p"), &ready)
                .unwrap()
                .unwrap()
                .ready
        );
        let no_ready_condition = pod(
            "metadata: {name: p}\nstatus: {podIP: 10.1.1.1, conditions: [{type: PodScheduled, status: \"True\"}]}",
        );
        assert!(
            !convert_pod(&key("default/p"), &no_ready_condition)
                .unwrap()
                .unwrap()
                .ready
        );
    }

    #[test]
    fn pods_that_are_not_workloads_are_skipped_without_error() {
        for yaml in [
            "metadata: {name: p}\nstatus: {}",
            "metadata: {name: p}",
            "metadata: {name: p}\nstatus: {podIP: \"\"}",
            "metadata: {name: p}\nstatus: {podIP: 10.0.0.1, phase: Succeeded}",
            "metadata: {name: p}\nstatus: {podIP: 10.0.0.1, phase: Failed}",
            "metadata: {name: p, deletionTimestamp: \"2024-01-01T00:00:00Z\"}\nstatus: {podIP: 10.0.0.1}",
            // Skipped before validation: a finished pod's bad IP is moot.
            "metadata: {name: p}\nstatus: {podIP: nope, phase: Failed}",
        ] {
            assert_eq!(
                convert_pod(&key("demo/p"), &pod(yaml)).unwrap(),
                None,
                "{yaml}"
            );
        }
    }

    #[test]
    fn pod_validation_errors_name_the_field() {
        let cases = [
            (
                "metadata: {name: x}\nstatus: {podIP: nope}",
                vec!["Pod demo/x: status.podIP: \"nope\" is not an IP address"],
            ),
            (
                "metadata: {name: x, annotations: {ward.io/app-ip: localhost}}\nstatus: {podIP: 10.0.0.1}",
                vec![
                    "Pod demo/x: metadata.annotations[\"ward.io/app-ip\"]: \"localhost\" is not an IP address",
                ],
            ),
            (
                "metadata: {name: x, annotations: {ward.io/outbound-ip: 1.2.3}}\nstatus: {podIP: 10.0.0.1}",
                vec![
                    "Pod demo/x: metadata.annotations[\"ward.io/outbound-ip\"]: \"1.2.3\" is not an IP address",
                ],
            ),
            (
                "metadata: {name: x}\nspec: {containers: [{name: a}, {name: b, ports: [{containerPort: 80}, {containerPort: 0}]}]}\nstatus: {podIP: 10.0.0.1}",
                vec![
                    "Pod demo/x: spec.containers[1].ports[1].containerPort: must be 1-65535, got 0",
                ],
            ),
            (
                "metadata: {name: x, annotations: {ward.io/app-ip: a}}\nstatus: {podIP: b}",
                vec![
                    "Pod demo/x: status.podIP: \"b\" is not an IP address",
                    "Pod demo/x: metadata.annotations[\"ward.io/app-ip\"]: \"a\" is not an IP address",
                ],
            ),
        ];
        for (yaml, want) in cases {
            let errs = convert_pod(&key("demo/x"), &pod(yaml)).unwrap_err();
            assert_eq!(error_strings(&errs), want, "{yaml}");
        }
    }

    #[test]
    fn object_key_defaults_namespace_and_requires_name() {
        let meta = |yaml: &str| -> ObjectMeta { serde_norway::from_str(yaml).unwrap() };
        assert_eq!(
            object_key(&meta("{name: a}"), "document 1").unwrap(),
            key("default/a")
        );
        assert_eq!(
            object_key(&meta("{name: a, namespace: x}"), "document 1").unwrap(),
            key("x/a")
        );
        let err = object_key(&meta("{namespace: x}"), "document 3").unwrap_err();
        assert_eq!(err.to_string(), "document 3: metadata.name: is required");
    }

    #[test]
    fn endpoints_from_selected_pods_with_named_target_port() {
        let mut not_ready = server_pod("server-2", "10.0.0.3");
        not_ready.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        let set = objects(
            &[("demo/server", svc(SERVER_SVC))],
            &[
                ("demo/server-1", server_pod("server-1", "10.0.0.2")),
                ("demo/server-0", server_pod("server-0", "10.0.0.1")),
                ("demo/server-2", not_ready),
                // Same labels, other namespace: not selected.
                ("other/server-9", server_pod("server-9", "10.0.0.9")),
            ],
        );
        let (mesh, errors) = build_mesh(&set);
        assert!(errors.is_empty(), "{errors:?}");
        let s = key("demo/server");
        let eps = mesh.endpoints(&s, 80);
        let got: Vec<_> = eps
            .iter()
            .map(|e| (e.ip.to_string(), e.port, e.ready))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1".to_string(), 8080, true),
                ("10.0.0.2".to_string(), 8080, true),
                ("10.0.0.3".to_string(), 8080, false),
            ]
        );
        assert_eq!(eps[0].workload, Some(key("demo/server-0")));
        assert_eq!(eps[0].service_account.as_deref(), Some("server"));
        assert_eq!(
            mesh.endpoints(&s, 9090)
                .iter()
                .map(|e| e.port)
                .collect::<Vec<_>>(),
            [9090; 3]
        );
        assert_eq!(mesh.workloads.len(), 4);
    }

    #[test]
    fn pod_without_the_named_target_port_is_an_error_on_the_service() {
        let mut bare = server_pod("server-1", "10.0.0.2");
        bare.spec.as_mut().unwrap().containers[0].ports = None;
        let mut set = objects(
            &[("demo/server", svc(SERVER_SVC))],
            &[
                ("demo/server-0", server_pod("server-0", "10.0.0.1")),
                ("demo/server-1", bare),
            ],
        );
        set.origins
            .insert((ObjectKind::Service, key("demo/server")), "svc.yaml".into());
        let (mesh, errors) = build_mesh(&set);
        assert_eq!(
            error_strings(&errors),
            vec![
                "svc.yaml: Service demo/server: spec.ports[0].targetPort: pod demo/server-1 has no \
                 container port named \"web\"; it is not an endpoint of port 80"
            ]
        );
        let s = key("demo/server");
        assert_eq!(mesh.endpoints(&s, 80).len(), 1);
        assert_eq!(
            mesh.endpoints(&s, 9090).len(),
            2,
            "numeric targetPort needs no container port"
        );
        assert!(mesh.services.contains_key(&s), "the Service itself stays");
    }

    const SLICE: &str = r#"
metadata:
  name: server-abc
  namespace: demo
  labels: {kubernetes.io/service-name: server}
addressType: IPv4
ports:
  - {name: http, port: 8081}
  - {name: metrics, port: 9091, protocol: TCP}
endpoints:
  - addresses: [10.1.0.1]
    conditions: {ready: true}
    targetRef: {kind: Pod, name: server-0, namespace: demo}
  - addresses: [10.1.0.2]
    conditions: {ready: false}
    targetRef: {kind: Pod, name: gone}
  - addresses: [10.1.0.3, 10.1.0.4]
"#;

    #[test]
    fn endpoint_slices_take_precedence_over_the_selector() {
        let svc = svc(&SERVER_SVC.replace("targetPort: web", "targetPort: 8080"));
        let mut set = objects(
            &[("demo/server", svc)],
            &[("demo/server-0", server_pod("server-0", "10.0.0.1"))],
        );
        let slice: EndpointSlice = serde_norway::from_str(SLICE).unwrap();
        set.endpoint_slices.insert(key("demo/server-abc"), slice);
        // A slice of another service and an FQDN slice change nothing.
        let other: EndpointSlice = serde_norway::from_str(
            &SLICE
                .replace("service-name: server", "service-name: other")
                .replace("10.1.0.", "10.2.0."),
        )
        .unwrap();
        set.endpoint_slices.insert(key("demo/other-abc"), other);
        let fqdn: EndpointSlice = serde_norway::from_str(
            &SLICE
                .replace("IPv4", "FQDN")
                .replace("[10.1.0.1]", "[db.example.com]"),
        )
        .unwrap();
        set.endpoint_slices.insert(key("demo/server-fqdn"), fqdn);

        let (mesh, errors) = build_mesh(&set);
        assert!(errors.is_empty(), "{errors:?}");
        let s = key("demo/server");
        let got: Vec<_> = mesh
            .endpoints(&s, 80)
            .iter()
            .map(|e| {
                (
                    e.ip.to_string(),
                    e.port,
                    e.ready,
                    e.workload.as_ref().map(ToString::to_string),
                    e.service_account.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "10.1.0.1".into(),
                    8081,
                    true,
                    Some("demo/server-0".into()),
                    Some("server".into())
                ),
                (
                    "10.1.0.2".into(),
                    8081,
                    false,
                    Some("demo/gone".into()),
                    None
                ),
                ("10.1.0.3".into(), 8081, true, None, None),
                ("10.1.0.4".into(), 8081, true, None, None),
            ]
        );
        assert!(mesh.endpoints(&s, 9090).iter().all(|e| e.port == 9091));
        assert_eq!(mesh.endpoints(&s, 9090).len(), 4);
    }

    #[test]
    fn slice_without_a_matching_port_name_gives_no_endpoints_and_duplicates_collapse() {
        let svc = svc(
            "metadata: {name: server, namespace: demo}\nspec: {ports: [{name: grpc, port: 90}, {name: http, port: 80}]}",
        );
        let mut set = objects(&[("demo/server", svc)], &[]);
        let slice: EndpointSlice = serde_norway::from_str(SLICE).unwrap();
        // The same address in a second slice, not ready there: the ready
        // entry wins.
        let mut moving = slice.clone();
        moving.metadata.name = Some("server-def".into());
        moving.endpoints.truncate(1);
        moving.endpoints[0].conditions = Some(Default::default());
        moving.endpoints[0].conditions.as_mut().unwrap().ready = Some(false);
        set.endpoint_slices.insert(key("demo/server-abc"), slice);
        set.endpoint_slices.insert(key("demo/server-def"), moving);
        let (mesh, errors) = build_mesh(&set);
        assert!(errors.is_empty(), "{errors:?}");
        let s = key("demo/server");
        assert!(mesh.endpoints(&s, 90).is_empty());
        assert!(
            mesh.endpoints.contains_key(&(s.clone(), 90)),
            "every port has an entry"
        );
        let eps = mesh.endpoints(&s, 80);
        assert_eq!(eps.len(), 4);
        assert!(eps[0].ready);
    }

    #[test]
    fn endpoint_slice_validation_errors_name_the_field() {
        let cases = [
            (
                SLICE.replace("IPv4", "IPX"),
                "EndpointSlice demo/s: addressType: \"IPX\" is not an address type (IPv4, IPv6 or FQDN)",
            ),
            (
                SLICE.replace("10.1.0.4", "10.1.0.x"),
                "EndpointSlice demo/s: endpoints[2].addresses[1]: \"10.1.0.x\" is not an IP address",
            ),
            (
                SLICE.replace("9091", "0"),
                "EndpointSlice demo/s: ports[1].port: must be 1-65535, got 0",
            ),
        ];
        for (yaml, want) in cases {
            let slice: EndpointSlice = serde_norway::from_str(&yaml).unwrap();
            assert_eq!(
                error_strings(&check_endpoint_slice(&key("demo/s"), &slice)),
                vec![want]
            );
            // An invalid slice is left out: the selector is used instead.
            let mut set = objects(
                &[("demo/server", svc(SERVER_SVC))],
                &[("demo/server-0", server_pod("server-0", "10.0.0.1"))],
            );
            set.endpoint_slices.insert(key("demo/s"), slice);
            let (mesh, errors) = build_mesh(&set);
            assert_eq!(errors.len(), 1);
            assert_eq!(
                mesh.endpoints(&key("demo/server"), 80)[0].ip,
                ip("10.0.0.1")
            );
        }
    }

    #[test]
    fn invalid_objects_are_left_out_and_others_unaffected() {
        let bad_svc = svc("metadata: {name: bad}\nspec: {ports: [{name: a, port: 0}]}");
        let bad_pod = pod("metadata: {name: bad-0, labels: {app: server}}\nstatus: {podIP: nope}");
        let mut set = objects(
            &[("demo/server", svc(SERVER_SVC)), ("demo/bad", bad_svc)],
            &[
                ("demo/server-0", server_pod("server-0", "10.0.0.1")),
                ("demo/bad-0", bad_pod),
            ],
        );
        set.origins
            .insert((ObjectKind::Pod, key("demo/bad-0")), "pods.yaml".into());
        let (mesh, errors) = build_mesh(&set);
        assert_eq!(
            error_strings(&errors),
            vec![
                "Service demo/bad: spec.ports[0].port: must be 1-65535, got 0",
                "pods.yaml: Pod demo/bad-0: status.podIP: \"nope\" is not an IP address",
            ]
        );
        assert_eq!(
            mesh.services.keys().collect::<Vec<_>>(),
            [&key("demo/server")]
        );
        assert_eq!(
            mesh.workloads.keys().collect::<Vec<_>>(),
            [&key("demo/server-0")]
        );
        assert_eq!(mesh.endpoints(&key("demo/server"), 80).len(), 1);
    }

    #[test]
    fn output_is_deterministic() {
        let build = |order: &[usize]| {
            let pods: Vec<_> = (0..5)
                .map(|i| {
                    (
                        format!("demo/server-{i}"),
                        server_pod(&format!("server-{i}"), &format!("10.0.0.{}", 10 - i)),
                    )
                })
                .collect();
            let mut set = ObjectSet::default();
            set.services.insert(key("demo/server"), svc(SERVER_SVC));
            for &i in order {
                set.pods.insert(key(&pods[i].0), pods[i].1.clone());
            }
            build_mesh(&set)
        };
        let (a, ea) = build(&[0, 1, 2, 3, 4]);
        let (b, eb) = build(&[4, 2, 0, 3, 1]);
        assert_eq!(a, b);
        assert_eq!(ea, eb);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let ips: Vec<_> = a
            .endpoints(&key("demo/server"), 80)
            .iter()
            .map(|e| e.ip)
            .collect();
        let mut sorted = ips.clone();
        sorted.sort();
        assert_eq!(ips, sorted);
    }

    #[test]
    fn validate_object_matches_build_mesh() {
        let bad = KubeObject::Service(svc(
            "metadata: {name: s}\nspec: {ports: [{name: a, port: 0}]}",
        ));
        assert_eq!(validate_object(&key("demo/s"), &bad).len(), 1);
        let good = KubeObject::Pod(server_pod("p", "10.0.0.1"));
        assert!(validate_object(&key("demo/p"), &good).is_empty());
    }
}
