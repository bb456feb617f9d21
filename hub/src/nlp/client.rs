//! One client of the NLP service (`fengda.nlp.v1.Nlp/Answer`): a bridge over
//! gRPC, or the built-in answerer called in-process.
//!
//! A bridge gets one HTTP/2 channel per hub node, shared by every call (tonic
//! multiplexes streams over it and reconnects by itself). Each call carries
//! its own deadline as `grpc-timeout` (set per request: `Endpoint::timeout`
//! would not tell the server) and an `x-request-id` for tracing across
//! processes. Dropping the returned stream cancels the call on the server.
//!
//! The built-in answerer (no `nlp.url`) is the same [`NlpService`] the
//! bridge serves, called in the replier's task
//! ([`NlpService::answer_in_process`]): same validation, limits and chunks,
//! without a loopback socket, HTTP/2 framing, protobuf, or a task and
//! channel per answer. In-process calls carry no `grpc-timeout` or
//! `x-request-id`: the request holds its id, and the whole-answer deadline
//! is enforced for every call by `ActiveCall`.

use std::pin::Pin;
use std::time::Duration;

use fengda_nlp::NlpService;
use fengda_proto::nlp::v1::nlp_client::NlpClient as GrpcClient;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest};
use futures::Stream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::config::NlpConfig;

/// The chunks of one answer; ends after the finish chunk (or early, on a
/// broken stream or the whole-answer deadline).
pub type AnswerStream = Pin<Box<dyn Stream<Item = Result<AnswerChunk, Status>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum NlpError {
    /// `url` is shown without credentials.
    #[error("invalid NLP service URL {url:?}: {source}")]
    InvalidUrl { url: String, source: tonic::transport::Error },
    #[error("NLP call failed: {0}")]
    Call(#[from] Status),
}

/// A cheap-to-clone handle on one NLP service.
#[derive(Debug, Clone)]
pub struct NlpClient {
    transport: Transport,
    reply_timeout: Duration,
}

#[derive(Debug, Clone)]
enum Transport {
    Grpc(GrpcClient<Channel>),
    InProcess(NlpService),
}

impl NlpClient {
    /// Prepares a channel to `url`; the connection is made on first use and
    /// re-made after failures, so the hub starts even if the service is down.
    pub fn connect_lazy(url: &str, config: &NlpConfig) -> Result<Self, NlpError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| NlpError::InvalidUrl { url: crate::redact::display_url(url).into_owned(), source })?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(config.first_chunk_timeout_ms))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Self {
            transport: Transport::Grpc(GrpcClient::new(endpoint.connect_lazy())),
            reply_timeout: Duration::from_millis(config.reply_timeout_ms),
        })
    }

    /// Calls `service` directly, in this process.
    pub fn in_process(service: NlpService, config: &NlpConfig) -> Self {
        Self { transport: Transport::InProcess(service), reply_timeout: Duration::from_millis(config.reply_timeout_ms) }
    }

    /// Whether calls cross the network (and the endpoint has a health service to ask).
    pub fn is_remote(&self) -> bool {
        matches!(self.transport, Transport::Grpc(_))
    }

    /// Starts one answer stream.
    pub async fn answer(&self, request: AnswerRequest) -> Result<AnswerStream, NlpError> {
        match &self.transport {
            Transport::Grpc(client) => {
                let request_id = request.request_id.clone();
                let mut request = Request::new(request);
                request.set_timeout(self.reply_timeout);
                if let Ok(value) = request_id.parse() {
                    request.metadata_mut().insert("x-request-id", value);
                }
                let mut client = client.clone();
                Ok(Box::pin(client.answer(request).await?.into_inner()))
            }
            Transport::InProcess(service) => Ok(Box::pin(service.answer_in_process(Request::new(request))?)),
        }
    }
}
