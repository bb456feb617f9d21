//! The changes the agents' lists of a node wait for: which conversations
//! of the tenants listed on this node changed, noted by whoever sees a
//! change (this node's appends and presence, the bus's receiving loop) and
//! taken by the node's listing task ([`super::run_listing`]). A leaf: the
//! fan-out and the store note changes here without knowing the listing.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::ids::{ConversationId, TenantId};

/// How long a node's "this tenant is listed here" flag holds without a
/// refresh (every third of it): other nodes stop publishing changes for a
/// tenant no node lists within it.
pub const LISTING_TTL: Duration = Duration::from_secs(30);

/// Changed conversations of the tenants listed on this node, noted
/// without waiting (from the bus's receiving loop among others) and taken
/// by [`run_listing`](super::run_listing); each conversation once however often it changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// By listed tenant (a tenant is here while it is listed).
    pending: Mutex<HashMap<TenantId, HashSet<ConversationId>>>,
    /// Every listing socket needs its snapshot again (changes may be lost).
    pub(super) resync: std::sync::atomic::AtomicBool,
    pub(super) notify: Notify,
}

impl Changes {
    /// Notes a change; ignored for a tenant not listed here.
    pub fn mark(&self, tenant: &TenantId, conversation: &ConversationId) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = pending.get_mut(tenant) {
            ids.insert(conversation.clone());
            self.notify.notify_one();
        }
    }

    /// Changes may have been missed (the bus's subscription was down).
    pub fn resync(&self) {
        self.resync.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_one();
    }

    pub(super) fn listen(&self, tenant: &TenantId) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).entry(tenant.clone()).or_default();
    }

    pub(super) fn forget(&self, tenant: &TenantId) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(tenant);
    }

    pub(super) fn take(&self) -> Vec<(TenantId, Vec<ConversationId>)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending
            .iter_mut()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(tenant, ids)| (tenant.clone(), ids.drain().collect()))
            .collect()
    }
}
