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
    /// The agent an agent's message or a system event names (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// That agent's display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What a system event says happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<SystemEvent>,
    /// On a system event that changed the conversation's owner: the owner
    /// epoch it began (the fan-out's delta fence, see [`crate::fanout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_epoch: Option<u64>,
}

/// A private note of agents about a conversation: durable, in its own
/// per-conversation list (never in the events' seq space: a customer never
/// sees it, nor a gap for it, and a question's history never reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNote {
    /// The note's own sequence in the conversation's notes: 1, 2, …
    /// (first field: the Redis store splices it in, see `note.lua`).
    pub seq: u64,
    /// The conversation's last event seq when it was written (second field, likewise).
    pub after: u64,
    pub agent: String,
    pub name: String,
    pub id: String,
    pub text: String,
    pub at_ms: u64,
}

impl StoredNote {
    /// The agent-only `note` frame.
    pub fn note_frame(&self, conversation: &str) -> Utf8Bytes {
        ServerFrame::Note {
            conversation,
            id: &self.id,
            seq: self.seq,
            after: self.after,
            agent: &self.agent,
            name: &self.name,
            text: &self.text,
            at: self.at_ms,
        }
        .encode()
    }
}

/// What a durable `system` event records (protocol §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemEvent {
    /// An agent took the conversation.
    AgentJoined,
    /// The owning agent handed it back to the assistant.
    AgentLeft,
    /// The customer asked for a person.
    Waiting,
    /// Nobody took it within `agents.handoff_timeout_secs`.
    AssistantBack,
}

impl StoredEvent {
    /// For a system event that changed the owner: the new owner epoch and
    /// the agent-only `owner` frame that tells watchers.
    pub fn owner_frame(&self, conversation: &str) -> Option<(u64, Utf8Bytes)> {
        let owner_epoch = self.owner_epoch?;
        let (owner, agent, agent_name) = match self.event {
            Some(SystemEvent::AgentJoined) => ("agent", self.agent.as_deref(), self.name.as_deref()),
            Some(SystemEvent::Waiting) => ("waiting", None, None),
            Some(SystemEvent::AgentLeft | SystemEvent::AssistantBack) | None => ("assistant", None, None),
        };
        Some((owner_epoch, ServerFrame::Owner { conversation, owner, agent, agent_name, owner_epoch }.encode()))
    }

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
            agent: self.agent.as_deref().filter(|_| self.from == Role::System),
            name: self.name.as_deref(),
            event: self.event,
        }
        .encode()
    }
}

/// What a message is de-duplicated by in its conversation's log (a resend
/// of a stored one is acknowledged again, not stored twice): a customer's
/// by its client-chosen id, an agent's by `\u{1}agent\u{1}id`, which no
/// client id can be (ids have no control characters), so neither shadows
/// the other. Other events are not de-duplicated.
pub fn dedup_key<'a>(from: Role, id: &'a str, agent: Option<&str>) -> Option<std::borrow::Cow<'a, str>> {
    match (from, agent) {
        (Role::Customer, _) => Some(std::borrow::Cow::Borrowed(id)),
        (Role::Agent, Some(agent)) => Some(std::borrow::Cow::Owned(format!("\u{1}{agent}\u{1}{id}"))),
        _ => None,
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
    /// See [`StoredEvent`].
    pub agent: Option<String>,
    pub name: Option<String>,
    pub event: Option<SystemEvent>,
    pub owner_epoch: Option<u64>,
}

impl NewEvent {
    /// A customer message.
    pub fn customer(id: String, text: String) -> Self {
        Self {
            from: Role::Customer,
            id,
            text,
            fallback: false,
            interrupted: false,
            cancelled: false,
            timing: None,
            agent: None,
            name: None,
            event: None,
            owner_epoch: None,
        }
    }

    /// An agent's message to the customer.
    pub fn agent(id: String, text: String, agent: &str, name: &str) -> Self {
        Self {
            from: Role::Agent,
            agent: Some(agent.to_owned()),
            name: Some(name.to_owned()),
            ..Self::customer(id, text)
        }
    }

