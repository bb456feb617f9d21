//! Fengda's NLP bridge: a tonic server that streams answers token by token.
//!
//! The hub sends one `fengda.nlp.v1.Nlp/Answer` call per customer question and
//! relays the chunks to the customer as they arrive. This crate can run as
//! the `fengda-nlp` binary or be embedded by the hub in-process via [`serve`].
//!
//! Answers come from a backend chosen per tenant: the built-in FAQ answerer
//! (the default when nothing is configured) or any OpenAI-compatible
//! chat-completions server (vLLM, Ollama, llama.cpp's server, a hosted API),
//! streamed as server-sent events. See `nlp-bridge/fengda-nlp.example.toml`.
//!
//! Failure handling, as the hub sees it: before any text, upstream trouble is
//! `UNAVAILABLE` (connect error, 5xx, timeout) or `RESOURCE_EXHAUSTED` (429,
//! or the bridge's own `max_concurrent_streams`), both retryable; a request
//! the upstream will never accept is `INVALID_ARGUMENT`, `UNAUTHENTICATED`,
//! `PERMISSION_DENIED` or `NOT_FOUND`; a stream that breaks after text was
//! sent ends with `ABORTED`. Cancelling the gRPC call aborts the upstream
//! HTTP request. The table is at `From<BackendError> for Status` in [`error`].
//!
//! Module map:
//! - [`config`]: [`AnswererConfig`] and the binary's `BridgeConfig`
//!   (backends, tenant routing, limits).
//! - [`backend`]: the [`backend::AnswerBackend`] trait (async, streaming,
//!   fallible, cancelled by drop); [`backend::builtin`], the deterministic
//!   FAQ answerer; [`backend::openai`], the OpenAI-compatible LLM client;
//!   [`backend::router`], per-tenant selection; [`backend::limit`], a
//!   backend's per-backend and per-tenant concurrency limits.
//! - [`knowledge`]: the FAQ knowledge base, its tokenizer and matcher (also
//!   the retriever of grounded LLM answers).
//! - [`service`]: [`NlpService`], the gRPC handler, limits and per-call producer.
//! - [`error`]: startup and backend errors, and their mapping to `Status`.

pub mod backend;
pub mod config;
pub mod error;
pub mod knowledge;
pub mod service;

use std::time::Duration;

use fengda_proto::nlp::v1::nlp_server::NlpServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

pub use config::AnswererConfig;
pub use service::NlpService;

/// Once shutdown starts, in-flight answers get this long to finish before
/// the remaining connections (and their producers) are dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the Nlp service plus the standard gRPC health service (tonic-health,
/// `fengda.nlp.v1.Nlp` marked SERVING) on `listener` until `shutdown` is
/// cancelled. Every response, health checks included, carries the bridge's
/// stream limit ([`fengda_proto::MAX_STREAMS_HEADER`]), so a hub knows how
/// many calls to send before its first one.
///
/// On cancellation the bridge drains: the health status turns NOT_SERVING
/// and new calls are refused at once with `UNAVAILABLE` marked
/// [`fengda_proto::DRAINING_HEADER`] (hubs move them to other bridges
/// without counting a failure), while in-flight answers finish for up to
/// [`DRAIN_TIMEOUT`]; then the server stops and everything left is dropped,
/// which stops its producer tasks.
pub async fn serve(
    listener: TcpListener,
    service: NlpService,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<NlpServer<NlpService>>().await;
    let tasks = service.tasks().clone();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let signal = {
        let shutdown = shutdown.clone();
        let service = service.clone();
        async move {
            shutdown.cancelled().await;
            reporter.set_not_serving::<NlpServer<NlpService>>().await;
            service.start_draining();
            tracing::info!(in_flight = service.tasks().len(), "shutting down; draining in-flight answers");
            let tasks = service.tasks();
            tasks.close();
            if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait()).await.is_err() {
                tracing::warn!(timeout = ?DRAIN_TIMEOUT, left = tasks.len(), "drain timed out; dropping remaining calls");
            }
        }
    };
    let max_streams = tonic::codegen::http::HeaderValue::from(service.max_streams());
    let advertise = tower::util::MapResponseLayer::new(move |mut response: tonic::codegen::http::Response<_>| {
        response.headers_mut().insert(fengda_proto::MAX_STREAMS_HEADER, max_streams.clone());
        response
    });
    let server = Server::builder()
        .layer(advertise)
        .add_service(health)
        .add_service(NlpServer::new(service))
        .serve_with_incoming_shutdown(incoming, signal);
    // The drain above ends by itself; this bounds the server's own graceful close.
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT + Duration::from_secs(1)).await;
    };
    let result = tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "drain timed out; dropping remaining calls");
            Ok(())
        }
    };
    // Producers stop once their response streams are gone; wait briefly.
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await.is_err() {
        tracing::warn!(left = tasks.len(), "producer tasks still running after shutdown");
    }
    result
}
