//! The hub's one typed configuration, with documented defaults.
//!
//! Values come from three layers, later ones winning: the defaults below,
//! a TOML file (`--config` / `FENGDA_CONFIG`), and command-line flags or
//! their `FENGDA_*` environment variables. [`Config::validate`] runs once at
//! startup so a bad value stops the process with a clear message instead of
//! misbehaving under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything `fengda serve` can be told.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP + WebSocket listener. Default `127.0.0.1:8080`;
    /// port 0 binds an ephemeral port (printed on the first stdout line).
    pub listen: SocketAddr,
    /// Address of the admin listener: `/metrics`, and `/healthz` and
    /// `/readyz` too. Never the customers' port: keep it on loopback or a
    /// private network. Default `127.0.0.1:9090`; port 0 binds an ephemeral
    /// port (printed on the second stdout line).
    pub admin_listen: SocketAddr,
    /// Milliseconds sessions get to close cleanly on shutdown. Default 10000.
    pub shutdown_grace_ms: u64,
    /// Where conversations live: `memory` (one node, the default) or `redis`
    /// (cluster mode: many nodes sharing `redis.url`).
    pub backend: StoreKind,
    pub redis: RedisConfig,
    pub server: ServerConfig,
    pub websocket: WebSocketConfig,
    pub conversation: ConversationConfig,
    pub nlp: NlpConfig,
    /// The built-in answerer started in-process when `nlp.url` is unset.
    pub answerer: fengda_nlp::AnswererConfig,
    /// Who may open sockets: `[auth]` and `[[auth.keys]]` ([`crate::auth::config`]).
    pub auth: crate::auth::AuthConfig,
}

/// The conversation store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

impl StoreKind {
    /// The name used in the config file, flags and the `fengda_hub_info` metric.
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
        }
    }
}

/// Cluster mode over Redis (used when `backend = "redis"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL (the primary: every read that decides correctness goes
    /// there). Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key and channel, one per deployment sharing a Redis.
    /// Default `fengda`.
    pub key_prefix: String,
    /// Overrides `conversation.retention_secs` for Redis keys (kept for
    /// configs written before that key existed). Default unset.
    pub retention_secs: Option<u64>,
    /// Deadline of each Redis call; past it the operation fails as
    /// `unavailable`. Default 2000 ms.
    pub command_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "fengda".into(),
            retention_secs: None,
            command_timeout_ms: 2000,
        }
    }
}

/// Limits on TCP connections and their HTTP requests, before any upgrade.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TCP connections held at once, WebSockets included; beyond it new
    /// connections are refused (`503 at_capacity`) while `/healthz` is still
    /// answered. Default: the process's open-file limit (`RLIMIT_NOFILE`)
    /// minus [`RESERVED_FDS`], which is also the most it may be set to.
    pub max_connections: Option<usize>,
    /// A request's head (request line and headers) must arrive whole within
    /// this long from when the hub starts waiting for it: a new connection's
    /// first request, or a keep-alive connection's next. Default 10000 ms.
    pub header_read_timeout_ms: u64,
    /// A connection that has not become a WebSocket is closed after this
    /// long without a byte read or written. Default 30000 ms.
    pub http_idle_timeout_ms: u64,
    /// Largest request head in bytes; larger gets `431`. Default 16384.
    pub max_header_bytes: usize,
    /// TCP connections (WebSockets included) one client address may hold;
    /// 0 = no limit. Default 1000.
    pub max_connections_per_ip: usize,
    /// New connections per second one client address may open, sustained;
    /// 0 = no limit. Default 50.
    pub connection_rate_per_ip: u32,
    /// New connections one client address may open at once above the
    /// sustained rate. Default 1000.
    pub connection_burst_per_ip: u32,
    /// Proxies (addresses or CIDR blocks) whose connections are not limited
    /// per address; for their `/ws` upgrades the client address is the
    /// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy,
    /// and the per-address limits apply to it. Default empty.
    pub trusted_proxies: Vec<ProxyAddrs>,
    /// Accept HTTP/2 over cleartext TCP with prior knowledge (h2c), for a
    /// proxy that speaks it to the hub. WebSockets always use HTTP/1.1.
    /// Default false: HTTP/1.1 only.
    pub http2_cleartext: bool,
}

/// A trusted proxy: one address (`10.0.0.5`) or a CIDR block (`10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProxyAddrs(pub ipnet::IpNet);

impl std::str::FromStr for ProxyAddrs {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        match text.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(Self(ip.into())),
            Err(_) => text
                .parse::<ipnet::IpNet>()
                .map(Self)
                .map_err(|_| format!("{text:?} is neither an IP address nor a CIDR block")),
        }
    }
}

impl TryFrom<String> for ProxyAddrs {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<ProxyAddrs> for String {
    fn from(addrs: ProxyAddrs) -> Self {
        addrs.0.to_string()
    }
}

impl ProxyAddrs {
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.0.contains(ip)
    }
}

/// File descriptors kept out of `server.max_connections`: the listener,
/// Redis and NLP connections, logs, and connections being refused.
pub const RESERVED_FDS: usize = 128;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: None,
            header_read_timeout_ms: 10_000,
            http_idle_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            max_connections_per_ip: 1000,
            connection_rate_per_ip: 50,
            connection_burst_per_ip: 1000,
            trusted_proxies: Vec::new(),
            http2_cleartext: false,
        }
    }
}

