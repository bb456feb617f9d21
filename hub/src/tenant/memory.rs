//! Per-tenant counts of one node (the memory backend): connections in a
//! map, each user's message rate in a `governor` keyed rate limiter per
//! tenant (GCRA: a burst of `max`, then one per `window / max`).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::{CountError, Counts};
use crate::ids::{TenantId, UserId};

/// One tenant's message limiter, with the quota it was built for (a
/// reloaded quota builds a new one).
type MessageLimiter = (Quota, Arc<DefaultKeyedRateLimiter<UserId>>);

#[derive(Default)]
pub struct MemoryCounts {
    /// Connections counted per tenant; tenants with none are absent.
    connections: Mutex<HashMap<TenantId, u32>>,
    /// Each tenant's message limiter.
    messages: Mutex<HashMap<TenantId, MessageLimiter>>,
}

impl MemoryCounts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets users whose rate state is back to fresh, and tenants left
    /// with none (run periodically; tenant ids are unbounded in demo mode).
    pub fn upkeep(&self) {
        self.lock_messages().retain(|_, (_, limiter)| {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            !limiter.is_empty()
        });
    }

    fn lock_messages(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, MessageLimiter>> {
        // Short, await-free updates; a poisoned lock still holds whole entries.
        self.messages.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Counts for MemoryCounts {
    async fn connect(&self, tenant: &TenantId, _lease: &str, max: u32) -> Result<bool, CountError> {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let count = connections.entry(tenant.clone()).or_default();
        if *count >= max {
            return Ok(false);
        }
        *count += 1;
        Ok(true)
    }

    fn release(&self, tenant: &TenantId, _lease: &str) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = connections.get_mut(tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                connections.remove(tenant);
            }
        }
    }

    async fn message(
        &self,
        tenant: &TenantId,
        user: &UserId,
        max: u32,
        window: Duration,
    ) -> Result<Option<Duration>, CountError> {
        let burst = NonZeroU32::new(max).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(window / burst.get()).unwrap_or(Quota::per_second(burst)).allow_burst(burst);
        let limiter = {
            let mut messages = self.lock_messages();
            match messages.get(tenant) {
                Some((built_for, limiter)) if *built_for == quota => limiter.clone(),
                _ => {
                    let limiter = Arc::new(RateLimiter::keyed(quota));
                    messages.insert(tenant.clone(), (quota, limiter.clone()));
                    limiter
                }
            }
        };
        Ok(limiter.check_key(user).err().map(|not_until| not_until.wait_time_from(DefaultClock::default().now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(tenant: &str, user: &str) -> (TenantId, UserId) {
        (TenantId::parse(tenant).unwrap(), UserId::parse(user).unwrap())
    }

    #[tokio::test]
    async fn connections_count_per_tenant_and_are_released() {
        let counts = MemoryCounts::new();
        let ((acme, _), (shop, _)) = (ids("acme", "u"), ids("shop", "u"));
        assert!(counts.connect(&acme, "a", 2).await.unwrap());
        assert!(counts.connect(&acme, "b", 2).await.unwrap());
        assert!(!counts.connect(&acme, "c", 2).await.unwrap());
        assert!(counts.connect(&shop, "d", 2).await.unwrap());
        counts.release(&acme, "a");
        assert!(counts.connect(&acme, "c", 2).await.unwrap());
    }

    #[tokio::test]
    async fn messages_come_in_a_burst_then_one_per_window_share() {
        let counts = MemoryCounts::new();
        let ((acme, alice), (_, bob)) = (ids("acme", "alice"), ids("acme", "bob"));
        let window = Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(counts.message(&acme, &alice, 3, window).await.unwrap(), None);
        }
        let wait = counts.message(&acme, &alice, 3, window).await.unwrap().expect("over the rate");
        assert!(wait > Duration::from_secs(19) && wait <= Duration::from_secs(20), "{wait:?}");
        assert_eq!(counts.message(&acme, &bob, 3, window).await.unwrap(), None, "per user");
        counts.upkeep();
        assert!(counts.message(&acme, &alice, 3, window).await.unwrap().is_some(), "upkeep keeps live state");
    }
}
