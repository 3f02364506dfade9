//! Listeners and clusters of a pod whose traffic is redirected by iptables
//! (`ward redirect-init`, [`crate::model::Interception::Redirect`]).
//!
//! The app knows nothing of the sidecar: it calls `server.demo:9080` (the
//! Service's cluster IP) and listens on its usual port. iptables in the pod's
//! network namespace sends every outgoing TCP connection to
//! `127.0.0.1:15001` and every incoming one to port 15006; the sidecar's
//! own connections (its uid) are exempt. Two listeners with the
//! `original_dst` listener filter recover where each connection was going
//! and pick a filter chain by that address:
//!
//! | listener            | filter chain match                          | goes to                              |
//! |---------------------|---------------------------------------------|--------------------------------------|
//! | `virtual-outbound`  | `clusterIP/32`, service port                | the service's outbound cluster (mTLS) |
//! |                     | a headless service's pod address and target port | `outbound-direct|NS|SVC|PORT` (`ORIGINAL_DST`, mTLS) |
//! |                     | port 15001 (a direct call to the listener)  | `BlackHoleCluster`                   |
//! |                     | anything else (default chain)               | `PassthroughCluster` (where it was going, untouched) |
//! | `virtual-inbound`   | target port + the port's mTLS-mode chains (see `listener`) | the inbound cluster (the app)  |
//! |                     | target port, anything else (STRICT only)    | `BlackHoleCluster` (refused)         |
//! |                     | port 15006                                  | `BlackHoleCluster`                   |
//! |                     | anything else (default chain)               | `InboundPassthroughCluster`          |
//!
//! Inbound chains are exactly those of the explicit-mode inbound listener
//! with the target port added to their match, so every mTLS mode behaves
//! the same in both modes, and a mode change only replaces filter chains
//! (Envoy drains only the connections of changed chains).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster as cluster_pb};
use envoy_types::pb::envoy::config::core::v3::{CidrRange, TrafficDirection};
use envoy_types::pb::envoy::config::listener::v3::{
    FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;

use super::{cluster, endpoint, listener, names};
use crate::model::{Mesh, MtlsMode, Protocol};

/// Where the virtual outbound listener binds: iptables `REDIRECT` in
/// `OUTPUT` rewrites the destination of locally generated packets to the
/// loopback address, so nothing outside the pod can reach it.
const OUTBOUND_BIND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// Where the virtual inbound listener binds: `REDIRECT` in `PREROUTING`
/// rewrites to the address of the interface the packet came in on.
const INBOUND_BIND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

fn original_dst_filter() -> ListenerFilter {
    ListenerFilter {
        name: listener::ORIGINAL_DST.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            OriginalDst::default(),
        ))),
        ..Default::default()
    }
}

fn cidr(ip: IpAddr) -> CidrRange {
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value {
            value: if ip.is_ipv4() { 32 } else { 128 },
        }),
    }
}

fn port_match(port: u16) -> FilterChainMatch {
    FilterChainMatch {
        destination_port: Some(UInt32Value { value: port.into() }),
        ..Default::default()
    }
}

/// A chain that ends connections made straight to a redirect port: they
/// would otherwise be passed through to the same port, by the sidecar's
/// exempt uid, and loop.
fn blackhole_chain(port: u16) -> FilterChain {
    FilterChain {
        name: format!("blackhole|{port}"),
        filter_chain_match: Some(port_match(port)),
        filters: vec![listener::tcp_proxy("blackhole", names::BLACKHOLE_CLUSTER)],
        ..Default::default()
    }
}

