//! The agents' live list (`list`, protocol §14): which of a tenant's
//! conversations are live, and each change of one, to every agent socket
//! of this node that lists the tenant.
//!
//! A conversation is live while its customer is online or its last
//! durable event is within `agents.list_window_secs`. The log keeps the
//! tenant's conversations by last activity ([`crate::store::ConversationLog::active`]),
//! which the snapshot (`conversations`) reads. Changes are ids only: this
//! node's appends and presence changes note them in [`Changes`] directly,
//! other nodes' arrive through the bus ([`crate::bus::IncomingEvents::listed`],
//! published only while some node lists the tenant, so customers pay
//! nothing when no console is open). One task per node ([`run_listing`])
//! owns the listing sockets and re-reads the summary of each changed
//! conversation once, however many changes and listers it has, then sends
//! `conversation` (or `conversation.removed` once it left the window).
//! Everything runs in that task, in order: a `list` registers the socket,
//! then reads and sends the snapshot, and changes noted meanwhile are
//! re-read after it, so a change is never overtaken by an older snapshot.
//!
//! `online`, `typing` and `viewers` come from the presence board
//! ([`crate::presence`]): a customer who starts or stops typing changes
//! their node's entry, which is a change like any other (a typing signal
//! that only goes on is not). A node that dies tells nobody, so every
//! third of the presence TTL the task re-reads the presence of the
//! conversations it shows online, typing or watched, in one read, and
//! re-sends those that changed: a dead node's customers go offline, and
//! its agents stop watching, in the lists within the TTL. A conversation shown `waiting` is noted for the
//! hand-over's timeout ([`crate::session::handoff`]).
//!
//! A tenant whose changes this node cannot hear yet (subscribing failed)
//! is listed from this node's changes only, and tried again every sweep
//! (all such tenants at once); once heard, its listers get the whole list
//! again, with what other nodes changed meanwhile.

pub mod changes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use changes::{Changes, LISTING_TTL};

use crate::conversations::Conversations;
use crate::fanout::{Outbound, SessionHandle};
use crate::ids::{ConversationId, ConversationKey, Party, SessionId, TenantId};
use crate::owner::Owner;
use crate::protocol::{ServerFrame, Summary};
use crate::store::now_ms;

/// The most conversations a `conversations` snapshot carries (the most
/// recent ones).
pub const MAX_LISTED: usize = 500;

/// How often listed conversations past the window are removed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// `list`/`unlist` requests waiting for the listing task.
const COMMAND_QUEUE: usize = 64;

/// What an agent's session asks of the listing task.
#[derive(Debug)]
enum Command {
    List { party: Party, handle: SessionHandle },
    Unlist { session: SessionId },
}

/// The node's listing task's inbox (a cheap handle).
#[derive(Debug, Clone)]
pub struct Lists {
    commands: mpsc::Sender<Command>,
}

impl Lists {
    /// The handle, and the inbox [`run_listing`] reads.
    pub fn new() -> (Self, ListsInbox) {
        let (commands, inbox) = mpsc::channel(COMMAND_QUEUE);
        (Self { commands }, ListsInbox(inbox))
    }

    /// Sends the agent's socket the snapshot of its tenant, then changes
    /// (listing again sends the snapshot again).
    pub async fn list(&self, party: Party, handle: SessionHandle) {
        let _ = self.commands.send(Command::List { party, handle }).await;
    }

    /// Stops the socket's changes.
    pub async fn unlist(&self, session: SessionId) {
        let _ = self.commands.send(Command::Unlist { session }).await;
    }
}

/// The receiving end of [`Lists`].
#[derive(Debug)]
pub struct ListsInbox(mpsc::Receiver<Command>);

/// One tenant listed on this node.
struct Listed {
    /// A party of the tenant, to make its conversations' keys.
    party: Party,
    listers: Vec<SessionHandle>,
    /// The conversations the listers were given.
    shown: HashMap<ConversationId, Shown>,
    /// Whether this node hears the tenant's changes on other nodes.
    heard: bool,
}

/// What the listers were last given of one conversation: a change that
/// reads the same summary again is not sent.
#[derive(Debug)]
struct Shown(Summary);

impl Shown {
    /// When it last had a durable event.
    fn activity(&self) -> u64 {
        activity(&self.0)
    }
}

impl Listed {
    fn send(&mut self, frame: &axum::extract::ws::Utf8Bytes) {
        self.listers.retain(|handle| handle.push(Outbound::ephemeral(frame.clone())));
    }
}

