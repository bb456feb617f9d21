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
//! again, with what other nodes changed meanwhile. Reads that fail (the
//! store is unreachable) are tried again every sweep too: a changed
//! conversation whose summary could not be read, and a snapshot that could
//! not be read whole (then sent to every lister of the tenant).

pub mod changes;
mod listed;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use changes::{Changes, LISTING_TTL};
use listed::Listed;

use crate::conversations::Conversations;
use crate::fanout::{Outbound, SessionHandle};
use crate::ids::{Party, SessionId, TenantId};
use crate::protocol::ServerFrame;
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
                        tenants.insert(tenant.clone(), Listed::new(party, heard));
                    }
                    let listed = tenants.get_mut(&tenant).expect("inserted above");
                    // The other listers are owed the list too when their
                    // last one could not be read whole.
                    let owed = listed.owes_listers();
                    // Unreadable, it is an empty list until a sweep reads it
                    // and sends it to every lister.
                    let summaries = listed.snapshot(&conversations, window_ms).await;
                    let read = summaries.is_some();
                    let summaries = summaries.unwrap_or_default();
                    let frame = ServerFrame::Conversations { conversations: &summaries }.encode();
                    if read && owed {
                        listed.listers.push(handle);
                        listed.send(&frame);
                    } else if handle.push(Outbound::ephemeral(frame)) {
                        listed.listers.push(handle);
                    }
                    debug!(tenant_id = %tenant, listed = summaries.len(), "listing");
                }
                Some(Command::Unlist { session }) => unlist(&conversations, &changes, &mut tenants, session).await,
            },
            () = changes.notify.notified() => {
                if changes.resync.swap(false, std::sync::atomic::Ordering::AcqRel) {
                    for listed in tenants.values_mut() {
                        listed.snapshot_again(&conversations, window_ms).await;
                    }
                }
                for (tenant, ids) in changes.take() {
                    let Some(listed) = tenants.get_mut(&tenant) else { continue };
                    listed.changed(&conversations, ids, window_ms).await;
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
                    listed.remove_inactive(cutoff);
                }
                for tenant in gone {
                    tenants.remove(&tenant);
                    changes.forget(&tenant);
                    conversations.unlist_tenant(&tenant).await;
                }
                hear_again(&conversations, &mut tenants, window_ms).await;
                for listed in tenants.values_mut() {
                    listed.read_again(&conversations, window_ms).await;
                }
            }
            _ = refresh.tick() => {
                let heard: Vec<TenantId> =
                    tenants.iter().filter(|(_, listed)| listed.heard).map(|(tenant, _)| tenant.clone()).collect();
                conversations.keep_listing(&heard).await;
            }
            _ = presence.tick() => {
                for listed in tenants.values_mut() {
                    listed.recheck_presence(&conversations, window_ms).await;
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
                listed.snapshot_again(conversations, window_ms).await;
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
