//! The hub and the NLP service over real gRPC: what the hub sends, and how
//! it behaves when the service is slow, gone, or a separate process.

use std::time::Duration;

use fengda_proto::nlp::v1::Role;
use fengda_tests::{Client, Hub, NlpProcess, RecordingAnswerer, Script};

#[tokio::test]
async fn each_question_reaches_the_nlp_service_with_the_last_n_turns() {
    let answerer = RecordingAnswerer::start(Script::default()).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--history-turns", "3"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=bank-a&user=history")).await;
    let conversation = client.conversation();
    let mut replies = Vec::new();
    for (i, question) in ["first question", "second question", "third question"].iter().enumerate() {
        let (_, reply) = client.ask(&format!("m{i}"), question).await;
        assert_eq!(reply.text(), "tok0 tok1 tok2 tok3 tok4 ", "the scripted answer, relayed exactly");
        replies.push(reply.text().to_owned());
    }
    let requests = answerer.requests();
    assert_eq!(requests.len(), 3, "one call per question");
    for request in &requests {
        assert_eq!(request.tenant_id, "bank-a");
        assert_eq!(request.conversation_id, conversation);
        assert!(!request.request_id.is_empty());
    }
    assert_eq!(requests[0].question, "first question");
    assert!(requests[0].history.is_empty(), "nothing before the first question");

    let second: Vec<_> = requests[1].history.iter().map(|t| (t.role, t.text.as_str())).collect();
    assert_eq!(second, [(Role::Customer as i32, "first question"), (Role::Assistant as i32, replies[0].as_str())]);

    // Four turns precede the third question; --history-turns 3 keeps the newest three.
    let third: Vec<_> = requests[2].history.iter().map(|t| (t.role, t.text.as_str())).collect();
    assert_eq!(
        third,
        [
            (Role::Assistant as i32, replies[0].as_str()),
            (Role::Customer as i32, "second question"),
            (Role::Assistant as i32, replies[1].as_str()),
        ]
    );
    assert_eq!(requests[2].question, "third question");
}

#[tokio::test]
async fn a_slow_first_chunk_gets_the_polite_fallback() {
    // The answer never comes: any reply is the hub's own, at its deadline.
    let never = Duration::from_secs(3600);
    let answerer = RecordingAnswerer::start(Script { first_chunk_delay: never, ..Script::default() }).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-first-chunk-timeout-ms", "300"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=slow")).await;
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], true);
    assert!(reply.text().starts_with("Sorry"), "{}", reply.text());
    assert_eq!(reply.done["seq"], 2, "the fallback is stored like any reply");

    let (_, chinese) = client.ask("m2", "金卡年费多少").await;
    assert_eq!(chinese.done["fallback"], true);
    assert!(chinese.text().contains("抱歉"), "{}", chinese.text());
}

#[tokio::test]
async fn an_unreachable_nlp_service_gets_the_fallback_and_the_hub_keeps_serving() {
    // Reserve a port, then free it: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let hub = Hub::start(&["--nlp-url", &url]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=down")).await;
    for i in 0..2 {
        let (_, reply) = client.ask(&format!("m{i}"), "Hello?").await;
        assert_eq!(reply.done["fallback"], true);
    }
    client.assert_alive().await;
}

#[tokio::test]
async fn a_customer_gone_for_the_whole_reply_grace_cancels_the_nlp_stream() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 200, token_delay: Duration::from_millis(20), ..Script::default() })
            .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--reply-grace-ms", "300"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=leaver")).await;
    client.send_message("m1", "Tell me a long story").await;
    client.expect("ack").await;
    let first = client.expect("reply.delta").await;
    assert_eq!(first["index"], 0);
    // Taken before the socket goes, so the hub's grace starts after it: a
    // slow machine only makes the measured time longer, never shorter than
    // the grace, which is what this bound is about.
    let left = std::time::Instant::now();
    drop(client);
    answerer.wait_cancelled(1).await;
    assert!(left.elapsed() >= Duration::from_millis(300), "cancelled before the grace: {:?}", left.elapsed());
}

#[tokio::test]
async fn the_hub_answers_through_an_external_fengda_nlp_process() {
    let nlp = NlpProcess::start(&["--first-token-delay-ms", "0", "--tokens-per-second", "0"]).await;
    let hub = Hub::start(&["--nlp-url", &nlp.url]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=external")).await;
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], false);
    assert!(reply.text().contains("Gold Card"), "{}", reply.text());
    assert!(reply.deltas.len() >= 3);
    let (_, follow_up) = client.ask("m2", "And how much does it cost?").await;
    assert!(follow_up.text().contains("Gold Card"), "context crosses the process boundary: {}", follow_up.text());
}

#[tokio::test]
async fn a_reply_outlives_the_asking_socket_while_another_socket_listens() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 30, token_delay: Duration::from_millis(10), ..Script::default() })
            .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url]).await;
    let mut phone = Client::connect(&hub.ws_url("tenant=demo&user=two-devices")).await;
    // A conversation exists, and can be joined by id, from its first message on.
    phone.ask("m0", "Hello").await;
    let conversation = phone.conversation();
    let mut laptop =
        Client::connect(&hub.ws_url(&format!("tenant=demo&user=two-devices&conversation={conversation}"))).await;
    phone.send_message("m1", "Tell me a story").await;
    phone.expect("ack").await;
    phone.expect("reply.delta").await;
    drop(phone);

    // The laptop still gets the whole reply, and it is stored.
    assert_eq!(laptop.expect("message").await["id"], "m1");
    let reply = laptop.read_reply().await;
    assert_eq!(reply.deltas.len(), 30);
    assert_eq!(reply.done["seq"], 4);
    assert_eq!(answerer.cancelled(), 0, "the answer was not cancelled while someone listened");
}

