//! Snapshot consistency (go-control-plane's `Snapshot.Consistent()`): every
//! name a resource references must resolve, or Envoy would sit waiting for
//! a resource that never comes (EDS/RDS/SDS warming never ends).
//!
//! References are recovered by decoding the typed resources, so the check
//! works on any [`ProxyResources`], not only on ones this module built.

use std::collections::BTreeSet;
use std::fmt;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use super::{ProxyResources, Resource, TranslateError, type_url};

/// The kind of resource a reference points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefKind {
    /// A ClusterLoadAssignment named by an EDS cluster's `service_name`.
    Endpoints,
    /// A RouteConfiguration named by an HTTP connection manager's RDS.
    Route,
    /// A cluster named by a route or a tcp_proxy.
    Cluster,
    /// An SDS secret named by a TLS context.
    Secret,
}

impl RefKind {
    fn type_url(self) -> Option<&'static str> {
        match self {
            RefKind::Endpoints => Some(type_url::ENDPOINT),
            RefKind::Route => Some(type_url::ROUTE),
            RefKind::Cluster => Some(type_url::CLUSTER),
            // Secrets are checked against the caller's list of names.
            RefKind::Secret => None,
        }
    }
}

impl fmt::Display for RefKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefKind::Endpoints => "ClusterLoadAssignment",
            RefKind::Route => "RouteConfiguration",
            RefKind::Cluster => "Cluster",
            RefKind::Secret => "Secret",
        })
    }
}

/// A reference from one resource to a name that is not there.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DanglingRef {
    /// The referring resource, e.g. `cluster outbound|demo|server|80`.
    pub from: String,
    /// What kind of resource is missing.
    pub kind: RefKind,
    /// The missing name.
    pub name: String,
}

impl fmt::Display for DanglingRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} references {} {:?}, which does not exist",
            self.from, self.kind, self.name
        )
    }
}

fn decode<T: Message + Name + Default>(any: &Any, owner: &str) -> Result<T, TranslateError> {
    if any.type_url != T::type_url() {
        return Err(TranslateError::Decode {
            resource: owner.to_string(),
            message: format!("expected {}, found {}", T::type_url(), any.type_url),
        });
    }
    T::decode(any.value.as_slice()).map_err(|e| TranslateError::Decode {
        resource: owner.to_string(),
        message: e.to_string(),
    })
}

/// Collects references while walking the resources.
struct Refs<'a> {
    res: &'a ProxyResources,
    secrets: BTreeSet<&'a str>,
    dangling: Vec<DanglingRef>,
}

impl Refs<'_> {
    fn need(&mut self, from: &str, kind: RefKind, name: &str) {
        let present = match kind.type_url() {
            None => self.secrets.contains(name),
            Some(url) => self.res.get(url).is_some_and(|m| m.contains_key(name)),
        };
        if !present {
            self.dangling.push(DanglingRef {
                from: from.to_string(),
                kind,
                name: name.to_string(),
            });
        }
    }

    fn common_tls(&mut self, from: &str, ctx: &CommonTlsContext) {
        for sds in &ctx.tls_certificate_sds_secret_configs {
            self.need(from, RefKind::Secret, &sds.name);
        }
        use common_tls_context::ValidationContextType as V;
        match &ctx.validation_context_type {
            Some(V::ValidationContextSdsSecretConfig(sds)) => {
                self.need(from, RefKind::Secret, &sds.name)
            }
            Some(V::CombinedValidationContext(c)) => {
                if let Some(sds) = &c.validation_context_sds_secret_config {
                    self.need(from, RefKind::Secret, &sds.name);
                }
            }
            _ => {}
        }
    }

    fn transport_socket(
        &mut self,
        from: &str,
        ts: &TransportSocket,
        upstream: bool,
    ) -> Result<(), TranslateError> {
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
            return Ok(());
        };
        let common = if upstream && any.type_url == UpstreamTlsContext::type_url() {
            decode::<UpstreamTlsContext>(any, from)?.common_tls_context
        } else if !upstream && any.type_url == DownstreamTlsContext::type_url() {
            decode::<DownstreamTlsContext>(any, from)?.common_tls_context
        } else {
            None
        };
        if let Some(common) = common {
            self.common_tls(from, &common);
        }
        Ok(())
    }

    fn cluster(&mut self, r: &Resource) -> Result<(), TranslateError> {
        let from = format!("cluster {}", r.name);
        let c: Cluster = decode(&r.any, &from)?;
        let eds = cluster::DiscoveryType::Eds as i32;
        if c.cluster_discovery_type == Some(cluster::ClusterDiscoveryType::Type(eds)) {
            let service_name = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.as_str())
                .filter(|s| !s.is_empty())
                // Envoy's rule: no service_name means the cluster name.
                .unwrap_or(&c.name);
            self.need(&from, RefKind::Endpoints, service_name);
        }
        if let Some(ts) = &c.transport_socket {
            self.transport_socket(&from, ts, true)?;
        }
        Ok(())
    }

    fn listener(&mut self, r: &Resource) -> Result<(), TranslateError> {
        let from = format!("listener {}", r.name);
        let l: Listener = decode(&r.any, &from)?;
        for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            if let Some(ts) = &chain.transport_socket {
                self.transport_socket(&from, ts, false)?;
            }
            for f in &chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                if any.type_url == HttpConnectionManager::type_url() {
                    let hcm: HttpConnectionManager = decode(any, &from)?;
                    if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) =
                        &hcm.route_specifier
                    {
                        self.need(&from, RefKind::Route, &rds.route_config_name);
                    }
                } else if any.type_url == TcpProxy::type_url() {
                    let tcp: TcpProxy = decode(any, &from)?;
                    if let Some(tcp_proxy::ClusterSpecifier::Cluster(c)) = &tcp.cluster_specifier {
                        self.need(&from, RefKind::Cluster, c);
                    }
                }
            }
        }
        Ok(())
    }

    fn route(&mut self, r: &Resource) -> Result<(), TranslateError> {
        let from = format!("route {}", r.name);
        let rc: RouteConfiguration = decode(&r.any, &from)?;
        for vh in &rc.virtual_hosts {
            for rt in &vh.routes {
                if let Some(route::Action::Route(action)) = &rt.action
                    && let Some(route_action::ClusterSpecifier::Cluster(c)) =
                        &action.cluster_specifier
                {
                    self.need(&from, RefKind::Cluster, c);
                }
            }
        }
        Ok(())
    }
}

/// Check that every EDS, RDS, cluster and SDS name referenced by `res`
/// resolves; SDS names resolve against `secret_names` (secrets are served
/// per proxy, outside [`ProxyResources`]). The error lists every dangling
/// reference, not just the first.
pub fn check_consistency(
    res: &ProxyResources,
    secret_names: &[&str],
) -> Result<(), TranslateError> {
    let mut refs = Refs {
        res,
        secrets: secret_names.iter().copied().collect(),
        dangling: Vec::new(),
    };
    let empty = Default::default();
    for r in res.get(type_url::CLUSTER).unwrap_or(&empty).values() {
        refs.cluster(r)?;
    }
    for r in res.get(type_url::LISTENER).unwrap_or(&empty).values() {
        refs.listener(r)?;
    }
    for r in res.get(type_url::ROUTE).unwrap_or(&empty).values() {
        refs.route(r)?;
    }
    if refs.dangling.is_empty() {
        Ok(())
    } else {
        refs.dangling.sort();
        refs.dangling.dedup();
        Err(TranslateError::Dangling(refs.dangling))
    }
}
