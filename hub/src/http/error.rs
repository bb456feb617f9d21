//! HTTP errors: one type, one JSON shape `{"error": code, "code": code, "message": text}`
//! (`code` and `error` carry the same value: `code` is the name the identity
//! contract uses, `error` the one the first clients read).

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::server::limits::Refusal;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable snake_case code clients can branch on.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code, message: message.into() }
    }

    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: "this route does not take that method".into(),
        }
    }

    pub fn not_found() -> Self {
        Self { status: StatusCode::NOT_FOUND, code: "not_found", message: "no such route".into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.code, "code": self.code, "message": self.message }))).into_response()
    }
}

/// A connection refused by the node's limits: `429`/`503` with `Retry-After`.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, code, message, retry_after) = match self {
            Self::AtCapacity => (
                StatusCode::SERVICE_UNAVAILABLE,
                "at_capacity",
                "this node holds all the connections it can; retry, or connect to another".to_owned(),
                1,
            ),
            Self::AddressConnections => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                "too many connections from your address; close some first".to_owned(),
                5,
            ),
            Self::AddressRate { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                "connection_rate_exceeded",
                format!("too many new connections from your address; retry in {retry_after_secs} s"),
                retry_after_secs,
            ),
        };
        ([(header::RETRY_AFTER, retry_after.to_string())], ApiError { status, code, message }).into_response()
    }
}
