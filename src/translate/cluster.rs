//! Clusters: the outbound EDS cluster toward each service port (shared by
//! every proxy) and the static inbound cluster toward the local app.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::google::protobuf::{Any, Duration};

use super::{endpoint, names, tls};
use crate::model::{ClientTls, Mesh, MtlsMode, Protocol, Service, ServicePort};

/// How long a sidecar waits for a TCP (and TLS) connection to an upstream.
pub(super) const CONNECT_TIMEOUT: Duration = Duration {
    seconds: 5,
    nanos: 0,
};

/// Key of `Cluster.typed_extension_protocol_options` for upstream HTTP
/// settings.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// HTTP ports forward with the protocol the caller used: without this Envoy
/// would downgrade an h2c/gRPC caller to HTTP/1.1 upstream. The map has a
/// single entry, so its encoding is deterministic despite being a HashMap.
fn http_protocol_options(protocol: Protocol) -> HashMap<String, Any> {
    match protocol {
        Protocol::Tcp => HashMap::new(),
        Protocol::Http => {
            let opts = HttpProtocolOptions {
                upstream_protocol_options: Some(
                    http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                        http_protocol_options::UseDownstreamHttpConfig {
                            http_protocol_options: Some(Http1ProtocolOptions::default()),
                            http2_protocol_options: Some(Http2ProtocolOptions::default()),
                            http3_protocol_options: None,
                        },
                    ),
                ),
                ..Default::default()
            };
            HashMap::from([(
                HTTP_PROTOCOL_OPTIONS.to_string(),
                envoy_types::util::pack_any(opts),
            )])
        }
    }
}

/// SPIFFE ids a client accepts from the servers of `service`, sorted (the
/// model returns a `BTreeSet`).
pub fn server_identities(mesh: &Mesh, trust_domain: &str, service: &Service) -> Vec<String> {
    let accounts = mesh.service_accounts(&service.key);
    identities(trust_domain, service, accounts.iter().map(String::as_str))
}

/// SPIFFE ids of `accounts` (sorted) in the namespace of `service`.
fn identities<'a>(
    trust_domain: &str,
    service: &Service,
    accounts: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    accounts
        .into_iter()
        .map(|sa| crate::model::SpiffeId::new(trust_domain, &service.key.namespace, sa).uri())
        .collect()
}

/// Does a client sidecar originate mTLS toward `service:port`? Yes when the
/// applied client mode is mTLS and the service has sidecars (a destination
/// outside the mesh cannot terminate mesh mTLS). Fail closed: toward a port
/// whose servers are STRICT, always — even without known backends.
///
/// The servers' *applied* mode decides, not the target mode: during a
/// DISABLE → STRICT rollout the servers only accept mTLS once every client
/// has switched, so a client must not switch before its step.
pub fn originates_mtls(mesh: &Mesh, service: &Service, port: &ServicePort) -> bool {
    originates_mtls_with(mesh, service, port, mesh.has_sidecars(&service.key))
}

/// [`originates_mtls`] with the "has sidecars" answer computed by the caller.
pub fn originates_mtls_with(
    mesh: &Mesh,
    service: &Service,
    port: &ServicePort,
    has_sidecars: bool,
) -> bool {
    let p = mesh.port_policy(&service.key, port.port);
    p.server == MtlsMode::Strict || (p.client == ClientTls::Mtls && has_sidecars)
}

/// Outbound cluster toward `service:port`, endpoints from EDS, mTLS or
/// plaintext as [`originates_mtls`] decides. mTLS checks the server's SPIFFE
/// ids; when none is known (a STRICT port without known backends) any
/// identity of the service's namespace.
pub fn outbound(mesh: &Mesh, trust_domain: &str, service: &Service, port: &ServicePort) -> Cluster {
    let accounts = mesh.service_accounts(&service.key);
    outbound_with_accounts(
        mesh,
        trust_domain,
        service,
        port,
        &accounts.iter().map(String::as_str).collect(),
    )
}

/// [`outbound`] with the service's accounts from
/// [`Mesh::service_accounts_by_service`], computed once for every cluster.
pub fn outbound_with_accounts(
    mesh: &Mesh,
    trust_domain: &str,
    service: &Service,
    port: &ServicePort,
    accounts: &BTreeSet<&str>,
) -> Cluster {
    let name = names::outbound_cluster(&service.key, port.port);
    let transport_socket =
        originates_mtls_with(mesh, service, port, !accounts.is_empty()).then(|| {
            let ids = identities(trust_domain, service, accounts.iter().copied());
            let ctx = if ids.is_empty() {
                tls::upstream_mtls_namespace(
                    service.hostname(),
                    trust_domain,
                    &service.key.namespace,
                )
            } else {
                tls::upstream_mtls(service.hostname(), &ids)
            };
            tls::transport_socket(ctx)
        });
    Cluster {
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(tls::ads_config_source()),
            service_name: name.clone(),
        }),
        connect_timeout: Some(CONNECT_TIMEOUT),
        transport_socket,
        typed_extension_protocol_options: http_protocol_options(port.protocol),
        name,
        ..Default::default()
    }
}

/// Inbound cluster: plaintext to the app at `app_ip:target_port`, inside the
/// pod's network namespace.
pub fn inbound(app_ip: IpAddr, target_port: u16, protocol: Protocol) -> Cluster {
    let name = names::inbound_cluster(target_port);
    Cluster {
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(endpoint::static_assignment(&name, app_ip, target_port)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        typed_extension_protocol_options: http_protocol_options(protocol),
        name,
        ..Default::default()
    }
}
