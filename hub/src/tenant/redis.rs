//! Per-tenant counts shared by the nodes of a cluster, in Redis: one atomic
//! Lua script (`limits.lua`) for every operation, on a connection of its own.
//!
//! Names: `<prefix>:tenant:{<tenant>}:connections` (a zset of this
//! cluster's connection leases, scored by expiry) and
//! `<prefix>:user:{<tenant>:<user>}:messages` (the user's rate state), ids
//! escaped as in [`crate::store::redis::keys`]. Each node renews its own
//! leases every third of `redis.connection_lease_ms`; those of a node that
//! died expire after it and are dropped by the next `connect`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{CountError, Counts};
use crate::config::RedisConfig;
use crate::ids::{TenantId, UserId};
use crate::store::redis::keys::escape;

static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("limits.lua")));

pub struct RedisCounts {
    commands: ConnectionManager,
    timeout: Duration,
    /// `redis.connection_lease_ms`.
    lease: Duration,
    prefix: String,
    /// This node's counted leases, by lease id, for renewal.
    leases: Mutex<HashMap<String, TenantId>>,
    /// Owns the release calls (shutdown waits for them).
    tracker: TaskTracker,
}

impl RedisCounts {
    /// Connects (Redis must be reachable) and starts the lease renewal on
    /// `tracker`, stopped by `stop`.
    pub async fn connect(
        config: &RedisConfig,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, CountError> {
        let timeout = Duration::from_millis(config.command_timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let client = redis::Client::open(config.url.as_str())?;
        let commands = tokio::time::timeout(timeout, client.get_connection_manager_with_config(manager_config))
            .await
            .map_err(|_| CountError::Timeout)??;
        let counts = Arc::new(Self {
            commands,
            timeout,
            lease: Duration::from_millis(config.connection_lease_ms),
            prefix: config.key_prefix.clone(),
            leases: Mutex::new(HashMap::new()),
            tracker: tracker.clone(),
        });
        tracker.spawn(counts.clone().run_renewal(stop));
        Ok(counts)
    }

    fn connections_key(&self, tenant: &TenantId) -> String {
        format!("{}:tenant:{{{}}}:connections", self.prefix, escape(tenant.as_str()))
    }

    fn messages_key(&self, tenant: &TenantId, user: &UserId) -> String {
        format!("{}:user:{{{}:{}}}:messages", self.prefix, escape(tenant.as_str()), escape(user.as_str()))
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, TenantId>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(&self, key: String, args: &[&str]) -> Result<i64, CountError> {
        let mut invocation = SCRIPT.key(key);
        for arg in args {
            invocation.arg(*arg);
        }
        let mut commands = self.commands.clone();
        tokio::time::timeout(self.timeout, invocation.invoke_async(&mut commands))
            .await
            .map_err(|_| CountError::Timeout)?
            .map_err(CountError::from)
    }

    /// Renews this node's leases every third of a lease, one call per tenant.
    async fn run_renewal(self: Arc<Self>, stop: CancellationToken) {
        let mut interval = tokio::time::interval(self.lease / 3);
        let ttl = self.lease.as_millis().to_string();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let mut by_tenant: HashMap<TenantId, Vec<String>> = HashMap::new();
            for (lease, tenant) in self.leases().iter() {
                by_tenant.entry(tenant.clone()).or_default().push(lease.clone());
            }
            for (tenant, leases) in by_tenant {
                let mut args = vec!["renew", ttl.as_str()];
                args.extend(leases.iter().map(String::as_str));
                if let Err(error) = self.run(self.connections_key(&tenant), &args).await {
                    warn!(%error, tenant_id = %tenant, "connection leases not renewed");
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Counts for RedisCounts {
    async fn connect(&self, tenant: &TenantId, lease: &str, max: u32) -> Result<bool, CountError> {
        let (ttl, max) = (self.lease.as_millis().to_string(), max.to_string());
        let counted = self.run(self.connections_key(tenant), &["connect", lease, &ttl, &max]).await? == 1;
        if counted {
            self.leases().insert(lease.to_owned(), tenant.clone());
        }
        Ok(counted)
    }

    fn release(&self, tenant: &TenantId, lease: &str) {
        self.leases().remove(lease);
        let (commands, timeout, key, lease) =
            (self.commands.clone(), self.timeout, self.connections_key(tenant), lease.to_owned());
        self.tracker.spawn(async move {
            let mut commands = commands;
            let released = tokio::time::timeout(
                timeout,
                SCRIPT.key(key).arg("release").arg(lease).invoke_async::<i64>(&mut commands),
            )
            .await;
            if !matches!(released, Ok(Ok(_))) {
                warn!("connection lease not released; it expires by itself");
            }
        });
    }

    async fn message(
        &self,
        tenant: &TenantId,
        user: &UserId,
        max: u32,
        window: Duration,
    ) -> Result<Option<Duration>, CountError> {
        let (max, window) = (max.to_string(), window.as_millis().to_string());
        let wait_ms = self.run(self.messages_key(tenant, user), &["message", &max, &window]).await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms.unsigned_abs())))
    }
}
