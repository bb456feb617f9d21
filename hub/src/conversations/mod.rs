//! A node's conversations: the log, the bus and the local fan-out composed
//! into what sessions and replies do (attach, append, stream, leave).
//!
//! Local first: what this node appends or streams goes to its own sockets at
//! once, through the [`FanOut`], and reaches other nodes through the log's
//! atomic append (durable events) or the [`EventBus`] (frames), each only if
//! another node listens; nothing this node produced comes back to it. What
//! other nodes produce arrives through the bus, which hands it to the same
//! fan-out. Ordering comes from seqs, not from paths: the fan-out drops what
//! its sessions have, a session's writer fills a gap from the log, and this
//! node's appends to one conversation take turns ([`FanOut::append_turn`])
//! so their local deliveries are in seq order.
//!
//! The same code runs on both backends: the single node has the in-memory
//! log and the [`crate::bus::LocalBus`], cluster mode the Redis log and bus.

mod subscriptions;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use crate::bus::EventBus;
use crate::event::{NewEvent, OwnerEpoch, StoredEvent};
use crate::fanout::{FanOut, SessionHandle};
use crate::ids::{ConversationId, ConversationKey, Party, SessionId, TenantId, UserId};
use crate::presence::{PresenceBoard, Present, Typing};
use crate::protocol::{LastEvent, Summary};
use crate::store::{AppendWith, Appended, ConversationLog, Opened, Pending, Snapshot, StoreError};
use subscriptions::Subscriptions;

pub struct Conversations {
    log: Arc<dyn ConversationLog>,
    bus: Arc<dyn EventBus>,
    fanout: Arc<FanOut>,
    /// Where nodes keep who is in a conversation ([`crate::presence`]).
    board: Arc<dyn PresenceBoard>,
    /// Serializes, per conversation, fan-out join/leave with the bus's
    /// subscribe/unsubscribe, so that a leave and a join of one
    /// conversation cannot reorder; and knows the conversations this node
    /// has sessions of but is not subscribed to: fresh ones
    /// ([`Pending::fresh`]), subscribed at their first append (a socket
    /// that never asks costs the bus nothing, not even in cluster mode,
    /// where subscribing takes two Redis round trips).
    subscriptions: Subscriptions,
}

impl Conversations {
    pub fn new(
        log: Arc<dyn ConversationLog>,
        bus: Arc<dyn EventBus>,
        fanout: Arc<FanOut>,
        board: Arc<dyn PresenceBoard>,
    ) -> Self {
        Self { log, bus, fanout, board, subscriptions: Default::default() }
    }

    /// Who is in the conversation, on every node (read from the board now:
    /// a node that just joined has heard nothing yet), for the snapshot of
    /// `session`, which joined it on this node (the other agents watching
    /// here get `presence` if the read changed what they knew).
    pub async fn presence(&self, key: &ConversationKey, session: SessionId) -> Result<Present, StoreError> {
        let remote = self.board.read(std::slice::from_ref(key)).await?.pop().unwrap_or_default();
        Ok(self.fanout.set_remote_presence(key, remote, Some(session)))
    }

    /// Who is in each conversation, every node's live entries merged (in
    /// one read of the board).
    pub async fn present(&self, keys: &[ConversationKey]) -> Result<Vec<Present>, StoreError> {
        let remote = self.board.read(keys).await?;
        Ok(keys
            .iter()
            .zip(remote)
            .map(|(key, entries)| {
                let mut present = self.fanout.local_entry(key);
                entries.iter().for_each(|(_, entry)| present.merge(entry));
                present
            })
            .collect())
    }

