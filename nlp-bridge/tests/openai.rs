//! The OpenAI-compatible backend end to end: a real `serve` on 127.0.0.1:0,
//! a real tonic client, and a real HTTP server (axum, in the test) speaking
//! the chat-completions streaming format: `data:` chunks separated by blank
//! lines, `: ping` keep-alives, a `finish_reason` chunk and `data: [DONE]`.
//!
//! Covers relaying in order, the upstream request's shape, mid-stream
//! failure, a slow first token, HTTP error statuses, cancellation reaching
//! the upstream server, per-tenant routing, the concurrency limit and the
//! request id's header.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fengda_nlp::NlpService;
use fengda_nlp::config::BridgeConfig;
use fengda_nlp::knowledge::KnowledgeBase;
use fengda_proto::nlp::v1::nlp_client::NlpClient;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, FinishReason, Role, Turn};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

const TIMEOUT: Duration = Duration::from_secs(5);
const KEY_VAR: &str = "FENGDA_TEST_LLM_KEY";
const KEY: &str = "sk-test-0123";

// ---------------------------------------------------------------------------
// The fake LLM server.

/// What the upstream server answers.
#[derive(Clone)]
enum Script {
    /// Streams `pieces`: the first after `first_delay`, then one per
    /// `interval`, with a `: ping` comment before each. Then, per `ending`,
    /// a finish chunk and `[DONE]`, or a broken connection.
    Stream { pieces: Vec<String>, first_delay: Duration, interval: Duration, ending: Ending },
    /// An HTTP error status with a JSON error body.
    Status(u16),
}

#[derive(Clone, Copy, PartialEq)]
enum Ending {
    FinishAndDone,
    BreakConnection,
}

fn stream_of(pieces: &[&str]) -> Script {
    Script::Stream {
        pieces: pieces.iter().map(|p| p.to_string()).collect(),
        first_delay: Duration::ZERO,
        interval: Duration::ZERO,
        ending: Ending::FinishAndDone,
    }
}

struct Upstream {
    script: Script,
    /// Every request received: headers and JSON body.
    requests: Mutex<Vec<(HeaderMap, Value)>>,
    /// Set (and `dropped` notified) when a response body stream is dropped
    /// before it was exhausted: hyper noticed the client left.
    cut_off: AtomicBool,
    dropped: Notify,
}

struct Llm {
    base_url: String,
    state: Arc<Upstream>,
    task: JoinHandle<()>,
}

impl Llm {
    async fn start(script: Script) -> Self {
        let state = Arc::new(Upstream {
            script,
            requests: Mutex::default(),
            cut_off: AtomicBool::new(false),
            dropped: Notify::new(),
        });
        let app = axum::Router::new().route("/v1/chat/completions", post(chat)).with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base_url: format!("http://{addr}/v1"), state, task }
    }

    fn requests(&self) -> Vec<(HeaderMap, Value)> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for Llm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn chunk(content: Option<&str>, finish: Option<&str>) -> String {
    let delta = match content {
        Some(text) => json!({ "content": text }),
        None => json!({}),
    };
    let chunk = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "test-model",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
    });
    format!("data: {chunk}\n\n")
}

/// Flags the upstream state when the body stream is dropped unfinished.
struct BodyGuard {
    state: Arc<Upstream>,
    finished: bool,
}

impl Drop for BodyGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.cut_off.store(true, Ordering::SeqCst);
            self.state.dropped.notify_one();
        }
    }
}

