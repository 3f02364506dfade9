//! The state-of-the-world ADS protocol for one stream, as a pure state
//! machine: requests and snapshot changes in, responses out. It knows nothing
//! of gRPC or tasks, so every protocol rule is unit-testable.
//!
//! Protocol references are to the xDS protocol doc
//! (envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol), sections named.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::cache::{Layer, ProxySnapshot, SLOTS, intern_names};
use crate::translate::{Resource, type_url};

/// What a request meant, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// First request for a type on this stream, or a request without a nonce.
    Initial,
    /// Nonce matches the last response and no error: the version was applied.
    Ack { version: String },
    /// Nonce matches and `error_detail` is set: the version was rejected.
    Nack { version: String, message: String },
    /// The nonce is not the latest one sent for this type. Not an ACK/NACK,
    /// but its `resource_names` still count ("ACK and NACK semantics").
    Stale,
    /// A type URL Ward does not serve.
    Unknown,
}

/// Subscribed names; `None` is a wildcard subscription (LDS/CDS only).
/// Interned: many proxies subscribe to the same set.
pub(crate) type Names = Option<Arc<BTreeSet<String>>>;

/// Per type, what this stream subscribed to and what it was sent.
#[derive(Clone, Debug, Default)]
struct TypeState {
    names: Names,
    /// Has the client asked for this type at all?
    subscribed: bool,
    /// Version and nonce of the last response sent. The nonce is recorded
    /// before the response leaves so a fast ACK can never race it.
    sent_version: Option<String>,
    sent_nonce: Option<String>,
    /// The layers and names the last evaluation saw: when neither changed
    /// there is nothing to compute (the common case for most types on most
    /// snapshot changes).
    seen: Option<([Arc<Layer>; SLOTS], Names)>,
    /// CDS only: the cluster layers last sent, to tell whether a cluster
    /// changed (its endpoints must then be resent).
    sent_layers: Option<[Arc<Layer>; SLOTS]>,
    /// Last version the client ACKed.
    acked_version: Option<String>,
    /// Resend even if the version did not change (a cluster changed, so
    /// its endpoints are re-sent: make-before-break).
    force: bool,
}

/// One stream's SotW protocol state.
#[derive(Debug, Default)]
pub struct SotwStream {
    /// Monotonic counter: nonces are unique within the stream.
    nonce_seq: u64,
    types: BTreeMap<&'static str, TypeState>,
}

/// The canonical `&'static str` for a served type URL.
pub(crate) fn canonical(type_url: &str) -> Option<&'static str> {
    type_url::ORDER.into_iter().find(|t| *t == type_url)
}

/// Do the request's names equal the subscription? Without allocating: a
/// SotW client repeats every name in every ACK, thousands for EDS.
fn same_names(current: &Names, wildcard_type: bool, requested: &[String]) -> bool {
    let wildcard = wildcard_type && (requested.is_empty() || requested.iter().any(|n| n == "*"));
    match current {
        None => wildcard,
        Some(set) => {
            !wildcard
                && requested.iter().all(|n| set.contains(n))
                && set.len() == requested.iter().collect::<BTreeSet<_>>().len()
        }
    }
}

