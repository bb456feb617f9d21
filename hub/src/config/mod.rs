//! The hub's one typed configuration, with documented defaults.
//!
//! Values come from three layers, later ones winning: the defaults below,
//! a TOML file (`--config` / `FENGDA_CONFIG`), and command-line flags or
//! their `FENGDA_*` environment variables. [`Config::validate`] runs once at
//! startup so a bad value stops the process with a clear message instead of
//! misbehaving under load.
//!
//! Each section of the file has its own module, which owns its struct, its
//! defaults (written once, in its `Default` impl) and its own checks:
//! `server`, `websocket`, `conversation`, `agents`, `nlp`, `redis`, `tenants`; the
//! `serve` flags are in `flags`. `[auth]` belongs to [`crate::auth`].

mod agents;
mod conversation;
mod flags;
mod nlp;
mod redis;
mod server;
mod tenants;
#[cfg(test)]
mod tests;
mod websocket;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use agents::AgentsConfig;
pub use conversation::{ConversationConfig, CreationLimit};
pub use flags::ServeArgs;
pub use nlp::{FallbackText, NlpConfig};
pub use redis::RedisConfig;
pub use server::{ProxyAddrs, RESERVED_FDS, ServerConfig};
pub use tenants::{TenantLimits, TenantOverrides, TenantsConfig};
pub use websocket::WebSocketConfig;

/// Everything `fengda serve` can be told.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP + WebSocket listener. Default `127.0.0.1:8080`;
    /// port 0 binds an ephemeral port (printed on the first stdout line).
    pub listen: SocketAddr,
    /// Address of the admin listener: `/metrics`, and `/healthz` and
    /// `/readyz` too. Never the customers' port: keep it on loopback or a
    /// private network. Default `127.0.0.1:9090`; port 0 binds an ephemeral
    /// port (printed on the second stdout line).
    pub admin_listen: SocketAddr,
    /// Milliseconds sessions get to close cleanly on shutdown. Default 10000.
    pub shutdown_grace_ms: u64,
    /// Where conversations live: `memory` (one node, the default) or `redis`
    /// (cluster mode: many nodes sharing `redis.url`).
    pub backend: StoreKind,
    pub redis: RedisConfig,
    pub server: ServerConfig,
    pub websocket: WebSocketConfig,
    pub conversation: ConversationConfig,
    /// Agents' sockets: `[agents]` ([`AgentsConfig`]).
    pub agents: AgentsConfig,
    pub nlp: NlpConfig,
    /// The built-in answerer started in-process when `nlp.url` is unset.
    pub answerer: fengda_nlp::AnswererConfig,
    /// Who may open sockets: `[auth]` and `[[auth.keys]]` ([`crate::auth::config`]).
    pub auth: crate::auth::AuthConfig,
    /// Per-tenant limits: `[tenants.default]` and `[tenants.<id>]` ([`TenantsConfig`]).
    pub tenants: TenantsConfig,
}

/// The conversation store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

impl StoreKind {
    /// The name used in the config file, flags and the `fengda_hub_info` metric.
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            shutdown_grace_ms: 10_000,
            backend: StoreKind::default(),
            redis: RedisConfig::default(),
            server: ServerConfig::default(),
            websocket: WebSocketConfig::default(),
            conversation: ConversationConfig::default(),
            agents: AgentsConfig::default(),
            nlp: NlpConfig::default(),
            answerer: fengda_nlp::AnswererConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            tenants: TenantsConfig::default(),
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid [answerer] settings: {0}")]
    Answerer(fengda_nlp::error::BridgeError),
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: &'static str },
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Self = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })?;
        config.auth.base_dir = path.parent().map(Path::to_owned);
        Ok(config)
    }

    /// Refuses values the hub cannot run with: each section's own checks,
    /// then those that span sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        self.websocket.validate()?;
        if self.admin_listen == self.listen && self.listen.port() != 0 {
            return invalid("admin_listen", "must differ from listen");
        }
        self.server.validate()?;
        self.conversation.validate()?;
        self.agents.validate()?;
        self.redis.validate()?;
        self.nlp.validate()?;
        self.answerer.validate().map_err(ConfigError::Answerer)?;
        self.auth.check(self.listen)?;
        self.tenants.validate(self.websocket.max_text_bytes)?;
        Ok(())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}
