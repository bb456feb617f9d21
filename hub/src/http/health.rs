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
/// balancer stops sending new customers here while existing ones drain, and
/// false while a clustered backend cannot receive events (a deaf node).
pub async fn readyz(State(app): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    if !app.accepting.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "shutting_down" })))
    } else if !app.backend.is_receiving() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "backend_unavailable" })))
    } else {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    }
}

/// Prometheus metrics (`fengda_hub_*`).
pub async fn metrics(State(app): State<Arc<AppState>>) -> (StatusCode, String) {
    match &app.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}