/// The virtual outbound listener and the clusters only it uses.
///
/// - A service with cluster IPs: one filter chain per (cluster IPs, service
///   port), HTTP routed through the service port's outbound route, TCP
///   proxied to its outbound cluster.
/// - A headless service (no cluster IP): clients connect to its pods'
///   addresses directly, so one chain per (endpoint addresses, target
///   port), proxied to a per-service-port `ORIGINAL_DST` cluster with the
///   outbound cluster's TLS: the call goes to the pod the client chose,
///   over mTLS with the service's identities checked.
///
/// Warnings are prefixed with `who` (the proxy).
pub fn outbound_listener(
    mesh: &Mesh,
    trust_domain: &str,
    who: &str,
    warnings: &mut Vec<String>,
) -> (Listener, Vec<Cluster>) {
    let mut chains = Vec::new();
    let mut clusters = Vec::new();
    // Envoy refuses a listener whose chains have equal matches; two
    // hand-written Services may claim the same cluster IP.
    let mut taken: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
    for svc in mesh.services.values() {
        if svc.cluster_ips.is_empty() {
            continue;
        }
        for port in &svc.ports {
            if port.port == names::REDIRECT_OUTBOUND_PORT {
                warnings.push(format!(
                    "{who}: service {} port {}: the port of the virtual outbound listener; calls to it \
                     are not intercepted",
                    svc.key, port.port
                ));
                continue;
            }
            let ips: Vec<IpAddr> = svc
                .cluster_ips
                .iter()
                .copied()
                .filter(|ip| taken.insert((*ip, port.port)))
                .collect();
            if ips.len() < svc.cluster_ips.len() {
                warnings.push(format!(
                    "{who}: service {} port {}: a cluster IP is also another service's; calls to it go \
                     to the first service by name",
                    svc.key, port.port
                ));
            }
            if ips.is_empty() {
                continue;
            }
            let stat_prefix = listener::outbound_stat_prefix(&svc.key, port.port);
            let filter = match port.protocol {
                Protocol::Http => listener::http_connection_manager(
                    &stat_prefix,
                    &names::outbound_route(&svc.key, port.port),
                    false,
                ),
                Protocol::Tcp => {
                    listener::tcp_proxy(&stat_prefix, &names::outbound_cluster(&svc.key, port.port))
                }
            };
            chains.push(FilterChain {
                name: names::outbound_chain(&svc.key, port.port),
                filter_chain_match: Some(FilterChainMatch {
                    prefix_ranges: ips.into_iter().map(cidr).collect(),
                    ..port_match(port.port)
                }),
                filters: vec![filter],
                ..Default::default()
            });
        }
    }
    for svc in mesh.services.values() {
        if !svc.cluster_ips.is_empty() {
            continue;
        }
        for port in &svc.ports {
            // Endpoint addresses by target port (a named targetPort may
            // resolve differently per pod), each (address, port) claimed
            // once.
            let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
            for ep in mesh.endpoints(&svc.key, port.port) {
                if ep.port != names::REDIRECT_OUTBOUND_PORT && taken.insert((ep.ip, ep.port)) {
                    by_port.entry(ep.port).or_default().push(ep.ip);
                }
            }
            if by_port.is_empty() {
                continue;
            }
            let cluster_name = names::direct_cluster(&svc.key, port.port);
            for (target, ips) in by_port {
                chains.push(FilterChain {
                    name: format!("{cluster_name}|{target}"),
                    filter_chain_match: Some(FilterChainMatch {
                        prefix_ranges: ips.into_iter().map(cidr).collect(),
                        ..port_match(target)
                    }),
                    filters: vec![listener::tcp_proxy(
                        &listener::outbound_stat_prefix(&svc.key, port.port),
                        &cluster_name,
                    )],
                    ..Default::default()
                });
            }
            let mut direct = cluster::outbound(mesh, trust_domain, svc, port);
            direct.name = cluster_name;
            direct.cluster_discovery_type = Some(cluster_pb::ClusterDiscoveryType::Type(
                cluster_pb::DiscoveryType::OriginalDst as i32,
            ));
            direct.lb_policy = cluster_pb::LbPolicy::ClusterProvided as i32;
            direct.eds_cluster_config = None;
            clusters.push(direct);
        }
    }
    chains.push(blackhole_chain(names::REDIRECT_OUTBOUND_PORT));
    let listener = Listener {
        name: names::VIRTUAL_OUTBOUND_LISTENER.into(),
        address: Some(endpoint::socket_address(
            OUTBOUND_BIND,
            names::REDIRECT_OUTBOUND_PORT,
        )),
        stat_prefix: "virtual_outbound".into(),
        traffic_direction: TrafficDirection::Outbound as i32,
        listener_filters: vec![original_dst_filter()],
        filter_chains: chains,
        default_filter_chain: Some(FilterChain {
            name: "passthrough".into(),
            filters: vec![listener::tcp_proxy(
                "outbound_passthrough",
                names::PASSTHROUGH_CLUSTER,
            )],
            ..Default::default()
        }),
        ..Default::default()
    };
    (listener, clusters)
}

