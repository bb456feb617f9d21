//! What a customer's socket writes ([`Replay`], its [`Writes`]): durable
//! events in seq order without duplicates (an event at or below the last
//! sent seq is skipped; a jump past the next seq is filled from the log
//! first, as is a `Resync` after the node's subscription dropped), the
//! conversation's new log when it was lost and recreated (the client gets
//! `ready` with the new epoch and `error` `history_lost`, then the new log
//! from seq 1; events of the old log are never sent after that), and on a
//! close the queued frames that still follow on. The loop around it is
//! [`crate::writer`]'s.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message, Utf8Bytes};
use futures::SinkExt;
use tracing::debug;

use crate::conversations::Conversations;
#[cfg(test)]
use crate::event::OwnerEpoch;
use crate::event::{Cursor, LogEpoch, Step};
use crate::fanout::Outbound;
use crate::ids::ConversationKey;
use crate::protocol::ServerFrame;
use crate::writer::{Sink, WriteError, Writes, read_log_gap};

/// Where the session's durable stream stands, and how to repair it.
pub(super) struct Replay {
    pub conversations: Arc<Conversations>,
    pub key: ConversationKey,
    /// `ready` and the replayed events, sent before anything queued.
    pub intro: Vec<Utf8Bytes>,
    /// The durable events the client has (or is about to have), and the
    /// latest owner change it was told of (by its snapshot, or an event
    /// sent since): the frames of a reply it takes over are dropped
    /// ([`Outbound::Frames`], [`Cursor::fences_off`]).
    pub sent: Cursor,
    /// `fengda_hub_frame_delivery_seconds`, looked up once per session.
    pub delivery: metrics::Histogram,
}

impl Writes for Replay {
    /// A customer's reader hands its writer nothing.
    type Command = Infallible;

    fn intro(&mut self) -> Vec<Utf8Bytes> {
        std::mem::take(&mut self.intro)
    }

