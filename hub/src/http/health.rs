//! Liveness and readiness probes for load balancers and orchestrators.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;

/// Alive: the process answers HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready to take sockets: false once shutdown has begun, so the load
/// balancer stops sending new customers here while existing ones drain,
/// false while a clustered store cannot receive events (a deaf node), and
/// false while the node holds `server.max_connections` connections.
pub async fn readyz(State(app): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    if !app.accepting.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "shutting_down" })))
    } else if !app.conversations.is_receiving() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "backend_unavailable" })))
    } else if app.connections.at_capacity() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "at_capacity" })))
    } else {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    }
}

/// Prometheus metrics (`fengda_hub_*`). The gauges read at scrape time (live
/// tasks, open sessions) are how a soak test sees a leak.
pub async fn metrics(State(app): State<Arc<AppState>>) -> (StatusCode, String) {
    let Some(handle) = &app.metrics else {
        return (StatusCode::SERVICE_UNAVAILABLE, String::new());
    };
    let runtime = tokio::runtime::Handle::current().metrics();
    metrics::gauge!(crate::metric::RUNTIME_TASKS_ALIVE).set(runtime.num_alive_tasks() as f64);
    metrics::gauge!(crate::metric::RUNTIME_WORKERS).set(runtime.num_workers() as f64);
    metrics::gauge!(crate::metric::SESSIONS_OPEN).set(app.sessions_open.load(Ordering::Relaxed) as f64);
    metrics::gauge!(crate::metric::CONNECTIONS_OPEN).set(app.connections.open() as f64);
    metrics::gauge!(crate::metric::CONNECTIONS_MAX).set(app.connections.max_open() as f64);
    (StatusCode::OK, handle.render())
}
