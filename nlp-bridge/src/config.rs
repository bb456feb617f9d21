//! Typed configuration for the bridge: [`BridgeConfig`] for the `fengda-nlp`
//! binary and its sections: [`AnswererConfig`] (the built-in answerer, which
//! the hub also builds in code when it embeds the bridge in-process),
//! [`BackendConfig`] (named backends, e.g. an [`OpenAiConfig`] LLM server),
//! the tenant → backend routing and the bridge's own [`Limits`].
//!
//! Both deny unknown keys so that a typo in a TOML file fails at startup
//! instead of silently falling back to a default. Every default is documented
//! at its field. Precedence (CLI/env > file > defaults) is applied by the
//! binary; this module only parses and validates.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::BridgeError;

/// The name under which the `[answerer]` section is always available as a
/// backend; it cannot be redefined under `[backends]`.
pub const BUILTIN_BACKEND: &str = "builtin";

/// The whole `fengda-nlp` configuration file.
///
/// ```toml
/// listen = "127.0.0.1:50051"
/// default_backend = "llm"          # default "builtin" (the [answerer] section)
///
/// [answerer]
/// first_token_delay_ms = 150
/// tokens_per_second = 25.0
/// # knowledge_base = "nlp-bridge/data/faq.json"
///
/// [limits]
/// max_concurrent_streams = 256
///
/// [backends.llm]
/// kind = "openai"
/// base_url = "http://127.0.0.1:11434/v1"
/// model = "qwen2.5:7b-instruct"
///
/// [tenants]
/// demo = "builtin"                 # tenant id -> backend name
/// ```
///
/// See `nlp-bridge/fengda-nlp.example.toml` for every key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Address the gRPC server binds. Default `127.0.0.1:50051`; port 0 picks
    /// a free port (the bound address is printed on stdout).
    pub listen: SocketAddr,
    /// The built-in answerer, available as the backend named
    /// [`BUILTIN_BACKEND`]. Default: see [`AnswererConfig`].
    pub answerer: AnswererConfig,
    /// Backend for tenants not listed in `tenants`. Default `"builtin"`.
    pub default_backend: String,
    /// Named backends (`[backends.NAME]`, with `kind = "builtin" | "openai"`).
    /// Default: none (only `builtin`).
    pub backends: BTreeMap<String, BackendConfig>,
    /// Tenant id → backend name. Default: empty (every tenant uses
    /// `default_backend`).
    pub tenants: BTreeMap<String, String>,
    /// The bridge's own limits. Default: see [`Limits`].
    pub limits: Limits,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50051)),
            answerer: AnswererConfig::default(),
            default_backend: BUILTIN_BACKEND.to_owned(),
            backends: BTreeMap::new(),
            tenants: BTreeMap::new(),
            limits: Limits::default(),
        }
    }
}

impl BridgeConfig {
    /// Reads and parses a TOML configuration file. Missing keys keep their
    /// defaults; unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, BridgeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| BridgeError::ReadConfig { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|source| BridgeError::ParseConfig { path: path.to_owned(), source })
    }

    /// Parses TOML text (no validation beyond the schema).
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the invariants serde cannot express: sane numbers, and every
    /// backend name used by `default_backend` and `tenants` defined.
    pub fn validate(&self) -> Result<(), BridgeError> {
        self.answerer.validate()?;
        self.limits.validate()?;
        if self.backends.contains_key(BUILTIN_BACKEND) {
            return Err(BridgeError::InvalidConfig(format!(
                "backends.{BUILTIN_BACKEND} is reserved for the [answerer] section; pick another name"
            )));
        }
        for (name, backend) in &self.backends {
            backend.validate().map_err(|reason| BridgeError::InvalidConfig(format!("backends.{name}: {reason}")))?;
        }
        let known = |name: &str| name == BUILTIN_BACKEND || self.backends.contains_key(name);
        if !known(&self.default_backend) {
            return Err(BridgeError::InvalidConfig(format!(
                "default_backend = {:?} is not defined under [backends]",
                self.default_backend
            )));
        }
        for (tenant, name) in &self.tenants {
            if !known(name) {
                return Err(BridgeError::InvalidConfig(format!(
                    "tenants.{tenant} = {name:?} is not defined under [backends]"
                )));
            }
        }
        Ok(())
    }
}

