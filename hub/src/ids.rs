//! Newtype identifiers that cross module boundaries.
//!
//! Ids come from clients (tenant, user, conversation in the `/ws` query) or
//! from the hub (conversation, reply, session). Parsing validates the shape
//! once at the edge, for every store alike, so the rest of the hub never
//! sees an empty, oversized or foreign id, and `Arc<str>` makes cloning them
//! into tasks and maps cheap.
//!
//! Tenant and user ids are the client's: 1–128 bytes of `A–Z a–z 0–9 - _ . : @`.
//! Conversation ids are the hub's own ([`ConversationId::generate`]): exactly
//! 32 lowercase hex digits; anything else is refused, so a client can only
//! name a conversation it was given. Redis names escape every id anyway
//! (`store::redis::keys`), so no choice of ids can make two of them meet.

use std::fmt;
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
    #[error("must be a conversation id given by the hub in `ready` (32 lowercase hex digits)")]
    NotHubConversation,
}

/// Length of a conversation id: a UUID v4 in lowercase hex without dashes.
pub const CONVERSATION_ID_LEN: usize = 32;

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

/// The one shape of a conversation id: what [`ConversationId::generate`] makes.
fn validate_conversation(raw: &str) -> Result<(), IdError> {
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if raw.len() == CONVERSATION_ID_LEN && raw.as_bytes().iter().all(hex) {
        Ok(())
    } else {
        Err(IdError::NotHubConversation)
    }
}

fengda_proto::string_id!(
    /// A customer organisation sharing the cluster (a bank, a telco...).
    TenantId,
    validate
);
fengda_proto::string_id!(
    /// A customer of a tenant, stable across devices and reconnects.
    UserId,
    validate
);
fengda_proto::string_id!(
    /// One conversation: a log of durable events numbered by seq. Always
    /// the hub's own random id (32 lowercase hex digits).
    ConversationId,
    validate_conversation
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

/// A new assistant reply's id (`r-` and 32 hex digits; also the `id` of
/// its stored event) and the request id of its NLP call: the same UUID,
/// hyphenated (model servers such as llama-cpp-python accept only a UUID
/// there), so a bridge's or model server's log line leads back to the reply.
pub fn generate_reply_ids() -> (String, String) {
    let uuid = uuid::Uuid::new_v4();
    let mut buffer = uuid::Uuid::encode_buffer();
    let mut reply = String::with_capacity(2 + uuid::fmt::Simple::LENGTH);
    reply.push_str("r-");
    reply.push_str(uuid.simple().encode_lower(&mut buffer));
    let request = uuid.hyphenated().encode_lower(&mut buffer).to_owned();
    (reply, request)
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

/// Who a socket speaks for: a tenant and one of its users, as settled at
/// the upgrade (from the verified token in jwt mode, from the query in demo
/// mode). [`Party::conversation`] is the one way to name a conversation's
/// data: every key, channel and map entry of a conversation is derived from
/// a [`ConversationKey`], and only a party makes one, so a conversation's
/// tenant is always the tenant of the party asking.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Party {
    pub tenant: TenantId,
    pub user: UserId,
}

impl Party {
    /// The key of `conversation` within this party's tenant.
    pub fn conversation(&self, conversation: ConversationId) -> ConversationKey {
        ConversationKey { tenant: self.tenant.clone(), conversation }
    }
}

/// A conversation is always addressed together with its tenant, so no code
/// path can reach another tenant's conversation by id alone. Made only by
/// [`Party::conversation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationKey {
    tenant: TenantId,
    conversation: ConversationId,
}

/// Hashes the first half of the conversation id alone, as one word: the id
/// is a random UUID (the hub makes them), so its first 16 hex digits carry
/// 60 random bits (one digit is the UUID's version), and equal keys have
/// equal ids. Keys are hashed on every lookup of the fan-out and the log,
/// several times per reply.
impl std::hash::Hash for ConversationKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let id = self.conversation.as_str().as_bytes();
        match id.first_chunk::<16>() {
            Some(head) => state.write_u128(u128::from_le_bytes(*head)),
            None => id.hash(state),
        }
    }
}

impl ConversationKey {
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn conversation(&self) -> &ConversationId {
        &self.conversation
    }

    /// A key from raw ids, for unit tests (`c` repeated to a valid id when short).
    #[cfg(test)]
    pub fn for_test(tenant: &str, conversation: &str) -> Self {
        let conversation =
            if conversation.len() == 32 { conversation.to_owned() } else { conversation.repeat(32)[..32].to_owned() };
        Self { tenant: TenantId::parse(tenant).unwrap(), conversation: ConversationId::parse(&conversation).unwrap() }
    }
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

    #[test]
    fn conversation_ids_are_only_the_hubs_own() {
        let generated = ConversationId::generate();
        assert_eq!(ConversationId::parse(generated.as_str()), Ok(generated));
        for foreign in [
            "",
            "nope",
            "c1",
            "y:3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a1c",
            "3F2A9C0E5B7D4E1F8A6C2B9D0E4F7A1C",
            "3f2a9c0e-5b7d-4e1f-8a6c-2b9d0e4f7a1c",
            "3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a1",
            "3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a1c0",
            "3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a1g",
            "{3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a}",
        ] {
            assert_eq!(ConversationId::parse(foreign), Err(IdError::NotHubConversation), "{foreign}");
        }
    }

    #[test]
    fn a_replys_request_id_is_its_uuid_hyphenated() {
        let (reply, request) = generate_reply_ids();
        let uuid = uuid::Uuid::parse_str(&request).unwrap();
        assert_eq!(request, uuid.hyphenated().to_string());
        assert_eq!(reply, format!("r-{}", uuid.simple()));
        assert_ne!(generate_reply_ids().0, reply);
    }
}
