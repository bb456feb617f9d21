//! The NLP side of the hub: endpoints, circuit breakers, retries, admission.
//!
//! [`NlpPool`] holds one [`client::NlpClient`] per configured bridge
//! endpoint. Starting an answer ([`NlpPool::start`]):
//! 1. **Admission** ([`admission`]): at most `max_concurrent` calls run per
//!    node, fewer while the endpoints take fewer (the sum of their learned
//!    limits, [`limit`]); up to `max_queued` more wait, in a per-tenant fair
//!    queue, for at most `max_queue_wait`; beyond that the caller gets the
//!    fallback at once, never a pile-up. The first-token deadline starts once admitted.
//! 2. **Endpoint choice** ([`endpoint`]): healthy endpoints (per the gRPC
//!    health checks of [`run_health_checks`]) whose breaker allows a call,
//!    those below their limit first, then least outstanding calls. All
//!    breakers open: [`StartError::AllOpen`] at once.
//! 3. **Backpressure**: an endpoint that answers `RESOURCE_EXHAUSTED` is
//!    full, not broken. Its limit is cut, the question gives its slot back
//!    and waits again at the front of its tenant's line (with `queued`
//!    frames), until a slot frees up or `max_queue_wait` (counted from the
//!    first entry) has passed. This never counts against the breaker.
//! 4. **Retries**: only before the first token (a retry after a token was
//!    shown would garble the answer), only on codes that can succeed on retry
//!    (unavailable, deadline exceeded, cancelled), with exponential backoff
//!    and full jitter, bounded by `retry_max_attempts` and by the first-token
//!    deadline, which starts once admitted and covers every attempt. A
//!    draining bridge's refusal ([`fengda_proto::DRAINING_HEADER`]) marks it
//!    not serving and moves the call elsewhere without counting as a failure
//!    ([`retry`]).
//!
//! Each finished call feeds its endpoint's [`breaker::Breaker`], which is
//! for endpoints that are broken (unavailable, timing out, erroring), and
//! its [`limit::ConcurrencyLimit`]. A health check that sees an endpoint
//! serving again lets a probe through its open breaker at once. Counters,
//! breaker states and limits are exported as metrics (`fengda_hub_nlp_*`).

pub mod admission;
pub mod breaker;
mod call;
mod client;
mod endpoint;
mod health;
pub mod limit;
mod retry;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest};
use futures::StreamExt;
use tokio::time::Instant;
use tonic::Status;
use tracing::{debug, info, warn};

pub use call::ActiveCall;
use call::{Outstanding, StartTimes};
pub use client::{AnswerStream, NlpClient, NlpError};
pub use endpoint::Endpoint;
pub use health::run_health_checks;

use crate::config::NlpConfig;
use crate::ids::TenantId;
use admission::{Admission, Permit, Refused};
use breaker::BreakerConfig;
use limit::Round;
use retry::{Failure, RetryPolicy};

#[derive(Debug)]
pub struct NlpPool {
    endpoints: Vec<Arc<Endpoint>>,
    admission: Arc<Admission>,
    max_concurrent: usize,
    /// Wakes the health checks when a call found an endpoint unreachable or
    /// draining, so they see it come back without waiting a whole interval.
    recheck: tokio::sync::Notify,
    /// Held while the admission capacity is worked out and set, so two
    /// tasks' updates cannot land in the wrong order.
    capacity_update: std::sync::Mutex<()>,
    max_queue_wait: Duration,
    first_chunk_timeout: Duration,
    token_gap_timeout: Duration,
    reply_timeout: Duration,
    retry: RetryPolicy,
    /// `NLP_CALLS` by outcome, registered once (every call ends in one).
    calls_ok: metrics::Counter,
    calls_failed: metrics::Counter,
}

/// Why no answer stream could be started; every case gets the fallback.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("too many NLP calls in flight and waiting on this node")]
    Overloaded,
    #[error("waited too long for an NLP slot")]
    QueueTimeout,
    #[error("every NLP endpoint's circuit breaker is open")]
    AllOpen,
    #[error("no first token within the deadline")]
    Deadline,
    #[error("NLP call failed: {0}")]
    Failed(Status),
}