/// The bridge's own limits, applied before any backend sees a request.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Answer streams in flight at once; one more is refused at once with
    /// `RESOURCE_EXHAUSTED` (never queued; the hub queues the question and
    /// lowers its limit for this bridge). Advertised to hubs in the
    /// `fengda-max-streams` header of every response. Default 256; must be >= 1.
    pub max_concurrent_streams: usize,
    /// Longest accepted question, in bytes; longer is `INVALID_ARGUMENT`.
    /// Default 8192.
    pub max_question_bytes: usize,
    /// Longest accepted tenant, conversation or request id, in bytes;
    /// longer is `INVALID_ARGUMENT`. Default 256.
    pub max_id_bytes: usize,
    /// Only the most recent history turns are passed on; older ones are
    /// dropped. Default 32.
    pub max_history_turns: usize,
    /// Total bytes of history text passed on; the oldest turns are dropped
    /// until the rest fits. Default 32768.
    pub max_history_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 256,
            max_question_bytes: crate::service::MAX_QUESTION_BYTES,
            max_id_bytes: 256,
            max_history_turns: 32,
            max_history_bytes: 32 * 1024,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), BridgeError> {
        if self.max_concurrent_streams == 0 || self.max_question_bytes == 0 || self.max_id_bytes == 0 {
            return Err(BridgeError::InvalidConfig(
                "limits.max_concurrent_streams, max_question_bytes and max_id_bytes must be >= 1".into(),
            ));
        }
        Ok(())
    }
}

/// One named backend under `[backends.NAME]`, selected by `kind`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    /// Another instance of the built-in FAQ answerer, with its own settings.
    Builtin(AnswererConfig),
    /// An OpenAI-compatible chat-completions server (vLLM, Ollama,
    /// llama.cpp's server, a hosted API).
    Openai(Box<OpenAiConfig>),
}

impl BackendConfig {
    fn validate(&self) -> Result<(), String> {
        match self {
            BackendConfig::Builtin(answerer) => answerer.validate().map_err(|e| e.to_string()),
            BackendConfig::Openai(openai) => openai.validate(),
        }
    }
}

