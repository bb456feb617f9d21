//! The NLP side of the hub: endpoints, circuit breakers, retries, admission.
//!
//! [`NlpPool`] holds one [`client::NlpClient`] per configured bridge
//! endpoint. Starting an answer ([`NlpPool::start`]):
//! 1. **Admission** ([`admission`]): at most `max_concurrent` calls run per
//!    node; up to `max_queued` more wait, in a per-tenant fair queue, for at
//!    most `max_queue_wait`; beyond that the caller gets the fallback at once,
//!    never a pile-up. The first-token deadline starts once admitted.
//! 2. **Endpoint choice**: healthy endpoints (per the gRPC health checks of
//!    [`run_health_checks`]) whose breaker allows a call, least outstanding
//!    calls first. All breakers open: [`StartError::AllOpen`] at once.
//! 3. **Retries**: only before the first token (a retry after a token was
//!    shown would garble the answer), only on codes that can succeed on retry
//!    (unavailable, deadline exceeded, resource exhausted), with exponential
//!    backoff and full jitter, bounded by `retry_max_attempts` and by the
//!    first-token deadline, which starts once admitted and covers every attempt.
//!
//! Each finished call feeds its endpoint's [`breaker::Breaker`]. Counters and
//! the breaker states are exported as metrics (`fengda_hub_nlp_*`).

pub mod admission;
pub mod breaker;
mod client;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{info, warn};

pub use client::{AnswerStream, NlpClient, NlpError};

use crate::config::NlpConfig;
use crate::ids::TenantId;
use admission::{Admission, Entry, Permit, QueueFull};
use breaker::{Breaker, BreakerConfig, BreakerState};

/// How often endpoints' gRPC health is checked.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often a waiting question re-reads its place in line; a `queued`
/// frame goes out only when the place changed.
const QUEUED_UPDATE_INTERVAL: Duration = Duration::from_secs(1);

/// One bridge endpoint and what the hub knows about it.
#[derive(Debug)]
pub struct Endpoint {
    pub url: String,
    client: NlpClient,
    breaker: Breaker,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
}

