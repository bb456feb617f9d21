//! The NLP path under failure: deadlines, retries, circuit breaker,
//! fallback, interruption, cancellation and admission, over real gRPC.

use std::time::Duration;

use fengda_tests::{Client, Hub, InProcessHub, NlpProcess, RecordingAnswerer, Script, metric_value};
use serde_json::json;
use tokio::time::Instant;

async fn metrics(hub: &Hub) -> String {
    hub.metrics().await
}

/// A hub config answering through `answerer`, as `--nlp-url` would.
fn through(answerer: &RecordingAnswerer) -> fengda::Config {
    let mut config = fengda::Config::default();
    config.nlp.url = Some(answerer.url.clone());
    config
}

// In-process on paused time: the first-token deadline and the breaker's open
// time are what is tested, so they are measured on the hub's own clock
// (exactly, however loaded the machine).
#[tokio::test(start_paused = true)]
async fn a_silent_bridge_gets_fallbacks_then_the_breaker_opens_then_recovers() {
    let answerer =
        RecordingAnswerer::start(Script { first_chunk_delay: Duration::from_secs(60), ..Script::default() }).await;
    let mut config = through(&answerer);
    config.nlp.first_chunk_timeout_ms = 1000;
    config.nlp.breaker_consecutive_failures = 2;
    config.nlp.breaker_open_ms = 800;
    let hub = InProcessHub::start(config).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=silent-bridge")).await;
    for i in 0..2 {
        let started = Instant::now();
        let (_, reply) = client.ask(&format!("m{i}"), "Tell me about the Gold Card").await;
        assert_eq!(reply.done["fallback"], true);
        assert_eq!(reply.done["interrupted"], false);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1000), "waited for the first-token deadline: {took:?}");
        assert!(took < Duration::from_millis(1100), "and not much longer: {took:?}");
    }
    assert_eq!(answerer.requests().len(), 2);

    // Open: the fallback comes at once (no time passes on the hub's clock) and the bridge is not called.
    let opened = Instant::now();
    let (_, reply) = client.ask("m2", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], true);
    assert_eq!(opened.elapsed(), Duration::ZERO, "no waiting while open");
    assert_eq!(answerer.requests().len(), 2, "an open breaker does not call the bridge");
    assert!(hub.metrics().await.contains(r#"reason="breaker_open""#));

    // The bridge heals; the breaker stays open for its 800 ms, then a probe goes through and closes it.
    answerer.set_script(Script::default());
    tokio::time::sleep_until(opened + Duration::from_millis(700)).await;
    let (_, reply) = client.ask("m3", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], true, "still open before breaker_open_ms: {}", reply.done);
    assert_eq!(answerer.requests().len(), 2);
    tokio::time::sleep_until(opened + Duration::from_millis(800)).await;
    // Real answers from here: a gRPC answer's round trip is not seen as work
    // by the paused clock, which would jump to the hub's deadline meanwhile.
    tokio::time::resume();
    for i in 4..6 {
        let (_, reply) = client.ask(&format!("m{i}"), "Tell me about the Gold Card").await;
        assert_eq!(reply.done["fallback"], false, "healthy again: {}", reply.done);
    }
    assert_eq!(answerer.requests().len(), 4);
    hub.stop().await;
}

#[tokio::test]
async fn errors_before_the_first_token_are_retried_into_one_clean_answer() {
    let answerer = RecordingAnswerer::start(Script { fail_first: 2, ..Script::default() }).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=retried")).await;
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], false);
    assert_eq!(reply.text(), "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(answerer.requests().len(), 3, "two refusals, one answer");
    // Exactly one answer: the next frames belong to the next question.
    let (ack, _) = client.ask("m2", "Again").await;
    assert_eq!(ack["seq"], 3);
    let metrics = metrics(&hub).await;
    assert_eq!(metric_value(&metrics, "fengda_hub_nlp_retries_total"), 2.0);
    // Where each reply's time went: the hub's share before the model, and the model's first token.
    assert_eq!(metric_value(&metrics, "fengda_hub_reply_before_nlp_seconds_count"), 2.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "fengda_hub_nlp_first_token_seconds_count"), 2.0, "{metrics}");
    // ...and after it: frames handed to the router until written to the socket, once per write.
    let writes = metric_value(&metrics, "fengda_hub_frame_delivery_seconds_count");
    assert!(writes >= 4.0, "acks, deltas and reply.done went out in several writes: {writes}");
}

