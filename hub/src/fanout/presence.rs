//! The fan-out's part in presence and typing ([`crate::presence`]): this
//! node's presence entry of each conversation, made from its handles and
//! the customer's typing here, the other nodes' entries as last heard, the
//! `presence` frames agents get when the merged view changes, and the
//! typing signals held until they expire; and the node's task that keeps
//! this node's entries on the [`PresenceBoard`] ([`run_presence`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{FanOut, Local, Outbound, SessionHandle};
use crate::ids::{ConversationKey, SessionId};
use crate::presence::{PresenceBoard, Present, Typing, Typist};

impl Local {
    /// This node's presence entry: from its handles.
    pub(super) fn entry(&self) -> Present {
        let mut entry = Present::default();
        for handle in &self.handles {
            match handle.viewer() {
                Some(viewer) => entry.viewers.push(viewer.clone()),
                None => entry.online = true,
            }
        }
        entry.viewers.sort();
        entry.viewers.dedup();
        entry.typing = self.customer_typing;
        entry
    }

    /// Every node's entries merged.
    pub(super) fn view(&self) -> Present {
        let mut view = self.entry();
        for (_, entry) in &self.remote {
            view.merge(entry);
        }
        view
    }

    /// Sends `presence` to the agents' handles (but `except`) if the view
    /// changed since they were last given it.
    pub(super) fn tell_presence(&mut self, key: &ConversationKey, except: Option<SessionId>) {
        // Typing has its own frames.
        let view = Present { typing: false, ..self.view() };
        if view == self.presence_sent {
            return;
        }
        let frame = view.frame(key.conversation().as_str());
        self.presence_sent = view;
        for handle in self.handles.iter().filter(|h| h.is_agent() && Some(h.id) != except) {
            handle.push(Outbound::ephemeral(frame.clone()));
        }
    }

    /// Holds a typing signal (see [`FanOut::deliver_typing`]) and tells the
    /// sockets; true when it is the conversation's first typist held here.
    pub(super) fn hold_typing(
        &mut self,
        key: &ConversationKey,
        typing: &Typing,
        origin: Option<SessionId>,
        ttl: Duration,
    ) -> bool {
        let held = self.typists.iter().position(|(held, _)| held.typist_id() == typing.typist_id());
        if !typing.on {
            if let Some(at) = held {
                self.typists.swap_remove(at);
                self.tell_typing(key, typing, origin);
            }
            return false;
        }
        let until = Instant::now() + ttl;
        match held {
            Some(at) if self.typists[at].0 == *typing => self.typists[at].1 = until,
            Some(at) => {
                let (before, _) = std::mem::replace(&mut self.typists[at], (typing.clone(), until));
                if before.to_customer && !typing.to_customer {
                    // The customer saw it; now it is a note, or not the owner's.
                    let frame = before.stopped().customer_frame(key.conversation().as_str());
                    for handle in self.handles.iter().filter(|h| !h.is_agent() && Some(h.id) != origin) {
                        handle.push(Outbound::ephemeral(frame.clone()));
                    }
                }
                self.tell_typing(key, typing, origin);
            }
            None => {
                self.typists.push((typing.clone(), until));
                self.tell_typing(key, typing, origin);
                return true;
            }
        }
        false
    }

