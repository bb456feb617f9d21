//! The crate's error types, one per boundary, and their single mapping to
//! the wire.
//!
//! [`BridgeError`] covers startup (configuration, knowledge base);
//! [`BackendError`] is what an [`AnswerBackend`](crate::backend::AnswerBackend)
//! yields mid-stream. `From<BackendError> for Status` is the one place a
//! backend failure becomes a gRPC status: clients get a stable code and a
//! short message, details go to the log.

use std::path::PathBuf;

use tonic::Status;

/// A boxed source error, for backends whose failures come from foreign crates.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Startup errors: the bridge cannot be built from this configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    #[error("cannot read config file {}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}", path.display())]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot read knowledge base {}", path.display())]
    ReadKnowledgeBase {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("knowledge base {origin} is not valid JSON")]
    ParseKnowledgeBase {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("knowledge base {origin} is invalid: {reason}")]
    InvalidKnowledgeBase { origin: String, reason: String },
}

/// A failure inside an answer stream. The service ends the call with the
/// mapped [`Status`] and never polls the backend stream again.
///
/// The variants are chosen so the hub's retry policy can tell "nothing was
/// sent, try again" ([`Unavailable`](Self::Unavailable), a 429 or 5xx
/// [`UpstreamStatus`](Self::UpstreamStatus)) from "a partial answer already
/// reached the customer" ([`Interrupted`](Self::Interrupted)) and from "this
/// request will never work" (the other upstream statuses).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend (e.g. an upstream LLM server) cannot be reached right now,
    /// or failed before producing any text. Nothing was sent; retryable.
    #[error("backend unavailable")]
    Unavailable(#[source] BoxError),
    /// The backend did not answer in time.
    #[error("backend timed out")]
    Timeout,
    /// The backend refused this request (too long, policy, ...).
    #[error("backend rejected the request: {0}")]
    Rejected(String),
    /// The upstream server answered with a non-success HTTP status before
    /// any text; `detail` (the start of its body) is for the log only.
    #[error("upstream answered HTTP {status}: {detail}")]
    UpstreamStatus { status: u16, detail: String },
    /// The answer broke off after some text was already streamed (connection
    /// lost, idle timeout, no `[DONE]`/finish). Not transparently retryable.
    #[error("answer interrupted mid-stream")]
    Interrupted(#[source] BoxError),
    /// Anything else; a bug or an unexpected upstream response.
    #[error("backend failed")]
    Internal(#[source] BoxError),
    /// The backend runs as many answers as its `limit` allows
    /// (`max_concurrent` or `max_concurrent_per_tenant`); nothing was sent.
    #[error("backend {backend} is at its {limit}")]
    Busy { backend: String, limit: &'static str },
}

/// The one mapping from backend failures to gRPC statuses:
///
/// | failure | status | retry? |
/// | --- | --- | --- |
/// | `Unavailable` (connect error, timeout or broken stream before any text), HTTP 408/502/503/504/5xx | `UNAVAILABLE` | yes |
/// | HTTP 429, `Busy` (a backend's own concurrency limit) | `RESOURCE_EXHAUSTED`, marked upstream-limited | yes, with backoff |
/// | `Timeout` | `DEADLINE_EXCEEDED` | caller decides |
/// | `Rejected`, HTTP 400/413/422 | `INVALID_ARGUMENT` | no |
/// | HTTP 401 | `UNAUTHENTICATED` | no (bridge's API key) |
/// | HTTP 403 | `PERMISSION_DENIED` | no |
/// | HTTP 404 (unknown model or path) | `NOT_FOUND` | no |
/// | `Interrupted` (after text was streamed) | `ABORTED` | no: a partial answer was sent |
/// | `Internal`, other HTTP statuses | `INTERNAL` | no |
impl From<BackendError> for Status {
    fn from(error: BackendError) -> Self {
        match error {
            BackendError::Unavailable(_) => Status::unavailable("answer backend unavailable"),
            BackendError::Timeout => Status::deadline_exceeded("answer backend timed out"),
            BackendError::Rejected(reason) => Status::invalid_argument(reason),
            BackendError::UpstreamStatus { status, .. } => upstream_status(status),
            BackendError::Interrupted(_) => Status::aborted("answer interrupted mid-stream"),
            BackendError::Internal(_) => Status::internal("answer backend failed"),
            // One backend's (or tenant's) slots, not the bridge's: hubs retry
            // without lowering their limit for the whole bridge.
            BackendError::Busy { limit, .. } => upstream_limited(format!("answer backend at its {limit}; retry later")),
        }
    }
}

/// `RESOURCE_EXHAUSTED` marked [`fengda_proto::UPSTREAM_LIMITED_HEADER`].
fn upstream_limited(message: String) -> Status {
    let mut status = Status::resource_exhausted(message);
    let marker = tonic::metadata::MetadataValue::from_static("1");
    status.metadata_mut().insert(fengda_proto::UPSTREAM_LIMITED_HEADER, marker);
    status
}

fn upstream_status(status: u16) -> Status {
    let message = format!("answer backend answered HTTP {status}");
    match status {
        // The upstream's limit for this tenant's key or model, not the
        // bridge's own: hubs retry it without lowering their limit for us.
        429 => upstream_limited(message),
        400 | 413 | 422 => Status::invalid_argument(message),
        401 => Status::unauthenticated(message),
        403 => Status::permission_denied(message),
        404 => Status::not_found(message),
        408 | 500..=599 => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn upstream_statuses_map_to_retryable_or_final_codes() {
        let code = |status| Status::from(BackendError::UpstreamStatus { status, detail: String::new() }).code();
        assert_eq!(code(429), Code::ResourceExhausted);
        // Marked as the upstream's limit, so hubs do not take the bridge for full.
        let limited = Status::from(BackendError::UpstreamStatus { status: 429, detail: String::new() });
        assert!(limited.metadata().contains_key(fengda_proto::UPSTREAM_LIMITED_HEADER));
        assert_eq!(code(500), Code::Unavailable);
        assert_eq!(code(503), Code::Unavailable);
        assert_eq!(code(400), Code::InvalidArgument);
        assert_eq!(code(401), Code::Unauthenticated);
        assert_eq!(code(403), Code::PermissionDenied);
        assert_eq!(code(404), Code::NotFound);
        assert_eq!(code(302), Code::Internal);
        assert_eq!(Status::from(BackendError::Interrupted("eof".into())).code(), Code::Aborted);
        let busy = Status::from(BackendError::Busy { backend: "llm".into(), limit: "max_concurrent" });
        assert_eq!(busy.code(), Code::ResourceExhausted);
        assert!(busy.metadata().contains_key(fengda_proto::UPSTREAM_LIMITED_HEADER));
        assert_eq!(Status::from(BackendError::Unavailable("refused".into())).code(), Code::Unavailable);
    }
}