impl StartError {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Overloaded => "overloaded",
            Self::QueueTimeout => "queue_timeout",
            Self::AllOpen => "breaker_open",
            Self::Deadline => "deadline",
            Self::Failed(_) => "error",
        }
    }
}

/// Why a started stream did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("no token for {0:?}")]
    TokenGap(Duration),
    #[error("the stream failed: {0}")]
    Failed(Status),
    #[error("the stream ended without a finish chunk")]
    Truncated,
}

/// One question's way to its first chunk: its slot, and the attempts so far.
struct Attempts {
    permit: Permit,
    /// Since the question first waited; bounds every wait in line.
    give_up: Instant,
    queue_wait: Duration,
    admitted: Instant,
    /// The first-token deadline: counted from `admitted`, for every attempt.
    deadline: Instant,
    /// Attempts that count against `retry_max_attempts`.
    made: u32,
    /// Refusals as full (each puts the question back in line).
    refusals: u32,
    /// Endpoints this question failed on.
    tried: Vec<Arc<Endpoint>>,
}

impl NlpPool {
    /// A pool over `endpoints`: each a name for logs and metrics (the URL of
    /// a bridge) and its client.
    pub fn new(endpoints: Vec<(String, NlpClient)>, config: &NlpConfig) -> Self {
        let breaker = BreakerConfig {
            consecutive_failures: config.breaker_consecutive_failures,
            failure_rate: config.breaker_failure_rate,
            window: config.breaker_window,
            open_for: Duration::from_millis(config.breaker_open_ms),
            half_open_probes: config.breaker_half_open_probes,
        };
        let endpoints = endpoints
            .into_iter()
            .map(|(url, client)| Arc::new(Endpoint::new(url, client, breaker.clone(), config.max_concurrent)))
            .collect();
        let pool = Self {
            endpoints,
            admission: Admission::new(config.max_concurrent, config.per_tenant_limit(), config.max_queued),
            max_concurrent: config.max_concurrent,
            recheck: tokio::sync::Notify::new(),
            capacity_update: std::sync::Mutex::new(()),
            max_queue_wait: Duration::from_millis(config.max_queue_wait_ms),
            first_chunk_timeout: Duration::from_millis(config.first_chunk_timeout_ms),
            token_gap_timeout: Duration::from_millis(config.token_gap_timeout_ms),
            reply_timeout: Duration::from_millis(config.reply_timeout_ms),
            retry: RetryPolicy {
                max_attempts: config.retry_max_attempts,
                initial_backoff: Duration::from_millis(config.retry_initial_backoff_ms),
                max_backoff: Duration::from_millis(config.retry_max_backoff_ms),
            },
            calls_ok: metrics::counter!(crate::metric::NLP_CALLS, "outcome" => "ok"),
            calls_failed: metrics::counter!(crate::metric::NLP_CALLS, "outcome" => "failed"),
        };
        pool.update_capacity();
        pool
    }

    /// Each tenant's cap on its calls in flight (`tenants.*.nlp_max_concurrent`).
    pub fn set_tenant_caps(&self, caps: admission::TenantCaps) {
        self.admission.set_tenant_caps(caps);
    }

    /// The node's admission capacity follows the endpoints: the sum of the
    /// limits of those that can take calls now (serving, breaker not open),
    /// or of all of them when none can (a question then fails fast with the
    /// fallback instead of waiting for a slot nobody will free).
    fn update_capacity(&self) {
        // Never held across an await; a poisoned lock guards no data.
        let _ordered = self.capacity_update.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let sum = |usable_only: bool| -> usize {
            self.endpoints.iter().filter(|e| !usable_only || e.usable()).map(|e| e.limit.current()).sum()
        };
        let capacity = match sum(true) {
            0 => sum(false),
            n => n,
        }
        .min(self.max_concurrent);
        if capacity != self.admission.capacity() {
            self.admission.set_capacity(capacity);
        }
        metrics::gauge!(crate::metric::NLP_CAPACITY).set(capacity as f64);
    }