    /// A system event; the owner change it records is filled in by the append.
    pub fn system(event: SystemEvent, agent: Option<(&str, &str)>) -> Self {
        let name = agent.map(|(_, name)| name);
        let text = match event {
            SystemEvent::AgentJoined => {
                format!("{} from Support has joined the conversation.", name.unwrap_or("An agent"))
            }
            SystemEvent::AgentLeft => {
                format!("{} has left; the assistant will answer again.", name.unwrap_or("The agent"))
            }
            SystemEvent::Waiting => "I've asked a person from our team to join. Please wait a moment.".to_owned(),
            SystemEvent::AssistantBack => "Nobody is available right now; the assistant will answer again.".to_owned(),
        };
        Self {
            from: Role::System,
            agent: agent.map(|(id, _)| id.to_owned()),
            name: name.map(str::to_owned),
            event: Some(event),
            ..Self::customer(format!("s-{}", uuid::Uuid::new_v4().simple()), text)
        }
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
            agent: self.agent,
            name: self.name,
            event: self.event,
            owner_epoch: self.owner_epoch,
        }
    }
}

/// One incarnation of a conversation's log, as cursors compare it: a digest
/// of the log's `epoch` (the string `ready` gives), so that every event and
/// every reply's frame can carry it for the price of a `u64`. A log lost and
/// recreated under the same conversation id has another epoch, and its seqs
/// and owner epochs start again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogEpoch(u64);

impl LogEpoch {
    pub fn of(epoch: &str) -> Self {
        // XXH3, a specified hash: the same epoch has the same digest on
        // every node, of every release (frames carry it between nodes).
        Self(xxhash_rust::xxh3::xxh3_64(epoch.as_bytes()))
    }

    /// The digest, as it travels between nodes.
    pub fn digest(self) -> u64 {
        self.0
    }

    /// The log incarnation of a digest from another node.
    pub fn from_digest(digest: u64) -> Self {
        Self(digest)
    }
}

/// An owner epoch of one log incarnation: what a reply is asked under, and
/// what an owner change begins. Owner epochs count the owner changes of one
/// log; a recreated log counts again from 0, so an epoch means nothing
/// without its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerEpoch {
    pub log: LogEpoch,
    pub epoch: u64,
}

/// Log incarnations a [`Cursor`] remembers having left (an event of one of
/// them is never handed on again).
const RETIRED: usize = 3;

/// Where one delivery stream of durable events stands: the log incarnation
/// it follows, the highest seq handed on and the latest owner change told.
/// The one rule, for a socket's writer and for the fan-out of a
/// conversation's sockets alike, of what an arriving event is, and of
/// whether a reply's frames may still follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// `None` until the stream learns it (the fan-out's, from its first event).
    epoch: Option<LogEpoch>,
    last: u64,
    /// The owner epoch of the latest owner change of this log the stream
    /// has told (or was told of, by a snapshot): a reply asked under an
    /// older one was taken over, and its frames are fenced off.
    owner: u64,
    /// The incarnations this stream followed before, newest first.
    retired: [Option<LogEpoch>; RETIRED],
}

/// What a durable event is to a [`Cursor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The very next seq: hand it on.
    Next,
    /// At or below the last one handed on: a duplicate (a local copy and
    /// its pub/sub echo, a replay that overlaps live traffic). Drop it.
    Seen,
    /// Past the next seq: the events in between must come first (from the
    /// log, after [`Cursor::last`]).
    Gap,
    /// Of a log incarnation this stream has left: its seqs mean nothing
    /// now. Drop it.
    Stale,
    /// Of another log incarnation than this stream's: the log was lost and
    /// recreated. The stream starts again from the new log's beginning
    /// ([`Cursor::restart`]) once the log confirms it.
    NewLog,
}

impl Cursor {
    /// A stream that has handed on every event up to `last`, of a log
    /// incarnation it has not learnt yet.
    pub fn at(last: u64) -> Self {
        Self { last, ..Self::default() }
    }

    /// A stream that has handed on every event of `epoch` up to `last`.
    pub fn in_epoch(epoch: LogEpoch, last: u64) -> Self {
        Self { epoch: Some(epoch), ..Self::at(last) }
    }

    /// The same stream, told of the owner change beginning owner epoch
    /// `owner` (by a snapshot).
    pub fn with_owner(self, owner: u64) -> Self {
        Self { owner, ..self }
    }

    /// The highest seq handed on.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The log incarnation followed, once known.
    pub fn epoch(&self) -> Option<LogEpoch> {
        self.epoch
    }

