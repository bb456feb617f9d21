//! Connection lifecycle: slow consumers, dead peers, keepalive, shutdown.

use std::time::Duration;

use fengda_tests::{Client, Hub, RecordingAnswerer, Script};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_a_slow_consumer() {
    // 20,000 chunks of ~1 KiB: far more than socket buffers plus an 8-frame queue hold.
    let answerer = RecordingAnswerer::start(Script { tokens: 20_000, token_padding: 1000, ..Script::default() }).await;
    let hub =
        Hub::start(&["--nlp-url", &answerer.url, "--outbound-queue-frames", "8", "--nlp-max-reply-bytes", "40000000"])
            .await;
    let mut slow = Client::connect(&hub.ws_url("tenant=demo&user=slow-reader")).await;
    slow.send_message("m1", "flood me").await;
    // Read nothing until the hub gives up on us (its metric says so), then
    // drain what was buffered up to the close frame.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hub.metric("fengda_hub_slow_consumer_closes_total").await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the hub never closed the socket that stopped reading");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let close = slow.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4008, "slow consumer close code");

    // The hub itself is fine: a new client is served.
    let mut fresh = Client::connect(&hub.ws_url("tenant=demo&user=fresh")).await;
    fresh.assert_alive().await;
}

#[tokio::test]
async fn a_reply_of_megabytes_reaches_the_customer_live_and_replayed() {
    // ~2 MB of text: the `reply.done` and the replayed `message` are frames
    // far larger than any buffer of the hub's socket library.
    let answerer = RecordingAnswerer::start(Script { tokens: 2000, token_padding: 1000, ..Script::default() }).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-reply-bytes", "4000000"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=long-reply")).await;
    let (_, reply) = client.ask("m1", "Tell me everything").await;
    let text = reply.text().to_owned();
    assert!(text.len() > 2_000_000, "{} bytes", text.len());
    let streamed: String = reply.deltas.iter().map(|delta| delta["text"].as_str().expect("delta text")).collect();
    assert_eq!(streamed, text, "the deltas add up to the whole reply");

    let query = format!(
        "tenant=demo&user=long-reply&conversation={}&after=1&epoch={}",
        client.conversation(),
        client.ready["epoch"].as_str().unwrap()
    );
    let mut back = Client::connect(&hub.ws_url(&query)).await;
    let replayed = back.expect("message").await;
    assert_eq!((replayed["from"].as_str(), replayed["text"].as_str()), (Some("assistant"), Some(text.as_str())));
    back.assert_alive().await;
}

/// Questions (and so replies) in the conversation a socket replays.
const REPLAYED_QUESTIONS: usize = 30;

#[tokio::test]
async fn a_replay_cut_short_by_a_close_is_not_followed_by_newer_events() {
    // Replies of ~200 KB (a frame the hub's WebSocket buffer takes whole):
    // a replay of ~6 MB, more than the hub's send buffer (4 MB at most) and
    // a small receive buffer hold.
    let answerer = RecordingAnswerer::start(Script { tokens: 200, token_padding: 1000, ..Script::default() }).await;
    let hub =
        Hub::start(&["--nlp-url", &answerer.url, "--outbound-queue-frames", "2048", "--nlp-max-reply-bytes", "400000"])
            .await;
    let mut asker = Client::connect(&hub.ws_url("tenant=demo&user=cut-short")).await;
    for i in 1..=REPLAYED_QUESTIONS {
        asker.ask(&format!("m{i}"), "Tell me a long story").await;
    }
    let (conversation, epoch) = (asker.conversation(), asker.ready["epoch"].as_str().unwrap().to_owned());

    // A second socket of the customer resumes from the start and reads
    // nothing: the hub's write of the replay waits for it.
    let query = format!("tenant=demo&user=cut-short&conversation={conversation}&after=0&epoch={epoch}");
    let mut reader = connect_with_small_receive_buffer(&hub.ws_url(&query)).await;
    let MaybeTlsStream::Plain(stream) = reader.get_mut() else { panic!("plain TCP") };
    // Bytes of the replay have arrived: the socket is attached.
    stream.peek(&mut [0u8; 1]).await.expect("peek");
    // A newer event is queued for it, behind the replay.
    asker.send_message("newer", "One more").await;
    asker.expect("ack").await;

    // The socket floods frames (ignored cancels) until the hub closes it
    // with 4429, its replay still unwritten.
    for _ in 0..200 {
        let cancel = json!({ "type": "cancel", "reply": "r-00000000000000000000000000000000" }).to_string();
        if reader.send(Message::text(cancel)).await.is_err() {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + fengda_tests::STEP_TIMEOUT;
    while hub.metric("fengda_hub_rate_limit_closes_total").await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the hub never closed the flooding socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // What it then reads: `ready`, the replay up to where the close cut it,
    // and nothing newer (which would tell it it has the events in between).
    let mut frames = Vec::new();
    let mut close = None;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(fengda_tests::STEP_TIMEOUT, reader.next()).await {
        match message {
            Message::Text(text) => frames.push(serde_json::from_str::<Value>(&text).expect("JSON")),
            Message::Close(frame) => close = frame.map(|frame| u16::from(frame.code)),
            _ => {}
        }
    }
    assert_eq!(frames[0]["type"], "ready");
    let seqs: Vec<u64> =
        frames.iter().filter_map(|frame| frame["seq"].as_u64().filter(|_| frame["type"] == "message")).collect();
    assert!(seqs.len() < 2 * REPLAYED_QUESTIONS, "the close cut the replay short: got {seqs:?}");
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "the replay in order, no gap");
    let types: Vec<&str> = frames[1..].iter().map(|frame| frame["type"].as_str().unwrap_or_default()).collect();
    assert!(types.iter().all(|t| *t == "message"), "nothing but the replay: {types:?}");
    // The close frame comes if the client drains the buffered replay within the close's 1 s.
    assert!(close.is_none_or(|code| code == 4429), "{close:?}");
}

/// A WebSocket whose receive buffer is small (and not grown by the kernel).
async fn connect_with_small_receive_buffer(url: &str) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
    let address = url.strip_prefix("ws://").and_then(|rest| rest.split('/').next()).expect("a ws:// url");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(address.parse().unwrap()).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.expect("upgrade");
    ws
}

