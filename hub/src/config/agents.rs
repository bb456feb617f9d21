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
    /// Milliseconds a `typing` with `on: true` holds: a typist who sends no
    /// new one within it (or whose socket died) stops typing by itself and
    /// the conversation's sockets get `on: false`. Default 4000.
    pub typing_ttl_ms: u64,
    /// Seconds a node's presence entries (customers online, agents viewing)
    /// hold without its heartbeat (every third of it): a node that dies
    /// stops counting within it. Default 15.
    pub presence_ttl_secs: u64,
    /// Seconds of inactivity after which a conversation whose customer is
    /// offline leaves the agents' live list (`list`). Default 3600.
    pub list_window_secs: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            max_watched: 50,
            watch_history: 50,
            allow_steal: false,
            handoff_timeout_secs: 300,
            typing_ttl_ms: 4000,
            presence_ttl_secs: 15,
            list_window_secs: 3600,
        }
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
        if self.typing_ttl_ms < 100 {
            return invalid("agents.typing_ttl_ms", "must be at least 100");
        }
        if self.presence_ttl_secs < 2 {
            return invalid("agents.presence_ttl_secs", "must be at least 2");
        }
        if self.list_window_secs == 0 {
            return invalid("agents.list_window_secs", "must be at least 1");
        }
        if self.watch_history > 1000 {
            return invalid("agents.watch_history", "must be at most 1000");
        }
        Ok(())
    }

    /// How long a `typing` with `on: true` holds.
    pub fn typing_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.typing_ttl_ms)
    }

    /// How long an idle conversation of an offline customer stays listed.
    pub fn list_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.list_window_secs)
    }

    /// How long a node's presence entries hold without its heartbeat.
    pub fn presence_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.presence_ttl_secs)
    }
}
