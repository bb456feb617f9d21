//! The LLM path against a real model server: llama.cpp (llama-cpp-python's
//! OpenAI-compatible server) running SmolLM2-135M-Instruct on one thread,
//! behind the real `fengda-nlp` and `fengda` binaries. Nothing here is
//! faked: the SSE framing, the tokenizer (Chinese characters are two or
//! three byte-level tokens each), the finish reasons, the disconnects, the
//! model's reading of a grounded prompt.
//!
//! The model server answers one request at a time; the others wait their
//! turn (or, as it does by default, cut the answer in flight short). Its
//! side of every claim is read from its log: the chat completions that
//! reached it (and their statuses), and `Disconnected from client` when it
//! stops generating for a client that left. Greedy decoding (temperature
//! 0, a fixed seed) makes an answer a function of its prompt.
//!
//! CPU heavy: `.config/nextest.toml` runs these tests alone, one at a time.

use std::time::Duration;

use fengda_proto::nlp::v1::nlp_client::NlpClient;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, FinishReason};
use fengda_tests::{Client, Hub, LlamaServer, NlpProcess, STEP_TIMEOUT};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::{Code, Status};

/// A request id as the hub sends it: llama-cpp-python answers 400 to an
/// `x-request-id` that is not a UUID.
const UUID: &str = "0d9c7a52-4f0e-4d1b-9a51-0c6f3e2b8a17";

/// A bridge config: tenant `chat` on short, deterministic answers; tenant
/// `long` on answers the model may not end before 4,000 tokens (about 45 s
/// on one idle core), for cancellation and crashes.
fn bridge_config(llama_base_url: &str) -> String {
    format!(
        r#"
        default_backend = "short"
        [backends.short]
        kind = "openai"
        base_url = "{llama_base_url}"
        model = "smollm2"
        max_tokens = 24
        temperature = 0.0
        timeout_ms = 20000
        idle_timeout_ms = 10000
        [backends.long]
        kind = "openai"
        base_url = "{llama_base_url}"
        model = "smollm2"
        max_tokens = 4000
        extra_body = {{ min_tokens = 4000 }}
        timeout_ms = 20000
        idle_timeout_ms = 10000
        [tenants]
        long = "long"
        "#
    )
}

/// How long the hubs of these tests wait for a model's first chunk.
const FIRST_CHUNK_MS: &str = "20000";

/// A hub in front of `bridge` that waits for a model on a shared core.
async fn hub(bridge: &NlpProcess) -> Hub {
    Hub::start(&["--nlp-url", &bridge.url, "--nlp-first-chunk-timeout-ms", FIRST_CHUNK_MS, "--allow-timing"]).await
}

/// A customer of `hub` (`query`: the socket's), who waits for a frame as
/// long as the hub waits for the model's first chunk: on a loaded machine
/// the prompt alone can take longer than [`STEP_TIMEOUT`].
async fn customer(hub: &Hub, query: &str) -> Client {
    let mut client = Client::connect(&hub.ws_url(query)).await;
    client.step = Duration::from_millis(FIRST_CHUNK_MS.parse().unwrap()) + STEP_TIMEOUT;
    client
}

/// Every chunk of one gRPC answer.
async fn answer(bridge: &NlpProcess, tenant: &str, question: &str) -> Vec<AnswerChunk> {
    call(bridge, tenant, question, UUID).await.into_iter().map(|item| item.expect("no error")).collect()
}

/// Every item of one gRPC call with `request_id`, errors included.
async fn call(bridge: &NlpProcess, tenant: &str, question: &str, request_id: &str) -> Vec<Result<AnswerChunk, Status>> {
    let mut client = NlpClient::connect(bridge.url.clone()).await.expect("connect to the bridge");
    let request = AnswerRequest {
        tenant_id: tenant.into(),
        conversation_id: "c-1".into(),
        request_id: request_id.into(),
        history: vec![],
        question: question.into(),
    };
    let stream = client.answer(request).await.expect("the call starts").into_inner();
    tokio::time::timeout(Duration::from_secs(30), stream.collect()).await.expect("answer ends")
}

/// Cancels the reply `delta` belongs to; returns its `reply.done`.
async fn cancel(client: &mut Client, delta: &Value) -> Value {
    client.send_json(json!({ "type": "cancel", "reply": delta["reply"] })).await;
    loop {
        let frame = client.next().await;
        if frame["type"] == "reply.done" {
            assert_eq!(frame["cancelled"], true, "{frame}");
            return frame;
        }
    }
}

fn text_of(chunks: &[AnswerChunk]) -> String {
    chunks.iter().map(|c| c.text.as_str()).collect()
}

