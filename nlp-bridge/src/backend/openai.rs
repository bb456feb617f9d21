//! An OpenAI-compatible chat-completions backend: vLLM, Ollama, llama.cpp's
//! server or a hosted API, streamed with `stream: true` (server-sent events).
//!
//! One call is one `POST {base_url}/chat/completions`. The prompt is the
//! system message (the tenant's system prompt, then, when the backend is
//! grounded, its heading and the tenant's best-matching knowledge-base
//! entries: see [`Grounding`]), the history as chat messages (customer →
//! `user`, assistant and agent → `assistant`, system → `system`) and the
//! question as the last `user` message; the caller's request id goes in the
//! configured `request_id_header` (default `x-request-id`). Every non-empty
//! `choices[0].delta.content` is forwarded as one [`Token::Text`] the moment
//! it arrives. `finish_reason` (`length` → [`Finish::Length`], anything else
//! → [`Finish::Stop`]) ends the answer at `data: [DONE]`, after the trailing
//! `usage` chunk that `stream_options.include_usage` asks for, which becomes
//! a [`Token::Usage`]; a server that sends no `[DONE]` within
//! [`TRAILER_TIMEOUT`] of the finish reason ends it there. A stream that
//! ends, `[DONE]` included, before any finish reason is broken: the answer
//! was cut short. SSE framing, comments and keep-alives are handled by
//! `eventsource-stream`.
//!
//! The whole call lives inside the returned stream: no task is spawned, so
//! dropping the stream (the gRPC client went away) drops the in-flight
//! request or the response body, which closes the upstream connection, and
//! the server stops generating.
//!
//! Failures follow one rule: before any text was yielded they are retryable
//! ([`BackendError::Unavailable`] for connect errors, timeouts and broken
//! streams, [`BackendError::UpstreamStatus`] for HTTP errors); after text was
//! yielded they are [`BackendError::Interrupted`] (`ABORTED`), because a
//! partial answer already reached the customer.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{AnswerBackend, BackendRequest, Finish, Token, TokenStream, TurnRole, Usage};
use crate::config::{GroundingConfig, OpenAiConfig};
use crate::error::{BackendError, BoxError, BridgeError};
use crate::knowledge::KnowledgeBase;

/// Bytes of an error response body kept for the log.
const ERROR_BODY_BYTES: usize = 512;

/// How long after the finish reason the usage chunk and `[DONE]` may take;
/// past it the answer ends without them.
pub const TRAILER_TIMEOUT: Duration = Duration::from_secs(2);

/// The OpenAI-compatible backend. Cheap to share: `reqwest::Client` is a
/// handle to a connection pool.
#[derive(Clone)]
pub struct OpenAiBackend {
    client: reqwest::Client,
    config: OpenAiConfig,
    endpoint: String,
    /// Sent as `Authorization: Bearer ...`; never logged.
    api_key: Option<String>,
    /// Where context comes from, when the backend is grounded.
    grounding: Option<Grounding>,
    /// The header carrying the request id upstream; `None`: not sent.
    request_id_header: Option<reqwest::header::HeaderName>,
}

/// A grounded backend's retriever: its knowledge base (shared by every
/// call) and its settings.
#[derive(Clone, Debug)]
pub struct Grounding {
    knowledge: std::sync::Arc<KnowledgeBase>,
    config: GroundingConfig,
}

impl Grounding {
    /// Loads the configured (or embedded) knowledge base.
    pub fn new(config: &GroundingConfig) -> Result<Self, BridgeError> {
        let knowledge = match &config.path {
            Some(path) => KnowledgeBase::from_path(path)?,
            None => KnowledgeBase::embedded()?,
        };
        Ok(Self { knowledge: knowledge.into(), config: config.clone() })
    }

