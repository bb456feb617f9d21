//! Admission to the NLP service: a bounded, per-tenant fair queue.
//!
//! At most `capacity` calls run per node: `max_concurrent` from the config,
//! or less while the NLP endpoints take fewer (their learned limits, see
//! [`super::limit`], set it through [`Admission::set_capacity`]). At most
//! `max_per_tenant` of them (scaled down with the capacity) run for one
//! tenant while another tenant has calls
//! running or waiting: the slots above a tenant's share stay free for the
//! others, so a steady tenant's question starts at once even while another
//! tenant's burst fills every slot it may (replies of the same length end in
//! waves, and without that headroom a steady question would wait for the
//! next wave). A tenant alone on the node (no other tenant asked within
//! [`ACTIVE_WINDOW`]) may use every slot. Further questions wait in one
//! FIFO per tenant, and freed slots go round robin across the tenants that
//! have someone waiting and are below their share. At most `max_queued`
//! questions wait in all; when the line is full, a question of a tenant with
//! a shorter line takes the place of the newest waiter of the longest line
//! (which gets the fallback), otherwise it is refused at once. A question
//! whose call an endpoint refused as full comes back to the front of its
//! tenant's line ([`Admission::reenter`]): it keeps its place.
//!
//! Each waiter can ask its place in line (an estimate under round robin:
//! the waiters that will be served before it, plus one), which the hub shows
//! to the customer as `queued` frames. Places are computed when asked, not
//! pushed on every change: under a 15x burst thousands wait, and telling each
//! of them at every freed slot made the queue itself the bottleneck.
//!
//! Two halves: [`share`] decides who may start (capacity, tenant shares,
//! activity) and [`line`](mod@line) keeps who waits (per-tenant FIFOs, round robin).
//! This module joins them behind one std `Mutex`, held for short,
//! await-free updates, and hands out [`Permit`]s and [`Ticket`]s.

mod line;
mod share;

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

use crate::ids::TenantId;
use line::Line;
use share::Shares;
pub use share::{ACTIVE_WINDOW, TenantCaps};

#[derive(Debug)]
pub struct Admission {
    max_queued: usize,
    state: Mutex<State>,
}

/// Both halves change together, under one lock.
#[derive(Debug)]
struct State {
    shares: Shares,
    line: Line,
}

/// How often a waiting question re-reads its place in line; it is told
/// only when the place changed.
const QUEUED_UPDATE_INTERVAL: Duration = Duration::from_secs(1);

/// Refused: the queue is full.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

/// Why [`Admission::slot`] gave no slot.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The line was full, or the question was shed from it.
    Full,
    /// Its time to wait ran out first.
    TimedOut,
}

/// A running slot; dropping it admits the next waiter.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    tenant: TenantId,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(&self.tenant);
    }
}

/// A place in line.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    tenant: TenantId,
    id: u64,
    /// Resolves when a slot was handed to this ticket (then call [`Ticket::permit`]).
    pub admitted: oneshot::Receiver<()>,
    /// Set once the slot became a [`Permit`].
    taken: bool,
}

impl Ticket {
    /// Turns an admitted ticket into its running slot.
    pub fn permit(mut self) -> Permit {
        self.taken = true;
        Permit { admission: self.admission.clone(), tenant: self.tenant.clone() }
    }

    /// The current place in line (1 = next); 0 once admitted.
    pub fn position(&self) -> usize {
        self.admission.position(&self.tenant, self.id)
    }

    /// Waits for the slot; `QueueFull` if the ticket was shed from a full
    /// line instead. Cancel-safe: dropping the ticket leaves the line.
    pub async fn admitted(mut self) -> Result<Permit, QueueFull> {
        match (&mut self.admitted).await {
            Ok(()) => Ok(self.permit()),
            Err(_) => Err(QueueFull),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        // Closed first, so a slot cannot be handed over between this check
        // and `leave` (it would be counted as running forever).
        self.admitted.close();
        if self.admitted.try_recv().is_ok() {
            // A slot was handed over but never used: pass it on.
            self.admission.release(&self.tenant);
        } else {
            self.admission.leave(&self.tenant, self.id);
        }
    }
}

/// What `enter` gives: a slot now, or a place in line.
#[derive(Debug)]
pub enum Entry {
    Running(Permit),
    Waiting(Ticket),
}

impl Admission {
    /// `max_per_tenant` is clamped to `1..=max_concurrent`.
    pub fn new(max_concurrent: usize, max_per_tenant: usize, max_queued: usize) -> Arc<Self> {
        let state = State { shares: Shares::new(max_concurrent, max_per_tenant), line: Line::new() };
        Arc::new(Self { max_queued, state: Mutex::new(state) })
    }

    /// Sets how many calls may run at once (clamped to `1..=max_concurrent`)
    /// and admits waiters if it grew. Calls already running above a lowered
    /// capacity finish; no new one starts until the count is below it.
    pub fn set_capacity(&self, capacity: usize) {
        let mut state = self.lock();
        state.shares.set_capacity(capacity);
        Self::dispatch(&mut state);
    }