async fn chat(State(state): State<Arc<Upstream>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    // Counts as OpenAI sends them, after the finish chunk, when asked: one
    // prompt token per message, one completion token per piece.
    let usage = (body["stream_options"]["include_usage"] == true).then(|| {
        let prompt = body["messages"].as_array().map_or(0, Vec::len);
        move |pieces: usize| {
            let usage =
                json!({ "prompt_tokens": prompt, "completion_tokens": pieces, "total_tokens": prompt + pieces });
            format!("data: {}\n\n", json!({ "id": "chatcmpl-1", "choices": [], "usage": usage }))
        }
    });
    state.requests.lock().unwrap().push((headers, body));
    let (pieces, first_delay, interval, ending) = match state.script.clone() {
        Script::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            return (status, Json(json!({ "error": { "message": "scripted failure" } }))).into_response();
        }
        Script::Stream { pieces, first_delay, interval, ending } => (pieces, first_delay, interval, ending),
    };
    let trailer = usage.map(|usage| usage(pieces.len())).unwrap_or_default();
    let guard = BodyGuard { state: state.clone(), finished: false };
    let frames = futures::stream::unfold((pieces.into_iter().enumerate(), guard), move |(mut pieces, mut guard)| {
        let trailer = trailer.clone();
        async move {
            match pieces.next() {
                Some((i, piece)) => {
                    tokio::time::sleep(if i == 0 { first_delay } else { interval }).await;
                    let frame = format!(": ping\n\n{}", chunk(Some(&piece), None));
                    Some((Ok(Bytes::from(frame)), (pieces, guard)))
                }
                None if guard.finished => None,
                None => {
                    // Let hyper flush the last piece: a body error drops
                    // whatever is still in its write buffer.
                    tokio::time::sleep(interval).await;
                    guard.finished = true;
                    let last = match ending {
                        Ending::FinishAndDone => {
                            Ok(Bytes::from(chunk(None, Some("stop")) + &trailer + "data: [DONE]\n\n"))
                        }
                        Ending::BreakConnection => Err(std::io::Error::other("scripted connection break")),
                    };
                    Some((last, (pieces, guard)))
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(frames))
        .unwrap()
}

// ---------------------------------------------------------------------------
// The bridge.

struct Bridge {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Bridge {
    /// Starts the bridge from a TOML config.
    async fn start(toml: &str) -> Self {
        let config = BridgeConfig::from_toml(toml).unwrap();
        let env = |name: &str| (name == KEY_VAR).then(|| KEY.to_owned());
        let service = NlpService::from_config_with_env(&config, &env).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(fengda_nlp::serve(listener, service, shutdown.clone()));
        Self { addr, shutdown, handle }
    }

    /// A bridge whose default backend is the LLM at `llm`.
    async fn with_llm(llm: &Llm) -> Self {
        Self::start(&llm_config(llm, "")).await
    }

    async fn client(&self) -> NlpClient<Channel> {
        NlpClient::new(Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.handle).await.expect("serve returns after shutdown").unwrap().unwrap();
    }
}

fn llm_config(llm: &Llm, extra: &str) -> String {
    format!(
        r#"
        default_backend = "llm"
        [answerer]
        first_token_delay_ms = 0
        tokens_per_second = 0
        [backends.llm]
        kind = "openai"
        base_url = "{}"
        model = "test-model"
        api_key_env = "{KEY_VAR}"
        max_tokens = 64
        timeout_ms = 2000
        idle_timeout_ms = 2000
        system_prompt = "You are a helpful agent."
        tenant_prompts = {{ bank = "You are Fengda Bank's assistant." }}
        {extra}
        "#,
        llm.base_url
    )
}

fn request(tenant: &str, question: &str, history: Vec<Turn>) -> tonic::Request<AnswerRequest> {
    let mut request = tonic::Request::new(AnswerRequest {
        tenant_id: tenant.into(),
        conversation_id: "conv-1".into(),
        request_id: "req-1".into(),
        history,
        question: question.into(),
    });
    request.set_timeout(TIMEOUT);
    request
}

/// Every item of one call, errors included, until the stream ends.
async fn collect(
    client: &mut NlpClient<Channel>,
    req: tonic::Request<AnswerRequest>,
) -> Vec<Result<AnswerChunk, Status>> {
    let stream = client.answer(req).await.unwrap().into_inner();
    tokio::time::timeout(TIMEOUT, stream.collect()).await.expect("answer completes")
}

fn texts(items: &[Result<AnswerChunk, Status>]) -> Vec<&str> {
    items.iter().filter_map(|item| item.as_ref().ok()).map(|c| c.text.as_str()).filter(|t| !t.is_empty()).collect()
}

// ---------------------------------------------------------------------------
// Cases.

#[tokio::test]
async fn tokens_are_relayed_in_order_and_the_request_is_well_formed() {
    let llm = Llm::start(stream_of(&["Hel", "lo", " world", "!"])).await;
    let bridge = Bridge::with_llm(&llm).await;
    let mut client = bridge.client().await;

    let history = vec![
        Turn { role: Role::Customer as i32, text: "hi".into() },
        Turn { role: Role::Assistant as i32, text: "Hello! How can I help?".into() },
        Turn { role: Role::Agent as i32, text: "Agent Li here.".into() },
        Turn { role: Role::System as i32, text: "customer verified".into() },
    ];
    let items = collect(&mut client, request("bank", "What are the fees?", history)).await;
    let chunks: Vec<AnswerChunk> = items.into_iter().map(|item| item.unwrap()).collect();
    let got: Vec<(u32, &str, FinishReason)> = chunks.iter().map(|c| (c.index, c.text.as_str(), c.finish())).collect();
    assert_eq!(
        got,
        [
            (0, "Hel", FinishReason::Unspecified),
            (1, "lo", FinishReason::Unspecified),
            (2, " world", FinishReason::Unspecified),
            (3, "!", FinishReason::Unspecified),
            (4, "", FinishReason::Stop),
        ]
    );
    // The trailing usage chunk rides on the last chunk, and only there.
    let usage = chunks[4].usage.expect("the token counts on the last chunk");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (6, 4));
    assert!(chunks[..4].iter().all(|c| c.usage.is_none()));

    let requests = llm.requests();
    assert_eq!(requests.len(), 1);
    let (headers, body) = &requests[0];
    assert_eq!(headers[header::AUTHORIZATION], format!("Bearer {KEY}").as_str());
    assert_eq!(headers["x-request-id"], "req-1");
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["stream_options"], json!({ "include_usage": true }));
    assert_eq!(
        body["messages"],
        json!([
            { "role": "system", "content": "You are Fengda Bank's assistant." },
            { "role": "user", "content": "hi" },
            { "role": "assistant", "content": "Hello! How can I help?" },
            { "role": "assistant", "content": "Agent Li here." },
            { "role": "system", "content": "customer verified" },
            { "role": "user", "content": "What are the fees?" },
        ])
    );

    // Another tenant gets the default system prompt.
    let items = collect(&mut client, request("shop", "Where is my order?", vec![])).await;
    assert_eq!(texts(&items), ["Hel", "lo", " world", "!"]);
    let (_, body) = &llm.requests()[1];
    assert_eq!(body["messages"][0], json!({ "role": "system", "content": "You are a helpful agent." }));
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);
    bridge.stop().await;
}

#[tokio::test]
async fn a_connection_broken_mid_stream_ends_the_call_with_aborted() {
    let llm = Llm::start(Script::Stream {
        pieces: vec!["Hel".into(), "lo".into()],
        first_delay: Duration::ZERO,
        interval: Duration::from_millis(20),
        ending: Ending::BreakConnection,
    })
    .await;
    let bridge = Bridge::with_llm(&llm).await;
    let mut client = bridge.client().await;
    let items = collect(&mut client, request("bank", "hello?", vec![])).await;
    assert_eq!(items.len(), 3, "{items:?}");
    assert_eq!(texts(&items), ["Hel", "lo"]);
    assert_eq!(items[2].as_ref().unwrap_err().code(), Code::Aborted);
    bridge.stop().await;
}

#[tokio::test]
async fn a_slow_first_token_still_arrives_and_is_relayed_at_once() {
    let llm = Llm::start(Script::Stream {
        pieces: vec!["Thinking".into(), " done".into()],
        first_delay: Duration::from_millis(300),
        interval: Duration::from_millis(700),
        ending: Ending::FinishAndDone,
    })
    .await;
    let bridge = Bridge::with_llm(&llm).await;
    let mut client = bridge.client().await;
    let start = Instant::now();
    let mut stream = client.answer(request("bank", "hello?", vec![])).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.text, "Thinking");
    // Relayed when it arrives, not held back until the next piece (at 1 s).
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(900), "{elapsed:?}");
    let rest: Vec<AnswerChunk> = stream.map(|item| item.unwrap()).collect().await;
    let rest: Vec<(&str, FinishReason)> = rest.iter().map(|c| (c.text.as_str(), c.finish())).collect();
    assert_eq!(rest, [(" done", FinishReason::Unspecified), ("", FinishReason::Stop)]);
    bridge.stop().await;
}

