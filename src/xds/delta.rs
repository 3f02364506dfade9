//! The incremental ("delta") ADS protocol for one stream, as a pure state
//! machine beside [`super::sotw`]: requests and snapshot changes in,
//! responses out.
//!
//! References are to the xDS protocol doc, section "Incremental xDS"
//! (envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol#incremental-xds).
//!
//! - Each resource carries its own version (its content hash); a response
//!   holds only what changed, and `removed_resources` names what is gone.
//! - Subscriptions change by `resource_names_subscribe` /
//!   `resource_names_unsubscribe` on any request, whatever its nonce: a
//!   stale nonce never loses a subscription change.
//! - LDS/CDS wildcard: the legacy form (the first request for the type
//!   subscribes to nothing) or an explicit `*`; unsubscribing `*` leaves it.
//! - `initial_resource_versions` (reconnect): what the client already has at
//!   the same version is not resent; what it has and Ward no longer has is
//!   named in `removed_resources`.
//! - Names subscribed before they exist are sent when they appear.
//!
//! Memory: what a client has is remembered as the layers it was synced to
//! (a few `Arc`s), not as a name → version map per stream.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as XdsResource,
};

use super::cache::{Layer, ProxySnapshot, SLOTS, intern_names};
use super::sotw::{RequestKind, canonical};
use crate::translate::{Resource, type_url};

/// What the client has of one type.
#[derive(Clone, Debug)]
enum Have {
    /// Explicit versions: from `initial_resource_versions`, or nothing yet.
    Versions(BTreeMap<String, String>),
    /// Exactly what `layers` hold under that subscription.
    Synced {
        layers: [Arc<Layer>; SLOTS],
        wildcard: bool,
        names: Arc<BTreeSet<String>>,
    },
}

fn covers(wildcard: bool, names: &BTreeSet<String>, name: &str) -> bool {
    wildcard || names.contains(name)
}

impl Have {
    fn version_of(&self, name: &str) -> Option<&str> {
        match self {
            Have::Versions(m) => m.get(name).map(String::as_str),
            Have::Synced {
                layers,
                wildcard,
                names,
            } => {
                if !covers(*wildcard, names, name) {
                    return None;
                }
                layers
                    .iter()
                    .find_map(|l| l.get(name))
                    .map(|r| r.version.as_str())
            }
        }
    }

    /// Every name the client has.
    fn names(&self) -> Vec<&str> {
        match self {
            Have::Versions(m) => m.keys().map(String::as_str).collect(),
            Have::Synced {
                layers,
                wildcard: true,
                ..
            } => layers
                .iter()
                .flat_map(|l| l.resources().keys().map(String::as_str))
                .collect(),
            Have::Synced { layers, names, .. } => names
                .iter()
                .filter(|n| layers.iter().any(|l| l.get(n).is_some()))
                .map(String::as_str)
                .collect(),
        }
    }
}

/// Per type: the subscription and what the client has.
#[derive(Clone, Debug)]
struct TypeState {
    /// Wildcard subscription (LDS/CDS only).
    wildcard: bool,
    /// Explicitly subscribed names (interned).
    names: Arc<BTreeSet<String>>,
    have: Have,
    /// Names to send at the next evaluation whatever the client has: the
    /// endpoints of a changed cluster (make-before-break), and names the
    /// client unsubscribed while its wildcard still covers them.
    force: BTreeSet<String>,
    /// Nonce and system version of the last response; the nonce is
    /// recorded before the response leaves.
    sent_nonce: Option<String>,
    sent_version: Option<String>,
    acked_version: Option<String>,
}

impl Default for TypeState {
    fn default() -> Self {
        TypeState {
            wildcard: false,
            names: intern_names(BTreeSet::new()),
            have: Have::Versions(BTreeMap::new()),
            force: BTreeSet::new(),
            sent_nonce: None,
            sent_version: None,
            acked_version: None,
        }
    }
}

/// Target size of one delta response; larger updates go out in several.
pub const CHUNK_BYTES: usize = 32 * 1024;

/// One stream's delta protocol state.
#[derive(Debug, Default)]
pub struct DeltaStream {
    /// Monotonic counter: nonces are unique within the stream.
    nonce_seq: u64,
    types: BTreeMap<&'static str, TypeState>,
}

