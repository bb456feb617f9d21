//! The tonic implementation of `fengda.nlp.v1.Nlp`.
//!
//! Each `Answer` call is validated, turned into a [`BackendRequest`] and
//! handed to the [`AnswerBackend`], whose tokens a [`ChunkStream`] numbers
//! into chunks. A spawned producer (`run_producer`) feeds those into a
//! bounded channel that tonic drains as the response stream. (A hub running
//! the built-in answerer in-process polls the [`ChunkStream`] itself:
//! [`NlpService::answer_in_process`].) When the client goes away tonic drops that stream, the
//! channel closes, and the producer stops at once and drops the backend
//! stream: that drop is how a backend learns to stop generating (tonic #196,
//! #377). A backend error ends the call with a [`Status`]; it is never
//! retried or polled again (tonic #222).
//!
//! The bridge's own [`Limits`] apply before any backend work: at most
//! `max_concurrent_streams` answers in flight (one more is refused at once
//! with `RESOURCE_EXHAUSTED`; a permit lives as long as its producer), ids
//! and the question are size-checked and a request id must be visible ASCII
//! (`INVALID_ARGUMENT`), and history is
//! trimmed to the most recent turns that fit the turn and byte caps.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use fengda_proto::nlp::v1::{AnswerChunk, AnswerRequest, FinishReason, nlp_server::Nlp};
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::backend::{
    AnswerBackend, BackendRequest, BuiltinBackend, ConversationId, Finish, HistoryTurn, TenantId, TenantRouter, Token,
    TokenStream, TurnRole, Usage,
};
use crate::config::{AnswererConfig, BridgeConfig, Limits};
use crate::error::BridgeError;

/// Chunks buffered between the producer and the gRPC response. Small: the
/// producer should feel back-pressure from a slow client, not run ahead.
pub const CHUNK_BUFFER: usize = 32;
/// Longest accepted question, in bytes, by default ([`Limits`]).
pub const MAX_QUESTION_BYTES: usize = 8 * 1024;
/// History turns passed to the backend, by default ([`Limits`]).
pub const MAX_HISTORY_TURNS: usize = 32;

/// The `Nlp` gRPC service. Cheap to clone; clones share the backend, the
/// limits, the stream permits and the task tracker.
#[derive(Clone)]
pub struct NlpService {
    backend: Arc<dyn AnswerBackend>,
    limits: Arc<Limits>,
    /// One permit per answer in flight, held by its producer task. Acquired
    /// with `try_acquire`: over the limit a call fails, it never waits.
    streams: Arc<Semaphore>,
    /// Every producer task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Set once shutdown begins: new calls are refused as draining.
    draining: Arc<AtomicBool>,
}

impl std::fmt::Debug for NlpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NlpService")
            .field("producers", &self.tasks.len())
            .field("free_streams", &self.streams.available_permits())
            .finish_non_exhaustive()
    }
}

impl NlpService {
    /// A service answering with `backend`, with default [`Limits`].
    pub fn new(backend: Arc<dyn AnswerBackend>) -> Self {
        Self::with_limits(backend, Limits::default())
    }

    /// A service answering with `backend` within `limits`.
    pub fn with_limits(backend: Arc<dyn AnswerBackend>, limits: Limits) -> Self {
        let streams = Arc::new(Semaphore::new(limits.max_concurrent_streams.clamp(1, Semaphore::MAX_PERMITS)));
        Self { backend, limits: Arc::new(limits), streams, tasks: TaskTracker::new(), draining: Arc::default() }
    }

    /// A service answering with the built-in FAQ answerer.
    pub fn builtin(config: &AnswererConfig) -> Result<Self, BridgeError> {
        Ok(Self::new(Arc::new(BuiltinBackend::new(config)?)))
    }

    /// The service the `fengda-nlp` binary runs: every configured backend,
    /// routed per tenant, within `config.limits`. API keys come from the
    /// process environment.
    pub fn from_config(config: &BridgeConfig) -> Result<Self, BridgeError> {
        Self::from_config_with_env(config, &|name| std::env::var(name).ok())
    }