/// One target port the virtual inbound listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundTarget {
    pub port: u16,
    pub protocol: Protocol,
    /// The applied server mode of the port.
    pub mode: MtlsMode,
}

/// The virtual inbound listener: for each target port, the filter chains of
/// the explicit-mode inbound listener for its mode, restricted to that
/// destination port. Warnings are prefixed with `who` (the proxy).
pub fn inbound_listener(
    pod_ip: IpAddr,
    trust_domain: &str,
    targets: &[InboundTarget],
    who: &str,
    warnings: &mut Vec<String>,
) -> Listener {
    let mut chains = Vec::new();
    for t in targets {
        if t.port == names::REDIRECT_INBOUND_PORT || t.port == names::REDIRECT_OUTBOUND_PORT {
            warnings.push(format!(
                "{who}: target port {} is a port of the sidecar itself; not served",
                t.port
            ));
            continue;
        }
        let explicit = listener::inbound(pod_ip, trust_domain, t.port, t.protocol, t.mode);
        // In the explicit listener a connection no chain matches (plaintext
        // on a STRICT port) is closed. Here it would fall to the default
        // chain and reach the app unencrypted, so such a port gets a
        // catch-all chain of its own that ends it.
        let has_catch_all = explicit.filter_chains.iter().any(|c| {
            c.filter_chain_match
                .as_ref()
                .is_none_or(|m| m.transport_protocol.is_empty())
        });
        chains.extend(explicit.filter_chains.into_iter().map(|mut chain| {
            let m = chain
                .filter_chain_match
                .get_or_insert_with(Default::default);
            m.destination_port = Some(UInt32Value {
                value: t.port.into(),
            });
            chain.name = names::inbound_chain(t.port, &chain.name);
            chain
        }));
        if !has_catch_all {
            chains.push(FilterChain {
                name: names::inbound_chain(t.port, "refused"),
                filter_chain_match: Some(port_match(t.port)),
                filters: vec![listener::tcp_proxy(
                    &listener::inbound_chain_stat_prefix(t.port, "refused"),
                    names::BLACKHOLE_CLUSTER,
                )],
                ..Default::default()
            });
        }
    }
    chains.push(blackhole_chain(names::REDIRECT_INBOUND_PORT));
    Listener {
        name: names::VIRTUAL_INBOUND_LISTENER.into(),
        address: Some(endpoint::socket_address(
            INBOUND_BIND,
            names::REDIRECT_INBOUND_PORT,
        )),
        stat_prefix: "virtual_inbound".into(),
        traffic_direction: TrafficDirection::Inbound as i32,
        // original_dst first: the TLS inspector's chain choice needs the
        // destination port already restored.
        listener_filters: vec![original_dst_filter(), listener::tls_inspector()],
        // A server-speaks-first protocol must still reach its chain when
        // the TLS inspector times out.
        continue_on_listener_filters_timeout: true,
        filter_chains: chains,
        default_filter_chain: Some(FilterChain {
            name: "passthrough".into(),
            filters: vec![listener::tcp_proxy(
                "inbound_passthrough",
                names::INBOUND_PASSTHROUGH_CLUSTER,
            )],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A cluster that connects to the connection's original destination.
pub fn original_dst_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster_pb::ClusterDiscoveryType::Type(
            cluster_pb::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster_pb::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(cluster::CONNECT_TIMEOUT),
        ..Default::default()
    }
}

/// A static cluster with no endpoints: every connection to it fails.
pub fn blackhole_cluster() -> Cluster {
    Cluster {
        name: names::BLACKHOLE_CLUSTER.into(),
        cluster_discovery_type: Some(cluster_pb::ClusterDiscoveryType::Type(
            cluster_pb::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(cluster::CONNECT_TIMEOUT),
        ..Default::default()
    }
}
