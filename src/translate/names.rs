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

/// Port the sidecar of a pod with redirected traffic takes the app's
/// outgoing TCP on (iptables `REDIRECT` in the pod's `OUTPUT` chain). Same
/// number as Istio, so existing exclusion lists keep working.
pub const REDIRECT_OUTBOUND_PORT: u16 = 15001;
/// Port the sidecar of a pod with redirected traffic takes incoming TCP on
/// (iptables `REDIRECT` in the pod's `PREROUTING` chain).
pub const REDIRECT_INBOUND_PORT: u16 = 15006;
/// The one outbound listener of a pod with redirected traffic.
pub const VIRTUAL_OUTBOUND_LISTENER: &str = "virtual-outbound";
/// The one inbound listener of a pod with redirected traffic.
pub const VIRTUAL_INBOUND_LISTENER: &str = "virtual-inbound";
/// Cluster for redirected outgoing traffic that is not to a mesh service:
/// forwarded, untouched, to where the app sent it. Istio's name.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Cluster for redirected incoming traffic to a port no mesh service
/// targets: forwarded, untouched, to the app.
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// Cluster with no endpoints: connections made straight to the sidecar's
/// redirect ports end there instead of looping through the sidecar.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// Cluster of a redirected sidecar toward the pods of a headless service
/// port: `ORIGINAL_DST` (the pod the client picked), with the service's TLS.
pub fn direct_cluster(service: &ObjectKey, port: u16) -> String {
    format!(
        "outbound-direct|{}|{}|{port}",
        service.namespace, service.name
    )
}

/// Filter chain of the virtual outbound listener toward one service port.
pub fn outbound_chain(service: &ObjectKey, port: u16) -> String {
    outbound_listener(service, port)
}

/// Filter chain of the virtual inbound listener: `chain` (see
/// `listener::chain`) on one target port.
pub fn inbound_chain(target_port: u16, chain: &str) -> String {
    format!("{target_port}|{chain}")
}

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