    /// [`Self::from_config`] with API keys looked up through `env`.
    pub fn from_config_with_env(
        config: &BridgeConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, BridgeError> {
        let router = TenantRouter::from_config(config, env)?;
        Ok(Self::with_limits(Arc::new(router), config.limits.clone()))
    }

    /// The producer tasks of this service (and its clones).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Answer streams this service runs at once (`limits.max_concurrent_streams`).
    pub fn max_streams(&self) -> usize {
        self.limits.max_concurrent_streams
    }

    /// Refuses every new call from now on with `UNAVAILABLE` marked
    /// [`fengda_proto::DRAINING_HEADER`]; answers in flight go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

impl NlpService {
    /// Answers in the caller's task: the same validation, limits and chunks
    /// as the gRPC method, without the producer task and channel that tonic
    /// needs (it drives a response stream from its connection task). For a
    /// hub that runs the built-in answerer in-process. Dropping the stream
    /// cancels the backend's work and frees the stream slot.
    pub fn answer_in_process(&self, request: Request<AnswerRequest>) -> Result<ChunkStream, Status> {
        // The caller's span already names the tenant and the conversation;
        // a span of its own per answer would cost more than the lookup.
        let (tokens, permit, span) = self.start(request, |_| tracing::Span::none())?;
        Ok(ChunkStream { tokens, index: 0, done: false, usage: None, _permit: permit, span })
    }

    /// Validates a call, takes a stream slot and starts the backend, in the
    /// span `span_of` makes for the request (its request id is resolved).
    fn start(
        &self,
        request: Request<AnswerRequest>,
        span_of: impl FnOnce(&AnswerRequest) -> tracing::Span,
    ) -> Result<(TokenStream, OwnedSemaphorePermit, tracing::Span), Status> {
        if self.draining.load(Ordering::Acquire) {
            let mut status = Status::unavailable("the bridge is shutting down; send the call to another bridge");
            status
                .metadata_mut()
                .insert(fengda_proto::DRAINING_HEADER, tonic::metadata::MetadataValue::from_static("1"));
            return Err(status);
        }
        let header_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut message = request.into_inner();
        if let Some(id) = header_id {
            message.request_id = id;
        }
        // It goes into logs and an upstream header: no control characters, no spaces.
        if message.request_id.len() > self.limits.max_id_bytes
            || !message.request_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Status::invalid_argument(format!(
                "request_id must be at most {} bytes of visible ASCII",
                self.limits.max_id_bytes
            )));
        }
        let span = span_of(&message);
        let request_id = std::mem::take(&mut message.request_id);
        let backend_request = span.in_scope(|| {
            let req = to_backend_request(message, request_id, &self.limits);
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
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            // Backpressure a hub handles (it queues the question and lowers its limit), not an error.
            span.in_scope(|| tracing::debug!(limit = self.limits.max_concurrent_streams, "too many answer streams"));
            return Err(Status::resource_exhausted("too many concurrent answer streams; retry later"));
        };
        let tokens = span.in_scope(|| self.backend.answer(backend_request));
        Ok((tokens, permit, span))
    }
}

#[tonic::async_trait]
impl Nlp for NlpService {
    type AnswerStream = ReceiverStream<Result<AnswerChunk, Status>>;

    async fn answer(&self, request: Request<AnswerRequest>) -> Result<Response<Self::AnswerStream>, Status> {
        let span_of = |message: &AnswerRequest| {
            tracing::info_span!(
                "nlp.answer",
                tenant_id = %message.tenant_id,
                conversation_id = %message.conversation_id,
                request_id = %message.request_id,
            )
        };
        let (tokens, permit, span) = self.start(request, span_of)?;
        let chunks = ChunkStream { tokens, index: 0, done: false, usage: None, _permit: permit, span: span.clone() };
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNK_BUFFER);
        self.tasks.spawn(run_producer(chunks, chunk_tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(chunk_rx)))
    }
}

