//! Documented behaviours that no other test pinned down: how a reply ends
//! when its tokens stop coming or its customer cancels it while it waits in
//! line, the log cap on Redis, and a socket connecting while Redis is down.

use std::time::Duration;

use fengda_tests::{Client, Hub, RecordingAnswerer, RedisServer, STEP_TIMEOUT, Script};

#[tokio::test]
async fn a_stream_that_stops_sending_tokens_ends_as_interrupted_after_the_token_gap() {
    // Two tokens, then a pause far longer than the hub's token-gap timeout.
    let answerer =
        RecordingAnswerer::start(Script { tokens: 3, token_delay: Duration::from_secs(30), ..Script::default() }).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-token-gap-timeout-ms", "300"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=gap")).await;
    let started = tokio::time::Instant::now();
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    let took = started.elapsed();
    assert_eq!((reply.done["fallback"].as_bool(), reply.done["interrupted"].as_bool()), (Some(true), Some(true)));
    let text = reply.text();
    assert!(text.starts_with("tok0 \n\n"), "the streamed token, then the fallback sentence: {text:?}");
    assert!(took < Duration::from_secs(5), "ended by the 300 ms gap, not the 30 s pause: {took:?}");
    // Stored as exactly one answer event.
    let mut replay =
        Client::connect(&hub.ws_url(&format!("tenant=demo&user=gap&conversation={}&after=0", client.conversation())))
            .await;
    let (question, answer) = (replay.expect("message").await, replay.expect("message").await);
    assert_eq!((question["from"].as_str(), answer["from"].as_str()), (Some("customer"), Some("assistant")));
    assert_eq!(answer["text"], text);
    assert_eq!(replay.ready["seq"], 2);
}

#[tokio::test]
async fn a_reply_cancelled_while_waiting_in_line_is_stored_empty_and_never_reaches_the_nlp_service() {
    // One slot, held for a while by the first customer.
    let answerer =
        RecordingAnswerer::start(Script { first_chunk_delay: Duration::from_millis(700), ..Script::default() }).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "1"]).await;
    let mut first = Client::connect(&hub.ws_url("tenant=demo&user=holder")).await;
    first.send_message("m1", "Tell me about the Gold Card").await;
    first.expect("ack").await;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while answerer.requests().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the first question reaches the answerer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut waiting = Client::connect(&hub.ws_url("tenant=demo&user=waiter")).await;
    waiting.send_message("m1", "Tell me about the Gold Card").await;
    waiting.expect("ack").await;
    let queued = waiting.expect("queued").await;
    assert_eq!(queued["position"], 1, "{queued}");
    waiting.send_json(serde_json::json!({ "type": "cancel", "reply": queued["reply"] })).await;
    let done = waiting.expect("reply.done").await;
    assert_eq!(done["reply"], queued["reply"]);
    assert_eq!((done["cancelled"].as_bool(), done["text"].as_str()), (Some(true), Some("")), "{done}");

    // The slot's holder is answered; the cancelled question never was sent.
    let reply = first.read_reply().await;
    assert_eq!(reply.done["fallback"], false);
    assert_eq!(answerer.requests().len(), 1, "only the first question reached the NLP service");
}

#[tokio::test]
async fn the_log_cap_keeps_the_newest_events_on_redis_too() {
    let redis = RedisServer::start().await;
    let hub = Hub::start_node(&redis, &["--log-cap", "4"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=capped")).await;
    for i in 0..3 {
        client.ask(&format!("m{i}"), "Tell me about the Gold Card").await;
    }
    // Six events (three questions, three replies); only the newest four are kept.
    let url = hub.ws_url(&format!("tenant=demo&user=capped&conversation={}&after=0", client.conversation()));
    let mut replay = Client::connect(&url).await;
    assert_eq!(replay.ready["seq"], 6);
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(replay.expect("message").await["seq"].as_u64().unwrap());
    }
    assert_eq!(replayed, [3, 4, 5, 6]);
    replay.assert_alive().await;
    let stored = redis.cli(&["LLEN", &redis_log_key(&redis, &client.conversation()).await]).await;
    assert_eq!(stored.trim(), "4");
}

/// The name of the conversation's log list, found by pattern (the test does
/// not rebuild the naming rule: it checks what is stored).
async fn redis_log_key(redis: &RedisServer, conversation: &str) -> String {
    let found = redis.cli(&["--scan", "--pattern", &format!("*{conversation}*log*")]).await;
    let keys: Vec<_> = found.lines().filter(|line| !line.is_empty()).collect();
    assert_eq!(keys.len(), 1, "one log key for the conversation: {keys:?}");
    keys[0].to_owned()
}

#[tokio::test]
async fn a_socket_connecting_while_redis_is_down_gets_unavailable_and_4503() {
    let mut redis = RedisServer::start().await;
    let hub = Hub::start_node(&redis, &[]).await;
    redis.kill().await;
    let mut client = Client::connect_unready(&hub.ws_url("tenant=demo&user=early")).await;
    let error = client.expect("error").await;
    assert_eq!(error["code"], "unavailable", "{error}");
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4503);
}
