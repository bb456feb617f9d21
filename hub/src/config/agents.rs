//! `[agents]`: what contact-centre agents' sockets may do (watching
//! conversations from the agent console).

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Agents' sockets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// Conversations one agent socket may watch at once; one more gets
    /// `too_many_watched`. Default 50.
    pub max_watched: usize,
    /// Durable events a `watch` without `after` replays (the newest). Default 50.
    pub watch_history: usize,
    /// Whether every agent may take a conversation another agent owns
    /// (`take` with `steal`); without it only tokens with the `supervisor`
    /// claim may. Default false.
    pub allow_steal: bool,
    /// Seconds a conversation waits for a person (after the customer's
    /// `handoff`) before the assistant answers again. Default 300.
    pub handoff_timeout_secs: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self { max_watched: 50, watch_history: 50, allow_steal: false, handoff_timeout_secs: 300 }
    }
}

impl AgentsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        if self.max_watched == 0 {
            return invalid("agents.max_watched", "must be at least 1");
        }
        if self.handoff_timeout_secs == 0 {
            return invalid("agents.handoff_timeout_secs", "must be at least 1");
        }
        if self.watch_history > 1000 {
            return invalid("agents.watch_history", "must be at most 1000");
        }
        Ok(())
    }
}
