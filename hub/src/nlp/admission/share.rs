//! Who may start a call now: the node's capacity, each tenant's share of
//! it, and which tenants are active.
//!
//! The bookkeeping behind the fairness rules of [`super`]: how many calls
//! run, per tenant; the capacity (`max_concurrent`, or less while the
//! endpoints take fewer); the per-tenant share, which keeps its proportion
//! of a lowered capacity; and when each tenant last asked, so that a tenant
//! alone on the node (no other tenant running, waiting, or asking within
//! [`ACTIVE_WINDOW`]) may use every slot.

use std::collections::HashMap;

use tokio::time::{Duration, Instant};

use crate::ids::TenantId;

/// How long after its last question a tenant still counts as active, and so
/// still holds the others to their share. Longer than a reply, so a steady
/// tenant between two questions is not taken for gone.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(10);

/// Hard caps on one tenant's running calls (`tenants.<id>.nlp_max_concurrent`),
/// below which the fair share applies; set by [`super::Admission::set_tenant_caps`].
#[derive(Debug, Clone, Default)]
pub struct TenantCaps {
    /// The cap of tenants not in `named`.
    pub default: Option<usize>,
    pub named: HashMap<TenantId, Option<usize>>,
}

impl TenantCaps {
    fn allows(&self, tenant: &TenantId, running: usize) -> bool {
        let cap = match self.named.get(tenant) {
            Some(cap) => *cap,
            None => self.default,
        };
        cap.is_none_or(|cap| running < cap)
    }
}

#[derive(Debug)]
pub(super) struct Shares {
    max_concurrent: usize,
    max_per_tenant: usize,
    /// Calls that may run now: `max_concurrent`, or less while the
    /// endpoints take fewer.
    capacity: usize,
    /// The per-tenant share of `capacity`.
    per_tenant: usize,
    running: usize,
    /// Running calls by tenant; tenants with none are absent.
    running_by_tenant: HashMap<TenantId, usize, foldhash::fast::RandomState>,
    /// When each tenant last asked (entries older than `ACTIVE_WINDOW` are pruned).
    last_asked: HashMap<TenantId, Instant, foldhash::fast::RandomState>,
    caps: TenantCaps,
}

impl Shares {
    /// `max_per_tenant` is clamped to `1..=max_concurrent`.
    pub(super) fn new(max_concurrent: usize, max_per_tenant: usize) -> Self {
        let max_per_tenant = max_per_tenant.clamp(1, max_concurrent.max(1));
        Self {
            max_concurrent,
            max_per_tenant,
            capacity: max_concurrent,
            per_tenant: max_per_tenant,
            running: 0,
            running_by_tenant: HashMap::default(),
            last_asked: HashMap::default(),
            caps: TenantCaps::default(),
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the capacity (clamped to `1..=max_concurrent`) and scales the
    /// per-tenant share with it. Calls already running above a lowered
    /// capacity go on; no new one starts until the count is below it.
    pub(super) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.clamp(1, self.max_concurrent.max(1));
        // The share keeps its proportion: ¾ of 512 slots is ¾ of 8 slots.
        self.per_tenant = if self.capacity >= self.max_concurrent {
            self.max_per_tenant
        } else {
            (self.max_per_tenant * self.capacity).div_ceil(self.max_concurrent.max(1)).max(1)
        };
    }

    pub(super) fn has_free_slot(&self) -> bool {
        self.running < self.capacity
    }

    /// Records a question of `tenant`, forgetting tenants quiet for `ACTIVE_WINDOW`.
    pub(super) fn asked(&mut self, tenant: &TenantId, now: Instant) {
        match self.last_asked.get_mut(tenant) {
            Some(at) => *at = now,
            None => {
                self.last_asked.retain(|_, at| now.duration_since(*at) < ACTIVE_WINDOW);
                self.last_asked.insert(tenant.clone(), now);
            }
        }
    }

    /// A call of `tenant` starts.
    pub(super) fn start(&mut self, tenant: &TenantId) {
        self.running += 1;
        *self.running_by_tenant.entry(tenant.clone()).or_default() += 1;
    }

    /// A call of `tenant` ended.
    pub(super) fn end(&mut self, tenant: &TenantId) {
        self.running -= 1;
        if let Some(running) = self.running_by_tenant.get_mut(tenant) {
            *running -= 1;
            if *running == 0 {
                self.running_by_tenant.remove(tenant);
            }
        }
    }

    pub(super) fn set_tenant_caps(&mut self, caps: TenantCaps) {
        self.caps = caps;
    }

    /// Below its own cap, and below its share or alone: no other tenant has
    /// calls running or waiting (`alone_in_line`), or asked within `ACTIVE_WINDOW`.
    pub(super) fn may_start(&self, tenant: &TenantId, alone_in_line: bool) -> bool {
        let running = self.running_by_tenant.get(tenant).copied().unwrap_or(0);
        if !self.caps.allows(tenant, running) {
            return false;
        }
        running < self.per_tenant
            || (alone_in_line
                && self.running_by_tenant.keys().all(|t| t == tenant)
                && self.last_asked.iter().all(|(t, at)| t == tenant || at.elapsed() >= ACTIVE_WINDOW))
    }
}
