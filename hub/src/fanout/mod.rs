//! Local fan-out: delivers a conversation's events to the sockets on this node.
//!
//! Every session of a conversation registers a [`SessionHandle`] here. An
//! event is encoded once per node and the same bytes are pushed into each
//! session's bounded outbound queue with `try_send`: delivery never waits, so
//! one stalled client cannot slow the publisher or the other sockets. A
//! session whose queue is full is closed as a slow consumer (4008) instead of
//! being allowed to grow memory.
//!
//! The fan-out knows nothing about storage nor about other nodes. It gets
//! events from two places, by the same rule: what this node appends and
//! streams ([`crate::conversations`]), and what other nodes did, as the
//! [`IncomingEvents`] handler of the node's [`crate::bus`]. Either way a
//! durable event goes through one [`Cursor`] per conversation: one its
//! sessions already have is dropped (a copy that came back), the next one
//! or one past a gap is handed on (each session's writer fills a gap from
//! the log with its own cursor), so a socket's frames are never reordered.
//!
//! The fan-out is also where a takeover fences an assistant's reply: frames
//! carry what their reply was asked under (the log incarnation and the
//! owner epoch in it, [`OwnerEpoch`]), and once this node has delivered the
//! event of an owner change (an event with `owner_epoch`), frames of the
//! replies it takes over ([`Cursor::fences_off`]: an older owner epoch, or
//! a log lost since) are dropped here (under the same entry lock as the
//! event, so none slips in after it), and those replies streaming here
//! ([`FanOut::hold`]) are told to stop. Each socket's
//! writer keeps the same fence for itself ([`Outbound::Frames`]): a socket
//! that joins after a takeover learns of it from its snapshot, before this
//! node's entry of the conversation (made by that join) could. Agent-only
//! frames (`owner`) are written to agents' sockets only ([`Audience`]).
//!
//! Its part in presence and typing is in [`presence`], its
//! part in ownership (the takeover fence, conversations seen waiting) in
//! [`owners`]: both are more methods of [`FanOut`] on the same
//! per-conversation entries.

mod owners;
mod presence;
mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;

use tokio_util::sync::CancellationToken;

use crate::bus::IncomingEvents;
use crate::event::{Cursor, LogEpoch, OwnerEpoch, Step, StoredEvent, SystemEvent};
use crate::ids::{ConversationKey, SessionId};
use crate::presence::{Present, Typing};
use crate::protocol::{ReplyTiming, Role, ServerFrame};

pub use presence::run_presence;
pub use session::{Audience, Outbound, SessionCloser, SessionHandle};

/// Serializes this node's appends to one conversation, so that their local
/// deliveries reach the fan-out in seq order (an `ack` stays an `ack`, a
/// `reply.done` a `reply.done`, instead of being filled from the log).
/// Almost always uncontended, held across the log's await: `futures`'
/// mutex takes and gives it back with one atomic operation each, where
/// tokio's fair one goes through its semaphore's wait list.
pub type AppendTurn = Arc<futures::lock::Mutex<()>>;

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
    /// How long a typing signal holds (`agents.typing_ttl_ms`).
    typing_ttl: Duration,
    /// Conversations with someone typing (the ones [`FanOut::expire_typing`] looks at).
    typing: dashmap::DashSet<ConversationKey, foldhash::fast::RandomState>,
    /// Conversations whose entry on this node changed since
    /// [`FanOut::take_changed_presence`] last took them.
    presence_changed: dashmap::DashSet<ConversationKey, foldhash::fast::RandomState>,
    /// Wakes [`FanOut::presence_changed`].
    presence_notify: tokio::sync::Notify,
    /// The conversations of listed tenants that changed, for this node's
    /// agents' lists ([`crate::listing`]).
    list_changes: Arc<crate::listing::changes::Changes>,
    /// Conversations this node saw become `waiting` (an owner change
    /// delivered here, or an agents' list showing it): their owner epoch
    /// and since when, for the hand-over's timeout
    /// ([`crate::session::handoff::run_timeouts`]).
    waiting: DashMap<ConversationKey, (u64, u64), foldhash::fast::RandomState>,
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
    /// The durable events handed to these sessions: one that comes again
    /// (a replay overlapping live traffic) is dropped here, once for all
    /// sessions, and so is one of a log incarnation left behind (the log
    /// was lost and recreated: the new log's seqs start again at 1). Also
    /// the latest owner change given them: the frames of a reply it takes
    /// over are dropped ([`Cursor::fences_off`]).
    delivered: Cursor,
    /// Taken by this node's appends to the conversation (made by the first).
    turn: Option<AppendTurn>,
    /// Replies streaming on this node, with what each was asked under: an
    /// owner change cancels those it takes over. While any is here the
    /// entry stays (and the node subscribed) even without sessions.
    replies: Vec<(OwnerEpoch, CancellationToken)>,
    /// Who types, each until when (each typist once).
    typists: Vec<(Typing, Instant)>,
    /// The customer types on a socket of this node (part of this node's
    /// presence entry, so the agents' lists on every node see it).
    customer_typing: bool,
    /// Other nodes' presence entries (by node), as last heard or read.
    remote: Vec<(String, Present)>,
    /// The presence view agents' handles were last given.
    presence_sent: Present,
    /// The conversation has a log (a snapshot found it, or an event of it
    /// came): until then this node keeps no presence entry of it, since
    /// nothing can list or watch a conversation that does not exist.
    exists: bool,
}