/// Per-connection limits and keepalive.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest frame or message accepted, in bytes; larger ones close the
    /// socket with 1009. Default 65536.
    pub max_frame_bytes: usize,
    /// Longest customer message, in characters. Default 4000.
    pub max_text_chars: usize,
    /// Longest customer message, in UTF-8 bytes: the NLP bridge refuses
    /// longer questions, so the hub refuses them first, with the same
    /// `text_too_long` as `max_text_chars`. Default 8192
    /// ([`fengda_nlp::service::MAX_QUESTION_BYTES`]); raise it only with the
    /// bridges' `limits.max_question_bytes`.
    pub max_text_bytes: usize,
    /// Whether a socket may ask for `timing=1` (where each reply's time went,
    /// hub and NLP latencies). Off, such a request is refused with
    /// `403 timing_not_allowed`. Default false: enable for load tests and
    /// diagnostics, not for customers.
    pub allow_timing: bool,
    /// Frames queued for one socket before it counts as a slow consumer and
    /// is closed with 4008 (a reply's deltas that arrived together, at most
    /// 16, take one place). Default 256.
    pub outbound_queue_frames: usize,
    /// Questions of one socket waiting for an answer before new ones get
    /// `too_many_pending`. Default 8.
    pub max_pending_questions: usize,
    /// Frames per second one socket may send, sustained (messages, pings,
    /// cancels, anything). Default 20.
    pub max_frames_per_second: u32,
    /// Frames one socket may send at once above the sustained rate; beyond
    /// it a frame is refused with `rate_limited`, and this many refusals in
    /// a row close the socket with 4429. Default 60.
    pub frame_burst: u32,
    /// Interval of WebSocket pings sent to every client. Default 20000 ms.
    pub ping_interval_ms: u64,
    /// A client silent for this long (no frame, no pong) is closed with 4010.
    /// Default 60000 ms.
    pub idle_timeout_ms: u64,
    /// Browser origins allowed to open sockets. Empty (the default): pages
    /// of the same origin as the request's `Host` only. A list of origins
    /// (`https://shop.example.com`: scheme, host, optional port): those and
    /// nothing else, whatever `Host` says (so DNS rebinding gets nowhere);
    /// list the hub's own origin too if its demo page must work. `["*"]`:
    /// any. Clients sending no `Origin` (apps, servers) are always allowed.
    pub allowed_origins: Vec<String>,
}

/// Conversation history.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversationConfig {
    /// Turns (customer questions and completed replies) sent to the NLP
    /// service with each question. Default 10.
    pub history_turns: usize,
    /// Durable events kept per conversation; older ones are dropped and can
    /// no longer be replayed with `after`. Default 1000.
    pub log_cap: usize,
    /// A user who comes back (connects without `conversation`) after this
    /// long without activity starts a new conversation; the old one stays
    /// readable by id. Default 1800000 ms (30 minutes).
    pub idle_window_ms: u64,
    /// Seconds a conversation (its history and its id) is kept after its
    /// last activity with no socket open on it; then it is forgotten, and
    /// resuming it gets `conversation_not_found`. Redis keys expire after
    /// this long; the in-memory store sweeps once a minute. Default
    /// 604800 (7 days).
    pub retention_secs: u64,
    /// How long a reply goes on while no socket of its conversation is open
    /// on any node, so a customer who reconnects gets it; past it the reply
    /// is cancelled and stored with what had streamed. Default 15000 ms.
    pub reply_grace_ms: u64,
    /// Sockets of one conversation open at once on one hub node; more are
    /// refused with `too_many_sockets` and 4409. Default 32.
    pub max_sockets: usize,
    /// Conversations one user (of one tenant) may create within
    /// `created_window_ms`; a conversation is created by its first stored
    /// message, so sockets that never send one count for nothing. The next
    /// first message is refused (`too_many_conversations`, close 4430).
    /// 0 turns the cap off. Default 20.
    pub max_created_per_user: u32,
    /// The sliding window of `max_created_per_user`. Default 3600000 ms (1 hour).
    pub created_window_ms: u64,
}

impl ConversationConfig {
    /// Retention for the Redis store's keys: `redis.retention_secs` if set.
    pub fn redis_retention_secs(&self, redis: &RedisConfig) -> u64 {
        redis.retention_secs.unwrap_or(self.retention_secs)
    }

    pub fn reply_grace(&self) -> Duration {
        Duration::from_millis(self.reply_grace_ms)
    }

    /// The per-user creation cap, `None` when it is off.
    pub fn creation_limit(&self) -> Option<CreationLimit> {
        (self.max_created_per_user > 0).then(|| CreationLimit {
            max: self.max_created_per_user,
            window: Duration::from_millis(self.created_window_ms),
        })
    }
}

/// At most `max` conversations created per user within any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreationLimit {
    pub max: u32,
    pub window: Duration,
}

