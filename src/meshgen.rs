//! Generated meshes for load tests and benchmarks (`ward-load`, criterion
//! benches, scale tests): `services` Services in one namespace, `pods` Pods
//! spread round-robin over them, as the Kubernetes-style YAML the directory
//! source reads.
//!
//! Pods model Kubernetes pods (each in its own network namespace): their
//! outbound listeners bind `127.0.0.1` (`ward.io/outbound-ip`), so every
//! proxy's outbound listeners are byte-identical and shared. Only the
//! inbound listener (on the pod IP) is per pod.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::model::ObjectKey;

/// Namespace of every generated object.
pub const NAMESPACE: &str = "load";
/// The pods' container port (HTTP), the target of every service.
pub const PORT: u16 = 8080;
/// File the churned pod lives in, apart from the bulk of the mesh so that a
/// change rewrites one small file.
pub const CHANGE_FILE: &str = "change.yaml";
/// File holding the generated mesh.
pub const MESH_FILE: &str = "mesh.yaml";

/// Shape of a generated mesh.
#[derive(Clone, Copy, Debug)]
pub struct MeshSpec {
    pub services: usize,
    pub pods: usize,
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

pub fn pod_key(j: usize) -> ObjectKey {
    ObjectKey::new(NAMESPACE, format!("pod-{j}"))
}

/// The service (and service account) of pod `j`.
pub fn pod_service(spec: &MeshSpec, j: usize) -> usize {
    j % spec.services.max(1)
}

/// Port of service `i`: distinct per service, because each proxy binds one
/// outbound listener per service port on the same outbound address.
pub fn service_port(i: usize) -> u16 {
    10_000 + (i % 50_000) as u16
}

pub fn service_account(i: usize) -> String {
    format!("sa-{i}")
}

/// 10.x.y.z, distinct for every pod index below 2^24.
pub fn pod_ip(j: usize) -> Ipv4Addr {
    let n = (j + 1) as u32;
    Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// The outbound cluster (= EDS name) of service `i`.
pub fn cluster_name(i: usize) -> String {
    crate::translate::names::outbound_cluster(
        &ObjectKey::new(NAMESPACE, service_name(i)),
        service_port(i),
    )
}

fn pod_yaml(out: &mut String, name: &str, app: &str, sa: &str, ip: Ipv4Addr) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  \
         labels: {{app: {app}}}\n  annotations: {{ward.io/outbound-ip: 127.0.0.1}}\n\
         spec:\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    ports:\n    \
         - {{name: http, containerPort: {PORT}}}\nstatus:\n  podIP: {ip}\n"
    );
}

/// The mesh: every Service and Pod.
pub fn mesh_yaml(spec: &MeshSpec) -> String {
    let mut out = String::with_capacity(spec.services * 200 + spec.pods * 330);
    for i in 0..spec.services {
        let name = service_name(i);
        let port = service_port(i);
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
             spec:\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: {port}, targetPort: http}}\n"
        );
    }
    for j in 0..spec.pods {
        let svc = pod_service(spec, j);
        pod_yaml(
            &mut out,
            &pod_key(j).name,
            &service_name(svc),
            &service_account(svc),
            pod_ip(j),
        );
    }
    out
}

/// A single endpoint change: one extra pod of service 0 (no sidecar of the
/// load; its service account is service 0's, so no cluster changes) whose
/// IP depends on `k`. Writing it with a new `k` changes exactly one
/// ClusterLoadAssignment.
pub fn change_yaml(k: u32) -> String {
    let mut out = String::new();
    let ip = Ipv4Addr::new(10, 255, (k >> 8) as u8, k as u8);
    pod_yaml(
        &mut out,
        "churn-0",
        &service_name(0),
        &service_account(0),
        ip,
    );
    out
}

/// Write the mesh (and the first change file) into `dir`.
pub fn write_dir(dir: &std::path::Path, spec: &MeshSpec) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MESH_FILE), mesh_yaml(spec))?;
    std::fs::write(dir.join(CHANGE_FILE), change_yaml(0))
}

/// Rewrite the change file atomically (rename), as a config tool would.
pub fn write_change(dir: &std::path::Path, k: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{CHANGE_FILE}.tmp"));
    std::fs::write(&tmp, change_yaml(k))?;
    std::fs::rename(tmp, dir.join(CHANGE_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DirSource;

    #[test]
    fn the_generated_mesh_loads_with_every_service_and_pod() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = MeshSpec {
            services: 3,
            pods: 7,
        };
        write_dir(tmp.path(), &spec).unwrap();
        let (mesh, _, errors) = DirSource::load_once(tmp.path()).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(mesh.services.len(), 3);
        assert_eq!(mesh.workloads.len(), 8, "7 pods and the churned one");
        let eps = mesh.endpoints(&ObjectKey::new(NAMESPACE, "svc-0"), service_port(0));
        assert_eq!(eps.len(), 4, "pods 0, 3, 6 and churn-0");
        assert_eq!(pod_ip(0).to_string(), "10.0.0.1");
    }
}