    /// A call found the endpoint not serving (draining, unreachable): calls
    /// avoid it, and the health checks look again at once to see it back.
    fn mark_unhealthy(&self, endpoint: &Endpoint, why: &'static str) {
        if endpoint.healthy.swap(false, Ordering::AcqRel) {
            info!(endpoint = %endpoint.name, "{why}");
            self.update_capacity();
            self.recheck.notify_one();
        }
    }

    /// An endpoint refused a call sent in `round` as full.
    fn overloaded(&self, endpoint: &Endpoint, round: Round, advertised: Option<usize>) {
        metrics::counter!(crate::metric::NLP_OVERLOADED, "endpoint" => endpoint.name.clone()).increment(1);
        // The cut first: it ends slow start, so the advertised limit can
        // then only bound the limit, never raise it on a refusal.
        let cut = endpoint.limit.overloaded(round);
        let bounded = advertised.and_then(|n| endpoint.limit.advertised(n));
        if let Some(limit) = bounded.or(cut) {
            debug!(endpoint = %endpoint.name, limit, "NLP endpoint full; limit lowered");
            endpoint.set_limit_gauge(limit);
            self.update_capacity();
        }
    }

    /// Records how a call ended: the breaker, and the limit on success.
    fn record(&self, endpoint: &Endpoint, success: bool) {
        if success { &self.calls_ok } else { &self.calls_failed }.increment(1);
        let mut changed = false;
        if let Some(state) = endpoint.breaker.record(success, Instant::now()) {
            warn!(endpoint = %endpoint.name, ?state, "NLP circuit breaker changed state");
            endpoint.set_breaker_gauge(state);
            changed = true;
        }
        if success && let Some(limit) = endpoint.limit.succeeded(endpoint.outstanding.load(Ordering::Acquire)) {
            endpoint.set_limit_gauge(limit);
            changed = true;
        }
        if changed {
            self.update_capacity();
        }
    }

    /// Starts an answer stream and waits for its first chunk (see the module
    /// doc). While the question waits for a slot, `on_queued` hears its place
    /// in line each time it changes.
    pub async fn start(
        self: &Arc<Self>,
        tenant: &TenantId,
        request: &AnswerRequest,
        on_queued: &mut (dyn FnMut(usize) + Send),
    ) -> Result<ActiveCall, StartError> {
        let entered = Instant::now();
        let give_up = entered + self.max_queue_wait;
        let permit = self.admit(tenant, false, give_up, on_queued).await?;
        let admitted = Instant::now();
        let mut attempts = Attempts {
            permit,
            give_up,
            queue_wait: admitted - entered,
            admitted,
            deadline: admitted + self.first_chunk_timeout,
            made: 0,
            refusals: 0,
            tried: Vec::new(),
        };
        loop {
            attempts.made += 1;
            let endpoint = endpoint::pick(&self.endpoints, &attempts.tried).ok_or(StartError::AllOpen)?;
            let round = endpoint.limit.round();
            let outstanding = Outstanding::new(endpoint.clone());
            let sent_at = Instant::now();
            let status = match tokio::time::timeout_at(attempts.deadline, first_chunk(&endpoint, request)).await {
                Ok(Ok(started)) => {
                    metrics::histogram!(crate::metric::NLP_FIRST_TOKEN).record(sent_at.elapsed().as_secs_f64());
                    let times = StartTimes { queue_wait: attempts.queue_wait, admitted: attempts.admitted, sent_at };
                    return Ok(ActiveCall::started(self.clone(), outstanding, attempts.permit, started, times));
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    // Charged only if this attempt had a fair share of the deadline.
                    match retry::charges_timeout(attempts.deadline - sent_at, self.first_chunk_timeout) {
                        true => self.record(&endpoint, false),
                        false => endpoint.breaker.release_probe(),
                    }
                    return Err(StartError::Deadline);
                }
            };
            drop(outstanding);
            let failure = Failure::of(&status);
            if !failure.charged() {
                // Nothing reported to the breaker: a half-open probe it took is given back.
                endpoint.breaker.release_probe();
            }
            match failure {
                Failure::Full => {
                    self.overloaded(&endpoint, round, limit::advertised_streams(status.metadata()));
                    attempts = self.wait_again(tenant, attempts, on_queued).await?;
                    continue;
                }
                Failure::Draining => {
                    // Shutting down on purpose: skipped until its health check says serving.
                    self.mark_unhealthy(&endpoint, "NLP endpoint draining; sending calls elsewhere");
                    attempts.tried.push(endpoint.clone());
                    // Not an attempt: the call goes to another endpoint at once.
                    if attempts.tried.len() < self.endpoints.len() {
                        attempts.made -= 1;
                        continue;
                    }
                }
                Failure::Broken => {
                    // Not reached at all (refused, reset): a health observation
                    // too, so its next serving health check probes the breaker.
                    if retry::never_reached(&status) {
                        self.mark_unhealthy(&endpoint, "NLP endpoint unreachable");
                    }
                    self.record(&endpoint, false);
                    attempts.tried.push(endpoint.clone());
                }
                Failure::NotItsFault => attempts.tried.push(endpoint.clone()),
            }
            let backoff = self.retry.backoff(attempts.made);
            let in_time = Instant::now() + backoff < attempts.deadline;
            if !retry::retryable(&status) || attempts.made >= self.retry.max_attempts || !in_time {
                return Err(StartError::Failed(status));
            }
            metrics::counter!(crate::metric::NLP_RETRIES).increment(1);
            info!(attempt = attempts.made, backoff_ms = backoff.as_millis() as u64, code = ?status.code(), endpoint = %endpoint.name, "retrying the NLP call");
            tokio::time::sleep(backoff).await;
        }
    }