    #[allow(clippy::vec_box, reason = "the items arrive boxed from the queue (see `SessionHandle::tx`)")]
    async fn burst(&mut self, sink: &mut Sink<'_>, burst: &mut Vec<Box<Outbound>>) -> Result<(), WriteError> {
        // The oldest frame of this write, for the delivery-time metric.
        let mut oldest: Option<Instant> = None;
        for item in burst.drain(..) {
            match *item {
                Outbound::Frame { frame, queued_at } => {
                    oldest = Some(oldest.map_or(queued_at, |o| o.min(queued_at)));
                    sink.feed(Message::Text(frame)).await?
                }
                Outbound::Frames { frames, asked, queued_at } => {
                    if self.sent.fences_off(asked) {
                        continue;
                    }
                    oldest = Some(oldest.map_or(queued_at, |o| o.min(queued_at)));
                    for frame in frames {
                        sink.feed(Message::Text(frame)).await?;
                    }
                }
                Outbound::Event { epoch, seq, frame, queued_at } => {
                    let mut step = self.sent.arrive(epoch, seq);
                    if step == Step::NewLog {
                        // Another log than the socket's: the log says which one
                        // is current (and the client is told if it is new).
                        Box::pin(fill_gap(sink, self, u64::MAX)).await?;
                        step = self.sent.arrive(epoch, seq);
                    }
                    if matches!(step, Step::Seen | Step::Stale | Step::NewLog) {
                        continue;
                    }
                    oldest = Some(oldest.map_or(queued_at, |o| o.min(queued_at)));
                    if step == Step::Gap {
                        // Boxed: gaps are rare, and the writer's future should not carry this one.
                        Box::pin(fill_gap(sink, self, seq)).await?;
                        if matches!(self.sent.arrive(epoch, seq), Step::Seen | Step::Stale) {
                            // The log was recreated meanwhile: this one is of the old log.
                            continue;
                        }
                    }
                    sink.feed(Message::Text(frame)).await?;
                    self.sent.advance(seq);
                }
                Outbound::Resync => Box::pin(fill_gap(sink, self, u64::MAX)).await?,
                // Its event was just sent (or read from the log): only the fence moves.
                Outbound::Owner { change, .. } => _ = self.sent.learn_owner(change),
                // Only agents' sockets get these.
                Outbound::Watched { .. } | Outbound::Note { .. } => {}
            }
        }
        sink.flush().await?;
        if let Some(oldest) = oldest {
            self.delivery.record(oldest.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn command(&mut self, _: &mut Sink<'_>, command: Infallible) -> Result<(), WriteError> {
        match command {}
    }

    fn before_close(&mut self, queued: &mut dyn Iterator<Item = Outbound>) -> Vec<Utf8Bytes> {
        frames_before_close(queued, &mut self.sent)
    }

    async fn finish(&mut self) {}
}

/// What a closing socket still gets of its queue: every non-durable frame
/// (but a reply's that `sent` fences off), and stored events only while
/// they follow on from the last one sent (past a gap or a resync the client
/// must resume with `after` from the last seq it got, or it would skip the
/// gap). Advances `sent`.
fn frames_before_close(queued: impl Iterator<Item = Outbound>, sent: &mut Cursor) -> Vec<Utf8Bytes> {
    let mut frames = Vec::new();
    let mut in_order = true;
    for item in queued {
        match item {
            Outbound::Frame { frame, .. } => frames.push(frame),
            Outbound::Frames { frames: batch, asked, .. } => {
                if !sent.fences_off(asked) {
                    frames.extend(batch);
                }
            }
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
            Outbound::Owner { change, .. } => _ = sent.learn_owner(change),
            // Only agents' sockets get these.
            Outbound::Watched { .. } | Outbound::Note { .. } => {}
        }
    }
    frames
}

/// Sends the logged events between the last sent seq and `before`
/// (exclusive). If the log turns out to be another incarnation than the
/// socket's (it was lost and recreated), the client gets `ready` with the
/// new epoch and seq 0, then `error` `history_lost`, then every event of the
/// new log: what `ready` and a resume with the old `epoch` would give it.
async fn fill_gap(sink: &mut Sink<'_>, replay: &mut Replay, before: u64) -> Result<(), WriteError> {
    let after = replay.sent.last();
    let Some(mut log) = read_log_gap(&replay.conversations, &replay.key, after, before).await? else {
        return Ok(());
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
        // The new log's owner epochs start again, told by its events below.
        replay.sent.restart(epoch, 0);
        (after, before) = (0, u64::MAX);
    }
    for event in log.missed.iter().filter(|e| e.seq > after && e.seq < before) {
        sink.feed(Message::Text(event.message_frame(conversation))).await?;
        replay.sent.advance(event.seq);
        replay.sent.raise_owner(event.owner_epoch.unwrap_or(0));
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
                asked: OwnerEpoch { log: LogEpoch::of("e"), epoch: 0 },
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

    #[test]
    fn a_closing_socket_gets_no_frame_of_a_reply_taken_over_before() {
        let at = Instant::now();
        let (log, old_log) = (LogEpoch::of("e"), LogEpoch::of("d"));
        let (in_log, in_old) = (|epoch| OwnerEpoch { log, epoch }, |epoch| OwnerEpoch { log: old_log, epoch });
        let reply = |asked, text| Outbound::Frames { frames: vec![Utf8Bytes::from_static(text)], asked, queued_at: at };
        let joined =
            Outbound::Event { epoch: log, seq: 5, frame: Utf8Bytes::from_static("agent_joined"), queued_at: at };
        let owner = |change| Outbound::Owner { change, frame: Utf8Bytes::from_static("owner") };
        let queued = vec![
            reply(in_log(1), "delta-1"),
            joined,
            owner(in_log(2)),
            reply(in_log(1), "delta-2"),
            reply(in_log(2), "queued"),
            reply(in_log(3), "delta-3"),
        ];
        let mut sent = Cursor::in_epoch(log, 4).with_owner(1);
        let frames = frames_before_close(queued.into_iter(), &mut sent);
        let texts: Vec<_> = frames.iter().map(Utf8Bytes::as_str).collect();
        let nothing_older = "nothing of epoch 1 after the change to 2, and no `owner` frame";
        assert_eq!(texts, ["delta-1", "agent_joined", "queued", "delta-3"], "{nothing_older}");
        let fenced = sent.fences_off(in_log(1)) && !sent.fences_off(in_log(2));
        assert!(fenced, "the `owner` item raised the fence");
        // A socket whose snapshot told it of the change drops them from the start.
        let mut sent = Cursor::in_epoch(log, 5).with_owner(2);
        assert!(frames_before_close(vec![reply(in_log(1), "delta-1")].into_iter(), &mut sent).is_empty());
        // A change of a log the socket has left (queued behind the events
        // that moved it to the recreated log) does not fence the new log's replies.
        let mut sent = Cursor::in_epoch(old_log, 7);
        sent.restart(log, 1);
        let queued = vec![owner(in_old(3)), reply(in_log(0), "new-log-delta"), reply(in_old(3), "old-log-delta")];
        let frames = frames_before_close(queued.into_iter(), &mut sent);
        assert_eq!(frames, ["new-log-delta", "old-log-delta"], "no takeover in the new log yet");
        // One in the new log takes over the lost log's reply, whatever its owner epoch.
        let queued = vec![owner(in_log(1)), reply(in_old(3), "old-log-delta"), reply(in_log(1), "agent-era")];
        assert_eq!(frames_before_close(queued.into_iter(), &mut sent), ["agent-era"]);
    }
}
