//! Presence and typing: who is in a conversation right now, kept apart from
//! who owns it ([`crate::owner`]), and built so that neither can stick.
//!
//! **Presence** is whether the customer has a socket open on some node
//! (`online`) and which agents watch the conversation (`viewers`). Each node
//! keeps one entry per conversation it has sockets of, once the conversation
//! exists ([`Present`], made by the [`crate::fanout::FanOut`] from its
//! handles; a new conversation has none before its first message, since
//! nothing can list or watch it) on a [`PresenceBoard`]:
//! written when it changes (and announced to the other nodes on the
//! conversation's channel), refreshed by a heartbeat every third of
//! `agents.presence_ttl_secs`, and ignored by readers once that long has
//! passed without a refresh. So a node that dies, whatever it was doing,
//! stops counting within the TTL: the other nodes' heartbeats re-read the
//! entries of the conversations their agents watch and send `presence`
//! when the merged view changed. Nothing here is on a customer's message
//! path: the fan-out only marks a conversation whose entry changed, and
//! [`crate::fanout::run_presence`] writes every marked entry in one round
//! trip.
//!
//! **Typing** is a [`Typing`] signal handed to the fan-out of every node of
//! the conversation (this node's directly, the others' through the
//! [`crate::bus`]). Each fan-out holds it for `agents.typing_ttl_ms` after
//! the last `on: true` and sends `on: false` itself when no new one came: a
//! typist who stops sending, or whose socket or node died, stops typing by
//! itself everywhere. A customer's socket gets an agent's typing only when
//! that agent owns the conversation and is not writing a note
//! ([`Typing::to_customer`]), and never a customer's typing.

use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::ConversationKey;
use crate::protocol::{ServerFrame, Viewer};
use crate::store::StoreError;

/// Who is in a conversation: one node's entry, or all nodes' merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Present {
    /// The customer has a socket open.
    pub online: bool,
    /// The agents watching, sorted, each once.
    pub viewers: Vec<Viewer>,
    /// The customer is typing (set by the node holding the typing socket).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub typing: bool,
}

impl Present {
    /// Nothing to tell: no customer, no viewer.
    pub fn is_empty(&self) -> bool {
        !self.online && self.viewers.is_empty()
    }

    /// Adds another node's entry.
    pub fn merge(&mut self, other: &Present) {
        self.online |= other.online;
        self.typing |= other.typing;
        self.viewers.extend(other.viewers.iter().cloned());
        self.viewers.sort();
        self.viewers.dedup();
    }

    /// The `presence` frame of the conversation (agents learn of the
    /// customer's typing from `typing` frames, not from it).
    pub fn frame(&self, conversation: &str) -> Utf8Bytes {
        ServerFrame::Presence { conversation, online: self.online, viewers: &self.viewers }.encode()
    }
}

/// Who types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "lowercase")]
pub enum Typist {
    Customer,
    Agent { agent: String, name: String },
}

/// A typing signal, as nodes pass it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Typing {
    #[serde(flatten)]
    pub typist: Typist,
    pub on: bool,
    /// An agent typing a private note.
    #[serde(default)]
    pub note: bool,
    /// Whether customers' sockets see it: the owning agent, not writing a
    /// note (decided by the typist's node, which checked the owner).
    #[serde(default)]
    pub to_customer: bool,
}

impl Typing {
    /// Tells one typist apart from the others of a conversation.
    pub fn typist_id(&self) -> &str {
        match &self.typist {
            Typist::Customer => "",
            Typist::Agent { agent, .. } => agent,
        }
    }

    /// The same typist, stopped.
    pub fn stopped(&self) -> Typing {
        Typing { on: false, ..self.clone() }
    }

    /// The frame agents' sockets get.
    pub fn agent_frame(&self, conversation: &str) -> Utf8Bytes {
        let (from, agent, name, note) = match &self.typist {
            Typist::Customer => ("customer", None, None, None),
            Typist::Agent { agent, name } => ("agent", Some(agent.as_str()), Some(name.as_str()), Some(self.note)),
        };
        ServerFrame::Typing { conversation, from, agent, name, on: self.on, note }.encode()
    }

    /// The frame customers' sockets get (an owner's typing, without its id).
    pub fn customer_frame(&self, conversation: &str) -> Utf8Bytes {
        let name = match &self.typist {
            Typist::Agent { name, .. } => Some(name.as_str()),
            Typist::Customer => None,
        };
        ServerFrame::Typing { conversation, from: "agent", agent: None, name, on: self.on, note: None }.encode()
    }
}

/// Where nodes keep their presence entries (see the module doc).
#[async_trait]
pub trait PresenceBoard: Send + Sync + 'static {
    /// Writes this node's entry of each conversation (an empty one takes it
    /// off), valid for `ttl`, in one round trip; with `announce`, also tells
    /// the other nodes listening to each conversation (a change, not a
    /// refresh). Best effort: a failed write is made again by the next
    /// heartbeat.
    async fn write(&self, entries: &[(ConversationKey, Present)], ttl: Duration, announce: bool);

    /// The other nodes' live entries of each conversation (by node), in one
    /// round trip.
    async fn read(&self, keys: &[ConversationKey]) -> Result<Vec<Vec<(String, Present)>>, StoreError>;
}

/// The board of a single node: there is no other node, its own entries are
/// its fan-out's handles.
#[derive(Debug, Default)]
pub struct LocalBoard;

#[async_trait]
impl PresenceBoard for LocalBoard {
    async fn write(&self, _: &[(ConversationKey, Present)], _: Duration, _: bool) {}

    async fn read(&self, keys: &[ConversationKey]) -> Result<Vec<Vec<(String, Present)>>, StoreError> {
        Ok(vec![Vec::new(); keys.len()])
    }
}
