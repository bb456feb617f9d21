//! Newtype identifiers that cross module boundaries.
//!
//! Ids come from clients (tenant, user, conversation in the `/ws` query) or
//! from the hub (conversation, reply, session). Parsing validates the shape
//! once at the edge so the rest of the hub never sees an empty or oversized
//! id, and `Arc<str>` makes cloning them into tasks and maps cheap.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest id accepted from a client, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why a client-supplied id was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("may contain only letters, digits and - _ . : @")]
    BadChar,
}

fn validate(raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty);
    }
    if raw.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@');
    if !raw.chars().all(ok) {
        return Err(IdError::BadChar);
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates a client-supplied id.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                validate(raw)?;
                Ok(Self(raw.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }
    };
}

string_id!(
    /// A customer organisation sharing the cluster (a bank, a telco...).
    TenantId
);
string_id!(
    /// A customer of a tenant, stable across devices and reconnects.
    UserId
);
string_id!(
    /// One conversation: a log of durable events numbered by seq.
    ConversationId
);

impl ConversationId {
    /// A fresh, globally unique conversation id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string().into())
    }
}

/// A random token: conversation log epochs and node ids.
pub fn generate_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Identifies one assistant reply; it is also the `id` of the stored event.
pub fn generate_reply_id() -> String {
    format!("r-{}", uuid::Uuid::new_v4().simple())
}

/// One WebSocket connection on this node. Never leaves the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

impl SessionId {
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The number behind the id, for carrying it through Redis.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    pub fn from_u64(raw: u64) -> Self {
        Self(raw)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// A conversation is always addressed together with its tenant, so no code
/// path can reach another tenant's conversation by id alone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    pub tenant: TenantId,
    pub conversation: ConversationId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_reasonable_ids() {
        assert!(TenantId::parse("bank-a").is_ok());
        assert!(UserId::parse("user:42@example.com").is_ok());
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(TenantId::parse(""), Err(IdError::Empty));
        assert_eq!(UserId::parse(&"x".repeat(129)), Err(IdError::TooLong));
        assert_eq!(UserId::parse("a b"), Err(IdError::BadChar));
        assert_eq!(UserId::parse("../etc"), Err(IdError::BadChar));
    }
}
