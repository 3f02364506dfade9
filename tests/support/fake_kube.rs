//! A fake Kubernetes API server for tests: real list/watch JSON on
//! 127.0.0.1:0, enough for kube-rs clients (`kube::Api`, kube-runtime
//! watchers and reflectors).
//!
//! What it speaks, as the real API server does:
//! - `GET` collection (`list`), with `labelSelector`, answering
//!   `{kind: XList, metadata: {resourceVersion}, items}`;
//! - `GET ?watch=true&resourceVersion=N` (`watch`): a chunked stream of
//!   newline-separated `WatchEvent`s (`ADDED`, `MODIFIED`, `DELETED`,
//!   `BOOKMARK`, `ERROR`); a resourceVersion older than the compaction point
//!   gets an `ERROR` event with a `410 Expired` Status, as etcd compaction
//!   does;
//! - `GET` one object, `POST` (create; `409 AlreadyExists`), `PUT`
//!   (replace; `409 Conflict` on a stale `metadata.resourceVersion`),
//!   `DELETE`.
//!
//! Tests drive the cluster side directly ([`FakeKube::apply`],
//! [`FakeKube::delete`]) and disturb watches ([`FakeKube::bookmark`],
//! [`FakeKube::close_watches`], [`FakeKube::compact`]). Every request is
//! recorded as a `(verb, resource)` pair so tests can compare what the code
//! calls with the RBAC rules.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// `(api prefix, plural, kind)`: what the fake serves.
const RESOURCES: &[(&str, &str, &str)] = &[
    ("api/v1", "namespaces", "Namespace"),
    ("api/v1", "pods", "Pod"),
    ("api/v1", "services", "Service"),
    ("api/v1", "configmaps", "ConfigMap"),
    ("api/v1", "secrets", "Secret"),
    ("api/v1", "events", "Event"),
    (
        "apis/discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
    ),
    ("apis/coordination.k8s.io/v1", "leases", "Lease"),
];

fn api_version(prefix: &str) -> String {
    prefix
        .strip_prefix("apis/")
        .or_else(|| prefix.strip_prefix("api/"))
        .unwrap_or(prefix)
        .to_string()
}

fn lookup_kind(kind: &str) -> (&'static str, &'static str) {
    let (p, plural, _) = RESOURCES
        .iter()
        .find(|(_, _, k)| *k == kind)
        .unwrap_or_else(|| panic!("fake kube does not serve kind {kind}"));
    (p, plural)
}

fn lookup_plural(prefix: &str, plural: &str) -> Option<&'static str> {
    RESOURCES
        .iter()
        .find(|(p, pl, _)| *p == prefix && *pl == plural)
        .map(|(_, _, k)| *k)
}

/// `(prefix, plural, namespace or "", name)`.
type Key = (String, String, String, String);

#[derive(Clone, Debug)]
struct LogEntry {
    rv: u64,
    prefix: String,
    plural: String,
    namespace: String,
    kind: &'static str,
    object: Value,
    /// The object before this change, so a label-selected watch can turn
    /// "no longer matches" into DELETED and "now matches" into ADDED, as the
    /// API server does.
    previous: Option<Value>,
}

#[derive(Clone, Debug)]
enum Signal {
    Event(LogEntry),
    Bookmark(u64),
    Close,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<LogEntry>,
    /// Watches starting at or below this resourceVersion get 410 Gone.
    compacted: u64,
    calls: Vec<(String, String)>,
    watches_started: u64,
    uid: u64,
    /// TokenReview: token → (audiences, username, bound pod name).
    tokens: BTreeMap<String, (Vec<String>, String, Option<String>)>,
}