/// The gRPC NLP service: endpoints, deadlines, retries, breaker, admission.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NlpConfig {
    /// URL of an external `fengda-nlp` (e.g. `http://10.0.0.5:50051`). Unset
    /// with `urls` empty (the default) starts the built-in answerer inside the hub.
    pub url: Option<String>,
    /// More bridge endpoints; calls go to the healthy one with the fewest
    /// calls in flight, skipping those whose breaker is open. Default empty.
    pub urls: Vec<String>,
    /// Deadline for the first chunk of an answer, covering queueing and every
    /// retry; past it the customer gets the polite fallback. Default 1500 ms.
    pub first_chunk_timeout_ms: u64,
    /// Longest wait between two chunks once streaming. Default 5000 ms.
    pub token_gap_timeout_ms: u64,
    /// Deadline for a whole answer, sent to the service as `grpc-timeout`.
    /// Default 30000 ms.
    pub reply_timeout_ms: u64,
    /// Attempts per question before the first token (1 = no retry). Default 3.
    pub retry_max_attempts: u32,
    /// First retry backoff; doubles per attempt, with full jitter. Default 50 ms.
    pub retry_initial_backoff_ms: u64,
    /// Largest retry backoff. Default 400 ms.
    pub retry_max_backoff_ms: u64,
    /// Failures in a row that open an endpoint's breaker. Default 5.
    pub breaker_consecutive_failures: u32,
    /// Share of failed calls in the window that opens the breaker. Default 0.5.
    pub breaker_failure_rate: f64,
    /// Calls in the failure-rate window. Default 20.
    pub breaker_window: usize,
    /// How long an open breaker refuses calls before probing. Default 30000 ms.
    pub breaker_open_ms: u64,
    /// Probe calls let through while half-open. Default 1.
    pub breaker_half_open_probes: u32,
    /// NLP calls in flight per node. Default 512.
    pub max_concurrent: usize,
    /// NLP calls in flight per node for one tenant while another tenant has
    /// calls running or waiting or asked within 10 s: the rest of
    /// `max_concurrent` stays free for the others while one bursts (a tenant
    /// alone may use every slot).
    /// Default: three quarters of `max_concurrent` (rounded up).
    pub max_concurrent_per_tenant: Option<usize>,
    /// Questions waiting for a slot, in a per-tenant fair queue; more get
    /// the fallback at once. Default 1024.
    pub max_queued: usize,
    /// Longest wait for a slot; past it the fallback. The customer sees
    /// `queued` frames meanwhile. Default 10000 ms.
    pub max_queue_wait_ms: u64,
    /// The polite fallback reply, by language. Defaults: English and Chinese.
    pub fallback: FallbackText,
    /// Per-tenant fallback texts, by tenant id. Default none.
    pub tenant_fallback: std::collections::HashMap<String, FallbackText>,
}

/// A fallback reply in each supported language.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackText {
    pub en: String,
    pub zh: String,
}

impl Default for FallbackText {
    fn default() -> Self {
        Self {
            en: "Sorry, the system is busy right now. Please try again in a moment, or type 'agent' to reach a person."
                .into(),
            zh: "抱歉，系统繁忙，请稍后再试，或输入“人工”联系客服。".into(),
        }
    }
}

impl NlpConfig {
    /// The configured bridge endpoints (empty: use the built-in answerer).
    pub fn endpoints(&self) -> Vec<String> {
        self.url.iter().chain(self.urls.iter()).filter(|u| !u.is_empty()).cloned().collect()
    }

