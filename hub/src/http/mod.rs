//! HTTP routes, for the two listeners.
//!
//! Two listeners: the public one (`listen`) for customers: the `/ws`
//! upgrade, the web demo and the health probes load balancers use; and the
//! admin one (`admin_listen`, loopback by default) for operators: `/metrics`
//! and the same health probes. Nothing an operator reads is on the public port.

mod demo_token;
mod error;
mod health;
mod web_demo;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use error::ApiError;

use crate::AppState;

/// The customers' routes (`/demo/token` in demo mode only).
pub fn routes(state: Arc<AppState>) -> Router {
    let router = match state.auth.mode() {
        crate::auth::AuthMode::Demo => Router::new().route("/demo/token", get(demo_token::demo_token)),
        crate::auth::AuthMode::Jwt => Router::new(),
    };
    router
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(web_demo::routes())
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// The operators' routes (`admin_listen`).
pub fn admin_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}