#[tokio::test]
async fn the_bridge_relays_a_real_models_tokens_finish_reasons_and_chinese_text() {
    let llama = LlamaServer::start().await;
    let bridge = NlpProcess::start_with_config(&bridge_config(&llama.base_url)).await;

    // A question the model answers in a few tokens: it stops by itself.
    let stop = answer(&bridge, "chat", "What is 2+2? Answer with one number.").await;
    let last = stop.last().unwrap();
    assert_eq!(last.finish(), FinishReason::Stop, "{stop:?}");
    assert!(stop.len() >= 3 && !text_of(&stop).trim().is_empty(), "{stop:?}");
    for (i, chunk) in stop.iter().enumerate() {
        assert_eq!(chunk.index as usize, i);
        assert_eq!(chunk.finish() != FinishReason::Unspecified, i == stop.len() - 1);
    }
    // llama-cpp-python's server ignores stream_options.include_usage: no counts.
    assert_eq!(last.usage, None, "this server sends no usage chunk; docs/operations.md says so");

    // Chinese: every character is two or three byte-level tokens, and the
    // reply hits max_tokens (24) in fewer chunks, each of whole characters.
    let zh = answer(&bridge, "chat", "请用中文回答：你好吗？").await;
    let text = text_of(&zh);
    assert_eq!(zh.last().unwrap().finish(), FinishReason::Length, "{text:?}");
    assert!(text.chars().filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c)).count() >= 2, "{text:?}");
    assert!(!text.contains('\u{fffd}'), "no character split into replacement chars: {text:?}");
    assert!(zh.len() - 1 < 24, "{} text chunks for 24 tokens: multi-byte characters were joined", zh.len() - 1);
}

#[tokio::test]
async fn a_customer_gets_a_real_model_answer_through_the_hub() {
    let llama = LlamaServer::start().await;
    let bridge = NlpProcess::start_with_config(&bridge_config(&llama.base_url)).await;
    let hub = hub(&bridge).await;
    let mut client = customer(&hub, "tenant=chat&user=alice&timing=1").await;
    let (_, reply) = client.ask("m1", "What is 2+2? Answer with one number.").await;
    assert_eq!(reply.done["fallback"], false, "{}", reply.done);
    assert!(reply.deltas.len() >= 3, "streamed token by token: {:?}", reply.deltas);
    // No usage chunk from this server, so no token counts on the timing object.
    let timing = &reply.done["timing"];
    assert!(timing["total_ms"].as_f64().unwrap() > 0.0, "{timing}");
    assert!(timing.get("completion_tokens").is_none(), "{timing}");

    // Chinese, in a conversation of its own (after English turns this model answers in English).
    let mut chinese = customer(&hub, "tenant=chat&user=li").await;
    let (_, zh) = chinese.ask("m1", "请用中文回答：你好吗？").await;
    assert_eq!(zh.done["fallback"], false, "{}", zh.done);
    let text = zh.text();
    assert!(!text.contains('\u{fffd}') && text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)), "{text:?}");
}

#[tokio::test]
async fn cancelling_or_leaving_stops_generation_on_the_model_server() {
    let llama = LlamaServer::start().await;
    let bridge = NlpProcess::start_with_config(&bridge_config(&llama.base_url)).await;
    let hub = Hub::start(&[
        "--nlp-url",
        &bridge.url,
        "--nlp-first-chunk-timeout-ms",
        FIRST_CHUNK_MS,
        "--reply-grace-ms",
        "200",
    ])
    .await;

    // The customer cancels a 4,000-token answer after two tokens.
    let mut client = customer(&hub, "tenant=long&user=bob").await;
    client.send_message("m1", "Tell me a long story.").await;
    client.expect("ack").await;
    let delta = client.expect("reply.delta").await;
    client.expect("reply.delta").await;
    cancel(&mut client, &delta).await;
    llama.wait_disconnects(1).await;

    // The one-slot server is free at once: another tenant's answer is not
    // stuck behind the rest of the cancelled one. Its 3,998 tokens would take
    // about 45 s on an idle core, and longer on a busy one; the short answer
    // takes 0.2 s on an idle core.
    let started = Instant::now();
    let mut other = customer(&hub, "tenant=chat&user=carol").await;
    let (_, reply) = other.ask("m1", "What is 2+2? Answer with one number.").await;
    assert_eq!(reply.done["fallback"], false, "{}", reply.done);
    assert!(started.elapsed() < Duration::from_secs(20), "the model was still busy: {:?}", started.elapsed());

    // The customer closes the widget mid-answer: past the reply grace the
    // reply is cancelled, and the model server stops too.
    let mut leaving = customer(&hub, "tenant=long&user=dave").await;
    leaving.send_message("m1", "Tell me a long story.").await;
    leaving.expect("ack").await;
    leaving.expect("reply.delta").await;
    drop(leaving);
    llama.wait_disconnects(2).await;
    assert_eq!(llama.disconnects(), 2);
}

