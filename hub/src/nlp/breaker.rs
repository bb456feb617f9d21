//! A circuit breaker per NLP endpoint: closed, open, half-open.
//!
//! Closed: calls pass; the breaker opens after `consecutive_failures` failures
//! in a row, or when at least `failure_rate` of the last `window` calls
//! failed (once `window` calls were seen). Open: calls are refused (the
//! customer gets the fallback at once instead of waiting for a deadline)
//! until `open_for` has passed. Half-open: up to `half_open_probes` calls go
//! through; one success closes the breaker, one failure opens it again.
//!
//! An open breaker also lets a probe through early when the endpoint's
//! health check says it serves: when the check saw it come back
//! ([`Breaker::probe_now`]), and once per opening when a check made after
//! the breaker opened says serving ([`Breaker::serving_since`]), which
//! catches a restart quicker than the checks (a bridge restarted by its
//! supervisor within a second). An early probe that fails opens the
//! breaker for the whole `open_for`: an endpoint that says it serves but
//! fails every call is probed at the usual pace.
//!
//! The state sits behind a `std::sync::Mutex` held only for a few field
//! updates, never across an `.await`. Time is passed in, so the logic is
//! tested without sleeping.

use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::time::{Duration, Instant};

/// Breaker settings (see `nlp` in the config for defaults).
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub window: usize,
    pub open_for: Duration,
    pub half_open_probes: u32,
}