#[tokio::test]
async fn a_first_token_past_the_deadline_is_unavailable() {
    let llm = Llm::start(Script::Stream {
        pieces: vec!["late".into()],
        first_delay: Duration::from_millis(2000),
        interval: Duration::ZERO,
        ending: Ending::FinishAndDone,
    })
    .await;
    let bridge = Bridge::start(&llm_config(&llm, "").replace("timeout_ms = 2000\n", "timeout_ms = 200\n")).await;
    let mut client = bridge.client().await;
    let items = collect(&mut client, request("bank", "hello?", vec![])).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].as_ref().unwrap_err().code(), Code::Unavailable);
    bridge.stop().await;
}

#[tokio::test]
async fn upstream_http_errors_map_to_grpc_codes() {
    for (http, code) in [
        (429, Code::ResourceExhausted),
        (500, Code::Unavailable),
        (503, Code::Unavailable),
        (400, Code::InvalidArgument),
        (401, Code::Unauthenticated),
        (404, Code::NotFound),
    ] {
        let llm = Llm::start(Script::Status(http)).await;
        let bridge = Bridge::with_llm(&llm).await;
        let mut client = bridge.client().await;
        let items = collect(&mut client, request("bank", "hello?", vec![])).await;
        assert_eq!(items.len(), 1, "HTTP {http}: {items:?}");
        assert_eq!(items[0].as_ref().unwrap_err().code(), code, "HTTP {http}");
        bridge.stop().await;
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable() {
    // Bind and drop a listener: its port refuses connections.
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let toml = format!(
        "default_backend = \"llm\"\n[backends.llm]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"m\"\n"
    );
    let bridge = Bridge::start(&toml).await;
    let mut client = bridge.client().await;
    let items = collect(&mut client, request("bank", "hello?", vec![])).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].as_ref().unwrap_err().code(), Code::Unavailable);
    bridge.stop().await;
}