/// Settings of an OpenAI-compatible chat-completions backend
/// (`POST {base_url}/chat/completions` with `stream: true`).
///
/// The API key never appears in the file: `api_key_env` names the
/// environment variable that holds it, read once at startup.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Base URL including the API version path, e.g.
    /// `http://127.0.0.1:11434/v1` (Ollama), `http://127.0.0.1:8000/v1`
    /// (vLLM, llama.cpp), `https://api.openai.com/v1`. Required.
    pub base_url: String,
    /// Model name sent as `model`. Required.
    pub model: String,
    /// Name of the environment variable holding the API key, sent as
    /// `Authorization: Bearer KEY`. Default `None`: no Authorization header
    /// (local servers). A named but unset variable fails startup.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// System prompt for tenants not in `tenant_prompts`. Default `None`: no
    /// system message.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Tenant id → system prompt, overriding `system_prompt`. Default empty.
    #[serde(default)]
    pub tenant_prompts: BTreeMap<String, String>,
    /// `max_tokens` sent upstream. Default 512; must be >= 1.
    #[serde(default = "OpenAiConfig::default_max_tokens")]
    pub max_tokens: u32,
    /// `temperature` sent upstream. Default `None`: the server's default.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Deadline from sending the request to the first streamed text, in ms:
    /// connect, queueing and prompt processing. Missing it is `UNAVAILABLE`
    /// (nothing was sent, so the hub may retry). Default 30000.
    #[serde(default = "OpenAiConfig::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest silence between two streamed events once text flows, in ms.
    /// Missing it is `ABORTED`. Default 30000.
    #[serde(default = "OpenAiConfig::default_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// TCP (and TLS) connect timeout, in ms. Default 5000.
    #[serde(default = "OpenAiConfig::default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Ask for the model's token counts (`stream_options.include_usage`),
    /// passed to the hub on the answer's last chunk. Default true; turn it
    /// off for a server that rejects the field. A server that ignores it
    /// sends no counts (llama-cpp-python's server; vLLM, llama.cpp's
    /// `llama-server`, Ollama and OpenAI send them).
    #[serde(default = "OpenAiConfig::default_include_usage")]
    pub include_usage: bool,
    /// More top-level fields for every request body, for a server's own
    /// options (`top_k`, `repeat_penalty`, vLLM's `ignore_eos`,
    /// llama-cpp-python's `min_tokens`). It may not name a field the bridge
    /// sets (`model`, `messages`, `stream`, `stream_options`, `max_tokens`,
    /// `temperature`). Default empty.
    #[serde(default)]
    pub extra_body: serde_json::Map<String, serde_json::Value>,
    /// Grounded answers: the tenant's knowledge-base entries that best match
    /// the question (and recent history) go into the system message as
    /// context. Default `None`: no context, the plain prompt.
    #[serde(default)]
    pub knowledge: Option<GroundingConfig>,
    /// Answers of this backend in flight at once, over all tenants (the
    /// model server's slots); one more is refused at once with
    /// `RESOURCE_EXHAUSTED` marked as an upstream limit, which a hub
    /// retries and then answers with its fallback. Default `None`: no
    /// limit but `limits.max_concurrent_streams`. Must be >= 1.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Answers of this backend in flight at once for one tenant, so one
    /// tenant's long answers cannot take every slot; refused like
    /// `max_concurrent`. Default `None`: no per-tenant limit. Must be >= 1.
    #[serde(default)]
    pub max_concurrent_per_tenant: Option<usize>,
    /// The header that carries the caller's request id (the hub sends a
    /// UUID per question) upstream, for the model server's logs: a header
    /// name, or `false` for none. Default `"x-request-id"`.
    /// llama-cpp-python's server answers `400` to an `x-request-id` that is
    /// not a UUID: for callers that send other ids, rename the header
    /// (`"x-fengda-request-id"`) or turn it off. It may not be a header the
    /// bridge sets (`authorization`, `content-type`, `content-length`,
    /// `host`).
    #[serde(default = "OpenAiConfig::default_request_id_header", deserialize_with = "header_name_or_false")]
    pub request_id_header: Option<String>,
}

/// A header name, or `false` for none (`true` is not a name).
fn header_name_or_false<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Setting {
        Name(String),
        Flag(bool),
    }
    match Setting::deserialize(deserializer) {
        Ok(Setting::Name(name)) => Ok(Some(name)),
        Ok(Setting::Flag(false)) => Ok(None),
        Ok(Setting::Flag(true)) | Err(_) => {
            Err(serde::de::Error::custom("expected a header name, or false to send no request id"))
        }
    }
}

/// `[backends.NAME.knowledge]`: which knowledge-base entries ground an
/// OpenAI-compatible backend's answers, and how much of them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GroundingConfig {
    /// Knowledge-base JSON file (the schema of `nlp-bridge/data/faq.json`).
    /// Default `None`: the embedded `nlp-bridge/data/faq.json`.
    pub path: Option<PathBuf>,
    /// Entries given as context at most, best match first. Default 3; 0
    /// gives none.
    pub top_k: usize,
    /// Bytes of context at most (entries' questions and answers); entries
    /// are added best first while they fit. Default 2048.
    pub max_bytes: usize,
    /// Tenant id → `top_k` for that tenant (0 turns grounding off for it).
    /// Default empty.
    pub tenant_top_k: BTreeMap<String, usize>,
    /// Put before the entries in the system message. Default
    /// [`GroundingConfig::DEFAULT_HEADING`].
    pub heading: String,
}

