//! What happens after an attempt fails before its first chunk: what the
//! failure says about the endpoint ([`Failure`]), whether the question tries
//! again ([`retryable`]), after how long ([`RetryPolicy::backoff`]), and
//! when running out of the first-token deadline is the endpoint's fault
//! ([`charges_timeout`]).
//!
//! Retries happen only before the first chunk (a retry after text was shown
//! would garble the answer), on codes that can succeed on retry, with
//! exponential backoff and full jitter, bounded by the attempt count and by
//! the first-token deadline, which covers every attempt.

use std::time::Duration;

use tonic::{Code, Status};

/// What a failed attempt says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// `RESOURCE_EXHAUSTED` from the bridge itself: full, not broken. Its
    /// limit is cut and the question waits in line again.
    Full,
    /// A draining bridge's refusal ([`fengda_proto::DRAINING_HEADER`]):
    /// shutting down on purpose; the call goes elsewhere.
    Draining,
    /// The endpoint failed: charged to its breaker.
    Broken,
    /// Nothing about the endpoint's health: a request the bridge found
    /// malformed, or an upstream's rate limit for one tenant.
    NotItsFault,
}

impl Failure {
    pub(super) fn of(status: &Status) -> Self {
        if status.code() == Code::ResourceExhausted && !upstream_limited(status) {
            Self::Full
        } else if status.metadata().contains_key(fengda_proto::DRAINING_HEADER) {
            Self::Draining
        } else if counts_as_failure(status.code()) {
            Self::Broken
        } else {
            Self::NotItsFault
        }
    }

    /// Whether the endpoint's breaker hears of it (otherwise a half-open
    /// probe the attempt took is given back).
    pub(super) fn charged(self) -> bool {
        self == Self::Broken
    }
}

/// Whether another attempt may succeed. CANCELLED is never the hub's own
/// doing here (the hub cancels by dropping the call): it is the connection
/// closing under the request, e.g. a bridge that just died, so another
/// endpoint may answer. An upstream's rate limit for one tenant is retried
/// like a transient error (with backoff), not taken as the bridge being full.
pub(super) fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled) || upstream_limited(status)
}

/// The call failed in the transport (connect refused, connection reset),
/// not with a status the service sent: tonic keeps the transport error as
/// the status's source only then.
pub(super) fn never_reached(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Cancelled) && std::error::Error::source(status).is_some()
}

/// Whether an attempt that got no first chunk before the deadline is
/// charged to its endpoint's breaker. The deadline covers every attempt, so
/// a retry may start with only a sliver of it left: the deadline then ran
/// out because of the attempts before, and a healthy endpoint would be
/// charged for not answering in a few milliseconds. An attempt is charged
/// only if it had at least half of the first-token timeout to itself
/// (`window`: from sending it to the deadline); a healthy endpoint's first
/// chunk comes well within that, as the timeout is set for the slow tail.
pub(super) fn charges_timeout(window: Duration, first_chunk_timeout: Duration) -> bool {
    window >= first_chunk_timeout / 2
}

/// Attempts and backoff (`nlp.retry_*`).
#[derive(Debug)]
pub(super) struct RetryPolicy {
    /// Attempts per question before the first chunk (1 = no retry).
    pub(super) max_attempts: u32,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
}

impl RetryPolicy {
    /// Backoff before attempt `attempt + 1`: exponential, with full jitter.
    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let exponential = self.initial_backoff.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let cap = exponential.min(self.max_backoff);
        cap.mul_f64(fastrand::f64())
    }
}

/// A request the bridge found malformed says nothing about the endpoint's
/// health, and a full endpoint is not a broken one; everything else counts
/// (a bridge whose upstream key is wrong answers unauthenticated/permission
/// denied to every call: it should be skipped).
fn counts_as_failure(code: Code) -> bool {
    !matches!(code, Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted)
}

/// A `RESOURCE_EXHAUSTED` that is an upstream's rate limit for one tenant
/// ([`fengda_proto::UPSTREAM_LIMITED_HEADER`]), not the bridge being full:
/// it must not lower the bridge's limit for every tenant.
fn upstream_limited(status: &Status) -> bool {
    status.metadata().contains_key(fengda_proto::UPSTREAM_LIMITED_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_is_charged_only_to_an_attempt_that_had_half_the_deadline() {
        let timeout = Duration::from_millis(1500);
        assert!(charges_timeout(timeout, timeout));
        assert!(charges_timeout(Duration::from_millis(750), timeout));
        assert!(!charges_timeout(Duration::from_millis(749), timeout));
        assert!(!charges_timeout(Duration::from_millis(5), timeout));
    }

    #[test]
    fn failures_are_told_apart_by_code_and_marker() {
        let marked = |mut status: Status, header: &'static str| {
            status.metadata_mut().insert(header, tonic::metadata::MetadataValue::from_static("1"));
            status
        };
        assert_eq!(Failure::of(&Status::resource_exhausted("full")), Failure::Full);
        let limited = marked(Status::resource_exhausted("429"), fengda_proto::UPSTREAM_LIMITED_HEADER);
        assert_eq!(Failure::of(&limited), Failure::NotItsFault);
        assert!(retryable(&limited));
        let draining = marked(Status::unavailable("bye"), fengda_proto::DRAINING_HEADER);
        assert_eq!(Failure::of(&draining), Failure::Draining);
        assert_eq!(Failure::of(&Status::unavailable("down")), Failure::Broken);
        assert_eq!(Failure::of(&Status::permission_denied("key")), Failure::Broken);
        assert!(!retryable(&Status::permission_denied("key")));
        assert_eq!(Failure::of(&Status::invalid_argument("bad")), Failure::NotItsFault);
    }
}
