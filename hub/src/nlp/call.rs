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
use super::{AnswerStream, Endpoint, NlpPool, StreamError};

/// A started answer stream, holding its admission slot and endpoint count.
pub struct ActiveCall {
    pub(super) pool: Arc<NlpPool>,
    /// Set once the outcome went to the endpoint's breaker.
    pub(super) reported: bool,
    /// Time spent waiting for an admission slot.
    pub queue_wait: Duration,
    /// From admission to the first chunk, retries included: the NLP's share.
    pub first_token: Duration,
    pub(super) stream: AnswerStream,
    pub(super) first: Option<AnswerChunk>,
    pub(super) token_gap: Duration,
    /// When the last chunk arrived; the gap deadline counts from it.
    pub(super) last_chunk: Instant,
    /// The whole-answer deadline (`nlp.reply_timeout_ms` from the request),
    /// enforced here for every transport: a bridge also gets it as
    /// `grpc-timeout`, the in-process answerer has nothing else to stop it.
    pub(super) reply_deadline: Instant,
    /// Fires at some point at or before the gap deadline and is re-armed
    /// lazily, so a fast stream costs no timer operation per token.
    pub(super) gap_timer: Pin<Box<tokio::time::Sleep>>,
    pub(super) outstanding: Outstanding,
    pub(super) _permit: Permit,
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
