//! The writer half of a session: the only owner of the socket's sink.
//!
//! It drains the bounded outbound queue in bursts (feed every queued frame,
//! flush once), keeps durable events in seq order without duplicates (an
//! event at or below the last sent seq is skipped; a jump past the next seq
//! is filled from the log first, as is a `Resync` after the node's
//! subscription dropped), follows the conversation's log when it was lost
//! and recreated (the client gets `ready` with the new epoch and `error`
//! `history_lost`, then the new log from seq 1; events of the old log are
//! never sent after that), sends keepalive pings, and on cancellation sends
//! the close frame whose reason the [`SessionCloser`] recorded, or, when the
//! client closed first, the echo of the client's close frame. Every socket
//! write races the cancellation token, so a client that stops reading cannot
//! pin the task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::close_message;
use crate::conversations::Conversations;
use crate::event::{Cursor, LogEpoch, Step};
use crate::fanout::{Outbound, SessionCloser};
use crate::ids::ConversationKey;
use crate::protocol::ServerFrame;
use crate::store::Snapshot;

/// Frames written per flush at most.
pub(crate) const BURST: usize = 64;
/// Pauses before each new try to read a gap's events from the store (about
/// 1.5 s in all) before the session gives up and closes with 4503.
const GAP_READ_RETRIES: [Duration; 4] =
    [Duration::from_millis(100), Duration::from_millis(200), Duration::from_millis(400), Duration::from_millis(800)];
/// Reads a socket's missed events, with where the log stands (its epoch:
/// the gap may be a new log), after `after`, for a gap before `before`
/// (`u64::MAX`: a resync). A store that just came back gets a few more
/// tries; past them the error is returned, and the caller closes the socket
/// rather than skip past the gap (sending what comes after would tell the
/// client it has events it never got). A resync asks "did I miss
/// anything?": if the store cannot say yet, `None` (the next event's seq
/// will show any gap, which is then filled).
pub(crate) async fn read_log_gap(
    conversations: &Conversations,
    key: &ConversationKey,
    after: u64,
    before: u64,
) -> Result<Option<Snapshot>, crate::store::StoreError> {
    let resync = before == u64::MAX;
    let mut tries = if resync { [].iter() } else { GAP_READ_RETRIES.iter() };
    loop {
        let read = conversations.read_log(key, after).await;
        match read.and_then(|log| log.ok_or(crate::store::StoreError::ConversationNotFound)) {
            Ok(log) => return Ok(Some(log)),
            Err(error) if resync => {
                warn!(%error, after, "cannot re-read the event stream after a resync");
                return Ok(None);
            }
            Err(error) if tries.len() > 0 => {
                debug!(%error, after, "cannot fill a gap yet; retrying");
                tokio::time::sleep(*tries.next().unwrap_or(&Duration::ZERO)).await;
            }
            Err(error) => {
                warn!(%error, after, "cannot fill a gap in the event stream; closing the session");
                return Err(error);
            }
        }
    }
}

/// How long a closing socket gets to take its close frame.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Sink = SplitSink<WebSocket, Message>;

/// Where the session's durable stream stands, and how to repair it.
pub(super) struct Replay {
    pub conversations: Arc<Conversations>,
    pub key: ConversationKey,
    /// `ready` and the replayed events, sent before anything queued.
    pub intro: Vec<Utf8Bytes>,
    /// The durable events the client has (or is about to have).
    pub sent: Cursor,
    /// `fengda_hub_frame_delivery_seconds`, looked up once per session.
    pub delivery: metrics::Histogram,
    /// Set when a gap could not be filled from the store: the session then
    /// closes with 4503 instead of skipping events, and the client resumes
    /// from the last seq it really got.
    pub gap_unfilled: bool,
}