    /// Sets the tenants' hard caps and admits waiters they no longer hold back.
    pub fn set_tenant_caps(&self, caps: TenantCaps) {
        let mut state = self.lock();
        state.shares.set_tenant_caps(caps);
        Self::dispatch(&mut state);
    }

    /// Calls that may run at once now.
    pub fn capacity(&self) -> usize {
        self.lock().shares.capacity()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Updates are small and complete; a poisoned lock still holds a consistent state.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a slot, or a place at the back of `tenant`'s line, or is refused.
    pub fn enter(self: &Arc<Self>, tenant: &TenantId) -> Result<Entry, QueueFull> {
        self.enter_line(tenant, false)
    }

    /// [`Self::enter`] for a question that had a slot and lost it (its
    /// endpoint was full): the front of `tenant`'s line, ahead of newer questions.
    pub fn reenter(self: &Arc<Self>, tenant: &TenantId) -> Result<Entry, QueueFull> {
        self.enter_line(tenant, true)
    }

    fn enter_line(self: &Arc<Self>, tenant: &TenantId, front: bool) -> Result<Entry, QueueFull> {
        let mut state = self.lock();
        state.shares.asked(tenant, Instant::now());
        // Who may start can change with time (a tenant falls quiet): admit
        // eligible waiters first, then this question only if its tenant has
        // nobody waiting before it (first come, first served within a tenant).
        Self::dispatch(&mut state);
        let first_in_line = front || !state.line.has_waiters(tenant);
        if state.shares.has_free_slot() && first_in_line && state.shares.may_start(tenant, state.line.alone(tenant)) {
            state.shares.start(tenant);
            return Ok(Entry::Running(Permit { admission: self.clone(), tenant: tenant.clone() }));
        }
        if state.line.len() >= self.max_queued && !state.line.shed_longer_than(tenant) {
            return Err(QueueFull);
        }
        let (id, admitted) = state.line.push(tenant, front);
        Ok(Entry::Waiting(Ticket { admission: self.clone(), tenant: tenant.clone(), id, admitted, taken: false }))
    }

    /// A running slot for a question of `tenant`, waiting in its line until
    /// `give_up` if needed (`front`: at the front, for a question that lost
    /// its slot). While it waits, `on_queued` hears its place in line each
    /// time it changed (checked every [`QUEUED_UPDATE_INTERVAL`]).
    pub async fn slot(
        self: &Arc<Self>,
        tenant: &TenantId,
        front: bool,
        give_up: Instant,
        on_queued: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Permit, Refused> {
        let mut ticket = match self.enter_line(tenant, front) {
            Ok(Entry::Running(permit)) => return Ok(permit),
            Ok(Entry::Waiting(ticket)) => ticket,
            Err(QueueFull) => return Err(Refused::Full),
        };
        let queued_at = Instant::now();
        let _record_wait = RecordOnDrop(queued_at, crate::metric::NLP_QUEUE_WAIT);
        let mut told = ticket.position();
        // 0: admitted (or shed) in the meantime; nothing to tell then.
        if told != 0 {
            on_queued(told);
        }
        let mut recheck = tokio::time::interval_at(queued_at + QUEUED_UPDATE_INTERVAL, QUEUED_UPDATE_INTERVAL);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let give_up = tokio::time::sleep_until(give_up);
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                admitted = &mut ticket.admitted => {
                    return match admitted {
                        Ok(()) => Ok(ticket.permit()),
                        Err(_) => Err(Refused::Full),
                    };
                }
                _ = recheck.tick() => {
                    let position = ticket.position();
                    if position != told && position != 0 {
                        told = position;
                        on_queued(position);
                    }
                }
                () = &mut give_up => return Err(Refused::TimedOut),
            }
        }
    }

    /// A running call of `tenant` ended: hand free slots to waiters.
    fn release(&self, tenant: &TenantId) {
        let mut state = self.lock();
        state.shares.end(tenant);
        Self::dispatch(&mut state);
    }

    /// Hands free slots to waiters, round robin over the tenants that may
    /// start. Called whenever who may start can have changed: a call ended,
    /// a waiter left, a question arrived, a waiter asks its place.
    fn dispatch(state: &mut State) {
        while state.shares.has_free_slot() {
            let shares = &state.shares;
            let Some((tenant, waiter)) = state.line.next_eligible(|t, alone| shares.may_start(t, alone)) else {
                break;
            };
            if waiter.admit.send(()).is_ok() {
                state.shares.start(&tenant);
            }
        }
    }

    /// A waiter gave up (deadline, customer gone) before being admitted.
    fn leave(&self, tenant: &TenantId, id: u64) {
        let mut state = self.lock();
        if state.line.remove(tenant, id) {
            // With this tenant's line gone, another may now be alone.
            Self::dispatch(&mut state);
        }
    }

    /// The place in line of waiter `id` (1 = next), 0 once admitted.
    fn position(&self, tenant: &TenantId, id: u64) -> usize {
        let mut state = self.lock();
        // Asked once a second by every waiter: time may have made someone eligible.
        Self::dispatch(&mut state);
        state.line.position(tenant, id)
    }
}

/// Records how long something took into a histogram when dropped.
struct RecordOnDrop(Instant, &'static str);

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        metrics::histogram!(self.1).record(self.0.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests;
