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
//! of them at every freed slot made the queue itself the bottleneck. The
//! state sits behind a std `Mutex` held for short, await-free updates.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

use crate::ids::TenantId;

/// How long after its last question a tenant still counts as active, and so
/// still holds the others to their share. Longer than a reply, so a steady
/// tenant between two questions is not taken for gone.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Admission {
    max_concurrent: usize,
    max_per_tenant: usize,
    max_queued: usize,
    state: Mutex<State>,
}

/// Hard caps on one tenant's running calls (`tenants.<id>.nlp_max_concurrent`),
/// below which the fair share above applies; set by [`Admission::set_tenant_caps`].
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

/// Waiter ids start here and grow; ids of questions coming back to the
/// front of a line start here and shrink, so each line stays sorted by id.
const FIRST_WAITER: u64 = 1 << 62;

#[derive(Debug)]
struct State {
    /// Calls that may run now: `max_concurrent`, or less while the
    /// endpoints take fewer.
    capacity: usize,
    /// The per-tenant share of `capacity`.
    per_tenant: usize,
    running: usize,
    /// Running calls by tenant; tenants with none are absent.
    running_by_tenant: HashMap<TenantId, usize>,
    /// When each tenant last asked (entries older than `ACTIVE_WINDOW` are pruned).
    last_asked: HashMap<TenantId, Instant>,
    queued: usize,
    next_waiter: u64,
    /// The id of the last waiter put at the front of a line.
    next_front: u64,
    /// One FIFO per tenant with waiters, in increasing `id` order.
    queues: HashMap<TenantId, VecDeque<Waiter>>,
    /// Tenants with waiters, in round-robin order; the front is served next.
    ring: VecDeque<TenantId>,
    caps: TenantCaps,
}

