//! One socket as the fan-out sees it: the items queued for its writer, its
//! bounded queue, and the way to close it.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::OwnerEpoch;
use crate::ids::{ConversationKey, SessionId};
use crate::protocol::Viewer;
use crate::protocol::close::{self, CloseReason};

/// One item queued for a socket's writer.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A durable event's frame (`message`, `ack`, `reply.done`) of the log
    /// incarnation `epoch`: the writer puts it through the socket's
    /// [`Cursor`](crate::event::Cursor), skipping events it already sent
    /// and filling gaps from the log.
    Event {
        epoch: crate::event::LogEpoch,
        seq: u64,
        frame: Utf8Bytes,
        /// When the fan-out queued it (for the delivery-time metric).
        queued_at: Instant,
    },
    /// A frame that is neither a durable event nor a reply's (a pong, an
    /// error, the ack of a duplicate, typing, presence): sent as it comes.
    Frame { frame: Utf8Bytes, queued_at: Instant },
    /// A reply's non-durable frames (its `reply.delta`s, `queued`) that were
    /// ready together, in order, of the reply `asked` under that owner
    /// epoch: one hand-over to the writer for all of them. A writer that has
    /// sent its socket an owner change that takes the reply over
    /// ([`Outbound::Owner`], [`Cursor::fences_off`]) drops them, so no frame
    /// of a taken-over reply follows `agent_joined` on any socket, even one
    /// that joined while they were on their way (its snapshot told it of the
    /// change before the fan-out's entry of it could).
    ///
    /// [`Cursor::fences_off`]: crate::event::Cursor::fences_off
    Frames { frames: Vec<Utf8Bytes>, asked: OwnerEpoch, queued_at: Instant },
    /// This node may have missed events (its subscription dropped): the
    /// writer re-reads the log after the last seq it sent.
    Resync,
    /// An agent-only `note` frame (the note's own `seq`: an agent's writer
    /// sends each note once).
    Note { seq: u64, frame: Utf8Bytes },
    /// The owner changed, beginning `change`: queued right after the
    /// change's event, for every socket. Each writer raises its fence of
    /// [`Outbound::Frames`] to it, but only while it follows that log (owner
    /// epochs start again in a recreated log); an agent's writer also sends
    /// the `owner` frame, once per epoch however it learns of it. A
    /// customer's socket never gets that frame.
    Owner { change: OwnerEpoch, frame: Utf8Bytes },
    /// An item for an agent's socket, about one of the conversations it
    /// watches (an agent socket has one delivery cursor per conversation).
    Watched { key: ConversationKey, item: Box<Outbound> },
}

impl Outbound {
    pub fn ephemeral(frame: Utf8Bytes) -> Self {
        Self::Frame { frame, queued_at: Instant::now() }
    }

    /// The frame of a single-frame item.
    pub fn frame(&self) -> Option<&Utf8Bytes> {
        match self {
            Self::Event { frame, .. } | Self::Frame { frame, .. } => Some(frame),
            Self::Owner { frame, .. } | Self::Note { frame, .. } => Some(frame),
            Self::Frames { .. } | Self::Resync | Self::Watched { .. } => None,
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

/// Who reads a socket: what the fan-out may push to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audience {
    /// A customer's socket: never gets agent-only frames (notes, presence,
    /// owner changes, agents' note typing).
    Customer,
    /// An agent's socket (`viewer`: who it is, as presence lists it); as a
    /// watcher of a conversation (the handle the fan-out holds), every item
    /// pushed is wrapped in [`Outbound::Watched`] with the conversation.
    Agent { watching: Option<ConversationKey>, viewer: Arc<Viewer> },
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
    pub audience: Audience,
}

impl SessionHandle {
    /// A customer's socket.
    pub fn customer(id: SessionId, tx: mpsc::Sender<Box<Outbound>>, closer: SessionCloser) -> Self {
        Self { id, tx, closer, audience: Audience::Customer }
    }

    /// An agent's socket (its own frames: `ready`, `pong`, errors).
    pub fn agent(id: SessionId, tx: mpsc::Sender<Box<Outbound>>, closer: SessionCloser, viewer: Viewer) -> Self {
        Self { id, tx, closer, audience: Audience::Agent { watching: None, viewer: Arc::new(viewer) } }
    }

    /// The same agent's socket as a watcher of `key`.
    pub fn watching(&self, key: ConversationKey) -> Self {
        let viewer = match &self.audience {
            Audience::Agent { viewer, .. } => viewer.clone(),
            Audience::Customer => Arc::new(Viewer { agent: String::new(), name: String::new() }),
        };
        Self { audience: Audience::Agent { watching: Some(key), viewer }, ..self.clone() }
    }

    /// The agent, when this is an agent's socket.
    pub fn viewer(&self) -> Option<&Viewer> {
        match &self.audience {
            Audience::Agent { viewer, .. } => Some(viewer),
            Audience::Customer => None,
        }
    }

    pub fn is_agent(&self) -> bool {
        matches!(self.audience, Audience::Agent { .. })
    }

    /// Queues a frame without waiting; a full queue closes the session as a
    /// slow consumer. Returns whether the frame was queued.
    pub fn push(&self, item: Outbound) -> bool {
        let item = match &self.audience {
            Audience::Agent { watching: Some(key), .. } => Outbound::Watched { key: key.clone(), item: Box::new(item) },
            Audience::Customer | Audience::Agent { watching: None, .. } => item,
        };
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

#[cfg(test)]
mod tests {
    use super::Outbound;

    /// Every queue item is boxed, one allocation per item: kept within 64
    /// bytes (an 80-byte item counted more instructions per reply, see
    /// docs/benchmarks.md, "Instructions per reply").
    #[test]
    fn a_queue_item_fits_64_bytes() {
        assert!(size_of::<Outbound>() <= 64, "{} bytes", size_of::<Outbound>());
    }
}
