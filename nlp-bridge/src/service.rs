//! The tonic implementation of `fengda.nlp.v1.Nlp`.
//!
//! Each `Answer` call is validated, turned into a [`BackendRequest`] and
//! handed to the [`AnswerBackend`]. A spawned producer ([`run_producer`])
//! feeds the backend's tokens into a bounded channel that tonic drains as the
//! response stream. When the client goes away tonic drops that stream, the
//! channel closes, and the producer stops at once and drops the backend
//! stream: that drop is how a backend learns to stop generating (tonic #196,
//! #377). A backend error ends the call with a [`Status`]; it is never
//! retried or polled again (tonic #222).

use std::sync::Arc;

use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, FinishReason, nlp_server::Nlp};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::backend::{
    AnswerBackend, BackendRequest, BuiltinBackend, ConversationId, Finish, HistoryTurn, TenantId, Token, TokenStream,
    TurnRole,
};
use crate::config::AnswererConfig;
use crate::error::BridgeError;

/// Chunks buffered between the producer and the gRPC response. Small: the
/// producer should feel back-pressure from a slow client, not run ahead.
pub const CHUNK_BUFFER: usize = 32;
/// Longest accepted question, in bytes.
pub const MAX_QUESTION_BYTES: usize = 8 * 1024;
/// Only the most recent history turns are passed to the backend.
pub const MAX_HISTORY_TURNS: usize = 32;

/// The `Nlp` gRPC service. Cheap to clone; clones share the backend and the
/// task tracker.
#[derive(Clone)]
pub struct NlpService {
    backend: Arc<dyn AnswerBackend>,
    /// Every producer task, so shutdown can wait for them.
    tasks: TaskTracker,
}

impl std::fmt::Debug for NlpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NlpService").field("producers", &self.tasks.len()).finish_non_exhaustive()
    }
}

impl NlpService {
    /// A service answering with `backend`.
    pub fn new(backend: Arc<dyn AnswerBackend>) -> Self {
        Self { backend, tasks: TaskTracker::new() }
    }

    /// A service answering with the built-in FAQ answerer.
    pub fn builtin(config: &AnswererConfig) -> Result<Self, BridgeError> {
        Ok(Self::new(Arc::new(BuiltinBackend::new(config)?)))
    }

    /// The producer tasks of this service (and its clones).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }
}

#[tonic::async_trait]
impl Nlp for NlpService {
    type AnswerStream = ReceiverStream<Result<AnswerChunk, Status>>;

    async fn answer(&self, request: Request<AnswerRequest>) -> Result<Response<Self::AnswerStream>, Status> {
        let header_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let message = request.into_inner();
        let request_id = header_id.unwrap_or_else(|| message.request_id.clone());
        let span = tracing::info_span!(
            "nlp.answer",
            tenant_id = %message.tenant_id,
            conversation_id = %message.conversation_id,
            request_id = %request_id,
        );
        let backend_request = span.in_scope(|| {
            let req = to_backend_request(message, request_id);
            match &req {
                Ok(req) => tracing::debug!(
                    question_chars = req.question.chars().count(),
                    history_turns = req.history.len(),
                    "answer started"
                ),
                Err(status) => tracing::info!(code = ?status.code(), "answer rejected"),
            }
            req
        })?;
        let tokens = span.in_scope(|| self.backend.answer(backend_request));
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNK_BUFFER);
        self.tasks.spawn(run_producer(tokens, chunk_tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(chunk_rx)))
    }
}

/// Validates the wire request and converts it to the backend's types.
fn to_backend_request(message: AnswerRequest, request_id: String) -> Result<BackendRequest, Status> {
    if message.tenant_id.trim().is_empty() {
        return Err(Status::invalid_argument("tenant_id is empty"));
    }
    if message.question.trim().is_empty() {
        return Err(Status::invalid_argument("question is empty"));
    }
    if message.question.len() > MAX_QUESTION_BYTES {
        return Err(Status::invalid_argument(format!("question is longer than {MAX_QUESTION_BYTES} bytes")));
    }
    let skip = message.history.len().saturating_sub(MAX_HISTORY_TURNS);
    let history = message
        .history
        .into_iter()
        .skip(skip)
        .map(|turn| {
            let role = turn.role().into();
            HistoryTurn::new(role, turn.text)
        })
        .filter(|turn: &HistoryTurn| turn.role != TurnRole::System || !turn.text.is_empty())
        .collect();
    Ok(BackendRequest {
        tenant: TenantId::new(message.tenant_id),
        conversation: ConversationId::new(message.conversation_id),
        request_id,
        history,
        question: message.question,
    })
}

