//! Listeners: inbound (on the pod IP, per target port; what they accept
//! follows the port's mTLS mode) and outbound (plaintext from the local
//! app, per upstream service port).
//!
//! Every inbound listener has the `tls_inspector` listener filter and picks a
//! filter chain by transport protocol and ALPN, whatever the mode. A mode
//! change then only changes filter chains, which Envoy updates in place:
//! connections on unchanged chains (e.g. mesh mTLS when going PERMISSIVE →
//! STRICT) are not drained.
//!
//! | chain (stat prefix `inbound_<port>_<x>`) | match                      | STRICT | PERMISSIVE | DISABLE |
//! |------------------------------------------|----------------------------|--------|------------|---------|
//! | `mtls` (`_mtls`)                         | TLS, ALPN `ward-mtls`      | yes    | yes        |         |
//! | `mtls-other-alpn` (`_mtls`)              | TLS, any other ALPN        | yes    |            |         |
//! | `tls-passthrough` (`_passthrough`)       | TLS, any other ALPN        |        | yes        | yes     |
//! | `plaintext` (`_plaintext`)               | anything else              |        | yes        | yes     |
//!
//! `tls-passthrough` hands an application's own TLS to the app untouched
//! (raw TCP): only Ward sidecars offer `ward-mtls`.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::util::pack_any;

use super::{endpoint, names, tls};
use crate::model::{MtlsMode, ObjectKey, Protocol};

pub const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
pub const ROUTER: &str = "envoy.filters.http.router";
pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
pub const ORIGINAL_DST: &str = "envoy.filters.listener.original_dst";

/// Filter chain names of an inbound listener (see the module table).
pub mod chain {
    pub const MTLS: &str = "mtls";
    pub const MTLS_OTHER_ALPN: &str = "mtls-other-alpn";
    pub const TLS_PASSTHROUGH: &str = "tls-passthrough";
    pub const PLAINTEXT: &str = "plaintext";
}

/// Stat prefix of one kind of inbound traffic (`mtls`, `plaintext`,
/// `passthrough`) on a target port: Envoy then counts them apart, e.g.
/// `http.inbound_8080_plaintext.downstream_cx_total` or
/// `tcp.inbound_5432_mtls.downstream_cx_total`.
pub fn inbound_chain_stat_prefix(target_port: u16, kind: &str) -> String {
    format!("inbound_{target_port}_{kind}")
}

/// Stat prefix of an inbound listener and its filter.
pub fn inbound_stat_prefix(target_port: u16) -> String {
    format!("inbound_{target_port}")
}

/// Stat prefix of an outbound listener and its filter. Unique per service
/// port, and free of the `|` and `.` that would split Envoy stat names.
pub fn outbound_stat_prefix(service: &ObjectKey, port: u16) -> String {
    format!("outbound_{}_{}_{port}", service.namespace, service.name).replace(['.', '|'], "_")
}

pub(super) fn http_connection_manager(stat_prefix: &str, route: &str, inbound: bool) -> Filter {
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

pub(super) fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Filter {
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

/// Inbound listener on `pod_ip:target_port`: filter chains for `mode` (the
/// applied server mode), then HTTP routing or TCP proxying to the inbound
/// cluster.
pub fn inbound(
    pod_ip: IpAddr,
    trust_domain: &str,
    target_port: u16,
    protocol: Protocol,
    mode: MtlsMode,
) -> Listener {
    let stat_prefix = inbound_stat_prefix(target_port);
    let http = protocol == Protocol::Http;
    let app = |kind: &str| {
        let prefix = inbound_chain_stat_prefix(target_port, kind);
        match protocol {
            Protocol::Http => {
                http_connection_manager(&prefix, &names::inbound_route(target_port), true)
            }
            Protocol::Tcp => tcp_proxy(&prefix, &names::inbound_cluster(target_port)),
        }
    };
    let tls_match = |alpn: &[&str]| {
        Some(FilterChainMatch {
            transport_protocol: "tls".into(),
            application_protocols: alpn.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        })
    };
    let mtls = |name: &str, alpn: &[&str]| FilterChain {
        name: name.into(),
        filter_chain_match: tls_match(alpn),
        filters: vec![app("mtls")],
        transport_socket: Some(tls::transport_socket(tls::downstream_mtls(
            trust_domain,
            http,
        ))),
        ..Default::default()
    };
    let passthrough = || FilterChain {
        name: chain::TLS_PASSTHROUGH.into(),
        filter_chain_match: tls_match(&[]),
        filters: vec![tcp_proxy(
            &inbound_chain_stat_prefix(target_port, "passthrough"),
            &names::inbound_cluster(target_port),
        )],
        ..Default::default()
    };
    let plaintext = || FilterChain {
        name: chain::PLAINTEXT.into(),
        filters: vec![app("plaintext")],
        ..Default::default()
    };
    let filter_chains = match mode {
        MtlsMode::Strict => vec![
            mtls(chain::MTLS, &[names::MESH_ALPN]),
            mtls(chain::MTLS_OTHER_ALPN, &[]),
        ],
        MtlsMode::Permissive | MtlsMode::Default => vec![
            mtls(chain::MTLS, &[names::MESH_ALPN]),
            passthrough(),
            plaintext(),
        ],
        MtlsMode::Disable => vec![passthrough(), plaintext()],
    };
    Listener {
        name: names::inbound_listener(target_port),
        address: Some(endpoint::socket_address(pod_ip, target_port)),
        stat_prefix: stat_prefix.clone(),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![tls_inspector()],
        // A server-speaks-first protocol (the client sends nothing) must
        // still reach the plaintext chain when the inspector times out.
        continue_on_listener_filters_timeout: true,
        filter_chains,
        ..Default::default()
    }
}

/// The TLS inspector listener filter: lets filter chains match on
/// transport protocol and ALPN.
pub(super) fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: TLS_INSPECTOR.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            TlsInspector::default(),
        ))),
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
