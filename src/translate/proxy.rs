//! Entry points: the resources of one sidecar, built from resources shared
//! by the whole mesh plus the few that depend on the proxy.
//!
//! Outbound clusters, their endpoints and outbound routes are identical for
//! every proxy, so [`mesh_resources`] builds (and encodes) them once per mesh
//! and every proxy holds the same `Arc`s. Only listeners and the inbound
//! cluster/route of a proxy are built per proxy.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::{
    ProxyResources, Resource, ResourceMap, TranslateError, cluster, endpoint, listener, names,
    redirect, route, type_url,
};
use crate::model::{Interception, Mesh, MtlsMode, ObjectKey, Protocol, Workload};

/// The per-mesh part of every proxy's configuration, encoded once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshResources {
    /// The trust domain the SAN matchers were built for; a proxy translated
    /// for another trust domain must not reuse them.
    trust_domain: String,
    /// Outbound clusters, one per service port.
    pub clusters: ResourceMap,
    /// ClusterLoadAssignments of the outbound clusters (same names).
    pub endpoints: ResourceMap,
    /// Route configurations of the HTTP outbound service ports.
    pub routes: ResourceMap,
}

impl MeshResources {
    /// Trust domain these resources were built for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// Resources of one proxy plus what the translation had to leave out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyTranslation {
    /// What the proxy is served (SDS secrets excepted, see [`super::secrets`]).
    pub resources: ProxyResources,
    /// Human-readable reasons for skipped listeners (address collisions,
    /// unresolvable target ports), for logs and the admin API.
    pub warnings: Vec<String>,
}

fn insert(map: &mut ResourceMap, res: Resource) {
    map.insert(res.name.clone(), Arc::new(res));
}

/// Build the resources shared by every proxy of `mesh`.
pub fn mesh_resources(mesh: &Mesh, trust_domain: &str) -> MeshResources {
    let mut out = MeshResources {
        trust_domain: trust_domain.to_string(),
        ..Default::default()
    };
    // Once per mesh, not once per cluster: a scan of every workload per
    // service port was O(services × workloads) on every change.
    let accounts = mesh.service_accounts_by_service();
    let none = std::collections::BTreeSet::new();
    for svc in mesh.services.values() {
        let svc_accounts = accounts.get(&svc.key).unwrap_or(&none);
        for port in &svc.ports {
            let name = names::outbound_cluster(&svc.key, port.port);
            insert(
                &mut out.clusters,
                Resource::new(
                    &name,
                    cluster::outbound_with_accounts(mesh, trust_domain, svc, port, svc_accounts),
                ),
            );
            let eps = mesh.endpoints(&svc.key, port.port);
            insert(
                &mut out.endpoints,
                Resource::new(&name, endpoint::assignment(&name, eps)),
            );
            if port.protocol == Protocol::Http {
                let route_name = names::outbound_route(&svc.key, port.port);
                insert(
                    &mut out.routes,
                    Resource::new(
                        &route_name,
                        route::catch_all(&route_name, &route_name, &name),
                    ),
                );
            }
        }
    }
    out
}

/// What one inbound listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InboundPort {
    /// HTTP if any service port targeting it is HTTP.
    protocol: Protocol,
    /// Applied server mode; the strictest of the service ports targeting
    /// it (fail closed), with a warning when they disagree.
    mode: MtlsMode,
}

/// Target ports the sidecar of `w` accepts mesh traffic on.
fn inbound_ports(
    mesh: &Mesh,
    w: &Workload,
    warnings: &mut Vec<String>,
) -> BTreeMap<u16, InboundPort> {
    let mut ports: BTreeMap<u16, InboundPort> = BTreeMap::new();
    // Which service port set each target port's mode, for the warning.
    let mut set_by: BTreeMap<u16, (ObjectKey, u16, MtlsMode)> = BTreeMap::new();
    for svc in mesh.services_selecting(w) {
        for port in &svc.ports {
            match w.resolve_target_port(&port.target_port) {
                Some(t) => {
                    let mode = mesh.port_policy(&svc.key, port.port).server;
                    let p = ports.entry(t).or_insert(InboundPort {
                        protocol: port.protocol,
                        mode,
                    });
                    if port.protocol == Protocol::Http {
                        p.protocol = Protocol::Http;
                    }
                    match set_by.get(&t) {
                        Some((s, sp, m)) if *m != mode => {
                            warnings.push(format!(
                                "pod {}: target port {t} is {m} for service {s} port {sp} but \
                                 {mode} for service {} port {}; the stricter applies",
                                w.key, svc.key, port.port
                            ));
                            if mode.strictness() > p.mode.strictness() {
                                p.mode = mode;
                            }
                        }
                        Some(_) => {}
                        None => {
                            set_by.insert(t, (svc.key.clone(), port.port, mode));
                        }
                    }
                }
                None => warnings.push(format!(
                    "service {} port {}: targetPort {:?} is not a container port of pod {}; \
                     no inbound listener for it",
                    svc.key, port.port, port.target_port, w.key
                )),
            }
        }
    }
    ports
}