#[tokio::test]
async fn a_model_server_killed_mid_stream_leaves_an_interrupted_reply() {
    let mut llama = LlamaServer::start().await;
    let bridge = NlpProcess::start_with_config(&bridge_config(&llama.base_url)).await;
    let hub = hub(&bridge).await;
    let mut client = customer(&hub, "tenant=long&user=erin").await;
    let (conversation, epoch) = (client.conversation(), client.ready["epoch"].as_str().unwrap().to_owned());
    client.send_message("m1", "Tell me a long story.").await;
    client.expect("ack").await;
    client.expect("reply.delta").await;
    client.expect("reply.delta").await;
    llama.kill().await;
    let done = loop {
        let frame = client.next().await;
        if frame["type"] == "reply.done" {
            break frame;
        }
    };
    assert_eq!((done["interrupted"].clone(), done["fallback"].clone()), (json!(true), json!(true)), "{done}");
    // The bridge logged the broken stream (its log is read as it comes).
    bridge.wait_log_lines("backend failed", 1).await;

    // Stored with its marker: a reconnecting client replays it so.
    let query = format!("tenant=long&user=erin&conversation={conversation}&after=0&epoch={epoch}");
    let mut back = customer(&hub, &query).await;
    back.expect("message").await;
    let stored = back.expect("message").await;
    assert_eq!((stored["from"].clone(), stored["interrupted"].clone()), (json!("assistant"), json!(true)), "{stored}");
    assert_eq!(stored["text"], done["text"]);
}

#[tokio::test]
async fn a_model_server_slow_to_start_gets_the_fallback_until_it_listens() {
    // The bridge and the hub start first; the model server is still loading.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bridge = NlpProcess::start_with_config(&bridge_config(&format!("http://127.0.0.1:{port}/v1"))).await;
    let hub = hub(&bridge).await;
    let mut client = customer(&hub, "tenant=chat&user=frank").await;
    let started = Instant::now();
    let (_, early) = client.ask("m1", "What is 2+2? Answer with one number.").await;
    assert_eq!(early.done["fallback"], true, "{}", early.done);
    assert!(early.text().starts_with("Sorry"), "{}", early.text());
    assert!(started.elapsed() < STEP_TIMEOUT, "the customer is told promptly: {:?}", started.elapsed());
    let log = bridge.logs();
    assert!(log.contains("backend failed") && log.contains("backend unavailable"), "the bridge says why: {log}");

    // Once the model listens, the same bridge and hub answer, no restart.
    let _llama = LlamaServer::start_on(port).await;
    let (_, later) = client.ask("m2", "What is 2+2? Answer with one number.").await;
    assert_eq!(later.done["fallback"], false, "{}", later.done);
    assert!(!later.text().starts_with("Sorry"), "{}", later.text());
}

/// Tenant `acme`'s knowledge base: a fact no model can know, and an entry
/// the question does not match.
const KNOWLEDGE: &str = r#"{ "version": 1, "entries": [
  { "id": "acme-code-word", "tenant": "acme", "lang": "en",
    "question": "What is the code word for the Zephyr account?",
    "keywords": ["code word", "zephyr", "password"],
    "answer": "The code word for the Zephyr account is PERIWINKLE-42." },
  { "id": "acme-hours", "tenant": "acme", "lang": "en",
    "question": "When are you open?",
    "keywords": ["opening hours", "open", "hours"],
    "answer": "We are open from 9 am to 5 pm, Monday to Friday." }
] }"#;

