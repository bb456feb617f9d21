//! How many calls one NLP endpoint takes at once, learned from the endpoint.
//!
//! A bridge that is full answers `RESOURCE_EXHAUSTED`. That is backpressure,
//! not breakage: the hub lowers the endpoint's limit and the question waits
//! in the admission queue (see [`super::NlpPool`]). The limit is an
//! additive-increase / multiplicative-decrease window, as in TCP congestion
//! control:
//! - **slow start**: until the first overload, every success while the limit
//!   is in use raises it by one (it doubles per round of calls);
//! - **additive increase**: after that, a success while the limit is in use
//!   raises it by `1 / limit` (by one per round of calls);
//! - **multiplicative decrease**: an overload cuts it to [`DECREASE`] times
//!   itself, once per round: a refusal of a call sent before the last cut
//!   says nothing new (those calls were sent under the old limit).
//!
//! The limit stays within `1..=ceiling`, where the ceiling is the hub's
//! `nlp.max_concurrent` or, when the bridge advertises its own stream limit
//! (the `fengda-max-streams` response header, see [`fengda_proto::MAX_STREAMS_HEADER`]),
//! that, if lower. A fresh hub that learns a bridge's limit before any
//! overload starts right at it. Several hub nodes sharing a bridge each see
//! the bridge's refusals, so together they settle within its capacity.
//!
//! The state sits behind a std `Mutex` held for a few arithmetic steps.

use std::sync::Mutex;

/// The factor an overload cuts the limit by.
pub const DECREASE: f64 = 0.9;
/// Where a limit starts before the endpoint told its own (and is below it).
pub const INITIAL: usize = 64;

#[derive(Debug)]
pub struct ConcurrencyLimit {
    /// The hub's own bound (`nlp.max_concurrent`).
    max: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limit: f64,
    /// The endpoint's advertised stream limit, if it told one.
    advertised: Option<usize>,
    /// False once the endpoint was first overloaded.
    slow_start: bool,
    /// Counts cuts; a call remembers the round it was sent in.
    round: u64,
}

/// The round a call was sent in, to tell a fresh refusal from a stale one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round(u64);

impl ConcurrencyLimit {
    /// A limit starting at `initial`, never above `max` (both at least 1).
    pub fn new(initial: usize, max: usize) -> Self {
        let max = max.max(1);
        let state = State { limit: initial.clamp(1, max) as f64, advertised: None, slow_start: true, round: 0 };
        Self { max, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a few assignments; a poisoned lock still holds a usable limit.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ceiling(&self, state: &State) -> usize {
        state.advertised.map_or(self.max, |advertised| advertised.clamp(1, self.max))
    }

    /// Calls the endpoint may have in flight now.
    pub fn current(&self) -> usize {
        let state = self.lock();
        (state.limit as usize).clamp(1, self.ceiling(&state))
    }

    /// The round a call sent now belongs to.
    pub fn round(&self) -> Round {
        Round(self.lock().round)
    }

    /// A call succeeded with `in_flight` calls outstanding (itself included).
    /// Returns the new limit if it changed.
    pub fn succeeded(&self, in_flight: usize) -> Option<usize> {
        let mut state = self.lock();
        let before = (state.limit as usize).clamp(1, self.ceiling(&state));
        // Only a limit in use has proven itself; an idle one must not grow without bound.
        if (in_flight as f64) * 2.0 < state.limit {
            return None;
        }
        let step = if state.slow_start { 1.0 } else { 1.0 / state.limit };
        state.limit = (state.limit + step).min(self.ceiling(&state) as f64);
        let after = (state.limit as usize).clamp(1, self.ceiling(&state));
        (after != before).then_some(after)
    }

    /// The endpoint refused a call sent in `sent` as overloaded. Returns the
    /// new limit if it changed.
    pub fn overloaded(&self, sent: Round) -> Option<usize> {
        let mut state = self.lock();
        state.slow_start = false;
        if sent.0 != state.round {
            return None;
        }
        state.round += 1;
        let before = (state.limit as usize).clamp(1, self.ceiling(&state));
        state.limit = (state.limit * DECREASE).max(1.0);
        let after = (state.limit as usize).clamp(1, self.ceiling(&state));
        (after != before).then_some(after)
    }

    /// The endpoint says it takes at most `streams` calls at once. Before
    /// any overload the limit jumps to it (a fresh hub starts right);
    /// afterwards it only bounds the limit. Returns the new limit if it changed.
    pub fn advertised(&self, streams: usize) -> Option<usize> {
        let mut state = self.lock();
        let before = (state.limit as usize).clamp(1, self.ceiling(&state));
        state.advertised = Some(streams);
        let ceiling = self.ceiling(&state) as f64;
        state.limit = if state.slow_start { ceiling } else { state.limit.min(ceiling) };
        let after = (state.limit as usize).clamp(1, self.ceiling(&state));
        (after != before).then_some(after)
    }
}

/// The stream limit a bridge advertises in its response metadata
/// ([`fengda_proto::MAX_STREAMS_HEADER`]).
pub fn advertised_streams(metadata: &tonic::metadata::MetadataMap) -> Option<usize> {
    metadata.get(fengda_proto::MAX_STREAMS_HEADER)?.to_str().ok()?.parse().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_doubles_per_round_until_the_first_overload() {
        let limit = ConcurrencyLimit::new(4, 100);
        for _ in 0..4 {
            limit.succeeded(4);
        }
        assert_eq!(limit.current(), 8);
        let round = limit.round();
        assert_eq!(limit.overloaded(round), Some(7), "8 * 0.9");
        // Additive now: one round of 7 successes adds one.
        for _ in 0..7 {
            limit.succeeded(7);
        }
        assert_eq!(limit.current(), 8);
    }

    #[test]
    fn refusals_of_calls_sent_before_a_cut_cut_only_once() {
        let limit = ConcurrencyLimit::new(50, 100);
        let round = limit.round();
        assert_eq!(limit.overloaded(round), Some(45));
        for _ in 0..20 {
            assert_eq!(limit.overloaded(round), None, "stale refusals change nothing");
        }
        assert_eq!(limit.overloaded(limit.round()), Some(40), "a refusal of a call sent after the cut cuts again");
    }

    #[test]
    fn the_limit_stays_between_one_and_the_ceiling() {
        let limit = ConcurrencyLimit::new(2, 3);
        for _ in 0..50 {
            limit.overloaded(limit.round());
        }
        assert_eq!(limit.current(), 1);
        for _ in 0..500 {
            limit.succeeded(3);
        }
        assert_eq!(limit.current(), 3, "never above nlp.max_concurrent");
    }

    #[test]
    fn an_idle_limit_does_not_grow() {
        let limit = ConcurrencyLimit::new(10, 100);
        for _ in 0..100 {
            assert_eq!(limit.succeeded(1), None);
        }
        assert_eq!(limit.current(), 10);
    }

    #[test]
    fn an_advertised_limit_is_the_start_before_any_overload_and_a_ceiling_after() {
        let limit = ConcurrencyLimit::new(INITIAL, 512);
        assert_eq!(limit.advertised(256), Some(256), "a fresh hub starts at the bridge's limit");
        assert_eq!(limit.advertised(1000), Some(512), "never above the hub's own bound");
        assert_eq!(limit.advertised(256), Some(256));
        limit.overloaded(limit.round());
        assert_eq!(limit.current(), 230);
        assert_eq!(limit.advertised(256), None, "after an overload it only bounds the limit");
        assert_eq!(limit.advertised(100), Some(100));
    }
}
