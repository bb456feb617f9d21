//! Answers one customer question: history, NLP stream, deltas, stored reply.
//!
//! The reply streams to every socket of the conversation as `reply.delta`
//! frames (index 0, 1, 2, …) as chunks arrive, then is stored as one durable
//! assistant event, which the fan-out delivers as `reply.done`. The
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
use fengda_nlp::knowledge::Lang;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, Role as WireRole, Turn};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::FallbackText;
use crate::conversations::Conversations;
use crate::ids::{ConversationKey, generate_reply_id};
use crate::nlp::{ActiveCall, NlpPool, StartError, StreamError};
use crate::protocol::{DeltaEncoder, ReplyTiming, Role, ServerFrame};
use crate::store::{Appended, NewEvent, StoredEvent};

/// A stored customer message waiting for its answer.
#[derive(Debug)]
pub struct Question {
    pub seq: u64,
    pub text: String,
    /// When the customer's message reached the hub.
    pub received: std::time::Instant,
    /// The asking socket wants a `timing` object on `reply.done`.
    pub timing: bool,
    /// Turns of history sent with it (its tenant's `history_turns`).
    pub history_turns: usize,
}

/// What the replier needs, shared by all sessions of the node.
pub struct Replier {
    pub conversations: Arc<Conversations>,
    pub nlp: Arc<NlpPool>,
    pub fallback: FallbackText,
    pub tenant_fallback: std::collections::HashMap<String, FallbackText>,
    /// Replies streaming on this node, by reply id, for `cancel`.
    in_flight: DashMap<String, (ConversationKey, CancellationToken)>,
}

/// How the NLP side of a reply ended; decides the stored event's flags.
enum Outcome {
    /// The answer streamed to its finish chunk. The call is handed back so
    /// its trailers are read after the reply is stored, not before the
    /// `reply.done`.
    Completed(ActiveCall),
    /// No answer, or part of one (`interrupted`: some text had streamed):
    /// completed with the polite fallback sentence.
    Fallback { interrupted: bool },
    /// A client's `cancel`, the reply grace, shutdown: what streamed stays.
    Cancelled,
}

/// Where a reply's time went, for its `timing` object.
#[derive(Debug, Default)]
struct Timings {
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
    pub fn new(conversations: Arc<Conversations>, nlp: Arc<NlpPool>, config: &crate::config::NlpConfig) -> Self {
        Self {
            conversations,
            nlp,
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
            self.conversations.recent_turns(key, question.history_turns + 1).await
        };
        let history = match turns {
            Ok(turns) => history_before(&turns, question.seq, question.history_turns),
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
        metrics::histogram!(crate::metric::REPLY_BEFORE_NLP).record(question.received.elapsed().as_secs_f64());
        let mut draft = Draft::new(&self.conversations, key, &reply_id, question.timing);
        let before_nlp = question.received.elapsed();
        let outcome = self.stream(&request, &mut draft, &cancel).await;
        let (fallback, interrupted, cancelled) = match &outcome {
            Outcome::Completed(_) => (false, false, false),
            Outcome::Fallback { interrupted } => (true, *interrupted, false),
            Outcome::Cancelled => (false, false, true),
        };
        if fallback {
            let texts = self.tenant_fallback.get(key.tenant.as_str()).unwrap_or(&self.fallback);
            // The built-in answerer's rule, so both pick a language alike.
            let polite = match Lang::detect(&question.text) {
                Lang::Zh => &texts.zh,
                Lang::En => &texts.en,
            };
            let separator = if draft.text.is_empty() { "" } else { "\n\n" };
            draft.push(&format!("{separator}{polite}"));
        }
        // The deltas must reach every node before the reply.done does.
        self.conversations.flush_frames().await;
        let timings = &draft.timings;
        let event = NewEvent {
            from: Role::Assistant,
            id: reply_id.clone(),
            timing: question.timing.then(|| ReplyTiming {
                hub_before_nlp_ms: ms(before_nlp),
                queue_ms: ms(timings.queue_wait),
                nlp_first_token_ms: ms(timings.first_token),
                // Never above the max: r × n / n can round to a hair over r.
                relay_mean_us: if draft.index == 0 {
                    0.0
                } else {
                    (timings.relay_total_us / f64::from(draft.index)).min(timings.relay_max_us)
                },
                relay_max_us: timings.relay_max_us,
                total_ms: ms(question.received.elapsed()),
            }),
            text: draft.text,
            fallback,
            interrupted,
            cancelled,
        };
        match self.conversations.append(key, event, None, None).await {
            Ok(Appended::New(event)) => debug!(seq = event.seq, fallback, interrupted, cancelled, "reply stored"),
            Ok(Appended::Duplicate(_)) => {}
            Err(error) => warn!(%error, "reply streamed but could not be stored"),
        }
        // The customer has the whole reply; only now wait for the call's trailers.
        if let Outcome::Completed(call) = outcome {
            call.finish(true).await;
        }
    }

    /// Streams the answer into `draft` until it ends one way or another.
    async fn stream(&self, request: &AnswerRequest, draft: &mut Draft<'_>, cancel: &CancellationToken) -> Outcome {
        // One waiter for the whole reply, not one registration per token.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let started = tokio::select! {
            biased;
            _ = &mut cancelled => return Outcome::Cancelled,
            started = self.start(request, draft) => started,
        };
        let mut call = match started {
            Ok(call) => call,
            Err(outcome) => return outcome,
        };
        draft.timings.queue_wait = call.queue_wait;
        draft.timings.first_token = call.first_token;
        // A result read ahead while gathering a batch, handled next.
        let mut read_ahead = None;
        loop {
            // The stream first: a cancel is seen as soon as no chunk is ready,
            // and a reply's tokens do not pay for a cancellation check each.
            // Returning drops the call, which resets its stream: that is how
            // the bridge learns to stop.
            let next = match read_ahead.take() {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    next = call.next() => next,
                    _ = &mut cancelled => return Outcome::Cancelled,
                },
            };
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return broken(call, draft.index, StreamError::Truncated).await,
                Err(error) => return broken(call, draft.index, error).await,
            };
            if draft.relay_batch(chunk, &mut call, &mut read_ahead) {
                return Outcome::Completed(call);
            }
            // A stream that is always ready (an unpaced answerer, a full
            // buffer) never lets the select above see a cancel.
            if cancel.is_cancelled() {
                return Outcome::Cancelled;
            }
        }
    }

    /// Waits for an NLP slot (telling the sockets their place in line) and
    /// the first chunk; a failure is the fallback.
    async fn start(&self, request: &AnswerRequest, draft: &Draft<'_>) -> Result<ActiveCall, Outcome> {
        let mut on_queued = |position| draft.queued(position);
        self.nlp.start(&draft.key.tenant, request, &mut on_queued).await.map_err(|error| {
            // Admission refusals are the designed answer to overload:
            // counted, not logged per question (a 15x peak would flood the log).
            if matches!(error, StartError::Overloaded | StartError::QueueTimeout) {
                debug!(%error, "no NLP slot; sending the fallback");
            } else {
                warn!(%error, "no NLP answer; sending the fallback");
            }
            metrics::counter!(crate::metric::NLP_FALLBACKS, "reason" => error.reason()).increment(1);
            Outcome::Fallback { interrupted: false }
        })
    }
}

