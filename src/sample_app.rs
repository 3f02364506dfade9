//! A tiny HTTP application for the demo and the end-to-end tests: it knows
//! nothing about TLS or the mesh. `GET /` answers with its name and the
//! caller identity its sidecar forwarded (`x-forwarded-client-cert`);
//! `GET /call` (client role) calls its `--upstream` URL in plain HTTP —
//! through its own sidecar — and returns what came back.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AppState {
    name: String,
    upstream: Option<String>,
    http: reqwest::Client,
}

/// Serve on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    name: String,
    upstream: Option<String>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        name,
        upstream,
        http: reqwest::Client::new(),
    };
    let app = Router::new()
        .route("/", get(hello))
        .route("/call", get(call))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn hello(State(s): State<AppState>, headers: HeaderMap) -> String {
    let caller = headers
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|kv| kv.strip_prefix("URI=")))
        .unwrap_or("unknown (plaintext)");
    format!("hello from {}; caller {}\n", s.name, caller)
}

async fn call(State(s): State<AppState>) -> (StatusCode, String) {
    let Some(url) = s.upstream else {
        return (StatusCode::NOT_FOUND, "no --upstream configured\n".into());
    };
    match s.http.get(&url).send().await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            (code, format!("{} called {url}: {body}", s.name))
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("{} calling {url}: {e}\n", s.name),
        ),
    }
}