/// Not an `async fn`, so that its arguments are not kept twice in the
/// future (as arguments and as the locals they move into): it lives as long
/// as the socket.
#[allow(clippy::manual_async_fn, reason = "an async fn would keep its arguments twice")]
pub(super) fn run_writer(
    mut sink: Sink,
    mut queue: mpsc::Receiver<Box<Outbound>>,
    mut replay: Replay,
    closer: SessionCloser,
    first_ping: Duration,
    ping_interval: Duration,
) -> impl std::future::Future<Output = ()> {
    async move {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + first_ping, ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Grows on the first burst (`recv_many` reserves); an idle socket never pays for it.
        let mut burst = Vec::new();
        let intro = std::mem::take(&mut replay.intro);
        // One waiter for the session's life, not one registration per burst.
        let cancelled = closer.token().cancelled();
        tokio::pin!(cancelled);
        let result: Result<(), axum::Error> = async {
            tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(()),
                result = write_intro(&mut sink, intro) => result?,
            }
            loop {
                tokio::select! {
                    biased;
                    _ = &mut cancelled => return Ok(()),
                    received = queue.recv_many(&mut burst, BURST) => {
                        if received == 0 {
                            return Ok(());
                        }
                        tokio::select! {
                            biased;
                            _ = &mut cancelled => return Ok(()),
                            result = write_burst(&mut sink, &mut burst, &mut replay) => result?,
                        }
                    }
                    _ = ping.tick() => {
                        tokio::select! {
                            biased;
                            _ = &mut cancelled => return Ok(()),
                            result = sink.send(Message::Ping(Default::default())) => result?,
                        }
                    }
                }
            }
        }
        .await;
        let failed = result.is_err();
        if let Err(error) = result {
            if replay.gap_unfilled {
                closer.close(crate::protocol::close::UNAVAILABLE);
            } else {
                // Also what a write after the client's close frame gets.
                debug!(%error, "socket write failed");
                closer.close(crate::protocol::close::NORMAL);
            }
        }
        let reason = closer.reason();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            // Frames queued before the close (say, the error that explains it)
            // still go out first, unless the client is the reason we stop.
            if !failed && reason != crate::protocol::close::SLOW_CONSUMER {
                let queued = std::iter::from_fn(|| queue.try_recv().ok().map(|item| *item));
                for frame in frames_before_close(queued, &mut replay.sent) {
                    if sink.feed(Message::Text(frame)).await.is_err() {
                        break;
                    }
                }
            }
            // Refused once the client's own close frame has arrived: the
            // library has then queued its echo (RFC 6455 §5.5.1), which
            // `close` sends; otherwise `close` just flushes ours.
            let _ = sink.send(close_message(reason)).await;
            sink.close().await
        })
        .await;
    }
}

/// What a closing socket still gets of its queue: every non-durable frame,
/// and stored events only while they follow on from the last one sent (past
/// a gap or a resync the client must resume with `after` from the last seq
/// it got, or it would skip the gap). Advances `sent`.
fn frames_before_close(queued: impl Iterator<Item = Outbound>, sent: &mut Cursor) -> Vec<Utf8Bytes> {
    let mut frames = Vec::new();
    let mut in_order = true;
    for item in queued {
        match item {
            Outbound::Frame { frame, .. } => frames.push(frame),
            Outbound::Frames { frames: batch, .. } => frames.extend(batch),
            Outbound::Event { epoch, seq, frame, .. } => match sent.arrive(epoch, seq) {
                // Already sent (a local copy and its echo), or of a log left behind.
                Step::Seen | Step::Stale => {}
                Step::Next if in_order => {
                    frames.push(frame);
                    sent.advance(seq);
                }
                Step::Next | Step::Gap | Step::NewLog => in_order = false,
            },
            Outbound::Resync => in_order = false,
            // Only agents' sockets get these.
            Outbound::Watched { .. } | Outbound::Owner { .. } | Outbound::Note { .. } => {}
        }
    }
    frames
}

