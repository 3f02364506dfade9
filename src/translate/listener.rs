//! Listeners: inbound (mesh mTLS on the pod IP, per target port) and
//! outbound (plaintext from the local app, per upstream service port).

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::util::pack_any;

use super::{endpoint, names, tls};
use crate::model::{ObjectKey, Protocol};

pub const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
pub const ROUTER: &str = "envoy.filters.http.router";

/// Stat prefix of an inbound listener and its filter.
pub fn inbound_stat_prefix(target_port: u16) -> String {
    format!("inbound_{target_port}")
}

/// Stat prefix of an outbound listener and its filter. Unique per service
/// port, and free of the `|` and `.` that would split Envoy stat names.
pub fn outbound_stat_prefix(service: &ObjectKey, port: u16) -> String {
    format!("outbound_{}_{}_{port}", service.namespace, service.name).replace(['.', '|'], "_")
}

fn http_connection_manager(stat_prefix: &str, route: &str, inbound: bool) -> Filter {
    let mut hcm = HttpConnectionManager {
        codec_type: http_connection_manager::CodecType::Auto as i32,
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(tls::ads_config_source()),
            route_config_name: route.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: ROUTER.to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    if inbound {
        // Replace whatever XFCC the caller sent with the verified peer
        // identity, so the app can trust `x-forwarded-client-cert` to carry
        // the caller's SPIFFE id (URI=...) and nothing forged.
        hcm.forward_client_cert_details =
            http_connection_manager::ForwardClientCertDetails::SanitizeSet as i32;
        hcm.set_current_client_cert_details =
            Some(http_connection_manager::SetCurrentClientCertDetails {
                uri: true,
                ..Default::default()
            });
    }
    Filter {
        name: HTTP_CONNECTION_MANAGER.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Filter {
    let proxy = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    };
    Filter {
        name: TCP_PROXY.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(proxy))),
    }
}

/// Inbound listener on `pod_ip:target_port`: mesh mTLS, then HTTP routing or
/// TCP proxying to the inbound cluster.
pub fn inbound(
    pod_ip: IpAddr,
    trust_domain: &str,
    target_port: u16,
    protocol: Protocol,
) -> Listener {
    let stat_prefix = inbound_stat_prefix(target_port);
    let filter = match protocol {
        Protocol::Http => {
            http_connection_manager(&stat_prefix, &names::inbound_route(target_port), true)
        }
        Protocol::Tcp => tcp_proxy(&stat_prefix, &names::inbound_cluster(target_port)),
    };
    let http = protocol == Protocol::Http;
    Listener {
        name: names::inbound_listener(target_port),
        address: Some(endpoint::socket_address(pod_ip, target_port)),
        stat_prefix: stat_prefix.clone(),
        traffic_direction: TrafficDirection::Inbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            transport_socket: Some(tls::transport_socket(tls::downstream_mtls(
                trust_domain,
                http,
            ))),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Outbound listener on `outbound_ip:port`: plaintext from the local app
/// toward one service port; the mTLS is on the cluster.
pub fn outbound(
    outbound_ip: IpAddr,
    service: &ObjectKey,
    port: u16,
    protocol: Protocol,
) -> Listener {
    let stat_prefix = outbound_stat_prefix(service, port);
    let filter = match protocol {
        Protocol::Http => {
            http_connection_manager(&stat_prefix, &names::outbound_route(service, port), false)
        }
        Protocol::Tcp => tcp_proxy(&stat_prefix, &names::outbound_cluster(service, port)),
    };
    Listener {
        name: names::outbound_listener(service, port),
        address: Some(endpoint::socket_address(outbound_ip, port)),
        stat_prefix: stat_prefix.clone(),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        ..Default::default()
    }
}
