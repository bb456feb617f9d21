//! Connections and sockets that cannot be hoarded: slow and idle HTTP
//! connections time out, request heads are bounded, a node at its file limit
//! keeps answering its health probes, one address cannot take the node's
//! connections, one conversation cannot take its sockets, and a socket that
//! floods the hub is closed with 4429. Every flood is bounded in count and
//! time, on loopback.

use std::time::{Duration, Instant};

use fengda_tests::{Client, Hub};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn addr(hub: &Hub) -> std::net::SocketAddr {
    hub.url.trim_start_matches("http://").parse().expect("hub address")
}

/// A TCP connection to the hub from the loopback address `source` (127.0.0.x).
async fn connect_from(hub: &Hub, source: [u8; 4]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((std::net::Ipv4Addr::from(source), 0).into()).unwrap();
    socket.connect(addr(hub)).await.expect("connect")
}

/// Reads until the hub closes the connection (or `within` passes: then None).
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut response = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| String::from_utf8_lossy(&response).into_owned())
}

/// Sends one request with `Connection: close` and returns the whole response.
async fn request(stream: &mut TcpStream, path: &str, extra_headers: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n{extra_headers}\r\n");
    stream.write_all(head.as_bytes()).await.expect("send request");
    read_to_close(stream, Duration::from_secs(5)).await.expect("a response within 5 s")
}

fn status(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

fn json_body(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {response}"))
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn slow_partial_and_idle_connections_are_closed() {
    const EACH: usize = 100;
    let hub = Hub::start(&["--header-read-timeout-ms", "500", "--http-idle-timeout-ms", "800"]).await;
    let mut partial = Vec::new();
    let mut silent = Vec::new();
    for _ in 0..EACH {
        let mut stream = connect_from(&hub, [127, 0, 0, 1]).await;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Slow: ").await.unwrap();
        partial.push(stream);
        silent.push(connect_from(&hub, [127, 0, 0, 1]).await);
    }
    // A keep-alive connection that got its answer and then says nothing more.
    let mut kept_alive = connect_from(&hub, [127, 0, 0, 1]).await;
    kept_alive.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n").await.unwrap();
    for stream in partial.iter_mut().chain(silent.iter_mut()).chain([&mut kept_alive]) {
        assert!(read_to_close(stream, Duration::from_secs(5)).await.is_some(), "the hub kept a connection open");
    }
    // Closed by the timeouts, not by anything else: the hub counts each close by its reason.
    let metrics = hub.metrics().await;
    let closed = |reason: &str| {
        fengda_tests::metric_value(&metrics, &format!("fengda_hub_connections_closed_total{{reason=\"{reason}\"}}"))
    };
    assert!(closed("header_timeout") >= (EACH + 1) as f64, "{metrics}");
    // A silent connection waits for its first request head: over HTTP/1.1
    // alone (the default) the head timeout closes it, else the idle timeout.
    let both = closed("header_timeout") + closed("idle_timeout");
    assert!(both >= (2 * EACH + 1) as f64, "{metrics}");
}

#[tokio::test]
async fn a_request_head_over_the_limit_gets_431_and_one_under_it_is_served() {
    let hub = Hub::start(&[]).await;
    let mut stream = connect_from(&hub, [127, 0, 0, 1]).await;
    let big = format!("X-Big: {}\r\n", "a".repeat(400 * 1024));
    let head = format!("GET /healthz HTTP/1.1\r\nHost: hub\r\n{big}\r\n");
    let (mut read, mut write) = stream.split();
    // The hub may close before the whole head is sent: keep reading meanwhile.
    let (_, response) = tokio::join!(write.write_all(head.as_bytes()), async {
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut response)).await;
        String::from_utf8_lossy(&response).into_owned()
    });
    assert_eq!(status(&response), 431, "{response:.200}");
    let mut stream = connect_from(&hub, [127, 0, 0, 1]).await;
    let response = request(&mut stream, "/healthz", &format!("X-Fits: {}\r\n", "a".repeat(12 * 1024))).await;
    assert_eq!(status(&response), 200, "{response}");
}

