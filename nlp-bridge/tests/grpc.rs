//! End-to-end: the real `serve` on 127.0.0.1:0, a real tonic client over the
//! socket. Covers the answer stream, validation, health, client disconnects
//! and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fengda_nlp::backend::{AnswerBackend, BackendRequest, BuiltinBackend, TokenStream};
use fengda_nlp::knowledge::{KnowledgeBase, Lang, default_answer};
use fengda_nlp::{AnswererConfig, NlpService};
use fengda_proto::nlp::v1::nlp_client::NlpClient;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, FinishReason, Role, Turn};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const TIMEOUT: Duration = Duration::from_secs(5);

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    async fn start(service: NlpService) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(fengda_nlp::serve(listener, service, shutdown.clone()));
        Self { addr, shutdown, handle }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.handle).await.expect("serve returns after shutdown").unwrap().unwrap();
    }
}

fn request(tenant: &str, question: &str, history: Vec<Turn>) -> tonic::Request<AnswerRequest> {
    let mut request = tonic::Request::new(AnswerRequest {
        tenant_id: tenant.into(),
        conversation_id: "conv-1".into(),
        request_id: "req-1".into(),
        history,
        question: question.into(),
    });
    request.metadata_mut().insert("x-request-id", "req-1".parse().unwrap());
    request.set_timeout(TIMEOUT);
    request
}

async fn answer(client: &mut NlpClient<Channel>, req: tonic::Request<AnswerRequest>) -> Vec<AnswerChunk> {
    let stream = client.answer(req).await.unwrap().into_inner();
    tokio::time::timeout(TIMEOUT, stream.map(|c| c.unwrap()).collect()).await.expect("answer completes")
}

/// Checks the stream invariants and returns (text, finish).
fn assemble(chunks: &[AnswerChunk]) -> (String, FinishReason) {
    assert!(chunks.len() >= 2, "{chunks:?}");
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.index as usize, i);
        let last = i == chunks.len() - 1;
        assert_eq!(chunk.finish() != FinishReason::Unspecified, last, "{chunk:?}");
        assert_eq!(chunk.text.is_empty(), last, "{chunk:?}");
    }
    let text = chunks.iter().map(|c| c.text.as_str()).collect();
    (text, chunks.last().unwrap().finish())
}

