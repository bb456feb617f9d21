//! The NLP side of the hub: endpoints, circuit breakers, retries, admission.
//!
//! [`NlpPool`] holds one [`client::NlpClient`] per configured bridge
//! endpoint. Starting an answer ([`NlpPool::start`]):
//! 1. **Admission** ([`admission`]): at most `max_concurrent` calls run per
//!    node, fewer while the endpoints take fewer (the sum of their learned
//!    limits, [`limit`]); up to `max_queued` more wait, in a per-tenant fair
//!    queue, for at most `max_queue_wait`; beyond that the caller gets the
//!    fallback at once, never a pile-up. The first-token deadline starts once admitted.
//! 2. **Endpoint choice**: healthy endpoints (per the gRPC health checks of
//!    [`run_health_checks`]) whose breaker allows a call, those below their
//!    limit first, then least outstanding calls. All breakers open:
//!    [`StartError::AllOpen`] at once.
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
//!    not serving and moves the call elsewhere without counting as a failure.
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
mod health;
pub mod limit;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fengda_proto::nlp::v1::AnswerRequest;
use futures::StreamExt;
use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

pub use call::ActiveCall;
use call::Outstanding;
pub use client::{AnswerStream, NlpClient, NlpError};
pub use health::run_health_checks;

use crate::config::NlpConfig;
use crate::ids::TenantId;
use admission::{Admission, Entry, Permit, QueueFull};
use breaker::{Breaker, BreakerConfig, BreakerState};
use limit::{ConcurrencyLimit, Round};

/// How often a waiting question re-reads its place in line; a `queued`
/// frame goes out only when the place changed.
const QUEUED_UPDATE_INTERVAL: Duration = Duration::from_secs(1);

