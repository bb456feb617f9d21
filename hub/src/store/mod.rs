//! The conversation store seam: durable event logs plus delivery to sockets.
//!
//! A store owns each conversation's log (durable events numbered by a
//! per-conversation seq, 1, 2, 3, … with no gaps) and routes events to every
//! socket that cares. The in-memory store serves a single node; a Redis
//! store (cluster mode) implements the same trait for many nodes.
//!
//! Contract every implementation keeps:
//! - `append` stores the event and assigns its seq atomically; a customer
//!   message whose id is already in the log is not stored again
//!   ([`Appended::Duplicate`] with the original seq).
//! - Durable events reach each attached session in seq order; an event is
//!   delivered only after it is stored.
//! - `attach` returns the events after `after` and registers the session so
//!   that no event is missed between the two; duplicates are possible and the
//!   session drops any durable event with a seq it already sent.
//! - Nothing durable exists before a conversation's first message: `open`
//!   only reads, and a conversation it allocates ([`Opened::pending`]) is
//!   created, owned by its user, with the epoch `ready` announced, by the
//!   first `append` given that [`Pending`]. That append also counts against
//!   the user's creation cap ([`crate::config::CreationLimit`]). A socket
//!   that never sends leaves no trace (no Redis key, no map entry) once it
//!   is gone.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;

use crate::fanout::SessionHandle;
use crate::ids::{ConversationId, ConversationKey, SessionId, TenantId, UserId};

pub use crate::event::{NewEvent, StoredEvent};
pub use memory::MemoryStore;
pub use redis::RedisStore;

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored with this new seq and delivered.
    New(u64),
    /// A customer message with this id was already stored with this seq;
    /// nothing was stored or delivered.
    Duplicate(u64),
}

/// The conversation `open` chose for a socket.
#[derive(Debug, Clone)]
pub struct Opened {
    pub key: ConversationKey,
    /// Set when the conversation may not exist yet (a new id, or the user's
    /// recent one whose log was lost): what its first append creates.
    pub pending: Option<Pending>,
}

/// A conversation allocated but not created: the first append that carries
/// this creates its log, owned by `user`, with `epoch` (the one `ready`
/// gave), unless the log exists by then with another owner or epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub user: UserId,
    pub epoch: String,
}

impl Pending {
    pub fn new(user: &UserId) -> Self {
        Self { user: user.clone(), epoch: crate::ids::generate_token() }
    }
}

/// What a new session needs to start: where the log stands and what it missed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// False when the conversation has no log yet (pending): `last_seq` is
    /// 0 and `epoch` the one its first append will create it with.
    pub exists: bool,
    /// The seq of the conversation's last durable event (0 if none).
    pub last_seq: u64,
    /// Identifies this incarnation of the log; it changes if the log was lost
    /// and recreated, telling clients that seqs before it cannot be replayed.
    pub epoch: String,
    /// Durable events with a seq greater than the requested `after`, in order.
    pub missed: Vec<Arc<StoredEvent>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conversation does not exist, or belongs to another user or tenant.
    #[error("conversation not found")]
    ConversationNotFound,
    /// The conversation has `conversation.max_sockets` sessions on this node.
    #[error("too many sockets on this conversation")]
    TooManySockets,
    /// The store could not be reached; nothing was stored.
    #[error("conversation store unavailable: {0}")]
    Unavailable(String),
    /// Creating this conversation would exceed the user's creation cap.
    #[error("this user created {max} conversations within the last {window_secs} s; try again later")]
    TooManyConversations { max: u32, window_secs: u64 },
}

#[async_trait]
pub trait ConversationStore: Send + Sync + 'static {
    /// Chooses the conversation for a new socket: `requested` if it exists
    /// and is this user's, otherwise the user's most recent, otherwise a new
    /// one. An existing conversation becomes the user's most recent; a
    /// pending one is left for its first append to create (nothing is written).
    async fn open(
        &self,
        tenant: &TenantId,
        user: &UserId,
        requested: Option<&ConversationId>,
    ) -> Result<Opened, StoreError>;

    /// Registers a session for live events and returns what it missed after
    /// `after`. A conversation without a log is `ConversationNotFound`,
    /// unless `pending` is given: then an empty snapshot with its epoch.
    async fn attach(
        &self,
        key: &ConversationKey,
        session: SessionHandle,
        after: Option<u64>,
        pending: Option<&Pending>,
    ) -> Result<Snapshot, StoreError>;

    /// Stops live events to a session. Never fails: a session that is gone is gone.
    async fn detach(&self, key: &ConversationKey, session: SessionId);

    /// Records that the user was active in this conversation now (a message,
    /// or leaving); the idle window for "come back to the same conversation"
    /// counts from the last touch. Best effort.
    async fn touch(&self, user: &UserId, key: &ConversationKey);

    /// Durable events with a seq greater than `after`, in order (for filling gaps).
    async fn events_after(&self, key: &ConversationKey, after: u64) -> Result<Vec<Arc<StoredEvent>>, StoreError>;

    /// Whether any socket of the conversation is open, on any node (a reply
    /// keeps streaming while someone listens). Errs on the side of true.
    async fn has_listeners(&self, key: &ConversationKey) -> bool;

    /// Whether this node currently receives live events (false while a
    /// clustered store's subscription is down). Drives `/readyz`.
    fn is_receiving(&self) -> bool {
        true
    }

    /// Stores a durable event and delivers it to every attached session.
    /// With `create`, a missing log is created first (within the user's
    /// creation cap, else `TooManyConversations`) and becomes the user's
    /// most recent conversation; a log that exists with another owner or
    /// epoch is `ConversationNotFound`.
    async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        origin: Option<SessionId>,
        create: Option<&Pending>,
    ) -> Result<Appended, StoreError>;

    /// The last `limit` turns (customer, assistant and agent events), oldest first.
    async fn recent_turns(&self, key: &ConversationKey, limit: usize) -> Result<Vec<Arc<StoredEvent>>, StoreError>;

    /// Delivers non-durable frames (`reply.delta`s, `queued`), in order, to
    /// every attached session. Best effort and never waits: a lost delta is
    /// repaired by `reply.done`.
    fn publish_ephemeral(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>);

    /// Waits until every frame given to `publish_ephemeral` so far has been
    /// published, so a reply's deltas go out before its `reply.done`.
    async fn flush_ephemeral(&self) {}
}

/// Milliseconds since the Unix epoch, for event timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
