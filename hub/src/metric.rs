//! Every metric the hub exports: its name, kind and help text, in one place
//! (as `store::redis::keys` is for Redis names), so that a name is written
//! once and `/metrics` describes each series. docs/operations.md explains
//! them for operators; labels stay bounded (never a conversation or user).

/// A metric's name with its kind and `# HELP` text.
struct Described {
    name: &'static str,
    kind: Kind,
    help: &'static str,
}

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

macro_rules! metrics_table {
    ($($(#[$doc:meta])* $const:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        $($(#[$doc])* pub const $const: &str = $name;)*
        const ALL: &[Described] = &[$(Described { name: $name, kind: Kind::$kind, help: $help }),*];
    };
}

metrics_table! {
    /// `{backend, version}`, always 1.
    INFO = "fengda_hub_info", Gauge, "Always 1: the node's conversation store (backend) and release (version).";
    NLP_CALLS = "fengda_hub_nlp_calls_total", Counter, "NLP call attempts reported to their endpoint's circuit breaker, by outcome (ok, failed).";
    /// `{tenant, kind}`: `kind` is `prompt` or `completion`.
    NLP_TOKENS = "fengda_hub_nlp_tokens_total", Counter, "Model tokens of the node's replies as the model server counted them (prompt, completion), by tenant (its [tenants.<id>] section, else default); replies whose server sent no counts add nothing.";
    NLP_RETRIES = "fengda_hub_nlp_retries_total", Counter, "NLP calls retried before their first token.";
    NLP_FALLBACKS = "fengda_hub_nlp_fallbacks_total", Counter, "Replies completed with the fallback sentence, by reason.";
    NLP_OVERLOADED = "fengda_hub_nlp_overloaded_total", Counter, "Calls an NLP endpoint refused as full (RESOURCE_EXHAUSTED), by endpoint.";
    NLP_ENDPOINT_LIMIT = "fengda_hub_nlp_endpoint_limit", Gauge, "Calls the node sends an NLP endpoint at once, as learned, by endpoint.";
    NLP_CAPACITY = "fengda_hub_nlp_capacity", Gauge, "NLP calls the node runs at once now (sum of the usable endpoints' limits, at most nlp.max_concurrent).";
    NLP_BREAKER_STATE = "fengda_hub_nlp_breaker_state", Gauge, "Circuit breaker of an NLP endpoint: 0 closed, 1 open, 2 half-open.";
    NLP_QUEUE_WAIT = "fengda_hub_nlp_queue_wait_seconds", Histogram, "Time questions waited for an NLP slot (only those that waited).";
    NLP_FIRST_TOKEN = "fengda_hub_nlp_first_token_seconds", Histogram, "NLP request sent to first token, per successful attempt.";
    REPLY_BEFORE_NLP = "fengda_hub_reply_before_nlp_seconds", Histogram, "The hub's own time before the NLP request: message received to request built.";
    FRAME_DELIVERY = "fengda_hub_frame_delivery_seconds", Histogram, "Frame handed to the fan-out to written to its socket, per write.";
    AUTH_REFUSALS = "fengda_hub_auth_refusals_total", Counter, "Tokens refused (at the upgrade or in a refresh), by code.";
    SLOW_CONSUMER_CLOSES = "fengda_hub_slow_consumer_closes_total", Counter, "Sockets closed with 4008 because their outbound queue filled.";
    SESSIONS_OPEN = "fengda_hub_sessions_open", Gauge, "WebSocket sessions open on this node.";
    SESSIONS_REFUSED = "fengda_hub_sessions_refused_total", Counter, "Sockets refused after the upgrade, by reason.";
    FRAMES_RATE_LIMITED = "fengda_hub_frames_rate_limited_total", Counter, "Client frames refused with rate_limited.";
    /// `{limit}`: `connections` or `messages`.
    TENANT_LIMITED = "fengda_hub_tenant_limited_total", Counter, "Upgrades (limit=connections) and messages (limit=messages) refused at a tenant's limits, by tenant (its [tenants.<id>] section, else default).";
    RATE_LIMIT_CLOSES = "fengda_hub_rate_limit_closes_total", Counter, "Sockets closed with 4429 for flooding frames.";
    REDIS_UNSUBSCRIBES_PENDING = "fengda_hub_redis_unsubscribes_pending", Gauge, "Pub/sub channels the node left while Redis could not hear it, still to unsubscribe (cluster mode).";
    CONNECTIONS_OPEN = "fengda_hub_connections_open", Gauge, "TCP connections open on this node (WebSockets included).";
    CONNECTIONS_MAX = "fengda_hub_connections_max", Gauge, "The node's connection cap (server.max_connections as applied).";
    CONNECTIONS_REFUSED = "fengda_hub_connections_refused_total", Counter, "Connections refused by the node's limits, by reason.";
    CONNECTIONS_CLOSED = "fengda_hub_connections_closed_total", Counter, "Connections the node closed for a timeout or size limit, by reason.";
    ACCEPT_ERRORS = "fengda_hub_accept_errors_total", Counter, "Failed accepts (e.g. out of file descriptors).";
    RUNTIME_TASKS_ALIVE = "fengda_hub_runtime_tasks_alive", Gauge, "Tasks alive in the node's runtime.";
    RUNTIME_WORKERS = "fengda_hub_runtime_workers", Gauge, "The runtime's worker threads.";
    CONVERSATIONS_EXPIRED = "fengda_hub_conversations_expired_total", Counter, "Conversations the in-memory store forgot after conversation.retention_secs.";
    AGENT_TAKEOVERS = "fengda_hub_agent_takeovers_total", Counter, "Conversations an agent took (steals included).";
    AGENT_STEALS = "fengda_hub_agent_steals_total", Counter, "Conversations an agent took from another agent (each also logged at info).";
    AGENT_STALE_WRITES = "fengda_hub_agent_stale_writes_total", Counter, "Agents' writes refused because the conversation's owner had changed (not_owner).";
    AGENT_HANDOFFS = "fengda_hub_agent_handoffs_total", Counter, "Conversations a customer asked a person for (put in waiting).";
}

/// Registers every metric's help text with the installed recorder.
pub fn describe() {
    for metric in ALL {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_convention() {
        let mut names: Vec<_> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a metric named twice");
        for metric in ALL {
            assert!(metric.name.starts_with("fengda_hub_"), "{}", metric.name);
            match metric.kind {
                Kind::Counter => assert!(metric.name.ends_with("_total"), "{}", metric.name),
                Kind::Histogram => assert!(metric.name.ends_with("_seconds"), "{}", metric.name),
                Kind::Gauge => assert!(!metric.name.ends_with("_total"), "{}", metric.name),
            }
        }
    }
}
