//! A WebSocket client speaking the hub's JSON protocol, for tests.

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::STEP_TIMEOUT;

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `ready` frame received on connect.
    pub ready: Value,
    /// Frame types [`Client::next`] skips (for tests about something else,
    /// e.g. `presence` on agents' sockets).
    pub ignored: &'static [&'static str],
    /// How long [`Client::next`] waits for a frame ([`STEP_TIMEOUT`]; a
    /// test of a real model waits as long as the hub waits for its first token).
    pub step: std::time::Duration,
}

/// One streamed reply as a client saw it.
#[derive(Debug)]
pub struct Reply {
    pub reply_id: String,
    /// `queued` frames (places in line) seen before the first delta.
    pub queued: Vec<Value>,
    pub deltas: Vec<Value>,
    pub done: Value,
}

impl Reply {
    pub fn text(&self) -> &str {
        self.done["text"].as_str().expect("reply.done has text")
    }
}

impl Client {
    /// Connects without waiting for `ready` (for sessions expected to be refused).
    pub async fn connect_unready(url: &str) -> Client {
        let (ws, _) = connect_async(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Client::on(ws)
    }

    /// A client on a socket upgraded already, before its `ready`.
    pub fn on(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client { ws, ready: Value::Null, ignored: &[], step: STEP_TIMEOUT }
    }

    /// Connects and waits for `ready`.
    pub async fn connect(url: &str) -> Client {
        let mut client = Self::connect_unready(url).await;
        let ready = client.next().await;
        assert_eq!(ready["type"], "ready", "first frame must be ready: {ready}");
        client.ready = ready;
        client
    }

    pub fn conversation(&self) -> String {
        self.ready["conversation"].as_str().expect("ready.conversation").to_owned()
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_message(&mut self, id: &str, text: &str) {
        self.send_json(json!({"type": "message", "id": id, "text": text})).await;
    }

    /// The next JSON frame; panics on timeout, close or a non-JSON frame.
    pub async fn next(&mut self) -> Value {
        match self.try_next().await {
            Ok(value) => value,
            Err(e) => panic!("expected a frame: {e:#}"),
        }
    }

    pub async fn try_next(&mut self) -> anyhow::Result<Value> {
        loop {
            let message = tokio::time::timeout(self.step, self.ws.next())
                .await
                .context("no frame within the step timeout")?
                .context("socket ended")??;
            match message {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(text.as_str()).context("frame is not JSON")?;
                    if frame["type"].as_str().is_some_and(|kind| self.ignored.contains(&kind)) {
                        continue;
                    }
                    return Ok(frame);
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(frame) => bail!("socket closed: {frame:?}"),
                other => bail!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame, which must have this type.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self.next().await;
        assert_eq!(frame["type"], kind, "expected a {kind} frame, got {frame}");
        frame
    }

    /// Sends a message and returns its ack and its streamed reply.
    pub async fn ask(&mut self, id: &str, text: &str) -> (Value, Reply) {
        self.send_message(id, text).await;
        let ack = self.expect("ack").await;
        assert_eq!(ack["id"], id);
        (ack, self.read_reply().await)
    }

    /// Reads `queued` frames and `reply.delta`s until `reply.done`,
    /// checking indexes and text.
    pub async fn read_reply(&mut self) -> Reply {
        let (mut queued, mut deltas) = (Vec::new(), Vec::new());
        loop {
            let frame = self.next().await;
            match frame["type"].as_str() {
                Some("queued") if deltas.is_empty() => queued.push(frame),
                Some("reply.delta") => deltas.push(frame),
                Some("reply.done") => {
                    let reply_id = frame["reply"].as_str().expect("reply id").to_owned();
                    for (i, delta) in deltas.iter().enumerate() {
                        assert_eq!(delta["index"], i, "delta indexes must be 0..n-1: {delta}");
                        assert_eq!(delta["reply"], reply_id.as_str());
                    }
                    let joined: String = deltas.iter().map(|d| d["text"].as_str().expect("delta text")).collect();
                    assert_eq!(
                        joined,
                        frame["text"].as_str().expect("done text"),
                        "deltas must add up to the done text"
                    );
                    return Reply { reply_id, queued, deltas, done: frame };
                }
                _ => panic!("expected reply.delta or reply.done, got {frame}"),
            }
        }
    }

    /// Reads until the hub closes the socket; returns the close frame.
    /// Other frames are skipped.
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            let message = tokio::time::timeout(STEP_TIMEOUT * 2, self.ws.next())
                .await
                .expect("the hub did not close the socket in time");
            match message {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// Sends a ping frame and waits for the pong, proving the socket still works.
    pub async fn assert_alive(&mut self) {
        self.send_json(json!({"type": "ping"})).await;
        self.expect("pong").await;
    }
}