/// The node's listing task (see the module doc).
pub async fn run_listing(
    conversations: Arc<Conversations>,
    mut inbox: ListsInbox,
    window: Duration,
    presence_ttl: Duration,
    stop: CancellationToken,
) {
    let changes = conversations.list_changes();
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let mut tenants: HashMap<TenantId, Listed> = HashMap::new();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval(LISTING_TTL / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut presence = tokio::time::interval(presence_ttl / 3);
    presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            command = inbox.0.recv() => match command {
                None => break,
                Some(Command::List { party, handle }) => {
                    unlist(&conversations, &changes, &mut tenants, handle.id).await;
                    let tenant = party.tenant.clone();
                    if !tenants.contains_key(&tenant) {
                        changes.listen(&tenant);
                        let heard = hear(&conversations, &tenant).await;
                        tenants.insert(tenant.clone(), Listed { party, listers: Vec::new(), shown: HashMap::new(), heard });
                    }
                    let listed = tenants.get_mut(&tenant).expect("inserted above");
                    let summaries = snapshot(&conversations, listed, window_ms).await;
                    let frame = ServerFrame::Conversations { conversations: &summaries }.encode();
                    if handle.push(Outbound::ephemeral(frame)) {
                        listed.listers.push(handle);
                    }
                    debug!(tenant_id = %tenant, listed = summaries.len(), "listing");
                }
                Some(Command::Unlist { session }) => unlist(&conversations, &changes, &mut tenants, session).await,
            },
            () = changes.notify.notified() => {
                if changes.resync.swap(false, std::sync::atomic::Ordering::AcqRel) {
                    for listed in tenants.values_mut() {
                        let summaries = snapshot(&conversations, listed, window_ms).await;
                        listed.send(&ServerFrame::Conversations { conversations: &summaries }.encode());
                    }
                }
                for (tenant, ids) in changes.take() {
                    let Some(listed) = tenants.get_mut(&tenant) else { continue };
                    for id in ids {
                        changed(&conversations, listed, id, window_ms).await;
                    }
                }
            }
            _ = sweep.tick() => {
                let cutoff = now_ms().saturating_sub(window_ms);
                let mut gone = Vec::new();
                for (tenant, listed) in tenants.iter_mut() {
                    listed.listers.retain(|handle| !handle.closer.token().is_cancelled());
                    if listed.listers.is_empty() {
                        gone.push(tenant.clone());
                        continue;
                    }
                    let expired: Vec<ConversationId> = listed
                        .shown
                        .iter()
                        .filter(|(_, shown)| !shown.0.online && shown.activity() < cutoff)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in expired {
                        listed.shown.remove(&id);
                        listed.send(&ServerFrame::ConversationRemoved { conversation: id.as_str() }.encode());
                    }
                }
                for tenant in gone {
                    tenants.remove(&tenant);
                    changes.forget(&tenant);
                    conversations.unlist_tenant(&tenant).await;
                }
                hear_again(&conversations, &mut tenants, window_ms).await;
            }
            _ = refresh.tick() => {
                let heard: Vec<TenantId> =
                    tenants.iter().filter(|(_, listed)| listed.heard).map(|(tenant, _)| tenant.clone()).collect();
                conversations.keep_listing(&heard).await;
            }
            _ = presence.tick() => {
                for listed in tenants.values_mut() {
                    recheck_presence(&conversations, listed, window_ms).await;
                }
            }
        }
    }
    for tenant in tenants.keys() {
        conversations.unlist_tenant(tenant).await;
    }
}

/// Starts hearing the tenant's changes on other nodes; whether it could.
async fn hear(conversations: &Conversations, tenant: &TenantId) -> bool {
    match conversations.list_tenant(tenant).await {
        Ok(()) => true,
        Err(error) => {
            warn!(%error, tenant_id = %tenant, "cannot hear the tenant's changes on other nodes yet; listing this node's");
            false
        }
    }
}

