//! The NLP service contract shared by the hub (client) and the bridge (server).
//!
//! Only this crate runs code generation; everyone else imports
//! [`nlp::v1`]. The `.proto` source is in `proto/proto/fengda/nlp/v1/nlp.proto`.

pub mod nlp {
    pub mod v1 {
        tonic::include_proto!("fengda.nlp.v1");
    }
}

/// Response metadata (HTTP/2 header) on every response of a `fengda-nlp`
/// bridge, health checks included: how many answer streams it takes at once
/// (`limits.max_concurrent_streams`). A hub starts its learned limit for the
/// bridge there, and never goes above it.
pub const MAX_STREAMS_HEADER: &str = "fengda-max-streams";

/// Metadata on the `UNAVAILABLE` a draining bridge answers new calls with:
/// it is shutting down on purpose, so a hub sends the call elsewhere and
/// does not count it against the bridge's circuit breaker.
pub const DRAINING_HEADER: &str = "fengda-draining";