/// The fake API server. Dropping it stops it.
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let state = Arc::new(Mutex::new(State::default()));
        let (signals, _) = broadcast::channel(4096);
        let shared = Shared {
            state: state.clone(),
            signals: signals.clone(),
        };
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let shared = shared.clone();
            async move { handle(shared, method, uri, body).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKube {
            addr,
            state,
            signals,
            task,
        }
    }

    /// Make `token` valid for TokenReviews: issued for `audiences`, to
    /// `username` (`system:serviceaccount:NS:SA`), bound to pod `pod`.
    pub fn add_token(&self, token: &str, audiences: &[&str], username: &str, pod: Option<&str>) {
        self.state.lock().unwrap().tokens.insert(
            token.to_string(),
            (
                audiences.iter().map(|a| a.to_string()).collect(),
                username.to_string(),
                pod.map(String::from),
            ),
        );
    }

    /// A kube client pointed at this server (plain HTTP, no auth).
    pub fn client(&self) -> kube::Client {
        let url: Uri = format!("http://{}", self.addr).parse().unwrap();
        let config = kube::Config::new(url);
        kube::Client::try_from(config).unwrap()
    }

    /// Create or replace an object as the cluster would (a controller or
    /// `kubectl apply`): takes `apiVersion`/`kind`/`metadata` from `obj`.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = obj["kind"].as_str().expect("object has a kind").to_string();
        let (prefix, plural) = lookup_kind(&kind);
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let mut st = self.state.lock().unwrap();
        let key = (prefix.to_string(), plural.to_string(), ns, name);
        let exists = st.objects.contains_key(&key);
        if !exists {
            st.uid += 1;
            obj["metadata"]["uid"] = json!(format!("uid-{}", st.uid));
        } else {
            obj["metadata"]["uid"] = st.objects[&key]["metadata"]["uid"].clone();
        }
        store(&mut st, &self.signals, key, obj, !exists)
    }

    /// Delete an object as the cluster would; `false` if it did not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let (prefix, plural) = lookup_kind(kind);
        let key = (
            prefix.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let mut st = self.state.lock().unwrap();
        remove(&mut st, &self.signals, &key)
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (prefix, plural) = lookup_kind(kind);
        let key = (
            prefix.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Every object of a kind (in every namespace), sorted by namespace/name.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let (prefix, plural) = lookup_kind(kind);
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == prefix && k.1 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Send a BOOKMARK with the current resourceVersion to every watch that
    /// asked for bookmarks.
    pub fn bookmark(&self) {
        let rv = self.state.lock().unwrap().rv;
        let _ = self.signals.send(Signal::Bookmark(rv));
    }

    /// End every open watch stream (clients re-watch from their last
    /// resourceVersion).
    pub fn close_watches(&self) {
        let _ = self.signals.send(Signal::Close);
    }

    /// Forget history up to now: a watch resuming from an older
    /// resourceVersion gets `410 Gone` and must relist.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        // Compaction happens at a revision of its own, past every
        // resourceVersion a client has seen.
        st.rv += 1;
        st.compacted = st.rv;
        st.log.clear();
    }

    /// Number of watch requests received so far.
    pub fn watches_started(&self) -> u64 {
        self.state.lock().unwrap().watches_started
    }

    /// Every `(verb, resource)` requested so far, deduplicated.
    pub fn calls(&self) -> BTreeSet<(String, String)> {
        self.state.lock().unwrap().calls.iter().cloned().collect()
    }

    /// How many requests of `(verb, resource)` were made.
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(v, r)| v == verb && r == resource)
            .count()
    }
}

fn store(
    st: &mut State,
    signals: &broadcast::Sender<Signal>,
    key: Key,
    mut obj: Value,
    added: bool,
) -> u64 {
    st.rv += 1;
    let rv = st.rv;
    let kind = lookup_plural(&key.0, &key.1).expect("served resource");
    obj["apiVersion"] = json!(api_version(&key.0));
    obj["kind"] = json!(kind);
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if !key.2.is_empty() {
        obj["metadata"]["namespace"] = json!(key.2);
    }
    if obj["metadata"]["creationTimestamp"].is_null() {
        obj["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    }
    let previous = st.objects.insert(key.clone(), obj.clone());
    let entry = LogEntry {
        rv,
        prefix: key.0,
        plural: key.1,
        namespace: key.2,
        kind: if added { "ADDED" } else { "MODIFIED" },
        object: obj,
        previous,
    };
    st.log.push(entry.clone());
    let _ = signals.send(Signal::Event(entry));
    rv
}

fn remove(st: &mut State, signals: &broadcast::Sender<Signal>, key: &Key) -> bool {
    let Some(mut obj) = st.objects.remove(key) else {
        return false;
    };
    st.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let entry = LogEntry {
        rv: st.rv,
        prefix: key.0.clone(),
        plural: key.1.clone(),
        namespace: key.2.clone(),
        kind: "DELETED",
        object: obj,
        previous: None,
    };
    st.log.push(entry.clone());
    let _ = signals.send(Signal::Event(entry));
    true
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason, "code": code,
    })
}

fn error(code: u16, reason: &str, message: impl Into<String>) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(status(code, reason, message)),
    )
        .into_response()
}

/// A parsed request path.
struct Target {
    prefix: String,
    plural: String,
    /// `None`: every namespace (or a cluster-scoped resource).
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return None,
    };
    let t = |plural: &str, namespace: Option<&str>, name: Option<&str>| Target {
        prefix: prefix.clone(),
        plural: plural.to_string(),
        namespace: namespace.map(String::from),
        name: name.map(String::from),
    };
    Some(match rest {
        ["namespaces"] => t("namespaces", None, None),
        ["namespaces", name] => t("namespaces", None, Some(name)),
        ["namespaces", ns, plural] => t(plural, Some(ns), None),
        ["namespaces", ns, plural, name] => t(plural, Some(ns), Some(name)),
        [plural] => t(plural, None, None),
        _ => return None,
    })
}