/// One bridge endpoint and what the hub knows about it.
#[derive(Debug)]
pub struct Endpoint {
    /// Where the client connects (may carry credentials: never shown).
    url: String,
    /// How logs and metric labels name it: the URL without credentials
    /// ([`crate::redact::display_url`]).
    pub name: String,
    client: NlpClient,
    breaker: Breaker,
    /// Calls it takes at once, learned from its refusals.
    limit: ConcurrencyLimit,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
}

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
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
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
            .map(|(url, client)| {
                // The in-process answerer takes what the hub allows (its
                // stream limit is set to it); a bridge's limit is learned.
                let initial = if client.is_remote() { limit::INITIAL } else { config.max_concurrent };
                Arc::new(Endpoint {
                    name: crate::redact::display_url(&url).into_owned(),
                    url,
                    client,
                    breaker: Breaker::new(breaker.clone()),
                    limit: ConcurrencyLimit::new(initial, config.max_concurrent),
                    outstanding: AtomicUsize::new(0),
                    healthy: AtomicBool::new(true),
                })
            })
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
            max_attempts: config.retry_max_attempts,
            initial_backoff: Duration::from_millis(config.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(config.retry_max_backoff_ms),
        };
        for endpoint in &pool.endpoints {
            set_limit_gauge(endpoint, endpoint.limit.current());
        }
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
        let usable = |e: &&Arc<Endpoint>| e.healthy.load(Ordering::Acquire) && e.breaker.state() != BreakerState::Open;
        let sum = |usable_only: bool| -> usize {
            self.endpoints.iter().filter(|e| !usable_only || usable(e)).map(|e| e.limit.current()).sum()
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
            set_limit_gauge(endpoint, limit);
            self.update_capacity();
        }
    }

    /// Records how a call ended: the breaker, and the limit on success.
    fn record(&self, endpoint: &Endpoint, success: bool) {
        let outcome = if success { "ok" } else { "failed" };
        metrics::counter!(crate::metric::NLP_CALLS, "outcome" => outcome).increment(1);
        let mut changed = false;
        if let Some(state) = endpoint.breaker.record(success, Instant::now()) {
            warn!(endpoint = %endpoint.name, ?state, "NLP circuit breaker changed state");
            set_breaker_gauge(endpoint, state);
            changed = true;
        }
        if success && let Some(limit) = endpoint.limit.succeeded(endpoint.outstanding.load(Ordering::Acquire)) {
            set_limit_gauge(endpoint, limit);
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
        let mut permit = self.admit(tenant, false, give_up, on_queued).await?;
        let mut admitted = Instant::now();
        let mut queue_wait = admitted - entered;
        let mut deadline = admitted + self.first_chunk_timeout;
        let mut attempt = 0;
        let mut refusals = 0;
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        loop {
            attempt += 1;
            let endpoint = self.pick(&tried).ok_or(StartError::AllOpen)?;
            let round = endpoint.limit.round();
            let outstanding = Outstanding::new(endpoint.clone());
            let sent_at = Instant::now();
            let first = tokio::time::timeout_at(deadline, async {
                let mut stream = endpoint.client.answer(request.clone()).await.map_err(status_of)?;
                let first = stream.next().await.transpose()?;
                Ok::<_, Status>((stream, first))
            })
            .await;
            let status = match first {
                Ok(Ok((stream, Some(first)))) => {
                    metrics::histogram!(crate::metric::NLP_FIRST_TOKEN).record(sent_at.elapsed().as_secs_f64());
                    return Ok(ActiveCall {
                        pool: self.clone(),
                        reported: false,
                        queue_wait,
                        first_token: admitted.elapsed(),
                        stream,
                        first: Some(first),
                        token_gap: self.token_gap_timeout,
                        last_chunk: Instant::now(),
                        reply_deadline: sent_at + self.reply_timeout,
                        gap_timer: Box::pin(tokio::time::sleep_until(
                            (Instant::now() + self.token_gap_timeout).min(sent_at + self.reply_timeout),
                        )),
                        outstanding,
                        _permit: permit,
                    });
                }
                Ok(Ok((_, None))) => Status::unavailable("stream ended before its first chunk"),
                Ok(Err(status)) => status,
                Err(_) => {
                    self.record(&endpoint, false);
                    return Err(StartError::Deadline);
                }
            };
            // A call that ends here reports nothing to the breaker: a
            // half-open probe it took is given back.
            let reports_to_breaker = status.code() != Code::ResourceExhausted
                && !status.metadata().contains_key(fengda_proto::DRAINING_HEADER)
                && counts_as_failure(status.code());
            if !reports_to_breaker {
                endpoint.breaker.release_probe();
            }
            if status.code() == Code::ResourceExhausted && !upstream_limited(&status) {
                // Full, not broken: give the slot back and wait in line again.
                self.overloaded(&endpoint, round, advertised_streams(status.metadata()));
                drop((outstanding, permit));
                attempt -= 1;
                refusals += 1;
                let backoff = self.backoff(refusals);
                if Instant::now() + backoff >= give_up {
                    return Err(StartError::QueueTimeout);
                }
                tokio::time::sleep(backoff).await;
                let waiting_since = Instant::now();
                permit = self.admit(tenant, true, give_up, on_queued).await?;
                admitted = Instant::now();
                queue_wait += admitted - waiting_since;
                deadline = admitted + self.first_chunk_timeout;
                continue;
            }
            tried.push(endpoint.clone());
            if status.metadata().contains_key(fengda_proto::DRAINING_HEADER) {
                // Shutting down on purpose: skipped until its health check says serving.
                self.mark_unhealthy(&endpoint, "NLP endpoint draining; sending calls elsewhere");
                // Not an attempt: the call goes to another endpoint at once.
                if tried.len() < self.endpoints.len() {
                    attempt -= 1;
                    drop(outstanding);
                    continue;
                }
            } else if reports_to_breaker {
                // Not reached at all (refused, reset): a health observation
                // too, so its next serving health check probes the breaker.
                if never_reached(&status) {
                    self.mark_unhealthy(&endpoint, "NLP endpoint unreachable");
                }
                self.record(&endpoint, false);
            }
            let backoff = self.backoff(attempt);
            // CANCELLED is never the hub's own doing here (the hub cancels by
            // dropping the call): it is the connection closing under the
            // request, e.g. a bridge that just died, so another endpoint may answer.
            // An upstream's rate limit for one tenant is retried like a
            // transient error (with backoff), not taken as the bridge being full.
            let retryable = matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
                || upstream_limited(&status);
            if !retryable || attempt >= self.max_attempts || Instant::now() + backoff >= deadline {
                return Err(StartError::Failed(status));
            }
            metrics::counter!(crate::metric::NLP_RETRIES).increment(1);
            info!(attempt, backoff_ms = backoff.as_millis() as u64, code = ?status.code(), endpoint = %endpoint.name, "retrying the NLP call");
            drop(outstanding);
            tokio::time::sleep(backoff).await;
        }
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
        let entry = if again { self.admission.reenter(tenant) } else { self.admission.enter(tenant) };
        let mut ticket = match entry {
            Ok(Entry::Running(permit)) => return Ok(permit),
            Ok(Entry::Waiting(ticket)) => ticket,
            Err(QueueFull) => return Err(StartError::Overloaded),
        };
        let queued_at = Instant::now();
        let _record_wait = RecordOnDrop(queued_at, crate::metric::NLP_QUEUE_WAIT);
        let mut told = ticket.position();
        // 0: admitted (or shed) in the meantime; no `queued` frame then.
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
                        Err(_) => Err(StartError::Overloaded),
                    };
                }
                _ = recheck.tick() => {
                    let position = ticket.position();
                    if position != told && position != 0 {
                        told = position;
                        on_queued(position);
                    }
                }
                () = &mut give_up => return Err(StartError::QueueTimeout),
            }
        }
    }

    /// The healthy endpoint below its limit with the fewest calls whose
    /// breaker allows one; endpoints this question already failed on,
    /// unhealthy ones and full ones only when no other will take the call.
    fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let mut candidates: Vec<_> = self.endpoints.iter().collect();
        candidates.sort_by_key(|e| {
            let already_failed = tried.iter().any(|t| Arc::ptr_eq(t, e));
            let outstanding = e.outstanding.load(Ordering::Acquire);
            (already_failed, !e.healthy.load(Ordering::Acquire), outstanding >= e.limit.current(), outstanding)
        });
        let chosen = candidates.into_iter().find(|e| e.breaker.allow(now)).cloned()?;
        if chosen.breaker.state() == BreakerState::HalfOpen {
            set_breaker_gauge(&chosen, BreakerState::HalfOpen);
        }
        Some(chosen)
    }

    /// Exponential backoff with full jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let exponential = self.initial_backoff.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let cap = exponential.min(self.max_backoff);
        cap.mul_f64(fastrand::f64())
    }
}