/// What an observer sees: exported as a gauge (0 closed, 1 open, 2 half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
enum Inner {
    Closed {
        recent: VecDeque<bool>,
        failures_in_a_row: u32,
    },
    Open {
        until: Instant,
        since: Instant,
        /// May still probe early once, on a health check made after `since`.
        early_probe: bool,
    },
    /// `since` bounds a probe that never reports (cancelled, dropped): after
    /// `open_for` a new round of probes is allowed, so the breaker cannot stick.
    HalfOpen {
        probes: u32,
        since: Instant,
    },
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, inner: Mutex::new(closed()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update replaces or edits the state in one step; a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to make a call now; false means "do not call, fall back".
    pub fn allow(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match &mut *inner {
            Inner::Closed { .. } => true,
            Inner::Open { until, .. } if now < *until => false,
            Inner::Open { .. } => {
                *inner = Inner::HalfOpen { probes: 1, since: now };
                true
            }
            Inner::HalfOpen { probes, since } if *since + self.config.open_for <= now => {
                (*probes, *since) = (1, now);
                true
            }
            Inner::HalfOpen { probes, .. } if *probes < self.config.half_open_probes => {
                *probes += 1;
                true
            }
            Inner::HalfOpen { .. } => false,
        }
    }

    /// The endpoint is known to be back (its health check says serving
    /// again): an open breaker lets a probe through now rather than after
    /// `open_for`. Returns whether it was open.
    pub fn probe_now(&self, now: Instant) -> bool {
        match &mut *self.lock() {
            Inner::Open { until, .. } if now < *until => {
                *until = now;
                true
            }
            _ => false,
        }
    }

    /// A health check made at `checked_at` says the endpoint serves: if the
    /// breaker opened before that check and has not probed early since it
    /// opened, a probe goes through now. Returns whether one was let through.
    pub fn serving_since(&self, checked_at: Instant, now: Instant) -> bool {
        match &mut *self.lock() {
            Inner::Open { until, since, early_probe } if *early_probe && *since < checked_at && now < *until => {
                (*until, *early_probe) = (now, false);
                true
            }
            _ => false,
        }
    }

    /// An allowed call ended without telling whether the endpoint works (it
    /// was full, draining, refused the request as malformed, or cancelled by
    /// the hub): a half-open probe it held is free again for the next call.
    pub fn release_probe(&self) {
        if let Inner::HalfOpen { probes, .. } = &mut *self.lock() {
            *probes = probes.saturating_sub(1);
        }
    }

    /// Records how an allowed call ended. Returns the new state when it changed.
    pub fn record(&self, success: bool, now: Instant) -> Option<BreakerState> {
        let mut inner = self.lock();
        let config = &self.config;
        match &mut *inner {
            Inner::Closed { recent, failures_in_a_row } => {
                recent.push_back(success);
                if recent.len() > config.window {
                    recent.pop_front();
                }
                *failures_in_a_row = if success { 0 } else { *failures_in_a_row + 1 };
                let failed = recent.iter().filter(|ok| !**ok).count();
                let rate_tripped =
                    recent.len() >= config.window && failed as f64 >= config.failure_rate * recent.len() as f64;
                if !success && (*failures_in_a_row >= config.consecutive_failures || rate_tripped) {
                    *inner = Inner::Open { until: now + config.open_for, since: now, early_probe: true };
                    return Some(BreakerState::Open);
                }
                None
            }
            // A late result from before the breaker opened changes nothing.
            Inner::Open { .. } => None,
            Inner::HalfOpen { .. } if success => {
                *inner = closed();
                Some(BreakerState::Closed)
            }
            // The probe failed: no early probe this time.
            Inner::HalfOpen { .. } => {
                *inner = Inner::Open { until: now + config.open_for, since: now, early_probe: false };
                Some(BreakerState::Open)
            }
        }
    }
}

fn closed() -> Inner {
    Inner::Closed { recent: VecDeque::new(), failures_in_a_row: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: 10,
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
        })
    }

    /// A breaker that three failures in a row opened at `t`.
    fn opened_at(t: Instant) -> Breaker {
        let b = breaker();
        for _ in 0..3 {
            b.record(false, t);
        }
        b
    }

    #[test]
    fn opens_after_consecutive_failures_and_refuses_calls() {
        let b = breaker();
        let t = Instant::now();
        assert_eq!(b.record(false, t), None);
        assert_eq!(b.record(false, t), None);
        assert_eq!(b.record(false, t), Some(BreakerState::Open));
        assert!(!b.allow(t + Duration::from_secs(29)));
    }

    #[test]
    fn a_success_resets_the_run_of_failures() {
        let b = breaker();
        let t = Instant::now();
        b.record(false, t);
        b.record(false, t);
        b.record(true, t);
        b.record(false, t);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn opens_on_the_failure_rate_over_the_window() {
        let b = breaker();
        let t = Instant::now();
        for i in 0..9 {
            b.record(i % 2 == 0, t);
        }
        assert_eq!(b.state(), BreakerState::Closed, "9 calls: the window is not full yet");
        assert_eq!(b.record(false, t), Some(BreakerState::Open), "5 of 10 failed");
    }

    #[test]
    fn half_open_lets_one_probe_through_then_closes_or_reopens() {
        let t = Instant::now();
        let b = opened_at(t);
        let later = t + Duration::from_secs(30);
        assert!(b.allow(later), "the probe");
        assert!(!b.allow(later), "only one probe at a time");
        assert_eq!(b.record(false, later), Some(BreakerState::Open));
        let later = later + Duration::from_secs(30);
        assert!(b.allow(later));
        assert_eq!(b.record(true, later), Some(BreakerState::Closed));
        assert!(b.allow(later));
    }

    #[test]
    fn an_endpoint_seen_serving_again_gets_its_probe_at_once() {
        let b = breaker();
        let t = Instant::now();
        assert!(!b.probe_now(t), "closed: nothing to do");
        for _ in 0..3 {
            b.record(false, t);
        }
        let back = t + Duration::from_secs(2);
        assert!(!b.allow(back));
        assert!(b.probe_now(back));
        assert!(b.allow(back), "the probe, 28 s before open_for would allow it");
        assert!(!b.allow(back), "still one probe at a time");
        assert_eq!(b.record(true, back), Some(BreakerState::Closed));
    }

    #[test]
    fn a_health_check_made_after_the_opening_lets_one_early_probe_through() {
        let t = Instant::now();
        let b = opened_at(t);
        let (before, after, now) =
            (t - Duration::from_millis(10), t + Duration::from_millis(10), t + Duration::from_secs(1));
        assert!(!b.serving_since(before, now), "a check from before the failures proves nothing");
        assert!(!b.allow(now));
        assert!(b.serving_since(after, now), "serving since it opened: probe now");
        assert!(b.allow(now), "the probe, 29 s early");
        assert!(!b.serving_since(after, now), "half-open: nothing to do");
        assert_eq!(b.record(true, now), Some(BreakerState::Closed));
    }

    #[test]
    fn an_early_probe_that_fails_waits_the_whole_open_for() {
        let t = Instant::now();
        let b = opened_at(t);
        let now = t + Duration::from_secs(1);
        assert!(b.serving_since(now, now));
        assert!(b.allow(now));
        assert_eq!(b.record(false, now), Some(BreakerState::Open));
        let next_check = now + Duration::from_secs(2);
        assert!(!b.serving_since(next_check, next_check), "one early probe per opening from closed");
        assert!(!b.allow(next_check));
        assert!(b.allow(now + Duration::from_secs(30)), "then the usual probe");
    }

    #[test]
    fn a_probe_that_ends_without_a_verdict_is_given_back() {
        let t = Instant::now();
        let b = opened_at(t);
        let later = t + Duration::from_secs(30);
        assert!(b.allow(later), "the probe");
        assert!(!b.allow(later));
        b.release_probe();
        assert!(b.allow(later), "the next call probes at once, not open_for later");
        b.release_probe();
        b.release_probe();
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn a_probe_that_never_reports_does_not_block_the_breaker_forever() {
        let t = Instant::now();
        let b = opened_at(t);
        let probe_time = t + Duration::from_secs(30);
        assert!(b.allow(probe_time), "the probe, which is then cancelled and never recorded");
        assert!(!b.allow(probe_time + Duration::from_secs(1)));
        assert!(b.allow(probe_time + Duration::from_secs(30)), "a new probe after open_for");
    }
}
