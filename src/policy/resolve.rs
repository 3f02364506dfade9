//! Policies against the mesh: which services and ports they name, which
//! policy of a scope is in force, and the effective mode of every service
//! port by precedence (port > service > namespace > mesh > PERMISSIVE).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::schema::{object_name, port_field};
use crate::discovery::ConfigError;
use crate::model::{
    Mesh, MtlsMode, ObjectKey, Policy, PolicyScope, PortPolicy, PortSelector, ServicePortKey,
};

/// A level of the precedence chain, widest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Mesh,
    Namespace,
    Service,
    Port,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Mesh => "mesh",
            Level::Namespace => "namespace",
            Level::Service => "service",
            Level::Port => "port",
        }
    }
}

/// One level of the chain that produced a port's mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    pub level: Level,
    /// The ConfigMap that sets this level; `None` when no policy does.
    pub config_map: Option<ObjectKey>,
    /// The mode it sets (DEFAULT = inherit); `None` when no policy does.
    pub mode: Option<MtlsMode>,
}

/// The effective mode of one service port and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// Never DEFAULT.
    pub mode: MtlsMode,
    /// mesh → namespace → service → port.
    pub chain: Vec<ChainLink>,
    /// The level whose mode won; `None` = Ward's built-in mesh default.
    pub decided_by: Option<Level>,
}

/// Precedence alone: the narrowest level that sets a mode (not DEFAULT)
/// wins; nothing set gives [`MtlsMode::MESH_DEFAULT`].
pub fn effective(
    mesh: Option<MtlsMode>,
    namespace: Option<MtlsMode>,
    service: Option<MtlsMode>,
    port: Option<MtlsMode>,
) -> (MtlsMode, Option<Level>) {
    [
        (Level::Port, port),
        (Level::Service, service),
        (Level::Namespace, namespace),
        (Level::Mesh, mesh),
    ]
    .into_iter()
    .find_map(|(level, m)| m.and_then(MtlsMode::set).map(|m| (m, Some(level))))
    .unwrap_or((MtlsMode::MESH_DEFAULT, None))
}

/// What a policy names that the mesh does not have.
pub fn check_policy(policy: &Policy, mesh: &Mesh) -> Vec<ConfigError> {
    let object = object_name(&policy.config_map);
    let PolicyScope::Service(key) = &policy.scope else {
        return Vec::new();
    };
    let Some(svc) = mesh.services.get(key) else {
        return vec![ConfigError::new(
            object,
            "data.service",
            format!("service {key} does not exist"),
        )];
    };
    policy
        .ports
        .keys()
        .filter(|sel| !svc.ports.iter().any(|p| sel.matches(p)))
        .map(|sel| {
            let what = match sel {
                PortSelector::Number(n) => format!("port {n}"),
                PortSelector::Name(n) => format!("port named {n:?}"),
            };
            ConfigError::new(
                &object,
                port_field(&sel.to_string()),
                format!("service {key} has no {what}"),
            )
        })
        .collect()
}

/// The policies in force and the problems found choosing them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    /// By ConfigMap key.
    pub in_force: BTreeMap<ObjectKey, Policy>,
    pub errors: Vec<ConfigError>,
}

/// Choose the policies in force. A ConfigMap that names a missing service
/// or port keeps its `previous` version (the last good one) if it had one;
/// of two policies for one scope, the one already in force (else the first
/// by namespace/name) wins and the other is reported, naming both.
pub fn select(mesh: &Mesh, previous: &BTreeMap<ObjectKey, Policy>) -> Selection {
    let mut out = Selection::default();
    for (cm, policy) in &mesh.policies {
        let errs = check_policy(policy, mesh);
        if errs.is_empty() {
            out.in_force.insert(cm.clone(), policy.clone());
            continue;
        }
        let kept = previous
            .get(cm)
            .filter(|p| check_policy(p, mesh).is_empty());
        let suffix = if kept.is_some() {
            "; the last good version of this ConfigMap stays in force"
        } else {
            "; this ConfigMap is not applied"
        };
        out.errors.extend(errs.into_iter().map(|mut e| {
            e.message.push_str(suffix);
            e
        }));
        if let Some(p) = kept {
            out.in_force.insert(cm.clone(), p.clone());
        }
    }
    let mut by_scope: BTreeMap<PolicyScope, Vec<ObjectKey>> = BTreeMap::new();
    for (cm, p) in &out.in_force {
        by_scope
            .entry(p.scope.clone())
            .or_default()
            .push(cm.clone());
    }
    for (scope, cms) in by_scope.into_iter().filter(|(_, c)| c.len() > 1) {
        let winner = cms
            .iter()
            .find(|cm| previous.get(*cm).is_some_and(|p| p.scope == scope))
            .unwrap_or(&cms[0])
            .clone();
        for loser in cms.iter().filter(|c| **c != winner) {
            out.errors.push(ConfigError::new(
                object_name(loser),
                "data.scope",
                format!(
                    "{scope} already has a policy: ConfigMap {winner} and ConfigMap {loser} both \
                     set it; only one policy per scope is allowed, so ConfigMap {loser} is not applied"
                ),
            ));
            out.in_force.remove(loser);
        }
    }
    out
}