#[tokio::test]
async fn a_grounded_answer_carries_the_tenants_knowledge_and_a_tenant_without_any_gets_the_plain_prompt() {
    let llama = LlamaServer::start().await;
    let knowledge = std::env::temp_dir().join(format!("fengda-llm-knowledge-{}.json", std::process::id()));
    std::fs::write(&knowledge, KNOWLEDGE).unwrap();
    // Two backends alike but for the knowledge section, greedy and seeded:
    // the same prompt gets the same answer, token for token.
    let backend = |name: &str| {
        format!(
            r#"
            [backends.{name}]
            kind = "openai"
            base_url = "{}"
            model = "smollm2"
            max_tokens = 24
            temperature = 0.0
            extra_body = {{ seed = 7 }}
            system_prompt = "Be brief."
            timeout_ms = 20000
            idle_timeout_ms = 10000
            "#,
            llama.base_url
        )
    };
    let config = format!(
        "default_backend = \"grounded\"\n{}\n[backends.grounded.knowledge]\npath = \"{}\"\n{}\n[tenants]\nplain = \"plain\"\n",
        backend("grounded"),
        knowledge.display(),
        backend("plain"),
    );
    let bridge = NlpProcess::start_with_config(&config).await;
    let hub = hub(&bridge).await;
    let question = "What is the code word for the Zephyr account?";
    let ask = async |tenant: &str| {
        let mut client = customer(&hub, &format!("tenant={tenant}&user=u")).await;
        let (_, reply) = client.ask("m1", question).await;
        assert_eq!(reply.done["fallback"], false, "{tenant}: {}", reply.done);
        assert!(reply.deltas.len() >= 3, "{tenant}: streamed token by token: {:?}", reply.deltas);
        reply.text().to_owned()
    };

    // The tenant whose knowledge base has the fact: the model repeats it.
    let grounded = ask("acme").await;
    assert!(grounded.contains("PERIWINKLE-42"), "{grounded:?}");
    // A tenant with no entries, on the same grounded backend: not a trace
    // of it, and the very answer of the backend without a knowledge base,
    // so its prompt was the plain one (any context would change it).
    let other = ask("other").await;
    assert!(!other.contains("PERIWINKLE"), "{other:?}");
    let plain = ask("plain").await;
    assert_eq!(other, plain, "the tenant without knowledge got the plain prompt");
    assert_eq!(llama.completions(), [200, 200, 200]);
    std::fs::remove_file(knowledge).unwrap();
}

#[tokio::test]
async fn one_tenant_cannot_take_a_second_model_slot_nor_any_tenant_one_past_the_backends_limit() {
    let llama = LlamaServer::start().await;
    // Answers the model does not end before 1,500 tokens (each is cancelled
    // after its first tokens): `shared` takes one per tenant, `solo` one at all.
    let backend = |name: &str, limit: &str| {
        format!(
            r#"
            [backends.{name}]
            kind = "openai"
            base_url = "{}"
            model = "smollm2"
            max_tokens = 1500
            extra_body = {{ min_tokens = 1500 }}
            timeout_ms = 20000
            idle_timeout_ms = 10000
            {limit}
            "#,
            llama.base_url
        )
    };
    let config = format!(
        "default_backend = \"shared\"\n{}\n{}\n[tenants]\nc = \"solo\"\nd = \"solo\"\n",
        backend("shared", "max_concurrent_per_tenant = 1"),
        backend("solo", "max_concurrent = 1"),
    );
    let bridge = NlpProcess::start_with_config(&config).await;
    let hub = Hub::start(&[
        "--nlp-url",
        &bridge.url,
        "--nlp-first-chunk-timeout-ms",
        FIRST_CHUNK_MS,
        "--nlp-retry-max-attempts",
        "3",
    ])
    .await;
    let connect = async |tenant: &str, user: &str| customer(&hub, &format!("tenant={tenant}&user={user}")).await;
    let story = "Tell me a long story.";

    // Tenant a's answer has the model.
    let mut a1 = connect("a", "a1").await;
    a1.send_message("m1", story).await;
    a1.expect("ack").await;
    let a1_delta = a1.expect("reply.delta").await;
    // Tenant b's question reaches the model server, and waits there for its turn.
    let mut b1 = connect("b", "b1").await;
    b1.send_message("m1", story).await;
    b1.expect("ack").await;
    llama.wait_completions(2).await;
    // Tenant a's second question, meanwhile: refused by the bridge at once,
    // on each of the hub's three attempts, and answered with the fallback;
    // it never reaches the model server.
    let mut a2 = connect("a", "a2").await;
    let (_, refused) = a2.ask("m1", story).await;
    assert_eq!(refused.done["fallback"], true, "{}", refused.done);
    bridge.wait_log_lines("backend shared is at its max_concurrent_per_tenant", 3).await;
    assert_eq!(hub.metric("fengda_hub_nlp_retries_total").await, 2.0);
    assert_eq!(hub.metric("fengda_hub_nlp_fallbacks_total{reason=\"error\"}").await, 1.0);
    assert_eq!(llama.completions().len(), 2);
    // a1 ends, and b's answer gets the model.
    cancel(&mut a1, &a1_delta).await;
    llama.wait_disconnects(1).await;
    let b1_delta = b1.expect("reply.delta").await;
    cancel(&mut b1, &b1_delta).await;
    llama.wait_disconnects(2).await;

    // The per-backend limit: tenant c's answer has `solo`'s one slot, so
    // tenant d's question is refused (on each attempt) until it ends.
    let mut c1 = connect("c", "c1").await;
    c1.send_message("m1", story).await;
    c1.expect("ack").await;
    let c1_delta = c1.expect("reply.delta").await;
    let mut d1 = connect("d", "d1").await;
    let (_, refused) = d1.ask("m1", story).await;
    assert_eq!(refused.done["fallback"], true, "{}", refused.done);
    bridge.wait_log_lines("backend solo is at its max_concurrent", 3).await;
    assert_eq!(hub.metric("fengda_hub_nlp_retries_total").await, 4.0);
    assert_eq!(llama.completions().len(), 3);
    cancel(&mut c1, &c1_delta).await;
    llama.wait_disconnects(3).await;
    d1.send_message("m2", story).await;
    d1.expect("ack").await;
    let d1_delta = d1.expect("reply.delta").await;
    cancel(&mut d1, &d1_delta).await;
    llama.wait_disconnects(4).await;

    // The model server answered exactly the four admitted questions.
    assert_eq!(llama.completions(), [200; 4]);
    assert_eq!(bridge.logs().matches("answer refused at the backend's limit").count(), 6);
}