/// GET `path` on fresh connections until one is answered (a refused
/// connection may be closed unanswered while the refusal lane is busy).
async fn probe(hub: &Hub, path: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        assert!(Instant::now() < deadline, "{path} was not answered within {within:?}");
        let mut stream = connect_from(hub, [127, 0, 0, 1]).await;
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n{}\r\n",
            if path == "/ws?tenant=t&user=u" { UPGRADE } else { "" }
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        if let Some(response) = read_to_close(&mut stream, Duration::from_millis(500)).await
            && status(&response) != 0
        {
            return response;
        }
        // Closed unanswered: the refusal lane is full; its connections leave within 250 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn at_the_file_limit_health_is_answered_new_connections_refused_and_existing_ones_served() {
    // 256 descriptors: the hub holds at most 256 - 128 connections.
    const HOARDED: usize = 320;
    let hub = Hub::start_with_open_files(256, &[]).await;
    let mut before = Client::connect(&hub.ws_url("tenant=t&user=before")).await;
    let mut hoard = Vec::new();
    for _ in 0..HOARDED {
        hoard.push(connect_from(&hub, [127, 0, 0, 2]).await);
    }
    // Each probe fails if it gets no answer within its bound.
    let health = probe(&hub, "/healthz", Duration::from_secs(3)).await;
    assert_eq!(status(&health), 200, "{health}");
    let ready = probe(&hub, "/readyz", Duration::from_secs(3)).await;
    assert_eq!((status(&ready), json_body(&ready)["status"].clone()), (503, json!("at_capacity")), "{ready}");
    let refused = probe(&hub, "/ws?tenant=t&user=u", Duration::from_secs(3)).await;
    assert_eq!(status(&refused), 503, "{refused}");
    assert_eq!(json_body(&refused)["error"], "at_capacity", "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
    // What the node already holds is still served: the socket, and the first hoarded connection.
    before.assert_alive().await;
    let response = request(&mut hoard[0], "/healthz", "").await;
    assert_eq!(status(&response), 200, "{response}");
    // Once the hoard lets go, sockets connect again.
    drop(hoard);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&probe(&hub, "/readyz", Duration::from_secs(3)).await) != 200 {
        assert!(Instant::now() < deadline, "the node stayed at capacity after the hoard closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Client::connect(&hub.ws_url("tenant=t&user=after")).await.assert_alive().await;
    let metrics = hub.metrics().await;
    let refused = fengda_tests::metric_value(&metrics, "fengda_hub_connections_refused_total{reason=\"at_capacity\"}");
    assert!(refused >= (HOARDED - 128) as f64, "{metrics}");
}

#[tokio::test]
async fn one_address_may_hold_only_its_share_of_connections() {
    let hub = Hub::start(&["--max-connections-per-ip", "5"]).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from(&hub, [127, 0, 0, 3]).await);
    }
    let mut sixth = connect_from(&hub, [127, 0, 0, 3]).await;
    let response = request(&mut sixth, "/ws?tenant=t&user=u", UPGRADE).await;
    assert_eq!(status(&response), 429, "{response}");
    assert_eq!(json_body(&response)["error"], "too_many_connections");
    assert!(response.to_ascii_lowercase().contains("retry-after:"), "{response}");
    // Another address is not affected; and a closed connection frees its place.
    let other = connect_from(&hub, [127, 0, 0, 4]).await;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(other);
    let (ws, _) = tokio_tungstenite::client_async(hub.ws_url("tenant=t&user=other"), stream).await.expect("upgrade");
    let mut other = Client::on(ws);
    other.expect("ready").await;
    other.assert_alive().await;
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = connect_from(&hub, [127, 0, 0, 3]).await;
        if status(&request(&mut stream, "/nothing", "").await) == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the address's place was not freed");
    }
}