    /// The context for `request`: the heading, then its tenant's best
    /// entries (`top_k_for` the tenant) while their text fits `max_bytes`,
    /// best first, each as `Q: …` / `A: …`. `None` when no entry matches
    /// (or fits): the plain prompt.
    pub fn context(&self, request: &BackendRequest) -> Option<String> {
        let tenant = request.tenant.as_str();
        let k = self.config.top_k_for(tenant);
        let entries = self.knowledge.retrieve(tenant, &request.question, &request.history, k);
        let mut budget = self.config.max_bytes;
        let mut context = String::new();
        for entry in entries {
            let block = format!("\n\nQ: {}\nA: {}", entry.question, entry.answer);
            let Some(left) = budget.checked_sub(block.len()) else { break };
            budget = left;
            tracing::debug!(entry = %entry.id, "context entry");
            context.push_str(&block);
        }
        (!context.is_empty()).then(|| format!("{}{context}", self.config.heading))
    }
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("endpoint", &self.endpoint)
            .field("model", &self.config.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl OpenAiBackend {
    /// Builds the backend, reading the API key from the process environment.
    pub fn new(config: &OpenAiConfig) -> Result<Self, BridgeError> {
        Self::with_env(config, |name| std::env::var(name).ok())
    }

    /// Builds the backend, looking the variable named by `api_key_env` up
    /// with `env` (tests pass a map instead of touching the process env).
    pub fn with_env(config: &OpenAiConfig, env: impl Fn(&str) -> Option<String>) -> Result<Self, BridgeError> {
        let api_key = match &config.api_key_env {
            None => None,
            Some(name) => match env(name) {
                Some(key) if !key.trim().is_empty() => Some(key.trim().to_owned()),
                _ => {
                    return Err(BridgeError::InvalidConfig(format!(
                        "api_key_env: environment variable {name} is not set or empty"
                    )));
                }
            },
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| BridgeError::InvalidConfig(format!("cannot build the HTTP client: {e}")))?;
        let grounding = config.knowledge.as_ref().map(Grounding::new).transpose()?;
        let request_id_header = config.request_id_header_name().map_err(BridgeError::InvalidConfig)?;
        Ok(Self { client, endpoint: config.endpoint(), config: config.clone(), api_key, grounding, request_id_header })
    }

    /// The system message: the tenant's prompt and the grounding context,
    /// whichever there are, a blank line apart.
    fn system_message(&self, request: &BackendRequest) -> Option<String> {
        let prompt = self.config.system_prompt_for(request.tenant.as_str());
        let context = self.grounding.as_ref().and_then(|grounding| grounding.context(request));
        match (prompt, context) {
            (None, None) => None,
            (Some(prompt), None) => Some(prompt.to_owned()),
            (None, Some(context)) => Some(context),
            (Some(prompt), Some(context)) => Some(format!("{prompt}\n\n{context}")),
        }
    }

    /// The JSON body of the upstream request.
    fn body(&self, request: &BackendRequest) -> ChatRequest<'_> {
        let messages = self
            .system_message(request)
            .map(|content| ChatMessage { role: "system", content })
            .into_iter()
            .chain(request.history.iter().map(|turn| ChatMessage {
                role: match turn.role {
                    TurnRole::Customer => "user",
                    TurnRole::Assistant | TurnRole::Agent => "assistant",
                    TurnRole::System => "system",
                },
                content: turn.text.clone(),
            }))
            .chain([ChatMessage { role: "user", content: request.question.clone() }])
            .collect();
        ChatRequest {
            model: &self.config.model,
            messages,
            stream: true,
            max_tokens: self.config.max_tokens,
            temperature: self.config.temperature,
            stream_options: self.config.include_usage.then_some(StreamOptions { include_usage: true }),
            extra: &self.config.extra_body,
        }
    }
}

impl AnswerBackend for OpenAiBackend {
    fn answer(&self, request: BackendRequest) -> TokenStream {
        let mut http = self.client.post(&self.endpoint).json(&self.body(&request));
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        if let Some(header) = self.request_id_header.as_ref().filter(|_| !request.request_id.is_empty()) {
            http = http.header(header, &request.request_id);
        }
        let call = Call {
            http: Some(http),
            events: None,
            pending: VecDeque::new(),
            sent_text: false,
            done: false,
            finish: None,
            usage: None,
            // The clock starts when the stream is first polled, not here.
            deadline: None,
            timeout: Duration::from_millis(self.config.timeout_ms),
            idle_timeout: Duration::from_millis(self.config.idle_timeout_ms),
        };
        stream::unfold(call, Call::step).boxed()
    }
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<ChatMessage>,
    stream: bool,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    /// `extra_body`, which names none of the fields above (checked at startup).
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct ChatMessage {
    role: &'static str,
    content: String,
}

/// One `data:` payload of the stream. Unknown fields are ignored: servers add
/// their own (`usage`, `system_fingerprint`, ...).
#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    /// vLLM and others report mid-stream failures as `{"error": {...}}`.
    #[serde(default)]
    error: Option<serde_json::Value>,
    /// The token counts: on a trailing chunk without choices (OpenAI, vLLM),
    /// or on the last one (llama.cpp's `llama-server`).
    #[serde(default)]
    usage: Option<ChunkUsage>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

type Events = BoxStream<'static, Result<Event, EventStreamError<reqwest::Error>>>;

/// The state of one call, owned by the returned stream.
struct Call {
    /// The request, until it is sent.
    http: Option<reqwest::RequestBuilder>,
    /// The parsed response body, once the headers arrived.
    events: Option<Events>,
    /// Tokens parsed from one event and not yielded yet (text, then End).
    pending: VecDeque<Token>,
    /// Some text was yielded: failures are now `Interrupted`.
    sent_text: bool,
    /// End or an error was yielded; the stream is over.
    done: bool,
    /// The finish reason, once seen; the answer ends at `[DONE]`.
    finish: Option<Finish>,
    /// The latest token counts seen.
    usage: Option<Usage>,
    /// Deadline for the first text; set on the first poll.
    deadline: Option<Instant>,
    timeout: Duration,
    idle_timeout: Duration,
}

impl Call {
    /// The `unfold` step: the next token or error, then `None` forever.
    async fn step(mut self) -> Option<(Result<Token, BackendError>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if let Some(token) = self.pending.pop_front() {
                match token {
                    Token::Text(_) => self.sent_text = true,
                    Token::Usage(_) => {}
                    Token::End(_) => self.done = true,
                }
                return Some((Ok(token), self));
            }
            if let Err(error) = self.advance().await {
                self.done = true;
                // Release the connection now, not when the service drops us.
                self.events = None;
                return Some((Err(error), self));
            }
        }
    }

