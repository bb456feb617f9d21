//! Answers one customer question: history, NLP stream, deltas, stored reply.
//!
//! The reply streams to every socket of the conversation as `reply.delta`
//! frames (index 0, 1, 2, …) as chunks arrive, then is stored as one durable
//! assistant event, which the router delivers as `reply.done`. The
//! concatenated delta texts always equal the stored text, whatever happens:
//! - the NLP call cannot start (queue full or waited past `max_queue_wait_ms`, every breaker open, no first token
//!   within the deadline after retries): the polite fallback, `fallback: true`;
//! - the stream breaks after some tokens (error, token gap): the partial
//!   text plus the fallback sentence, `fallback: true, interrupted: true`;
//! - a client sends `cancel`, or the caller cancels the reply's token (no
//!   socket came back within the grace, hub shutdown): the partial text,
//!   `cancelled: true`.
//!
//! Either way the NLP call is cancelled upstream (its stream is dropped) and
//! the reply is stored: every question gets exactly one answer event.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, Role as WireRole, Turn};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{Appended, Backend, NewEvent, StoredEvent};
use crate::config::FallbackText;
use crate::ids::{ConversationKey, generate_reply_id};
use crate::nlp::{ActiveCall, NlpPool, StartError, StreamError};
use crate::protocol::{DeltaEncoder, ReplyTiming, Role, ServerFrame};

/// A stored customer message waiting for its answer.
#[derive(Debug)]
pub struct Question {
    pub seq: u64,
    pub text: String,
    /// When the customer's message reached the hub.
    pub received: std::time::Instant,
    /// The asking socket wants a `timing` object on `reply.done`.
    pub timing: bool,
}

/// What the replier needs, shared by all sessions of the node.
pub struct Replier {
    pub backend: Arc<dyn Backend>,
    pub nlp: Arc<NlpPool>,
    pub history_turns: usize,
    pub fallback: FallbackText,
    pub tenant_fallback: std::collections::HashMap<String, FallbackText>,
    /// Replies streaming on this node, by reply id, for `cancel`.
    in_flight: DashMap<String, (ConversationKey, CancellationToken)>,
}

/// How a reply ended, for the stored event's flags.
#[derive(Debug, Default)]
struct Ending {
    fallback: bool,
    interrupted: bool,
    cancelled: bool,
    queue_wait: std::time::Duration,
    first_token: std::time::Duration,
    /// Token arrival to delta queued for the sockets, summed and at most.
    relay_total_us: f64,
    relay_max_us: f64,
}

fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

impl Replier {
    pub fn new(
        backend: Arc<dyn Backend>,
        nlp: Arc<NlpPool>,
        history_turns: usize,
        config: &crate::config::NlpConfig,
    ) -> Self {
        Self {
            backend,
            nlp,
            history_turns,
            fallback: config.fallback.clone(),
            tenant_fallback: config.tenant_fallback.clone(),
            in_flight: DashMap::new(),
        }
    }

    /// Cancels a reply streaming on this node, if it belongs to `key`.
    pub fn cancel(&self, key: &ConversationKey, reply_id: &str) {
        if let Some(entry) = self.in_flight.get(reply_id)
            && entry.0 == *key
        {
            entry.1.cancel();
        }
    }