async fn write_intro(sink: &mut Sink, intro: Vec<Utf8Bytes>) -> Result<(), axum::Error> {
    for frame in intro {
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await
}

#[allow(clippy::vec_box, reason = "the items arrive boxed from the queue (see `SessionHandle::tx`)")]
async fn write_burst(sink: &mut Sink, burst: &mut Vec<Box<Outbound>>, replay: &mut Replay) -> Result<(), axum::Error> {
    // The oldest frame of this write, for the delivery-time metric.
    let mut oldest: Option<Instant> = None;
    for item in burst.drain(..) {
        match *item {
            Outbound::Frame { frame, queued_at } => {
                oldest = Some(oldest.map_or(queued_at, |o| o.min(queued_at)));
                sink.feed(Message::Text(frame)).await?
            }
            Outbound::Frames { frames, queued_at } => {
                oldest = Some(oldest.map_or(queued_at, |o| o.min(queued_at)));
                for frame in frames {
                    sink.feed(Message::Text(frame)).await?;
                }
            }
            Outbound::Event { epoch, seq, frame, queued_at } => {
                let mut step = replay.sent.arrive(epoch, seq);
                if step == Step::NewLog {
                    // Another log than the socket's: the log says which one
                    // is current (and the client is told if it is new).
                    Box::pin(fill_gap(sink, replay, u64::MAX)).await?;
                    step = replay.sent.arrive(epoch, seq);
                }
                if matches!(step, Step::Seen | Step::Stale | Step::NewLog) {
                    continue;
                }
                oldest = Some(oldest.map_or(queued_at, |o| o.min(queued_at)));
                if step == Step::Gap {
                    // Boxed: gaps are rare, and the writer's future should not carry this one.
                    Box::pin(fill_gap(sink, replay, seq)).await?;
                    if matches!(replay.sent.arrive(epoch, seq), Step::Seen | Step::Stale) {
                        // The log was recreated meanwhile: this one is of the old log.
                        continue;
                    }
                }
                sink.feed(Message::Text(frame)).await?;
                replay.sent.advance(seq);
            }
            Outbound::Resync => Box::pin(fill_gap(sink, replay, u64::MAX)).await?,
            // Only agents' sockets get these.
            Outbound::Watched { .. } | Outbound::Owner { .. } | Outbound::Note { .. } => {}
        }
    }
    sink.flush().await?;
    if let Some(oldest) = oldest {
        replay.delivery.record(oldest.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Sends the logged events between the last sent seq and `before`
/// (exclusive). If the log turns out to be another incarnation than the
/// socket's (it was lost and recreated), the client gets `ready` with the
/// new epoch and seq 0, then `error` `history_lost`, then every event of the
/// new log: what `ready` and a resume with the old `epoch` would give it.
async fn fill_gap(sink: &mut Sink, replay: &mut Replay, before: u64) -> Result<(), axum::Error> {
    let after = replay.sent.last();
    let mut log = match read_log_gap(&replay.conversations, &replay.key, after, before).await {
        Ok(Some(log)) => log,
        Ok(None) => return Ok(()),
        Err(error) => {
            replay.gap_unfilled = true;
            return Err(axum::Error::new(error));
        }
    };
    let conversation = replay.key.conversation().as_str();
    let (mut after, mut before) = (after, before);
    let epoch = LogEpoch::of(&log.epoch);
    if replay.sent.epoch() != Some(epoch) {
        if after > 0 {
            // From the new log's start (a read of the log as it is now).
            match read_log_gap(&replay.conversations, &replay.key, 0, u64::MAX).await {
                Ok(Some(whole)) if whole.epoch == log.epoch => log = whole,
                _ => return Ok(()),
            }
        }
        debug!(last = replay.sent.last(), "the conversation's log was recreated; starting over with the new one");
        sink.feed(Message::Text(ServerFrame::Ready { conversation, seq: 0, epoch: &log.epoch }.encode())).await?;
        sink.feed(Message::Text(super::history_lost())).await?;
        replay.sent.restart(epoch, 0);
        (after, before) = (0, u64::MAX);
    }
    for event in log.missed.iter().filter(|e| e.seq > after && e.seq < before) {
        sink.feed(Message::Text(event.message_frame(conversation))).await?;
        replay.sent.advance(event.seq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closing_socket_gets_stored_events_only_in_order() {
        let at = Instant::now();
        let frame = |seq: u64, text: &'static str| match seq {
            0 => Outbound::Frame { frame: Utf8Bytes::from_static(text), queued_at: at },
            seq => {
                Outbound::Event { epoch: LogEpoch::of("e"), seq, frame: Utf8Bytes::from_static(text), queued_at: at }
            }
        };
        let queued = vec![
            frame(0, "delta-1"),
            frame(5, "event-5"),
            Outbound::Frames {
                frames: vec![Utf8Bytes::from_static("delta-2"), Utf8Bytes::from_static("delta-3")],
                queued_at: at,
            },
            frame(5, "event-5-echo"),
            frame(6, "event-6"),
            Outbound::Resync,
            frame(8, "event-8"),
            frame(0, "error"),
        ];
        let mut sent = Cursor::at(4);
        let frames = frames_before_close(queued.into_iter(), &mut sent);
        let texts: Vec<_> = frames.iter().map(Utf8Bytes::as_str).collect();
        assert_eq!(texts, ["delta-1", "event-5", "delta-2", "delta-3", "event-6", "error"]);
        assert_eq!(sent.last(), 6, "the client resumes after 6 and gets 7 and 8 from the log");
        // A gap stops stored events the same way.
        let mut sent = Cursor::at(4);
        let frames = frames_before_close(vec![frame(6, "event-6"), frame(5, "event-5")].into_iter(), &mut sent);
        assert!(frames.is_empty());
        assert_eq!(sent.last(), 4);
        // An event of a log left behind is skipped; one of a new log stops
        // stored events (the client must be told first: `ready`, `history_lost`).
        let (old, new) = (LogEpoch::of("e"), LogEpoch::of("f"));
        let event =
            |epoch, seq, text| Outbound::Event { epoch, seq, frame: Utf8Bytes::from_static(text), queued_at: at };
        let mut sent = Cursor::in_epoch(old, 4);
        sent.restart(new, 0);
        let queued = vec![event(old, 5, "old-5"), event(new, 1, "new-1"), event(old, 6, "old-6"), frame(0, "delta")];
        let frames = frames_before_close(queued.into_iter(), &mut sent);
        assert_eq!(frames.iter().map(Utf8Bytes::as_str).collect::<Vec<_>>(), ["new-1", "delta"]);
        let mut sent = Cursor::in_epoch(old, 4);
        let frames = frames_before_close(vec![event(new, 1, "new-1"), event(old, 5, "old-5")].into_iter(), &mut sent);
        assert!(frames.is_empty(), "nothing of the new log before the client is told; nothing stored after a stop");
        assert_eq!((sent.epoch(), sent.last()), (Some(old), 4));
    }
}