    /// Sends the request or reads the next event, queueing what it yields.
    async fn advance(&mut self) -> Result<(), BackendError> {
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + self.timeout);
        if let Some(http) = self.http.take() {
            let response = tokio::time::timeout_at(deadline, http.send())
                .await
                .map_err(|_| self.broken("no response before the deadline".into()))?
                .map_err(|e| self.broken(e.into()))?;
            let status = response.status();
            if !status.is_success() {
                let detail = tokio::time::timeout_at(deadline, error_detail(response)).await.unwrap_or_default();
                tracing::warn!(status = status.as_u16(), %detail, "upstream refused the request");
                return Err(BackendError::UpstreamStatus { status: status.as_u16(), detail });
            }
            self.events = Some(response.bytes_stream().eventsource().boxed());
            return Ok(());
        }
        let Some(events) = self.events.as_mut() else {
            return Err(BackendError::Internal("answer stream polled after it ended".into()));
        };
        let next = if self.finish.is_some() {
            tokio::time::timeout(TRAILER_TIMEOUT, events.next()).await
        } else if self.sent_text {
            tokio::time::timeout(self.idle_timeout, events.next()).await
        } else {
            tokio::time::timeout_at(deadline, events.next()).await
        };
        let event = match (next, self.finish) {
            // The answer is whole; only the trailer is missing.
            (Err(_) | Ok(None), Some(finish)) => {
                tracing::debug!(usage = self.usage.is_some(), "no [DONE] after the finish reason");
                self.end(finish);
                return Ok(());
            }
            (Err(_), None) => return Err(self.broken("upstream went silent".into())),
            (Ok(None), None) => {
                return Err(self.broken("upstream stream ended without [DONE] or a finish reason".into()));
            }
            (Ok(Some(Err(error))), _) => return Err(self.broken(error.into())),
            (Ok(Some(Ok(event))), _) => event,
        };
        self.on_event(event)
    }

