//! A reply's NLP stream turned into `reply.delta` frames: waits for an NLP
//! slot (telling the sockets their place in line), relays the chunks as
//! they arrive, in batches of what arrived together, and ends in one
//! [`Outcome`] that decides the stored reply's flags.

use axum::extract::ws::Utf8Bytes;
use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Replier;
use crate::conversations::Conversations;
use crate::event::OwnerEpoch;
use crate::ids::ConversationKey;
use crate::nlp::{ActiveCall, StartError, StreamError};
use crate::protocol::{DeltaEncoder, ServerFrame};

/// How the NLP side of a reply ended; decides the stored event's flags.
pub(super) enum Outcome {
    /// The answer streamed to its finish chunk. The call is handed back so
    /// its trailers are read after the reply is stored, not before the
    /// `reply.done`.
    Completed(ActiveCall),
    /// No answer, or part of one (`interrupted`: some text had streamed):
    /// completed with the polite fallback sentence.
    Fallback { interrupted: bool },
    /// A client's `cancel`, the reply grace, shutdown: what streamed stays.
    Cancelled,
    /// An agent took the conversation over: what streamed stays.
    TakenOver,
}

/// Where a reply's time went, for its `timing` object.
#[derive(Debug, Default)]
pub(super) struct Timings {
    pub queue_wait: std::time::Duration,
    pub first_token: std::time::Duration,
    /// Token arrival to delta queued for the sockets, summed and at most.
    pub relay_total_us: f64,
    pub relay_max_us: f64,
}