    /// Streams and stores the answer to `question`. Cancelling `stop` ends
    /// it like a client's `cancel` (at once, without an NLP call, if it is
    /// already cancelled): what streamed is stored with `cancelled: true`.
    pub async fn answer(&self, key: &ConversationKey, question: Question, stop: &CancellationToken) {
        let reply_id = generate_reply_id();
        let cancel = stop.child_token();
        self.in_flight.insert(reply_id.clone(), (key.clone(), cancel.clone()));
        let _unregister = InFlight { map: &self.in_flight, reply_id: &reply_id };
        // A question cancelled before its turn needs no history: it gets no NLP call.
        let turns = if cancel.is_cancelled() {
            Ok(Vec::new())
        } else {
            self.backend.recent_turns(key, self.history_turns + 1).await
        };
        let history = match turns {
            Ok(turns) => history_before(&turns, question.seq, self.history_turns),
            Err(error) => {
                warn!(%error, "history unavailable; answering without it");
                Vec::new()
            }
        };
        let request = AnswerRequest {
            tenant_id: key.tenant.to_string(),
            conversation_id: key.conversation.to_string(),
            request_id: uuid::Uuid::new_v4().to_string(),
            history,
            question: question.text.clone(),
        };
        // The hub's own share before the model: store, history, hand-over.
        metrics::histogram!("fengda_hub_reply_before_nlp_seconds").record(question.received.elapsed().as_secs_f64());
        let mut reply = ReplyStream {
            backend: &*self.backend,
            key,
            reply_id: &reply_id,
            deltas: DeltaEncoder::new(key.conversation.as_str(), &reply_id),
            text: String::new(),
            index: 0,
            staged: Vec::new(),
        };
        let before_nlp = question.received.elapsed();
        let (ending, completed_call) = self.stream(&request, &mut reply, &cancel, question.timing).await;
        if ending.fallback {
            let texts = self.tenant_fallback.get(key.tenant.as_str()).unwrap_or(&self.fallback);
            let polite = if mostly_cjk(&question.text) { &texts.zh } else { &texts.en };
            let separator = if reply.text.is_empty() { "" } else { "\n\n" };
            reply.push(&format!("{separator}{polite}"));
        }
        // The deltas must reach every node before the reply.done does.
        self.backend.flush_ephemeral().await;
        let event = NewEvent {
            from: Role::Assistant,
            id: reply_id.clone(),
            text: reply.text,
            fallback: ending.fallback,
            interrupted: ending.interrupted,
            cancelled: ending.cancelled,
            timing: question.timing.then(|| ReplyTiming {
                hub_before_nlp_ms: ms(before_nlp),
                queue_ms: ms(ending.queue_wait),
                nlp_first_token_ms: ms(ending.first_token),
                relay_mean_us: if reply.index == 0 { 0.0 } else { ending.relay_total_us / f64::from(reply.index) },
                relay_max_us: ending.relay_max_us,
                total_ms: ms(question.received.elapsed()),
            }),
        };
        match self.backend.append(key, event, None, None).await {
            Ok(Appended::New(seq)) => debug!(seq, ?ending, "reply stored"),
            Ok(Appended::Duplicate(_)) => {}
            Err(error) => warn!(%error, "reply streamed but could not be stored"),
        }
        // The customer has the whole reply; only now wait for the call's trailers.
        if let Some(call) = completed_call {
            call.finish(true).await;
        }
    }