impl DeltaStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handle one request; returns what it meant and, if needed, a response
    /// for its type.
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snapshot: &ProxySnapshot,
    ) -> (RequestKind, Vec<DeltaDiscoveryResponse>) {
        let Some(ty) = canonical(&req.type_url) else {
            return (RequestKind::Unknown, Vec::new());
        };
        let first = !self.types.contains_key(ty);
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

        // Subscription changes count whatever the nonce says.
        let wildcard_type = type_url::is_wildcard_type(ty);
        let mut changed = first;
        if first {
            // Legacy wildcard: the first request subscribes to nothing.
            state.wildcard = wildcard_type
                && req.resource_names_subscribe.is_empty()
                && req.resource_names_unsubscribe.is_empty();
            // Reconnect: what the client already has.
            state.have = Have::Versions(
                req.initial_resource_versions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
        }
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            let mut names = (*state.names).clone();
            for n in &req.resource_names_subscribe {
                if n == "*" {
                    state.wildcard = wildcard_type;
                } else {
                    names.insert(n.clone());
                }
            }
            for n in &req.resource_names_unsubscribe {
                if n == "*" {
                    state.wildcard = false;
                } else if names.remove(n) && state.wildcard {
                    // The client forgets it; the wildcard still wants it.
                    state.force.insert(n.clone());
                }
            }
            if names != *state.names {
                state.names = intern_names(names);
            }
            changed = true;
        }
        if !changed {
            return (kind, Vec::new());
        }
        let resp = self.respond(ty, snapshot, first && wildcard_type);
        (kind, resp)
    }

    /// The snapshot changed: a response for every subscribed type with
    /// changes for this client, in make-before-break order.
    pub fn on_snapshot(&mut self, snapshot: &ProxySnapshot) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        for ty in type_url::ORDER {
            if self.types.contains_key(ty) {
                out.extend(self.respond(ty, snapshot, false));
            }
        }
        out
    }

    /// Version the client last ACKed, per type short name.
    pub fn acked_versions(&self) -> BTreeMap<&'static str, String> {
        self.types
            .iter()
            .filter_map(|(ty, s)| s.acked_version.clone().map(|v| (type_url::short(ty), v)))
            .collect()
    }

    /// What the client lacks of `ty`, as responses of at most about
    /// [`CHUNK_BYTES`] each (empty: nothing to say). `always`: answer even
    /// when empty (the first wildcard request: the client waits for it to
    /// finish initializing).
    fn respond(
        &mut self,
        ty: &'static str,
        snapshot: &ProxySnapshot,
        always: bool,
    ) -> Vec<DeltaDiscoveryResponse> {
        let layers = snapshot.layers_or_empty(ty);
        let Some(state) = self.types.get_mut(ty) else {
            return Vec::new();
        };
        let (mut send, removed) = diff(state, layers, snapshot, ty);
        if !state.force.is_empty() {
            let force = std::mem::take(&mut state.force);
            for name in force {
                if covers(state.wildcard, &state.names, &name)
                    && !send.iter().any(|r| r.name == name)
                    && let Some(r) = snapshot.get(ty, &name)
                {
                    send.push(r);
                }
            }
        }
        state.have = Have::Synced {
            layers: layers.clone(),
            wildcard: state.wildcard,
            names: state.names.clone(),
        };
        if send.is_empty() && removed.is_empty() && !always {
            return Vec::new();
        }
        // A changed or new cluster re-warms and needs its endpoints again.
        if ty == type_url::CLUSTER
            && let Some(eds) = self.types.get_mut(type_url::ENDPOINT)
        {
            for r in &send {
                if eds.names.contains(&r.name) {
                    eds.force.insert(r.name.clone());
                }
            }
        }
        let version = format!("{:016x}", snapshot.version(ty));
        // Chunks: tonic keeps each stream's encode buffer at the size of the
        // largest message it sent, so one 1 MB initial LDS response would
        // cost every stream 1 MB for its whole life.
        let mut chunks: Vec<Vec<&Arc<Resource>>> = vec![Vec::new()];
        let mut size = 0;
        for r in send {
            let len = r.any.value.len() + r.name.len() + 64;
            if size + len > CHUNK_BYTES && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += len;
            if let Some(c) = chunks.last_mut() {
                c.push(r);
            }
        }
        let mut removed = Some(removed);
        let mut out = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            self.nonce_seq += 1;
            out.push(DeltaDiscoveryResponse {
                system_version_info: version.clone(),
                resources: chunk
                    .iter()
                    .map(|r| XdsResource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.any.clone()),
                        ..Default::default()
                    })
                    .collect(),
                type_url: ty.to_string(),
                removed_resources: removed.take().unwrap_or_default(),
                nonce: self.nonce_seq.to_string(),
                ..Default::default()
            });
        }
        // Only the last chunk's ACK counts as the ACK of this version.
        if let Some(state) = self.types.get_mut(ty) {
            state.sent_nonce = out.last().map(|r| r.nonce.clone());
            state.sent_version = Some(version);
        }
        out
    }
}