fn same_layers(a: &[Arc<Layer>; SLOTS], b: &[Arc<Layer>; SLOTS]) -> bool {
    a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

fn same_names_ptr(a: &Names, b: &Names) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

impl SotwStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handle one request; returns what it meant and, if needed, the
    /// response for its type.
    pub fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snapshot: &ProxySnapshot,
    ) -> (RequestKind, Option<DiscoveryResponse>) {
        let Some(ty) = canonical(&req.type_url) else {
            return (RequestKind::Unknown, None);
        };
        let state = self.types.entry(ty).or_default();

        let kind = if req.response_nonce.is_empty() {
            RequestKind::Initial
        } else if state.sent_nonce.as_deref() != Some(req.response_nonce.as_str()) {
            RequestKind::Stale
        } else if let Some(err) = &req.error_detail {
            RequestKind::Nack {
                version: state.sent_version.clone().unwrap_or_default(),
                message: err.message.clone(),
            }
        } else {
            let version = state.sent_version.clone().unwrap_or_default();
            state.acked_version = Some(version.clone());
            RequestKind::Ack { version }
        };

        // Subscriptions: an empty list on LDS/CDS (or "*") is a wildcard
        // ("How the client specifies what resources to return").
        let wildcard_type = type_url::is_wildcard_type(ty);
        let names_changed =
            !state.subscribed || !same_names(&state.names, wildcard_type, &req.resource_names);
        if names_changed {
            let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
            state.names = if wildcard_type && (names.is_empty() || names.contains("*")) {
                None
            } else {
                Some(intern_names(names))
            };
        }
        state.subscribed = true;

        // A NACK or ACK with unchanged names needs no answer: the rejected
        // version is never resent; a new one goes out when config changes.
        if matches!(kind, RequestKind::Nack { .. } | RequestKind::Ack { .. }) && !names_changed {
            return (kind, None);
        }
        if matches!(kind, RequestKind::Stale) && !names_changed {
            return (kind, None);
        }
        // A new stream (or a client that lost our nonce) gets the state even
        // if the version equals what this stream last sent.
        if matches!(kind, RequestKind::Initial) {
            state.force = true;
        }
        let resp = self.respond(ty, snapshot);
        (kind, resp)
    }

    /// The snapshot changed: responses for every subscribed type whose
    /// content changed, in make-before-break order.
    pub fn on_snapshot(&mut self, snapshot: &ProxySnapshot) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        for ty in type_url::ORDER {
            if self.types.get(ty).is_some_and(|s| s.subscribed)
                && let Some(resp) = self.respond(ty, snapshot)
            {
                out.push(resp);
            }
        }
        out
    }

    /// Version this stream last sent and the client ACKed, per type short name.
    pub fn acked_versions(&self) -> BTreeMap<&'static str, String> {
        self.types
            .iter()
            .filter_map(|(ty, s)| s.acked_version.clone().map(|v| (type_url::short(ty), v)))
            .collect()
    }

    /// Build a response for `ty` if what the client should have differs from
    /// what it was last sent.
    fn respond(&mut self, ty: &'static str, snapshot: &ProxySnapshot) -> Option<DiscoveryResponse> {
        let layers = snapshot.layers_or_empty(ty).clone();
        let state = self.types.get_mut(ty)?;
        if !state.force
            && state
                .seen
                .as_ref()
                .is_some_and(|(l, n)| same_layers(l, &layers) && same_names_ptr(n, &state.names))
        {
            return None;
        }
        state.seen = Some((layers.clone(), state.names.clone()));
        let selected: Vec<&Arc<Resource>> = match &state.names {
            None => snapshot.all(ty),
            // Named types: exactly the requested names that exist; missing
            // ones are sent when they appear ("Resource warming").
            Some(names) => names.iter().filter_map(|n| snapshot.get(ty, n)).collect(),
        };
        // Nothing to say about a named type we never answered yet.
        if state.names.is_some() && selected.is_empty() && state.sent_version.is_none() {
            return None;
        }
        let version = sotw_version(&selected);
        if state.sent_version.as_deref() == Some(version.as_str()) && !state.force {
            return None;
        }
        state.force = false;

        // A changed or new EDS cluster re-warms and needs its endpoints
        // again (EDS names are the clusters' names).
        if ty == type_url::CLUSTER {
            let upserted: Vec<String> = match &state.sent_layers {
                None => selected.iter().map(|r| r.name.clone()).collect(),
                Some(old) => layers
                    .iter()
                    .zip(old)
                    .flat_map(|(new, old)| new.changes_since(old).0)
                    .map(|r| r.name.clone())
                    .collect(),
            };
            state.sent_layers = Some(layers);
            if let Some(eds) = self.types.get_mut(type_url::ENDPOINT)
                && eds.subscribed
                && upserted
                    .iter()
                    .any(|n| eds.names.as_ref().is_none_or(|s| s.contains(n)))
            {
                eds.force = true;
            }
        }

        self.nonce_seq += 1;
        let nonce = self.nonce_seq.to_string();
        let state = self.types.get_mut(ty)?;
        state.sent_version = Some(version.clone());
        state.sent_nonce = Some(nonce.clone());
        Some(DiscoveryResponse {
            version_info: version,
            resources: selected.iter().map(|r| r.any.clone()).collect(),
            type_url: ty.to_string(),
            nonce,
            ..Default::default()
        })
    }
}