#[tokio::test]
async fn the_request_id_goes_upstream_as_configured_per_backend() {
    let llama = LlamaServer::start().await;
    let backend = |name: &str, header: &str| {
        format!(
            r#"
            [backends.{name}]
            kind = "openai"
            base_url = "{}"
            model = "smollm2"
            max_tokens = 4
            temperature = 0.0
            timeout_ms = 20000
            {header}
            "#,
            llama.base_url
        )
    };
    let config = format!(
        "default_backend = \"forwarded\"\n{}{}{}\n[tenants]\nrenamed = \"renamed\"\ndropped = \"dropped\"\n",
        backend("forwarded", ""),
        backend("renamed", "request_id_header = \"x-fengda-request-id\""),
        backend("dropped", "request_id_header = false"),
    );
    let bridge = NlpProcess::start_with_config(&config).await;
    let ok = |items: &[Result<AnswerChunk, Status>]| items.iter().all(Result::is_ok) && items.len() >= 2;

    // The default forwards it as x-request-id: a UUID passes, another id
    // gets the model server's 400, which the caller gets as INVALID_ARGUMENT.
    assert!(ok(&call(&bridge, "forwarded", "Say hi.", UUID).await));
    let refused = call(&bridge, "forwarded", "Say hi.", "req-1").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].as_ref().unwrap_err().code(), Code::InvalidArgument, "{refused:?}");
    bridge.wait_log_lines("upstream refused the request status=400", 1).await;
    // Renamed or turned off, the same id does not bother it.
    assert!(ok(&call(&bridge, "renamed", "Say hi.", "req-1").await));
    assert!(ok(&call(&bridge, "dropped", "Say hi.", "req-1").await));
    assert_eq!(llama.completions(), [200, 400, 200, 200]);
}

#[tokio::test]
async fn an_answer_the_model_server_cuts_short_for_another_request_ends_interrupted() {
    // llama-cpp-python's default: a request that arrives ends the answer in
    // flight with `[DONE]` and no finish reason.
    let llama = LlamaServer::start_interrupting().await;
    let bridge = NlpProcess::start_with_config(&bridge_config(&llama.base_url)).await;
    let hub = hub(&bridge).await;
    let mut long = customer(&hub, "tenant=long&user=gina").await;
    long.send_message("m1", "Tell me a long story.").await;
    long.expect("ack").await;
    long.expect("reply.delta").await;
    long.expect("reply.delta").await;

    let mut other = customer(&hub, "tenant=chat&user=hank").await;
    let (_, reply) = other.ask("m1", "What is 2+2? Answer with one number.").await;
    assert_eq!(reply.done["fallback"], false, "{}", reply.done);
    // The cut-short answer is not passed off as whole: the customer keeps
    // its text plus the fallback, marked interrupted.
    let done = loop {
        let frame = long.next().await;
        if frame["type"] == "reply.done" {
            break frame;
        }
    };
    assert_eq!((done["interrupted"].clone(), done["fallback"].clone()), (json!(true), json!(true)), "{done}");
    bridge.wait_log_lines("upstream ended the answer without a finish reason", 1).await;
    assert_eq!(llama.completions(), [200, 200]);
}
