//! Every kind of bad input gets its clear error, and the socket survives it.

use fengda_tests::{Client, Hub};
use futures::SinkExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn each_bad_frame_gets_its_error_code_and_the_socket_stays_open() {
    let hub = Hub::start(&["--max-text-chars", "50"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=bad-frames")).await;
    let long = "x".repeat(51);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid_json"),
        ("[1,2,3]".into(), "invalid_frame"),
        (r#"{"text":"hi"}"#.into(), "missing_field"),
        (r#"{"type":"dance"}"#.into(), "unknown_type"),
        (r#"{"type":"message","text":"hi"}"#.into(), "missing_field"),
        (r#"{"type":"message","id":"m1"}"#.into(), "missing_field"),
        (r#"{"type":"message","id":"m1","text":42}"#.into(), "invalid_frame"),
        (r#"{"type":"message","id":"","text":"hi"}"#.into(), "invalid_id"),
        (r#"{"type":"message","id":"m1","text":""}"#.into(), "empty_text"),
        (r#"{"type":"message","id":"m1","text":"   "}"#.into(), "empty_text"),
        (format!(r#"{{"type":"message","id":"m1","text":"{long}"}}"#), "text_too_long"),
    ];
    for (frame, code) in cases {
        client.send_text(frame.clone()).await;
        let error = client.expect("error").await;
        assert_eq!(error["code"], code, "frame {frame} → {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        client.assert_alive().await;
    }
    client.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(client.expect("error").await["code"], "binary_not_supported");
    client.assert_alive().await;

    // None of the rejected messages was stored: the first real one gets seq 1.
    let (ack, _) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(ack["seq"], 1);
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let hub = Hub::start(&["--max-frame-bytes", "4096"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=big")).await;
    let huge = format!(r#"{{"type":"message","id":"m1","text":"{}"}}"#, "x".repeat(10_000));
    client.send_text(huge).await;
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
}

#[tokio::test]
async fn bad_upgrade_requests_get_json_4xx() {
    let hub = Hub::start(&[]).await;
    let cases = [
        ("user=u1", 400, "invalid_tenant"),
        ("tenant=demo", 400, "invalid_user"),
        ("tenant=demo&user=a%20b", 400, "invalid_user"),
        ("tenant=demo&user=u1&after=-3", 400, "invalid_after"),
        ("tenant=demo&user=u1&conversation=..%2Fx", 400, "invalid_conversation"),
        // Conversation ids are the hub's own: 32 lowercase hex digits, nothing else.
        ("tenant=demo&user=u1&conversation=nope", 400, "invalid_conversation"),
        ("tenant=demo&user=u1&conversation=y%3A3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a1c", 400, "invalid_conversation"),
        ("tenant=demo&user=u1&conversation=3F2A9C0E5B7D4E1F8A6C2B9D0E4F7A1C", 400, "invalid_conversation"),
        ("tenant=demo&user=u1&conversation=3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a1c0", 400, "invalid_conversation"),
        ("tenant=demo&user=u1&conversation=%7B3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a%7D", 400, "invalid_conversation"),
    ];
    for (query, status, code) in cases {
        let error = tokio_tungstenite::connect_async(hub.ws_url(query)).await.expect_err("must be refused");
        let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
            panic!("{query}: expected an HTTP error, got {error:?}");
        };
        assert_eq!(response.status(), status, "{query}");
        let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
        assert_eq!(body["error"], code, "{query}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{query}: {body}");
    }

    // A plain GET (no upgrade) is refused with JSON too.
    let response = reqwest::get(format!("{}/ws?tenant=demo&user=u1", hub.url)).await.unwrap();
    assert!(response.status().is_client_error());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_a_websocket_upgrade");
}

#[tokio::test]
async fn a_foreign_origin_is_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let hub = Hub::start(&[]).await;
    let mut request = hub.ws_url("tenant=demo&user=u1").into_client_request().unwrap();
    request.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    let error = tokio_tungstenite::connect_async(request).await.expect_err("foreign origin");
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else { panic!("{error:?}") };
    assert_eq!(response.status(), 403);

    let mut request = hub.ws_url("tenant=demo&user=u1").into_client_request().unwrap();
    request.headers_mut().insert("origin", hub.url.parse().unwrap());
    tokio_tungstenite::connect_async(request).await.expect("same origin is allowed");
}

#[tokio::test]
async fn an_unknown_conversation_gets_an_error_and_4004() {
    let hub = Hub::start(&[]).await;
    // Well formed, but never given by this hub.
    let query = "tenant=demo&user=u1&conversation=0123456789abcdef0123456789abcdef";
    let mut client = Client::connect_unready(&hub.ws_url(query)).await;
    assert_eq!(client.expect("error").await["code"], "conversation_not_found");
    let close = client.expect_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 4004);
}

#[tokio::test]
async fn a_null_field_counts_as_missing_whichever_field_it_is() {
    let hub = Hub::start(&[]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=nulls")).await;
    for frame in [
        r#"{"type":null}"#,
        r#"{"type":null,"id":"m1","text":"hi"}"#,
        r#"{"type":"message","id":null,"text":"hi"}"#,
        r#"{"type":"message","id":"m1","text":null}"#,
        r#"{"type":"cancel","reply":null}"#,
    ] {
        client.send_text(frame.into()).await;
        let error = client.expect("error").await;
        assert_eq!(error["code"], "missing_field", "{frame} → {error}");
    }
    // Any other non-string value is a type error.
    for frame in [r#"{"type":true}"#, r#"{"type":"message","id":{},"text":"hi"}"#, r#"{"type":"cancel","reply":7}"#] {
        client.send_text(frame.into()).await;
        let error = client.expect("error").await;
        assert_eq!(error["code"], "invalid_frame", "{frame} → {error}");
    }
    client.assert_alive().await;
}

#[tokio::test]
async fn a_text_of_only_white_space_or_zero_width_characters_is_empty() {
    let hub = Hub::start(&[]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=blanks")).await;
    // Unicode White_Space (ASCII, no-break, ideographic, em space, next line) and zero-width characters.
    let blanks =
        [" \t\r\n", "\u{a0}", "\u{3000}", "\u{2003}\u{85}", "\u{200b}", "\u{feff}", "\u{200c}\u{200d}\u{2060}"];
    for (i, blank) in blanks.into_iter().enumerate() {
        let id = format!("b{i}");
        client.send_message(&id, blank).await;
        let error = client.expect("error").await;
        assert_eq!(
            (error["code"].as_str(), error["id"].as_str()),
            (Some("empty_text"), Some(id.as_str())),
            "{blank:?}"
        );
    }
    // Anything visible is stored as sent, zero-width characters included.
    for (i, text) in ["\u{200b}hi\u{200b}", "👩\u{200d}💻", "\u{3000}金卡"].into_iter().enumerate() {
        client.send_message(&format!("t{i}"), text).await;
        assert_eq!(client.expect("ack").await["seq"], 2 * i + 1, "{text:?} is stored");
        client.read_reply().await;
    }
    let mut transcript = Client::connect(&hub.ws_url("tenant=demo&user=blanks&after=0")).await;
    assert_eq!(transcript.expect("message").await["text"], "\u{200b}hi\u{200b}", "stored as sent, not trimmed");
}