#[tokio::test]
async fn one_address_may_open_connections_only_so_fast() {
    let hub = Hub::start(&["--connection-rate-per-ip", "1", "--connection-burst-per-ip", "10"]).await;
    let mut answered = Vec::new();
    for _ in 0..12 {
        let mut stream = connect_from(&hub, [127, 0, 0, 5]).await;
        // Not a health probe: a refused connection still gets those answered.
        answered.push(request(&mut stream, "/nothing", "").await);
    }
    let statuses: Vec<u16> = answered.iter().map(|r| status(r)).collect();
    // The burst, and at most one more if a second passed meanwhile.
    let served = statuses.iter().filter(|&&s| s == 404).count();
    assert!((10..=11).contains(&served), "{statuses:?}");
    let refused = answered.iter().find(|r| status(r) == 429).expect("a refusal");
    assert_eq!(json_body(refused)["error"], "connection_rate_exceeded", "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
}

/// A WebSocket request through a proxy at 127.0.0.1 that forwards `client`.
async fn via_proxy(hub: &Hub, user: &str, client: &str) -> Result<Client, u16> {
    let mut request = hub.ws_url(&format!("tenant=t&user={user}")).into_client_request().unwrap();
    request.headers_mut().insert("x-forwarded-for", format!("{client}, 127.0.0.9").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(Client::on(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(error) => panic!("connect: {error}"),
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_limited_not_the_proxy() {
    let hub = Hub::start(&["--max-connections-per-ip", "2", "--trusted-proxies", "127.0.0.1,127.0.0.9"]).await;
    let mut sockets = Vec::new();
    for i in 0..2 {
        sockets.push(via_proxy(&hub, &format!("a{i}"), "203.0.113.7").await.expect("within the cap"));
    }
    assert_eq!(via_proxy(&hub, "a2", "203.0.113.7").await.err(), Some(429));
    // The proxy itself holds more than 2 connections; other clients pass.
    for i in 0..3 {
        sockets
            .push(via_proxy(&hub, &format!("b{i}"), &format!("203.0.113.{}", 10 + i)).await.expect("another client"));
    }
    // A client's socket closing frees its place.
    let mut first = sockets.remove(0);
    first.ws.close(None).await.unwrap();
    first.expect_close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while via_proxy(&hub, "a3", "203.0.113.7").await.is_err() {
        assert!(Instant::now() < deadline, "the closed socket's place was not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_conversation_takes_only_so_many_sockets_per_node() {
    let hub = Hub::start(&["--max-sockets-per-conversation", "3"]).await;
    let mut first = Client::connect(&hub.ws_url("tenant=t&user=crowd")).await;
    // A conversation can be named once its first message is stored.
    first.ask("m0", "hello").await;
    let url = hub.ws_url(&format!("tenant=t&user=crowd&conversation={}", first.conversation()));
    let mut others = vec![Client::connect(&url).await, Client::connect(&url).await];
    for _ in 0..2 {
        let mut extra = Client::connect_unready(&url).await;
        let error = extra.next().await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("too_many_sockets")),
            "{error}"
        );
        assert_eq!(extra.expect_close().await.map(|frame| u16::from(frame.code)), Some(4409));
    }
    // The sockets in place still get the conversation's traffic.
    let (_, reply) = first.ask("m1", "hello").await;
    for other in &mut others {
        other.expect("message").await;
        assert_eq!(other.read_reply().await.text(), reply.text());
    }
    // One leaves: another may join.
    let mut leaving = others.pop().unwrap();
    leaving.ws.close(None).await.unwrap();
    leaving.expect_close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut joining = Client::connect_unready(&url).await;
        if joining.next().await["type"] == "ready" {
            break;
        }
        assert!(Instant::now() < deadline, "the conversation stayed full");
    }
}

#[tokio::test]
async fn a_socket_that_floods_messages_is_closed_with_4429() {
    const FLOOD: usize = 2000;
    let hub = Hub::start(&[]).await;
    let mut calm = Client::connect(&hub.ws_url("tenant=t&user=calm")).await;
    let mut flooder = Client::connect(&hub.ws_url("tenant=t&user=flood")).await;
    let started = Instant::now();
    for i in 0..FLOOD {
        let frame = json!({"type": "message", "id": format!("m{i}"), "text": "hello"}).to_string();
        if flooder.ws.feed(Message::text(frame)).await.is_err() {
            break;
        }
    }
    let _ = flooder.ws.flush().await;
    // Until the close: at most one burst of frames read (stored or refused as
    // too many pending), then under one burst refused as rate limited.
    let (mut rate_limited, mut acks) = (0, 0);
    let mut too_many_pending = 0;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut flooder.ws)).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                acks += usize::from(frame["type"] == "ack");
                if frame["code"] == "rate_limited" {
                    assert!(frame["id"].as_str().is_some_and(|id| id.starts_with('m')), "{frame}");
                    rate_limited += 1;
                }
                too_many_pending += usize::from(frame["code"] == "too_many_pending");
            }
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    assert_eq!(close.map(|frame| u16::from(frame.code)), Some(4429));
    // The close comes after a burst (60) refused in a row; on a loaded
    // machine the budget refills (20/s) while frames are handled, so a few
    // pass between refusals: frames read are bounded by the budget over the
    // time it took, not by one burst.
    let budget = 60 + (20.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(rate_limited >= 1, "no rate_limited error before the close");
    assert!(acks + too_many_pending <= budget, "{acks} acks, {too_many_pending} too_many_pending, budget {budget}");
    calm.assert_alive().await;
    assert_eq!(hub.metric("fengda_hub_rate_limit_closes_total").await, 1.0);
}
