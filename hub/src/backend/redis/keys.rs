//! Every Redis key and channel name the hub uses, in one place.
//!
//! Shape: `<prefix>:conv:{<tenant>:<conversation>}:<part>` and
//! `<prefix>:user:{<tenant>:<user>}:latest`. The prefix separates
//! deployments sharing a Redis; the tenant is in every name. All keys and the
//! channel of one conversation share the hash tag `{tenant:conversation}`,
//! so the atomic append touches a single Redis Cluster slot and a move to
//! sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) changes no name.

use crate::ids::{ConversationKey, TenantId, UserId};

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    fn conversation(&self, key: &ConversationKey, part: &str) -> String {
        format!("{}:conv:{{{}:{}}}:{part}", self.prefix, key.tenant, key.conversation)
    }

    /// HASH: `user`, `epoch`, `seq` (last assigned), `created_ms`.
    pub fn meta(&self, key: &ConversationKey) -> String {
        self.conversation(key, "meta")
    }

    /// LIST: the durable events as JSON, oldest first, capped.
    pub fn log(&self, key: &ConversationKey) -> String {
        self.conversation(key, "log")
    }

    /// ZSET: customer message id → seq, for idempotent resends.
    pub fn message_ids(&self, key: &ConversationKey) -> String {
        self.conversation(key, "ids")
    }

    /// Pub/sub channel carrying the conversation's events to every node.
    pub fn channel(&self, key: &ConversationKey) -> String {
        self.conversation(key, "events")
    }

    /// HASH: the user's most recent `conversation` and its `last_active_ms`.
    pub fn latest(&self, tenant: &TenantId, user: &UserId) -> String {
        format!("{}:user:{{{tenant}:{user}}}:latest", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConversationId;

    #[test]
    fn one_conversation_shares_one_hash_tag() {
        let keys = Keys::new("fengda");
        let key = ConversationKey {
            tenant: TenantId::parse("bank-a").unwrap(),
            conversation: ConversationId::parse("c1").unwrap(),
        };
        assert_eq!(keys.meta(&key), "fengda:conv:{bank-a:c1}:meta");
        assert_eq!(keys.log(&key), "fengda:conv:{bank-a:c1}:log");
        assert_eq!(keys.message_ids(&key), "fengda:conv:{bank-a:c1}:ids");
        assert_eq!(keys.channel(&key), "fengda:conv:{bank-a:c1}:events");
        let latest = keys.latest(&TenantId::parse("bank-a").unwrap(), &UserId::parse("alice").unwrap());
        assert_eq!(latest, "fengda:user:{bank-a:alice}:latest");
    }
}