/// Effective mode of every service port of the mesh under `in_force`.
pub fn resolve(
    mesh: &Mesh,
    in_force: &BTreeMap<ObjectKey, Policy>,
) -> BTreeMap<ServicePortKey, Resolved> {
    let mut mesh_policy = None;
    let mut namespaces: BTreeMap<&str, &Policy> = BTreeMap::new();
    let mut services: BTreeMap<&ObjectKey, &Policy> = BTreeMap::new();
    for p in in_force.values() {
        match &p.scope {
            PolicyScope::Mesh => mesh_policy = mesh_policy.or(Some(p)),
            PolicyScope::Namespace(ns) => {
                namespaces.entry(ns.as_str()).or_insert(p);
            }
            PolicyScope::Service(s) => {
                services.entry(s).or_insert(p);
            }
        }
    }
    let link = |level, p: Option<&Policy>, mode: Option<MtlsMode>| ChainLink {
        level,
        config_map: p.map(|p| p.config_map.clone()),
        mode,
    };
    let mut out = BTreeMap::new();
    for svc in mesh.services.values() {
        let ns = namespaces.get(svc.key.namespace.as_str()).copied();
        let sp = services.get(&svc.key).copied();
        for port in &svc.ports {
            // A port named by number wins over the same port named by name.
            let port_mode = sp.and_then(|p| {
                p.ports
                    .get(&PortSelector::Number(port.port))
                    .or_else(|| {
                        (!port.name.is_empty())
                            .then(|| p.ports.get(&PortSelector::Name(port.name.clone())))
                            .flatten()
                    })
                    .copied()
            });
            let chain = vec![
                link(Level::Mesh, mesh_policy, mesh_policy.map(|p| p.mode)),
                link(Level::Namespace, ns, ns.map(|p| p.mode)),
                link(Level::Service, sp, sp.map(|p| p.mode)),
                link(Level::Port, port_mode.and(sp), port_mode),
            ];
            let (mode, decided_by) =
                effective(chain[0].mode, chain[1].mode, chain[2].mode, chain[3].mode);
            out.insert(
                (svc.key.clone(), port.port),
                Resolved {
                    mode,
                    chain,
                    decided_by,
                },
            );
        }
    }
    out
}