#[tokio::test]
async fn invalid_argument_is_not_retried() {
    let answerer = RecordingAnswerer::start(Script {
        fail_first: 1,
        fail_code: tonic::Code::InvalidArgument,
        ..Script::default()
    })
    .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=not-retried")).await;
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], true);
    assert_eq!(answerer.requests().len(), 1);
}

#[tokio::test]
async fn a_bridge_killed_mid_stream_interrupts_the_reply_and_the_next_goes_elsewhere() {
    let mut slow = NlpProcess::start(&["--first-token-delay-ms", "0", "--tokens-per-second", "20"]).await;
    let fast = NlpProcess::start(&["--first-token-delay-ms", "0", "--tokens-per-second", "0"]).await;
    let endpoints = format!("{},{}", slow.url, fast.url);
    let hub = Hub::start(&["--nlp-url", &endpoints]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=killed")).await;
    client.send_message("m1", "Tell me about the Gold Card").await;
    client.expect("ack").await;
    client.expect("reply.delta").await;
    client.expect("reply.delta").await;
    slow.child.kill().await.unwrap();
    // read_reply checks the remaining deltas (indexes continue) add up to the done text.
    let mut rest = Vec::new();
    let done = loop {
        let frame = client.next().await;
        if frame["type"] == "reply.done" {
            break frame;
        }
        rest.push(frame);
    };
    assert_eq!(done["fallback"], true);
    assert_eq!(done["interrupted"], true);
    let text = done["text"].as_str().unwrap();
    assert!(text.contains("\n\nSorry"), "partial answer, then the fallback sentence: {text}");
    assert_eq!(rest.last().unwrap()["index"].as_u64().unwrap() as usize, rest.len() + 1, "indexes stay contiguous");

    let (_, next) = client.ask("m2", "And how much does it cost?").await;
    assert_eq!(next.done["fallback"], false, "the second endpoint answers: {}", next.done);
    assert!(next.text().contains("Gold Card"));
}

#[tokio::test]
async fn a_cancel_frame_stops_the_reply_and_the_bridge() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 200, token_delay: Duration::from_millis(20), ..Script::default() })
            .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=canceller")).await;
    client.send_message("m1", "Tell me a long story").await;
    client.expect("ack").await;
    let first = client.expect("reply.delta").await;
    client.send_json(json!({"type": "cancel", "reply": first["reply"]})).await;
    let mut deltas = vec![first];
    let done = loop {
        let frame = client.next().await;
        if frame["type"] == "reply.done" {
            break frame;
        }
        deltas.push(frame);
    };
    assert_eq!(done["cancelled"], true);
    assert_eq!(done["fallback"], false);
    let joined: String = deltas.iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert_eq!(done["text"], joined.as_str());
    assert!(deltas.len() < 200);
    let deadline = Instant::now() + Duration::from_secs(2);
    while answerer.cancelled() == 0 {
        assert!(Instant::now() < deadline, "the bridge never saw the cancellation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A cancel for an unknown or finished reply is ignored.
    client.send_json(json!({"type": "cancel", "reply": "r-nope"})).await;
    client.assert_alive().await;
}

#[tokio::test]
async fn an_answer_past_the_reply_cap_is_cut_there_and_ended_with_the_fallback() {
    // 2,000 tokens of about 8 bytes, still streaming when the cap is reached.
    let script = Script { tokens: 2000, token_delay: Duration::from_millis(1), ..Script::default() };
    let answer: String = (0..script.tokens).map(|i| format!("tok{i} ")).collect();
    let answerer = RecordingAnswerer::start(script).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-reply-bytes", "1000"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=runaway")).await;
    // `ask` checks that the deltas add up to the `reply.done` text.
    let (_, reply) = client.ask("m1", "Tell me everything").await;
    assert_eq!((reply.done["fallback"].as_bool(), reply.done["interrupted"].as_bool()), (Some(true), Some(true)));
    let text = reply.text();
    let (cut, rest) = text.split_at(1000);
    assert_eq!(cut, &answer[..1000], "the answer up to the cap");
    assert!(rest.starts_with("\n\nSorry"), "then the fallback sentence: {rest:?}");
    // The service was told to stop; the cut is no failure of the endpoint.
    answerer.wait_cancelled(1).await;
    let metrics = metrics(&hub).await;
    assert_eq!(metric_value(&metrics, r#"fengda_hub_nlp_fallbacks_total{reason="too_long"}"#), 1.0);
    assert_eq!(metric_value(&metrics, r#"fengda_hub_nlp_calls_total{outcome="failed"}"#), 0.0);

    // Stored so: a replay has the same text.
    let query = format!(
        "tenant=demo&user=runaway&conversation={}&after=1&epoch={}",
        client.conversation(),
        client.ready["epoch"].as_str().unwrap()
    );
    let mut back = Client::connect(&hub.ws_url(&query)).await;
    let stored = back.expect("message").await;
    assert_eq!((stored["text"].as_str(), stored["interrupted"].as_bool()), (Some(text), Some(true)));
}

#[tokio::test]
async fn beyond_the_concurrency_limit_questions_queue_or_fall_back_and_none_hangs() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 5, token_delay: Duration::from_millis(80), ..Script::default() })
            .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "1", "--nlp-max-queued", "1"]).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(Client::connect(&hub.ws_url(&format!("tenant=demo&user=crowd{i}"))).await);
    }
    for client in &mut clients {
        client.send_message("m1", "Tell me about the Gold Card").await;
    }
    let mut fallbacks = 0;
    let mut queued_positions = Vec::new();
    for client in &mut clients {
        client.expect("ack").await;
        // A question waiting for a slot is told its place in line first.
        let mut frame = client.next().await;
        while frame["type"] == "queued" {
            queued_positions.push(frame["position"].as_u64().unwrap());
            frame = client.next().await;
        }
        let mut deltas = 0;
        while frame["type"] == "reply.delta" {
            deltas += 1;
            frame = client.next().await;
        }
        assert_eq!(frame["type"], "reply.done", "{frame}");
        assert!(deltas > 0);
        if frame["fallback"] == true {
            fallbacks += 1;
        }
    }
    assert_eq!(queued_positions, [1], "the waiting question saw its place in line");
    assert_eq!(fallbacks, 1, "one in flight, one queued and answered, one over the queue");
    let metrics = metrics(&hub).await;
    assert!(metrics.contains(r#"reason="overloaded""#));
    assert_eq!(metric_value(&metrics, "fengda_hub_nlp_queue_wait_seconds_count"), 1.0, "{metrics}");
}

#[tokio::test]
async fn fallback_texts_are_configurable_per_tenant_and_language() {
    let answerer =
        RecordingAnswerer::start(Script { fail_first: 100, fail_code: tonic::Code::Internal, ..Script::default() })
            .await;
    let dir = std::env::temp_dir().join(format!("fengda-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("fengda.toml");
    std::fs::write(&config, "[nlp.tenant_fallback.bank-a]\nen = \"Bank A is busy, sorry.\"\nzh = \"A银行繁忙。\"\n")
        .unwrap();
    let hub = Hub::start(&["--config", config.to_str().unwrap(), "--nlp-url", &answerer.url]).await;
    let mut bank_a = Client::connect(&hub.ws_url("tenant=bank-a&user=u1")).await;
    let (_, english) = bank_a.ask("m1", "Hello there").await;
    assert_eq!(english.text(), "Bank A is busy, sorry.");
    let (_, chinese) = bank_a.ask("m2", "你好，请问金卡年费多少").await;
    assert_eq!(chinese.text(), "A银行繁忙。");
    let mut other = Client::connect(&hub.ws_url("tenant=telco&user=u1")).await;
    let (_, default) = other.ask("m1", "Hello there").await;
    assert!(default.text().starts_with("Sorry, the system is busy"), "{}", default.text());
    std::fs::remove_dir_all(dir).unwrap();
}

/// When the client's pending reply finished (since `start`) and whether it was a fallback.
async fn reply_done(client: &mut Client, start: Instant) -> (Duration, bool) {
    loop {
        let frame = client.next().await;
        if frame["type"] == "reply.done" {
            return (start.elapsed(), frame["fallback"] == true);
        }
    }
}

#[tokio::test]
async fn a_bursting_tenant_does_not_starve_another_tenant() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 3, token_delay: Duration::from_millis(100), ..Script::default() })
            .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "1"]).await;
    // The burst is stored (acked) and waiting before the steady tenant asks:
    // one of bank-a's questions holds the only slot, three wait.
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut client = Client::connect(&hub.ws_url(&format!("tenant=bank-a&user=a{i}"))).await;
        client.send_message("m1", "Tell me about the Gold Card").await;
        client.expect("ack").await;
        clients.push(client);
    }
    let mut steady = Client::connect(&hub.ws_url("tenant=bank-b&user=b0")).await;
    steady.send_message("m1", "Tell me about the Gold Card").await;
    steady.expect("ack").await;
    // The line takes tenants in turn: bank-b is behind at most one of
    // bank-a's three waiting questions, not behind all of them.
    let frame = steady.next().await;
    assert_eq!(frame["type"], "queued", "{frame}");
    assert!(frame["position"].as_u64().is_some_and(|p| p <= 2), "bank-b waits for one of the burst at most: {frame}");
    let steady_reply = steady.read_reply().await;
    assert_eq!(steady_reply.done["fallback"], false, "{}", steady_reply.done);
    for client in &mut clients {
        let done = client.read_reply().await.done;
        assert_eq!(done["fallback"], false, "{done}");
    }
    // The answerer saw bank-b's call before bank-a's last ones.
    let order: Vec<String> = answerer.requests().into_iter().map(|request| request.tenant_id).collect();
    let steady_at = order.iter().position(|tenant| tenant == "bank-b").expect("bank-b was answered");
    assert!(steady_at <= 2, "bank-b waits for at most the calls running when it asked: {order:?}");
}