    /// `max_concurrent_per_tenant` with its default applied.
    pub fn per_tenant_limit(&self) -> usize {
        self.max_concurrent_per_tenant.unwrap_or_else(|| (self.max_concurrent * 3).div_ceil(4))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            shutdown_grace_ms: 10_000,
            backend: StoreKind::default(),
            redis: RedisConfig::default(),
            server: ServerConfig::default(),
            websocket: WebSocketConfig::default(),
            conversation: ConversationConfig::default(),
            nlp: NlpConfig::default(),
            answerer: fengda_nlp::AnswererConfig::default(),
            auth: crate::auth::AuthConfig::default(),
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_text_chars: 4000,
            max_text_bytes: fengda_nlp::service::MAX_QUESTION_BYTES,
            allow_timing: false,
            outbound_queue_frames: 256,
            max_pending_questions: 8,
            max_frames_per_second: 20,
            frame_burst: 60,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for ConversationConfig {
    fn default() -> Self {
        Self {
            history_turns: 10,
            log_cap: 1000,
            idle_window_ms: 30 * 60 * 1000,
            retention_secs: 7 * 24 * 3600,
            reply_grace_ms: 15_000,
            max_sockets: 32,
            max_created_per_user: 20,
            created_window_ms: 60 * 60 * 1000,
        }
    }
}

impl Default for NlpConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: Vec::new(),
            first_chunk_timeout_ms: 1500,
            token_gap_timeout_ms: 5000,
            reply_timeout_ms: 30_000,
            retry_max_attempts: 3,
            retry_initial_backoff_ms: 50,
            retry_max_backoff_ms: 400,
            breaker_consecutive_failures: 5,
            breaker_failure_rate: 0.5,
            breaker_window: 20,
            breaker_open_ms: 30_000,
            breaker_half_open_probes: 1,
            max_concurrent: 512,
            max_concurrent_per_tenant: None,
            max_queued: 1024,
            max_queue_wait_ms: 10_000,
            fallback: FallbackText::default(),
            tenant_fallback: Default::default(),
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid [answerer] settings: {0}")]
    Answerer(fengda_nlp::error::BridgeError),
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: &'static str },
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Self = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })?;
        config.auth.base_dir = path.parent().map(Path::to_owned);
        Ok(config)
    }

    /// Refuses values the hub cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        let ws = &self.websocket;
        if !(1024..=16 * 1024 * 1024).contains(&ws.max_frame_bytes) {
            return invalid("websocket.max_frame_bytes", "must be between 1 KiB and 16 MiB");
        }
        if ws.max_text_chars == 0 {
            return invalid("websocket.max_text_chars", "must be at least 1");
        }
        if ws.max_text_bytes == 0 {
            return invalid("websocket.max_text_bytes", "must be at least 1");
        }
        if !valid_origin_list(&ws.allowed_origins) {
            return invalid(
                "websocket.allowed_origins",
                "each entry must be an origin (http[s]://host[:port], no path) or `*` alone",
            );
        }
        if self.admin_listen == self.listen && self.listen.port() != 0 {
            return invalid("admin_listen", "must differ from listen");
        }
        if ws.outbound_queue_frames < 8 {
            return invalid("websocket.outbound_queue_frames", "must be at least 8");
        }
        if ws.max_pending_questions == 0 {
            return invalid("websocket.max_pending_questions", "must be at least 1");
        }
        if ws.ping_interval_ms == 0 || ws.idle_timeout_ms <= ws.ping_interval_ms {
            return invalid("websocket.idle_timeout_ms", "must be larger than a non-zero ping_interval_ms");
        }
        if ws.max_frames_per_second == 0 || ws.frame_burst == 0 {
            return invalid("websocket.max_frames_per_second", "and websocket.frame_burst must be at least 1");
        }
        if self.conversation.max_sockets == 0 {
            return invalid("conversation.max_sockets", "must be at least 1");
        }
        let server = &self.server;
        if server.max_connections == Some(0) {
            return invalid("server.max_connections", "must be at least 1");
        }
        if server.header_read_timeout_ms == 0 || server.http_idle_timeout_ms == 0 {
            return invalid("server.header_read_timeout_ms", "and server.http_idle_timeout_ms must be non-zero");
        }
        if !(8192..=1024 * 1024).contains(&server.max_header_bytes) {
            return invalid("server.max_header_bytes", "must be between 8 KiB and 1 MiB");
        }
        if server.connection_rate_per_ip > 0 && server.connection_burst_per_ip == 0 {
            return invalid("server.connection_burst_per_ip", "must be at least 1 when connection_rate_per_ip is set");
        }
        if self.conversation.log_cap == 0 {
            return invalid("conversation.log_cap", "must be at least 1");
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}']) {
            return invalid("redis.key_prefix", "must be non-empty and free of { }");
        }
        if self.redis.retention_secs == Some(0) {
            return invalid("redis.retention_secs", "must be non-zero");
        }
        if self.conversation.retention_secs.saturating_mul(1000) < self.conversation.idle_window_ms.max(1) {
            return invalid("conversation.retention_secs", "must cover conversation.idle_window_ms");
        }
        if self.redis.command_timeout_ms == 0 {
            return invalid("redis.command_timeout_ms", "must be non-zero");
        }
        if self.conversation.idle_window_ms == 0 {
            return invalid("conversation.idle_window_ms", "must be non-zero");
        }
        if self.conversation.created_window_ms == 0 {
            return invalid("conversation.created_window_ms", "must be non-zero");
        }
        if self.conversation.history_turns > 1000 {
            return invalid("conversation.history_turns", "must be at most 1000");
        }
        if self.nlp.first_chunk_timeout_ms == 0 || self.nlp.reply_timeout_ms < self.nlp.first_chunk_timeout_ms {
            return invalid("nlp.reply_timeout_ms", "must be at least first_chunk_timeout_ms, which must be non-zero");
        }
        self.answerer.validate().map_err(ConfigError::Answerer)?;
        let nlp = &self.nlp;
        if nlp.endpoints().iter().any(|url| !(url.starts_with("http://") || url.starts_with("https://"))) {
            return invalid("nlp.url", "every NLP URL must start with http:// or https://");
        }
        if nlp.token_gap_timeout_ms == 0 || nlp.retry_max_attempts == 0 || nlp.max_concurrent == 0 {
            return invalid("nlp", "token_gap_timeout_ms, retry_max_attempts and max_concurrent must be non-zero");
        }
        if nlp.max_concurrent_per_tenant.is_some_and(|n| n == 0 || n > nlp.max_concurrent) {
            return invalid("nlp", "max_concurrent_per_tenant must be between 1 and max_concurrent");
        }
        if nlp.breaker_consecutive_failures == 0 || nlp.breaker_window == 0 || nlp.breaker_half_open_probes == 0 {
            return invalid("nlp.breaker_*", "counts must be non-zero");
        }
        if !(nlp.breaker_failure_rate > 0.0 && nlp.breaker_failure_rate <= 1.0) {
            return invalid("nlp.breaker_failure_rate", "must be in (0, 1]");
        }
        self.auth.check(self.listen)?;
        Ok(())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// `allowed_origins` is `["*"]`, or origins as browsers send them:
/// `http://` or `https://`, a host, an optional port, nothing after.
fn valid_origin_list(origins: &[String]) -> bool {
    if origins.iter().any(|origin| origin == "*") {
        return origins.len() == 1;
    }
    origins.iter().all(|origin| {
        let host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        host.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']))
    })
}

