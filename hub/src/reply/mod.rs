//! Answers one customer question: NLP stream, deltas, stored reply.
//!
//! The reply streams to every socket of the conversation as `reply.delta`
//! frames (index 0, 1, 2, …) as chunks arrive (`stream.rs`), then is stored
//! as one durable assistant event, which the fan-out delivers as
//! `reply.done`. The concatenated delta texts always equal the stored text,
//! whatever happens:
//! - the NLP call cannot start (queue full or waited past `max_queue_wait_ms`, every breaker open, no first token
//!   within the deadline after retries): the polite fallback, `fallback: true`;
//! - the stream breaks after some tokens (error, token gap), or the answer
//!   grows past `nlp.max_reply_bytes` (cut there): the partial text plus
//!   the fallback sentence, `fallback: true, interrupted: true`;
//! - a client sends `cancel` (`in_flight.rs`), or the caller cancels the
//!   reply's token (no socket came back within the grace, hub shutdown): the
//!   partial text, `cancelled: true`;
//! - an agent takes the conversation over (an owner change after the owner
//!   epoch the question was asked under, delivered on this node: the node
//!   holds the conversation while the reply streams, see
//!   [`Conversations::hold`]): the text its sockets were given, `interrupted: true`.
//!   The fan-out fences the reply's deltas off from the owner change on
//!   (see [`crate::fanout`]), and a batch it refused is not in the text.
//!
//! Either way the NLP call is cancelled upstream (its stream is dropped) and
//! the reply is stored: every question gets exactly one answer event. The
//! question's history came with its append (see [`crate::store::AppendWith`]).

mod in_flight;
mod stream;

use std::sync::Arc;

use fengda_nlp::knowledge::Lang;
use fengda_proto::nlp::v1::{AnswerRequest, Role as WireRole, Turn};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::FallbackText;
use crate::conversations::Conversations;
use crate::event::OwnerEpoch;
use crate::ids::{ConversationKey, generate_reply_ids};
use crate::nlp::NlpPool;
use crate::protocol::{ReplyTiming, Role};
use crate::store::{AppendWith, Appended, NewEvent, OwnerOp, StoreError, StoredEvent};
use in_flight::InFlight;
use stream::{Draft, Outcome};

/// A stored customer message waiting for its answer.
#[derive(Debug)]
pub struct Question {
    pub seq: u64,
    pub text: String,
    /// The turns before it, oldest first, at most its tenant's `history_turns`.
    pub history: Vec<Arc<StoredEvent>>,
    /// When the customer's message reached the hub.
    pub received: std::time::Instant,
    /// The asking socket wants a `timing` object on `reply.done`.
    pub timing: bool,
    /// The `tenant` label of the reply's metrics ([`crate::tenant`]).
    pub tenant_label: Arc<str>,
    /// The log incarnation it was stored in, and the owner epoch there it
    /// was asked under (the assistant owned the conversation).
    pub asked: OwnerEpoch,
}

/// What the replier needs, shared by all sessions of the node.
pub struct Replier {
    pub conversations: Arc<Conversations>,
    pub nlp: Arc<NlpPool>,
    pub fallback: FallbackText,
    pub tenant_fallback: std::collections::HashMap<String, FallbackText>,
    /// `nlp.max_reply_bytes`: where an answer is cut.
    max_reply_bytes: usize,
    in_flight: InFlight,
    /// `REPLY_BEFORE_NLP`, registered once.
    before_nlp: metrics::Histogram,
}

impl Replier {
    pub fn new(conversations: Arc<Conversations>, nlp: Arc<NlpPool>, config: &crate::config::NlpConfig) -> Self {
        Self {
            conversations,
            nlp,
            fallback: config.fallback.clone(),
            tenant_fallback: config.tenant_fallback.clone(),
            max_reply_bytes: config.max_reply_bytes,
            in_flight: InFlight::default(),
            before_nlp: metrics::histogram!(crate::metric::REPLY_BEFORE_NLP),
        }
    }

    /// Cancels a reply streaming on this node, if it belongs to `key`.
    pub fn cancel(&self, key: &ConversationKey, reply_id: &str) {
        self.in_flight.cancel(key, reply_id);
    }