/// One answer's chunks: the backend's tokens numbered from 0, the last one
/// carrying the finish reason; a backend error ends it with a [`Status`].
/// Holds the answer's stream slot until dropped.
pub struct ChunkStream {
    tokens: TokenStream,
    index: u32,
    done: bool,
    /// The backend's token count, for the last chunk.
    usage: Option<Usage>,
    _permit: OwnedSemaphorePermit,
    span: tracing::Span,
}

impl Stream for ChunkStream {
    type Item = Result<AnswerChunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let (text, finish) = match std::task::ready!(self.tokens.poll_next_unpin(cx)) {
                Some(Ok(Token::Text(text))) if text.is_empty() => continue,
                Some(Ok(Token::Text(text))) => (text, None),
                Some(Ok(Token::Usage(usage))) => {
                    self.usage = Some(usage);
                    continue;
                }
                Some(Ok(Token::End(finish))) => (String::new(), Some(finish.into())),
                None => {
                    self.span
                        .in_scope(|| tracing::warn!("backend stream ended without a finish reason; reporting STOP"));
                    (String::new(), Some(Finish::Stop.into()))
                }
                Some(Err(error)) => {
                    self.span.in_scope(|| {
                        tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "backend failed")
                    });
                    self.done = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
            };
            let chunk = AnswerChunk {
                index: self.index,
                text,
                finish: finish.unwrap_or(FinishReason::Unspecified) as i32,
                usage: finish.and(self.usage.take()).map(Into::into),
            };
            self.index += 1;
            if let Some(reason) = finish {
                self.done = true;
                self.span.in_scope(|| {
                    tracing::debug!(chunks = self.index, finish = reason.as_str_name(), "answer finished")
                });
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
    }
}

/// Validates the wire request against `limits` and converts it to the
/// backend's types. History is trimmed (oldest first), never rejected.
fn to_backend_request(message: AnswerRequest, request_id: String, limits: &Limits) -> Result<BackendRequest, Status> {
    if message.tenant_id.trim().is_empty() {
        return Err(Status::invalid_argument("tenant_id is empty"));
    }
    if message.tenant_id.len() > limits.max_id_bytes || message.conversation_id.len() > limits.max_id_bytes {
        return Err(Status::invalid_argument(format!(
            "tenant_id and conversation_id must be at most {} bytes",
            limits.max_id_bytes
        )));
    }
    if message.question.trim().is_empty() {
        return Err(Status::invalid_argument("question is empty"));
    }
    if message.question.len() > limits.max_question_bytes {
        return Err(Status::invalid_argument(format!("question is longer than {} bytes", limits.max_question_bytes)));
    }
    // Walk back from the newest turn while both caps allow.
    let mut budget = limits.max_history_bytes;
    let mut history: Vec<HistoryTurn> = message
        .history
        .into_iter()
        .rev()
        .map(|turn| HistoryTurn::new(turn.role().into(), turn.text))
        .filter(|turn| turn.role != TurnRole::System || !turn.text.is_empty())
        .take(limits.max_history_turns)
        .take_while(|turn| match budget.checked_sub(turn.text.len()) {
            Some(left) => {
                budget = left;
                true
            }
            None => false,
        })
        .collect();
    history.reverse();
    Ok(BackendRequest {
        tenant: TenantId::new(message.tenant_id),
        conversation: ConversationId::new(message.conversation_id),
        request_id,
        history,
        question: message.question,
    })
}