    /// What an event with `seq` is to this stream (of its own incarnation).
    pub fn step(&self, seq: u64) -> Step {
        match seq {
            seq if seq <= self.last => Step::Seen,
            seq if seq == self.last + 1 => Step::Next,
            _ => Step::Gap,
        }
    }

    /// What an event of incarnation `epoch` with `seq` is to this stream (a
    /// stream that has not learnt its incarnation takes it as its own).
    pub fn arrive(&self, epoch: LogEpoch, seq: u64) -> Step {
        match self.epoch {
            None => self.step(seq),
            Some(own) if own == epoch => self.step(seq),
            Some(_) if self.retired.contains(&Some(epoch)) => Step::Stale,
            Some(_) => Step::NewLog,
        }
    }

    /// `seq` was handed on (a gap before it, if any, was filled or given up).
    pub fn advance(&mut self, seq: u64) {
        self.last = self.last.max(seq);
    }

    /// `seq` of incarnation `epoch` was handed on: [`Cursor::advance`], and
    /// a stream that had not learnt its incarnation learns it.
    pub fn advance_in(&mut self, epoch: LogEpoch, seq: u64) {
        self.epoch.get_or_insert(epoch);
        self.advance(seq);
    }

    /// The stream follows the log incarnation `epoch` from now on, having
    /// handed on its events up to `last`; the one it followed is retired,
    /// and with it its owner changes (a new log's owner epochs start again).
    pub fn restart(&mut self, epoch: LogEpoch, last: u64) {
        if self.epoch != Some(epoch) {
            self.retired.rotate_right(1);
            self.retired[0] = self.epoch;
            self.retired.iter_mut().filter(|old| **old == Some(epoch)).for_each(|old| *old = None);
            self.owner = 0;
        }
        self.epoch = Some(epoch);
        self.last = last;
    }

    /// An owner change beginning `change` reached the stream; true when it
    /// is news (raises the fence, and its `owner` frame is due). A change of
    /// a log the stream does not follow is not: the log was recreated, owner
    /// epochs start again there, and an old one would tell a wrong owner and
    /// fence off the new log's replies. A stream that has not learnt its log
    /// takes it as its own, as [`Cursor::arrive`] does.
    pub fn learn_owner(&mut self, change: OwnerEpoch) -> bool {
        *self.epoch.get_or_insert(change.log) == change.log && self.raise_owner(change.epoch)
    }

    /// An owner change of the log the stream follows (read from it, or
    /// told by its snapshot) beginning owner epoch `owner`; true when news.
    pub fn raise_owner(&mut self, owner: u64) -> bool {
        let news = owner > self.owner;
        self.owner = self.owner.max(owner);
        news
    }

