//! One gRPC client of the NLP service (`fengda.nlp.v1.Nlp/Answer`).
//!
//! One HTTP/2 channel per hub node, shared by every call (tonic multiplexes
//! streams over it and reconnects by itself). Each call carries its own
//! deadline as `grpc-timeout` (set per request: `Endpoint::timeout` would not
//! tell the server) and an `x-request-id` for tracing across processes.
//! Dropping the returned stream cancels the call on the server.

use std::time::Duration;

use fengda_proto::nlp::v1::nlp_client::NlpClient as GrpcClient;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use crate::config::NlpConfig;

#[derive(Debug, thiserror::Error)]
pub enum NlpError {
    #[error("invalid NLP service URL {url:?}: {source}")]
    InvalidUrl { url: String, source: tonic::transport::Error },
    #[error("NLP call failed: {0}")]
    Call(#[from] Status),
}

/// A cheap-to-clone handle on the NLP service.
#[derive(Debug, Clone)]
pub struct NlpClient {
    client: GrpcClient<Channel>,
    reply_timeout: Duration,
}

impl NlpClient {
    /// Prepares a channel to `url`; the connection is made on first use and
    /// re-made after failures, so the hub starts even if the service is down.
    pub fn connect_lazy(url: &str, config: &NlpConfig) -> Result<Self, NlpError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| NlpError::InvalidUrl { url: url.to_owned(), source })?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(config.first_chunk_timeout_ms))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Self {
            client: GrpcClient::new(endpoint.connect_lazy()),
            reply_timeout: Duration::from_millis(config.reply_timeout_ms),
        })
    }

    /// Starts one answer stream.
    pub async fn answer(&self, request: AnswerRequest) -> Result<Streaming<AnswerChunk>, NlpError> {
        let request_id = request.request_id.clone();
        let mut request = Request::new(request);
        request.set_timeout(self.reply_timeout);
        if let Ok(value) = request_id.parse() {
            request.metadata_mut().insert("x-request-id", value);
        }
        let mut client = self.client.clone();
        Ok(client.answer(request).await?.into_inner())
    }
}
