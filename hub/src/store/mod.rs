//! The conversation log seam: each conversation's durable events.
//!
//! A log holds a conversation's durable events, numbered by a
//! per-conversation seq (1, 2, 3, … with no gaps), with the owner and epoch
//! of its incarnation, the customer message ids that make resends
//! idempotent, and which conversation a user comes back to. The in-memory
//! log serves a single node; the Redis log ([`redis::RedisLog`], cluster
//! mode) the same trait for many nodes. Delivery to sockets is not its job:
//! see [`crate::conversations`], [`crate::bus`] and [`crate::fanout`].
//!
//! Contract every implementation keeps:
//! - `append` stores the event and assigns its seq atomically; a customer
//!   message whose id is already in the log is not stored again
//!   ([`Appended::Duplicate`] with the original seq). A log shared by nodes
//!   publishes the event to the other nodes' [`crate::bus`] in the same
//!   atomic step, and only if another node listens.
//! - Nothing durable exists before a conversation's first message: `open`
//!   only reads, and a conversation it allocates ([`Opened::pending`]) is
//!   created, owned by its user, with the epoch `ready` announced, by the
//!   first `append` given that [`Pending`]. That append also counts against
//!   the user's creation cap ([`crate::config::CreationLimit`]). A socket
//!   that never sends leaves no trace (no Redis key, no map entry) once it
//!   is gone.
//!
//! - The conversation's [`Ownership`] (who answers it, [`crate::owner`]) is
//!   kept with the log and changes only in an append
//!   ([`OwnerOp::Change`]: compare-and-set on the owner epoch, with the
//!   `system` event that records it); an append on behalf of an owner is
//!   fenced by it ([`OwnerOp::Fence`]), in the same atomic step as the seq.
//!   Every successful append returns the ownership, so a customer message
//!   learns who answers it in its own round trip.
//!
//! Room left for what comes next: per-reply token logs that a
//! reconnecting client resumes from an index are a second, short-lived log
//! per reply beside this one, with the same seq-and-cursor rules.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;

use crate::ids::{ConversationId, ConversationKey, Party, TenantId, UserId};
use crate::owner::{Owner, Ownership};

pub use crate::event::{LogEpoch, NewEvent, StoredEvent, StoredNote};
pub use memory::MemoryLog;
pub use redis::{RedisBus, RedisLog};

/// The outcome of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored with a new seq.
    New {
        /// The event as stored.
        event: Arc<StoredEvent>,
        /// The log incarnation it was stored in.
        epoch: LogEpoch,
        /// The last [`AppendWith::turns_before`] turns before it (customer,
        /// assistant and agent events), oldest first: a question's history.
        turns_before: Vec<Arc<StoredEvent>>,
        /// Who answers the conversation after this append.
        ownership: Ownership,
    },
    /// A customer message with this id was already stored with this seq;
    /// nothing was stored or delivered.
    Duplicate(u64),
}

/// What an append does besides storing the event, in the same round trip.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppendWith<'a> {
    /// Creates the log if it is missing (see [`Pending`]).
    pub create: Option<&'a Pending>,
    /// The user who wrote the event: the append also records their activity
    /// (what [`ConversationLog::touch`] does).
    pub active_user: Option<&'a UserId>,
    /// Turns before the event to return with it ([`Appended::New`]); 0 for none.
    pub turns_before: usize,
    /// What the append checks, or changes, of the conversation's owner.
    pub owner: OwnerOp<'a>,
}

/// An append's condition on, or change of, the conversation's owner.
#[derive(Debug, Clone, Copy, Default)]
pub enum OwnerOp<'a> {
    /// Whoever owns it (customer messages, replies).
    #[default]
    Any,
    /// Only if this agent owns it, and (when given) still under this epoch:
    /// an agent's message. Else [`StoreError::OwnerChanged`].
    Fence { agent: &'a str, epoch: Option<u64> },
    /// Only if the assistant owns it under this owner epoch: an assistant's
    /// reply (one that streamed under an older epoch is not stored as if
    /// the assistant still answered). Else [`StoreError::OwnerChanged`].
    Assistant { epoch: u64 },
    /// Only if the owner epoch is `expected`: then `to` owns it, under
    /// `expected + 1` (the event's `owner_epoch`). Else
    /// [`StoreError::OwnerChanged`].
    Change { expected: u64, to: &'a Owner },
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
    /// A new id, just generated: no other socket can name the conversation
    /// before its first append (a lost log started again under its old id
    /// is not fresh: other sockets may follow it still).
    pub fresh: bool,
}

impl Pending {
    /// A conversation with a new id.
    pub fn fresh(user: &UserId) -> Self {
        Self { user: user.clone(), epoch: crate::ids::generate_token(), fresh: true }
    }

    /// A conversation whose log was lost, started again under its id.
    pub fn lost(user: &UserId) -> Self {
        Self { fresh: false, ..Self::fresh(user) }
    }
}

/// Where a log stands, and what a reader missed.
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
    /// Who answers it.
    pub ownership: Ownership,
    /// The customer the conversation belongs to (`None` while pending).
    pub customer: Option<UserId>,
}