#[tokio::test]
async fn a_question_waiting_too_long_for_a_slot_gets_the_fallback() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 10, token_delay: Duration::from_millis(100), ..Script::default() })
            .await;
    let hub =
        Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "1", "--nlp-max-queue-wait-ms", "200"]).await;
    // w1 holds the only slot (its first token has come) before w2 asks.
    let mut w1 = Client::connect(&hub.ws_url("tenant=demo&user=w1")).await;
    assert_eq!(ask(&mut w1).await["type"], "reply.delta");
    let mut w2 = Client::connect(&hub.ws_url("tenant=demo&user=w2")).await;
    let start = Instant::now();
    assert_eq!(ask(&mut w2).await["type"], "queued");
    let second = reply_done(&mut w2, start).await;
    let first = reply_done(&mut w1, start).await;
    assert!(!first.1, "the first question is answered");
    assert!(second.1, "the second waited past the maximum and got the fallback");
    // w1's answer streams for 1 s; the fallback came after the 200 ms wait, not after it.
    assert!(second.0 < first.0, "the fallback came after the maximum wait, not after the first reply");
    assert!(metrics(&hub).await.contains(r#"reason="queue_timeout""#));
}

/// Asks the Gold Card question; returns the first frame after the ack.
async fn ask(client: &mut Client) -> serde_json::Value {
    client.send_message("m1", "Tell me about the Gold Card").await;
    client.expect("ack").await;
    client.next().await
}

#[tokio::test]
async fn a_tenant_at_its_share_of_slots_waits_while_another_tenant_starts_at_once() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 10, token_delay: Duration::from_millis(120), ..Script::default() })
            .await;
    let hub =
        Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "4", "--nlp-max-concurrent-per-tenant", "2"])
            .await;
    // bank-b has an answer streaming, so bank-a is held to its share of 2.
    let mut b0 = Client::connect(&hub.ws_url("tenant=bank-b&user=b0")).await;
    assert_eq!(ask(&mut b0).await["type"], "reply.delta");
    let mut bank_a = Vec::new();
    for i in 0..3 {
        bank_a.push(Client::connect(&hub.ws_url(&format!("tenant=bank-a&user=a{i}"))).await);
    }
    for client in &mut bank_a[..2] {
        assert_eq!(ask(client).await["type"], "reply.delta");
    }
    // bank-a's third question waits, although a slot of the node is free...
    let frame = ask(&mut bank_a[2]).await;
    assert_eq!(frame["type"], "queued", "{frame}");
    assert_eq!(frame["position"], 1);
    // ...which bank-b's next question takes at once.
    let mut b1 = Client::connect(&hub.ws_url("tenant=bank-b&user=b1")).await;
    let frame = ask(&mut b1).await;
    assert_eq!(frame["type"], "reply.delta", "bank-b is not queued behind bank-a: {frame}");
    // Every question is answered in the end, none with the fallback.
    for client in bank_a.iter_mut().chain([&mut b0, &mut b1]) {
        let done = loop {
            let frame = client.next().await;
            if frame["type"] == "reply.done" {
                break frame;
            }
            assert!(matches!(frame["type"].as_str(), Some("reply.delta" | "queued")), "{frame}");
        };
        assert_eq!(done["fallback"], false, "{done}");
    }
}