/// Records how long something took into a histogram when dropped.
struct RecordOnDrop(Instant, &'static str);

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        metrics::histogram!(self.1).record(self.0.elapsed().as_secs_f64());
    }
}

/// `fengda_hub_nlp_endpoint_limit{endpoint}`: calls the endpoint takes at once, as learned.
fn set_limit_gauge(endpoint: &Endpoint, limit: usize) {
    metrics::gauge!(crate::metric::NLP_ENDPOINT_LIMIT, "endpoint" => endpoint.name.clone()).set(limit as f64);
}

/// The stream limit a bridge advertises in its response metadata.
fn advertised_streams(metadata: &tonic::metadata::MetadataMap) -> Option<usize> {
    metadata.get(fengda_proto::MAX_STREAMS_HEADER)?.to_str().ok()?.parse().ok().filter(|n| *n > 0)
}

/// `fengda_hub_nlp_breaker_state{endpoint}`: 0 closed, 1 open, 2 half-open.
fn set_breaker_gauge(endpoint: &Endpoint, state: BreakerState) {
    let gauge = match state {
        BreakerState::Closed => 0.0,
        BreakerState::Open => 1.0,
        BreakerState::HalfOpen => 2.0,
    };
    metrics::gauge!(crate::metric::NLP_BREAKER_STATE, "endpoint" => endpoint.name.clone()).set(gauge);
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

/// The call failed in the transport (connect refused, connection reset),
/// not with a status the service sent: tonic keeps the transport error as
/// the status's source only then.
fn never_reached(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Cancelled) && std::error::Error::source(status).is_some()
}

fn status_of(error: NlpError) -> Status {
    match error {
        NlpError::Call(status) => status,
        other => Status::unavailable(other.to_string()),
    }
}