/// Resources to send and names to remove so that a client with
/// `state.have` ends up with `layers` under the current subscription.
fn diff<'a>(
    state: &TypeState,
    layers: &'a [Arc<Layer>; SLOTS],
    snapshot: &'a ProxySnapshot,
    ty: &str,
) -> (Vec<&'a Arc<Resource>>, Vec<String>) {
    let (wildcard, names) = (state.wildcard, &*state.names);
    let gone = |n: &str| layers.iter().all(|l| l.get(n).is_none());
    // Fast path: same subscription, layers replaced: O(changes).
    if let Have::Synced {
        layers: old,
        wildcard: old_wildcard,
        names: old_names,
    } = &state.have
        && *old_wildcard == wildcard
        && Arc::ptr_eq(old_names, &state.names)
    {
        let mut send = Vec::new();
        let mut removed = Vec::new();
        for (new, old) in layers.iter().zip(old) {
            let (up, rm) = new.changes_since(old);
            send.extend(up.into_iter().filter(|r| covers(wildcard, names, &r.name)));
            removed.extend(
                rm.into_iter()
                    .filter(|n| covers(wildcard, names, n) && gone(n)),
            );
        }
        // A resource that moved between layers unchanged is not news.
        send.retain(|r| state.have.version_of(&r.name) != Some(r.version.as_str()));
        return (send, removed);
    }
    // General case (first response, reconnect, subscription change).
    let current: Vec<&Arc<Resource>> = if wildcard {
        snapshot.all(ty)
    } else {
        names.iter().filter_map(|n| snapshot.get(ty, n)).collect()
    };
    let send = current
        .into_iter()
        .filter(|r| state.have.version_of(&r.name) != Some(r.version.as_str()))
        .collect();
    let removed = state
        .have
        .names()
        .into_iter()
        .filter(|n| covers(wildcard, names, n) && gone(n))
        .map(str::to_string)
        .collect();
    (send, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::ProxyResources;
    use prost::Message;

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

    fn cla(name: &str, n: usize) -> Arc<Resource> {
        Arc::new(Resource::new(
            name,
            ClusterLoadAssignment {
                cluster_name: name.into(),
                endpoints: vec![Default::default(); n],
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

    fn flat(resources: Vec<Arc<Resource>>) -> ProxyResources {
        let mut out = ProxyResources::default();
        for r in resources {
            let ty = canonical(&r.any.type_url).expect("served type");
            out.by_type.entry(ty).or_default().insert(r.name.clone(), r);
        }
        out
    }

    /// A snapshot whose layers replace `prev`'s (as the cache builds them),
    /// so the fast path is exercised.
    fn next(prev: &ProxySnapshot, resources: Vec<Arc<Resource>>) -> ProxySnapshot {
        let flat = flat(resources);
        let mut out = ProxySnapshot::from_resources(&flat);
        for ty in type_url::ORDER {
            if let (Some(old), Some(map)) = (prev.layers(ty), flat.by_type.get(ty)) {
                out = out.with_layer(ty, Arc::new(Layer::replacing(map.clone(), &old[0])));
            }
        }
        out
    }

    fn snap(resources: Vec<Arc<Resource>>) -> ProxySnapshot {
        ProxySnapshot::from_resources(&flat(resources))
    }

    fn req(ty: &str, sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ty.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn one(mut v: Vec<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
        assert_eq!(v.len(), 1, "one response");
        v.remove(0)
    }

    fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
        let mut v: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn legacy_wildcard_sends_everything_with_per_resource_versions() {
        let mut d = DeltaStream::new();
        let s = snap(vec![cluster("a", 1), cluster("b", 1)]);
        let (kind, r) = d.on_request(&req(type_url::CLUSTER, &[], &[], ""), &s);
        assert_eq!(kind, RequestKind::Initial);
        let r = one(r);
        assert_eq!(names(&r), ["a", "b"]);
        assert!(
            r.resources.iter().all(|x| !x.version.is_empty()
                && x.resource.as_ref().unwrap().type_url == type_url::CLUSTER)
        );
        assert!(!r.nonce.is_empty() && !r.system_version_info.is_empty());
    }

    #[test]
    fn an_empty_wildcard_still_gets_an_answer() {
        let mut d = DeltaStream::new();
        let (_, r) = d.on_request(&req(type_url::LISTENER, &[], &[], ""), &snap(vec![]));
        assert!(one(r).resources.is_empty());
    }

    #[test]
    fn only_changed_resources_are_sent_and_removals_are_named() {
        let mut d = DeltaStream::new();
        let s1 = snap(vec![cluster("a", 1), cluster("b", 1), cluster("c", 1)]);
        let (_, r) = d.on_request(&req(type_url::CLUSTER, &[], &[], ""), &s1);
        let r = one(r);
        let (kind, none) = d.on_request(&req(type_url::CLUSTER, &[], &[], &r.nonce), &s1);
        assert!(matches!(kind, RequestKind::Ack { .. }));
        assert!(none.is_empty());
        let s2 = next(&s1, vec![cluster("a", 1), cluster("b", 2), cluster("d", 1)]);
        let pushed = d.on_snapshot(&s2);
        assert_eq!(pushed.len(), 1);
        assert_eq!(names(&pushed[0]), ["b", "d"]);
        assert_eq!(pushed[0].removed_resources, ["c"]);
        // Nothing new: nothing sent.
        assert!(d.on_snapshot(&s2).is_empty());
        // Same result through the general path (unrelated layers).
        let mut d2 = DeltaStream::new();
        d2.on_request(&req(type_url::CLUSTER, &[], &[], ""), &s1);
        let pushed = d2.on_snapshot(&snap(vec![
            cluster("a", 1),
            cluster("b", 2),
            cluster("d", 1),
        ]));
        assert_eq!(names(&pushed[0]), ["b", "d"]);
        assert_eq!(pushed[0].removed_resources, ["c"]);
    }

    #[test]
    fn named_subscriptions_subscribe_unsubscribe_and_wait_for_missing_names() {
        let mut d = DeltaStream::new();
        let s1 = snap(vec![cla("a", 1), cla("b", 1)]);
        let (_, r) = d.on_request(&req(type_url::ENDPOINT, &["a", "later"], &[], ""), &s1);
        assert_eq!(names(&one(r)), ["a"]);
        let (_, r) = d.on_request(&req(type_url::ENDPOINT, &["b"], &["a"], ""), &s1);
        assert_eq!(names(&one(r)), ["b"]);
        // "later" appears: sent. "a" changes: not subscribed any more.
        let s2 = next(&s1, vec![cla("a", 2), cla("b", 1), cla("later", 1)]);
        let pushed = d.on_snapshot(&s2);
        assert_eq!(names(&pushed[0]), ["later"]);
    }

    #[test]
    fn a_stale_nonce_never_loses_a_subscription_change() {
        let mut d = DeltaStream::new();
        let s1 = snap(vec![cla("a", 1), cla("b", 1)]);
        let (_, r1) = d.on_request(&req(type_url::ENDPOINT, &["a"], &[], ""), &s1);
        let r1 = one(r1);
        let s2 = next(&s1, vec![cla("a", 2), cla("b", 1)]);
        assert_eq!(d.on_snapshot(&s2).len(), 1);
        // ACK of the first response (now stale) that also subscribes to b.
        let (kind, r) = d.on_request(&req(type_url::ENDPOINT, &["b"], &[], &r1.nonce), &s2);
        assert_eq!(kind, RequestKind::Stale);
        assert_eq!(names(&one(r)), ["b"]);
    }

    #[test]
    fn reconnect_skips_what_the_client_has_and_removes_what_is_gone() {
        let s = snap(vec![cluster("a", 1), cluster("b", 1)]);
        let a_version = s.get(type_url::CLUSTER, "a").unwrap().version.clone();
        let mut d = DeltaStream::new();
        let mut r = req(type_url::CLUSTER, &[], &[], "");
        r.initial_resource_versions = [
            ("a".to_string(), a_version),
            ("b".to_string(), "old".to_string()),
            ("gone".to_string(), "x".to_string()),
        ]
        .into();
        let (_, resp) = d.on_request(&r, &s);
        let resp = one(resp);
        assert_eq!(names(&resp), ["b"]);
        assert_eq!(resp.removed_resources, ["gone"]);
    }

    #[test]
    fn explicit_wildcard_and_leaving_it() {
        let mut d = DeltaStream::new();
        let s = snap(vec![cluster("a", 1), cluster("b", 1)]);
        // Not a legacy wildcard: names given.
        let (_, r) = d.on_request(&req(type_url::CLUSTER, &["a"], &[], ""), &s);
        assert_eq!(names(&one(r)), ["a"]);
        let (_, r) = d.on_request(&req(type_url::CLUSTER, &["*"], &[], ""), &s);
        assert_eq!(names(&one(r)), ["b"]);
        // Unsubscribing a name the wildcard covers: its state is sent again.
        let (_, r) = d.on_request(&req(type_url::CLUSTER, &[], &["a"], ""), &s);
        assert_eq!(names(&one(r)), ["a"]);
        // Leaving the wildcard keeps nothing subscribed.
        let (_, r) = d.on_request(&req(type_url::CLUSTER, &[], &["*"], ""), &s);
        assert!(r.is_empty());
        let s2 = next(&s, vec![cluster("a", 2), cluster("b", 2)]);
        assert!(d.on_snapshot(&s2).is_empty());
    }

    #[test]
    fn nack_is_recorded_and_nothing_is_resent_until_a_change() {
        let mut d = DeltaStream::new();
        let s1 = snap(vec![cluster("a", 1)]);
        let (_, r) = d.on_request(&req(type_url::CLUSTER, &[], &[], ""), &s1);
        let r = one(r);
        let mut nack = req(type_url::CLUSTER, &[], &[], &r.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad".into(),
            details: vec![],
        });
        let (kind, resp) = d.on_request(&nack, &s1);
        assert!(matches!(kind, RequestKind::Nack { message, .. } if message == "bad"));
        assert!(resp.is_empty());
        assert!(d.on_snapshot(&s1).is_empty());
        let s2 = next(&s1, vec![cluster("a", 2)]);
        assert_eq!(d.on_snapshot(&s2).len(), 1);
    }

    #[test]
    fn large_updates_are_split_into_chunks_each_acked_separately() {
        let big: Vec<Arc<Resource>> = (0..400).map(|i| cla(&format!("c{i:03}"), 200)).collect();
        let names_: Vec<String> = big.iter().map(|r| r.name.clone()).collect();
        let s = snap(big);
        let mut d = DeltaStream::new();
        let mut r = req(type_url::ENDPOINT, &[], &[], "");
        r.resource_names_subscribe = names_.clone();
        let (_, out) = d.on_request(&r, &s);
        assert!(out.len() > 1, "split");
        let mut seen = BTreeSet::new();
        for resp in &out {
            assert!(resp.encoded_len() < 2 * CHUNK_BYTES);
            seen.extend(resp.resources.iter().map(|x| x.name.clone()));
        }
        assert_eq!(seen.len(), 400);
        // Only the last nonce is an ACK of the version; earlier ones are stale.
        let (kind, _) = d.on_request(&req(type_url::ENDPOINT, &[], &[], &out[0].nonce), &s);
        assert_eq!(kind, RequestKind::Stale);
        let last = out.last().unwrap();
        let (kind, _) = d.on_request(&req(type_url::ENDPOINT, &[], &[], &last.nonce), &s);
        assert!(matches!(kind, RequestKind::Ack { .. }));
    }

    #[test]
    fn a_changed_cluster_resends_its_endpoints_after_it_in_order() {
        let mut d = DeltaStream::new();
        let s1 = snap(vec![secret("default"), cluster("a", 1), cla("a", 1)]);
        d.on_request(&req(type_url::CLUSTER, &[], &[], ""), &s1);
        d.on_request(&req(type_url::ENDPOINT, &["a"], &[], ""), &s1);
        d.on_request(&req(type_url::SECRET, &["default"], &[], ""), &s1);
        let s2 = next(&s1, vec![secret("default"), cluster("a", 2), cla("a", 1)]);
        let pushed = d.on_snapshot(&s2);
        let order: Vec<&str> = pushed
            .iter()
            .map(|r| type_url::short(&r.type_url))
            .collect();
        assert_eq!(order, ["cds", "eds"]);
        assert_eq!(names(&pushed[1]), ["a"]);
        let nonces: BTreeSet<&str> = pushed.iter().map(|r| r.nonce.as_str()).collect();
        assert_eq!(nonces.len(), 2);
    }
}