/// A started stream broke after `tokens` deltas: the fallback completes it.
async fn broken(call: ActiveCall, tokens: u32, failure: StreamError) -> Outcome {
    warn!(error = %failure, tokens, "NLP stream broke; completing with the fallback");
    metrics::counter!(crate::metric::NLP_FALLBACKS, "reason" => "interrupted").increment(1);
    call.finish(false).await;
    Outcome::Fallback { interrupted: tokens > 0 }
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

/// Deltas handed to the sockets together at most (see [`Draft::relay_batch`]).
const MAX_BATCH: usize = 16;

/// The reply being written: publishes each token as a delta, keeps the text
/// and where the time went.
struct Draft<'a> {
    conversations: &'a Conversations,
    key: &'a ConversationKey,
    reply_id: &'a str,
    deltas: DeltaEncoder,
    text: String,
    index: u32,
    /// Delta frames encoded but not yet published.
    staged: Vec<Utf8Bytes>,
    /// Time each batch's relay (only for replies that report `timing`).
    measure: bool,
    timings: Timings,
}

impl<'a> Draft<'a> {
    fn new(conversations: &'a Conversations, key: &'a ConversationKey, reply_id: &'a str, measure: bool) -> Self {
        Self {
            conversations,
            key,
            reply_id,
            deltas: DeltaEncoder::new(key.conversation.as_str(), reply_id),
            text: String::new(),
            index: 0,
            staged: Vec::new(),
            measure,
            timings: Timings::default(),
        }
    }

    /// Relays `chunk` and the chunks that have arrived behind it as one
    /// hand-over to the sockets (each still its own frame; a model streaming
    /// at its pace sends one at a time). A result that is not a chunk is
    /// left in `read_ahead`. Returns whether the answer finished.
    fn relay_batch(
        &mut self,
        chunk: AnswerChunk,
        call: &mut ActiveCall,
        read_ahead: &mut Option<Result<Option<AnswerChunk>, StreamError>>,
    ) -> bool {
        let arrived = self.measure.then(std::time::Instant::now);
        let mut finished = self.stage(&chunk);
        while !finished && self.staged.len() < MAX_BATCH {
            match call.next_if_ready() {
                Some(Ok(Some(chunk))) => finished = self.stage(&chunk),
                Some(other) => {
                    *read_ahead = Some(other);
                    break;
                }
                None => break,
            }
        }
        let sent = self.publish();
        if let Some(arrived) = arrived
            && sent > 0
        {
            let relay_us = arrived.elapsed().as_secs_f64() * 1e6;
            self.timings.relay_total_us += relay_us * sent as f64;
            self.timings.relay_max_us = self.timings.relay_max_us.max(relay_us);
        }
        finished
    }

    /// Tells every socket of the conversation where the question stands in line.
    fn queued(&self, position: usize) {
        let frame =
            ServerFrame::Queued { conversation: self.key.conversation.as_str(), reply: self.reply_id, position }
                .encode();
        self.conversations.publish_frames(self.key, vec![frame]);
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
            self.conversations.publish_frames(self.key, staged);
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
        use crate::fanout::{FanOut, Outbound, SessionCloser, SessionHandle};
        use crate::ids::{SessionId, TenantId, UserId};
        use crate::store::MemoryLog;

        let log = Arc::new(MemoryLog::new(&crate::config::ConversationConfig::default()));
        let backend = Conversations::new(log, Arc::new(crate::bus::LocalBus), Arc::new(FanOut::default()));
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
        let mut reply = Draft::new(&backend, &key, "r-1", false);
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
}
