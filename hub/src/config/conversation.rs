//! `[conversation]`: history, retention, the resume window, reply grace
//! and the per-conversation and per-user caps.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, RedisConfig};

/// Conversation history.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversationConfig {
    /// Turns (customer questions and completed replies) sent to the NLP
    /// service with each question. Default 10.
    pub history_turns: usize,
    /// Durable events kept per conversation; older ones are dropped and can
    /// no longer be replayed with `after`. Default 1000.
    pub log_cap: usize,
    /// A user who comes back (connects without `conversation`) after this
    /// long without activity starts a new conversation; the old one stays
    /// readable by id. Default 1800000 ms (30 minutes).
    pub idle_window_ms: u64,
    /// Seconds a conversation (its history and its id) is kept after its
    /// last activity with no socket open on it; then it is forgotten, and
    /// resuming it gets `conversation_not_found`. Redis keys expire after
    /// this long; the in-memory store sweeps once a minute. Default
    /// 604800 (7 days).
    pub retention_secs: u64,
    /// How long a reply goes on while no socket of its conversation is open
    /// on any node, so a customer who reconnects gets it; past it the reply
    /// is cancelled and stored with what had streamed. Default 15000 ms.
    pub reply_grace_ms: u64,
    /// Sockets of one conversation open at once on one hub node; more are
    /// refused with `too_many_sockets` and 4409. Default 32.
    pub max_sockets: usize,
    /// Conversations one user (of one tenant) may create within
    /// `created_window_ms`; a conversation is created by its first stored
    /// message, so sockets that never send one count for nothing. The next
    /// first message is refused (`too_many_conversations`, close 4430).
    /// 0 turns the cap off. Default 20.
    pub max_created_per_user: u32,
    /// The sliding window of `max_created_per_user`. Default 3600000 ms (1 hour).
    pub created_window_ms: u64,
}

impl ConversationConfig {
    /// Retention for the Redis store's keys: `redis.retention_secs` if set.
    pub fn redis_retention_secs(&self, redis: &RedisConfig) -> u64 {
        redis.retention_secs.unwrap_or(self.retention_secs)
    }

    pub fn reply_grace(&self) -> Duration {
        Duration::from_millis(self.reply_grace_ms)
    }

    /// The per-user creation cap, `None` when it is off.
    pub fn creation_limit(&self) -> Option<CreationLimit> {
        (self.max_created_per_user > 0).then(|| CreationLimit {
            max: self.max_created_per_user,
            window: Duration::from_millis(self.created_window_ms),
        })
    }
}

/// At most `max` conversations created per user within any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreationLimit {
    pub max: u32,
    pub window: Duration,
}

impl Default for ConversationConfig {
    fn default() -> Self {
        Self {
            history_turns: 10,
            log_cap: 1000,
            idle_window_ms: 30 * 60 * 1000,
            retention_secs: 7 * 24 * 3600,
            reply_grace_ms: 15_000,
            max_sockets: 32,
            max_created_per_user: 20,
            created_window_ms: 60 * 60 * 1000,
        }
    }
}

impl ConversationConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        if self.max_sockets == 0 {
            return invalid("conversation.max_sockets", "must be at least 1");
        }
        if self.log_cap == 0 {
            return invalid("conversation.log_cap", "must be at least 1");
        }
        if self.retention_secs.saturating_mul(1000) < self.idle_window_ms.max(1) {
            return invalid("conversation.retention_secs", "must cover conversation.idle_window_ms");
        }
        if self.idle_window_ms == 0 {
            return invalid("conversation.idle_window_ms", "must be non-zero");
        }
        if self.created_window_ms == 0 {
            return invalid("conversation.created_window_ms", "must be non-zero");
        }
        if self.history_turns > 1000 {
            return invalid("conversation.history_turns", "must be at most 1000");
        }
        Ok(())
    }
}