#[tokio::test]
async fn cancelling_the_grpc_stream_aborts_the_upstream_request() {
    // 200 pieces at 50 ms: 10 s of streaming if nobody hangs up.
    let llm = Llm::start(Script::Stream {
        pieces: (0..200).map(|i| format!(" t{i}")).collect(),
        first_delay: Duration::ZERO,
        interval: Duration::from_millis(50),
        ending: Ending::FinishAndDone,
    })
    .await;
    let bridge = Bridge::with_llm(&llm).await;
    let mut client = bridge.client().await;
    let mut stream = client.answer(request("bank", "talk forever", vec![])).await.unwrap().into_inner();
    for i in 0..2 {
        let chunk = tokio::time::timeout(TIMEOUT, stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!((chunk.index, chunk.text.as_str()), (i, format!(" t{i}").as_str()));
    }
    assert!(!llm.state.cut_off.load(Ordering::SeqCst));
    let dropped_at = Instant::now();
    drop(stream);
    tokio::time::timeout(Duration::from_secs(1), llm.state.dropped.notified())
        .await
        .expect("the upstream saw the disconnect within 1 s");
    assert!(llm.state.cut_off.load(Ordering::SeqCst));
    assert!(dropped_at.elapsed() < Duration::from_secs(1));
    bridge.stop().await;
}

#[tokio::test]
async fn the_request_id_goes_in_the_configured_header_or_none() {
    for (setting, expected) in [
        ("", Some("x-request-id")),
        ("request_id_header = \"X-Fengda-Request-Id\"", Some("x-fengda-request-id")),
        ("request_id_header = false", None),
    ] {
        let llm = Llm::start(stream_of(&["ok"])).await;
        let bridge = Bridge::start(&llm_config(&llm, setting)).await;
        let mut client = bridge.client().await;
        assert_eq!(texts(&collect(&mut client, request("bank", "hello?", vec![])).await), ["ok"], "{setting}");
        let (headers, _) = &llm.requests()[0];
        let sent: Vec<&str> =
            headers.iter().filter(|(_, value)| *value == "req-1").map(|(name, _)| name.as_str()).collect();
        assert_eq!(sent, expected.into_iter().collect::<Vec<_>>(), "{setting}: {headers:?}");
        bridge.stop().await;
    }
}

#[tokio::test]
async fn each_tenant_uses_its_backend() {
    let llm = Llm::start(stream_of(&["from", " the", " llm"])).await;
    let toml = llm_config(&llm, "").replace("default_backend = \"llm\"", "default_backend = \"builtin\"")
        + "\n[tenants]\nbank = \"llm\"\ndemo = \"builtin\"\n";
    let bridge = Bridge::start(&toml).await;
    let mut client = bridge.client().await;

    let items = collect(&mut client, request("bank", "What is the Gold Card?", vec![])).await;
    assert_eq!(texts(&items).concat(), "from the llm");

    let kb = KnowledgeBase::embedded().unwrap();
    for tenant in ["demo", "unlisted"] {
        let items = collect(&mut client, request(tenant, "What is the Gold Card?", vec![])).await;
        let text = texts(&items).concat();
        if tenant == "demo" {
            assert_eq!(text, kb.entry("demo-gold-card").unwrap().answer);
        } else {
            assert!(!text.is_empty() && text != "from the llm", "{text}");
        }
    }
    assert_eq!(llm.requests().len(), 1, "only the bank tenant reached the LLM");
    bridge.stop().await;
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_at_once() {
    let llm = Llm::start(Script::Stream {
        pieces: (0..100).map(|i| format!(" t{i}")).collect(),
        first_delay: Duration::ZERO,
        interval: Duration::from_millis(50),
        ending: Ending::FinishAndDone,
    })
    .await;
    let bridge = Bridge::start(&(llm_config(&llm, "") + "\n[limits]\nmax_concurrent_streams = 1\n")).await;
    let mut client = bridge.client().await;

    let mut first = client.answer(request("bank", "one", vec![])).await.unwrap().into_inner();
    first.next().await.unwrap().unwrap();
    let start = Instant::now();
    let refused = client.answer(request("bank", "two", vec![])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(start.elapsed() < Duration::from_millis(500), "refused at once, not queued");
    assert_eq!(llm.requests().len(), 1, "the refused call never reached the LLM");

    // Hanging up frees the slot.
    drop(first);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match client.answer(request("bank", "three", vec![])).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                assert_eq!(stream.next().await.unwrap().unwrap().text, " t0");
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("slot never freed: {status:?}"),
        }
    }
    bridge.stop().await;
}

#[tokio::test]
async fn a_tenant_at_its_backend_limit_is_refused_while_others_are_answered() {
    let llm = Llm::start(Script::Stream {
        pieces: (0..100).map(|i| format!(" t{i}")).collect(),
        first_delay: Duration::ZERO,
        interval: Duration::from_millis(50),
        ending: Ending::FinishAndDone,
    })
    .await;
    let bridge = Bridge::start(&llm_config(&llm, "max_concurrent = 2\nmax_concurrent_per_tenant = 1")).await;
    let mut client = bridge.client().await;
    let mut first = client.answer(request("bank", "one", vec![])).await.unwrap().into_inner();
    first.next().await.unwrap().unwrap();

    // The same tenant again: refused at once, marked as an upstream limit, never sent upstream.
    let start = Instant::now();
    let mut second = client.answer(request("bank", "two", vec![])).await.unwrap().into_inner();
    let refused = second.next().await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.metadata().contains_key(fengda_proto::UPSTREAM_LIMITED_HEADER));
    assert!(start.elapsed() < Duration::from_millis(500), "refused at once, not queued");
    assert_eq!(llm.requests().len(), 1);

    // Another tenant takes the backend's second slot; a third tenant finds it full.
    let mut other = client.answer(request("shop", "one", vec![])).await.unwrap().into_inner();
    assert_eq!(other.next().await.unwrap().unwrap().text, " t0");
    let mut third = client.answer(request("telco", "one", vec![])).await.unwrap().into_inner();
    assert_eq!(third.next().await.unwrap().unwrap_err().code(), Code::ResourceExhausted);
    assert_eq!(llm.requests().len(), 2);

    // Hanging up frees the tenant's slot.
    drop(first);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut again = client.answer(request("bank", "three", vec![])).await.unwrap().into_inner();
        match again.next().await.unwrap() {
            Ok(chunk) => {
                assert_eq!(chunk.text, " t0");
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("slot never freed: {status:?}"),
        }
    }
    drop(other);
    bridge.stop().await;
}