    /// Interprets one server-sent event.
    fn on_event(&mut self, event: Event) -> Result<(), BackendError> {
        let data = event.data.trim();
        if data.is_empty() || !(event.event.is_empty() || event.event == "message") {
            return Ok(());
        }
        if data == "[DONE]" {
            // Servers end every answer with a finish reason; a `[DONE]`
            // without one is an answer cut short (llama-cpp-python's server
            // does that to the answer in flight when another request
            // arrives, unless it runs with `--interrupt_requests false`).
            let Some(finish) = self.finish else {
                return Err(self.broken("upstream ended the answer without a finish reason".into()));
            };
            self.end(finish);
            return Ok(());
        }
        let chunk: ChatChunk = serde_json::from_str(data).map_err(|e| self.broken(e.into()))?;
        if let Some(error) = chunk.error {
            return Err(self.broken(format!("upstream error: {error}").into()));
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(Usage { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens });
        }
        let Some(choice) = chunk.choices.into_iter().find(|c| c.index == 0) else {
            return Ok(()); // e.g. the trailing usage chunk
        };
        if let Some(text) = choice.delta.and_then(|d| d.content).filter(|t| !t.is_empty()) {
            self.pending.push_back(Token::Text(text));
        }
        if let Some(reason) = choice.finish_reason {
            let finish = match reason.as_str() {
                "length" => Finish::Length,
                "stop" => Finish::Stop,
                other => {
                    tracing::debug!(finish_reason = other, "unmapped finish reason; reporting STOP");
                    Finish::Stop
                }
            };
            self.finish.get_or_insert(finish);
        }
        Ok(())
    }

    /// Queues the end of the answer: its token counts, if the server sent
    /// them, then its finish reason.
    fn end(&mut self, finish: Finish) {
        if let Some(usage) = self.usage.take() {
            self.pending.push_back(Token::Usage(usage));
        } else {
            tracing::debug!("the server sent no token counts");
        }
        self.pending.push_back(Token::End(finish));
    }

    /// A failure of the connection or the stream, classified by whether
    /// text was already yielded.
    fn broken(&self, cause: BoxError) -> BackendError {
        if self.sent_text { BackendError::Interrupted(cause) } else { BackendError::Unavailable(cause) }
    }
}

