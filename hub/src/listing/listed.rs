//! One tenant listed on this node: its listing sockets, what they were
//! shown of each conversation, and reading that from the conversations
//! (the snapshot, a changed conversation, the presence re-read). Reads that
//! fail are remembered and tried again at the next sweep
//! ([`Listed::read_again`]); after one fails, the reads queued behind it
//! are remembered without being tried, so a store that does not answer
//! costs one timeout per sweep, not one per conversation. The listing task
//! ([`super::run_listing`]) decides when each runs.

use std::collections::{HashMap, HashSet};

use tracing::debug;

use super::MAX_LISTED;
use crate::conversations::Conversations;
use crate::fanout::{Outbound, SessionHandle};
use crate::ids::{ConversationId, ConversationKey, Party};
use crate::owner::Owner;
use crate::protocol::{ServerFrame, Summary};
use crate::store::{StoreError, now_ms};

/// One tenant listed on this node.
pub(super) struct Listed {
    /// A party of the tenant, to make its conversations' keys.
    party: Party,
    pub(super) listers: Vec<SessionHandle>,
    /// The conversations the listers were given.
    shown: HashMap<ConversationId, Shown>,
    /// Whether this node hears the tenant's changes on other nodes.
    pub(super) heard: bool,
    /// The last snapshot could not be read whole: it is read again at the
    /// next sweep and sent to every lister.
    stale: bool,
    /// Changed conversations whose summary could not be read: read again
    /// at the next sweep.
    unread: HashSet<ConversationId>,
}

/// What the listers were last given of one conversation: a change that
/// reads the same summary again is not sent.
#[derive(Debug)]
struct Shown(Summary);

impl Listed {
    pub(super) fn new(party: Party, heard: bool) -> Self {
        Self { party, listers: Vec::new(), shown: HashMap::new(), heard, stale: false, unread: HashSet::new() }
    }

    /// Whether the listers were not given everything: a snapshot or a
    /// change that could not be read yet.
    pub(super) fn owes_listers(&self) -> bool {
        self.stale || !self.unread.is_empty()
    }

    /// Sends `frame` to every lister (a closed one leaves the list).
    pub(super) fn send(&mut self, frame: &axum::extract::ws::Utf8Bytes) {
        self.listers.retain(|handle| handle.push(Outbound::ephemeral(frame.clone())));
    }

    /// The tenant's live conversations, most recent first (what `shown` is
    /// now); `None`, marking the tenant stale and leaving `shown` as it
    /// was, when they could not all be read.
    pub(super) async fn snapshot(&mut self, conversations: &Conversations, window_ms: u64) -> Option<Vec<Summary>> {
        match self.read_snapshot(conversations, window_ms).await {
            Ok((summaries, shown)) => {
                (self.stale, self.shown) = (false, shown);
                self.unread.clear();
                Some(summaries)
            }
            Err(error) => {
                debug!(%error, tenant_id = %self.party.tenant, "cannot read the tenant's list; read again at the next sweep");
                self.stale = true;
                None
            }
        }
    }

    async fn read_snapshot(
        &self,
        conversations: &Conversations,
        window_ms: u64,
    ) -> Result<(Vec<Summary>, HashMap<ConversationId, Shown>), StoreError> {
        let since = now_ms().saturating_sub(window_ms);
        let ids = conversations.active(&self.party.tenant, since, MAX_LISTED).await?;
        let (mut summaries, mut shown) = (Vec::with_capacity(ids.len()), HashMap::with_capacity(ids.len()));
        for id in ids {
            let key = self.party.conversation(id.clone());
            if let Some(summary) = conversations.summary(&key).await? {
                saw_owner(conversations, &key, &summary);
                shown.insert(id, Shown(summary.clone()));
                summaries.push(summary);
            }
        }
        Ok((summaries, shown))
    }

    /// Sends every lister the snapshot again, if it can be read (else the
    /// tenant is stale and the listers keep what they have).
    pub(super) async fn snapshot_again(&mut self, conversations: &Conversations, window_ms: u64) {
        if let Some(summaries) = self.snapshot(conversations, window_ms).await {
            self.send(&ServerFrame::Conversations { conversations: &summaries }.encode());
        }
    }