/// The converged mTLS state of every port (no rollout in between): what a
/// freshly started proxy gets, and what offline tools show.
pub fn converged(
    resolved: &BTreeMap<ServicePortKey, Resolved>,
) -> BTreeMap<ServicePortKey, PortPolicy> {
    resolved
        .iter()
        .map(|(k, r)| (k.clone(), PortPolicy::converged(r.mode)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, Service, ServicePort, TargetPort};
    use MtlsMode::*;

    const MODES: [Option<MtlsMode>; 5] = [
        None,
        Some(Default),
        Some(Strict),
        Some(Permissive),
        Some(Disable),
    ];

    /// Every combination of mesh/namespace/service/port unset, DEFAULT or
    /// set: the narrowest level with a real mode wins, else PERMISSIVE.
    #[test]
    fn precedence_table() {
        let mut rows = 0;
        for m in MODES {
            for n in MODES {
                for s in MODES {
                    for p in MODES {
                        let (mode, level) = effective(m, n, s, p);
                        let expected = [
                            (p, Level::Port),
                            (s, Level::Service),
                            (n, Level::Namespace),
                            (m, Level::Mesh),
                        ]
                        .into_iter()
                        .find(|(x, _)| matches!(x, Some(Strict | Permissive | Disable)));
                        match expected {
                            Some((x, l)) => assert_eq!(
                                (mode, level),
                                (x.unwrap(), Some(l)),
                                "{m:?} {n:?} {s:?} {p:?}"
                            ),
                            None => assert_eq!(
                                (mode, level),
                                (Permissive, None),
                                "{m:?} {n:?} {s:?} {p:?}"
                            ),
                        }
                        rows += 1;
                    }
                }
            }
        }
        assert_eq!(rows, 625);
        // A few rows spelled out, so the rule is readable here.
        assert_eq!(effective(None, None, None, None), (Permissive, None));
        assert_eq!(
            effective(Some(Default), Some(Default), Some(Default), Some(Default)),
            (Permissive, None)
        );
        assert_eq!(
            effective(Some(Strict), None, None, None),
            (Strict, Some(Level::Mesh))
        );
        assert_eq!(
            effective(Some(Strict), Some(Disable), None, None),
            (Disable, Some(Level::Namespace))
        );
        assert_eq!(
            effective(Some(Strict), Some(Disable), Some(Permissive), None),
            (Permissive, Some(Level::Service))
        );
        assert_eq!(
            effective(Some(Disable), Some(Disable), Some(Disable), Some(Strict)),
            (Strict, Some(Level::Port))
        );
        assert_eq!(
            effective(Some(Disable), Some(Strict), Some(Default), Some(Default)),
            (Strict, Some(Level::Namespace))
        );
    }

    fn policy(
        ns: &str,
        name: &str,
        scope: PolicyScope,
        mode: MtlsMode,
        ports: &[(PortSelector, MtlsMode)],
    ) -> Policy {
        Policy {
            config_map: ObjectKey::new(ns, name),
            scope,
            mode,
            ports: ports.iter().cloned().collect(),
        }
    }

    fn mesh_with(policies: Vec<Policy>) -> Mesh {
        let mut mesh = Mesh::default();
        for (ns, name) in [("demo", "server"), ("demo", "db"), ("other", "api")] {
            let key = ObjectKey::new(ns, name);
            mesh.services.insert(
                key.clone(),
                Service {
                    key,
                    ports: vec![
                        ServicePort {
                            name: "http".into(),
                            port: 80,
                            target_port: TargetPort::Number(8080),
                            protocol: Protocol::Http,
                        },
                        ServicePort {
                            name: "metrics".into(),
                            port: 9090,
                            target_port: TargetPort::Number(9090),
                            protocol: Protocol::Http,
                        },
                    ],
                    selector: BTreeMap::new(),
                    cluster_ips: Vec::new(),
                },
            );
        }
        for p in policies {
            mesh.policies.insert(p.config_map.clone(), p);
        }
        mesh
    }

    fn svc(ns: &str, n: &str) -> PolicyScope {
        PolicyScope::Service(ObjectKey::new(ns, n))
    }

    #[test]
    fn resolve_walks_the_chain_with_config_map_names() {
        let mesh = mesh_with(vec![
            policy("ward", "mesh", PolicyScope::Mesh, Strict, &[]),
            policy(
                "demo",
                "ns",
                PolicyScope::Namespace("demo".into()),
                Permissive,
                &[],
            ),
            policy(
                "demo",
                "server",
                svc("demo", "server"),
                Default,
                &[(PortSelector::Name("metrics".into()), Disable)],
            ),
        ]);
        let sel = select(&mesh, &BTreeMap::new());
        assert_eq!(sel.errors, vec![]);
        let r = resolve(&mesh, &sel.in_force);
        let get = |ns: &str, n: &str, p: u16| r[&(ObjectKey::new(ns, n), p)].clone();
        assert_eq!(get("other", "api", 80).mode, Strict);
        assert_eq!(get("other", "api", 80).decided_by, Some(Level::Mesh));
        assert_eq!(get("demo", "db", 80).mode, Permissive);
        assert_eq!(get("demo", "server", 80).mode, Permissive);
        assert_eq!(get("demo", "server", 80).decided_by, Some(Level::Namespace));
        let metrics = get("demo", "server", 9090);
        assert_eq!(
            (metrics.mode, metrics.decided_by),
            (Disable, Some(Level::Port))
        );
        let names: Vec<Option<String>> = metrics
            .chain
            .iter()
            .map(|l| l.config_map.as_ref().map(ToString::to_string))
            .collect();
        assert_eq!(
            names,
            vec![
                Some("ward/mesh".into()),
                Some("demo/ns".into()),
                Some("demo/server".into()),
                Some("demo/server".into())
            ]
        );
        // Number beats name for the same port.
        let mesh = mesh_with(vec![policy(
            "demo",
            "server",
            svc("demo", "server"),
            Default,
            &[
                (PortSelector::Name("http".into()), Disable),
                (PortSelector::Number(80), Strict),
            ],
        )]);
        let r = resolve(&mesh, &select(&mesh, &BTreeMap::new()).in_force);
        assert_eq!(r[&(ObjectKey::new("demo", "server"), 80)].mode, Strict);
    }

    #[test]
    fn unknown_service_and_port_are_reported_and_last_good_stays() {
        let good = policy(
            "demo",
            "strict-server",
            svc("demo", "server"),
            Strict,
            &[(PortSelector::Number(80), Strict)],
        );
        let mesh = mesh_with(vec![good.clone()]);
        let first = select(&mesh, &BTreeMap::new());
        assert!(first.errors.is_empty());

        let bad = policy(
            "demo",
            "strict-server",
            svc("demo", "server"),
            Disable,
            &[(PortSelector::Number(9999), Disable)],
        );
        let mesh = mesh_with(vec![bad]);
        let sel = select(&mesh, &first.in_force);
        let msgs: Vec<String> = sel.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            vec![
                "ConfigMap demo/strict-server: data.ports[\"9999\"]: service demo/server has no port 9999; the last good version of this ConfigMap stays in force"
            ]
        );
        assert_eq!(sel.in_force[&ObjectKey::new("demo", "strict-server")], good);

        // Without a previous version: not applied.
        let sel = select(&mesh, &BTreeMap::new());
        assert!(sel.in_force.is_empty());
        assert!(
            sel.errors[0]
                .message
                .ends_with("this ConfigMap is not applied")
        );

        let mesh = mesh_with(vec![policy(
            "demo",
            "ghost",
            svc("demo", "ghost"),
            Strict,
            &[],
        )]);
        let msgs: Vec<String> = select(&mesh, &BTreeMap::new())
            .errors
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            msgs[0].starts_with(
                "ConfigMap demo/ghost: data.service: service demo/ghost does not exist"
            ),
            "{msgs:?}"
        );

        let mesh = mesh_with(vec![policy(
            "demo",
            "p",
            svc("demo", "server"),
            Default,
            &[(PortSelector::Name("admin".into()), Strict)],
        )]);
        let msgs: Vec<String> = select(&mesh, &BTreeMap::new())
            .errors
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(msgs[0].starts_with("ConfigMap demo/p: data.ports[\"admin\"]: service demo/server has no port named \"admin\""), "{msgs:?}");
    }

    #[test]
    fn two_policies_for_one_scope_name_both_and_the_one_in_force_stays() {
        let a = policy("demo", "b-first", PolicyScope::Mesh, Strict, &[]);
        let b = policy("ward", "a-second", PolicyScope::Mesh, Disable, &[]);
        let other = policy(
            "demo",
            "ns",
            PolicyScope::Namespace("demo".into()),
            Permissive,
            &[],
        );
        let mesh = mesh_with(vec![a.clone(), b.clone(), other.clone()]);
        // Nothing in force yet: first by namespace/name wins.
        let sel = select(&mesh, &BTreeMap::new());
        assert_eq!(
            sel.in_force
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["demo/b-first", "demo/ns"]
        );
        assert_eq!(sel.errors.len(), 1);
        let msg = sel.errors[0].to_string();
        assert!(
            msg.starts_with("ConfigMap ward/a-second: data.scope: mesh already has a policy"),
            "{msg}"
        );
        assert!(
            msg.contains("ConfigMap demo/b-first") && msg.contains("ConfigMap ward/a-second"),
            "{msg}"
        );
        // The one in force stays in force, whatever the order.
        let previous = BTreeMap::from([(b.config_map.clone(), b.clone())]);
        let sel = select(&mesh, &previous);
        assert!(sel.in_force.contains_key(&b.config_map));
        assert!(!sel.in_force.contains_key(&a.config_map));
        assert!(
            sel.errors[0]
                .to_string()
                .starts_with("ConfigMap demo/b-first: data.scope")
        );
        // Other policies are unaffected.
        assert!(sel.in_force.contains_key(&other.config_map));
    }
}