/// Tries again to hear the tenants this node could not, all at once (one
/// round trip's wait, however many); a tenant heard now gets its list
/// again, with what other nodes changed meanwhile.
async fn hear_again(conversations: &Conversations, tenants: &mut HashMap<TenantId, Listed>, window_ms: u64) {
    let unheard: Vec<TenantId> =
        tenants.iter().filter(|(_, listed)| !listed.heard).map(|(tenant, _)| tenant.clone()).collect();
    if unheard.is_empty() {
        return;
    }
    let tries = futures::future::join_all(unheard.iter().map(|tenant| conversations.list_tenant(tenant))).await;
    for (tenant, heard) in unheard.into_iter().zip(tries) {
        let Some(listed) = tenants.get_mut(&tenant) else { continue };
        match heard {
            Ok(()) => {
                listed.heard = true;
                let summaries = snapshot(conversations, listed, window_ms).await;
                listed.send(&ServerFrame::Conversations { conversations: &summaries }.encode());
            }
            Err(error) => debug!(%error, tenant_id = %tenant, "still cannot hear the tenant's changes on other nodes"),
        }
    }
}

/// Takes the session off every list; a tenant without listers is no
/// longer listed here.
async fn unlist(
    conversations: &Conversations,
    changes: &Changes,
    tenants: &mut HashMap<TenantId, Listed>,
    session: SessionId,
) {
    let mut gone = Vec::new();
    for (tenant, listed) in tenants.iter_mut() {
        listed.listers.retain(|handle| handle.id != session);
        if listed.listers.is_empty() {
            gone.push(tenant.clone());
        }
    }
    for tenant in gone {
        tenants.remove(&tenant);
        changes.forget(&tenant);
        conversations.unlist_tenant(&tenant).await;
    }
}

/// The tenant's live conversations, most recent first (what `shown` is now).
async fn snapshot(conversations: &Conversations, listed: &mut Listed, window_ms: u64) -> Vec<Summary> {
    let since = now_ms().saturating_sub(window_ms);
    let tenant = listed.party.tenant.clone();
    let ids = match conversations.active(&tenant, since, MAX_LISTED).await {
        Ok(ids) => ids,
        Err(error) => {
            debug!(%error, tenant_id = %tenant, "cannot read the tenant's active conversations");
            Vec::new()
        }
    };
    let mut summaries = Vec::with_capacity(ids.len());
    listed.shown.clear();
    for id in ids {
        let key = listed.party.conversation(id.clone());
        match conversations.summary(&key).await {
            Ok(Some(summary)) => {
                saw_owner(conversations, &key, &summary);
                listed.shown.insert(id, Shown(summary.clone()));
                summaries.push(summary);
            }
            Ok(None) => {}
            Err(error) => debug!(%error, conversation_id = %id, "cannot read a listed conversation"),
        }
    }
    summaries
}

/// Re-reads one changed conversation and tells the listers.
async fn changed(conversations: &Conversations, listed: &mut Listed, id: ConversationId, window_ms: u64) {
    let key = listed.party.conversation(id.clone());
    let summary = match conversations.summary(&key).await {
        Ok(summary) => summary,
        Err(error) => {
            debug!(%error, conversation_id = %id, "cannot read a changed conversation; the list keeps it as it was");
            return;
        }
    };
    let cutoff = now_ms().saturating_sub(window_ms);
    match summary {
        Some(summary) if summary.online || activity(&summary) >= cutoff => {
            saw_owner(conversations, &key, &summary);
            if listed.shown.get(&id).is_none_or(|shown| shown.0 != summary) {
                listed.send(&ServerFrame::Conversation(&summary).encode());
                listed.shown.insert(id, Shown(summary));
            }
        }
        _ => {
            if listed.shown.remove(&id).is_some() {
                listed.send(&ServerFrame::ConversationRemoved { conversation: id.as_str() }.encode());
            }
        }
    }
}

/// Re-reads the presence of the conversations shown online, typing or
/// watched and re-sends those whose presence changed (a node died, see the
/// module doc).
async fn recheck_presence(conversations: &Conversations, listed: &mut Listed, window_ms: u64) {
    let ids: Vec<ConversationId> = listed
        .shown
        .iter()
        .filter(|(_, Shown(shown))| shown.online || shown.typing || !shown.viewers.is_empty())
        .map(|(id, _)| id.clone())
        .collect();
    if ids.is_empty() {
        return;
    }
    let keys: Vec<ConversationKey> = ids.iter().map(|id| listed.party.conversation(id.clone())).collect();
    let present = match conversations.present(&keys).await {
        Ok(present) => present,
        Err(error) => return debug!(%error, "cannot re-read the listed conversations' presence"),
    };
    for (id, present) in ids.into_iter().zip(present) {
        let shown = &listed.shown[&id].0;
        if (shown.online, shown.typing, &shown.viewers) != (present.online, present.typing, &present.viewers) {
            changed(conversations, listed, id, window_ms).await;
        }
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