/// `fengda serve` flags; each also reads a `FENGDA_*` environment variable.
/// Unset flags leave the file's (or default) value alone.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (keys as in README's configuration table).
    #[arg(long, env = "FENGDA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:8080] (key `listen`).
    #[arg(long, env = "FENGDA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin listen address: /metrics, /healthz, /readyz [default: 127.0.0.1:9090] (key `admin_listen`).
    #[arg(long, env = "FENGDA_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Accept cleartext HTTP/2 with prior knowledge (h2c) [default: false] (key `server.http2_cleartext`).
    #[arg(long, env = "FENGDA_HTTP2_CLEARTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub http2_cleartext: Option<bool>,
    /// Conversation store: memory (one node) or redis (cluster) [default: memory] (key `backend`).
    #[arg(long, env = "FENGDA_BACKEND")]
    pub backend: Option<StoreKind>,
    /// Redis URL for `--backend redis` [default: redis://127.0.0.1:6379] (key `redis.url`).
    #[arg(long, env = "FENGDA_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of Redis keys and channels [default: fengda] (key `redis.key_prefix`).
    #[arg(long, env = "FENGDA_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// Seconds a conversation is kept after its last activity [default: 604800] (key `conversation.retention_secs`).
    #[arg(long, env = "FENGDA_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// Overrides `--retention-secs` for Redis keys [default: unset] (key `redis.retention_secs`).
    #[arg(long, env = "FENGDA_REDIS_RETENTION_SECS")]
    pub redis_retention_secs: Option<u64>,
    /// Idle time after which a returning user starts a new conversation, ms [default: 1800000] (key `conversation.idle_window_ms`).
    #[arg(long, env = "FENGDA_IDLE_WINDOW_MS")]
    pub idle_window_ms: Option<u64>,
    /// How long a reply goes on with no socket of its conversation open, ms [default: 15000] (key `conversation.reply_grace_ms`).
    #[arg(long, env = "FENGDA_REPLY_GRACE_MS")]
    pub reply_grace_ms: Option<u64>,
    /// Conversations one user may create per window; 0 = no cap [default: 20] (key `conversation.max_created_per_user`).
    #[arg(long, env = "FENGDA_MAX_CREATED_PER_USER")]
    pub max_created_per_user: Option<u32>,
    /// The window of `--max-created-per-user`, ms [default: 3600000] (key `conversation.created_window_ms`).
    #[arg(long, env = "FENGDA_CREATED_WINDOW_MS")]
    pub created_window_ms: Option<u64>,
    /// External NLP service URL(s), comma-separated; unset runs the built-in answerer in-process (keys `nlp.url`, `nlp.urls`).
    #[arg(long, env = "FENGDA_NLP_URL", value_delimiter = ',')]
    pub nlp_url: Option<Vec<String>>,
    /// Longest gap between tokens in ms [default: 5000] (key `nlp.token_gap_timeout_ms`).
    #[arg(long, env = "FENGDA_NLP_TOKEN_GAP_TIMEOUT_MS")]
    pub nlp_token_gap_timeout_ms: Option<u64>,
    /// Attempts before the first token [default: 3] (key `nlp.retry_max_attempts`).
    #[arg(long, env = "FENGDA_NLP_RETRY_MAX_ATTEMPTS")]
    pub nlp_retry_max_attempts: Option<u32>,
    /// Failures in a row that open a breaker [default: 5] (key `nlp.breaker_consecutive_failures`).
    #[arg(long, env = "FENGDA_NLP_BREAKER_CONSECUTIVE_FAILURES")]
    pub nlp_breaker_consecutive_failures: Option<u32>,
    /// How long an open breaker refuses calls, ms [default: 30000] (key `nlp.breaker_open_ms`).
    #[arg(long, env = "FENGDA_NLP_BREAKER_OPEN_MS")]
    pub nlp_breaker_open_ms: Option<u64>,
    /// NLP calls in flight per node [default: 512] (key `nlp.max_concurrent`).
    #[arg(long, env = "FENGDA_NLP_MAX_CONCURRENT")]
    pub nlp_max_concurrent: Option<usize>,
    /// NLP calls in flight per node for one tenant [default: 3/4 of nlp.max_concurrent] (key `nlp.max_concurrent_per_tenant`).
    #[arg(long, env = "FENGDA_NLP_MAX_CONCURRENT_PER_TENANT")]
    pub nlp_max_concurrent_per_tenant: Option<usize>,
    /// Questions waiting for an NLP slot [default: 1024] (key `nlp.max_queued`).
    #[arg(long, env = "FENGDA_NLP_MAX_QUEUED")]
    pub nlp_max_queued: Option<usize>,
    /// Longest wait for an NLP slot, ms [default: 10000] (key `nlp.max_queue_wait_ms`).
    #[arg(long, env = "FENGDA_NLP_MAX_QUEUE_WAIT_MS")]
    pub nlp_max_queue_wait_ms: Option<u64>,
    /// First-chunk deadline in ms [default: 1500] (key `nlp.first_chunk_timeout_ms`).
    #[arg(long, env = "FENGDA_NLP_FIRST_CHUNK_TIMEOUT_MS")]
    pub nlp_first_chunk_timeout_ms: Option<u64>,
    /// Whole-answer deadline in ms [default: 30000] (key `nlp.reply_timeout_ms`).
    #[arg(long, env = "FENGDA_NLP_REPLY_TIMEOUT_MS")]
    pub nlp_reply_timeout_ms: Option<u64>,
    /// Turns of history sent with each question [default: 10] (key `conversation.history_turns`).
    #[arg(long, env = "FENGDA_HISTORY_TURNS")]
    pub history_turns: Option<usize>,
    /// Durable events kept per conversation [default: 1000] (key `conversation.log_cap`).
    #[arg(long, env = "FENGDA_LOG_CAP")]
    pub log_cap: Option<usize>,
    /// Largest WebSocket frame in bytes [default: 65536] (key `websocket.max_frame_bytes`).
    #[arg(long, env = "FENGDA_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Longest message text in characters [default: 4000] (key `websocket.max_text_chars`).
    #[arg(long, env = "FENGDA_MAX_TEXT_CHARS")]
    pub max_text_chars: Option<usize>,
    /// Longest message text in UTF-8 bytes [default: 8192] (key `websocket.max_text_bytes`).
    #[arg(long, env = "FENGDA_MAX_TEXT_BYTES")]
    pub max_text_bytes: Option<usize>,
    /// Let sockets ask for `timing=1` [default: false] (key `websocket.allow_timing`).
    #[arg(long, env = "FENGDA_ALLOW_TIMING", num_args = 0..=1, default_missing_value = "true")]
    pub allow_timing: Option<bool>,
    /// Outbound frames queued per socket before 4008 [default: 256] (key `websocket.outbound_queue_frames`).
    #[arg(long, env = "FENGDA_OUTBOUND_QUEUE_FRAMES")]
    pub outbound_queue_frames: Option<usize>,
    /// Unanswered questions per socket [default: 8] (key `websocket.max_pending_questions`).
    #[arg(long, env = "FENGDA_MAX_PENDING_QUESTIONS")]
    pub max_pending_questions: Option<usize>,
    /// Time sessions get to close on shutdown, in ms [default: 10000] (key `shutdown_grace_ms`).
    #[arg(long, env = "FENGDA_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Ping interval in ms [default: 20000] (key `websocket.ping_interval_ms`).
    #[arg(long, env = "FENGDA_PING_INTERVAL_MS")]
    pub ping_interval_ms: Option<u64>,
    /// Idle timeout in ms [default: 60000] (key `websocket.idle_timeout_ms`).
    #[arg(long, env = "FENGDA_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Extra allowed Origins, comma-separated (key `websocket.allowed_origins`).
    #[arg(long, env = "FENGDA_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Frames per second one socket may send, sustained [default: 20] (key `websocket.max_frames_per_second`).
    #[arg(long, env = "FENGDA_MAX_FRAMES_PER_SECOND")]
    pub max_frames_per_second: Option<u32>,
    /// Frames one socket may send at once above that rate [default: 60] (key `websocket.frame_burst`).
    #[arg(long, env = "FENGDA_FRAME_BURST")]
    pub frame_burst: Option<u32>,
    /// Sockets of one conversation per node [default: 32] (key `conversation.max_sockets`).
    #[arg(long, env = "FENGDA_MAX_SOCKETS_PER_CONVERSATION")]
    pub max_sockets_per_conversation: Option<usize>,
    /// TCP connections held at once [default: open-file limit minus 128] (key `server.max_connections`).
    #[arg(long, env = "FENGDA_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Deadline for a whole request head, ms [default: 10000] (key `server.header_read_timeout_ms`).
    #[arg(long, env = "FENGDA_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// Idle time that closes a connection that is not a WebSocket, ms [default: 30000] (key `server.http_idle_timeout_ms`).
    #[arg(long, env = "FENGDA_HTTP_IDLE_TIMEOUT_MS")]
    pub http_idle_timeout_ms: Option<u64>,
    /// Largest request head in bytes [default: 16384] (key `server.max_header_bytes`).
    #[arg(long, env = "FENGDA_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Connections one client address may hold, 0 = no limit [default: 1000] (key `server.max_connections_per_ip`).
    #[arg(long, env = "FENGDA_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// New connections per second per client address, 0 = no limit [default: 50] (key `server.connection_rate_per_ip`).
    #[arg(long, env = "FENGDA_CONNECTION_RATE_PER_IP")]
    pub connection_rate_per_ip: Option<u32>,
    /// New connections at once per client address above that rate [default: 1000] (key `server.connection_burst_per_ip`).
    #[arg(long, env = "FENGDA_CONNECTION_BURST_PER_IP")]
    pub connection_burst_per_ip: Option<u32>,
    /// Trusted proxies (addresses or CIDR blocks), comma-separated (key `server.trusted_proxies`).
    #[arg(long, env = "FENGDA_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<ProxyAddrs>>,
    /// Built-in answerer: delay before the first token in ms [default: 150] (key `answerer.first_token_delay_ms`).
    #[arg(long, env = "FENGDA_ANSWERER_FIRST_TOKEN_DELAY_MS")]
    pub answerer_first_token_delay_ms: Option<u64>,
    /// Built-in answerer: tokens per second, 0 = no pacing [default: 25] (key `answerer.tokens_per_second`).
    #[arg(long, env = "FENGDA_ANSWERER_TOKENS_PER_SECOND")]
    pub answerer_tokens_per_second: Option<f64>,
    /// How sockets are authenticated: demo or jwt [default: demo] (key `auth.mode`).
    #[arg(long, env = "FENGDA_AUTH_MODE")]
    pub auth_mode: Option<crate::auth::AuthMode>,
    /// Let demo mode listen beyond loopback (insecure) [default: false] (key `auth.insecure_demo`).
    #[arg(long, env = "FENGDA_INSECURE_DEMO", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_demo: Option<bool>,
}