/// How a producer ended; logged once per call.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Finished(FinishReason),
    ClientGone,
    BackendFailed,
}

/// Moves tokens from the backend to the response channel, numbering them,
/// until the answer ends, the backend fails, or the client goes away.
/// Returning drops `tokens`, which cancels the backend's work.
async fn run_producer(mut tokens: TokenStream, chunk_tx: mpsc::Sender<Result<AnswerChunk, Status>>) {
    let mut index: u32 = 0;
    let outcome = loop {
        let item = tokio::select! {
            biased;
            // Notices a departed client even while the backend is thinking.
            () = chunk_tx.closed() => break Outcome::ClientGone,
            item = tokens.next() => item,
        };
        let (text, finish) = match item {
            Some(Ok(Token::Text(text))) if text.is_empty() => continue,
            Some(Ok(Token::Text(text))) => (text, None),
            Some(Ok(Token::End(finish))) => (String::new(), Some(finish.into())),
            None => {
                tracing::warn!("backend stream ended without a finish reason; reporting STOP");
                (String::new(), Some(Finish::Stop.into()))
            }
            Some(Err(error)) => {
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "backend failed");
                // The client may be gone too; nothing more to do either way.
                let _ = chunk_tx.send(Err(error.into())).await;
                break Outcome::BackendFailed;
            }
        };
        let chunk = AnswerChunk { index, text, finish: finish.unwrap_or(FinishReason::Unspecified) as i32 };
        index += 1;
        if chunk_tx.send(Ok(chunk)).await.is_err() {
            break Outcome::ClientGone;
        }
        if let Some(reason) = finish {
            break Outcome::Finished(reason);
        }
    };
    drop(tokens);
    match outcome {
        Outcome::Finished(reason) => {
            tracing::debug!(chunks = index, finish = reason.as_str_name(), "answer finished")
        }
        Outcome::ClientGone => tracing::info!(chunks = index, "client went away; answer cancelled"),
        Outcome::BackendFailed => tracing::info!(chunks = index, "answer failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BackendError;
    use fengda_proto::nlp::v1::{Role, Turn};
    use futures::stream;

    fn wire(question: &str) -> AnswerRequest {
        AnswerRequest {
            tenant_id: "demo".into(),
            conversation_id: "c".into(),
            request_id: "r".into(),
            history: vec![Turn { role: Role::Customer as i32, text: "hi".into() }],
            question: question.into(),
        }
    }

    #[test]
    fn validation() {
        let ok = to_backend_request(wire("hello"), "r".into()).unwrap();
        assert_eq!(ok.history, [HistoryTurn::new(TurnRole::Customer, "hi")]);
        let empty = to_backend_request(wire("  "), "r".into()).unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
        let mut no_tenant = wire("hello");
        no_tenant.tenant_id.clear();
        assert!(to_backend_request(no_tenant, "r".into()).is_err());
        let long = "x".repeat(MAX_QUESTION_BYTES + 1);
        assert!(to_backend_request(wire(&long), "r".into()).is_err());
    }

    async fn drain(tokens: TokenStream) -> Vec<Result<AnswerChunk, Status>> {
        let (tx, rx) = mpsc::channel(CHUNK_BUFFER);
        run_producer(tokens, tx).await;
        ReceiverStream::new(rx).collect().await
    }

    #[tokio::test]
    async fn backend_error_ends_the_stream_with_a_status() {
        let items = vec![Ok(Token::Text("a".into())), Err(BackendError::Timeout), Ok(Token::Text("never".into()))];
        let out = drain(stream::iter(items).boxed()).await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().unwrap().text, "a");
        let status = out[1].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn missing_end_is_reported_as_stop_and_tokens_after_end_are_ignored() {
        let out = drain(stream::iter([Ok(Token::Text("a".into()))]).boxed()).await;
        let last = out.last().unwrap().as_ref().unwrap();
        assert_eq!((last.index, last.finish()), (1, FinishReason::Stop));

        let items = [Ok(Token::Text(String::new())), Ok(Token::End(Finish::NoMatch)), Ok(Token::Text("late".into()))];
        let out = drain(stream::iter(items).boxed()).await;
        assert_eq!(out.len(), 1);
        let only = out[0].as_ref().unwrap();
        assert_eq!((only.index, only.finish()), (0, FinishReason::NoMatch));
    }
}