/// Moves an answer's chunks into the response channel until the answer
/// ends, fails, or the client goes away. Returning drops `chunks`, which
/// cancels the backend's work and frees the stream slot.
async fn run_producer(mut chunks: ChunkStream, chunk_tx: mpsc::Sender<Result<AnswerChunk, Status>>) {
    // The backend's error, once sent, ends the answer ([`ChunkStream`] logged it).
    let mut failed = false;
    loop {
        let item = tokio::select! {
            biased;
            // Notices a departed client even while the backend is thinking.
            () = chunk_tx.closed() => break,
            item = chunks.next() => item,
        };
        let Some(item) = item else { return };
        failed = item.is_err();
        if chunk_tx.send(item).await.is_err() {
            break;
        }
    }
    if failed {
        tracing::info!(chunks = chunks.index, "answer failed");
    } else {
        tracing::info!(chunks = chunks.index, "client went away; answer cancelled");
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
        let limits = Limits::default();
        let ok = to_backend_request(wire("hello"), "r".into(), &limits).unwrap();
        assert_eq!(ok.history, [HistoryTurn::new(TurnRole::Customer, "hi")]);
        let empty = to_backend_request(wire("  "), "r".into(), &limits).unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
        let mut no_tenant = wire("hello");
        no_tenant.tenant_id.clear();
        assert!(to_backend_request(no_tenant, "r".into(), &limits).is_err());
        let mut long_id = wire("hello");
        long_id.conversation_id = "c".repeat(limits.max_id_bytes + 1);
        assert_eq!(to_backend_request(long_id, "r".into(), &limits).unwrap_err().code(), tonic::Code::InvalidArgument);
        let long = "x".repeat(MAX_QUESTION_BYTES + 1);
        assert!(to_backend_request(wire(&long), "r".into(), &limits).is_err());
    }

    #[test]
    fn history_keeps_the_newest_turns_within_both_caps() {
        let limits = Limits { max_history_turns: 3, max_history_bytes: 10, ..Limits::default() };
        let mut message = wire("q");
        message.history = ["aaaa", "bbbb", "", "cccc", "dd", "eeee"]
            .iter()
            .map(|t| Turn { role: if t.is_empty() { Role::System } else { Role::Customer } as i32, text: (*t).into() })
            .collect();
        let texts: Vec<String> = to_backend_request(message.clone(), "r".into(), &limits)
            .unwrap()
            .history
            .into_iter()
            .map(|t| t.text)
            .collect();
        assert_eq!(texts, ["cccc", "dd", "eeee"]);
        let limits = Limits { max_history_bytes: 9, ..limits };
        let texts: Vec<String> =
            to_backend_request(message, "r".into(), &limits).unwrap().history.into_iter().map(|t| t.text).collect();
        assert_eq!(texts, ["dd", "eeee"]);
    }

    fn chunks(tokens: TokenStream) -> ChunkStream {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        ChunkStream { tokens, index: 0, done: false, usage: None, _permit: permit, span: tracing::Span::none() }
    }

    /// The chunks a gRPC client gets (through the producer task), checked
    /// against what an in-process caller gets from the same tokens.
    async fn drain(items: impl Fn() -> Vec<Result<Token, BackendError>>) -> Vec<Result<AnswerChunk, Status>> {
        let (tx, rx) = mpsc::channel(CHUNK_BUFFER);
        run_producer(chunks(stream::iter(items()).boxed()), tx).await;
        let produced: Vec<_> = ReceiverStream::new(rx).collect().await;
        let direct: Vec<_> = chunks(stream::iter(items()).boxed()).collect().await;
        let summary = |items: &[Result<AnswerChunk, Status>]| -> Vec<String> {
            items.iter().map(|item| format!("{:?}", item.as_ref().map_err(Status::code))).collect()
        };
        assert_eq!(summary(&produced), summary(&direct));
        produced
    }

    #[tokio::test]
    async fn backend_error_ends_the_stream_with_a_status() {
        let items = || vec![Ok(Token::Text("a".into())), Err(BackendError::Timeout), Ok(Token::Text("never".into()))];
        let out = drain(items).await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().unwrap().text, "a");
        let status = out[1].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn missing_end_is_reported_as_stop_and_tokens_after_end_are_ignored() {
        let out = drain(|| vec![Ok(Token::Text("a".into()))]).await;
        let last = out.last().unwrap().as_ref().unwrap();
        assert_eq!((last.index, last.finish()), (1, FinishReason::Stop));

        let items =
            || vec![Ok(Token::Text(String::new())), Ok(Token::End(Finish::NoMatch)), Ok(Token::Text("late".into()))];
        let out = drain(items).await;
        assert_eq!(out.len(), 1);
        let only = out[0].as_ref().unwrap();
        assert_eq!((only.index, only.finish()), (0, FinishReason::NoMatch));
    }
}