    /// Whether a reply asked under `asked` was taken over by an owner change
    /// the stream has told, so that its frames must not follow the change:
    /// a later owner epoch of the same log, or any owner change of the log
    /// followed when the reply is of another one (a log lost since, which
    /// the stream may never have known: owner epochs of two logs do not
    /// compare, and after a takeover only the current log's replies stream).
    /// A stream still on a lost log (it missed the new log's first event)
    /// thus drops the new log's frames once the lost one had changed owner,
    /// until an event of the new log moves it: frames are best effort, and
    /// `reply.done` carries the whole text.
    pub fn fences_off(&self, asked: OwnerEpoch) -> bool {
        match self.epoch {
            Some(own) if own != asked.log => self.owner > 0,
            _ => asked.epoch < self.owner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_tells_the_next_event_from_a_duplicate_and_a_gap() {
        let mut cursor = Cursor::at(4);
        assert_eq!(
            (cursor.step(3), cursor.step(4), cursor.step(5), cursor.step(7)),
            (Step::Seen, Step::Seen, Step::Next, Step::Gap)
        );
        cursor.advance(7);
        assert_eq!((cursor.last(), cursor.step(6), cursor.step(8)), (7, Step::Seen, Step::Next));
        cursor.advance(2);
        assert_eq!(cursor.last(), 7, "never moves back");
        assert_eq!(Cursor::default().step(1), Step::Next);
    }

    #[test]
    fn a_cursor_starts_again_with_a_new_log_and_never_goes_back_to_an_old_one() {
        let (old, new, newer) = (LogEpoch::of("5e1b7c9d2a4f"), LogEpoch::of("a07c3e91f6d2"), LogEpoch::of("0f"));
        let mut cursor = Cursor::in_epoch(old, 4);
        assert_eq!((cursor.arrive(old, 5), cursor.arrive(old, 3)), (Step::Next, Step::Seen));
        assert_eq!((cursor.arrive(new, 1), cursor.arrive(new, 7)), (Step::NewLog, Step::NewLog));
        cursor.restart(new, 0);
        assert_eq!((cursor.epoch(), cursor.last()), (Some(new), 0));
        assert_eq!((cursor.arrive(new, 1), cursor.arrive(new, 3)), (Step::Next, Step::Gap));
        assert_eq!((cursor.arrive(old, 5), cursor.arrive(old, 1)), (Step::Stale, Step::Stale), "the old log is gone");
        cursor.advance_in(new, 2);
        cursor.restart(newer, 0);
        assert_eq!((cursor.arrive(old, 9), cursor.arrive(new, 3)), (Step::Stale, Step::Stale));
        cursor.restart(old, 0);
        assert_eq!(cursor.arrive(newer, 1), Step::Stale, "a log started again is no longer retired, the one left is");
        assert_eq!(cursor.arrive(old, 1), Step::Next);
        // A stream that has not learnt its log takes the first one it is given.
        let mut fresh = Cursor::at(0);
        assert_eq!(fresh.arrive(new, 1), Step::Next);
        fresh.advance_in(new, 1);
        assert_eq!((fresh.arrive(new, 1), fresh.arrive(old, 2)), (Step::Seen, Step::NewLog));
    }

    #[test]
    fn a_cursor_fences_off_replies_older_than_the_owner_changes_of_the_log_it_follows_only() {
        let (old, new) = (LogEpoch::of("5e1b7c9d"), LogEpoch::of("a07c3e91"));
        let (in_old, in_new) = (|epoch| OwnerEpoch { log: old, epoch }, |epoch| OwnerEpoch { log: new, epoch });
        let mut cursor = Cursor::in_epoch(old, 4);
        assert!(cursor.raise_owner(1));
        assert!(cursor.learn_owner(in_old(3)));
        assert!(!cursor.learn_owner(in_old(3)) && !cursor.learn_owner(in_old(2)), "once per epoch, never back");
        assert!(cursor.fences_off(in_old(2)) && !cursor.fences_off(in_old(3)) && !cursor.fences_off(in_old(4)));
        assert!(cursor.fences_off(in_new(5)), "another log's reply, after a takeover in this one");
        // The log was recreated: a change of the old log queued behind is
        // not the new log's owner, and the old log's replies still stream
        // until the new log changes owner.
        cursor.restart(new, 1);
        assert!(!cursor.fences_off(in_new(0)), "the new log's replies (owner epoch 0) pass");
        assert!(!cursor.learn_owner(in_old(4)));
        assert!(!cursor.fences_off(in_new(0)) && !cursor.fences_off(in_old(3)), "still");
        assert!(cursor.learn_owner(in_new(1)));
        assert!(cursor.fences_off(in_new(0)) && !cursor.fences_off(in_new(1)));
        assert!(cursor.fences_off(in_old(3)), "a reply of the lost log, whatever its owner epoch");
        let never_known = OwnerEpoch { log: LogEpoch::of("0f"), epoch: 9 };
        assert!(cursor.fences_off(never_known), "or of one lost before the stream began");
        // Seen again on the same log, the fence stays.
        cursor.restart(new, 6);
        assert!(cursor.fences_off(in_new(0)));
        // A stream that has not learnt its log takes the change as its own.
        let mut fresh = Cursor::at(0);
        assert!(fresh.learn_owner(in_new(2)) && fresh.fences_off(in_new(1)));
        assert_eq!(fresh.epoch(), Some(new));
        assert!(fresh.fences_off(in_old(5)), "another log's, whatever its owner epoch");
    }

    #[test]
    fn a_log_epochs_digest_is_the_same_on_every_node() {
        // XXH3-64 of the bytes: pinned, since other nodes compare it.
        assert_eq!(LogEpoch::of("").digest(), 0x2d06800538d394c2);
        assert_eq!(LogEpoch::from_digest(LogEpoch::of("5e1b7c9d").digest()), LogEpoch::of("5e1b7c9d"));
    }
}