#[tokio::test]
async fn answers_stream_over_a_real_socket() {
    let server = Server::start(NlpService::builtin(&AnswererConfig::unpaced()).unwrap()).await;
    let kb = KnowledgeBase::embedded().unwrap();
    let mut client = NlpClient::new(server.channel().await);

    let chunks = answer(&mut client, request("demo", "Tell me about the Gold Card", vec![])).await;
    let (text, finish) = assemble(&chunks);
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(text, kb.entry("demo-gold-card").unwrap().answer);

    let history = vec![
        Turn { role: Role::Customer as i32, text: "tell me about the gold card".into() },
        Turn { role: Role::Assistant as i32, text: text.clone() },
    ];
    let chunks = answer(&mut client, request("demo", "and how much does it cost?", history)).await;
    let (text, finish) = assemble(&chunks);
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(text, kb.entry("demo-gold-card-fee").unwrap().answer);

    let chunks = answer(&mut client, request("telco", "今天天气怎么样？", vec![])).await;
    let (text, finish) = assemble(&chunks);
    assert_eq!(finish, FinishReason::NoMatch);
    assert_eq!(text, default_answer(Lang::Zh));

    let status = client.answer(request("demo", "   ", vec![])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A request id goes into logs and an upstream header: visible ASCII only, within max_id_bytes.
    for bad in ["two words", "line\nbreak", "é", &"r".repeat(257)] {
        let mut req = request("demo", "Tell me about the Gold Card", vec![]);
        req.metadata_mut().remove("x-request-id");
        req.get_mut().request_id = bad.to_owned();
        let status = client.answer(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains("request_id"), "{status:?}");
    }
    let mut ok = request("demo", "Tell me about the Gold Card", vec![]);
    ok.metadata_mut().remove("x-request-id");
    ok.get_mut().request_id = "r".repeat(256);
    assert_eq!(assemble(&answer(&mut client, ok).await).1, FinishReason::Stop);

    server.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    let server = Server::start(NlpService::builtin(&AnswererConfig::unpaced()).unwrap()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["fengda.nlp.v1.Nlp", ""] {
        let response = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.v1.Nope".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.stop().await;
}

/// Wraps a backend and records, per call, how many items the service pulled
/// and when the stream was dropped.
struct Probe {
    inner: BuiltinBackend,
    pulled: Arc<AtomicUsize>,
    dropped_tx: std::sync::Mutex<Option<oneshot::Sender<usize>>>,
}

/// Reports the number of pulled items when the backend stream is dropped.
struct DropReport {
    pulled: Arc<AtomicUsize>,
    tx: Option<oneshot::Sender<usize>>,
}

impl Drop for DropReport {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(self.pulled.load(Ordering::SeqCst));
        }
    }
}

impl AnswerBackend for Probe {
    fn answer(&self, request: BackendRequest) -> TokenStream {
        let report = DropReport { pulled: self.pulled.clone(), tx: self.dropped_tx.lock().unwrap().take() };
        let pulled = self.pulled.clone();
        self.inner
            .answer(request)
            .inspect(move |_| {
                let _keep_alive = &report;
                pulled.fetch_add(1, Ordering::SeqCst);
            })
            .boxed()
    }
}

#[tokio::test]
async fn dropping_the_client_stream_stops_the_backend() {
    // 20 tokens/s: the ~40-token answer would take ~2 s to produce in full.
    let config = AnswererConfig { first_token_delay_ms: 0, tokens_per_second: 20.0, knowledge_base: None };
    let inner = BuiltinBackend::new(&config).unwrap();
    let total =
        fengda_nlp::backend::builtin::split_tokens(&inner.knowledge().entry("demo-gold-card").unwrap().answer).len();
    assert!(total > 20);
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let pulled = Arc::new(AtomicUsize::new(0));
    let probe = Probe { inner, pulled: pulled.clone(), dropped_tx: std::sync::Mutex::new(Some(dropped_tx)) };
    let server = Server::start(NlpService::new(Arc::new(probe))).await;
    let mut client = NlpClient::new(server.channel().await);

    let mut stream = client.answer(request("demo", "What is the Gold Card?", vec![])).await.unwrap().into_inner();
    for i in 0..2 {
        let chunk = stream.next().await.unwrap().unwrap();
        assert_eq!(chunk.index, i);
    }
    drop(stream);
    drop(client);

    // Well before the answer could have finished on its own (~2 s), the
    // backend stream must be dropped, having produced only a few tokens.
    let pulled_at_drop = tokio::time::timeout(Duration::from_millis(1000), dropped_rx)
        .await
        .expect("backend stream dropped soon after the client left")
        .unwrap();
    assert!(pulled_at_drop < 8, "backend produced {pulled_at_drop} of {total} tokens after the client left");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pulled.load(Ordering::SeqCst), pulled_at_drop, "nothing pulled after drop");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_returns_promptly() {
    let server = Server::start(NlpService::builtin(&AnswererConfig::unpaced()).unwrap()).await;
    let mut client = NlpClient::new(server.channel().await);
    let chunks = answer(&mut client, request("shop", "where is my order?", vec![])).await;
    assert_eq!(assemble(&chunks).1, FinishReason::Stop);
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn every_response_advertises_the_stream_limit_and_a_draining_bridge_refuses_new_calls_but_finishes_old_ones() {
    // ~40 tokens at 50/s: an answer in flight for most of a second.
    let config = AnswererConfig { first_token_delay_ms: 0, tokens_per_second: 50.0, knowledge_base: None };
    let limits = fengda_nlp::config::Limits { max_concurrent_streams: 7, ..Default::default() };
    let service = NlpService::with_limits(Arc::new(BuiltinBackend::new(&config).unwrap()), limits);
    let server = Server::start(service).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let response = health.check(HealthCheckRequest { service: "fengda.nlp.v1.Nlp".into() }).await.unwrap();
    assert_eq!(response.metadata().get(fengda_proto::MAX_STREAMS_HEADER).unwrap(), "7", "on health checks");

    let mut client = NlpClient::new(channel);
    let in_flight = client.answer(request("demo", "What is the Gold Card?", vec![])).await.unwrap();
    assert_eq!(in_flight.metadata().get(fengda_proto::MAX_STREAMS_HEADER).unwrap(), "7", "on answers");
    let mut in_flight = in_flight.into_inner();
    let first = in_flight.next().await.unwrap().unwrap();
    server.shutdown.cancel();

    // Draining: health says NOT_SERVING and new calls are refused as draining, at once.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let response = health.check(HealthCheckRequest { service: "fengda.nlp.v1.Nlp".into() }).await.unwrap();
        if response.get_ref().status() == ServingStatus::NotServing {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "health turns NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = client.answer(request("demo", "What is the Gold Card?", vec![])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.metadata().contains_key(fengda_proto::DRAINING_HEADER), "{refused:?}");

    // The answer in flight still completes.
    let mut chunks = vec![first];
    while let Some(chunk) = tokio::time::timeout(TIMEOUT, in_flight.next()).await.expect("keeps streaming") {
        chunks.push(chunk.unwrap());
    }
    assert_eq!(assemble(&chunks).1, FinishReason::Stop);
    drop(in_flight);
    tokio::time::timeout(TIMEOUT, server.handle).await.expect("serve returns after the drain").unwrap().unwrap();
}