impl Local {
    fn is_empty(&self) -> bool {
        self.handles.is_empty() && self.replies.is_empty()
    }

    /// Notes that the conversation has a log; true the first time, when
    /// this node's presence entry of it is due.
    fn found_log(&mut self) -> bool {
        !std::mem::replace(&mut self.exists, true)
    }
}

impl FanOut {
    pub fn with_max_sockets(max_sockets: usize) -> Self {
        Self {
            sessions: DashMap::default(),
            max_sockets,
            typing_ttl: std::time::Duration::from_millis(4000),
            typing: Default::default(),
            presence_changed: Default::default(),
            presence_notify: Default::default(),
            list_changes: Default::default(),
            waiting: Default::default(),
        }
    }

    /// Where the changes of listed tenants' conversations are noted.
    pub fn list_changes(&self) -> &Arc<crate::listing::changes::Changes> {
        &self.list_changes
    }

    /// Notes that the conversation changed, for the agents listing its tenant here.
    pub fn mark_listed(&self, key: &ConversationKey) {
        self.list_changes.mark(key.tenant(), key.conversation());
    }

    /// How long typing signals hold here.
    pub fn with_typing_ttl(self, typing_ttl: std::time::Duration) -> Self {
        Self { typing_ttl, ..self }
    }

    /// Adds a session; returns true when it is the conversation's first on
    /// this node, or refuses it when the conversation is full here. The
    /// other agents watching get `presence` if it changes who is there (the
    /// session itself learns it from its snapshot).
    pub fn join(&self, key: &ConversationKey, handle: SessionHandle) -> Result<bool, ConversationFull> {
        let mut entry = self.sessions.entry(key.clone()).or_default();
        if entry.handles.len() >= self.max_sockets {
            return Err(ConversationFull);
        }
        let first = entry.is_empty();
        let before = entry.entry();
        let id = handle.id;
        entry.handles.push(handle);
        if entry.entry() != before {
            entry.tell_presence(key, Some(id));
            if entry.exists {
                self.mark_presence(key);
            }
        }
        Ok(first)
    }

    /// Whether this session watches or has the conversation on this node.
    pub fn has_session(&self, key: &ConversationKey, id: SessionId) -> bool {
        self.sessions.get(key).is_some_and(|local| local.handles.iter().any(|h| h.id == id))
    }

    /// The turn this node's appends to the conversation take, if it has
    /// sessions here (without them, there is no local order to keep).
    pub fn append_turn(&self, key: &ConversationKey) -> Option<AppendTurn> {
        let mut local = self.sessions.get_mut(key)?;
        Some(local.turn.get_or_insert_with(AppendTurn::default).clone())
    }

    /// Removes a session; returns true when it was the conversation's last
    /// on this node. The agents left watching get `presence` if it changes
    /// who is there.
    pub fn leave(&self, key: &ConversationKey, id: SessionId) -> bool {
        let mut changed = false;
        let last = self
            .sessions
            .remove_if_mut(key, |_, local| {
                let before = local.entry();
                local.handles.retain(|h| h.id != id);
                if local.entry() != before {
                    changed = local.exists;
                    local.tell_presence(key, None);
                }
                local.is_empty()
            })
            .is_some();
        if changed {
            self.mark_presence(key);
        }
        last
    }

    /// Delivers an agents' note to the agents watching the conversation
    /// here (never to a customer's socket: see [`Audience`]).
    pub fn deliver_note(&self, key: &ConversationKey, note: &crate::event::StoredNote) {
        let Some(local) = self.sessions.get(key) else { return };
        let mut frame = None;
        for handle in local.handles.iter().filter(|handle| handle.is_agent()) {
            let frame = frame.get_or_insert_with(|| note.note_frame(key.conversation().as_str())).clone();
            handle.push(Outbound::Note { seq: note.seq, frame });
        }
    }

    /// Asks every session on this node to re-read its conversation's log.
    pub fn resync_all(&self) {
        for entry in self.sessions.iter() {
            for handle in &entry.value().handles {
                handle.push(Outbound::Resync);
            }
        }
    }

    /// Asks the sessions of one conversation on this node to re-read its log.
    pub fn resync(&self, key: &ConversationKey) {
        if let Some(local) = self.sessions.get(key) {
            local.handles.iter().for_each(|handle| _ = handle.push(Outbound::Resync));
        }
    }

    /// Number of sessions of this conversation on this node.
    pub fn local_sessions(&self, key: &ConversationKey) -> usize {
        self.sessions.get(key).map_or(0, |local| local.handles.len())
    }