/// Two listeners cannot bind the same port when their IPs are equal or one
/// of them is the wildcard address.
fn overlaps(a: (IpAddr, u16), b: (IpAddr, u16)) -> bool {
    a.1 == b.1 && (a.0 == b.0 || a.0.is_unspecified() || b.0.is_unspecified())
}

/// Resources of the sidecar of pod `proxy`, reusing the shared part.
///
/// `shared` must come from [`mesh_resources`] on the same `mesh`; a
/// different trust domain is refused.
pub fn proxy_resources_with(
    mesh: &Mesh,
    shared: &MeshResources,
    trust_domain: &str,
    proxy: &ObjectKey,
) -> Result<ProxyTranslation, TranslateError> {
    let w = mesh
        .workloads
        .get(proxy)
        .ok_or_else(|| TranslateError::UnknownProxy(proxy.clone()))?;
    if shared.trust_domain != trust_domain {
        return Err(TranslateError::TrustDomainMismatch {
            built: shared.trust_domain.clone(),
            requested: trust_domain.to_string(),
        });
    }
    let mut warnings = Vec::new();
    let inbound = inbound_part(mesh, w, trust_domain, &mut warnings);
    let mut clusters = shared.clusters.clone();
    clusters.extend(inbound.clusters);
    let endpoints = shared.endpoints.clone();
    let mut routes = shared.routes.clone();
    routes.extend(inbound.routes);
    let mut listeners = inbound.listeners;
    match w.interception {
        Interception::Explicit => {
            let mut bound = inbound.bound;
            let who = format!("pod {}", w.key);
            outbound_part(
                mesh,
                &who,
                w.outbound_ip,
                &mut bound,
                &mut listeners,
                &mut warnings,
            );
        }
        Interception::Redirect => {
            let who = format!("pod {}", w.key);
            let (outbound, direct) =
                redirect::outbound_listener(mesh, trust_domain, &who, &mut warnings);
            insert(
                &mut listeners,
                Resource::new(names::VIRTUAL_OUTBOUND_LISTENER, outbound),
            );
            for c in direct {
                insert(&mut clusters, Resource::new(c.name.clone(), c));
            }
        }
    }

    let mut resources = ProxyResources::default();
    resources.by_type.insert(type_url::CLUSTER, clusters);
    resources.by_type.insert(type_url::ENDPOINT, endpoints);
    resources.by_type.insert(type_url::LISTENER, listeners);
    resources.by_type.insert(type_url::ROUTE, routes);
    Ok(ProxyTranslation {
        resources,
        warnings,
    })
}

/// The per-pod (`inbound|…`) resources of a sidecar.
struct InboundPart {
    listeners: ResourceMap,
    clusters: ResourceMap,
    routes: ResourceMap,
    /// Addresses the inbound listeners bind, with the listener holding each.
    bound: Vec<((IpAddr, u16), String)>,
}

fn inbound_part(
    mesh: &Mesh,
    w: &Workload,
    trust_domain: &str,
    warnings: &mut Vec<String>,
) -> InboundPart {
    let mut out = InboundPart {
        listeners: ResourceMap::new(),
        clusters: ResourceMap::new(),
        routes: ResourceMap::new(),
        bound: Vec::new(),
    };
    let ports = inbound_ports(mesh, w, warnings);
    for (&target, &InboundPort { protocol, mode }) in &ports {
        if w.interception == Interception::Explicit {
            let name = names::inbound_listener(target);
            insert(
                &mut out.listeners,
                Resource::new(
                    &name,
                    listener::inbound(w.ip, trust_domain, target, protocol, mode),
                ),
            );
            out.bound.push(((w.ip, target), name));
        }
        let cluster_name = names::inbound_cluster(target);
        insert(
            &mut out.clusters,
            Resource::new(&cluster_name, cluster::inbound(w.app_ip, target, protocol)),
        );
        if protocol == Protocol::Http {
            let route_name = names::inbound_route(target);
            insert(
                &mut out.routes,
                Resource::new(
                    &route_name,
                    route::catch_all(&route_name, &format!("inbound|{target}"), &cluster_name),
                ),
            );
        }
    }
    if w.interception == Interception::Redirect {
        let targets: Vec<redirect::InboundTarget> = ports
            .iter()
            .map(|(&port, p)| redirect::InboundTarget {
                port,
                protocol: p.protocol,
                mode: p.mode,
            })
            .collect();
        let who = format!("pod {}", w.key);
        insert(
            &mut out.listeners,
            Resource::new(
                names::VIRTUAL_INBOUND_LISTENER,
                redirect::inbound_listener(w.ip, trust_domain, &targets, &who, warnings),
            ),
        );
        for name in [
            names::PASSTHROUGH_CLUSTER,
            names::INBOUND_PASSTHROUGH_CLUSTER,
        ] {
            insert(
                &mut out.clusters,
                Resource::new(name, redirect::original_dst_cluster(name)),
            );
        }
        insert(
            &mut out.clusters,
            Resource::new(names::BLACKHOLE_CLUSTER, redirect::blackhole_cluster()),
        );
    }
    out
}

