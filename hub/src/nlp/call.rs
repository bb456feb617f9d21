//! A started answer stream: its chunks with the token-gap and whole-answer
//! deadlines, and what it holds while it runs (an admission slot, a count
//! against its endpoint). Ending it reports to the endpoint's breaker and limit.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fengda_proto::nlp::v1::AnswerChunk;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tonic::Status;

use super::admission::Permit;
use super::endpoint::Endpoint;
use super::{AnswerStream, NlpPool, StreamError};

/// When a call's question got its slot and when the call was sent.
pub(super) struct StartTimes {
    /// Time spent waiting for an admission slot.
    pub(super) queue_wait: Duration,
    pub(super) admitted: Instant,
    pub(super) sent_at: Instant,
}

/// A started answer stream, holding its admission slot and endpoint count.
pub struct ActiveCall {
    pool: Arc<NlpPool>,
    /// Set once the outcome went to the endpoint's breaker.
    reported: bool,
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
    /// A call whose first chunk arrived: sent at `sent_at`, after the
    /// question got its slot at `admitted` (having waited `queue_wait` for it).
    pub(super) fn started(
        pool: Arc<NlpPool>,
        outstanding: Outstanding,
        permit: Permit,
        (stream, first): (AnswerStream, AnswerChunk),
        times: StartTimes,
    ) -> Self {
        let now = Instant::now();
        let reply_deadline = times.sent_at + pool.reply_timeout;
        let token_gap = pool.token_gap_timeout;
        Self {
            pool,
            reported: false,
            queue_wait: times.queue_wait,
            first_token: now - times.admitted,
            stream,
            first: Some(first),
            token_gap,
            last_chunk: now,
            reply_deadline,
            gap_timer: Box::pin(tokio::time::sleep_until((now + token_gap).min(reply_deadline))),
            outstanding,
            _permit: permit,
        }
    }

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
    #[inline]
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
        self.pool.record(&self.outstanding.0, success);
        self.reported = true;
    }
}

impl Drop for ActiveCall {
    /// A call dropped without [`ActiveCall::finish`] (the customer cancelled,
    /// the reply grace ran out, the node shuts down) says nothing about its
    /// endpoint: a half-open probe it held is given back.
    fn drop(&mut self) {
        if !self.reported {
            self.outstanding.0.breaker.release_probe();
        }
    }
}

/// Counts a call against its endpoint while it lives.
pub(super) struct Outstanding(pub(super) Arc<Endpoint>);

impl Outstanding {
    pub(super) fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::AcqRel);
        Self(endpoint)
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}