    /// Pushes a typing signal to every handle but the typist's own
    /// (`origin`, and a typing agent's every socket): agents get it all,
    /// customers only an owner's (see [`Typing`]).
    pub(super) fn tell_typing(&self, key: &ConversationKey, typing: &Typing, origin: Option<SessionId>) {
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
    /// This node's presence entry of `key` (its own sockets only).
    pub fn local_entry(&self, key: &ConversationKey) -> Present {
        self.sessions.get(key).map(|local| local.entry()).unwrap_or_default()
    }

    /// Notes that `key`'s conversation has a log (a snapshot found it, an
    /// append found its message stored): from now on this node keeps its
    /// presence entry of it.
    pub fn note_exists(&self, key: &ConversationKey) {
        let Some(mut local) = self.sessions.get_mut(key) else { return };
        if local.found_log() {
            self.mark_presence(key);
        }
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
    /// Only conversations that exist are marked, so a marked one whose
    /// entry here is not known to exist was left and then joined again
    /// before this ran: its old entry is removed.
    pub fn take_changed_presence(&self) -> Vec<(ConversationKey, Present)> {
        let keys: Vec<ConversationKey> = self.presence_changed.iter().map(|key| key.clone()).collect();
        keys.into_iter()
            .map(|key| {
                self.presence_changed.remove(&key);
                let entry = match self.sessions.get(&key) {
                    Some(local) if local.exists => local.entry(),
                    _ => Present::default(),
                };
                (key, entry)
            })
            .collect()
    }

    /// Every non-empty entry of this node, of conversations that exist
    /// (for the heartbeat).
    pub fn presence_entries(&self) -> Vec<(ConversationKey, Present)> {
        self.sessions
            .iter()
            .filter(|local| local.exists)
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
    /// A customer typing on a socket here (`origin` given) changes this
    /// node's presence entry.
    pub fn deliver_typing(&self, key: &ConversationKey, typing: &Typing, origin: Option<SessionId>) {
        let Some(mut local) = self.sessions.get_mut(key) else { return };
        let here = origin.is_some() && typing.typist == Typist::Customer && local.customer_typing != typing.on;
        if here {
            local.customer_typing = typing.on;
        }
        // Only an entry that exists is kept (see `Local::exists`).
        let changed_entry = here && local.exists;
        let held = local.hold_typing(key, typing, origin, self.typing_ttl);
        // Not under the entry's lock: `expire_typing` takes these two the other way round.
        drop(local);
        if held {
            self.typing.insert(key.clone());
        }
        if changed_entry {
            self.mark_presence(key);
        }
    }

    /// Stops every typing signal whose time is up, telling the sockets
    /// `on: false`.
    pub fn expire_typing(&self) {
        let now = Instant::now();
        let mut stopped_here = Vec::new();
        self.typing.retain(|key| {
            let Some(mut local) = self.sessions.get_mut(key) else { return false };
            let mut at = 0;
            while at < local.typists.len() {
                if local.typists[at].1 <= now {
                    let (typing, _) = local.typists.swap_remove(at);
                    if typing.typist == Typist::Customer && local.customer_typing {
                        local.customer_typing = false;
                        if local.exists {
                            stopped_here.push(key.clone());
                        }
                    }
                    local.tell_typing(key, &typing.stopped(), None);
                } else {
                    at += 1;
                }
            }
            !local.typists.is_empty()
        });
        for key in &stopped_here {
            self.mark_presence(key);
        }
    }
}

/// The node's presence upkeep: writes the entries the fan-out marked as
/// changed, refreshes all of them every third of the presence TTL (and
/// re-reads the other nodes' entries of the watched conversations), and
/// expires typing.
pub async fn run_presence(
    fanout: Arc<FanOut>,
    board: Arc<dyn PresenceBoard>,
    ttl: Duration,
    typing_ttl: Duration,
    stop: CancellationToken,
) {
    let mut heartbeat = tokio::time::interval(ttl / 3);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut typing = tokio::time::interval((typing_ttl / 4).min(Duration::from_millis(250)));
    typing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            () = fanout.presence_changed() => {
                let changed = fanout.take_changed_presence();
                board.write(&changed, ttl, true).await;
                for (key, _) in &changed {
                    fanout.mark_listed(key);
                }
            }
            _ = heartbeat.tick() => {
                board.write(&fanout.presence_entries(), ttl, false).await;
                let watched = fanout.watched_conversations();
                if watched.is_empty() {
                    continue;
                }
                match board.read(&watched).await {
                    Ok(entries) => {
                        for (key, entries) in watched.iter().zip(entries) {
                            fanout.set_remote_presence(key, entries, None);
                        }
                    }
                    Err(error) => debug!(%error, "cannot read presence; keeping the last known"),
                }
            }
            _ = typing.tick() => fanout.expire_typing(),
        }
    }
}
