//! Per-tenant limits: what one tenant may hold and send, so that a tenant at
//! its limits cannot slow another's customers.
//!
//! [`Tenants`] resolves each tenant's limits (`[tenants.<id>]` over
//! `[tenants.default]` over the node-wide settings) and counts what must be
//! counted across the cluster through a [`Counts`]: [`memory`] for one node
//! (`governor` for the message rate), [`redis`] for a cluster (one atomic
//! Lua script, `limits.lua`). Connections are counted as leases that the
//! node holding them renews, so a node that dies stops counting within
//! `redis.connection_lease_ms`. The limits enforced elsewhere are read from here: the longest
//! message (the session's reader), history turns (the replier), NLP calls in
//! flight (the NLP admission) and browser origins (the `/ws` upgrade).
//!
//! SIGHUP reloads the limits ([`Tenants::reload`]): sockets opened after it
//! get the new ones; NLP caps apply at once.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::warn;

use crate::config::{Config, TenantLimits};
use crate::ids::{TenantId, UserId};

/// `Retry-After` of an upgrade refused at the tenant's connection cap: a
/// place frees when one of the tenant's customers leaves, which nothing predicts.
pub const CONNECTION_RETRY_AFTER_SECS: u64 = 5;

/// One tenant's limits, node-wide settings filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// 0: no cap.
    pub max_connections: u32,
    /// 0: no cap.
    pub max_messages_per_user: u32,
    pub message_window: Duration,
    pub max_text_bytes: usize,
    pub history_turns: usize,
    pub nlp_max_concurrent: Option<usize>,
    pub allowed_origins: Vec<String>,
    /// The `tenant` label of its metrics: the tenant's id when it has its
    /// own `[tenants.<id>]` section, else `default` (a label set bounded
    /// by the configuration, whatever ids clients name).
    pub label: Arc<str>,
}

impl Limits {
    fn resolve(limits: &TenantLimits, config: &Config, label: &str) -> Self {
        Self {
            label: label.into(),
            max_connections: limits.max_connections,
            max_messages_per_user: limits.max_messages_per_user,
            message_window: Duration::from_millis(limits.message_window_ms),
            max_text_bytes: limits.max_text_bytes.unwrap_or(config.websocket.max_text_bytes),
            history_turns: limits.history_turns.unwrap_or(config.conversation.history_turns),
            nlp_max_concurrent: limits.nlp_max_concurrent,
            allowed_origins: limits.allowed_origins.clone().unwrap_or_else(|| config.websocket.allowed_origins.clone()),
        }
    }
}

/// The limits in force, swapped whole on reload.
#[derive(Debug)]
struct Settings {
    default: Arc<Limits>,
    named: HashMap<TenantId, Arc<Limits>>,
}

impl Settings {
    fn load(config: &Config) -> Self {
        let tenants = &config.tenants;
        let named = tenants
            .tenants
            .iter()
            // Ids were checked by `Config::validate`.
            .filter_map(|(id, overrides)| {
                let id = TenantId::parse(id).ok()?;
                let limits = Limits::resolve(&tenants.default.with(overrides), config, id.as_str());
                Some((id, Arc::new(limits)))
            })
            .collect();
        Self { default: Arc::new(Limits::resolve(&tenants.default, config, "default")), named }
    }
}

/// Why a count could not be taken; the limit is then not enforced (a limit
/// must not turn a Redis hiccup into an outage), and the failure is logged.
#[derive(Debug, thiserror::Error)]
pub enum CountError {
    #[error("Redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("Redis did not answer in time")]
    Timeout,
}

/// Counts shared by the nodes that enforce one limit together.
#[async_trait::async_trait]
pub trait Counts: Send + Sync {
    /// Counts connection `lease` of `tenant` if fewer than `max` are counted.
    async fn connect(&self, tenant: &TenantId, lease: &str, max: u32) -> Result<bool, CountError>;
    /// Stops counting `lease` (without waiting for it to be done).
    fn release(&self, tenant: &TenantId, lease: &str);
    /// Counts a message of `user`: `None` if it is within `max` per `window`,
    /// else how long until one would be.
    async fn message(
        &self,
        tenant: &TenantId,
        user: &UserId,
        max: u32,
        window: Duration,
    ) -> Result<Option<Duration>, CountError>;
}