impl Snapshot {
    /// A conversation whose first append will create its log.
    pub fn not_created(pending: &Pending) -> Self {
        Snapshot { epoch: pending.epoch.clone(), ..Snapshot::default() }
    }
}

/// What the log knows of a conversation for the agents' list.
#[derive(Debug, Clone)]
pub struct LogSummary {
    pub customer: UserId,
    pub ownership: Ownership,
    /// The last durable event.
    pub last: Option<Arc<StoredEvent>>,
    /// When the customer last wrote (ms since the Unix epoch).
    pub customer_at: Option<u64>,
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
    /// An [`OwnerOp`] found another owner or epoch (the current one); nothing was stored.
    #[error("the conversation's owner changed")]
    OwnerChanged(Ownership),
    /// Creating this conversation would exceed the user's creation cap.
    #[error("this user created {max} conversations within the last {window_secs} s; try again later")]
    TooManyConversations { max: u32, window_secs: u64 },
}

#[async_trait]
pub trait ConversationLog: NoteLog {
    /// Chooses the conversation for a new socket: `requested` if it exists
    /// and is this user's, otherwise the user's most recent, otherwise a new
    /// one. An existing conversation becomes the user's most recent; a
    /// pending one is left for its first append to create (nothing is written).
    async fn open(&self, party: &Party, requested: Option<&ConversationId>) -> Result<Opened, StoreError>;

    /// Where the log stands and the events after `after` (none without
    /// it); `None` when the conversation has no log.
    async fn snapshot(&self, key: &ConversationKey, after: Option<u64>) -> Result<Option<Snapshot>, StoreError>;

    /// What the agents' list shows of the conversation; `None` when it has
    /// no log.
    async fn summary(&self, key: &ConversationKey) -> Result<Option<LogSummary>, StoreError>;

    /// The tenant's conversations with a durable event since `since_ms`,
    /// most recent first, at most `max`.
    async fn active(&self, tenant: &TenantId, since_ms: u64, max: usize) -> Result<Vec<ConversationId>, StoreError>;

    /// Records that the user was active in this conversation now (leaving;
    /// a message records it with its append, [`AppendWith::active_user`]):
    /// its retention, and the idle window for "come back to the same
    /// conversation", count from the last touch. Best effort.
    async fn touch(&self, user: &UserId, key: &ConversationKey);

    /// Durable events with a seq greater than `after`, in order (for filling gaps).
    async fn events_after(&self, key: &ConversationKey, after: u64) -> Result<Vec<Arc<StoredEvent>>, StoreError>;

    /// Stores a durable event (and, shared by nodes, publishes it to the
    /// others), and does what `with` asks in the same step. With
    /// `with.create`, a missing log is created first (within the user's
    /// creation cap, else `TooManyConversations`) and becomes the user's
    /// most recent conversation; a log that exists with another owner or
    /// epoch is `ConversationNotFound`.
    async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        with: AppendWith<'_>,
    ) -> Result<Appended, StoreError>;
}

/// What [`NoteLog::add_note`] did with a note.
#[derive(Debug)]
pub enum NoteAdded {
    /// Stored (and published to the other nodes).
    New(Arc<StoredNote>),
    /// A resend: a note of the same agent with its id is among the
    /// conversation's latest [`NOTE_IDS_CHECKED`], and nothing was stored.
    /// Its `seq`, `after` and time are the stored one's.
    Duplicate(Arc<StoredNote>),
}

/// How many of a conversation's latest notes a new note's id is checked
/// against: a client resends an unacknowledged note at its reconnect, so a
/// resend's first copy is among the last few.
pub const NOTE_IDS_CHECKED: usize = 100;

/// Agents' private notes of one conversation, beside its log.
#[async_trait]
pub trait NoteLog: Send + Sync + 'static {
    /// Stores a note (its `seq`, `after` and `at_ms` are assigned here;
    /// shared by nodes: published to the others' [`crate::bus`], only if
    /// another node listens), unless it is a resend ([`NoteAdded::Duplicate`]).
    /// A conversation with no log is `ConversationNotFound`. Notes are
    /// capped like the log.
    async fn add_note(&self, key: &ConversationKey, note: StoredNote) -> Result<NoteAdded, StoreError>;

    /// The conversation's notes, oldest first.
    async fn notes(&self, key: &ConversationKey) -> Result<Vec<Arc<StoredNote>>, StoreError>;
}

/// Milliseconds since the Unix epoch, for event timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