    /// `measure`: time each token's relay (only for replies that report `timing`).
    /// A call that delivered its finish chunk is handed back rather than
    /// finished here, so the `reply.done` does not wait for the stream's trailers.
    async fn stream(
        &self,
        request: &AnswerRequest,
        reply: &mut ReplyStream<'_>,
        cancel: &CancellationToken,
        measure: bool,
    ) -> (Ending, Option<ActiveCall>) {
        // One waiter for the whole reply, not one registration per token.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let queued_reply = &*reply;
        let mut on_queued = |position| queued_reply.queued(position);
        let started = tokio::select! {
            biased;
            _ = &mut cancelled => return (Ending { cancelled: true, ..Ending::default() }, None),
            started = self.nlp.start(&queued_reply.key.tenant, request, &mut on_queued) => started,
        };
        let mut call = match started {
            Ok(call) => call,
            Err(error) => {
                // Admission refusals are the designed answer to overload:
                // counted, not logged per question (a 15x peak would flood the log).
                if matches!(error, StartError::Overloaded | StartError::QueueTimeout) {
                    debug!(%error, "no NLP slot; sending the fallback");
                } else {
                    warn!(%error, "no NLP answer; sending the fallback");
                }
                metrics::counter!("fengda_hub_nlp_fallbacks_total", "reason" => error.reason()).increment(1);
                return (Ending { fallback: true, ..Ending::default() }, None);
            }
        };
        let mut times = Ending { queue_wait: call.queue_wait, first_token: call.first_token, ..Ending::default() };
        // A result read ahead while gathering a batch, handled next.
        let mut read_ahead = None;
        loop {
            // The stream first: a cancel is seen as soon as no chunk is ready,
            // and a reply's tokens do not pay for a cancellation check each.
            let next = match read_ahead.take() {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    next = call.next() => next,
                    _ = &mut cancelled => {
                        // Dropping the stream resets it: that is how the bridge learns to stop.
                        drop(call);
                        return (Ending { cancelled: true, ..times }, None);
                    }
                },
            };
            let failure = match next {
                Ok(Some(chunk)) => {
                    let arrived = measure.then(std::time::Instant::now);
                    let mut finished = reply.stage(&chunk);
                    // Chunks that have arrived already go out with this one: one
                    // hand-over to the sockets for all of them (each is still its
                    // own frame). A model streaming at its pace sends one at a time.
                    while !finished && reply.staged.len() < MAX_BATCH {
                        match call.next_if_ready() {
                            Some(Ok(Some(chunk))) => finished = reply.stage(&chunk),
                            Some(other) => {
                                read_ahead = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let sent = reply.publish();
                    if let Some(arrived) = arrived
                        && sent > 0
                    {
                        let relay_us = arrived.elapsed().as_secs_f64() * 1e6;
                        times.relay_total_us += relay_us * sent as f64;
                        times.relay_max_us = times.relay_max_us.max(relay_us);
                    }
                    if finished {
                        return (times, Some(call));
                    }
                    // A stream that is always ready (an unpaced answerer, a
                    // full buffer) never lets the select above see a cancel.
                    if cancel.is_cancelled() {
                        drop(call);
                        return (Ending { cancelled: true, ..times }, None);
                    }
                    continue;
                }
                Ok(None) => StreamError::Truncated,
                Err(error) => error,
            };
            warn!(error = %failure, tokens = reply.index, "NLP stream broke; completing with the fallback");
            metrics::counter!("fengda_hub_nlp_fallbacks_total", "reason" => "interrupted").increment(1);
            call.finish(false).await;
            return (Ending { fallback: true, interrupted: reply.index > 0, ..times }, None);
        }
    }
}

/// Removes a reply from the in-flight map however `answer` ends.
struct InFlight<'a> {
    map: &'a DashMap<String, (ConversationKey, CancellationToken)>,
    reply_id: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.map.remove(self.reply_id);
    }
}

/// Deltas handed to the sockets together at most (see `Replier::stream`).
const MAX_BATCH: usize = 16;

/// The reply being built: publishes each token as a delta and keeps the text.
struct ReplyStream<'a> {
    backend: &'a dyn Backend,
    key: &'a ConversationKey,
    reply_id: &'a str,
    deltas: DeltaEncoder,
    text: String,
    index: u32,
    /// Delta frames encoded but not yet published.
    staged: Vec<Utf8Bytes>,
}

impl ReplyStream<'_> {
    /// Tells every socket of the conversation where the question stands in line.
    fn queued(&self, position: usize) {
        let frame =
            ServerFrame::Queued { conversation: self.key.conversation.as_str(), reply: self.reply_id, position }
                .encode();
        self.backend.publish_ephemeral(self.key, vec![frame]);
    }

    /// Encodes a chunk's text as the next delta (empty texts make none);
    /// returns whether it was the last chunk.
    fn stage(&mut self, chunk: &AnswerChunk) -> bool {
        if !chunk.text.is_empty() {
            self.stage_text(&chunk.text);
        }
        chunk.finish != 0
    }

    fn stage_text(&mut self, text: &str) {
        self.staged.push(self.deltas.encode(self.index, text));
        self.text.push_str(text);
        self.index += 1;
    }

    /// Publishes the staged deltas; returns how many.
    fn publish(&mut self) -> usize {
        let staged = std::mem::take(&mut self.staged);
        let count = staged.len();
        if count > 0 {
            self.backend.publish_ephemeral(self.key, staged);
        }
        count
    }

    /// Appends text outside the model's stream (the fallback sentence) as one delta.
    fn push(&mut self, text: &str) {
        self.stage_text(text);
        self.publish();
    }
}

