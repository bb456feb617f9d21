//! The writer half of a session: the only owner of the socket's sink.
//!
//! It drains the bounded outbound queue in bursts (feed every queued frame,
//! flush once), skips durable events the client already got during replay,
//! sends keepalive pings, and on cancellation sends the close frame whose
//! reason the [`SessionCloser`] recorded. Every socket write races the
//! cancellation token, so a client that stops reading cannot pin the task.

use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use tokio::sync::mpsc;
use tracing::debug;

use super::close_message;
use crate::router::{Outbound, SessionCloser};

/// Frames written per flush at most.
const BURST: usize = 64;
/// How long a closing socket gets to take its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Sink = SplitSink<WebSocket, Message>;

pub(super) async fn run_writer(
    mut sink: Sink,
    mut queue: mpsc::Receiver<Outbound>,
    intro: Vec<Utf8Bytes>,
    mut sent_up_to: u64,
    closer: SessionCloser,
    ping_interval: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut burst = Vec::with_capacity(BURST);
    let result: Result<(), axum::Error> = async {
        tokio::select! {
            biased;
            _ = closer.token().cancelled() => return Ok(()),
            result = write_intro(&mut sink, intro) => result?,
        }
        loop {
            tokio::select! {
                biased;
                _ = closer.token().cancelled() => return Ok(()),
                received = queue.recv_many(&mut burst, BURST) => {
                    if received == 0 {
                        return Ok(());
                    }
                    tokio::select! {
                        biased;
                        _ = closer.token().cancelled() => return Ok(()),
                        result = write_burst(&mut sink, &mut burst, &mut sent_up_to) => result?,
                    }
                }
                _ = ping.tick() => {
                    tokio::select! {
                        biased;
                        _ = closer.token().cancelled() => return Ok(()),
                        result = sink.send(Message::Ping(Default::default())) => result?,
                    }
                }
            }
        }
    }
    .await;
    if let Err(error) = result {
        debug!(%error, "socket write failed");
        closer.close(crate::protocol::close::NORMAL);
        return;
    }
    let reason = closer.reason();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(close_message(reason))).await;
}

async fn write_intro(sink: &mut Sink, intro: Vec<Utf8Bytes>) -> Result<(), axum::Error> {
    for frame in intro {
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await
}

async fn write_burst(sink: &mut Sink, burst: &mut Vec<Outbound>, sent_up_to: &mut u64) -> Result<(), axum::Error> {
    for item in burst.drain(..) {
        if item.seq != 0 {
            if item.seq <= *sent_up_to {
                continue;
            }
            *sent_up_to = item.seq;
        }
        sink.feed(Message::Text(item.frame)).await?;
    }
    sink.flush().await
}
