//! Local fan-out: delivers a conversation's events to the sockets on this node.
//!
//! Every session of a conversation registers a [`SessionHandle`] here. An
//! event is encoded once per node and the same bytes are pushed into each
//! session's bounded outbound queue with `try_send`: delivery never waits, so
//! one stalled client cannot slow the publisher or the other sockets. A
//! session whose queue is full is closed as a slow consumer (4008) instead of
//! being allowed to grow memory.
//!
//! The fan-out knows nothing about storage. Stores call it: the in-memory
//! store directly on append, a clustered store from its subscriber.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Cursor, Step, StoredEvent};
use crate::ids::{ConversationKey, SessionId};
use crate::protocol::close::{self, CloseReason};
use crate::protocol::{ReplyTiming, Role, ServerFrame};

/// One item queued for a socket's writer.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A durable event's frame (`message`, `ack`, `reply.done`): the writer
    /// puts it through the socket's [`Cursor`], skipping events it already
    /// sent and filling gaps from the log.
    Event {
        seq: u64,
        frame: Utf8Bytes,
        /// When the fan-out queued it (for the delivery-time metric).
        queued_at: Instant,
    },
    /// A frame that is not a durable event (a delta, `queued`, a pong, an
    /// error, the ack of a duplicate): sent as it comes.
    Frame { frame: Utf8Bytes, queued_at: Instant },
    /// Non-durable frames that were ready together (tokens of a reply that
    /// arrived at once), in order: one hand-over to the writer for all of them.
    Frames { frames: Vec<Utf8Bytes>, queued_at: Instant },
    /// This node may have missed events (its subscription dropped): the
    /// writer re-reads the log after the last seq it sent.
    Resync,
}

impl Outbound {
    pub fn ephemeral(frame: Utf8Bytes) -> Self {
        Self::Frame { frame, queued_at: Instant::now() }
    }

    /// The frame of a single-frame item.
    pub fn frame(&self) -> Option<&Utf8Bytes> {
        match self {
            Self::Event { frame, .. } | Self::Frame { frame, .. } => Some(frame),
            Self::Frames { .. } | Self::Resync => None,
        }
    }
}

/// Ends one session, remembering the first reason given so the writer can
/// send the matching close code.
#[derive(Clone, Debug, Default)]
pub struct SessionCloser {
    token: CancellationToken,
    reason: Arc<OnceLock<CloseReason>>,
}

impl SessionCloser {
    pub fn child_of(parent: &CancellationToken) -> Self {
        Self { token: parent.child_token(), reason: Arc::default() }
    }