impl ServeArgs {
    /// Builds the final config: defaults, then the file, then these flags.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(value) = value {
                *slot = value;
            }
        }
        set(&mut config.listen, self.listen);
        set(&mut config.admin_listen, self.admin_listen);
        set(&mut config.server.http2_cleartext, self.http2_cleartext);
        set(&mut config.backend, self.backend);
        set(&mut config.redis.url, self.redis_url);
        set(&mut config.redis.key_prefix, self.redis_key_prefix);
        if self.redis_retention_secs.is_some() {
            config.redis.retention_secs = self.redis_retention_secs;
        }
        set(&mut config.conversation.retention_secs, self.retention_secs);
        set(&mut config.conversation.idle_window_ms, self.idle_window_ms);
        set(&mut config.conversation.reply_grace_ms, self.reply_grace_ms);
        set(&mut config.conversation.max_created_per_user, self.max_created_per_user);
        set(&mut config.conversation.created_window_ms, self.created_window_ms);
        if let Some(urls) = self.nlp_url {
            config.nlp.url = None;
            config.nlp.urls = urls.into_iter().filter(|url| !url.is_empty()).collect();
        }
        set(&mut config.nlp.token_gap_timeout_ms, self.nlp_token_gap_timeout_ms);
        set(&mut config.nlp.retry_max_attempts, self.nlp_retry_max_attempts);
        set(&mut config.nlp.breaker_consecutive_failures, self.nlp_breaker_consecutive_failures);
        set(&mut config.nlp.breaker_open_ms, self.nlp_breaker_open_ms);
        set(&mut config.nlp.max_concurrent, self.nlp_max_concurrent);
        if self.nlp_max_concurrent_per_tenant.is_some() {
            config.nlp.max_concurrent_per_tenant = self.nlp_max_concurrent_per_tenant;
        }
        set(&mut config.nlp.max_queued, self.nlp_max_queued);
        set(&mut config.nlp.max_queue_wait_ms, self.nlp_max_queue_wait_ms);
        set(&mut config.nlp.first_chunk_timeout_ms, self.nlp_first_chunk_timeout_ms);
        set(&mut config.nlp.reply_timeout_ms, self.nlp_reply_timeout_ms);
        set(&mut config.conversation.history_turns, self.history_turns);
        set(&mut config.conversation.log_cap, self.log_cap);
        set(&mut config.websocket.max_frame_bytes, self.max_frame_bytes);
        set(&mut config.websocket.max_text_chars, self.max_text_chars);
        set(&mut config.websocket.max_text_bytes, self.max_text_bytes);
        set(&mut config.websocket.allow_timing, self.allow_timing);
        set(&mut config.websocket.outbound_queue_frames, self.outbound_queue_frames);
        set(&mut config.websocket.max_pending_questions, self.max_pending_questions);
        set(&mut config.shutdown_grace_ms, self.shutdown_grace_ms);
        set(&mut config.websocket.ping_interval_ms, self.ping_interval_ms);
        set(&mut config.websocket.idle_timeout_ms, self.idle_timeout_ms);
        set(&mut config.websocket.allowed_origins, self.allowed_origins);
        set(&mut config.websocket.max_frames_per_second, self.max_frames_per_second);
        set(&mut config.websocket.frame_burst, self.frame_burst);
        set(&mut config.conversation.max_sockets, self.max_sockets_per_conversation);
        if self.max_connections.is_some() {
            config.server.max_connections = self.max_connections;
        }
        set(&mut config.server.header_read_timeout_ms, self.header_read_timeout_ms);
        set(&mut config.server.http_idle_timeout_ms, self.http_idle_timeout_ms);
        set(&mut config.server.max_header_bytes, self.max_header_bytes);
        set(&mut config.server.max_connections_per_ip, self.max_connections_per_ip);
        set(&mut config.server.connection_rate_per_ip, self.connection_rate_per_ip);
        set(&mut config.server.connection_burst_per_ip, self.connection_burst_per_ip);
        set(&mut config.server.trusted_proxies, self.trusted_proxies);
        set(&mut config.answerer.first_token_delay_ms, self.answerer_first_token_delay_ms);
        set(&mut config.answerer.tokens_per_second, self.answerer_tokens_per_second);
        set(&mut config.auth.mode, self.auth_mode);
        set(&mut config.auth.insecure_demo, self.insecure_demo);
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default of every config key, by its dotted name, from the one
    /// place defaults are written: the `Default` impls.
    fn defaults() -> std::collections::BTreeMap<String, serde_json::Value> {
        fn flatten(
            prefix: &str,
            value: serde_json::Value,
            out: &mut std::collections::BTreeMap<String, serde_json::Value>,
        ) {
            match value {
                serde_json::Value::Object(map) if !map.is_empty() => {
                    for (key, value) in map {
                        let name = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                        flatten(&name, value, out);
                    }
                }
                other => {
                    out.insert(prefix.to_owned(), other);
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        flatten("", serde_json::to_value(Config::default()).unwrap(), &mut out);
        out
    }

    /// How a default is written in the README and in `--help`.
    fn shown(value: &serde_json::Value) -> String {
        match value {
            serde_json::Value::Null => "unset".to_owned(),
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Array(items) if items.is_empty() => "[]".to_owned(),
            // 25.0 tokens per second reads as 25.
            serde_json::Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) && n.is_f64() => {
                format!("{}", n.as_f64().unwrap_or_default() as i64)
            }
            other => other.to_string(),
        }
    }

    #[test]
    fn the_readme_configuration_table_lists_every_key_with_its_real_default() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let table = readme.split("\n## Configuration").nth(1).expect("a Configuration section");
        let table = table.split("\n## ").next().unwrap();
        let defaults = defaults();
        let mut documented = std::collections::BTreeSet::new();
        for row in table.lines().filter(|line| line.starts_with("| `")) {
            let cells: Vec<_> = row.split('|').map(str::trim).collect();
            let (key, default) = (cells[1], cells[4]);
            // Rows naming a family of keys (`nlp.fallback.en`, `.zh`) are prose.
            let Some(key) = key.strip_prefix('`').and_then(|k| k.strip_suffix('`')).filter(|k| !k.contains('`')) else {
                continue;
            };
            documented.insert(key.to_owned());
            let Some(value) = defaults.get(key) else { panic!("README documents `{key}`, which is no config key") };
            // Defaults that are rules, not values ("open-file limit − 128",
            // "¾ of `max_concurrent`", "embedded `faq.json`") are not checked.
            let literal = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')).filter(|d| !d.contains('`'));
            match (literal, value) {
                (Some(literal), _) => assert_eq!(literal, shown(value), "README default of `{key}`"),
                (None, serde_json::Value::Null) => {}
                (None, _) if default == "unset" => panic!("README says `{key}` is unset by default; it is {value}"),
                (None, _) => {}
            }
        }
        let prose = ["nlp.fallback", "nlp.tenant_fallback"];
        for key in defaults.keys().filter(|key| !prose.iter().any(|p| key.starts_with(p))) {
            assert!(documented.contains(key), "README's configuration table has no row for `{key}`");
        }
    }

    #[test]
    fn every_flag_says_its_key_and_its_real_default() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let defaults = defaults();
        for arg in Cli::command().get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let Some(key) = help.split("(key `").nth(1).and_then(|rest| rest.split('`').next()) else { continue };
            let Some(default) = help.split("[default: ").nth(1).and_then(|rest| rest.split(']').next()) else {
                continue;
            };
            let value =
                defaults.get(key).unwrap_or_else(|| panic!("--{} names `{key}`, which is no config key", arg.get_id()));
            if default.contains(' ') && default != "unset" {
                continue; // a rule ("3/4 of nlp.max_concurrent"), not a value
            }
            assert_eq!(default, shown(value), "--{} help", arg.get_id());
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("fengda-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fengda.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\n[conversation]\nhistory_turns = 4\n").unwrap();
        let args = ServeArgs { config: Some(path.clone()), history_turns: Some(6), ..Default::default() };
        let config = args.into_config().unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.conversation.history_turns, 6);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("listne = \"x\"").is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        let mut config = Config::default();
        config.websocket.idle_timeout_ms = 10;
        assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "websocket.idle_timeout_ms", .. })));
        // A conversation must outlive the window in which a returning user resumes it.
        let mut config = Config::default();
        config.conversation.idle_window_ms = 60_000;
        config.conversation.retention_secs = 59;
        assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "conversation.retention_secs", .. })));
        config.conversation.retention_secs = 60;
        config.validate().unwrap();
        config.redis.retention_secs = Some(0);
        assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "redis.retention_secs", .. })));
    }

    #[test]
    fn trusted_proxies_are_addresses_or_cidr_blocks() {
        let config: Config = toml::from_str("[server]\ntrusted_proxies = [\"10.0.0.5\", \"192.168.0.0/16\"]").unwrap();
        let proxies = &config.server.trusted_proxies;
        assert!(proxies[0].contains(&"10.0.0.5".parse().unwrap()));
        assert!(!proxies[0].contains(&"10.0.0.6".parse().unwrap()));
        assert!(proxies[1].contains(&"192.168.7.8".parse().unwrap()));
        assert!(toml::from_str::<Config>("[server]\ntrusted_proxies = [\"proxy.example\"]").is_err());
        let mut config = Config::default();
        config.server.max_header_bytes = 4096;
        assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "server.max_header_bytes", .. })));
    }

    #[test]
    fn allowed_origins_are_origins_or_a_lone_star() {
        let check = |origins: &[&str]| {
            let mut config = Config::default();
            config.websocket.allowed_origins = origins.iter().map(|o| o.to_string()).collect();
            config.validate().is_ok()
        };
        assert!(check(&[]));
        assert!(check(&["*"]));
        assert!(check(&["https://shop.example.com", "http://127.0.0.1:8080", "https://[::1]:8443"]));
        for bad in [&["*", "https://a.example"][..], &["shop.example.com"], &["https://a.example/"], &["https://"]] {
            assert!(!check(bad), "{bad:?}");
        }
    }

    #[test]
    fn flags_switch_booleans_on_and_off() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let config = |args: &[&str]| Cli::parse_from([&["fengda"], args].concat()).serve.into_config().unwrap();
        let defaults = config(&[]);
        assert!(!defaults.websocket.allow_timing && !defaults.server.http2_cleartext);
        assert_eq!(defaults.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(defaults.websocket.max_text_bytes, 8192);
        let on = config(&["--allow-timing", "--http2-cleartext", "--admin-listen", "127.0.0.1:0"]);
        assert!(on.websocket.allow_timing && on.server.http2_cleartext);
        assert_eq!(on.admin_listen.port(), 0);
        assert!(!config(&["--allow-timing=false"]).websocket.allow_timing);
    }

    #[test]
    fn redis_retention_defaults_to_the_conversation_retention() {
        let mut config = Config::default();
        config.conversation.retention_secs = 3600;
        assert_eq!(config.conversation.redis_retention_secs(&config.redis), 3600);
        config.redis.retention_secs = Some(7200);
        assert_eq!(config.conversation.redis_retention_secs(&config.redis), 7200);
    }
}