/// The turns before the question, at most `limit`, oldest first.
fn history_before(turns: &[Arc<StoredEvent>], question_seq: u64, limit: usize) -> Vec<Turn> {
    let before: Vec<_> = turns.iter().filter(|e| e.seq < question_seq).collect();
    let skip = before.len().saturating_sub(limit);
    before[skip..]
        .iter()
        .map(|event| Turn {
            role: match event.from {
                Role::Customer => WireRole::Customer,
                Role::Assistant => WireRole::Assistant,
                Role::Agent => WireRole::Agent,
                Role::System => WireRole::System,
            } as i32,
            text: event.text.clone(),
        })
        .collect()
}

fn mostly_cjk(text: &str) -> bool {
    let (mut cjk, mut other) = (0usize, 0usize);
    for c in text.chars().filter(|c| c.is_alphanumeric()) {
        if ('\u{4e00}'..='\u{9fff}').contains(&c) {
            cjk += 1;
        } else {
            other += 1;
        }
    }
    cjk > other
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, from: Role) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            seq,
            from,
            id: seq.to_string(),
            text: format!("t{seq}"),
            fallback: false,
            interrupted: false,
            cancelled: false,
            at_ms: 0,
        })
    }

    #[test]
    fn history_excludes_the_question_and_keeps_the_newest_turns() {
        let turns: Vec<_> =
            (1..=6).map(|seq| event(seq, if seq % 2 == 1 { Role::Customer } else { Role::Assistant })).collect();
        let history = history_before(&turns, 5, 3);
        let texts: Vec<_> = history.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["t2", "t3", "t4"]);
        assert_eq!(history[1].role, WireRole::Customer as i32);
    }

    #[tokio::test]
    async fn chunks_that_arrived_together_reach_each_socket_as_one_item_of_ordered_deltas() {
        use crate::backend::MemoryBackend;
        use crate::ids::{SessionId, TenantId, UserId};
        use crate::router::{Outbound, Router, SessionCloser, SessionHandle};

        let backend = MemoryBackend::new(Arc::new(Router::default()), &crate::config::ConversationConfig::default());
        let opened = backend.open(&TenantId::parse("t").unwrap(), &UserId::parse("u").unwrap(), None).await.unwrap();
        let key = opened.key;
        let mut queues = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let closer = SessionCloser::child_of(&CancellationToken::new());
            let session = SessionHandle { id: SessionId::next(), tx, closer };
            backend.attach(&key, session, None, opened.pending.as_ref()).await.unwrap();
            queues.push(rx);
        }
        let mut reply = ReplyStream {
            backend: &backend,
            key: &key,
            reply_id: "r-1",
            deltas: DeltaEncoder::new(key.conversation.as_str(), "r-1"),
            text: String::new(),
            index: 0,
            staged: Vec::new(),
        };
        let chunk = |text: &str, finish: i32| AnswerChunk { index: 0, text: text.into(), finish };
        assert!(!reply.stage(&chunk("Hello", 0)));
        assert!(!reply.stage(&chunk("", 0)), "an empty chunk makes no delta");
        assert!(reply.stage(&chunk(" world", 1)));
        assert_eq!(reply.publish(), 2);
        assert_eq!(reply.publish(), 0, "nothing staged, nothing sent");
        reply.push("!");
        assert_eq!(reply.text, "Hello world!");
        for queue in &mut queues {
            let Outbound::Frames { frames, .. } = *queue.try_recv().unwrap() else { panic!("one item for the batch") };
            let deltas: Vec<serde_json::Value> =
                frames.iter().map(|f| serde_json::from_str(f.as_str()).unwrap()).collect();
            assert_eq!((deltas[0]["index"].as_u64(), deltas[0]["text"].as_str()), (Some(0), Some("Hello")));
            assert_eq!((deltas[1]["index"].as_u64(), deltas[1]["text"].as_str()), (Some(1), Some(" world")));
            let last = queue.try_recv().unwrap();
            let last: serde_json::Value = serde_json::from_str(last.frame().unwrap().as_str()).unwrap();
            assert_eq!((last["index"].as_u64(), last["text"].as_str()), (Some(2), Some("!")));
            assert!(queue.try_recv().is_err());
        }
    }

    #[test]
    fn fallback_language_follows_the_question() {
        assert!(mostly_cjk("金卡年费多少？"));
        assert!(!mostly_cjk("How much is the Gold Card?"));
    }
}