    /// Streams and stores the answer to `question`. Cancelling `stop` ends
    /// it like a client's `cancel` (at once, without an NLP call, if it is
    /// already cancelled): what streamed is stored with `cancelled: true`.
    pub async fn answer(&self, key: &ConversationKey, question: Question, stop: &CancellationToken) {
        let (reply_id, request_id) = generate_reply_ids();
        let cancel = stop.child_token();
        let _registered = self.in_flight.register(&reply_id, key, cancel.clone());
        let takeover = tokio_util::sync::CancellationToken::new();
        self.conversations.hold(key, question.asked, &takeover).await;
        let request = AnswerRequest {
            tenant_id: key.tenant().to_string(),
            conversation_id: key.conversation().to_string(),
            request_id,
            history: question.history.iter().map(|event| turn(event)).collect(),
            question: question.text.clone(),
        };
        // The hub's own share before the model: store, hand-over.
        self.before_nlp.record(question.received.elapsed().as_secs_f64());
        let mut draft =
            Draft::new(&self.conversations, key, &reply_id, question.asked, self.max_reply_bytes, question.timing);
        let before_nlp = question.received.elapsed();
        let outcome = self.stream(&request, &mut draft, &cancel, &takeover).await;
        if matches!(outcome, Outcome::Fallback { .. }) {
            let separator = if draft.text.is_empty() { "" } else { "\n\n" };
            draft.push(&format!("{separator}{}", self.polite_fallback(key, &question.text)));
        }
        // The deltas must reach every node before the reply.done does.
        self.conversations.flush_frames().await;
        if let Some(usage) = draft.usage {
            let tenant = question.tenant_label.to_string();
            metrics::counter!(crate::metric::NLP_TOKENS, "tenant" => tenant.clone(), "kind" => "prompt")
                .increment(usage.prompt_tokens.into());
            metrics::counter!(crate::metric::NLP_TOKENS, "tenant" => tenant, "kind" => "completion")
                .increment(usage.completion_tokens.into());
        }
        let event = stored_reply(&reply_id, draft, &outcome, &question, before_nlp);
        let taken_over = matches!(outcome, Outcome::TakenOver);
        self.store(key, event, taken_over, question.asked.epoch).await;
        self.conversations.unhold(key, &takeover).await;
        // The customer has the whole reply; only now wait for the call's trailers.
        if let Outcome::Completed(call) = outcome {
            call.finish(true).await;
        }
    }

    /// Stores a reply. One that was not stopped by a takeover is stored
    /// only if the assistant still owns the conversation under the epoch it
    /// answered in; if not (taken over while this node had not heard it),
    /// it is stored as interrupted, after the takeover, as a taken-over
    /// reply is: what streamed is what the sockets here were sent.
    async fn store(&self, key: &ConversationKey, mut event: NewEvent, taken_over: bool, epoch: u64) {
        let owner = if taken_over { OwnerOp::Any } else { OwnerOp::Assistant { epoch } };
        let mut appended =
            self.conversations.append(key, event.clone(), None, AppendWith { owner, ..Default::default() }).await;
        if let Err(StoreError::OwnerChanged(now)) = &appended {
            debug!(
                owner = now.owner.kind(),
                owner_epoch = now.epoch,
                "the reply's owner epoch went stale; stored as interrupted"
            );
            event.interrupted = true;
            appended = self.conversations.append(key, event, None, AppendWith::default()).await;
        }
        match appended {
            Ok(Appended::New { event, .. }) => {
                let (fallback, interrupted, cancelled) = (event.fallback, event.interrupted, event.cancelled);
                debug!(seq = event.seq, fallback, interrupted, cancelled, "reply stored")
            }
            Ok(Appended::Duplicate(_)) => {}
            Err(error) => warn!(%error, "reply streamed but could not be stored"),
        }
    }

    /// The tenant's fallback sentence, in the question's language.
    fn polite_fallback(&self, key: &ConversationKey, question: &str) -> &str {
        let texts = self.tenant_fallback.get(key.tenant().as_str()).unwrap_or(&self.fallback);
        // The built-in answerer's rule, so both pick a language alike.
        match Lang::detect(question) {
            Lang::Zh => &texts.zh,
            Lang::En => &texts.en,
        }
    }
}

/// The assistant event that stores a reply: its text, the flags its
/// outcome sets, and where its time went when the question asked for that.
fn stored_reply(
    reply_id: &str,
    draft: Draft<'_>,
    outcome: &Outcome,
    question: &Question,
    before_nlp: std::time::Duration,
) -> NewEvent {
    let (fallback, interrupted, cancelled) = match outcome {
        Outcome::Completed(_) => (false, false, false),
        Outcome::Fallback { interrupted } => (true, *interrupted, false),
        Outcome::Cancelled => (false, false, true),
        Outcome::TakenOver => (false, true, false),
    };
    let timings = &draft.timings;
    let ms = |duration: std::time::Duration| duration.as_secs_f64() * 1000.0;
    NewEvent {
        from: Role::Assistant,
        id: reply_id.to_owned(),
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
            prompt_tokens: draft.usage.map(|usage| usage.prompt_tokens),
            completion_tokens: draft.usage.map(|usage| usage.completion_tokens),
        }),
        text: draft.text,
        fallback,
        interrupted,
        cancelled,
        agent: None,
        name: None,
        event: None,
        owner_epoch: None,
    }
}

/// A stored event as a turn of an NLP request's history.
fn turn(event: &StoredEvent) -> Turn {
    let role = match event.from {
        Role::Customer => WireRole::Customer,
        Role::Assistant => WireRole::Assistant,
        Role::Agent => WireRole::Agent,
        Role::System => WireRole::System,
    };
    Turn { role: role as i32, text: event.text.clone() }
}