impl Replier {
    /// Streams the answer into `draft` until it ends one way or another.
    pub(super) async fn stream(
        &self,
        request: &AnswerRequest,
        draft: &mut Draft<'_>,
        cancel: &CancellationToken,
        takeover: &CancellationToken,
    ) -> Outcome {
        // One waiter for the whole reply, not one registration per token.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let taken = takeover.cancelled();
        tokio::pin!(taken);
        let started = tokio::select! {
            biased;
            _ = &mut taken => return Outcome::TakenOver,
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
                    _ = &mut taken => return Outcome::TakenOver,
                    _ = &mut cancelled => return Outcome::Cancelled,
                },
            };
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return broken(call, draft.index, StreamError::Truncated).await,
                Err(error) => return broken(call, draft.index, error).await,
            };
            let finished = draft.relay_batch(chunk, &mut call, &mut read_ahead);
            // A batch the fan-out fenced off: the conversation was taken over.
            if draft.fenced || takeover.is_cancelled() {
                return Outcome::TakenOver;
            }
            if draft.cut {
                return too_long(draft);
            }
            if finished {
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
        self.nlp.start(draft.key.tenant(), request, &mut on_queued).await.map_err(|error| {
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

/// The answer reached `nlp.max_reply_bytes`: the fallback ends it. The call
/// is dropped (its stream reset: the service stops) without a word to the
/// breaker, since the endpoint did not fail.
fn too_long(draft: &Draft<'_>) -> Outcome {
    warn!(bytes = draft.text.len(), "NLP answer reached nlp.max_reply_bytes; cut there");
    metrics::counter!(crate::metric::NLP_FALLBACKS, "reason" => "too_long").increment(1);
    Outcome::Fallback { interrupted: !draft.text.is_empty() }
}

/// Deltas handed to the sockets together at most (see [`Draft::relay_batch`]).
const MAX_BATCH: usize = 16;

/// The reply being written: publishes each token as a delta, keeps the text
/// and where the time went.
pub(super) struct Draft<'a> {
    conversations: &'a Conversations,
    key: &'a ConversationKey,
    reply_id: &'a str,
    deltas: DeltaEncoder,
    /// The text published so far, then the staged deltas' text.
    pub(super) text: String,
    pub(super) index: u32,
    /// Delta frames encoded but not yet published; their text is the end
    /// of `text`, from `published_len` on.
    staged: Vec<Utf8Bytes>,
    published_len: usize,
    /// The model's text is cut past this many bytes (`nlp.max_reply_bytes`).
    max_bytes: usize,
    /// The model's text reached `max_bytes`: what came past it was dropped.
    cut: bool,
    /// Time each batch's relay (only for replies that report `timing`).
    measure: bool,
    pub(super) timings: Timings,
    /// The model's token counts, from the last chunk, when it sent them.
    pub(super) usage: Option<fengda_proto::nlp::v1::Usage>,
    /// What the question was asked under: the deltas' fence.
    asked: OwnerEpoch,
    /// Set when the fan-out refused a batch (an owner change came first):
    /// nothing more is published, and the batch is not in `text`.
    pub(super) fenced: bool,
}

impl<'a> Draft<'a> {
    pub(super) fn new(
        conversations: &'a Conversations,
        key: &'a ConversationKey,
        reply_id: &'a str,
        asked: OwnerEpoch,
        max_bytes: usize,
        measure: bool,
    ) -> Self {
        Self {
            conversations,
            key,
            reply_id,
            deltas: DeltaEncoder::new(key.conversation().as_str(), reply_id),
            text: String::new(),
            index: 0,
            staged: Vec::new(),
            published_len: 0,
            max_bytes,
            cut: false,
            measure,
            timings: Timings::default(),
            usage: None,
            asked,
            fenced: false,
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
            ServerFrame::Queued { conversation: self.key.conversation().as_str(), reply: self.reply_id, position }
                .encode();
        self.conversations.publish_frames(self.key, vec![frame], self.asked);
    }

    /// Encodes a chunk's text as the next delta (empty texts make none);
    /// returns whether it was the last chunk, or the text reached
    /// `max_bytes` (the part past it is dropped, and the draft is `cut`).
    fn stage(&mut self, chunk: &AnswerChunk) -> bool {
        if self.text.len() + chunk.text.len() > self.max_bytes {
            return self.stage_cut(chunk);
        }
        if !chunk.text.is_empty() {
            self.stage_text(&chunk.text);
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        chunk.finish != 0
    }

    /// [`Draft::stage`] of a chunk that takes the text past `max_bytes`:
    /// the part that fits (whole characters), and the draft is `cut`.
    #[cold]
    fn stage_cut(&mut self, chunk: &AnswerChunk) -> bool {
        let room = self.max_bytes.saturating_sub(self.text.len());
        let text = &chunk.text[..chunk.text.floor_char_boundary(room)];
        if !text.is_empty() {
            self.stage_text(text);
        }
        self.cut = true;
        true
    }

    fn stage_text(&mut self, text: &str) {
        let index = self.index + self.staged.len() as u32;
        if self.staged.capacity() == 0 {
            // The batch's frames go to the sockets as they are: one
            // allocation per batch, not one per doubling.
            self.staged.reserve_exact(MAX_BATCH);
        }
        self.staged.push(self.deltas.encode(index, text));
        self.text.push_str(text);
    }

    /// Publishes the staged deltas; returns how many. Once fenced off
    /// (see [`Draft::fenced`]), drops them and their text instead.
    fn publish(&mut self) -> usize {
        let staged = std::mem::take(&mut self.staged);
        let count = staged.len();
        if count > 0 && !self.fenced && !self.conversations.publish_frames(self.key, staged, self.asked) {
            self.fenced = true;
        }
        if self.fenced {
            self.text.truncate(self.published_len);
            return 0;
        }
        self.index += count as u32;
        self.published_len = self.text.len();
        count
    }

    /// Appends text outside the model's stream (the fallback sentence) as one delta.
    pub(super) fn push(&mut self, text: &str) {
        self.stage_text(text);
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn chunks_that_arrived_together_reach_each_socket_as_one_item_of_ordered_deltas() {
        use crate::fanout::{FanOut, Outbound, SessionCloser, SessionHandle};
        use crate::ids::{Party, SessionId, TenantId, UserId};
        use crate::store::MemoryLog;

        let log = Arc::new(MemoryLog::new(&crate::config::ConversationConfig::default()));
        let backend = Conversations::new(
            log,
            Arc::new(crate::bus::LocalBus),
            Arc::new(FanOut::default()),
            Arc::new(crate::presence::LocalBoard),
        );
        let party = Party { tenant: TenantId::parse("t").unwrap(), user: UserId::parse("u").unwrap() };
        let opened = backend.open(&party, None).await.unwrap();
        let key = opened.key;
        let mut queues = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let closer = SessionCloser::child_of(&CancellationToken::new());
            let session = SessionHandle::customer(SessionId::next(), tx, closer);
            backend.attach(&key, session, None, opened.pending.as_ref()).await.unwrap();
            queues.push(rx);
        }
        let log = crate::event::LogEpoch::of(&opened.pending.as_ref().expect("a new conversation").epoch);
        let asked = OwnerEpoch { log, epoch: 0 };
        let mut reply = Draft::new(&backend, &key, "r-1", asked, 64 * 1024, false);
        let chunk = |text: &str, finish: i32| AnswerChunk { index: 0, text: text.into(), finish, usage: None };
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
            let Outbound::Frames { frames, .. } = *queue.try_recv().unwrap() else { panic!("one item for the last") };
            let last: serde_json::Value = serde_json::from_str(frames[0].as_str()).unwrap();
            assert_eq!((last["index"].as_u64(), last["text"].as_str()), (Some(2), Some("!")));
            assert!(queue.try_recv().is_err());
        }

        // A chunk past the cap: the part that fits (whole characters) is
        // staged, the rest dropped, and the draft ends.
        let mut short = Draft::new(&backend, &key, "r-2", asked, reply.text.len() + 4, false);
        assert!(!short.stage(&chunk("Hello world!", 0)));
        assert!(short.stage(&chunk("ab世界", 0)), "past the cap");
        assert!(short.cut);
        assert_eq!(short.text, "Hello world!ab", "no half character");
        assert!(matches!(too_long(&short), Outcome::Fallback { interrupted: true }));
        // A cap no whole character of the first chunk fits in: nothing streamed, not interrupted.
        let mut empty = Draft::new(&backend, &key, "r-3", asked, 2, false);
        assert!(empty.stage(&chunk("世界", 0)) && empty.cut && empty.text.is_empty());
        assert!(matches!(too_long(&empty), Outcome::Fallback { interrupted: false }));
        assert_eq!(short.publish(), 2);
        for queue in &mut queues {
            let Outbound::Frames { frames, .. } = *queue.try_recv().unwrap() else { panic!("one item") };
            assert_eq!(frames.len(), 2);
        }

        // Taken over (an owner change delivered here): the next batch is
        // fenced off, and is not part of the stored text.
        use crate::event::SystemEvent;
        use crate::owner::Owner;
        use crate::store::{AppendWith, OwnerOp};
        let anna = Owner::Agent { id: "anna".into(), name: "Anna".into() };
        let with = AppendWith {
            create: opened.pending.as_ref(),
            owner: OwnerOp::Change { expected: 0, to: &anna },
            ..Default::default()
        };
        let joined = crate::store::NewEvent::system(SystemEvent::AgentJoined, Some(("anna", "Anna")));
        backend.append(&key, joined, None, with).await.unwrap();
        assert!(!reply.stage(&chunk(" more", 0)));
        assert_eq!(reply.publish(), 0);
        assert!(reply.fenced);
        assert_eq!((reply.text.as_str(), reply.index), ("Hello world!", 3));
        for queue in &mut queues {
            let joined = queue.try_recv().unwrap();
            assert!(matches!(*joined, Outbound::Event { .. }), "the event, and no delta after it");
            assert!(
                matches!(*queue.try_recv().unwrap(), Outbound::Owner { change: OwnerEpoch { epoch: 1, .. }, .. }),
                "the writers' fence"
            );
            assert!(queue.try_recv().is_err());
        }
    }
}
