//! The seam between the gRPC service and whatever produces answers.
//!
//! An [`AnswerBackend`] turns one owned [`BackendRequest`] into a stream of
//! [`Token`]s. The contract is shaped for an LLM client: the stream is lazy
//! (nothing happens until it is polled), may fail mid-way with a
//! [`BackendError`], and ends with exactly one [`Token::End`]. Dropping the
//! stream is the cancellation signal: a backend must release everything it
//! holds (abort the upstream HTTP request, stop generating) in its `Drop`.
//! The service drops it as soon as the gRPC client goes away.
//!
//! Implementations: [`builtin`], a deterministic FAQ answerer, and
//! [`openai`], a client of any OpenAI-compatible chat-completions server.
//! [`router`] picks one per tenant; [`limit`] keeps a backend within its
//! concurrency limits.

pub mod builtin;
pub mod limit;
pub mod openai;
pub mod router;

use fengda_proto::nlp::v1 as pb;
use futures::stream::BoxStream;

pub use crate::error::BackendError;
pub use builtin::BuiltinBackend;
pub use openai::OpenAiBackend;
pub use router::TenantRouter;

/// Produces streamed answers. Implementations are shared across calls
/// (`Arc<dyn AnswerBackend>`), so per-call state lives in the returned stream.
pub trait AnswerBackend: Send + Sync + 'static {
    /// Starts answering `request`. Setup work that can fail (connecting,
    /// sending the upstream request) belongs inside the stream, so its
    /// errors arrive as the first item.
    fn answer(&self, request: BackendRequest) -> TokenStream;
}

/// What a backend yields: tokens, then one [`Token::End`], or an error.
pub type TokenStream = BoxStream<'static, Result<Token, BackendError>>;

/// One item of an answer stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    /// A piece of answer text; concatenating all pieces gives the answer.
    Text(String),
    /// The model's own count of the answer's tokens, when it reports one;
    /// at most once, before [`Token::End`], whose chunk carries it.
    Usage(Usage),
    /// The answer is over. Anything after it is ignored. A stream that ends
    /// without it is reported to the client as [`Finish::Stop`].
    End(Finish),
}

/// Tokens a model counted for one answer (an OpenAI-compatible server's
/// trailing `usage` chunk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt: system prompt, context, history, question.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

impl From<Usage> for pb::Usage {
    fn from(usage: Usage) -> Self {
        pb::Usage { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens }
    }
}

/// Why an answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The answer is complete.
    Stop,
    /// The backend stopped at its length limit.
    Length,
    /// No confident answer; the text was the polite default.
    NoMatch,
}

impl From<Finish> for pb::FinishReason {
    fn from(finish: Finish) -> Self {
        match finish {
            Finish::Stop => pb::FinishReason::Stop,
            Finish::Length => pb::FinishReason::Length,
            Finish::NoMatch => pb::FinishReason::NoMatch,
        }
    }
}

/// Everything a backend may use to answer one question. Owned, so the
/// stream can outlive the gRPC handler.
#[derive(Clone, Debug)]
pub struct BackendRequest {
    pub tenant: TenantId,
    pub conversation: ConversationId,
    /// Correlates logs with the hub; may be empty.
    pub request_id: String,
    /// Recent turns, oldest first, not including `question`.
    pub history: Vec<HistoryTurn>,
    /// The customer's question; never empty (the service checks).
    pub question: String,
}

/// One earlier turn of the conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryTurn {
    pub role: TurnRole,
    pub text: String,
}

impl HistoryTurn {
    pub fn new(role: TurnRole, text: impl Into<String>) -> Self {
        Self { role, text: text.into() }
    }
}

/// Who spoke a [`HistoryTurn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnRole {
    Customer,
    /// The automated assistant (an earlier answer of a backend).
    Assistant,
    /// A human agent.
    Agent,
    /// System notes, and roles this version does not know.
    System,
}

impl From<pb::Role> for TurnRole {
    fn from(role: pb::Role) -> Self {
        match role {
            pb::Role::Customer => TurnRole::Customer,
            pb::Role::Assistant => TurnRole::Assistant,
            pb::Role::Agent => TurnRole::Agent,
            pb::Role::Unspecified | pb::Role::System => TurnRole::System,
        }
    }
}

fengda_proto::string_id!(
    /// The tenant a conversation belongs to; backends never mix tenants' data.
    TenantId
);
fengda_proto::string_id!(
    /// A conversation within a tenant.
    ConversationId
);
