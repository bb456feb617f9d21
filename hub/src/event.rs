//! The events of a conversation's log, shared by the store that keeps them,
//! the fan-out that delivers them and the replier that writes them: a leaf
//! module, so that none of those imports another for its types.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

use crate::protocol::{ReplyTiming, Role, ServerFrame};

/// One durable event of a conversation's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: u64,
    pub from: Role,
    /// The client message id for customer messages, the reply id for replies.
    pub id: String,
    pub text: String,
    /// True for replies the hub wrote (or completed) itself because the NLP service failed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    /// True for replies whose NLP stream broke after some tokens.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// True for replies a client cancelled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
    /// When the event was stored, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl StoredEvent {
    /// The `message` frame used for replay and for other sockets.
    pub fn message_frame(&self, conversation: &str) -> Utf8Bytes {
        ServerFrame::Message {
            conversation,
            seq: self.seq,
            from: self.from,
            id: &self.id,
            text: &self.text,
            fallback: self.fallback,
            interrupted: self.interrupted,
            cancelled: self.cancelled,
        }
        .encode()
    }
}

/// An event to append; the store assigns seq and time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub from: Role,
    pub id: String,
    pub text: String,
    pub fallback: bool,
    pub interrupted: bool,
    pub cancelled: bool,
    /// Delivered with a reply's `reply.done`, never stored.
    pub timing: Option<ReplyTiming>,
}

impl NewEvent {
    /// A customer message.
    pub fn customer(id: String, text: String) -> Self {
        Self { from: Role::Customer, id, text, fallback: false, interrupted: false, cancelled: false, timing: None }
    }

    /// The event as stored with its seq and time (the timing is not stored).
    pub fn stored(self, seq: u64, at_ms: u64) -> StoredEvent {
        StoredEvent {
            seq,
            from: self.from,
            id: self.id,
            text: self.text,
            fallback: self.fallback,
            interrupted: self.interrupted,
            cancelled: self.cancelled,
            at_ms,
        }
    }
}
