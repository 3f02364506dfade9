//! Every Envoy resource name Ward generates is built here, so that the
//! listener that references a route, the cluster that references endpoints
//! and the stream that serves them can never disagree.

use crate::model::ObjectKey;

/// SDS secret holding the sidecar's own certificate chain and private key.
/// Same name as Istio so that operators recognise it in `/certs`.
pub const WORKLOAD_CERT: &str = "default";
/// SDS secret holding the mesh trust bundle (validation context).
pub const TRUST_BUNDLE: &str = "ROOTCA";
/// Cluster in the bootstrap that points at Ward's xDS server.
pub const XDS_CLUSTER: &str = "ward-xds";
/// ALPN token a Ward sidecar offers when originating mesh mTLS. Lets a
/// PERMISSIVE server tell mesh mTLS apart from an application's own TLS.
pub const MESH_ALPN: &str = "ward-mtls";

/// Inbound listener for a target port on the pod IP.
pub fn inbound_listener(target_port: u16) -> String {
    format!("inbound|{target_port}")
}

/// Cluster that forwards inbound traffic to the local app.
pub fn inbound_cluster(target_port: u16) -> String {
    format!("inbound|{target_port}|local")
}

/// Route configuration for an HTTP inbound port.
pub fn inbound_route(target_port: u16) -> String {
    format!("inbound|{target_port}")
}

/// Outbound listener toward one service port (bound on the workload's
/// outbound IP at the service port).
pub fn outbound_listener(service: &ObjectKey, port: u16) -> String {
    format!("outbound|{}|{}|{port}", service.namespace, service.name)
}

/// Outbound cluster toward one service port. Also its EDS service name.
pub fn outbound_cluster(service: &ObjectKey, port: u16) -> String {
    format!("outbound|{}|{}|{port}", service.namespace, service.name)
}

/// Route configuration for an HTTP outbound service port.
pub fn outbound_route(service: &ObjectKey, port: u16) -> String {
    format!("outbound|{}|{}|{port}", service.namespace, service.name)
}

/// Envoy `node.id` written by `ward bootstrap`: the pod it runs for.
pub fn node_id(pod: &ObjectKey) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// Inverse of [`node_id`].
pub fn parse_node_id(id: &str) -> Option<ObjectKey> {
    id.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips() {
        let pod = ObjectKey::new("demo", "server-0");
        assert_eq!(parse_node_id(&node_id(&pod)), Some(pod));
        assert_eq!(parse_node_id("nope"), None);
    }

    #[test]
    fn outbound_names_are_distinct_per_port() {
        let svc = ObjectKey::new("demo", "server");
        assert_ne!(outbound_cluster(&svc, 80), outbound_cluster(&svc, 81));
        assert_eq!(outbound_cluster(&svc, 80), "outbound|demo|server|80");
    }
}
