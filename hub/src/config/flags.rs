//! The `fengda serve` flags (clap [`ServeArgs`]): each overrides one config
//! key and also reads a `FENGDA_*` environment variable; its help names the
//! key and its default (checked against [`Config::default`] by a test).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Config, ConfigError, ProxyAddrs, StoreKind};

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
    /// Longest answer in UTF-8 bytes, cut there [default: 65536] (key `nlp.max_reply_bytes`).
    #[arg(long, env = "FENGDA_NLP_MAX_REPLY_BYTES")]
    pub nlp_max_reply_bytes: Option<usize>,
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
    /// Conversations one agent socket may watch at once [default: 50] (key `agents.max_watched`).
    #[arg(long, env = "FENGDA_AGENTS_MAX_WATCHED")]
    pub agents_max_watched: Option<usize>,
    /// Let every agent steal a conversation another agent owns [default: false] (key `agents.allow_steal`).
    #[arg(long, env = "FENGDA_AGENTS_ALLOW_STEAL", num_args = 0..=1, default_missing_value = "true")]
    pub agents_allow_steal: Option<bool>,
    /// Seconds a conversation waits for a person before the assistant answers again [default: 300] (key `agents.handoff_timeout_secs`).
    #[arg(long, env = "FENGDA_AGENTS_HANDOFF_TIMEOUT_SECS")]
    pub agents_handoff_timeout_secs: Option<u64>,
    /// Milliseconds a `typing` holds without a new one [default: 4000] (key `agents.typing_ttl_ms`).
    #[arg(long, env = "FENGDA_AGENTS_TYPING_TTL_MS")]
    pub agents_typing_ttl_ms: Option<u64>,
    /// Seconds a node's presence entries hold without its heartbeat [default: 15] (key `agents.presence_ttl_secs`).
    #[arg(long, env = "FENGDA_AGENTS_PRESENCE_TTL_SECS")]
    pub agents_presence_ttl_secs: Option<u64>,
    /// Seconds an idle conversation of an offline customer stays in the agents' list [default: 3600] (key `agents.list_window_secs`).
    #[arg(long, env = "FENGDA_AGENTS_LIST_WINDOW_SECS")]
    pub agents_list_window_secs: Option<u64>,
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
        set(&mut config.nlp.max_reply_bytes, self.nlp_max_reply_bytes);
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
        set(&mut config.agents.max_watched, self.agents_max_watched);
        set(&mut config.agents.allow_steal, self.agents_allow_steal);
        set(&mut config.agents.handoff_timeout_secs, self.agents_handoff_timeout_secs);
        set(&mut config.agents.typing_ttl_ms, self.agents_typing_ttl_ms);
        set(&mut config.agents.presence_ttl_secs, self.agents_presence_ttl_secs);
        set(&mut config.agents.list_window_secs, self.agents_list_window_secs);
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