    /// The conversation as the agents' list shows it (`None`: no log):
    /// the log's part and who is in it on every node.
    pub async fn summary(&self, key: &ConversationKey) -> Result<Option<Summary>, StoreError> {
        let Some(log) = self.log.summary(key).await? else { return Ok(None) };
        let present = self.present(std::slice::from_ref(key)).await?.pop().unwrap_or_default();
        let (agent, agent_name) = match log.ownership.owner.agent() {
            Some((id, name)) => (Some(id.to_owned()), Some(name.to_owned())),
            None => (None, None),
        };
        let last = log.last.map(|event| LastEvent {
            seq: event.seq,
            from: event.from,
            text: event.text.chars().take(LastEvent::MAX_CHARS).collect(),
            at: event.at_ms,
        });
        Ok(Some(Summary {
            conversation: key.conversation().as_str().to_owned(),
            customer: log.customer.as_str().to_owned(),
            owner: log.ownership.owner.kind(),
            agent,
            agent_name,
            owner_epoch: log.ownership.epoch,
            owner_since: Some(log.ownership.since_ms).filter(|since| *since > 0),
            online: present.online,
            typing: present.typing,
            last,
            customer_at: log.customer_at,
            viewers: present.viewers,
        }))
    }

    /// See [`ConversationLog::active`].
    pub async fn active(
        &self,
        tenant: &TenantId,
        since_ms: u64,
        max: usize,
    ) -> Result<Vec<ConversationId>, StoreError> {
        self.log.active(tenant, since_ms, max).await
    }