#[derive(Debug)]
pub struct NlpPool {
    endpoints: Vec<Arc<Endpoint>>,
    admission: Arc<Admission>,
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
                Arc::new(Endpoint {
                    url,
                    client,
                    breaker: Breaker::new(breaker.clone()),
                    outstanding: AtomicUsize::new(0),
                    healthy: AtomicBool::new(true),
                })
            })
            .collect();
        Self {
            endpoints,
            admission: Admission::new(config.max_concurrent, config.per_tenant_limit(), config.max_queued),
            max_queue_wait: Duration::from_millis(config.max_queue_wait_ms),
            first_chunk_timeout: Duration::from_millis(config.first_chunk_timeout_ms),
            token_gap_timeout: Duration::from_millis(config.token_gap_timeout_ms),
            reply_timeout: Duration::from_millis(config.reply_timeout_ms),
            max_attempts: config.retry_max_attempts,
            initial_backoff: Duration::from_millis(config.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(config.retry_max_backoff_ms),
        }
    }

    /// Starts an answer stream and waits for its first chunk (see the module
    /// doc). While the question waits for a slot, `on_queued` hears its place
    /// in line each time it changes.
    pub async fn start(
        &self,
        tenant: &TenantId,
        request: &AnswerRequest,
        on_queued: &mut (dyn FnMut(usize) + Send),
    ) -> Result<ActiveCall, StartError> {
        let entered = Instant::now();
        let permit = self.admit(tenant, on_queued).await?;
        let admitted = Instant::now();
        let deadline = admitted + self.first_chunk_timeout;
        let mut attempt = 0;
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        loop {
            attempt += 1;
            let endpoint = self.pick(&tried).ok_or(StartError::AllOpen)?;
            tried.push(endpoint.clone());
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
                    metrics::histogram!("fengda_hub_nlp_first_token_seconds").record(sent_at.elapsed().as_secs_f64());
                    return Ok(ActiveCall {
                        queue_wait: admitted - entered,
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
                    record(&endpoint, false);
                    return Err(StartError::Deadline);
                }
            };
            if counts_as_failure(status.code()) {
                record(&endpoint, false);
            }
            let backoff = self.backoff(attempt);
            // CANCELLED is never the hub's own doing here (the hub cancels by
            // dropping the call): it is the connection closing under the
            // request, e.g. a bridge that just died, so another endpoint may answer.
            let retryable = matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Cancelled
            );
            if !retryable || attempt >= self.max_attempts || Instant::now() + backoff >= deadline {
                return Err(StartError::Failed(status));
            }
            metrics::counter!("fengda_hub_nlp_retries_total").increment(1);
            info!(attempt, backoff_ms = backoff.as_millis() as u64, code = ?status.code(), endpoint = %endpoint.url, "retrying the NLP call");
            drop(outstanding);
            tokio::time::sleep(backoff).await;
        }
    }

    /// A running slot, waiting in the tenant's line (at most `max_queue_wait`) if needed.
    async fn admit(&self, tenant: &TenantId, on_queued: &mut (dyn FnMut(usize) + Send)) -> Result<Permit, StartError> {
        let mut ticket = match self.admission.enter(tenant) {
            Ok(Entry::Running(permit)) => return Ok(permit),
            Ok(Entry::Waiting(ticket)) => ticket,
            Err(QueueFull) => return Err(StartError::Overloaded),
        };
        let queued_at = Instant::now();
        let _record_wait = RecordOnDrop(queued_at, "fengda_hub_nlp_queue_wait_seconds");
        let give_up = queued_at + self.max_queue_wait;
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

    /// The healthy endpoint with the fewest calls whose breaker allows one;
    /// endpoints this question already failed on, and unhealthy ones, only
    /// when no other will take the call.
    fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        let now = std::time::Instant::now();
        let mut candidates: Vec<_> = self.endpoints.iter().collect();
        candidates.sort_by_key(|e| {
            let already_failed = tried.iter().any(|t| Arc::ptr_eq(t, e));
            (already_failed, !e.healthy.load(Ordering::Acquire), e.outstanding.load(Ordering::Acquire))
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

/// A started answer stream, holding its admission slot and endpoint count.
pub struct ActiveCall {
    /// Time spent waiting for an admission slot.
    pub queue_wait: Duration,
    /// From admission to the first chunk, retries included: the NLP's share.
    pub first_token: Duration,
    stream: AnswerStream,
    first: Option<AnswerChunk>,
    token_gap: Duration,
    /// When the last chunk arrived; the gap deadline counts from it.
    last_chunk: Instant,
    /// The whole-answer deadline (`nlp.reply_timeout_ms` from the request),
    /// enforced here for every transport: a bridge also gets it as
    /// `grpc-timeout`, the in-process answerer has nothing else to stop it.
    reply_deadline: Instant,
    /// Fires at some point at or before the gap deadline and is re-armed
    /// lazily, so a fast stream costs no timer operation per token.
    gap_timer: Pin<Box<tokio::time::Sleep>>,
    outstanding: Outstanding,
    _permit: Permit,
}

impl ActiveCall {
    /// The next chunk, or `None` after the last one.
    pub async fn next(&mut self) -> Result<Option<AnswerChunk>, StreamError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        loop {
            tokio::select! {
                biased;
                result = self.stream.next() => {
                    self.last_chunk = Instant::now();
                    return result.transpose().map_err(StreamError::Failed);
                }
                () = &mut self.gap_timer => {
                    let now = Instant::now();
                    if now >= self.reply_deadline {
                        return Err(StreamError::Failed(Status::deadline_exceeded("the whole-answer deadline passed")));
                    }
                    let deadline = self.last_chunk + self.token_gap;
                    if now >= deadline {
                        return Err(StreamError::TokenGap(self.token_gap));
                    }
                    self.gap_timer.as_mut().reset(deadline.min(self.reply_deadline));
                }
            }
        }
    }

    /// The next chunk if it has already arrived; `None` if the stream would
    /// wait. For reading ahead right after [`Self::next`] returned: the gap
    /// clock it set still holds for these.
    pub fn next_if_ready(&mut self) -> Option<Result<Option<AnswerChunk>, StreamError>> {
        if let Some(first) = self.first.take() {
            return Some(Ok(Some(first)));
        }
        let next = self.stream.next().now_or_never()?;
        Some(next.transpose().map_err(StreamError::Failed))
    }

    /// Ends the call and tells the breaker how it went. A successful stream
    /// is read to its end so its HTTP/2 stream closes cleanly (dropped
    /// streams are reset, and a server answers many resets with GOAWAY).
    pub async fn finish(mut self, success: bool) {
        if success {
            let _ = tokio::time::timeout(self.token_gap, async { while let Some(Ok(_)) = self.stream.next().await {} })
                .await;
        }
        record(&self.outstanding.0, success);
    }
}

/// Records how long something took into a histogram when dropped.
struct RecordOnDrop(Instant, &'static str);

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        metrics::histogram!(self.1).record(self.0.elapsed().as_secs_f64());
    }
}

/// Counts a call against its endpoint while it lives.
struct Outstanding(Arc<Endpoint>);

impl Outstanding {
    fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::AcqRel);
        Self(endpoint)
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

fn record(endpoint: &Endpoint, success: bool) {
    let outcome = if success { "ok" } else { "failed" };
    metrics::counter!("fengda_hub_nlp_calls_total", "outcome" => outcome).increment(1);
    if let Some(state) = endpoint.breaker.record(success, std::time::Instant::now()) {
        warn!(endpoint = %endpoint.url, ?state, "NLP circuit breaker changed state");
        set_breaker_gauge(endpoint, state);
    }
}

/// `fengda_hub_nlp_breaker_state{endpoint}`: 0 closed, 1 open, 2 half-open.
fn set_breaker_gauge(endpoint: &Endpoint, state: BreakerState) {
    let gauge = match state {
        BreakerState::Closed => 0.0,
        BreakerState::Open => 1.0,
        BreakerState::HalfOpen => 2.0,
    };
    metrics::gauge!("fengda_hub_nlp_breaker_state", "endpoint" => endpoint.url.clone()).set(gauge);
}

/// A request the bridge found malformed says nothing about the endpoint's
/// health; everything else does (a bridge whose upstream key is wrong answers
/// unauthenticated/permission denied to every call: it should be skipped).
fn counts_as_failure(code: Code) -> bool {
    !matches!(code, Code::InvalidArgument | Code::OutOfRange)
}

fn status_of(error: NlpError) -> Status {
    match error {
        NlpError::Call(status) => status,
        other => Status::unavailable(other.to_string()),
    }
}

/// Checks each endpoint's standard gRPC health service every few seconds,
/// so calls prefer endpoints that say they are serving.
pub async fn run_health_checks(pool: Arc<NlpPool>, stop: CancellationToken) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    // One per endpoint; none for an in-process answerer (it is always there).
    let mut clients: Vec<_> = pool
        .endpoints
        .iter()
        .map(|e| match e.client.is_remote() {
            true => tonic::transport::Endpoint::from_shared(e.url.clone()).ok(),
            false => None,
        })
        .map(|endpoint| endpoint.map(|endpoint| HealthClient::new(endpoint.connect_lazy())))
        .collect();
    let mut interval = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        for (endpoint, client) in pool.endpoints.iter().zip(clients.iter_mut()) {
            let Some(client) = client else { continue };
            // The answer service's own status: a draining bridge marks it NOT_SERVING.
            let mut request = tonic::Request::new(HealthCheckRequest { service: "fengda.nlp.v1.Nlp".into() });
            request.set_timeout(Duration::from_secs(1));
            let serving = matches!(client.check(request).await, Ok(r) if r.get_ref().status == 1);
            if endpoint.healthy.swap(serving, Ordering::AcqRel) != serving {
                info!(endpoint = %endpoint.url, serving, "NLP endpoint health changed");
            }
        }
    }
}