#[tokio::test]
async fn a_client_that_asks_gets_where_the_time_of_each_reply_went() {
    let answerer =
        RecordingAnswerer::start(Script { first_chunk_delay: Duration::from_millis(100), ..Script::default() }).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--allow-timing"]).await;
    let mut timed = Client::connect(&hub.ws_url("tenant=demo&user=timed&timing=1")).await;
    let (_, reply) = timed.ask("m1", "Tell me about the Gold Card").await;
    let timing = &reply.done["timing"];
    let field = |name: &str| timing[name].as_f64().unwrap_or_else(|| panic!("timing.{name} missing: {timing}"));
    assert!(field("nlp_first_token_ms") >= 100.0, "the model's 100 ms is the NLP's share: {timing}");
    assert!(field("hub_before_nlp_ms") < field("nlp_first_token_ms"), "{timing}");
    assert!(field("total_ms") >= field("nlp_first_token_ms"));
    assert!(field("relay_max_us") >= field("relay_mean_us"));
    assert_eq!(field("queue_ms"), field("queue_ms").max(0.0));

    let mut plain = Client::connect(&hub.ws_url("tenant=demo&user=untimed")).await;
    let (_, reply) = plain.ask("m1", "Tell me about the Gold Card").await;
    assert!(reply.done.get("timing").is_none(), "no timing unless asked: {}", reply.done);
}

#[tokio::test]
async fn the_in_process_answerer_takes_as_many_calls_as_the_hub_admits() {
    // More answers at once than the answer service's own default limit (256):
    // each holds its call for a second, so all of them overlap (checked below
    // from the answer service's own log of calls starting and finishing).
    let hub = Hub::start_logging(
        "info,fengda_nlp::service=debug",
        &[
            "--nlp-max-concurrent",
            "300",
            "--answerer-first-token-delay-ms",
            "1000",
            "--answerer-tokens-per-second",
            "0",
        ],
    )
    .await;
    let customers = 280;
    let urls: Vec<_> = (0..customers).map(|i| hub.ws_url(&format!("tenant=demo&user=many-{i}"))).collect();
    let mut clients = futures::future::join_all(urls.iter().map(|url| Client::connect(url))).await;
    for client in &mut clients {
        client.send_message("m1", "Tell me about the Gold Card").await;
    }
    let replies = futures::future::join_all(clients.iter_mut().map(|client| async move {
        client.expect("ack").await;
        client.read_reply().await
    }))
    .await;
    let fallbacks = replies.iter().filter(|reply| reply.done["fallback"] == true).count();
    assert_eq!(fallbacks, 0, "every question within the hub's slots gets its answer");
    // In the order the answer service logged them: every call started before the first one finished.
    let calls = answer_service_log(&hub, customers).await;
    let first_finish = calls.iter().position(|started| !started).expect("a call finished");
    let started_late = calls[first_finish..].iter().filter(|started| **started).count();
    assert_eq!((first_finish, started_late), (customers, 0), "not all {customers} calls overlapped");
}

/// The in-process answer service's calls as it logged them (at debug level),
/// in order: `true` for a call starting, `false` for one finishing. Waits
/// until `calls` have finished.
async fn answer_service_log(hub: &Hub, calls: usize) -> Vec<bool> {
    let deadline = std::time::Instant::now() + fengda_tests::STEP_TIMEOUT;
    loop {
        let logs = hub.logs();
        let events: Vec<bool> = logs
            .lines()
            .filter_map(|line| match line {
                _ if line.contains("answer started") => Some(true),
                _ if line.contains("answer finished") => Some(false),
                _ => None,
            })
            .collect();
        if events.iter().filter(|started| !**started).count() >= calls {
            return events;
        }
        assert!(std::time::Instant::now() < deadline, "the answer service logged {} events", events.len());
        // Pacing while the log is copied, not a wait for the event itself.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_answer_past_the_whole_answer_deadline_is_completed_as_interrupted() {
    // 40 tokens at 5 per second take 8 s; the deadline is 1.5 s. The
    // in-process answerer reads no grpc-timeout: the hub itself must stop it.
    let hub = Hub::start(&[
        "--nlp-reply-timeout-ms",
        "1500",
        "--answerer-first-token-delay-ms",
        "0",
        "--answerer-tokens-per-second",
        "5",
    ])
    .await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=deadline")).await;
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], true, "{}", reply.done);
    assert_eq!(reply.done["interrupted"], true, "{}", reply.done);
    // Stopped at the deadline, not at the end: the answer's pieces, then the fallback's one.
    let streamed = reply.deltas.len() - 1;
    assert!((1..40).contains(&streamed), "{streamed} of the answer's 40 pieces: {}", reply.done);
}
