//! The line of questions waiting for a slot: one FIFO per tenant, served
//! round robin across tenants.
//!
//! Knows nothing of slots or shares: [`Line::next_eligible`] asks its caller
//! which tenants may start. Each waiter has an id that orders its tenant's
//! FIFO: ids of new waiters grow from [`FIRST_WAITER`], ids of questions put
//! back at the front shrink from it, so a FIFO stays sorted by id and a
//! waiter's index is found by binary search. A place in line is computed
//! when asked ([`Line::position`]), never pushed on every change.

use std::collections::{HashMap, VecDeque};

use tokio::sync::oneshot;

use crate::ids::TenantId;

/// Waiter ids start here and grow; ids of questions coming back to the
/// front of a line start here and shrink, so each line stays sorted by id.
const FIRST_WAITER: u64 = 1 << 62;

/// One waiting question: its id and the sender that hands it a slot.
#[derive(Debug)]
pub(super) struct Waiter {
    id: u64,
    pub(super) admit: oneshot::Sender<()>,
}

#[derive(Debug)]
pub(super) struct Line {
    /// Waiters in all FIFOs.
    len: usize,
    next_waiter: u64,
    /// The id of the last waiter put at the front of a FIFO.
    next_front: u64,
    /// One FIFO per tenant with waiters, in increasing `id` order.
    queues: HashMap<TenantId, VecDeque<Waiter>>,
    /// Tenants with waiters, in round-robin order; the front is served next.
    ring: VecDeque<TenantId>,
}

impl Line {
    pub(super) fn new() -> Self {
        Self {
            len: 0,
            next_waiter: FIRST_WAITER,
            next_front: FIRST_WAITER,
            queues: HashMap::new(),
            ring: VecDeque::new(),
        }
    }

    /// Waiters in all.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether `tenant` has someone waiting.
    pub(super) fn has_waiters(&self, tenant: &TenantId) -> bool {
        self.queues.contains_key(tenant)
    }

    /// Whether no tenant but `tenant` has someone waiting.
    pub(super) fn alone(&self, tenant: &TenantId) -> bool {
        self.ring.iter().all(|t| t == tenant)
    }

    /// Puts a question of `tenant` at the back of its FIFO (or the front:
    /// `front`); returns its id and the receiver its slot comes through.
    pub(super) fn push(&mut self, tenant: &TenantId, front: bool) -> (u64, oneshot::Receiver<()>) {
        let (admit, admitted) = oneshot::channel();
        let id = if front {
            self.next_front -= 1;
            self.next_front
        } else {
            self.next_waiter += 1;
            self.next_waiter
        };
        self.len += 1;
        if !self.queues.contains_key(tenant) {
            self.ring.push_back(tenant.clone());
        }
        let queue = self.queues.entry(tenant.clone()).or_default();
        match front {
            true => queue.push_front(Waiter { id, admit }),
            false => queue.push_back(Waiter { id, admit }),
        }
        (id, admitted)
    }

    /// Makes room in a full line for `tenant` by dropping the newest waiter
    /// of the longest FIFO (its receiver sees the sender dropped), if that
    /// FIFO is longer than `tenant`'s would be with the newcomer. Returns
    /// whether it did.
    pub(super) fn shed_longer_than(&mut self, tenant: &TenantId) -> bool {
        let own = self.queues.get(tenant).map_or(0, VecDeque::len);
        let Some((longest, len)) = self.queues.iter().map(|(t, queue)| (t, queue.len())).max_by_key(|(_, len)| *len)
        else {
            return false;
        };
        if len <= own + 1 {
            return false;
        }
        let longest = longest.clone();
        if let Some(queue) = self.queues.get_mut(&longest) {
            queue.pop_back();
        }
        self.len -= 1;
        true
    }

    /// Takes the next waiter, round robin over the tenants for which
    /// `may_start(tenant, alone)` holds (`alone`: no other tenant waits).
    /// Tenants passed over go to the back of the ring; `None` once the
    /// whole ring was passed over.
    pub(super) fn next_eligible(
        &mut self,
        mut may_start: impl FnMut(&TenantId, bool) -> bool,
    ) -> Option<(TenantId, Waiter)> {
        let mut passed_over = 0;
        while passed_over < self.ring.len() {
            let tenant = self.ring.pop_front()?;
            if !may_start(&tenant, self.alone(&tenant)) {
                self.ring.push_back(tenant);
                passed_over += 1;
                continue;
            }
            passed_over = 0;
            let Some(queue) = self.queues.get_mut(&tenant) else { continue };
            let waiter = queue.pop_front();
            if queue.is_empty() {
                self.queues.remove(&tenant);
            } else {
                self.ring.push_back(tenant.clone());
            }
            if let Some(waiter) = waiter {
                self.len -= 1;
                return Some((tenant, waiter));
            }
        }
        None
    }

    /// Takes waiter `id` of `tenant` out of the line (it gave up); false if
    /// it was not there (admitted or shed meanwhile).
    pub(super) fn remove(&mut self, tenant: &TenantId, id: u64) -> bool {
        let Some(queue) = self.queues.get_mut(tenant) else { return false };
        let Some(index) = queue.iter().position(|w| w.id == id) else { return false };
        queue.remove(index);
        if queue.is_empty() {
            self.queues.remove(tenant);
            self.ring.retain(|t| t != tenant);
        }
        self.len -= 1;
        true
    }

    /// Place in line under round robin (1 = next; 0 if not waiting): before
    /// the k-th waiter (from 0) of the tenant at ring index r come, from
    /// every tenant, their first k waiters, plus the (k+1)-th waiters of the
    /// tenants ahead of it in the ring. O(tenants waiting + log waiters).
    pub(super) fn position(&self, tenant: &TenantId, id: u64) -> usize {
        let Some(k) = self.queues.get(tenant).and_then(|queue| queue.binary_search_by_key(&id, |w| w.id).ok()) else {
            return 0;
        };
        let mut before = 0;
        let mut ahead_in_ring = true;
        for other in &self.ring {
            if other == tenant {
                ahead_in_ring = false;
            }
            let len = self.queues.get(other).map_or(0, VecDeque::len);
            before += len.min(k) + usize::from(ahead_in_ring && len > k);
        }
        before + 1
    }
}
