//! `[nlp]`: the gRPC NLP service: endpoints, deadlines, retries, breakers,
//! admission (calls in flight, per-tenant share, fair queue) and the polite
//! fallback texts.

use serde::{Deserialize, Serialize};

use super::ConfigError;

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
    /// Longest answer, in UTF-8 bytes of text. An answer that grows past it
    /// is cut there (on a character boundary), its NLP call is cancelled,
    /// and the fallback sentence ends it, as a stream that broke would.
    /// Keeps a runaway model from growing a reply, the log and every NLP
    /// request that carries it as history without bound. Default 65536.
    pub max_reply_bytes: usize,
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

impl Default for NlpConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: Vec::new(),
            first_chunk_timeout_ms: 1500,
            token_gap_timeout_ms: 5000,
            reply_timeout_ms: 30_000,
            max_reply_bytes: 64 * 1024,
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

impl NlpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        if self.first_chunk_timeout_ms == 0 || self.reply_timeout_ms < self.first_chunk_timeout_ms {
            return invalid("nlp.reply_timeout_ms", "must be at least first_chunk_timeout_ms, which must be non-zero");
        }
        if self.endpoints().iter().any(|url| !(url.starts_with("http://") || url.starts_with("https://"))) {
            return invalid("nlp.url", "every NLP URL must start with http:// or https://");
        }
        if self.token_gap_timeout_ms == 0
            || self.retry_max_attempts == 0
            || self.max_concurrent == 0
            || self.max_reply_bytes == 0
        {
            return invalid(
                "nlp",
                "token_gap_timeout_ms, retry_max_attempts, max_concurrent and max_reply_bytes must be non-zero",
            );
        }
        if self.max_concurrent_per_tenant.is_some_and(|n| n == 0 || n > self.max_concurrent) {
            return invalid("nlp", "max_concurrent_per_tenant must be between 1 and max_concurrent");
        }
        if self.breaker_consecutive_failures == 0 || self.breaker_window == 0 || self.breaker_half_open_probes == 0 {
            return invalid("nlp.breaker_*", "counts must be non-zero");
        }
        if !(self.breaker_failure_rate > 0.0 && self.breaker_failure_rate <= 1.0) {
            return invalid("nlp.breaker_failure_rate", "must be in (0, 1]");
        }
        Ok(())
    }
}
