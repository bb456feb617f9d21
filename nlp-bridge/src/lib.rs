//! Fengda's NLP bridge: a tonic server that streams answers token by token.
//!
//! The hub sends one `fengda.nlp.v1.Nlp/Answer` call per customer question and
//! relays the chunks to the customer as they arrive. This crate can run as
//! the `fengda-nlp` binary or be embedded by the hub in-process via [`serve`].
//!
//! Module map:
//! - [`config`]: [`AnswererConfig`] and the binary's `BridgeConfig`.
//! - [`backend`]: the [`backend::AnswerBackend`] trait (async, streaming,
//!   fallible, cancelled by drop) and [`backend::builtin`], the deterministic
//!   FAQ answerer; an LLM backend will be a second implementation.
//! - [`knowledge`]: the FAQ knowledge base, its tokenizer and matcher.
//! - [`service`]: [`NlpService`], the gRPC handler and per-call producer.
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
/// cancelled.
///
/// On cancellation the health status turns NOT_SERVING, new connections are
/// refused and in-flight answers may finish for up to [`DRAIN_TIMEOUT`];
/// then everything left is dropped, which stops its producer tasks.
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
        async move {
            shutdown.cancelled().await;
            reporter.set_not_serving::<NlpServer<NlpService>>().await;
            tracing::info!("shutting down; draining in-flight answers");
        }
    };
    let server = Server::builder()
        .add_service(health)
        .add_service(NlpServer::new(service))
        .serve_with_incoming_shutdown(incoming, signal);
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
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