fn query_map(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<BTreeMap<String, String>>()
        })
        .unwrap_or_default()
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("3f");
            out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
            i += 3;
        } else if bytes[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Does an object's labels match a selector (`a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-joined)?
fn matches_selector(obj: &Value, selector: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels[k.trim()].as_str() == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels[k.trim()].is_null()
            } else {
                !labels[term].is_null()
            }
        })
}

fn in_scope(t: &Target, prefix: &str, plural: &str, namespace: &str) -> bool {
    t.prefix == prefix
        && t.plural == plural
        && t.namespace.as_deref().is_none_or(|ns| ns == namespace)
}

async fn handle(shared: Shared, method: Method, uri: Uri, body: Bytes) -> Response {
    let Some(t) = parse_path(uri.path()) else {
        return error(404, "NotFound", format!("no route {}", uri.path()));
    };
    if t.prefix == "apis/authentication.k8s.io/v1" && t.plural == "tokenreviews" {
        return token_review(&shared, &method, &body);
    }
    let Some(kind) = lookup_plural(&t.prefix, &t.plural) else {
        return error(404, "NotFound", format!("resource {} not served", t.plural));
    };
    let q = query_map(&uri);
    let watching = q.get("watch").is_some_and(|v| v == "true" || v == "1");
    let verb = match (&method, t.name.is_some(), watching) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, true, false) => "get",
        (&Method::GET, false, false) => "list",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, _, _) => "delete",
        _ => "unknown",
    };
    let group = t
        .prefix
        .strip_prefix("apis/")
        .and_then(|gv| gv.split('/').next())
        .map(|g| format!("{}.{g}", t.plural))
        .unwrap_or_else(|| t.plural.clone());
    shared
        .state
        .lock()
        .unwrap()
        .calls
        .push((verb.to_string(), group));

    match verb {
        "list" => {
            let st = shared.state.lock().unwrap();
            let selector = q.get("labelSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, v)| in_scope(&t, &k.0, &k.1, &k.2) && matches_selector(v, &selector))
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({
                "kind": format!("{kind}List"),
                "apiVersion": api_version(&t.prefix),
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            }))
            .into_response()
        }
        "watch" => watch(shared, t, kind, q),
        "get" => {
            let key = key_of(&t);
            match shared.state.lock().unwrap().objects.get(&key) {
                Some(v) => axum::Json(v.clone()).into_response(),
                None => error(404, "NotFound", not_found(&t)),
            }
        }
        "create" => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "BadRequest", "body is not JSON");
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(String::from) else {
                return error(422, "Invalid", "metadata.name: Required value");
            };
            let t = Target {
                name: Some(name),
                ..t
            };
            let key = key_of(&t);
            let mut st = shared.state.lock().unwrap();
            if st.objects.contains_key(&key) {
                return error(
                    409,
                    "AlreadyExists",
                    format!(
                        "{} \"{}\" already exists",
                        t.plural,
                        t.name.as_deref().unwrap_or("")
                    ),
                );
            }
            st.uid += 1;
            obj["metadata"]["uid"] = json!(format!("uid-{}", st.uid));
            store(&mut st, &shared.signals, key.clone(), obj, true);
            (StatusCode::CREATED, axum::Json(st.objects[&key].clone())).into_response()
        }
        "update" => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "BadRequest", "body is not JSON");
            };
            let key = key_of(&t);
            let mut st = shared.state.lock().unwrap();
            let Some(current) = st.objects.get(&key) else {
                return error(404, "NotFound", not_found(&t));
            };
            let current_rv = current["metadata"]["resourceVersion"].clone();
            let sent_rv = &obj["metadata"]["resourceVersion"];
            if !sent_rv.is_null() && *sent_rv != current_rv {
                return error(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{}\": the object has been modified; \
                         please apply your changes to the latest version and try again",
                        t.plural,
                        t.name.as_deref().unwrap_or("")
                    ),
                );
            }
            obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
            store(&mut st, &shared.signals, key.clone(), obj, false);
            axum::Json(st.objects[&key].clone()).into_response()
        }
        "delete" => {
            let key = key_of(&t);
            let mut st = shared.state.lock().unwrap();
            let obj = st.objects.get(&key).cloned();
            if remove(&mut st, &shared.signals, &key) {
                axum::Json(obj.unwrap_or_default()).into_response()
            } else {
                error(404, "NotFound", not_found(&t))
            }
        }
        _ => error(405, "MethodNotAllowed", format!("{method} not supported")),
    }
}

