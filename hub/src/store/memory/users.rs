//! The in-memory log's bookkeeping per user: which conversation each user
//! comes back to (their most recent one, and when they were last active in
//! it, for the idle window) and when they created conversations (for the
//! creation cap). The Redis log keeps the same two things under each user's
//! `latest` and `created` keys.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::time::Duration;

use dashmap::DashMap;

use crate::config::{ConversationConfig, CreationLimit};
use crate::ids::{ConversationId, ConversationKey, Party, TenantId, UserId};
use crate::store::{StoreError, now_ms};

#[derive(Debug)]
pub(super) struct Users {
    /// Each user's most recent conversation and when they were last active in it.
    pub(super) latest: DashMap<(TenantId, UserId), Latest>,
    /// When each user created their conversations within the creation
    /// window, oldest first (only users with a recent creation have an entry).
    pub(super) created: DashMap<(TenantId, UserId), VecDeque<u64>, RandomState>,
    idle_window: Duration,
    creation_limit: Option<CreationLimit>,
}

#[derive(Debug, Clone)]
pub(super) struct Latest {
    pub(super) conversation: ConversationId,
    pub(super) last_active_ms: u64,
}

impl Users {
    pub fn new(config: &ConversationConfig) -> Self {
        Self {
            latest: DashMap::new(),
            created: DashMap::default(),
            idle_window: Duration::from_millis(config.idle_window_ms),
            creation_limit: config.creation_limit(),
        }
    }

    /// Makes `conversation` the user's most recent, active at `now`.
    pub fn point(&self, tenant: &TenantId, user: &UserId, conversation: &ConversationId, now: u64) {
        self.latest
            .insert((tenant.clone(), user.clone()), Latest { conversation: conversation.clone(), last_active_ms: now });
    }

    /// The user's most recent conversation, if they were active in it
    /// within the idle window (it counts as active again at `now`).
    pub fn recent(&self, tenant: &TenantId, user: &UserId, now: u64) -> Option<ConversationId> {
        let idle_window = self.idle_window.as_millis() as u64;
        self.latest.get_mut(&(tenant.clone(), user.clone())).and_then(|mut latest| {
            if now.saturating_sub(latest.last_active_ms) > idle_window {
                return None;
            }
            latest.last_active_ms = now;
            Some(latest.conversation.clone())
        })
    }

    /// Marks the user active now in `key`, if it is their most recent conversation.
    pub fn touch(&self, user: &UserId, key: &ConversationKey) {
        if let Some(mut latest) = self.latest.get_mut(&(key.tenant().clone(), user.clone()))
            && latest.conversation == *key.conversation()
        {
            latest.last_active_ms = now_ms();
        }
    }

    /// Counts one creation against the user's cap, or refuses it.
    pub fn count_creation(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let Some(limit) = self.creation_limit else {
            return Ok(());
        };
        let now = now_ms();
        let window = limit.window.as_millis() as u64;
        let mut times = self.created.entry((tenant.clone(), user.clone())).or_default();
        while times.front().is_some_and(|at| now.saturating_sub(*at) >= window) {
            times.pop_front();
        }
        if times.len() >= limit.max as usize {
            return Err(StoreError::TooManyConversations { max: limit.max, window_secs: limit.window.as_secs() });
        }
        times.push_back(now);
        Ok(())
    }

    /// Forgets pointers to conversations that no longer `exist`, and
    /// creation times past the window at `now_ms`.
    pub fn sweep(&self, now_ms: u64, exists: impl Fn(&ConversationKey) -> bool) {
        self.latest.retain(|(tenant, user), latest| {
            let party = Party { tenant: tenant.clone(), user: user.clone() };
            exists(&party.conversation(latest.conversation.clone()))
        });
        if let Some(limit) = self.creation_limit {
            let window = limit.window.as_millis() as u64;
            self.created.retain(|_, times| times.back().is_some_and(|at| now_ms.saturating_sub(*at) < window));
        }
    }
}
