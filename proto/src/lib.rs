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

/// Metadata on a `RESOURCE_EXHAUSTED` that is an upstream's rate limit
/// (an LLM server's HTTP 429 for one tenant's key or model), not the bridge
/// being full: a hub retries the call but does not lower its limit for the
/// bridge, which would hold back every other tenant.
pub const UPSTREAM_LIMITED_HEADER: &str = "fengda-upstream-limited";

/// Metadata on the `UNAVAILABLE` a draining bridge answers new calls with:
/// it is shutting down on purpose, so a hub sends the call elsewhere and
/// does not count it against the bridge's circuit breaker.
pub const DRAINING_HEADER: &str = "fengda-draining";

/// Defines a string id newtype shared by the hub and the bridge: an
/// `Arc<str>` (cheap to clone into tasks and maps) with `as_str`, `Display`
/// and a `Debug` that names the type.
///
/// `string_id!(Name)` adds `Name::new`, for ids taken as they are (the
/// bridge's, which the hub validated). `string_id!(Name, validate)` adds
/// `Name::parse` instead, which checks a client's id with `validate`
/// (`fn(&str) -> Result<(), E>`), so that type has no unchecked constructor
/// outside its module.
#[macro_export]
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $crate::string_id!(@type $(#[$doc])* $name);
        impl $name {
            /// Wraps an id as it is.
            pub fn new(id: impl Into<std::sync::Arc<str>>) -> Self {
                Self(id.into())
            }
        }
    };
    ($(#[$doc:meta])* $name:ident, $validate:path) => {
        $crate::string_id!(@type $(#[$doc])* $name);
        impl $name {
            /// Validates a client-supplied id.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                $validate(raw)?;
                Ok(Self(raw.into()))
            }
        }
    };
    (@type $(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }
    };
}