fn key_of(t: &Target) -> Key {
    (
        t.prefix.clone(),
        t.plural.clone(),
        t.namespace.clone().unwrap_or_default(),
        t.name.clone().unwrap_or_default(),
    )
}

fn not_found(t: &Target) -> String {
    format!(
        "{} \"{}\" not found",
        t.plural,
        t.name.as_deref().unwrap_or("")
    )
}

fn line(v: &Value) -> Result<Bytes, Infallible> {
    let mut s = serde_json::to_vec(v).unwrap();
    s.push(b'\n');
    Ok(Bytes::from(s))
}

fn watch(shared: Shared, t: Target, kind: &'static str, q: BTreeMap<String, String>) -> Response {
    let since: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1024);
    // Subscribe before reading the backlog so nothing falls in between.
    let mut signals = shared.signals.subscribe();
    let (backlog, expired) = {
        let mut st = shared.state.lock().unwrap();
        st.watches_started += 1;
        if since != 0 && since < st.compacted {
            (Vec::new(), Some(st.compacted))
        } else {
            let backlog: Vec<LogEntry> = st.log.iter().filter(|e| e.rv > since).cloned().collect();
            (backlog, None)
        }
    };
    let api_version = api_version(&t.prefix);
    tokio::spawn(async move {
        if let Some(compacted) = expired {
            let event = json!({"type": "ERROR", "object": status(
                410, "Expired",
                format!("too old resource version: {since} ({compacted})"),
            )});
            let _ = tx.send(line(&event)).await;
            return;
        }
        let mut last = since;
        // The event this watch sees for a log entry, if any.
        let view = |e: &LogEntry| -> Option<Value> {
            if !in_scope(&t, &e.prefix, &e.plural, &e.namespace) {
                return None;
            }
            let now = matches_selector(&e.object, &selector);
            let before = e
                .previous
                .as_ref()
                .is_some_and(|p| matches_selector(p, &selector));
            let kind = match (e.kind, before, now) {
                ("MODIFIED", true, false) => "DELETED",
                ("MODIFIED", false, true) => "ADDED",
                (_, _, false) => return None,
                (k, _, true) => k,
            };
            Some(json!({"type": kind, "object": e.object}))
        };
        for e in backlog {
            last = last.max(e.rv);
            if let Some(ev) = view(&e)
                && tx.send(line(&ev)).await.is_err()
            {
                return;
            }
        }
        loop {
            match signals.recv().await {
                Ok(Signal::Event(e)) => {
                    if e.rv <= last {
                        continue;
                    }
                    last = e.rv;
                    if let Some(ev) = view(&e)
                        && tx.send(line(&ev)).await.is_err()
                    {
                        return;
                    }
                }
                Ok(Signal::Bookmark(rv)) => {
                    if !bookmarks {
                        continue;
                    }
                    let event = json!({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string()},
                    }});
                    if tx.send(line(&event)).await.is_err() {
                        return;
                    }
                }
                Ok(Signal::Close) | Err(broadcast::error::RecvError::Closed) => return,
                Err(broadcast::error::RecvError::Lagged(_)) => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap()
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`, answered like the
/// real API server: unknown tokens and tokens for none of the asked
/// audiences are `authenticated: false` with an error; otherwise the user,
/// the matching audiences and, for a bound token, the pod name in `extra`.
fn token_review(shared: &Shared, method: &Method, body: &Bytes) -> Response {
    if method != Method::POST {
        return error(405, "MethodNotAllowed", "tokenreviews only support create");
    }
    let mut st = shared.state.lock().unwrap();
    st.calls.push((
        "create".to_string(),
        "tokenreviews.authentication.k8s.io".to_string(),
    ));
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(400, "BadRequest", "TokenReview body is not JSON");
    };
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let status = match st.tokens.get(token) {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some((auds, user, pod)) => {
            let matching: Vec<&String> = auds.iter().filter(|a| asked.contains(a)).collect();
            if matching.is_empty() {
                json!({
                    "authenticated": false,
                    "error": format!("[invalid bearer token, token audiences {auds:?} is invalid for the target audiences {asked:?}]"),
                })
            } else {
                let mut extra = serde_json::Map::new();
                if let Some(p) = pod {
                    extra.insert("authentication.kubernetes.io/pod-name".into(), json!([p]));
                }
                json!({
                    "authenticated": true,
                    "audiences": matching,
                    "user": {"username": user, "uid": "uid-sa", "extra": extra},
                })
            }
        }
    };
    let resp = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {"creationTimestamp": null},
        "spec": req["spec"],
        "status": status,
    });
    (StatusCode::CREATED, axum::Json(resp)).into_response()
}