    /// See [`EventBus::list_tenant`].
    pub async fn list_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        self.bus.list_tenant(tenant).await
    }

    /// See [`EventBus::unlist_tenant`].
    pub async fn unlist_tenant(&self, tenant: &TenantId) {
        self.bus.unlist_tenant(tenant).await;
    }

    /// See [`EventBus::keep_listing`].
    pub async fn keep_listing(&self, tenants: &[TenantId]) {
        self.bus.keep_listing(tenants).await;
    }

    /// See [`FanOut::saw_owner`].
    pub fn saw_owner(&self, key: &ConversationKey, epoch: u64, waiting: bool, since_ms: u64) {
        self.fanout.saw_owner(key, epoch, waiting, since_ms);
    }

    /// See [`FanOut::take_waiting_since`].
    pub fn take_waiting_since(&self, cutoff_ms: u64) -> Vec<(ConversationKey, u64, u64)> {
        self.fanout.take_waiting_since(cutoff_ms)
    }

    /// The changes the agents' lists of this node wait for.
    pub fn list_changes(&self) -> Arc<crate::listing::changes::Changes> {
        self.fanout.list_changes().clone()
    }

    /// Someone typing (or stopped): to this node's sockets of the
    /// conversation at once, but the typist's own (`origin`), and to other
    /// nodes' through the bus.
    pub fn typing(&self, key: &ConversationKey, typing: &Typing, origin: SessionId) {
        self.bus.publish_typing(key, typing);
        self.fanout.deliver_typing(key, typing, Some(origin));
    }

    /// See [`ConversationLog::open`].
    pub async fn open(&self, party: &Party, requested: Option<&ConversationId>) -> Result<Opened, StoreError> {
        self.log.open(party, requested).await
    }

    /// Registers a session for live events and returns what it missed after
    /// `after`. A conversation without a log is `ConversationNotFound`,
    /// unless `pending` is given: then an empty snapshot with its epoch.
    ///
    /// Joined and subscribed first, read second: no event falls between;
    /// one that is both read and delivered is sent once (the writer's cursor).
    /// A fresh conversation ([`Pending::fresh`]) is neither subscribed nor
    /// read: until its first append ([`Conversations::append`]) creates it,
    /// no one else can name it.
    pub async fn attach(
        &self,
        key: &ConversationKey,
        session: SessionHandle,
        after: Option<u64>,
        pending: Option<&Pending>,
    ) -> Result<Snapshot, StoreError> {
        let id = session.id;
        let fresh = pending.filter(|pending| pending.fresh);
        {
            let turn = self.subscriptions.lock(key).await;
            let first = self.fanout.join(key, session).map_err(|_| StoreError::TooManySockets)?;
            if first && fresh.is_some() {
                turn.mark_fresh();
            } else if (first || turn.take_failed())
                && let Err(error) = self.bus.subscribe(key).await
            {
                if !self.fanout.leave(key, id) {
                    // A reply holds it still: the next join tries again.
                    turn.mark_failed();
                }
                return Err(error);
            }
        }
        if let Some(fresh) = fresh {
            return Ok(Snapshot::not_created(fresh));
        }
        match self.log.snapshot(key, after).await {
            Ok(Some(snapshot)) => {
                if snapshot.exists {
                    self.fanout.note_exists(key);
                }
                Ok(snapshot)
            }
            // Not created again yet: a lost log's old id is subscribed all
            // the same, so the session hears whoever starts it again.
            Ok(None) if let Some(pending) = pending => Ok(Snapshot::not_created(pending)),
            Ok(None) => {
                self.detach(key, id).await;
                Err(StoreError::ConversationNotFound)
            }
            Err(error) => {
                self.detach(key, id).await;
                Err(error)
            }
        }
    }

    /// Stops live events to a session. Never fails: a session that is gone is gone.
    pub async fn detach(&self, key: &ConversationKey, session: SessionId) {
        let turn = self.subscriptions.lock(key).await;
        if self.fanout.leave(key, session) {
            self.leave_bus(&turn, key).await;
        }
    }

    /// The conversation's last session or hold left: it is not
    /// subscribed if it was fresh; otherwise unsubscribed (also after a
    /// failed subscription, which may have left part of it behind).
    async fn leave_bus(&self, turn: &subscriptions::Turn<'_>, key: &ConversationKey) {
        turn.take_failed();
        if !turn.take_fresh() {
            self.bus.unsubscribe(key).await;
        }
    }

    /// Subscribes this node to a fresh conversation its sessions are about
    /// to create: before the creating append enters this node in the
    /// conversation's listeners (see [`crate::store::redis`]), so no event
    /// of it can be published to this node unheard.
    async fn subscribe_before_creating(&self, key: &ConversationKey) -> Result<(), StoreError> {
        let turn = self.subscriptions.lock(key).await;
        if turn.is_fresh() {
            self.bus.subscribe_fresh(key).await?;
            turn.take_fresh();
        }
        Ok(())
    }

    /// See [`ConversationLog::touch`].
    pub async fn touch(&self, user: &UserId, key: &ConversationKey) {
        self.log.touch(user, key).await;
    }

    /// Stores a durable event and delivers it to this node's sessions at
    /// once (`origin`, the sending socket, gets an `ack`); the log's append
    /// carries it to other nodes. See [`ConversationLog::append`].
    pub async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        origin: Option<SessionId>,
        with: AppendWith<'_>,
    ) -> Result<Appended, StoreError> {
        if with.create.is_some_and(|pending| pending.fresh) {
            self.subscribe_before_creating(key).await?;
        }
        let timing = event.timing;
        let turn = self.fanout.append_turn(key);
        let _turn = match &turn {
            Some(turn) => Some(turn.lock().await),
            None => None,
        };
        let appended = self.log.append(key, event, with).await?;
        match &appended {
            Appended::New { event, epoch, .. } => {
                self.fanout.deliver_event(key, *epoch, event, origin, timing.as_ref());
                self.fanout.mark_listed(key);
            }
            // Stored before (a resend whose first answer was lost): the log
            // exists, though this node may never deliver its creating event.
            Appended::Duplicate(_) => self.fanout.note_exists(key),
        }
        Ok(appended)
    }

    /// Delivers non-durable frames (`reply.delta`s, `queued`) of a reply
    /// asked under `asked`, in order, to every socket of the conversation:
    /// this node's at once, other nodes' through the bus. Best effort and
    /// never waits: a lost delta is repaired by `reply.done`. Returns false,
    /// sending nothing, when this node has delivered an owner change that
    /// takes the reply over (the frames are fenced off: see [`FanOut`]).
    pub fn publish_frames(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>, asked: OwnerEpoch) -> bool {
        // The bus first, as always (one fan-out lookup per batch): another
        // node's fan-out applies the same fence to what it receives, and
        // the stored reply follows what this node's sockets got.
        self.bus.publish_frames(key, &frames, asked);
        self.fanout.deliver_frames(key, frames, asked)
    }

    /// Keeps the conversation subscribed on this node while a reply streams
    /// here, even if its sockets leave, so the node hears of an owner
    /// change: `takeover` is cancelled by one that takes over a reply asked
    /// under `asked` (see [`FanOut::hold`]). Ended by [`Conversations::unhold`].
    pub async fn hold(&self, key: &ConversationKey, asked: OwnerEpoch, takeover: &tokio_util::sync::CancellationToken) {
        // The common case, the asking socket still here: no lock, no round trip.
        if self.fanout.hold_if_present(key, asked, takeover) {
            return;
        }
        let turn = self.subscriptions.lock(key).await;
        if self.fanout.hold(key, asked, takeover.clone())
            && let Err(error) = self.bus.subscribe(key).await
        {
            // The reply goes on; an owner change elsewhere reaches it only
            // through the store's fence when it is stored. A session that
            // joins meanwhile subscribes it.
            tracing::warn!(%error, "cannot subscribe to the conversation of a reply");
            turn.mark_failed();
        }
    }

    /// Ends a [`Conversations::hold`].
    pub async fn unhold(&self, key: &ConversationKey, takeover: &tokio_util::sync::CancellationToken) {
        if self.fanout.unhold_unless_last(key, takeover) {
            return;
        }
        let turn = self.subscriptions.lock(key).await;
        if self.fanout.unhold(key, takeover) {
            self.leave_bus(&turn, key).await;
        }
    }

    /// Stores an agents' note and delivers it to this node's agents at once
    /// (the store carries it to other nodes'); a resend is neither stored
    /// nor delivered again. See [`crate::store::NoteLog`].
    pub async fn add_note(
        &self,
        key: &ConversationKey,
        note: crate::event::StoredNote,
    ) -> Result<crate::store::NoteAdded, StoreError> {
        let added = self.log.add_note(key, note).await?;
        if let crate::store::NoteAdded::New(note) = &added {
            self.fanout.deliver_note(key, note);
        }
        Ok(added)
    }

    /// See [`crate::store::NoteLog::notes`].
    pub async fn notes(&self, key: &ConversationKey) -> Result<Vec<Arc<crate::event::StoredNote>>, StoreError> {
        self.log.notes(key).await
    }

    /// Who answers the conversation; `None` if it has no log.
    pub async fn ownership(&self, key: &ConversationKey) -> Result<Option<crate::owner::Ownership>, StoreError> {
        Ok(self.log.snapshot(key, None).await?.map(|snapshot| snapshot.ownership))
    }

    /// [`Conversations::attach`]'s snapshot, for a session attached
    /// already (a watch set up again): `ConversationNotFound` without a log.
    pub async fn snapshot(&self, key: &ConversationKey, after: Option<u64>) -> Result<Snapshot, StoreError> {
        let snapshot = self.log.snapshot(key, after).await?.ok_or(StoreError::ConversationNotFound)?;
        if snapshot.exists {
            self.fanout.note_exists(key);
        }
        Ok(snapshot)
    }

    /// Whether this session has (or watches) the conversation on this node.
    pub fn has_session(&self, key: &ConversationKey, session: SessionId) -> bool {
        self.fanout.has_session(key, session)
    }

    /// Waits until the frames published so far have left for other nodes.
    pub async fn flush_frames(&self) {
        self.bus.flush().await;
    }

    /// Whether any socket of the conversation is open, on any node (a reply
    /// keeps streaming while someone listens). Errs on the side of true.
    pub async fn has_listeners(&self, key: &ConversationKey) -> bool {
        self.fanout.local_sessions(key) > 0 || self.bus.has_remote_listeners(key).await
    }

    /// Whether this node currently receives other nodes' events.
    pub fn is_receiving(&self) -> bool {
        self.bus.is_receiving()
    }

    /// Where the log stands and its events after `after` (`None`: it has no
    /// log). See [`ConversationLog::snapshot`].
    pub async fn read_log(&self, key: &ConversationKey, after: u64) -> Result<Option<Snapshot>, StoreError> {
        self.log.snapshot(key, Some(after)).await
    }

    /// See [`ConversationLog::events_after`].
    pub async fn events_after(&self, key: &ConversationKey, after: u64) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        self.log.events_after(key, after).await
    }
}
