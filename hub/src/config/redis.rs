//! `[redis]`: where cluster mode keeps conversations and its pub/sub, and
//! the names it uses there. Read only when `backend = "redis"`.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Cluster mode over Redis (used when `backend = "redis"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL (the primary: every read that decides correctness goes
    /// there). Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key and channel, one per deployment sharing a Redis.
    /// Default `fengda`.
    pub key_prefix: String,
    /// Overrides `conversation.retention_secs` for Redis keys (kept for
    /// configs written before that key existed). Default unset.
    pub retention_secs: Option<u64>,
    /// Deadline of each Redis call; past it the operation fails as
    /// `unavailable`. Default 2000 ms.
    pub command_timeout_ms: u64,
    /// How long a socket counts against its tenant's `max_connections`
    /// without its node renewing it (every third of this): the places of a
    /// node that dies free up within this long. Default 30000 ms.
    pub connection_lease_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "fengda".into(),
            retention_secs: None,
            command_timeout_ms: 2000,
            connection_lease_ms: 30_000,
        }
    }
}

impl RedisConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return invalid("redis.key_prefix", "must be non-empty and free of { }");
        }
        if self.retention_secs == Some(0) {
            return invalid("redis.retention_secs", "must be non-zero");
        }
        if self.command_timeout_ms == 0 {
            return invalid("redis.command_timeout_ms", "must be non-zero");
        }
        if self.connection_lease_ms < 300 {
            return invalid("redis.connection_lease_ms", "must be at least 300");
        }
        Ok(())
    }
}