    /// Delivers frames that are not durable events (`reply.delta`s,
    /// `queued`) of a reply asked under `asked`, in order, to every
    /// session: one queue item per session however many frames. The last
    /// session gets the frames themselves: most conversations have one
    /// socket. Returns false, delivering nothing, when an owner change that
    /// takes the reply over was delivered here (the frames are fenced off).
    pub fn deliver_frames(&self, key: &ConversationKey, mut frames: Vec<Utf8Bytes>, asked: OwnerEpoch) -> bool {
        let Some(local) = self.sessions.get(key) else { return true };
        if local.delivered.fences_off(asked) {
            return false;
        }
        let queued_at = Instant::now();
        let item = |frames: Vec<Utf8Bytes>| Outbound::Frames { frames, asked, queued_at };
        if frames.is_empty() {
            return true;
        }
        if let Some((last, others)) = local.handles.split_last() {
            for handle in others {
                handle.push(item(frames.clone()));
            }
            last.push(item(std::mem::take(&mut frames)));
        }
        true
    }

    /// Delivers a durable event of the log incarnation `epoch`, unless
    /// these sessions already have it or left that incarnation (each
    /// session's writer fills a gap before it from the log, and tells its
    /// client when the log was recreated). `origin` is the session that sent
    /// a customer message: it gets an `ack`, the other sessions the
    /// `message` itself. `timing` rides along on a `reply.done` (it is not
    /// stored).
    pub fn deliver_event(
        &self,
        key: &ConversationKey,
        epoch: LogEpoch,
        event: &StoredEvent,
        origin: Option<SessionId>,
        timing: Option<&ReplyTiming>,
    ) {
        let Some(mut local) = self.sessions.get_mut(key) else { return };
        if local.found_log() {
            // Not kept before it existed.
            self.mark_presence(key);
        }
        let step = local.delivered.arrive(epoch, event.seq);
        match step {
            Step::Stale => return,
            // A new log: its seqs and its owner epochs start again.
            Step::NewLog => local.delivered.restart(epoch, 0),
            // A cursor that had not learnt its log learns it now, before an
            // owner change of it is judged (seq 0: nothing handed on yet).
            Step::Seen | Step::Next | Step::Gap => local.delivered.advance_in(epoch, 0),
        }
        let conversation = key.conversation().as_str();
        // An owner change fences even when its event is one these sessions
        // have: a later event of this node's came first, and their writers
        // filled the change in from the log.
        let owner = event.owner_frame(conversation).inspect(|(epoch, _)| {
            self.saw_owner(key, *epoch, event.event == Some(SystemEvent::Waiting), event.at_ms);
            if local.delivered.raise_owner(*epoch) {
                let Local { delivered, replies, .. } = &*local;
                replies.iter().filter(|(asked, _)| delivered.fences_off(*asked)).for_each(|(_, t)| t.cancel());
            }
        });
        if step == Step::Seen {
            return;
        }
        local.delivered.advance_in(epoch, event.seq);
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
        let origin = origin.filter(|_| matches!(event.from, Role::Customer | Role::Agent));
        let queued_at = Instant::now();
        // Encoded only if someone needs it (a lone customer socket needs just
        // its ack), and moved rather than cloned into the last session.
        let mut encoded = None;
        let last = local.handles.len().saturating_sub(1);
        for (i, handle) in local.handles.iter().enumerate() {
            let frame = if origin == Some(handle.id) {
                let conversation = handle.is_agent().then_some(conversation);
                ServerFrame::Ack { conversation, id: &event.id, seq: event.seq }.encode()
            } else if i == last {
                encoded.take().unwrap_or_else(shared)
            } else {
                encoded.get_or_insert_with(shared).clone()
            };
            handle.push(Outbound::Event { epoch, seq: event.seq, frame, queued_at });
        }
        if let Some((owner_epoch, frame)) = owner {
            for handle in &local.handles {
                handle.push(Outbound::Owner {
                    change: OwnerEpoch { log: epoch, epoch: owner_epoch },
                    frame: frame.clone(),
                });
            }
        }
    }
}

impl IncomingEvents for FanOut {
    fn event(&self, key: &ConversationKey, epoch: LogEpoch, event: &StoredEvent, timing: Option<&ReplyTiming>) {
        // Another node's socket sent it: every session here gets the `message`.
        self.deliver_event(key, epoch, event, None, timing);
    }

    fn frames(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>, asked: OwnerEpoch) {
        self.deliver_frames(key, frames, asked);
    }

    fn note(&self, key: &ConversationKey, note: &crate::event::StoredNote) {
        self.deliver_note(key, note);
    }

    fn resync(&self) {
        self.resync_all();
        self.list_changes.resync();
    }

    fn resync_conversation(&self, key: &ConversationKey) {
        self.resync(key);
    }

    fn typing(&self, key: &ConversationKey, typing: &Typing) {
        self.deliver_typing(key, typing, None);
    }

    fn presence(&self, key: &ConversationKey, node: &str, entry: Present) {
        self.remote_presence(key, node, entry);
    }

    fn listed(&self, tenant: &crate::ids::TenantId, conversation: crate::ids::ConversationId) {
        self.list_changes.mark(tenant, &conversation);
    }
}

#[cfg(test)]
mod tests;