impl GroundingConfig {
    /// The default `heading`.
    pub const DEFAULT_HEADING: &str = "Answer from these knowledge-base entries when they cover the question. \
         If they do not, say you are not sure and offer a human agent.";

    /// How many entries ground `tenant`'s answers.
    pub fn top_k_for(&self, tenant: &str) -> usize {
        self.tenant_top_k.get(tenant).copied().unwrap_or(self.top_k)
    }
}

impl Default for GroundingConfig {
    fn default() -> Self {
        Self {
            path: None,
            top_k: 3,
            max_bytes: 2048,
            tenant_top_k: BTreeMap::new(),
            heading: Self::DEFAULT_HEADING.to_owned(),
        }
    }
}

impl OpenAiConfig {
    /// A configuration with every optional key at its default.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            system_prompt: None,
            tenant_prompts: BTreeMap::new(),
            max_tokens: Self::default_max_tokens(),
            temperature: None,
            timeout_ms: Self::default_timeout_ms(),
            idle_timeout_ms: Self::default_timeout_ms(),
            connect_timeout_ms: Self::default_connect_timeout_ms(),
            include_usage: Self::default_include_usage(),
            extra_body: serde_json::Map::new(),
            knowledge: None,
            max_concurrent: None,
            max_concurrent_per_tenant: None,
            request_id_header: Self::default_request_id_header(),
        }
    }

    fn default_request_id_header() -> Option<String> {
        Some("x-request-id".to_owned())
    }

    /// The parsed `request_id_header`: `None` sends no request id.
    pub fn request_id_header_name(&self) -> Result<Option<reqwest::header::HeaderName>, String> {
        let Some(name) = &self.request_id_header else { return Ok(None) };
        let header = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("request_id_header {name:?} is not a valid header name"))?;
        if Self::BRIDGE_HEADERS.contains(&header.as_str()) {
            return Err(format!("request_id_header may not be {name:?}: the bridge sets it"));
        }
        Ok(Some(header))
    }

    fn default_include_usage() -> bool {
        true
    }

    fn default_max_tokens() -> u32 {
        512
    }

    fn default_timeout_ms() -> u64 {
        30_000
    }

    fn default_connect_timeout_ms() -> u64 {
        5_000
    }

    /// The system prompt for `tenant`, if any.
    pub fn system_prompt_for(&self, tenant: &str) -> Option<&str> {
        self.tenant_prompts.get(tenant).or(self.system_prompt.as_ref()).map(String::as_str).filter(|p| !p.is_empty())
    }

    fn validate(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.base_url).map_err(|e| format!("base_url {:?}: {e}", self.base_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("base_url {:?} must be http or https", self.base_url));
        }
        if self.model.trim().is_empty() {
            return Err("model is empty".into());
        }
        if self.max_tokens == 0 || self.timeout_ms == 0 || self.idle_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err("max_tokens, timeout_ms, idle_timeout_ms and connect_timeout_ms must be >= 1".into());
        }
        if self.temperature.is_some_and(|t| !t.is_finite() || t < 0.0) {
            return Err("temperature must be a finite number >= 0".into());
        }
        if let Some(key) = self.extra_body.keys().find(|key| Self::BRIDGE_FIELDS.contains(&key.as_str())) {
            return Err(format!("extra_body may not set {key:?}: the bridge sets it"));
        }
        if self.max_concurrent == Some(0) || self.max_concurrent_per_tenant == Some(0) {
            return Err("max_concurrent and max_concurrent_per_tenant must be >= 1".into());
        }
        self.request_id_header_name()?;
        Ok(())
    }

    /// Request headers the bridge (or its HTTP client) sets, which
    /// `request_id_header` may not name.
    const BRIDGE_HEADERS: &[&str] = &["authorization", "content-type", "content-length", "host"];

    /// Request fields the bridge sets, which `extra_body` may not name.
    const BRIDGE_FIELDS: &[&str] = &["model", "messages", "stream", "stream_options", "max_tokens", "temperature"];

    /// The chat-completions endpoint.
    pub fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }
}