/// The start of an error response's body, for the log.
async fn error_detail(response: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Ok(Some(chunk)) = chunks.try_next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY_BYTES {
            break;
        }
    }
    body.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ConversationId, HistoryTurn, TenantId};

    fn backend(config: OpenAiConfig) -> OpenAiBackend {
        OpenAiBackend::with_env(&config, |_| Some("sk-test".into())).unwrap()
    }

    fn request() -> BackendRequest {
        BackendRequest {
            tenant: TenantId::new("bank"),
            conversation: ConversationId::new("c"),
            request_id: String::new(),
            history: vec![
                HistoryTurn::new(TurnRole::Customer, "hi"),
                HistoryTurn::new(TurnRole::Agent, "hello"),
                HistoryTurn::new(TurnRole::System, "note"),
                HistoryTurn::new(TurnRole::Assistant, "how can I help?"),
            ],
            question: "fees?".into(),
        }
    }

    #[test]
    fn messages_map_roles_with_the_tenant_prompt_first() {
        let mut config = OpenAiConfig::new("http://h/v1", "m");
        config.system_prompt = Some("default".into());
        config.tenant_prompts.insert("bank".into(), "bank prompt".into());
        let backend = backend(config);
        let body = serde_json::to_value(backend.body(&request())).unwrap();
        let roles: Vec<(&str, &str)> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            roles,
            [
                ("system", "bank prompt"),
                ("user", "hi"),
                ("assistant", "hello"),
                ("system", "note"),
                ("assistant", "how can I help?"),
                ("user", "fees?"),
            ]
        );
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 512);
        assert!(body.get("temperature").is_none());
    }

    #[test]
    fn usage_and_extra_fields_are_asked_for() {
        let mut config = OpenAiConfig::new("http://h/v1", "m");
        config.extra_body.insert("top_k".into(), 40.into());
        let body = serde_json::to_value(backend(config.clone()).body(&request())).unwrap();
        assert_eq!(body["stream_options"], serde_json::json!({ "include_usage": true }));
        assert_eq!(body["top_k"], 40);
        config.include_usage = false;
        let body = serde_json::to_value(backend(config).body(&request())).unwrap();
        assert!(body.get("stream_options").is_none());
    }

    fn system_of(backend: &OpenAiBackend, tenant: &str, question: &str) -> Option<String> {
        let request = BackendRequest {
            tenant: TenantId::new(tenant),
            question: question.into(),
            history: Vec::new(),
            ..request()
        };
        let body = serde_json::to_value(backend.body(&request)).unwrap();
        let first = &body["messages"][0];
        (first["role"] == "system").then(|| first["content"].as_str().unwrap().to_owned())
    }

    #[test]
    fn grounded_prompts_carry_the_tenants_best_entries_within_the_budget() {
        let mut config = OpenAiConfig::new("http://h/v1", "m");
        config.system_prompt = Some("Be brief.".into());
        let grounding = GroundingConfig { tenant_top_k: [("shop".to_owned(), 0)].into(), ..Default::default() };
        config.knowledge = Some(grounding.clone());
        let grounded = backend(config.clone());
        let system = system_of(&grounded, "demo", "How much is the annual fee?").unwrap();
        let gold = system.find("Q: How much is the Gold Card annual fee?\nA: The Gold Card costs $120").unwrap();
        let platinum = system.find("Q: How much is the Platinum Card annual fee?").unwrap();
        assert!(system.starts_with("Be brief.\n\nAnswer from these knowledge-base entries") && gold < platinum);
        // No matching entry, another tenant's question, grounding off for the tenant: the plain prompt.
        assert_eq!(system_of(&grounded, "demo", "What is the capital of France?").unwrap(), "Be brief.");
        assert_eq!(system_of(&grounded, "telco", "How much is the Gold Card annual fee?").unwrap(), "Be brief.");
        assert_eq!(system_of(&grounded, "shop", "How do I return an item?").unwrap(), "Be brief.");
        assert!(system_of(&grounded, "demo", "How do I return an item?").unwrap() == "Be brief.");
        // The budget keeps the best entry whole and leaves out what does not fit.
        let one_entry = GroundingConfig { max_bytes: 400, ..grounding };
        config.knowledge = Some(one_entry);
        config.system_prompt = None;
        let system = system_of(&backend(config), "demo", "How much is the annual fee?").unwrap();
        assert!(system.contains("Gold Card costs $120") && !system.contains("Platinum"), "{system}");
    }

    #[test]
    fn missing_key_variable_fails_and_debug_hides_the_key() {
        let mut config = OpenAiConfig::new("http://h/v1", "m");
        config.api_key_env = Some("FENGDA_TEST_NO_SUCH_VAR".into());
        assert!(OpenAiBackend::with_env(&config, |_| None).is_err());
        let backend = OpenAiBackend::with_env(&config, |_| Some("sk-secret".into())).unwrap();
        assert!(!format!("{backend:?}").contains("sk-secret"));
    }

    fn call() -> Call {
        Call {
            http: None,
            events: None,
            pending: VecDeque::new(),
            sent_text: false,
            done: false,
            finish: None,
            usage: None,
            deadline: None,
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
        }
    }

    fn event(data: &str) -> Event {
        Event { data: data.into(), ..Event::default() }
    }

    #[test]
    fn events_become_tokens() {
        let mut call = call();
        call.on_event(event(r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#)).unwrap();
        call.on_event(event(r#"{"choices":[{"index":0,"delta":{"content":""}}]}"#)).unwrap();
        call.on_event(event(r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#)).unwrap();
        call.on_event(event(r#"{"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"length"}]}"#)).unwrap();
        call.on_event(event(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#))
            .unwrap();
        assert_eq!(Vec::from(std::mem::take(&mut call.pending)), [Token::Text("Hi".into()), Token::Text("!".into())]);
        call.on_event(event("[DONE]")).unwrap();
        assert_eq!(
            Vec::from(std::mem::take(&mut call.pending)),
            [Token::Usage(Usage { prompt_tokens: 7, completion_tokens: 2 }), Token::End(Finish::Length)]
        );
        // [DONE] without a finish reason: cut short, before or after text.
        let mut bare = super::tests::call();
        assert!(matches!(bare.on_event(event("[DONE]")), Err(BackendError::Unavailable(_))));
        bare.sent_text = true;
        assert!(matches!(bare.on_event(event("[DONE]")), Err(BackendError::Interrupted(_))));
        assert!(bare.pending.is_empty());
        assert!(matches!(call.on_event(event("{oops")), Err(BackendError::Unavailable(_))));
        call.sent_text = true;
        assert!(matches!(
            call.on_event(event(r#"{"error":{"message":"engine died"}}"#)),
            Err(BackendError::Interrupted(_))
        ));
    }
}