impl State {
    fn running_of(&self, tenant: &TenantId) -> usize {
        self.running_by_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// Records a question of `tenant`, forgetting tenants quiet for `ACTIVE_WINDOW`.
    fn asked(&mut self, tenant: &TenantId, now: Instant) {
        match self.last_asked.get_mut(tenant) {
            Some(at) => *at = now,
            None => {
                self.last_asked.retain(|_, at| now.duration_since(*at) < ACTIVE_WINDOW);
                self.last_asked.insert(tenant.clone(), now);
            }
        }
    }

    fn start(&mut self, tenant: &TenantId) {
        self.running += 1;
        *self.running_by_tenant.entry(tenant.clone()).or_default() += 1;
    }

    /// Makes room in a full line for `tenant` by dropping the newest waiter
    /// of the longest line (its ticket resolves as refused), if that line is
    /// longer than `tenant`'s would be with the newcomer. Returns whether it did.
    fn shed_longer_than(&mut self, tenant: &TenantId) -> bool {
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
        self.queued -= 1;
        true
    }
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    admit: oneshot::Sender<()>,
}

/// Refused: the queue is full.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

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
        let max_per_tenant = max_per_tenant.clamp(1, max_concurrent.max(1));
        let state = State {
            capacity: max_concurrent,
            per_tenant: max_per_tenant,
            running: 0,
            running_by_tenant: HashMap::new(),
            last_asked: HashMap::new(),
            queued: 0,
            next_waiter: FIRST_WAITER,
            next_front: FIRST_WAITER,
            queues: HashMap::new(),
            ring: VecDeque::new(),
            caps: TenantCaps::default(),
        };
        Arc::new(Self { max_concurrent, max_per_tenant, max_queued, state: Mutex::new(state) })
    }

    /// Sets how many calls may run at once (clamped to `1..=max_concurrent`)
    /// and admits waiters if it grew. Calls already running above a lowered
    /// capacity finish; no new one starts until the count is below it.
    pub fn set_capacity(&self, capacity: usize) {
        let mut state = self.lock();
        state.capacity = capacity.clamp(1, self.max_concurrent.max(1));
        // The share keeps its proportion: ¾ of 512 slots is ¾ of 8 slots.
        state.per_tenant = if state.capacity >= self.max_concurrent {
            self.max_per_tenant
        } else {
            (self.max_per_tenant * state.capacity).div_ceil(self.max_concurrent.max(1)).max(1)
        };
        self.dispatch(&mut state);
    }

    /// Sets the tenants' hard caps and admits waiters they no longer hold back.
    pub fn set_tenant_caps(&self, caps: TenantCaps) {
        let mut state = self.lock();
        state.caps = caps;
        self.dispatch(&mut state);
    }

    /// Calls that may run at once now.
    pub fn capacity(&self) -> usize {
        self.lock().capacity
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
        state.asked(tenant, Instant::now());
        // Who may start can change with time (a tenant falls quiet): admit
        // eligible waiters first, then this question only if its tenant has
        // nobody waiting before it (first come, first served within a tenant).
        self.dispatch(&mut state);
        let first_in_line = front || !state.queues.contains_key(tenant);
        if state.running < state.capacity && first_in_line && self.may_start(&state, tenant) {
            state.start(tenant);
            return Ok(Entry::Running(Permit { admission: self.clone(), tenant: tenant.clone() }));
        }
        if state.queued >= self.max_queued && !state.shed_longer_than(tenant) {
            return Err(QueueFull);
        }
        let (admit, admitted) = oneshot::channel();
        let id = if front {
            state.next_front -= 1;
            state.next_front
        } else {
            state.next_waiter += 1;
            state.next_waiter
        };
        state.queued += 1;
        if !state.queues.contains_key(tenant) {
            state.ring.push_back(tenant.clone());
        }
        let queue = state.queues.entry(tenant.clone()).or_default();
        match front {
            true => queue.push_front(Waiter { id, admit }),
            false => queue.push_back(Waiter { id, admit }),
        }
        Ok(Entry::Waiting(Ticket { admission: self.clone(), tenant: tenant.clone(), id, admitted, taken: false }))
    }

    /// Below its own cap, and below its share or alone: no other tenant
    /// has calls running or waiting, or asked within `ACTIVE_WINDOW`.
    fn may_start(&self, state: &State, tenant: &TenantId) -> bool {
        if !state.caps.allows(tenant, state.running_of(tenant)) {
            return false;
        }
        state.running_of(tenant) < state.per_tenant
            || (state.running_by_tenant.keys().all(|t| t == tenant)
                && state.ring.iter().all(|t| t == tenant)
                && state.last_asked.iter().all(|(t, at)| t == tenant || at.elapsed() >= ACTIVE_WINDOW))
    }

    /// A running call of `tenant` ended: hand free slots to waiters.
    fn release(&self, tenant: &TenantId) {
        let mut state = self.lock();
        state.running -= 1;
        if let Some(running) = state.running_by_tenant.get_mut(tenant) {
            *running -= 1;
            if *running == 0 {
                state.running_by_tenant.remove(tenant);
            }
        }
        self.dispatch(&mut state);
    }

    /// Hands free slots to waiters, round robin over the tenants that may
    /// start. Called whenever who may start can have changed: a call ended,
    /// a waiter left, a question arrived, a waiter asks its place.
    fn dispatch(&self, state: &mut State) {
        // Tenants at their share are passed over (to the back of the ring);
        // once the whole ring was passed over, nobody can be admitted.
        let mut passed_over = 0;
        while state.running < state.capacity && passed_over < state.ring.len() {
            let Some(tenant) = state.ring.pop_front() else { break };
            if !self.may_start(state, &tenant) {
                state.ring.push_back(tenant);
                passed_over += 1;
                continue;
            }
            passed_over = 0;
            let Some(queue) = state.queues.get_mut(&tenant) else { continue };
            let waiter = queue.pop_front();
            if queue.is_empty() {
                state.queues.remove(&tenant);
            } else {
                state.ring.push_back(tenant.clone());
            }
            if let Some(waiter) = waiter {
                state.queued -= 1;
                if waiter.admit.send(()).is_ok() {
                    state.start(&tenant);
                }
            }
        }
    }

    /// A waiter gave up (deadline, customer gone) before being admitted.
    fn leave(&self, tenant: &TenantId, id: u64) {
        let mut state = self.lock();
        let Some(queue) = state.queues.get_mut(tenant) else { return };
        let Some(index) = queue.iter().position(|w| w.id == id) else { return };
        queue.remove(index);
        if queue.is_empty() {
            state.queues.remove(tenant);
            state.ring.retain(|t| t != tenant);
        }
        state.queued -= 1;
        // With this tenant's line gone, another may now be alone.
        self.dispatch(&mut state);
    }

    /// Place in line under round robin: before the k-th waiter (from 0) of
    /// the tenant at ring index r come, from every tenant, their first k
    /// waiters, plus the (k+1)-th waiters of the tenants ahead of it in the
    /// ring. O(tenants waiting + log waiters).
    fn position(&self, tenant: &TenantId, id: u64) -> usize {
        let mut state = self.lock();
        // Asked once a second by every waiter: time may have made someone eligible.
        self.dispatch(&mut state);
        let Some(k) = state.queues.get(tenant).and_then(|queue| queue.binary_search_by_key(&id, |w| w.id).ok()) else {
            return 0;
        };
        let mut before = 0;
        let mut ahead_in_ring = true;
        for other in &state.ring {
            if other == tenant {
                ahead_in_ring = false;
            }
            let len = state.queues.get(other).map_or(0, VecDeque::len);
            before += len.min(k) + usize::from(ahead_in_ring && len > k);
        }
        before + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::parse(name).unwrap()
    }

    fn waiting(entry: Result<Entry, QueueFull>) -> Ticket {
        match entry {
            Ok(Entry::Waiting(ticket)) => ticket,
            other => panic!("expected a place in line, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_bursting_tenant_does_not_starve_another() {
        let admission = Admission::new(1, 1, 100);
        let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
        let mut burst: VecDeque<_> = (0..5).map(|_| waiting(admission.enter(&tenant("a")))).collect();
        let steady = waiting(admission.enter(&tenant("b")));
        assert_eq!(burst[0].position(), 1);
        assert_eq!(steady.position(), 2, "b is served right after a's first waiter");
        assert_eq!(burst[1].position(), 3);

        drop(running);
        let first = burst.pop_front().unwrap().admitted().await.expect("admitted, not shed");
        assert_eq!(steady.position(), 1);
        drop(first);
        let _second = steady.admitted().await.expect("admitted, not shed");
        assert_eq!(burst[0].position(), 1);
    }

    #[tokio::test]
    async fn places_in_line_follow_the_round_robin_and_move_up_as_slots_free() {
        let admission = Admission::new(1, 1, 100);
        let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
        let a: Vec<_> = (0..3).map(|_| waiting(admission.enter(&tenant("a")))).collect();
        let b = waiting(admission.enter(&tenant("b")));
        let c: Vec<_> = (0..2).map(|_| waiting(admission.enter(&tenant("c")))).collect();
        let places = |a: &[Ticket], b: &Ticket, c: &[Ticket]| {
            (a.iter().map(Ticket::position).collect::<Vec<_>>(), b.position(), c.iter().map(Ticket::position).collect())
        };
        assert_eq!(places(&a, &b, &c), (vec![1, 4, 6], 2, vec![3, 5]));
        drop(running);
        let mut a = a.into_iter();
        let first = a.next().unwrap().admitted().await.expect("admitted, not shed");
        let a: Vec<_> = a.collect();
        // a moved to the back of the ring after its turn: b, c, then a again.
        assert_eq!(places(&a, &b, &c), (vec![3, 5], 1, vec![2, 4]));
        drop(c);
        assert_eq!(places(&a, &b, &[]), (vec![2, 3], 1, vec![]));
        drop(first);
        let _b = b.admitted().await.expect("admitted, not shed");
        assert_eq!(a.iter().map(Ticket::position).collect::<Vec<_>>(), [1, 2]);
    }

    #[tokio::test]
    async fn a_tenant_at_its_share_leaves_the_other_slots_to_other_tenants() {
        let admission = Admission::new(4, 2, 100);
        let Ok(Entry::Running(b_running)) = admission.enter(&tenant("b")) else { panic!("b starts") };
        let mut a_running: Vec<_> = (0..2).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
        assert!(a_running.iter().all(|entry| matches!(entry, Entry::Running(_))));
        // With b running, a is at its share: its third question waits though a slot is free...
        let a_waiting = waiting(admission.enter(&tenant("a")));
        // ...and b's next question starts at once in that slot.
        let Ok(Entry::Running(_b_second)) = admission.enter(&tenant("b")) else { panic!("b starts at once") };
        let b_waiting = waiting(admission.enter(&tenant("b")));
        // One of a's calls ends: a is below its share again; round robin
        // serves a first (it waited first), and b's waiter stays in line.
        drop(a_running.remove(0));
        let _a = a_waiting.admitted().await.expect("admitted, not shed");
        assert_eq!(b_waiting.position(), 1);
        drop(b_running);
        let _b = b_waiting.admitted().await.expect("admitted, not shed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_alone_may_use_every_slot_until_another_tenant_comes() {
        let admission = Admission::new(4, 2, 100);
        let alone: Vec<_> = (0..4).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
        assert!(alone.iter().all(|entry| matches!(entry, Entry::Running(_))), "alone, a takes all four slots");
        drop(alone);
        let b = admission.enter(&tenant("b")).unwrap();
        drop(b);
        // b has no call running, but asked recently: a is held to its share.
        let a: Vec<_> = (0..3).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
        assert!(matches!(a[1], Entry::Running(_)), "a's share is 2");
        assert!(matches!(a[2], Entry::Waiting(_)), "with b active, a waits beyond its share: {:?}", a[2]);
        drop(a);
        // Once b has been quiet for the window, a is alone again.
        tokio::time::advance(ACTIVE_WINDOW).await;
        let a: Vec<_> = (0..4).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
        assert!(a.iter().all(|entry| matches!(entry, Entry::Running(_))), "alone again: {a:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_admitted_once_its_tenant_is_alone_and_a_newer_question_does_not_pass_it() {
        let admission = Admission::new(4, 2, 100);
        drop(admission.enter(&tenant("b")).unwrap());
        let _a_running: Vec<_> = (0..2).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
        let waiter = waiting(admission.enter(&tenant("a")));
        tokio::time::advance(ACTIVE_WINDOW).await;
        // b fell quiet: a may use every slot, and its waiter goes first.
        assert_eq!(waiter.position(), 0, "admitted when it asked its place");
        let newer = admission.enter(&tenant("a")).unwrap();
        assert!(matches!(newer, Entry::Running(_)), "{newer:?}");
        let _waiter = waiter.admitted().await.expect("admitted, not shed");
        assert!(matches!(admission.enter(&tenant("a")).unwrap(), Entry::Waiting(_)), "all four slots taken");
    }

    #[tokio::test]
    async fn a_full_line_makes_room_for_a_shorter_line_by_refusing_the_longest_lines_newest() {
        let admission = Admission::new(1, 1, 3);
        let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
        let a: Vec<_> = (0..3).map(|_| waiting(admission.enter(&tenant("a")))).collect();
        assert_eq!(admission.enter(&tenant("a")).unwrap_err(), QueueFull, "a's own line is the longest");
        let b = waiting(admission.enter(&tenant("b")));
        let mut a = a.into_iter();
        let (first, second, mut newest) = (a.next().unwrap(), a.next().unwrap(), a.next().unwrap());
        assert!((&mut newest.admitted).await.is_err(), "a's newest waiter was refused to make room");
        // Lines of 2 (a) and 1 (b): b may not push out another of a's.
        assert_eq!(admission.enter(&tenant("b")).unwrap_err(), QueueFull);
        assert_eq!((first.position(), b.position(), second.position()), (1, 2, 3));
        drop(running);
        let _first = first.admitted().await.expect("admitted, not shed");
    }

    #[tokio::test]
    async fn an_admitted_ticket_dropped_unused_passes_its_slot_on() {
        let admission = Admission::new(1, 1, 10);
        let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!() };
        let abandoned = waiting(admission.enter(&tenant("a")));
        let next = waiting(admission.enter(&tenant("b")));
        drop(running);
        drop(abandoned);
        let _permit = next.admitted().await.expect("admitted, not shed");
    }

    #[test]
    fn the_queue_is_bounded_and_leaving_frees_a_place() {
        let admission = Admission::new(1, 1, 2);
        let _running = admission.enter(&tenant("a")).unwrap();
        let first = waiting(admission.enter(&tenant("a")));
        let second = waiting(admission.enter(&tenant("b")));
        assert_eq!(admission.enter(&tenant("c")).unwrap_err(), QueueFull);
        drop(first);
        assert_eq!(second.position(), 1);
        assert!(admission.enter(&tenant("c")).is_ok());
    }

    #[tokio::test]
    async fn a_lowered_capacity_holds_new_calls_back_until_running_calls_end_and_a_raised_one_admits() {
        let admission = Admission::new(4, 4, 10);
        let mut running: Vec<_> = (0..3).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
        admission.set_capacity(2);
        let waiter = waiting(admission.enter(&tenant("a")));
        drop(running.pop());
        assert_eq!(waiter.position(), 1, "two still running: at capacity");
        admission.set_capacity(3);
        let _permit = waiter.admitted().await.expect("a raised capacity admits at once");
        admission.set_capacity(100);
        assert_eq!(admission.capacity(), 4, "never above max_concurrent");
    }

    #[test]
    fn the_tenant_share_scales_with_the_capacity() {
        let admission = Admission::new(8, 4, 10);
        admission.set_capacity(4);
        let _b = admission.enter(&tenant("b")).unwrap();
        let a: Vec<_> = (0..3).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
        assert!(matches!(a[1], Entry::Running(_)), "{a:?}");
        assert!(matches!(a[2], Entry::Waiting(_)), "a's share of 4 slots is 2 (4 of 8), though one is free: {a:?}");
    }

    #[tokio::test]
    async fn a_question_that_lost_its_slot_goes_back_to_the_front_of_its_line() {
        let admission = Admission::new(1, 1, 10);
        let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
        let newer = waiting(admission.enter(&tenant("a")));
        let returning = waiting(admission.reenter(&tenant("a")));
        assert_eq!((returning.position(), newer.position()), (1, 2));
        drop(running);
        let permit = returning.admitted().await.expect("admitted first");
        assert_eq!(newer.position(), 1);
        drop(permit);
        // With a free slot and nobody ahead, it runs at once.
        let admission = Admission::new(2, 2, 10);
        let _running = admission.enter(&tenant("a")).unwrap();
        assert!(matches!(admission.reenter(&tenant("a")), Ok(Entry::Running(_))));
    }

    #[tokio::test]
    async fn a_slot_freed_while_nobody_waits_is_reused() {
        let admission = Admission::new(1, 1, 1);
        let Ok(Entry::Running(permit)) = admission.enter(&tenant("a")) else { panic!() };
        drop(permit);
        assert!(matches!(admission.enter(&tenant("a")), Ok(Entry::Running(_))));
    }
}