#[tokio::test]
async fn a_silent_peer_is_closed_and_a_live_one_is_kept_by_pings() {
    let hub = Hub::start(&["--ping-interval-ms", "100", "--idle-timeout-ms", "1000"]).await;
    let mut live = Client::connect(&hub.ws_url("tenant=demo&user=live")).await;
    let mut silent = Client::connect(&hub.ws_url("tenant=demo&user=silent")).await;

    // The live client keeps reading (tungstenite answers each ping with a
    // pong) until the hub has closed the silent one, which connected later:
    // by then the live one has been connected longer than the idle timeout.
    let mut pings = 0;
    let mut check = tokio::time::interval(Duration::from_millis(50));
    while hub.metric("fengda_hub_sessions_open").await != 1.0 {
        tokio::select! {
            message = live.ws.next() => match message {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("the live client should only see pings, got {other:?}"),
            },
            _ = check.tick() => {}
        }
    }
    assert!(pings >= 5, "pings keep the connection alive: saw {pings}");
    live.assert_alive().await;

    // The silent client never read, so never answered a ping: it was closed
    // with 4010. Its frames are read raw, as a peer that never answers them
    // (tungstenite would queue pongs to a closed socket).
    assert_eq!(raw_close_code(&mut silent).await, 4010);
}

/// Reads a client's socket to its end without answering anything and
/// returns the code of the close frame among the server's frames.
async fn raw_close_code(client: &mut Client) -> u16 {
    use tokio::io::AsyncReadExt;
    let MaybeTlsStream::Plain(stream) = client.ws.get_mut() else { panic!("plain TCP") };
    let mut bytes = Vec::new();
    tokio::time::timeout(fengda_tests::STEP_TIMEOUT, stream.read_to_end(&mut bytes))
        .await
        .expect("the hub ends the connection")
        .expect("read");
    // Server frames are unmasked: opcode, length (7 bits, or 126 and 16 bits), payload.
    let mut rest = &bytes[..];
    while rest.len() >= 2 {
        let (opcode, short) = (rest[0] & 0x0f, usize::from(rest[1] & 0x7f));
        let (len, header) = match short {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => panic!("no frame this long expected"),
            len => (len, 2),
        };
        let payload = &rest[header..header + len];
        if opcode == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
        rest = &rest[header + len..];
    }
    panic!("no close frame among {} bytes", bytes.len());
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_and_exits_cleanly() {
    let answerer = RecordingAnswerer::start(Script::default()).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url]).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(Client::connect(&hub.ws_url(&format!("tenant=demo&user=bye{i}"))).await);
    }
    let status = hub.terminate().await;
    assert!(status.success(), "the hub exits 0 on SIGTERM: {status:?}");
    for client in &mut clients {
        let close = client.expect_close().await.expect("close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
}

#[tokio::test]
async fn during_shutdown_readyz_is_red_and_new_sockets_are_refused() {
    let hub = Hub::start(&["--shutdown-grace-ms", "3000"]).await;
    assert_eq!(hub.admin_get("/readyz").await, Some((200, r#"{"status":"ready"}"#.to_owned())));
    // A peer that never reads never answers the hub's close frame: its
    // session holds the drain open (up to the grace) while we look.
    let mut silent = Client::connect(&hub.ws_url("tenant=demo&user=stays")).await;
    let mut hub = hub;
    hub.sigterm();
    let deadline = tokio::time::Instant::now() + fengda_tests::STEP_TIMEOUT;
    let (status, body) = loop {
        match hub.admin_get("/readyz").await {
            Some((200, _)) => assert!(tokio::time::Instant::now() < deadline, "readyz stayed green after SIGTERM"),
            Some(answer) => break answer,
            None => panic!("the admin listener stopped before the sessions closed"),
        }
    };
    assert_eq!(status, 503);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body, serde_json::json!({"status": "shutting_down"}));
    // The public listener takes no new socket (refused, or 503 shutting_down).
    match tokio_tungstenite::connect_async(hub.ws_url("tenant=demo&user=late")).await {
        Ok(_) => panic!("a socket was accepted during shutdown"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(_refused) => {}
    }
    assert!(hub.wait_exit().await.success(), "the hub exits 0 after its drain");
    assert_eq!(raw_close_code(&mut silent).await, 1001);
}

#[tokio::test]
async fn sessions_and_tasks_return_to_baseline_after_sockets_close() {
    let answerer = RecordingAnswerer::start(Script::default()).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url]).await;
    assert!(hub.metric("fengda_hub_runtime_tasks_alive").await > 0.0, "the hub reports its live tasks");
    // The first reply also opens the NLP connection (its tasks stay): warm up first.
    let baseline_tasks = converse_and_leave(&hub, 1, "warm").await;

    let mut clients = Vec::new();
    for i in 0..5 {
        let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user=leak{i}"))).await;
        client.ask("m1", "Tell me about the Gold Card").await;
        clients.push(client);
    }
    assert_eq!(hub.metric("fengda_hub_sessions_open").await, 5.0);
    assert!(hub.metric("fengda_hub_runtime_tasks_alive").await > baseline_tasks);
    drop(clients);
    converse_and_leave(&hub, 0, "after").await;
    // A session's writer and replier end just after it: allow them a moment, bounded.
    let deadline = tokio::time::Instant::now() + fengda_tests::STEP_TIMEOUT;
    loop {
        let tasks = hub.metric("fengda_hub_runtime_tasks_alive").await;
        if tasks <= baseline_tasks {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{tasks} tasks left, baseline {baseline_tasks}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Has `n` customers ask once and close, waits until the hub has no session
/// left, and returns its live task count then.
async fn converse_and_leave(hub: &Hub, n: usize, prefix: &str) -> f64 {
    for i in 0..n {
        let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={prefix}{i}"))).await;
        client.ask("m1", "Tell me about the Gold Card").await;
        client.ws.close(None).await.unwrap();
        while let Some(Ok(_)) = client.ws.next().await {}
    }
    // The hub finishes its side of each close after ours; wait for it, bounded.
    let deadline = tokio::time::Instant::now() + fengda_tests::STEP_TIMEOUT;
    while hub.metric("fengda_hub_sessions_open").await > 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "sessions did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.metric("fengda_hub_runtime_tasks_alive").await
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame_echoing_its_code() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let answerer =
        RecordingAnswerer::start(Script { tokens: 200, token_delay: Duration::from_millis(10), ..Script::default() })
            .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url]).await;
    // An idle socket, and one whose reply is streaming when the client closes.
    for (user, code, streaming) in [("closer-idle", 1000, false), ("closer-busy", 4321, true)] {
        let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}"))).await;
        if streaming {
            client.send_message("m1", "Tell me a long story").await;
            client.expect("ack").await;
            client.expect("reply.delta").await;
        }
        let frame = CloseFrame { code: CloseCode::from(code), reason: "done".into() };
        client.ws.close(Some(frame)).await.expect("close sent");
        let echo = client.expect_close().await.expect("the hub answers with a close frame");
        assert_eq!(u16::from(echo.code), code, "{user}: the close code comes back, not 1006");
        // Then the hub ends the TCP connection.
        let end = tokio::time::timeout(fengda_tests::STEP_TIMEOUT, client.ws.next()).await.expect("TCP closed");
        assert!(end.is_none(), "{user}: nothing after the close frame: {end:?}");
    }
}
