//! A gRPC answerer started inside a test: records each request and answers
//! from a script, so tests can see exactly what the hub sent to the NLP
//! service and control how it answers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fengda_proto::nlp::v1::nlp_server::{Nlp, NlpServer};
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, FinishReason};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// How the answerer replies.
#[derive(Clone, Debug)]
pub struct Script {
    /// Wait this long before the first chunk.
    pub first_chunk_delay: Duration,
    /// Number of tokens per answer; token i is `"tok{i} "`.
    pub tokens: usize,
    /// Extra bytes of padding in every token (to fill buffers quickly).
    pub token_padding: usize,
    /// Wait between tokens.
    pub token_delay: Duration,
    /// Refuse this many calls (counted from the start) with this code before answering.
    pub fail_first: usize,
    pub fail_code: tonic::Code,
    /// Mark those refusals as an upstream's rate limit
    /// (`fengda-upstream-limited`), as `fengda-nlp` marks an LLM server's 429.
    pub fail_upstream_limited: bool,
    /// Answer at most this many calls at once; refuse more with
    /// `RESOURCE_EXHAUSTED` (without advertising the limit, as a bridge
    /// other than `fengda-nlp` would).
    pub max_streams: Option<usize>,
    /// Token counts on the last chunk, as a bridge sends a model's usage.
    pub usage: Option<fengda_proto::nlp::v1::Usage>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            first_chunk_delay: Duration::ZERO,
            tokens: 5,
            token_padding: 0,
            token_delay: Duration::ZERO,
            fail_first: 0,
            fail_code: tonic::Code::Unavailable,
            fail_upstream_limited: false,
            max_streams: None,
            usage: None,
        }
    }
}

pub struct RecordingAnswerer {
    pub url: String,
    script: Arc<Mutex<Script>>,
    requests: Arc<Mutex<Vec<AnswerRequest>>>,
    /// How many answer streams ended because the client went away.
    cancelled: Arc<watch::Sender<usize>>,
    /// How many calls were refused as over `Script::max_streams`.
    refused: Arc<Mutex<usize>>,
    /// Tokens handed to answer streams so far, over all calls.
    tokens: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

struct Service {
    script: Arc<Mutex<Script>>,
    requests: Arc<Mutex<Vec<AnswerRequest>>>,
    cancelled: Arc<watch::Sender<usize>>,
    refused: Arc<Mutex<usize>>,
    tokens: Arc<std::sync::atomic::AtomicUsize>,
    /// Answers streaming now.
    streaming: Arc<std::sync::atomic::AtomicUsize>,
}

impl RecordingAnswerer {
    pub async fn start(script: Script) -> RecordingAnswerer {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let cancelled = Arc::new(watch::Sender::new(0));
        let stop = CancellationToken::new();
        let script = Arc::new(Mutex::new(script));
        let refused = Arc::new(Mutex::new(0));
        let tokens = Arc::default();
        let service = Service {
            script: script.clone(),
            requests: requests.clone(),
            cancelled: cancelled.clone(),
            refused: refused.clone(),
            tokens: Arc::clone(&tokens),
            streaming: Arc::default(),
        };
        let shutdown = stop.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(NlpServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
                .await
                .expect("recording answerer failed");
        });
        RecordingAnswerer { url, script, requests, cancelled, refused, tokens, stop }
    }

    /// Changes how later calls are answered.
    pub fn set_script(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    pub fn requests(&self) -> Vec<AnswerRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn cancelled(&self) -> usize {
        *self.cancelled.borrow()
    }

    /// Waits until `n` answer streams ended because the client went away
    /// (the answerer notices at its next token), failing after a step timeout.
    pub async fn wait_cancelled(&self, n: usize) {
        let mut cancelled = self.cancelled.subscribe();
        let seen = tokio::time::timeout(crate::STEP_TIMEOUT, cancelled.wait_for(|c| *c >= n)).await;
        assert!(seen.is_ok(), "the NLP service saw {} cancellations, not {n}", self.cancelled());
    }

    pub fn refused(&self) -> usize {
        *self.refused.lock().unwrap()
    }

    /// Tokens handed to answer streams so far, over all calls.
    pub fn tokens_sent(&self) -> usize {
        self.tokens.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for RecordingAnswerer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<AnswerChunk, Status>> + Send>>;

/// One answer counted in `Service::streaming` while it lives.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[tonic::async_trait]
impl Nlp for Service {
    type AnswerStream = ChunkStream;

    async fn answer(&self, request: Request<AnswerRequest>) -> Result<Response<ChunkStream>, Status> {
        let request = request.into_inner();
        let calls = {
            let mut requests = self.requests.lock().unwrap();
            requests.push(request);
            requests.len()
        };
        let script = self.script.lock().unwrap().clone();
        if calls <= script.fail_first {
            let mut status = Status::new(script.fail_code, "scripted failure");
            if script.fail_upstream_limited {
                let marker = tonic::metadata::MetadataValue::from_static("1");
                status.metadata_mut().insert(fengda_proto::UPSTREAM_LIMITED_HEADER, marker);
            }
            return Err(status);
        }
        use std::sync::atomic::Ordering;
        let streaming = StreamSlot(self.streaming.clone());
        if streaming.0.fetch_add(1, Ordering::AcqRel) >= script.max_streams.unwrap_or(usize::MAX) {
            *self.refused.lock().unwrap() += 1;
            return Err(Status::resource_exhausted("too many concurrent answer streams"));
        }
        let cancelled = self.cancelled.clone();
        let tokens = self.tokens.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _streaming = streaming;
            tokio::time::sleep(script.first_chunk_delay).await;
            let padding = "x".repeat(script.token_padding);
            for index in 0..script.tokens {
                if index > 0 && !script.token_delay.is_zero() {
                    tokio::time::sleep(script.token_delay).await;
                }
                let chunk =
                    AnswerChunk { index: index as u32, text: format!("tok{index}{padding} "), finish: 0, usage: None };
                if tx.send(Ok(chunk)).await.is_err() {
                    cancelled.send_modify(|n| *n += 1);
                    return;
                }
                tokens.fetch_add(1, Ordering::AcqRel);
            }
            let last = AnswerChunk {
                index: script.tokens as u32,
                text: String::new(),
                finish: FinishReason::Stop as i32,
                usage: script.usage,
            };
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
