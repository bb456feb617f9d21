//! `[websocket]`: what one socket may send and receive, its keepalive, and
//! which browser origins may open one.

use serde::{Deserialize, Serialize};

use super::ConfigError;

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

impl WebSocketConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        if !(1024..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return invalid("websocket.max_frame_bytes", "must be between 1 KiB and 16 MiB");
        }
        if self.max_text_chars == 0 {
            return invalid("websocket.max_text_chars", "must be at least 1");
        }
        if self.max_text_bytes == 0 {
            return invalid("websocket.max_text_bytes", "must be at least 1");
        }
        if !valid_origin_list(&self.allowed_origins) {
            return invalid(
                "websocket.allowed_origins",
                "each entry must be an origin (http[s]://host[:port], no path) or `*` alone",
            );
        }
        if self.outbound_queue_frames < 8 {
            return invalid("websocket.outbound_queue_frames", "must be at least 8");
        }
        if self.max_pending_questions == 0 {
            return invalid("websocket.max_pending_questions", "must be at least 1");
        }
        if self.ping_interval_ms == 0 || self.idle_timeout_ms <= self.ping_interval_ms {
            return invalid("websocket.idle_timeout_ms", "must be larger than a non-zero ping_interval_ms");
        }
        if self.max_frames_per_second == 0 || self.frame_burst == 0 {
            return invalid("websocket.max_frames_per_second", "and websocket.frame_burst must be at least 1");
        }
        Ok(())
    }
}

/// `allowed_origins` is `["*"]`, or origins as browsers send them:
/// `http://` or `https://`, a host, an optional port, nothing after.
pub(super) fn valid_origin_list(origins: &[String]) -> bool {
    if origins.iter().any(|origin| origin == "*") {
        return origins.len() == 1;
    }
    origins.iter().all(|origin| {
        let host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        host.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']))
    })
}