/// A connection counted against its tenant's cap until dropped.
pub struct ConnectionLease {
    counts: Arc<dyn Counts>,
    tenant: TenantId,
    id: String,
}

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        self.counts.release(&self.tenant, &self.id);
    }
}

/// The tenant has every connection its cap allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtConnectionCap;

/// The node's per-tenant limits and counts.
pub struct Tenants {
    settings: RwLock<Arc<Settings>>,
    counts: Arc<dyn Counts>,
}

impl Tenants {
    pub fn new(config: &Config, counts: Arc<dyn Counts>) -> Self {
        Self { settings: RwLock::new(Arc::new(Settings::load(config))), counts }
    }

    /// Swaps in the limits of `config` (already validated).
    pub fn reload(&self, config: &Config) {
        let settings = Arc::new(Settings::load(config));
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `tenant`'s limits now.
    pub fn limits(&self, tenant: &TenantId) -> Arc<Limits> {
        let settings = self.settings();
        settings.named.get(tenant).unwrap_or(&settings.default).clone()
    }

    /// Each tenant's cap on NLP calls in flight per node, for the admission.
    pub fn nlp_caps(&self) -> crate::nlp::admission::TenantCaps {
        let settings = self.settings();
        crate::nlp::admission::TenantCaps {
            default: settings.default.nlp_max_concurrent,
            named: settings.named.iter().map(|(id, limits)| (id.clone(), limits.nlp_max_concurrent)).collect(),
        }
    }

    /// Whether any tenant's origin list passes `allows`: checked before the
    /// tenant is known, so that an origin no tenant allows is refused before
    /// a token is even read.
    pub fn any_origin_list(&self, allows: impl Fn(&[String]) -> bool) -> bool {
        let settings = self.settings();
        allows(&settings.default.allowed_origins)
            || settings.named.values().any(|limits| allows(&limits.allowed_origins))
    }

    /// Counts a new connection of `tenant` against its cap.
    pub async fn admit_connection(
        &self,
        tenant: &TenantId,
        limits: &Limits,
    ) -> Result<Option<ConnectionLease>, AtConnectionCap> {
        if limits.max_connections == 0 {
            return Ok(None);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        match self.counts.connect(tenant, &id, limits.max_connections).await {
            Ok(true) => Ok(Some(ConnectionLease { counts: self.counts.clone(), tenant: tenant.clone(), id })),
            Ok(false) => {
                let tenant_label = limits.label.to_string();
                metrics::counter!(crate::metric::TENANT_LIMITED, "limit" => "connections", "tenant" => tenant_label)
                    .increment(1);
                Err(AtConnectionCap)
            }
            Err(error) => {
                warn!(%error, tenant_id = %tenant, "tenant connection count unavailable; not enforced");
                Ok(None)
            }
        }
    }

    /// Counts a message of `user`; `Err(wait)` when over the tenant's rate.
    pub async fn admit_message(&self, tenant: &TenantId, user: &UserId, limits: &Limits) -> Result<(), Duration> {
        if limits.max_messages_per_user == 0 {
            return Ok(());
        }
        match self.counts.message(tenant, user, limits.max_messages_per_user, limits.message_window).await {
            Ok(None) => Ok(()),
            Ok(Some(wait)) => {
                let tenant_label = limits.label.to_string();
                metrics::counter!(crate::metric::TENANT_LIMITED, "limit" => "messages", "tenant" => tenant_label)
                    .increment(1);
                Err(wait)
            }
            Err(error) => {
                warn!(%error, tenant_id = %tenant, "message count unavailable; not enforced");
                Ok(())
            }
        }
    }
}