    /// Re-reads changed conversations and tells the listers. Once a read
    /// fails, it and the rest are read again at the next sweep.
    pub(super) async fn changed(
        &mut self,
        conversations: &Conversations,
        ids: impl IntoIterator<Item = ConversationId>,
        window_ms: u64,
    ) {
        let mut ids = ids.into_iter();
        for id in ids.by_ref() {
            let key = self.party.conversation(id.clone());
            match conversations.summary(&key).await {
                Ok(summary) => self.show(conversations, &key, id, summary, window_ms),
                Err(error) => {
                    debug!(%error, conversation_id = %id, "cannot read a changed conversation; read again at the next sweep");
                    self.unread.insert(id);
                    break;
                }
            }
        }
        self.unread.extend(ids);
    }

    /// Tells the listers what a changed conversation is now, if that is
    /// not what they were given.
    fn show(
        &mut self,
        conversations: &Conversations,
        key: &ConversationKey,
        id: ConversationId,
        summary: Option<Summary>,
        window_ms: u64,
    ) {
        let cutoff = now_ms().saturating_sub(window_ms);
        match summary {
            Some(summary) if summary.online || activity(&summary) >= cutoff => {
                saw_owner(conversations, key, &summary);
                if self.shown.get(&id).is_none_or(|shown| shown.0 != summary) {
                    self.send(&ServerFrame::Conversation(&summary).encode());
                    self.shown.insert(id, Shown(summary));
                }
            }
            _ => {
                if self.shown.remove(&id).is_some() {
                    self.send(&ServerFrame::ConversationRemoved { conversation: id.as_str() }.encode());
                }
            }
        }
    }

    /// Reads again what could not be read: the snapshot of a stale tenant
    /// (sent whole), else each changed conversation whose read failed.
    pub(super) async fn read_again(&mut self, conversations: &Conversations, window_ms: u64) {
        if self.stale {
            return self.snapshot_again(conversations, window_ms).await;
        }
        let unread = std::mem::take(&mut self.unread);
        self.changed(conversations, unread, window_ms).await;
    }

    /// Removes the conversations shown offline with no durable event since
    /// `cutoff_ms` (`conversation.removed`).
    pub(super) fn remove_inactive(&mut self, cutoff_ms: u64) {
        let expired: Vec<ConversationId> = self
            .shown
            .iter()
            .filter(|(_, Shown(shown))| !shown.online && activity(shown) < cutoff_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.shown.remove(&id);
            self.send(&ServerFrame::ConversationRemoved { conversation: id.as_str() }.encode());
        }
    }

    /// Re-reads the presence of the conversations shown online, typing or
    /// watched and re-sends those whose presence changed (a node died, see
    /// the module doc of [`super`]).
    pub(super) async fn recheck_presence(&mut self, conversations: &Conversations, window_ms: u64) {
        let ids: Vec<ConversationId> = self
            .shown
            .iter()
            .filter(|(_, Shown(shown))| shown.online || shown.typing || !shown.viewers.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let keys: Vec<ConversationKey> = ids.iter().map(|id| self.party.conversation(id.clone())).collect();
        let present = match conversations.present(&keys).await {
            Ok(present) => present,
            Err(error) => return debug!(%error, "cannot re-read the listed conversations' presence"),
        };
        let moved: Vec<ConversationId> = ids
            .into_iter()
            .zip(present)
            .filter(|(id, present)| {
                let shown = &self.shown[id].0;
                (shown.online, shown.typing, &shown.viewers) != (present.online, present.typing, &present.viewers)
            })
            .map(|(id, _)| id)
            .collect();
        self.changed(conversations, moved, window_ms).await;
    }
}

/// Tells the hand-over's timeout about a conversation shown `waiting`.
fn saw_owner(conversations: &Conversations, key: &ConversationKey, summary: &Summary) {
    let waiting = summary.owner == Owner::Waiting.kind();
    conversations.saw_owner(key, summary.owner_epoch, waiting, summary.owner_since.unwrap_or(0));
}

/// When the conversation last had a durable event.
fn activity(summary: &Summary) -> u64 {
    summary.last.as_ref().map_or(0, |last| last.at)
}