/// Settings of the built-in, deterministic FAQ answerer.
///
/// Pacing imitates an LLM: `first_token_delay_ms` before the first token, then
/// one token every `1 / tokens_per_second` seconds. `tokens_per_second = 0`
/// disables the per-token pace, `first_token_delay_ms = 0` disables the first
/// delay; with both at 0 the answerer never sleeps and creates no timers (the
/// zero-delay pace used by benchmarks and tests).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnswererConfig {
    /// Path of a knowledge-base JSON file (same schema as
    /// `nlp-bridge/data/faq.json`), relative to the working directory.
    /// Default `None`: the file shipped in the repository, embedded in the
    /// binary at compile time.
    pub knowledge_base: Option<PathBuf>,
    /// Delay before the first token, in milliseconds ("time to first token").
    /// Default 150; 0 disables it.
    pub first_token_delay_ms: u64,
    /// Pace of the following tokens. Default 25.0; 0 disables the per-token
    /// pace. Must be finite and not negative.
    pub tokens_per_second: f64,
}

impl Default for AnswererConfig {
    fn default() -> Self {
        Self { knowledge_base: None, first_token_delay_ms: 150, tokens_per_second: 25.0 }
    }
}

impl AnswererConfig {
    /// A configuration that never sleeps: both delays at 0, embedded knowledge base.
    pub fn unpaced() -> Self {
        Self { knowledge_base: None, first_token_delay_ms: 0, tokens_per_second: 0.0 }
    }

    /// Checks that `tokens_per_second` is a usable number.
    pub fn validate(&self) -> Result<(), BridgeError> {
        let tps = self.tokens_per_second;
        if !tps.is_finite() || tps < 0.0 {
            return Err(BridgeError::InvalidConfig(format!(
                "answerer.tokens_per_second must be a finite number >= 0, got {tps}"
            )));
        }
        Ok(())
    }

    /// The delay before the first token, or `None` when disabled.
    pub fn first_token_delay(&self) -> Option<Duration> {
        (self.first_token_delay_ms > 0).then(|| Duration::from_millis(self.first_token_delay_ms))
    }