    /// Asks the session to close; the first reason wins. A session already
    /// cancelled by hub shutdown keeps "going away".
    pub fn close(&self, reason: CloseReason) {
        let reason = if self.token.is_cancelled() { close::GOING_AWAY } else { reason };
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The reason the session is closing. A cancelled parent token (hub
    /// shutdown) without a reason of its own means "going away".
    pub fn reason(&self) -> CloseReason {
        match self.reason.get() {
            Some(reason) => *reason,
            None if self.token.is_cancelled() => close::GOING_AWAY,
            None => close::NORMAL,
        }
    }
}

/// The fan-out's view of one socket: its queue and a way to close it.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub id: SessionId,
    /// Boxed items: a tokio channel allocates its first block of 32 slots up
    /// front, which for 40-byte items was the largest part of an idle
    /// socket's memory after the socket buffer; a box per frame costs less.
    pub tx: mpsc::Sender<Box<Outbound>>,
    pub closer: SessionCloser,
}

impl SessionHandle {
    /// Queues a frame without waiting; a full queue closes the session as a
    /// slow consumer. Returns whether the frame was queued.
    pub fn push(&self, item: Outbound) -> bool {
        match self.tx.try_send(Box::new(item)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.closer.token().is_cancelled() {
                    metrics::counter!(crate::metric::SLOW_CONSUMER_CLOSES).increment(1);
                    tracing::info!(session_id = %self.id, "outbound queue full; closing as a slow consumer");
                }
                self.closer.close(close::SLOW_CONSUMER);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// This node's sessions, by conversation.
#[derive(Debug)]
pub struct FanOut {
    /// foldhash, not SipHash: every delta looks its conversation up here, and
    /// hashing the key was a tenth of the hub's instructions per token.
    /// (Still seeded per process, so keys cannot be chosen to collide.)
    sessions: DashMap<ConversationKey, Local, foldhash::fast::RandomState>,
    /// Sessions one conversation may have on this node
    /// (`conversation.max_sockets`): each event is pushed to every one, so
    /// this bounds what one conversation's traffic costs the node.
    max_sockets: usize,
}

impl Default for FanOut {
    fn default() -> Self {
        Self::with_max_sockets(usize::MAX)
    }
}

/// A conversation already has `conversation.max_sockets` sessions on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationFull;

/// One conversation's sessions on this node.
#[derive(Debug, Default)]
struct Local {
    handles: Vec<SessionHandle>,
    /// The durable events handed to these sessions: events come twice in
    /// cluster mode (the appending node's own copy, then the pub/sub echo),
    /// and an appender's copy must not overtake an earlier event.
    delivered: Cursor,
}

impl FanOut {
    pub fn with_max_sockets(max_sockets: usize) -> Self {
        Self { sessions: DashMap::default(), max_sockets }
    }

    /// Adds a session; returns true when it is the conversation's first on
    /// this node, or refuses it when the conversation is full here.
    pub fn join(&self, key: &ConversationKey, handle: SessionHandle) -> Result<bool, ConversationFull> {
        let mut entry = self.sessions.entry(key.clone()).or_default();
        if entry.handles.len() >= self.max_sockets {
            return Err(ConversationFull);
        }
        entry.handles.push(handle);
        Ok(entry.handles.len() == 1)
    }

    /// The conversation's only session on this node has read the log up to
    /// `seq`: later copies of those events are dropped, and this node's next
    /// append can be delivered at once. Does nothing once a second session
    /// joined (its own read may be older).
    pub fn delivered_up_to(&self, key: &ConversationKey, seq: u64) {
        if let Some(mut local) = self.sessions.get_mut(key)
            && local.handles.len() == 1
        {
            local.delivered.advance(seq);
        }
    }

    /// Removes a session; returns true when it was the conversation's last on this node.
    pub fn leave(&self, key: &ConversationKey, id: SessionId) -> bool {
        self.sessions
            .remove_if_mut(key, |_, local| {
                local.handles.retain(|h| h.id != id);
                local.handles.is_empty()
            })
            .is_some()
    }

    /// Asks every session on this node to re-read its conversation's log.
    pub fn resync_all(&self) {
        for entry in self.sessions.iter() {
            for handle in &entry.value().handles {
                handle.push(Outbound::Resync);
            }
        }
    }

    /// Number of sessions of this conversation on this node.
    pub fn local_sessions(&self, key: &ConversationKey) -> usize {
        self.sessions.get(key).map_or(0, |local| local.handles.len())
    }

    /// Delivers frames that are not durable events (`reply.delta`s,
    /// `queued`), in order, to every session: one queue item per session
    /// however many frames. The last session gets the frames themselves:
    /// most conversations have one socket.
    pub fn deliver_frames(&self, key: &ConversationKey, mut frames: Vec<Utf8Bytes>) {
        let Some(local) = self.sessions.get(key) else { return };
        let queued_at = Instant::now();
        let item = |mut frames: Vec<Utf8Bytes>| match frames.len() {
            1 => Outbound::Frame { frame: frames.remove(0), queued_at },
            _ => Outbound::Frames { frames, queued_at },
        };
        if frames.is_empty() {
            return;
        }
        if let Some((last, others)) = local.handles.split_last() {
            for handle in others {
                handle.push(item(frames.clone()));
            }
            last.push(item(std::mem::take(&mut frames)));
        }
    }

    /// Delivers a durable event, unless these sessions already have it.
    /// Callers deliver a conversation's events in seq order (a jump is filled
    /// from the log by each session's writer). `origin` is the session that
    /// sent a customer message: it gets an `ack`, the other sessions the
    /// `message` itself. `timing` rides along on a `reply.done` (it is not stored).
    pub fn deliver_event(
        &self,
        key: &ConversationKey,
        event: &StoredEvent,
        origin: Option<SessionId>,
        timing: Option<&ReplyTiming>,
    ) {
        // A gap is handed on too: each session's writer fills it from the log.
        self.deliver(key, event, origin, timing, |step| step != Step::Seen);
    }

    /// Delivers an event this node just appended, but only if it is the next
    /// one these sessions need: an append that finished out of order waits
    /// for its copy through pub/sub, which comes in order.
    pub fn deliver_appended(
        &self,
        key: &ConversationKey,
        event: &StoredEvent,
        origin: Option<SessionId>,
        timing: Option<&ReplyTiming>,
    ) {
        self.deliver(key, event, origin, timing, |step| step == Step::Next);
    }

    fn deliver(
        &self,
        key: &ConversationKey,
        event: &StoredEvent,
        origin: Option<SessionId>,
        timing: Option<&ReplyTiming>,
        wanted: impl Fn(Step) -> bool,
    ) {
        let Some(mut local) = self.sessions.get_mut(key) else { return };
        if !wanted(local.delivered.step(event.seq)) {
            return;
        }
        local.delivered.advance(event.seq);
        let conversation = key.conversation.as_str();
        // The frame every session gets, except the one that sent a customer message (an `ack`).
        let shared = || match event.from {
            Role::Assistant => ServerFrame::ReplyDone {
                conversation,
                reply: &event.id,
                seq: event.seq,
                text: &event.text,
                fallback: event.fallback,
                interrupted: event.interrupted,
                cancelled: event.cancelled,
                timing,
            }
            .encode(),
            Role::Customer | Role::Agent | Role::System => event.message_frame(conversation),
        };
        let origin = origin.filter(|_| event.from == Role::Customer);
        let queued_at = Instant::now();
        // Encoded only if someone needs it (a lone customer socket needs just
        // its ack), and moved rather than cloned into the last session.
        let mut encoded = None;
        let last = local.handles.len().saturating_sub(1);
        for (i, handle) in local.handles.iter().enumerate() {
            let frame = if origin == Some(handle.id) {
                ServerFrame::Ack { id: &event.id, seq: event.seq }.encode()
            } else if i == last {
                encoded.take().unwrap_or_else(shared)
            } else {
                encoded.get_or_insert_with(shared).clone()
            };
            handle.push(Outbound::Event { seq: event.seq, frame, queued_at });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConversationId, TenantId};

    fn key() -> ConversationKey {
        ConversationKey {
            tenant: TenantId::parse("t").unwrap(),
            conversation: ConversationId::parse(&"c".repeat(32)).unwrap(),
        }
    }

    fn session(capacity: usize) -> (SessionHandle, mpsc::Receiver<Box<Outbound>>) {
        let (tx, rx) = mpsc::channel(capacity);
        let handle =
            SessionHandle { id: SessionId::next(), tx, closer: SessionCloser::child_of(&CancellationToken::new()) };
        (handle, rx)
    }

    fn customer_event(seq: u64) -> StoredEvent {
        StoredEvent {
            seq,
            from: Role::Customer,
            id: format!("m{seq}"),
            text: "hi".into(),
            fallback: false,
            interrupted: false,
            cancelled: false,
            at_ms: 0,
        }
    }

    #[test]
    fn origin_gets_ack_and_others_get_the_message_sharing_bytes() {
        let fanout = FanOut::default();
        let (a, mut a_rx) = session(8);
        let (b, mut b_rx) = session(8);
        let (c, mut c_rx) = session(8);
        assert_eq!(fanout.join(&key(), a.clone()), Ok(true));
        assert_eq!(fanout.join(&key(), b), Ok(false));
        fanout.join(&key(), c).unwrap();
        fanout.deliver_event(&key(), &customer_event(1), Some(a.id), None);
        assert!(a_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"ack""#));
        let Outbound::Event { seq, frame: b_frame, .. } = *b_rx.try_recv().unwrap() else { panic!("an event") };
        let c_frame = c_rx.try_recv().unwrap();
        assert!(b_frame.as_str().contains(r#""type":"message""#));
        assert_eq!(seq, 1);
        // One encoding shared by both sockets, not one copy each.
        assert_eq!(b_frame.as_str().as_ptr(), c_frame.frame().unwrap().as_str().as_ptr());
    }

    #[test]
    fn a_lone_sender_gets_its_ack_and_a_last_joined_sender_still_gets_an_ack() {
        let fanout = FanOut::default();
        let (a, mut a_rx) = session(8);
        fanout.join(&key(), a.clone()).unwrap();
        fanout.deliver_event(&key(), &customer_event(1), Some(a.id), None);
        assert!(a_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"ack""#));
        assert!(a_rx.try_recv().is_err(), "one frame: the ack");
        // The sender joined last: the earlier socket gets the message, the sender its ack.
        let (b, mut b_rx) = session(8);
        fanout.join(&key(), b.clone()).unwrap();
        fanout.deliver_event(&key(), &customer_event(2), Some(b.id), None);
        assert!(a_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"message""#));
        assert!(b_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"ack""#));
    }

    #[test]
    fn an_appenders_copy_never_overtakes_and_each_event_is_delivered_once() {
        let fanout = FanOut::default();
        let (a, mut a_rx) = session(16);
        fanout.join(&key(), a.clone()).unwrap();
        let mut seqs = || {
            let mut seqs = Vec::new();
            while let Ok(item) = a_rx.try_recv() {
                if let Outbound::Event { seq, .. } = *item {
                    seqs.push(seq);
                }
            }
            seqs
        };
        // seq 2 was appended here before seq 1 (appended elsewhere) arrived: it waits for its echo.
        fanout.deliver_appended(&key(), &customer_event(2), None, None);
        assert_eq!(seqs(), [] as [u64; 0]);
        fanout.deliver_event(&key(), &customer_event(1), None, None);
        fanout.deliver_event(&key(), &customer_event(2), None, None);
        // The next append goes out at once, and its echo is dropped.
        fanout.deliver_appended(&key(), &customer_event(3), Some(a.id), None);
        fanout.deliver_event(&key(), &customer_event(3), None, None);
        assert_eq!(seqs(), [1, 2, 3]);
        // A first session that read the log up to 7 takes the append of 8 at once.
        fanout.delivered_up_to(&key(), 7);
        fanout.deliver_appended(&key(), &customer_event(8), None, None);
        assert_eq!(seqs(), [8]);
    }

    #[test]
    fn full_queue_closes_the_session_as_slow_consumer() {
        let fanout = FanOut::default();
        let (slow, _rx) = session(1);
        fanout.join(&key(), slow.clone()).unwrap();
        let frame = Utf8Bytes::from_static("{}");
        fanout.deliver_frames(&key(), vec![frame.clone(), frame.clone()]);
        assert!(!slow.closer.token().is_cancelled(), "a batch is one item");
        fanout.deliver_frames(&key(), vec![frame.clone()]);
        assert!(slow.closer.token().is_cancelled());
        assert_eq!(slow.closer.reason(), close::SLOW_CONSUMER);
    }

    #[test]
    fn a_full_conversation_refuses_another_session_until_one_leaves() {
        let fanout = FanOut::with_max_sockets(2);
        let (a, _a_rx) = session(1);
        let (b, _b_rx) = session(1);
        let (c, _c_rx) = session(1);
        fanout.join(&key(), a.clone()).unwrap();
        fanout.join(&key(), b).unwrap();
        assert_eq!(fanout.join(&key(), c.clone()), Err(ConversationFull));
        assert_eq!(fanout.local_sessions(&key()), 2);
        fanout.leave(&key(), a.id);
        assert_eq!(fanout.join(&key(), c), Ok(false));
    }

    #[test]
    fn leave_reports_the_last_session() {
        let fanout = FanOut::default();
        let (a, _a_rx) = session(1);
        let (b, _b_rx) = session(1);
        fanout.join(&key(), a.clone()).unwrap();
        fanout.join(&key(), b.clone()).unwrap();
        assert!(!fanout.leave(&key(), a.id));
        assert!(fanout.leave(&key(), b.id));
        assert_eq!(fanout.local_sessions(&key()), 0);
    }
}
