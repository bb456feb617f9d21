//! One NLP endpoint as the pool sees it (its client, breaker, learned limit,
//! calls in flight and health), and which endpoint a call goes to.
//!
//! Selection ([`pick`]): the first endpoint whose breaker allows a call, in
//! this order: endpoints this question has not yet failed on, then healthy
//! ones, then those below their limit, then the fewest calls in flight. An
//! unhealthy, full or already-failed endpoint is still used when no other
//! will take the call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::time::Instant;

use super::breaker::{Breaker, BreakerConfig, BreakerState};
use super::client::NlpClient;
use super::limit::{self, ConcurrencyLimit};

/// One bridge endpoint and what the hub knows about it.
#[derive(Debug)]
pub struct Endpoint {
    /// Where the client connects (may carry credentials: never shown).
    pub(super) url: String,
    /// How logs and metric labels name it: the URL without credentials
    /// ([`crate::redact::display_url`]).
    pub name: String,
    pub(super) client: NlpClient,
    pub(super) breaker: Breaker,
    /// Calls it takes at once, learned from its refusals.
    pub(super) limit: ConcurrencyLimit,
    pub(super) outstanding: AtomicUsize,
    pub(super) healthy: AtomicBool,
}

impl Endpoint {
    /// The in-process answerer takes what the hub allows (its stream limit
    /// is set to it); a bridge's limit is learned, from [`limit::INITIAL`].
    pub(super) fn new(url: String, client: NlpClient, breaker: BreakerConfig, max_concurrent: usize) -> Self {
        let initial = if client.is_remote() { limit::INITIAL } else { max_concurrent };
        let endpoint = Self {
            name: crate::redact::display_url(&url).into_owned(),
            url,
            client,
            breaker: Breaker::new(breaker),
            limit: ConcurrencyLimit::new(initial, max_concurrent),
            outstanding: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
        };
        endpoint.set_limit_gauge(endpoint.limit.current());
        endpoint
    }

    /// Whether it can take calls now: serving, and its breaker not open.
    pub(super) fn usable(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && self.breaker.state() != BreakerState::Open
    }

    /// `fengda_hub_nlp_endpoint_limit{endpoint}`: calls the endpoint takes at once, as learned.
    pub(super) fn set_limit_gauge(&self, limit: usize) {
        metrics::gauge!(crate::metric::NLP_ENDPOINT_LIMIT, "endpoint" => self.name.clone()).set(limit as f64);
    }

    /// `fengda_hub_nlp_breaker_state{endpoint}`: 0 closed, 1 open, 2 half-open.
    pub(super) fn set_breaker_gauge(&self, state: BreakerState) {
        let gauge = match state {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        };
        metrics::gauge!(crate::metric::NLP_BREAKER_STATE, "endpoint" => self.name.clone()).set(gauge);
    }
}

/// The endpoint a call goes to (see the module doc); `None` when every
/// breaker refuses. `tried`: the endpoints this question already failed on.
pub(super) fn pick(endpoints: &[Arc<Endpoint>], tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
    let now = Instant::now();
    let mut candidates: Vec<_> = endpoints.iter().collect();
    candidates.sort_by_key(|e| {
        let already_failed = tried.iter().any(|t| Arc::ptr_eq(t, e));
        let outstanding = e.outstanding.load(Ordering::Acquire);
        (already_failed, !e.healthy.load(Ordering::Acquire), outstanding >= e.limit.current(), outstanding)
    });
    let chosen = candidates.into_iter().find(|e| e.breaker.allow(now)).cloned()?;
    if chosen.breaker.state() == BreakerState::HalfOpen {
        chosen.set_breaker_gauge(BreakerState::HalfOpen);
    }
    Some(chosen)
}
