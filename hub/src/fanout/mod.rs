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
//! carry the owner epoch they were produced under, and once this node has
//! delivered the event of an owner change (an event with `owner_epoch`),
//! frames of an older epoch are dropped here (under the same entry lock as
//! the event, so none slips in after it), and the replies streaming here
//! under an older epoch ([`FanOut::hold`]) are told to stop. Agent-only
//! frames (`owner`) go to agents' handles only ([`Audience`]).

mod session;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;

use tokio_util::sync::CancellationToken;

use crate::bus::IncomingEvents;
use crate::event::{Cursor, LogEpoch, Step, StoredEvent};
use crate::ids::{ConversationKey, SessionId};
use crate::presence::{Present, Typing};
use crate::protocol::{ReplyTiming, Role, ServerFrame};

pub use session::{Audience, Outbound, SessionCloser, SessionHandle};

/// Serializes this node's appends to one conversation, so that their local
/// deliveries reach the fan-out in seq order (an `ack` stays an `ack`, a
/// `reply.done` a `reply.done`, instead of being filled from the log).
pub type AppendTurn = Arc<tokio::sync::Mutex<()>>;

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
    typing_ttl: std::time::Duration,
    /// Conversations with someone typing (the ones [`FanOut::expire_typing`] looks at).
    typing: dashmap::DashSet<ConversationKey, foldhash::fast::RandomState>,
    /// Conversations whose entry on this node changed since
    /// [`FanOut::take_changed_presence`] last took them.
    presence_changed: dashmap::DashSet<ConversationKey, foldhash::fast::RandomState>,
    /// Wakes [`FanOut::presence_changed`].
    presence_notify: tokio::sync::Notify,
    /// The conversations of listed tenants that changed, for this node's
    /// agents' lists ([`crate::listing`]).
    list_changes: Arc<crate::listing::Changes>,
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
    /// was lost and recreated: the new log's seqs start again at 1).
    delivered: Cursor,
    /// Taken by this node's appends to the conversation (made by the first).
    turn: Option<AppendTurn>,
    /// The highest owner epoch whose change these sessions were given:
    /// frames of an older epoch are dropped.
    owner_epoch: u64,
    /// Replies streaming on this node, with the owner epoch each was asked
    /// under: an owner change cancels the older ones. While any is here the
    /// entry stays (and the node subscribed) even without sessions.
    replies: Vec<(u64, CancellationToken)>,
    /// Who types, each until when (each typist once).
    typists: Vec<(Typing, Instant)>,
    /// Other nodes' presence entries (by node), as last heard or read.
    remote: Vec<(String, Present)>,
    /// The presence view agents' handles were last given.
    presence_sent: Present,
}

impl Local {
    fn is_empty(&self) -> bool {
        self.handles.is_empty() && self.replies.is_empty()
    }

    /// This node's presence entry: from its handles.
    fn entry(&self) -> Present {
        let mut entry = Present::default();
        for handle in &self.handles {
            match handle.viewer() {
                Some(viewer) => entry.viewers.push(viewer.clone()),
                None => entry.online = true,
            }
        }
        entry.viewers.sort();
        entry.viewers.dedup();
        entry
    }

    /// Every node's entries merged.
    fn view(&self) -> Present {
        let mut view = self.entry();
        for (_, entry) in &self.remote {
            view.merge(entry);
        }
        view
    }

    /// Sends `presence` to the agents' handles (but `except`) if the view
    /// changed since they were last given it.
    fn tell_presence(&mut self, key: &ConversationKey, except: Option<SessionId>) {
        let view = self.view();
        if view == self.presence_sent {
            return;
        }
        let frame = view.frame(key.conversation().as_str());
        self.presence_sent = view;
        for handle in self.handles.iter().filter(|h| h.is_agent() && Some(h.id) != except) {
            handle.push(Outbound::ephemeral(frame.clone()));
        }
    }