    /// The question's endpoint was full: it gives its slot back and, after
    /// a backoff, waits at the front of its tenant's line for another (until
    /// `give_up`); the first-token deadline starts again with the new slot.
    async fn wait_again(
        &self,
        tenant: &TenantId,
        attempts: Attempts,
        on_queued: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Attempts, StartError> {
        let Attempts { permit, give_up, queue_wait, made, refusals, tried, .. } = attempts;
        drop(permit);
        let refusals = refusals + 1;
        let backoff = self.retry.backoff(refusals);
        if Instant::now() + backoff >= give_up {
            return Err(StartError::QueueTimeout);
        }
        tokio::time::sleep(backoff).await;
        let waiting_since = Instant::now();
        let permit = self.admit(tenant, true, give_up, on_queued).await?;
        let admitted = Instant::now();
        Ok(Attempts {
            permit,
            give_up,
            queue_wait: queue_wait + (admitted - waiting_since),
            admitted,
            deadline: admitted + self.first_chunk_timeout,
            // Not an attempt: the endpoint never looked at the question.
            made: made - 1,
            refusals,
            tried,
        })
    }

    /// A running slot, waiting in the tenant's line (until `give_up`) if
    /// needed; `again`: at the front, for a question that lost its slot.
    async fn admit(
        &self,
        tenant: &TenantId,
        again: bool,
        give_up: Instant,
        on_queued: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Permit, StartError> {
        self.admission.slot(tenant, again, give_up, on_queued).await.map_err(|refused| match refused {
            Refused::Full => StartError::Overloaded,
            Refused::TimedOut => StartError::QueueTimeout,
        })
    }
}

/// Sends the call and waits for its first chunk.
async fn first_chunk(endpoint: &Endpoint, request: &AnswerRequest) -> Result<(AnswerStream, AnswerChunk), Status> {
    let mut stream = endpoint.client.answer(request.clone()).await.map_err(status_of)?;
    match stream.next().await.transpose()? {
        Some(first) => Ok((stream, first)),
        None => Err(Status::unavailable("stream ended before its first chunk")),
    }
}

fn status_of(error: NlpError) -> Status {
    match error {
        NlpError::Call(status) => status,
        other => Status::unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests;
