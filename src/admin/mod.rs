//! Admin HTTP: `/healthz`, `/readyz`, `/metrics` and `/debug/*` JSON.
//!
//! Nothing here ever renders private keys: certificate status carries
//! serials, identities and dates only.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ca::{CertManager, RootRotation};
use crate::discovery::DiscoveryStatus;
use crate::metrics::Metrics;
use crate::xds::{MeshSnapshot, ProxyRegistry};

/// What the admin endpoints read. All of it is owned elsewhere.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
    pub certs: CertManager,
    pub rotation: RootRotation,
    pub discovery: watch::Receiver<Arc<DiscoveryStatus>>,
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    /// mTLS policy: policies in force, errors, per-port explanation, rollout.
    pub policy: watch::Receiver<Arc<crate::policy::PolicyStatus>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/proxies", get(proxies))
        .route("/debug/certs", get(certs))
        .route("/debug/config", get(config))
        .route("/debug/mesh", get(mesh))
        .route("/ca/rotate", axum::routing::post(rotate_root))
        .route("/certs/rotate", axum::routing::post(rotate_workload_certs))
        .route("/debug/policy", get(policy))
        .with_state(state)
}

/// Serve until `shutdown`.
pub async fn serve(
    state: AdminState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Ready once discovery has synced; the CA is loaded before the admin
/// server even starts.
async fn readyz(State(s): State<AdminState>) -> Response {
    let status = s.discovery.borrow().clone();
    if status.synced {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "discovery has not synced yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    match s.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn proxies(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(json!({ "proxies": s.registry.list() }))
}

/// Per proxy: the certificate Ward holds for it and the one its Envoy
/// ACKed, so a proxy silently serving an old certificate stands out.
async fn certs(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let proxies = s.registry.list();
    let now = crate::xds::status::unix_now();
    let certificates: Vec<serde_json::Value> = s
        .certs
        .status()
        .into_iter()
        .map(|c| {
            let envoy: Vec<_> = proxies
                .iter()
                .filter(|p| p.pod == c.proxy.to_string())
                .map(|p| {
                    json!({
                        "stream": p.stream,
                        "acked_serial": p.cert.as_ref().map(|a| a.serial.clone()),
                        "acked_current": p.cert.as_ref().is_some_and(|a| a.serial == c.serial),
                        "past_80_percent": p.cert.as_ref().is_some_and(|a| a.past(0.8, now)),
                    })
                })
                .collect();
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            v["envoy"] = json!(envoy);
            v
        })
        .collect();
    let roots: Vec<_> = crate::ca::pem_to_der_certs(&s.certs.trust_bundle_pem())
        .unwrap_or_default()
        .iter()
        .filter_map(|d| crate::ca::cert_info(d).ok())
        .collect();
    Json(json!({
        "trust_bundle": roots,
        "certificates": certificates,
        "reused_from_store": s.certs.reused_total(),
        "root_rotation": s.rotation.status(),
        "issued": s.certs.issued_total(),
    }))
}

/// Start a zero-downtime root rotation (`ward ca rotate`).
async fn rotate_root(State(s): State<AdminState>) -> Response {
    match s.rotation.request() {
        Ok(()) => (
            StatusCode::ACCEPTED,
            "root rotation started; follow it in /debug/certs\n",
        )
            .into_response(),
        Err(e) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
    }
}

/// Re-issue every connected proxy's workload certificate now (same root):
/// after a suspected key compromise, or to test rotation at scale. Only
/// SDS secrets are pushed.
async fn rotate_workload_certs(State(s): State<AdminState>) -> Response {
    let scheduled = s.certs.rotate_all_now();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "scheduled": scheduled, "issued_before": s.certs.issued_total() })),
    )
        .into_response()
}

async fn config(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let status = s.discovery.borrow().clone();
    let policy = s.policy.borrow().clone();
    Json(json!({ "discovery": *status, "policy_errors": policy.errors }))
}

/// `/debug/policy`: the policy status as JSON. `?connections=1` also asks
/// each server sidecar's Envoy admin (`<pod IP>:15000`, or `?envoy_admin_port=`)
/// for its mTLS / plaintext connection counts.
async fn policy(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Json<serde_json::Value> {
    let mut status = (**s.policy.borrow()).clone();
    if q.get("connections")
        .is_some_and(|v| v == "1" || v == "true")
    {
        let port = q
            .get("envoy_admin_port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(crate::policy::explain::DEFAULT_ENVOY_ADMIN_PORT);
        for svc in status.services.values_mut() {
            crate::policy::explain::gather_counts(svc, port).await;
        }
    }
    Json(serde_json::to_value(&status).unwrap_or_default())
}

async fn mesh(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let snap = s.snapshots.borrow().clone();
    Json(json!({ "generation": snap.generation, "mesh": *snap.mesh }))
}
