//! `fengda-bare`: the ceiling for `fengda-load --target bare` / `--compare`.
//!
//! A bare tokio-tungstenite server (no axum, no history, no backend, no gRPC)
//! speaking the minimum of the Fengda wire contract (docs/protocol.md) that
//! the load generator uses:
//!
//! - `GET /ws?…` upgrade (anything else is refused with 404), then
//!   `{"type":"ready","conversation":"<id>","seq":0,"epoch":"bare"}`
//!   (`<id>` is the `conversation` query parameter if given, else a new one);
//! - each `{"type":"message","id","text"}` gets `ack` (seq n), then a canned
//!   answer streamed with no delay as 40 `reply.delta` frames (index 0..39)
//!   and `reply.done` (seq n+1, `fallback` and `interrupted` false);
//! - `ping` gets `pong`; other frame types are ignored.
//!
//! It is written the straightforward efficient way, as a ceiling and not a
//! strawman: one task per connection, TCP_NODELAY, the same WebSocket buffer
//! sizes as the hub (1 KiB read, 16 KiB write), and each answer is fed frame
//! by frame into the socket and flushed once. The canned answer is the demo
//! knowledge base's Gold Card answer, split into the same 40 tokens, so the
//! frames are the same size as the hub's.
//!
//! Prints `listening on http://ADDR` as its first stdout line, like the hub.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The demo knowledge base's answer to "Tell me about the Gold Card".
const ANSWER: &str = "The Gold Card is our premium credit card. It earns two points per dollar on every \
purchase, includes free travel insurance and airport lounge access, and charges nothing extra on \
purchases abroad. You can apply online in about ten minutes.";

#[derive(Parser)]
#[command(name = "fengda-bare", about = "Bare tokio-tungstenite server: the ceiling for fengda-load")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
}

#[derive(Deserialize)]
struct ClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum ServerFrame<'a> {
    #[serde(rename = "ready")]
    Ready { conversation: &'a str, seq: u64, epoch: &'a str },
    #[serde(rename = "ack")]
    Ack { id: &'a str, seq: u64 },
    #[serde(rename = "reply.delta")]
    Delta { conversation: &'a str, reply: &'a str, index: u64, text: &'a str },
    #[serde(rename = "reply.done")]
    Done { conversation: &'a str, reply: &'a str, seq: u64, text: &'a str, fallback: bool, interrupted: bool },
    #[serde(rename = "pong")]
    Pong,
}

impl ServerFrame<'_> {
    fn message(&self) -> Message {
        Message::text(serde_json::to_string(self).expect("frames serialize"))
    }
}

/// Words with their leading whitespace, punctuation attached: 40 tokens.
fn tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == ' ' && i > start {
            out.push(&text[start..i]);
            start = i;
        }
    }
    out.push(&text[start..]);
    out
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// 32 hex digits, unique within this process.
fn new_id() -> String {
    let n = IDS.fetch_add(1, Ordering::Relaxed);
    let salt = std::process::id() as u64;
    format!("{salt:016x}{n:016x}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let addr: std::net::SocketAddr = cli.listen.parse().with_context(|| format!("listen address {}", cli.listen))?;
    // The hub's listen backlog (hub/src/lib.rs `LISTEN_BACKLOG`), so reconnect storms compare like with like.
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| format!("bind {addr}"))?;
    let listener: TcpListener = socket.listen(4096)?;
    println!("listening on http://{}", listener.local_addr()?);
    let tokens: &'static [&'static str] = Box::leak(tokens(ANSWER).into_boxed_slice());
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: back off briefly instead of spinning.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = connection(tcp, tokens).await;
        });
    }
}

// The handshake callback's error type (an HTTP response) is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn connection(tcp: TcpStream, tokens: &[&str]) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut conversation = None;
    let config = WebSocketConfig::default().read_buffer_size(1024).write_buffer_size(16 * 1024);
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != "/ws" {
            let mut refused = ErrorResponse::new(Some("not found".into()));
            *refused.status_mut() = StatusCode::NOT_FOUND;
            return Err(refused);
        }
        conversation = request.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, v)| *k == "conversation" && !v.is_empty())
                .map(|(_, v)| v.to_owned())
        });
        Ok(response)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await?;
    let conversation = conversation.unwrap_or_else(new_id);
    ws.send(ServerFrame::Ready { conversation: &conversation, seq: 0, epoch: "bare" }.message()).await?;
    let mut seq = 0u64;
    while let Some(message) = ws.next().await {
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(frame) = serde_json::from_str::<ClientFrame>(text.as_str()) else { continue };
        match frame.kind {
            "message" => {
                let id = frame.id.unwrap_or_default();
                seq += 1;
                ws.feed(ServerFrame::Ack { id: &id, seq }.message()).await?;
                let reply = format!("r-{}", new_id());
                for (index, text) in tokens.iter().enumerate() {
                    let delta =
                        ServerFrame::Delta { conversation: &conversation, reply: &reply, index: index as u64, text };
                    ws.feed(delta.message()).await?;
                }
                seq += 1;
                let done = ServerFrame::Done {
                    conversation: &conversation,
                    reply: &reply,
                    seq,
                    text: ANSWER,
                    fallback: false,
                    interrupted: false,
                };
                ws.feed(done.message()).await?;
                ws.flush().await?;
            }
            "ping" => ws.send(ServerFrame::Pong.message()).await?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn answer_is_forty_tokens_that_add_up() {
        let tokens = super::tokens(super::ANSWER);
        assert_eq!(tokens.len(), 40);
        assert_eq!(tokens.concat(), super::ANSWER);
    }
}
