//! `[tenants]`: per-tenant limits. `[tenants.default]` holds every limit's
//! value for tenants without a section of their own; `[tenants.<id>]`
//! overrides some of them for one tenant (a key it leaves out takes
//! `[tenants.default]`'s). The limits themselves are enforced by
//! [`crate::tenant`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[tenants]`: the fallback limits and the sections of named tenants.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct TenantsConfig {
    /// `[tenants.default]`: the limits of every tenant without its own value.
    pub default: TenantLimits,
    /// `[tenants.<id>]`, by tenant id.
    #[serde(flatten)]
    pub tenants: BTreeMap<String, TenantOverrides>,
}

/// One tenant's limits. `0` turns a count limit off; an unset value takes
/// the node-wide setting named in its doc.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Sockets of the tenant open at once across the cluster (every node
    /// sharing `redis.url`; the node itself with the memory backend). Over
    /// it an upgrade gets `429 tenant_connections` with `Retry-After`.
    /// Default 0: no limit.
    pub max_connections: u32,
    /// Messages one user of the tenant may send per `message_window_ms`,
    /// across the cluster (a burst of this many, then one per window/this).
    /// Over it a message gets `rate_limited` with `retry_after_ms` and is
    /// not stored; the socket stays open. Default 0: no limit.
    pub max_messages_per_user: u32,
    /// The window of `max_messages_per_user`. Default 60000 ms (a minute).
    pub message_window_ms: u64,
    /// Longest message in UTF-8 bytes, at most `websocket.max_text_bytes`.
    /// Default unset: `websocket.max_text_bytes`.
    pub max_text_bytes: Option<usize>,
    /// Turns of history sent to the NLP service with each question.
    /// Default unset: `conversation.history_turns`.
    pub history_turns: Option<usize>,
    /// NLP calls of the tenant in flight per node, at most; the admission's
    /// fair share (`nlp.max_concurrent_per_tenant`) applies below it.
    /// Default unset: no cap of the tenant's own.
    pub nlp_max_concurrent: Option<usize>,
    /// Browser origins allowed to open the tenant's sockets, checked once
    /// the tenant is known (after the token in jwt mode), in the syntax of
    /// `websocket.allowed_origins`. Default unset: `websocket.allowed_origins`.
    pub allowed_origins: Option<Vec<String>>,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            max_connections: 0,
            max_messages_per_user: 0,
            message_window_ms: 60_000,
            max_text_bytes: None,
            history_turns: None,
            nlp_max_concurrent: None,
            allowed_origins: None,
        }
    }
}

/// `[tenants.<id>]`: the keys it sets replace `[tenants.default]`'s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantOverrides {
    pub max_connections: Option<u32>,
    pub max_messages_per_user: Option<u32>,
    pub message_window_ms: Option<u64>,
    pub max_text_bytes: Option<usize>,
    pub history_turns: Option<usize>,
    pub nlp_max_concurrent: Option<usize>,
    pub allowed_origins: Option<Vec<String>>,
}

impl TenantLimits {
    /// These limits with `overrides` laid over them.
    pub fn with(&self, overrides: &TenantOverrides) -> Self {
        let o = overrides.clone();
        Self {
            max_connections: o.max_connections.unwrap_or(self.max_connections),
            max_messages_per_user: o.max_messages_per_user.unwrap_or(self.max_messages_per_user),
            message_window_ms: o.message_window_ms.unwrap_or(self.message_window_ms),
            max_text_bytes: o.max_text_bytes.or(self.max_text_bytes),
            history_turns: o.history_turns.or(self.history_turns),
            nlp_max_concurrent: o.nlp_max_concurrent.or(self.nlp_max_concurrent),
            allowed_origins: o.allowed_origins.or_else(|| self.allowed_origins.clone()),
        }
    }

    fn validate(&self, max_text_bytes: usize) -> Result<(), &'static str> {
        if self.message_window_ms == 0 {
            return Err("message_window_ms must be non-zero");
        }
        if self.max_text_bytes.is_some_and(|n| n == 0 || n > max_text_bytes) {
            return Err("max_text_bytes must be between 1 and websocket.max_text_bytes");
        }
        if self.history_turns.is_some_and(|n| n > 1000) {
            return Err("history_turns must be at most 1000");
        }
        if self.nlp_max_concurrent == Some(0) {
            return Err("nlp_max_concurrent must be at least 1");
        }
        if self.allowed_origins.as_deref().is_some_and(|list| !super::websocket::valid_origin_list(list)) {
            return Err("allowed_origins: each entry must be an origin (http[s]://host[:port]) or `*` alone");
        }
        Ok(())
    }
}

impl TenantsConfig {
    /// Every `[tenants.<id>]` names a valid tenant id, and every tenant's
    /// limits (the default's and each with its overrides) are usable.
    pub(super) fn validate(&self, max_text_bytes: usize) -> Result<(), ConfigError> {
        let invalid = |reason| Err(ConfigError::Invalid { key: "tenants", reason });
        if let Err(reason) = self.default.validate(max_text_bytes) {
            return invalid(reason);
        }
        for (id, overrides) in &self.tenants {
            if crate::ids::TenantId::parse(id).is_err() {
                return invalid("every [tenants.<id>] must name a valid tenant id");
            }
            if let Err(reason) = self.default.with(overrides).validate(max_text_bytes) {
                return invalid(reason);
            }
        }
        Ok(())
    }
}