    /// Pushes a typing signal to every handle but the typist's own
    /// (`origin`, and a typing agent's every socket): agents get it all,
    /// customers only an owner's (see [`Typing`]).
    fn tell_typing(&self, key: &ConversationKey, typing: &Typing, origin: Option<SessionId>) {
        let conversation = key.conversation().as_str();
        let (mut agents, mut customers) = (None, None);
        let typist = typing.typist_id();
        let own = |h: &&SessionHandle| Some(h.id) == origin || h.viewer().is_some_and(|v| v.agent == typist);
        for handle in self.handles.iter().filter(|h| !own(h)) {
            let frame = match handle.is_agent() {
                true => agents.get_or_insert_with(|| typing.agent_frame(conversation)),
                false if typing.to_customer => customers.get_or_insert_with(|| typing.customer_frame(conversation)),
                false => continue,
            };
            handle.push(Outbound::ephemeral(frame.clone()));
        }
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
        }
    }

    /// Where the changes of listed tenants' conversations are noted.
    pub fn list_changes(&self) -> &Arc<crate::listing::Changes> {
        &self.list_changes
    }

    /// Notes that the conversation changed, for the agents listing its tenant here.
    pub fn mark_listed(&self, key: &ConversationKey) {
        self.list_changes.mark(key.tenant(), key.conversation());
    }

    /// This node's presence entry of `key` (its own sockets only).
    pub fn local_entry(&self, key: &ConversationKey) -> Present {
        self.sessions.get(key).map(|local| local.entry()).unwrap_or_default()
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
            self.mark_presence(key);
        }
        Ok(first)
    }

    /// Notes that this node's presence entry of `key` changed (or must be
    /// written again).
    pub fn mark_presence(&self, key: &ConversationKey) {
        self.presence_changed.insert(key.clone());
        self.presence_notify.notify_one();
    }

    /// Resolves when some conversation's entry on this node changed.
    pub async fn presence_changed(&self) {
        self.presence_notify.notified().await;
    }

    /// This node's entries that changed (an empty one: it has none left).
    pub fn take_changed_presence(&self) -> Vec<(ConversationKey, Present)> {
        let keys: Vec<ConversationKey> = self.presence_changed.iter().map(|key| key.clone()).collect();
        keys.into_iter()
            .map(|key| {
                self.presence_changed.remove(&key);
                let entry = self.sessions.get(&key).map(|local| local.entry()).unwrap_or_default();
                (key, entry)
            })
            .collect()
    }

    /// Every non-empty entry of this node (for the heartbeat).
    pub fn presence_entries(&self) -> Vec<(ConversationKey, Present)> {
        self.sessions
            .iter()
            .map(|local| (local.key().clone(), local.entry()))
            .filter(|(_, entry)| !entry.is_empty())
            .collect()
    }

    /// The conversations agents watch on this node.
    pub fn watched_conversations(&self) -> Vec<ConversationKey> {
        self.sessions
            .iter()
            .filter(|local| local.handles.iter().any(|h| h.is_agent()))
            .map(|l| l.key().clone())
            .collect()
    }

    /// Replaces what this node knows of the other nodes' entries of `key`
    /// (telling its agents but `except` if the view changed); returns the view.
    pub fn set_remote_presence(
        &self,
        key: &ConversationKey,
        remote: Vec<(String, Present)>,
        except: Option<SessionId>,
    ) -> Present {
        let Some(mut local) = self.sessions.get_mut(key) else { return Present::default() };
        local.remote = remote;
        local.tell_presence(key, except);
        local.view()
    }

    /// Another node's entry of `key` changed.
    pub fn remote_presence(&self, key: &ConversationKey, node: &str, entry: Present) {
        let Some(mut local) = self.sessions.get_mut(key) else { return };
        local.remote.retain(|(other, _)| other != node);
        if !entry.is_empty() {
            local.remote.push((node.to_owned(), entry));
        }
        local.tell_presence(key, None);
    }

    /// Delivers a typing signal to the conversation's sockets here, but
    /// the typist's own (`origin`), and holds it until it expires: a repeated
    /// `on: true` only extends it; an `on: false` for nobody typing is dropped.
    pub fn deliver_typing(&self, key: &ConversationKey, typing: &Typing, origin: Option<SessionId>) {
        let Some(mut local) = self.sessions.get_mut(key) else { return };
        let held = local.typists.iter().position(|(held, _)| held.typist_id() == typing.typist_id());
        if !typing.on {
            if let Some(at) = held {
                local.typists.swap_remove(at);
                local.tell_typing(key, typing, origin);
            }
            return;
        }
        let until = Instant::now() + self.typing_ttl;
        match held {
            Some(at) if local.typists[at].0 == *typing => local.typists[at].1 = until,
            Some(at) => {
                let (before, _) = std::mem::replace(&mut local.typists[at], (typing.clone(), until));
                if before.to_customer && !typing.to_customer {
                    // The customer saw it; now it is a note, or not the owner's.
                    for handle in local.handles.iter().filter(|h| !h.is_agent() && Some(h.id) != origin) {
                        handle.push(Outbound::ephemeral(before.stopped().customer_frame(key.conversation().as_str())));
                    }
                }
                local.tell_typing(key, typing, origin);
            }
            None => {
                local.typists.push((typing.clone(), until));
                local.tell_typing(key, typing, origin);
                self.typing.insert(key.clone());
            }
        }
    }

    /// Stops every typing signal whose time is up, telling the sockets
    /// `on: false`.
    pub fn expire_typing(&self) {
        let now = Instant::now();
        self.typing.retain(|key| {
            let Some(mut local) = self.sessions.get_mut(key) else { return false };
            let mut at = 0;
            while at < local.typists.len() {
                if local.typists[at].1 <= now {
                    let (typing, _) = local.typists.swap_remove(at);
                    local.tell_typing(key, &typing.stopped(), None);
                } else {
                    at += 1;
                }
            }
            !local.typists.is_empty()
        });
    }

    /// Registers a reply streaming on this node under owner epoch `epoch`:
    /// `takeover` is cancelled when an owner change of a later epoch is
    /// delivered here (at once if one already was). Returns true when the
    /// conversation had nothing on this node before (subscribe it).
    pub fn hold(&self, key: &ConversationKey, epoch: u64, takeover: CancellationToken) -> bool {
        let mut entry = self.sessions.entry(key.clone()).or_default();
        let first = entry.is_empty();
        if entry.owner_epoch > epoch {
            takeover.cancel();
        }
        entry.replies.push((epoch, takeover));
        first
    }

    /// [`FanOut::hold`] when the conversation already has something on this
    /// node (it is subscribed: nothing more to do); false, doing nothing, if not.
    pub fn hold_if_present(&self, key: &ConversationKey, epoch: u64, takeover: &CancellationToken) -> bool {
        let Some(mut local) = self.sessions.get_mut(key) else { return false };
        if local.is_empty() {
            return false;
        }
        if local.owner_epoch > epoch {
            takeover.cancel();
        }
        local.replies.push((epoch, takeover.clone()));
        true
    }

    /// [`FanOut::unhold`] when it is not the conversation's last thing on
    /// this node; false, doing nothing, if it is.
    pub fn unhold_unless_last(&self, key: &ConversationKey, takeover: &CancellationToken) -> bool {
        let Some(mut local) = self.sessions.get_mut(key) else { return false };
        let Some(at) = local.replies.iter().position(|(_, t)| t == takeover) else { return false };
        if local.handles.is_empty() && local.replies.len() == 1 {
            return false;
        }
        local.replies.swap_remove(at);
        true
    }

    /// Ends a [`FanOut::hold`]; returns true when it was the conversation's
    /// last thing on this node (unsubscribe it).
    pub fn unhold(&self, key: &ConversationKey, takeover: &CancellationToken) -> bool {
        self.sessions
            .remove_if_mut(key, |_, local| {
                if let Some(at) = local.replies.iter().position(|(_, t)| t == takeover) {
                    local.replies.swap_remove(at);
                }
                local.is_empty()
            })
            .is_some()
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
                    changed = true;
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
    /// `queued`), produced under owner epoch `epoch`, in order, to every
    /// session: one queue item per session however many frames. The last
    /// session gets the frames themselves: most conversations have one
    /// socket. Returns false, delivering nothing, when an owner change after
    /// `epoch` was delivered here (the frames are fenced off).
    pub fn deliver_frames(&self, key: &ConversationKey, mut frames: Vec<Utf8Bytes>, epoch: u64) -> bool {
        let Some(local) = self.sessions.get(key) else { return true };
        if local.owner_epoch > epoch {
            return false;
        }
        let queued_at = Instant::now();
        let item = |mut frames: Vec<Utf8Bytes>| match frames.len() {
            1 => Outbound::Frame { frame: frames.remove(0), queued_at },
            _ => Outbound::Frames { frames, queued_at },
        };
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
        match local.delivered.arrive(epoch, event.seq) {
            Step::Seen | Step::Stale => return,
            Step::NewLog => {
                // A new log: its seqs and its owner epochs start again.
                local.delivered.restart(epoch, 0);
                local.owner_epoch = 0;
            }
            Step::Next | Step::Gap => {}
        }
        local.delivered.advance_in(epoch, event.seq);
        let conversation = key.conversation().as_str();
        let owner = event.owner_frame(conversation).inspect(|(epoch, _)| {
            if *epoch > local.owner_epoch {
                local.owner_epoch = *epoch;
                local.replies.iter().filter(|(asked, _)| asked < epoch).for_each(|(_, takeover)| takeover.cancel());
            }
        });
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
        if let Some((epoch, frame)) = owner {
            for handle in local.handles.iter().filter(|handle| handle.is_agent()) {
                handle.push(Outbound::Owner { epoch, frame: frame.clone() });
            }
        }
    }
}

impl IncomingEvents for FanOut {
    fn event(&self, key: &ConversationKey, epoch: LogEpoch, event: &StoredEvent, timing: Option<&ReplyTiming>) {
        // Another node's socket sent it: every session here gets the `message`.
        self.deliver_event(key, epoch, event, None, timing);
    }

    fn frames(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>, epoch: u64) {
        self.deliver_frames(key, frames, epoch);
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
