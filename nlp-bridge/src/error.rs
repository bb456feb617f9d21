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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend (e.g. an upstream LLM server) cannot be reached right now.
    #[error("backend unavailable")]
    Unavailable(#[source] BoxError),
    /// The backend did not answer in time.
    #[error("backend timed out")]
    Timeout,
    /// The backend refused this request (too long, policy, ...).
    #[error("backend rejected the request: {0}")]
    Rejected(String),
    /// Anything else; a bug or an unexpected upstream response.
    #[error("backend failed")]
    Internal(#[source] BoxError),
}

impl From<BackendError> for Status {
    fn from(error: BackendError) -> Self {
        match error {
            BackendError::Unavailable(_) => Status::unavailable("answer backend unavailable"),
            BackendError::Timeout => Status::deadline_exceeded("answer backend timed out"),
            BackendError::Rejected(reason) => Status::invalid_argument(reason),
            BackendError::Internal(_) => Status::internal("answer backend failed"),
        }
    }
}