    /// The delay between two tokens, or `None` when disabled (0 or invalid).
    pub fn token_interval(&self) -> Option<Duration> {
        let tps = self.tokens_per_second;
        (tps.is_finite() && tps > 0.0).then(|| Duration::try_from_secs_f64(1.0 / tps).ok()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_file_overrides() {
        let config = BridgeConfig::from_toml("[answerer]\ntokens_per_second = 0\n").unwrap();
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(config.answerer.first_token_delay_ms, 150);
        assert_eq!(config.answerer.token_interval(), None);
        assert_eq!(AnswererConfig::default().token_interval(), Some(Duration::from_millis(40)));
        assert_eq!(AnswererConfig::unpaced().first_token_delay(), None);
    }

    #[test]
    fn unknown_keys_and_bad_pace_are_rejected() {
        assert!(BridgeConfig::from_toml("lisen = \"127.0.0.1:1\"").is_err());
        assert!(BridgeConfig::from_toml("[answerer]\nspeed = 1").is_err());
        let bad = AnswererConfig { tokens_per_second: -1.0, ..AnswererConfig::default() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn backends_and_tenants() {
        let text = r#"
            default_backend = "llm"
            [limits]
            max_concurrent_streams = 4
            [backends.llm]
            kind = "openai"
            base_url = "http://127.0.0.1:11434/v1/"
            model = "qwen"
            api_key_env = "LLM_KEY"
            system_prompt = "Be brief."
            tenant_prompts = { bank = "You are a bank." }
            [backends.faq]
            kind = "builtin"
            tokens_per_second = 0
            [tenants]
            demo = "faq"
            shop = "builtin"
        "#;
        let config = BridgeConfig::from_toml(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.limits.max_concurrent_streams, 4);
        assert_eq!(config.limits.max_question_bytes, 8192);
        let BackendConfig::Openai(llm) = &config.backends["llm"] else { panic!() };
        assert_eq!(llm.endpoint(), "http://127.0.0.1:11434/v1/chat/completions");
        assert_eq!(llm.max_tokens, 512);
        assert_eq!(llm.system_prompt_for("bank"), Some("You are a bank."));
        assert_eq!(llm.system_prompt_for("shop"), Some("Be brief."));
        let BackendConfig::Builtin(faq) = &config.backends["faq"] else { panic!() };
        assert_eq!((faq.tokens_per_second, faq.first_token_delay_ms), (0.0, 150));
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fengda-nlp.example.toml");
        let config = BridgeConfig::from_file(&path).unwrap();
        config.validate().unwrap();
        assert_eq!(config.default_backend, "local-llm");
        assert_eq!(config.limits, Limits::default());
        let BackendConfig::Openai(llm) = &config.backends["local-llm"] else { panic!() };
        assert!(llm.api_key_env.is_none());
        assert_eq!(llm.request_id_header, OpenAiConfig::default_request_id_header());
        assert!(llm.system_prompt_for("telco").unwrap().starts_with("你是"));
        assert_eq!(config.tenants["shop"], "faq-fast");
    }

    #[test]
    fn bad_backends_are_rejected() {
        let invalid = |text: &str| {
            BridgeConfig::from_toml(text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
        };
        assert!(invalid("[backends.x]\nkind = \"gpt\"").is_err());
        assert!(invalid("[backends.x]\nkind = \"openai\"\nbase_url = \"http://h/v1\"").is_err(), "model missing");
        assert!(invalid("[backends.x]\nkind = \"openai\"\nbase_url = \"h\"\nmodel = \"m\"").is_err());
        assert!(
            invalid("[backends.x]\nkind = \"openai\"\nbase_url = \"http://h\"\nmodel = \"m\"\napi_key = \"k\"")
                .is_err()
        );
        assert!(invalid("[backends.x]\nkind = \"builtin\"\nspeed = 1").is_err());
        assert!(invalid("[backends.builtin]\nkind = \"builtin\"").is_err());
        assert!(invalid("default_backend = \"llm\"").is_err());
        assert!(invalid("[tenants]\ndemo = \"llm\"").is_err());
        assert!(invalid("[limits]\nmax_concurrent_streams = 0").is_err());
        assert!(invalid("[backends.x]\nkind = \"openai\"\nbase_url = \"http://h\"\nmodel = \"m\"").is_ok());
    }

    #[test]
    fn the_request_id_header_is_a_name_or_false() {
        let openai = |setting: &str| -> Result<OpenAiConfig, String> {
            let text = format!("[backends.x]\nkind = \"openai\"\nbase_url = \"http://h\"\nmodel = \"m\"\n{setting}");
            let config = BridgeConfig::from_toml(&text).map_err(|e| e.to_string())?;
            config.validate().map_err(|e| e.to_string())?;
            let BackendConfig::Openai(openai) = &config.backends["x"] else { panic!() };
            Ok(*openai.clone())
        };
        let header = |config: OpenAiConfig| config.request_id_header_name().unwrap().map(|h| h.to_string());
        assert_eq!(header(openai("").unwrap()).as_deref(), Some("x-request-id"));
        assert_eq!(header(openai("request_id_header = \"X-Trace-Id\"").unwrap()).as_deref(), Some("x-trace-id"));
        assert_eq!(header(openai("request_id_header = false").unwrap()), None);
        for bad in ["true", "\"two words\"", "\"\"", "\"Authorization\"", "\"host\"", "3"] {
            let error = openai(&format!("request_id_header = {bad}")).unwrap_err();
            assert!(error.contains("request_id_header") || error.contains("header name"), "{bad}: {error}");
        }
    }
}
