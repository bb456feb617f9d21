//! Answers one customer question: history, NLP stream, deltas, stored reply.
//!
//! The reply streams to every socket of the conversation as `reply.delta`
//! frames (index 0, 1, 2, …) as chunks arrive, then is stored as one durable
//! assistant event, which the router delivers as `reply.done`. The
//! concatenated delta texts always equal the stored text, fallback included.
//!
//! If the NLP service fails or misses its first-chunk deadline, the customer
//! gets a polite fallback (`fallback: true`) instead of silence. If the
//! asking session ends, the stream is dropped at once, which cancels the
//! call upstream so the answerer stops generating.

use std::sync::Arc;
use std::time::Duration;

use fengda_proto::nlp::v1::{AnswerRequest, Role as WireRole, Turn};
use futures::StreamExt;
use tracing::{debug, warn};

use crate::backend::{Appended, Backend, NewEvent, StoredEvent};
use crate::ids::{ConversationKey, generate_reply_id};
use crate::nlp::{NlpClient, NlpError};
use crate::protocol::{Role, ServerFrame};

/// A stored customer message waiting for its answer.
#[derive(Debug)]
pub struct Question {
    pub seq: u64,
    pub text: String,
}

/// What the replier needs, shared by all sessions of the node.
#[derive(Clone)]
pub struct Replier {
    pub backend: Arc<dyn Backend>,
    pub nlp: NlpClient,
    pub history_turns: usize,
    pub first_chunk_timeout: Duration,
}

const FALLBACK_EN: &str =
    "Sorry, I can't answer right now. Please try again in a moment, or type 'agent' to reach a person.";
const FALLBACK_ZH: &str = "抱歉，我暂时无法回答。请稍后再试，或输入“人工”联系客服。";

/// Why the NLP stream did not complete.
#[derive(Debug, thiserror::Error)]
enum StreamFailure {
    #[error("no first chunk within the deadline")]
    FirstChunkTimeout,
    #[error(transparent)]
    Nlp(#[from] NlpError),
    #[error("stream ended without a finish chunk")]
    Truncated,
}

impl Replier {
    /// Streams and stores the answer to `question`. Cancel-safe: dropping the
    /// future stops the NLP call and stores nothing.
    pub async fn answer(&self, key: &ConversationKey, question: Question) {
        let reply_id = generate_reply_id();
        let history = match self.backend.recent_turns(key, self.history_turns + 1).await {
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
        let mut reply =
            ReplyStream { backend: &*self.backend, key, reply_id: &reply_id, text: String::new(), index: 0 };
        let fallback = match self.stream(request, &mut reply).await {
            Ok(()) => false,
            Err(failure) => {
                warn!(error = %failure, tokens = reply.index, "NLP answer failed; sending fallback");
                let polite = if mostly_cjk(&question.text) { FALLBACK_ZH } else { FALLBACK_EN };
                let separator = if reply.text.is_empty() { "" } else { "\n\n" };
                reply.push(&format!("{separator}{polite}"));
                true
            }
        };
        // The deltas must reach every node before the reply.done does.
        self.backend.flush_ephemeral().await;
        let event = NewEvent { from: Role::Assistant, id: reply_id.clone(), text: reply.text, fallback };
        match self.backend.append(key, event, None).await {
            Ok(Appended::New(seq)) => debug!(seq, fallback, "reply stored"),
            Ok(Appended::Duplicate(_)) => {}
            Err(error) => warn!(%error, "reply streamed but could not be stored"),
        }
    }

    async fn stream(&self, request: AnswerRequest, reply: &mut ReplyStream<'_>) -> Result<(), StreamFailure> {
        let first = async {
            let mut stream = self.nlp.answer(request).await?;
            let first = stream.message().await.map_err(NlpError::from)?;
            Ok::<_, StreamFailure>((stream, first))
        };
        let (mut stream, mut next) = tokio::time::timeout(self.first_chunk_timeout, first)
            .await
            .map_err(|_| StreamFailure::FirstChunkTimeout)??;
        loop {
            let Some(chunk) = next else { return Err(StreamFailure::Truncated) };
            if !chunk.text.is_empty() {
                reply.push(&chunk.text);
            }
            if chunk.finish != 0 {
                // Read the stream to its end so the HTTP/2 stream closes
                // cleanly; dropping it here would reset it, and a server
                // answers too many resets with GOAWAY.
                while let Ok(Some(_)) = stream.message().await {}
                return Ok(());
            }
            next = match stream.next().await {
                Some(item) => Some(item.map_err(NlpError::from)?),
                None => None,
            };
        }
    }
}

/// The reply being built: publishes each token as a delta and keeps the text.
struct ReplyStream<'a> {
    backend: &'a dyn Backend,
    key: &'a ConversationKey,
    reply_id: &'a str,
    text: String,
    index: u32,
}

impl ReplyStream<'_> {
    fn push(&mut self, token: &str) {
        let frame = ServerFrame::ReplyDelta {
            conversation: self.key.conversation.as_str(),
            reply: self.reply_id,
            index: self.index,
            text: token,
        }
        .encode();
        self.backend.publish_ephemeral(self.key, frame);
        self.text.push_str(token);
        self.index += 1;
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
        Arc::new(StoredEvent { seq, from, id: seq.to_string(), text: format!("t{seq}"), fallback: false, at_ms: 0 })
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

    #[test]
    fn fallback_language_follows_the_question() {
        assert!(mostly_cjk("金卡年费多少？"));
        assert!(!mostly_cjk("How much is the Gold Card?"));
    }
}