/// Version of a SotW response: a hash of the names and versions it carries.
/// SipHash, not SHA-256: it is computed per proxy on every change of a type.
fn sotw_version(resources: &[&Arc<Resource>]) -> String {
    let mut h = std::hash::DefaultHasher::new();
    for r in resources {
        r.name.hash(&mut h);
        r.version.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::ProxyResources;

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn cluster(name: &str, timeout_s: i64) -> Arc<Resource> {
        Arc::new(Resource::new(
            name,
            Cluster {
                name: name.into(),
                connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: timeout_s,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ))
    }

    fn cla(name: &str) -> Arc<Resource> {
        Arc::new(Resource::new(
            name,
            ClusterLoadAssignment {
                cluster_name: name.into(),
                ..Default::default()
            },
        ))
    }

    fn secret(name: &str) -> Arc<Resource> {
        Arc::new(Resource::new(
            name,
            Secret {
                name: name.into(),
                ..Default::default()
            },
        ))
    }

    fn snap(resources: Vec<Arc<Resource>>) -> ProxySnapshot {
        ProxySnapshot::from_resources(&flat(resources))
    }

    fn flat(resources: Vec<Arc<Resource>>) -> ProxyResources {
        let mut out = ProxyResources::default();
        for r in resources {
            let ty = canonical(&r.any.type_url).expect("served type");
            out.by_type.entry(ty).or_default().insert(r.name.clone(), r);
        }
        out
    }

    fn req(ty: &str, names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: ty.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            version_info: version.into(),
            ..Default::default()
        }
    }

    fn nack(ty: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad cluster".into(),
                details: vec![],
            }),
            ..req(ty, names, nonce, "")
        }
    }

    fn names(resp: &DiscoveryResponse) -> Vec<String> {
        use prost::Message;
        resp.resources
            .iter()
            .map(|a| match a.type_url.as_str() {
                type_url::CLUSTER => Cluster::decode(a.value.as_slice()).unwrap().name,
                type_url::ENDPOINT => {
                    ClusterLoadAssignment::decode(a.value.as_slice())
                        .unwrap()
                        .cluster_name
                }
                type_url::SECRET => Secret::decode(a.value.as_slice()).unwrap().name,
                other => panic!("unexpected {other}"),
            })
            .collect()
    }

    #[test]
    fn responses_have_unique_nonces_versions_and_matching_type_urls() {
        let mut s = SotwStream::new();
        let snap = snap(vec![cluster("a", 1), cluster("b", 1), secret("default")]);
        let (_, r1) = s.on_request(&req(type_url::CLUSTER, &[], "", ""), &snap);
        let (_, r2) = s.on_request(&req(type_url::SECRET, &["default"], "", ""), &snap);
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        assert_ne!(r1.nonce, r2.nonce);
        assert!(!r1.version_info.is_empty());
        for r in [&r1, &r2] {
            assert!(r.resources.iter().all(|a| a.type_url == r.type_url));
        }
        assert_eq!(names(&r1), ["a", "b"]);
    }

    #[test]
    fn ack_is_recorded_and_needs_no_response() {
        let mut s = SotwStream::new();
        let snap = snap(vec![cluster("a", 1)]);
        let (_, r) = s.on_request(&req(type_url::CLUSTER, &[], "", ""), &snap);
        let r = r.unwrap();
        let (kind, again) = s.on_request(
            &req(type_url::CLUSTER, &[], &r.nonce, &r.version_info),
            &snap,
        );
        assert_eq!(
            kind,
            RequestKind::Ack {
                version: r.version_info.clone()
            }
        );
        assert!(again.is_none());
        assert_eq!(s.acked_versions()["cds"], r.version_info);
    }

    #[test]
    fn nack_is_recorded_and_the_rejected_version_is_not_resent() {
        let mut s = SotwStream::new();
        let good = snap(vec![cluster("a", 1)]);
        let (_, r1) = s.on_request(&req(type_url::CLUSTER, &[], "", ""), &good);
        let r1 = r1.unwrap();
        s.on_request(
            &req(type_url::CLUSTER, &[], &r1.nonce, &r1.version_info),
            &good,
        );

        let bad = snap(vec![cluster("a", 2)]);
        let pushed = s.on_snapshot(&bad);
        assert_eq!(pushed.len(), 1);
        let (kind, resp) = s.on_request(&nack(type_url::CLUSTER, &[], &pushed[0].nonce), &bad);
        assert_eq!(
            kind,
            RequestKind::Nack {
                version: pushed[0].version_info.clone(),
                message: "bad cluster".into()
            }
        );
        assert!(resp.is_none(), "rejected version must not be resent");
        // Same snapshot again: still nothing. The last ACKed version stands.
        assert!(s.on_snapshot(&bad).is_empty());
        assert_eq!(s.acked_versions()["cds"], r1.version_info);
        // A real change is pushed.
        let fixed = snap(vec![cluster("a", 3)]);
        assert_eq!(s.on_snapshot(&fixed).len(), 1);
    }

    #[test]
    fn stale_nonce_never_loses_a_subscription_change() {
        let mut s = SotwStream::new();
        let base = flat(vec![cla("a"), cla("b")]);
        let snap = ProxySnapshot::from_resources(&base);
        let (_, r1) = s.on_request(&req(type_url::ENDPOINT, &["a"], "", ""), &snap);
        let r1 = r1.unwrap();
        // A push happens; the client then sends a request still carrying the
        // old nonce but with a new name list.
        let snap2 = {
            let mut x = base.clone();
            x.by_type.get_mut(type_url::ENDPOINT).unwrap().insert(
                "a".into(),
                Arc::new(Resource::new(
                    "a",
                    ClusterLoadAssignment {
                        cluster_name: "a".into(),
                        endpoints: vec![Default::default()],
                        ..Default::default()
                    },
                )),
            );
            ProxySnapshot::from_resources(&x)
        };
        let pushed = s.on_snapshot(&snap2);
        assert_eq!(pushed.len(), 1);
        let (kind, resp) =
            s.on_request(&req(type_url::ENDPOINT, &["a", "b"], &r1.nonce, ""), &snap2);
        assert_eq!(kind, RequestKind::Stale);
        let resp = resp.expect("subscription change must be answered");
        assert_eq!(names(&resp), ["a", "b"]);
    }

    #[test]
    fn stale_nonce_without_change_is_ignored() {
        let mut s = SotwStream::new();
        let snap1 = snap(vec![cluster("a", 1)]);
        let (_, r1) = s.on_request(&req(type_url::CLUSTER, &[], "", ""), &snap1);
        let snap2 = snap(vec![cluster("a", 2)]);
        assert_eq!(s.on_snapshot(&snap2).len(), 1);
        let (kind, resp) =
            s.on_request(&req(type_url::CLUSTER, &[], &r1.unwrap().nonce, ""), &snap2);
        assert_eq!(kind, RequestKind::Stale);
        assert!(resp.is_none());
    }

    #[test]
    fn names_requested_before_they_exist_are_sent_when_they_appear() {
        let mut s = SotwStream::new();
        let (_, resp) = s.on_request(&req(type_url::SECRET, &["default"], "", ""), &snap(vec![]));
        assert!(resp.is_none());
        let pushed = s.on_snapshot(&snap(vec![secret("default")]));
        assert_eq!(pushed.len(), 1);
        assert_eq!(names(&pushed[0]), ["default"]);
    }

    #[test]
    fn named_types_get_exactly_the_requested_names() {
        let mut s = SotwStream::new();
        let snap = snap(vec![secret("default"), secret("ROOTCA"), secret("other")]);
        let (_, resp) = s.on_request(
            &req(type_url::SECRET, &["ROOTCA", "missing"], "", ""),
            &snap,
        );
        assert_eq!(names(&resp.unwrap()), ["ROOTCA"]);
    }

    #[test]
    fn wildcard_cds_is_a_complete_set_and_removal_is_a_push() {
        let mut s = SotwStream::new();
        let (_, r) = s.on_request(
            &req(type_url::CLUSTER, &[], "", ""),
            &snap(vec![cluster("a", 1), cluster("b", 1)]),
        );
        assert_eq!(names(&r.unwrap()), ["a", "b"]);
        let pushed = s.on_snapshot(&snap(vec![cluster("a", 1)]));
        assert_eq!(names(&pushed[0]), ["a"]);
        // Removing everything is still a (empty) complete set.
        let pushed = s.on_snapshot(&snap(vec![]));
        assert_eq!(pushed.len(), 1);
        assert!(pushed[0].resources.is_empty());
    }

    #[test]
    fn pushes_follow_make_before_break_order_and_changed_clusters_resend_endpoints() {
        let mut s = SotwStream::new();
        let v1 = snap(vec![secret("default"), cluster("a", 1), cla("a")]);
        s.on_request(&req(type_url::CLUSTER, &[], "", ""), &v1);
        s.on_request(&req(type_url::ENDPOINT, &["a"], "", ""), &v1);
        s.on_request(&req(type_url::SECRET, &["default"], "", ""), &v1);
        // Cluster and secret change; the endpoints do not, yet are resent.
        let v2 = snap(vec![
            Arc::new(Resource::new(
                "default",
                Secret {
                    name: "default".into(),
                    r#type: Some(envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type::GenericSecret(Default::default())),
                },
            )),
            cluster("a", 2),
            cla("a"),
        ]);
        let pushed = s.on_snapshot(&v2);
        let order: Vec<&str> = pushed
            .iter()
            .map(|r| type_url::short(&r.type_url))
            .collect();
        assert_eq!(order, ["sds", "cds", "eds"]);
        // And an unchanged snapshot pushes nothing.
        assert!(s.on_snapshot(&v2).is_empty());
    }

    #[test]
    fn initial_request_on_a_new_stream_always_gets_the_full_state() {
        let snap = snap(vec![cluster("a", 1), secret("default")]);
        // Reconnect: the client already has this version and says so.
        let mut s = SotwStream::new();
        let (kind, resp) = s.on_request(&req(type_url::CLUSTER, &[], "", "abc"), &snap);
        assert_eq!(kind, RequestKind::Initial);
        assert_eq!(names(&resp.unwrap()), ["a"]);
    }

    #[test]
    fn unknown_types_are_ignored() {
        let mut s = SotwStream::new();
        let (kind, resp) =
            s.on_request(&req("type.googleapis.com/foo", &[], "", ""), &snap(vec![]));
        assert_eq!(kind, RequestKind::Unknown);
        assert!(resp.is_none());
    }
}