/// One outbound listener per service port at `outbound_ip`, skipping any
/// whose address collides with one already in `bound`.
fn outbound_part(
    mesh: &Mesh,
    who: &str,
    outbound_ip: IpAddr,
    bound: &mut Vec<((IpAddr, u16), String)>,
    listeners: &mut ResourceMap,
    warnings: &mut Vec<String>,
) {
    for svc in mesh.services.values() {
        for port in &svc.ports {
            let name = names::outbound_listener(&svc.key, port.port);
            let addr = (outbound_ip, port.port);
            if let Some((held, holder)) = bound.iter().find(|(a, _)| overlaps(*a, addr)) {
                warnings.push(format!(
                    "{who}: outbound listener {name} skipped: {}:{} collides with listener \
                     {holder} on {}:{}",
                    addr.0, addr.1, held.0, held.1
                ));
                continue;
            }
            insert(
                listeners,
                Resource::new(
                    &name,
                    listener::outbound(addr.0, &svc.key, port.port, port.protocol),
                ),
            );
            bound.push((addr, name));
        }
    }
}

/// A sidecar's translation split in two, so that sidecars with the same
/// outbound address share one translation of the outbound listeners (the
/// bulk of a sidecar's own configuration: one listener per service port)
/// instead of each encoding its own copy.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitTranslation {
    /// The pod's own `inbound|…` listeners, clusters and routes.
    pub inbound: ProxyResources,
    /// Where the outbound listeners bind; equal for every pod that shares
    /// the [`outbound_listeners`] translation.
    pub outbound_ip: IpAddr,
    /// Warnings of the inbound part (the outbound part has its own).
    pub warnings: Vec<String>,
}

/// The inbound part of the sidecar of `proxy`, when its outbound listeners
/// are exactly [`outbound_listeners`] of its outbound address, i.e. none of
/// its inbound listeners binds an address an outbound listener would.
/// `Ok(None)` when they collide: use [`proxy_resources_with`] instead.
pub fn split_translation(
    mesh: &Mesh,
    trust_domain: &str,
    proxy: &ObjectKey,
) -> Result<Option<SplitTranslation>, TranslateError> {
    let w = mesh
        .workloads
        .get(proxy)
        .ok_or_else(|| TranslateError::UnknownProxy(proxy.clone()))?;
    // A redirected sidecar's virtual listeners are translated whole.
    if w.interception == Interception::Redirect {
        return Ok(None);
    }
    let mut warnings = Vec::new();
    let inbound = inbound_part(mesh, w, trust_domain, &mut warnings);
    let collides = inbound.bound.iter().any(|(a, _)| {
        mesh.services
            .values()
            .flat_map(|s| &s.ports)
            .any(|p| overlaps(*a, (w.outbound_ip, p.port)))
    });
    if collides {
        return Ok(None);
    }
    let mut resources = ProxyResources::default();
    resources
        .by_type
        .insert(type_url::CLUSTER, inbound.clusters);
    resources
        .by_type
        .insert(type_url::LISTENER, inbound.listeners);
    resources.by_type.insert(type_url::ROUTE, inbound.routes);
    Ok(Some(SplitTranslation {
        inbound: resources,
        outbound_ip: w.outbound_ip,
        warnings,
    }))
}

/// The outbound listeners of every sidecar whose outbound address is
/// `outbound_ip` and whose inbound listeners do not collide with them (see
/// [`split_translation`]), with the warnings of collisions among themselves.
pub fn outbound_listeners(mesh: &Mesh, outbound_ip: IpAddr) -> (ResourceMap, Vec<String>) {
    let mut listeners = ResourceMap::new();
    let mut warnings = Vec::new();
    let who = format!("pods with outbound address {outbound_ip}");
    outbound_part(
        mesh,
        &who,
        outbound_ip,
        &mut Vec::new(),
        &mut listeners,
        &mut warnings,
    );
    (listeners, warnings)
}

/// Resources of the sidecar of pod `proxy` (convenience: builds the shared
/// part too and drops the warnings).
pub fn proxy_resources(
    mesh: &Mesh,
    trust_domain: &str,
    proxy: &ObjectKey,
) -> Result<ProxyResources, TranslateError> {
    if !mesh.workloads.contains_key(proxy) {
        return Err(TranslateError::UnknownProxy(proxy.clone()));
    }
    let shared = mesh_resources(mesh, trust_domain);
    proxy_resources_with(mesh, &shared, trust_domain, proxy).map(|t| t.resources)
}
