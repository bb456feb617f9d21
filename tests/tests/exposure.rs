//! What a stranger on the customers' port can reach and read: no metrics,
//! no credentials, no internal latencies, no foreign origins, no library
//! internals, no second reading of a frame, no h2c; and the demo pages
//! keep to themselves. Also what the operator's log holds: no message
//! text at info level or above.

use std::time::Duration;

use fengda_tests::{Client, Hub, RedisServer, STEP_TIMEOUT};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Response, header};

/// Opens a socket with `origins` as `Origin` headers (and `host` as `Host`
/// when given); the HTTP refusal, if any.
async fn upgrade(hub: &Hub, origins: &[&str], host: Option<&str>) -> Result<(), Response<Option<Vec<u8>>>> {
    let mut request = hub.ws_url("tenant=demo&user=u1").into_client_request().unwrap();
    for origin in origins {
        request.headers_mut().append(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
    }
    if let Some(host) = host {
        request.headers_mut().insert(header::HOST, HeaderValue::from_str(host).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(*response),
        Err(error) => panic!("expected an upgrade or an HTTP refusal, got {error:?}"),
    }
}

/// The JSON body of an HTTP refusal.
fn body(response: &Response<Option<Vec<u8>>>) -> Value {
    serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("a JSON body")
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_port_only() {
    let hub = Hub::start(&[]).await;
    let public = reqwest::get(format!("{}/metrics", hub.url)).await.unwrap();
    assert_eq!(public.status(), 404);
    assert_eq!(public.json::<Value>().await.unwrap()["error"], "not_found");
    assert_ne!(hub.url, hub.admin_url);

    let admin = reqwest::get(format!("{}/metrics", hub.admin_url)).await.unwrap();
    assert_eq!(admin.status(), 200);
    assert!(admin.text().await.unwrap().contains("fengda_hub_sessions_open"));
    // The probes answer on both: load balancers use the public port, orchestrators may use either.
    for base in [&hub.url, &hub.admin_url] {
        for probe in ["healthz", "readyz"] {
            let response = reqwest::get(format!("{base}/{probe}")).await.unwrap();
            assert_eq!(response.status(), 200, "{base}/{probe}");
        }
    }
    // And the admin port serves nothing of the customers'.
    for path in ["/", "/ws?tenant=demo&user=u1"] {
        assert_eq!(reqwest::get(format!("{}{path}", hub.admin_url)).await.unwrap().status(), 404, "{path}");
    }
}

#[tokio::test]
async fn credentials_in_an_nlp_url_reach_no_metric_label_and_no_log() {
    // A port nothing listens on: the health check fails and logs the endpoint at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hub = Hub::start(&["--nlp-url", &format!("http://svc:s3cr3t@127.0.0.1:{port}")]).await;
    let shown = format!("endpoint=http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !hub.logs().contains(&format!("{shown} serving=false")) {
        assert!(tokio::time::Instant::now() < deadline, "no health log for the endpoint:\n{}", hub.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains(&format!("fengda_hub_nlp_endpoint_limit{{endpoint=\"http://127.0.0.1:{port}\"}}")),
        "{metrics}"
    );
    assert!(!metrics.contains("s3cr3t") && !metrics.contains("svc:"), "{metrics}");
    assert!(!hub.logs().contains("s3cr3t"), "{}", hub.logs());
}

#[tokio::test]
async fn a_redis_password_is_not_logged() {
    let redis = RedisServer::start().await;
    redis.cli(&["CONFIG", "SET", "requirepass", "s3cr3t"]).await;
    let url = format!("redis://:s3cr3t@127.0.0.1:{}", redis.port);
    let hub = Hub::start(&["--backend", "redis", "--redis-url", &url]).await;
    // It connected with the password (a socket opens) and logged the URL without it.
    Client::connect(&hub.ws_url("tenant=demo&user=u1")).await;
    let logs = hub.logs();
    assert!(logs.contains(&format!("url=redis://127.0.0.1:{}", redis.port)), "{logs}");
    assert!(!logs.contains("s3cr3t"), "{logs}");
}

#[tokio::test]
async fn timing_is_refused_unless_the_hub_allows_it() {
    let hub = Hub::start(&[]).await;
    let error = tokio_tungstenite::connect_async(hub.ws_url("tenant=demo&user=u1&timing=1")).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else { panic!("{error:?}") };
    assert_eq!(response.status(), 403);
    assert_eq!(body(&response)["error"], "timing_not_allowed");
    // Not asking is fine.
    Client::connect(&hub.ws_url("tenant=demo&user=u1&timing=0")).await;

    let hub = Hub::start(&["--allow-timing"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=u1&timing=1")).await;
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert!(reply.done["timing"]["total_ms"].is_number(), "{}", reply.done);
}

#[tokio::test]
async fn an_origin_allow_list_admits_its_origins_only() {
    let hub = Hub::start(&["--allowed-origins", "https://shop.example"]).await;
    let port = hub.url.rsplit(':').next().unwrap().to_owned();
    upgrade(&hub, &["https://shop.example"], None).await.expect("a listed origin");
    upgrade(&hub, &[], None).await.expect("no Origin: not a browser");
    // The hub's own origin is not listed, so it is refused too.
    let refused = upgrade(&hub, &[&hub.url], None).await.unwrap_err();
    assert_eq!((refused.status().as_u16(), &body(&refused)["error"]), (403, &Value::from("origin_not_allowed")));
    // DNS rebinding: a page of rebind.example whose name now points at the hub.
    let rebound = format!("rebind.example:{port}");
    let refused = upgrade(&hub, &[&format!("http://{rebound}")], Some(&rebound)).await.unwrap_err();
    assert_eq!(refused.status(), 403);
    // Two Origin headers, even both listed.
    let refused = upgrade(&hub, &["https://shop.example", "https://shop.example"], None).await.unwrap_err();
    assert_eq!(refused.status(), 403);
    assert_eq!(body(&refused)["error"], "origin_not_allowed");
}

#[tokio::test]
async fn without_a_list_the_host_decides_but_two_origins_are_refused() {
    let hub = Hub::start(&[]).await;
    upgrade(&hub, &[&hub.url], None).await.expect("same origin");
    let refused = upgrade(&hub, &[&hub.url, &hub.url], None).await.unwrap_err();
    assert_eq!(refused.status(), 403);
    assert_eq!(upgrade(&hub, &["https://evil.example"], None).await.unwrap_err().status(), 403);
}

#[tokio::test]
async fn demo_pages_send_security_headers() {
    let hub = Hub::start(&[]).await;
    for path in ["/", "/client.js", "/chat.js", "/style.css", "/console", "/console.js"] {
        let response = reqwest::get(format!("{}{path}", hub.url)).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        let csp = headers.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
        for directive in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.contains(directive), "{path}: CSP {csp:?} lacks {directive}");
        }
        assert_eq!(headers.get("x-content-type-options").unwrap(), "nosniff", "{path}");
        assert_eq!(headers.get("x-frame-options").unwrap(), "DENY", "{path}");
    }
}

/// Sends the HTTP/2 connection preface and an empty SETTINGS frame, and
/// returns what the hub answers before closing (at most 9 bytes, within 2 s).
async fn h2_prior_knowledge(hub: &Hub) -> Vec<u8> {
    let addr = hub.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut answer = vec![0u8; 9];
    let mut read = 0;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while read < answer.len() {
            match tcp.read(&mut answer[read..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    answer.truncate(read);
    answer
}

#[tokio::test]
async fn cleartext_http2_is_refused_unless_configured() {
    let hub = Hub::start(&[]).await;
    assert_eq!(h2_prior_knowledge(&hub).await, b"", "closed without an HTTP/2 frame");
    assert_eq!(reqwest::get(format!("{}/healthz", hub.url)).await.unwrap().status(), 200, "HTTP/1.1 still works");

    let hub = Hub::start(&["--http2-cleartext"]).await;
    let answer = h2_prior_knowledge(&hub).await;
    assert_eq!(answer.len(), 9, "a frame header: {answer:?}");
    assert_eq!(answer[3], 0x4, "the server's SETTINGS frame: {answer:?}");
}

#[tokio::test]
async fn a_repeated_key_in_a_frame_is_refused_and_nothing_is_stored() {
    let hub = Hub::start(&[]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=dup")).await;
    for frame in [
        r#"{"type":"message","id":"m1","text":"Tell me about the Gold Card","text":"I lost my card"}"#,
        r#"{"type":"message","id":"m1","id":"m2","text":"hi"}"#,
        r#"{"type":"ping","type":"message","id":"m1","text":"hi"}"#,
        r#"{"type":"ping","x":1,"x":2}"#,
    ] {
        client.send_text(frame.into()).await;
        let error = client.expect("error").await;
        assert_eq!(error["code"], "invalid_frame", "{frame} → {error}");
        client.assert_alive().await;
    }
    let (ack, _) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(ack["seq"], 1, "none of the refused frames was stored");
}

#[tokio::test]
async fn a_text_over_the_bridges_byte_limit_is_too_long_at_the_hub() {
    let hub = Hub::start(&[]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=cjk")).await;
    // 4,000 characters (the default character limit) of 3 bytes each: 12,000 bytes.
    client.send_message("m1", &"金".repeat(4000)).await;
    let error = client.expect("error").await;
    assert_eq!((&error["code"], &error["id"]), (&Value::from("text_too_long"), &Value::from("m1")), "{error}");
    assert_eq!(error["message"], "`text` must be at most 8192 bytes of UTF-8");
    // Just under 8,192 bytes is answered by the NLP service (not the fallback).
    let (ack, reply) = client.ask("m2", &"金".repeat(8192 / 3)).await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(reply.done["fallback"], false, "{}", reply.done);
}

#[tokio::test]
async fn refusals_are_in_our_words_not_a_librarys() {
    let hub = Hub::start(&[]).await;
    let error =
        tokio_tungstenite::connect_async(hub.ws_url("tenant=demo&tenant=other&user=u1")).await.expect_err("refused");
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else { panic!("{error:?}") };
    assert_eq!(response.status(), 400);
    let refused = body(&response);
    assert_eq!(refused["error"], "invalid_query");
    assert_eq!(refused["message"], "a query parameter is given more than once");

    let response = reqwest::get(format!("{}/ws?tenant=demo&user=u1", hub.url)).await.unwrap();
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"], "not_a_websocket_upgrade");
    assert_eq!(refused["message"], "`Connection` must include `upgrade`");

    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=u1")).await;
    client.send_text("{\"type\":".into()).await;
    let error = client.expect("error").await;
    assert_eq!(error["code"], "invalid_json");
    assert_eq!(error["message"], "frame is not valid JSON (line 1, column 8)");
}

#[tokio::test]
async fn message_text_never_reaches_the_log_at_info_in_jwt_mode() {
    use fengda_tests::tokens::{KeyDir, claims, toml_path};
    use jsonwebtoken::Algorithm;

    let dir = KeyDir::new();
    let acme = dir.hmac_secret("acme.secret");
    let config = format!(
        "[auth]\nmode = \"jwt\"\n[[auth.keys]]\ntenant = \"acme\"\nalg = \"HS256\"\nsecret_file = {}\n",
        toml_path(&acme.path)
    );
    let config = dir.write("fengda.toml", config.as_bytes());
    let hub = Hub::start_logging("info", &["--config", config.to_str().unwrap(), "--max-text-chars", "200"]).await;
    let marker = format!("zq{}x", std::process::id());
    let token = acme.sign(Algorithm::HS256, None, &claims("acme", "alice"));
    let mut client = Client::connect(&hub.ws_url(&format!("token={token}"))).await;

    // Stored and answered; the answer's text is message text too.
    let (_, reply) = client.ask("m1", &format!("Tell me about the Gold Card {marker}")).await;
    let answer = reply.text().to_owned();
    // Refused frames that carry the text: too long, not JSON, an unknown type, a bad refresh.
    client.send_message("m2", &format!("{marker} {}", "x".repeat(300))).await;
    assert_eq!(client.expect("error").await["code"], "text_too_long");
    client.send_text(format!("{{\"type\":\"message\",\"id\":\"m3\",\"text\":\"{marker}\"")).await;
    client.expect("error").await;
    client.send_text(format!("{{\"type\":\"{marker}\",\"text\":\"{marker}\"}}")).await;
    client.expect("error").await;
    client.send_json(serde_json::json!({ "type": "refresh", "token": format!("{marker}.{marker}.{marker}") })).await;
    client.expect("error").await;
    // Another socket of the conversation gets the replay, then a cancelled reply.
    let mut other =
        Client::connect(&hub.ws_url(&format!("token={token}&conversation={}&after=0", client.conversation()))).await;
    other.expect("message").await;
    other.expect("message").await;
    other.send_message("m4", &format!("How much does it cost? {marker}")).await;
    other.expect("ack").await;
    let first = other.next().await;
    other.send_json(serde_json::json!({ "type": "cancel", "reply": first["reply"] })).await;
    while other.next().await["type"] != "reply.done" {}
    // A session refused at start (logged as a warning, with its span).
    let mut unknown = Client::connect_unready(&hub.ws_url(&format!("token={token}&conversation={:032x}", 7))).await;
    assert_eq!(unknown.expect("error").await["code"], "conversation_not_found");
    // A refused upgrade whose token is the marker.
    let refused = tokio_tungstenite::connect_async(hub.ws_url(&format!("token={marker}"))).await;
    assert!(refused.is_err());

    // Every line the traffic caused is in the log once a later line is.
    let pid = hub.child.id().unwrap() as i32;
    // SAFETY: plain kill(2) on a child we started and still own.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !hub.logs().contains("auth configuration reloaded") {
        assert!(tokio::time::Instant::now() < deadline, "no reload line:\n{}", hub.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = hub.logs();
    assert!(logs.contains("session refused"), "the traffic's warnings are in the log:\n{logs}");
    assert!(!logs.contains(&marker), "message text in the log:\n{logs}");
    assert!(!logs.contains(&answer[..answer.len().min(40)]), "an answer's text in the log:\n{logs}");
}
