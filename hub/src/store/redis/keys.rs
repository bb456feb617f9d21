//! Every Redis key and channel name the hub uses, in one place.
//!
//! Shape: `<prefix>:conv:{<tenant>:<conversation>}:<part>`,
//! `<prefix>:user:{<tenant>:<user>}:<part>`, `<prefix>:tenant:{<tenant>}:<part>`
//! and `<prefix>:node:<node>:heartbeat`.
//! The prefix separates deployments sharing a Redis; the tenant is in every
//! conversation and user name.
//!
//! Names are injective: each id is percent-escaped ([`escape`]: `%`, `:`,
//! `{`, `}`, control and non-ASCII bytes become `%XX`) before it is joined,
//! so an escaped id never holds the `:` that separates it from the next one
//! nor a brace, and no two (tenant, conversation) or (tenant, user) pairs
//! can ever produce the same name, whatever characters the ids hold (tenant
//! `x:y` with conversation `c` is `{x%3Ay:c}`, tenant `x` with conversation
//! `y:c` would be `{x:y%3Ac}`). Ids of the usual alphabet are unchanged.
//!
//! All keys and the channel of one conversation share the hash tag
//! `{tenant:conversation}` (no escaped id holds a brace, so Redis Cluster
//! hashes exactly that part), so the atomic append touches that slot (and
//! its tenant's, for the agents' list: [`Keys::active`], [`Keys::listing`],
//! and its writer's, for [`Keys::latest`] and, when it creates the log,
//! [`Keys::created`]; on Redis Cluster those parts
//! would move out of the script) and
//! a move to sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) changes no name; a
//! user's keys share `{tenant:user}` likewise.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::ids::{ConversationKey, TenantId, UserId};

/// Bytes escaped in ids: the separator, the hash-tag braces, and `%` itself
/// (so escaping stays reversible); controls and non-ASCII always are.
const ESCAPED: &AsciiSet = &CONTROLS.add(b'%').add(b':').add(b'{').add(b'}');

/// An id as it appears inside a name: no `:`, `{` or `}`, and reversible.
pub(crate) fn escape(id: &str) -> Cow<'_, str> {
    utf8_percent_encode(id, ESCAPED).into()
}

/// `<prefix>:<kind>:{<a>:<b>}:<part>` with both ids escaped.
fn tagged(prefix: &str, kind: &str, a: &str, b: &str, part: &str) -> String {
    format!("{prefix}:{kind}:{{{}:{}}}:{part}", escape(a), escape(b))
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    fn conversation(&self, key: &ConversationKey, part: &str) -> String {
        tagged(&self.prefix, "conv", key.tenant().as_str(), key.conversation().as_str(), part)
    }

    fn user(&self, tenant: &TenantId, user: &UserId, part: &str) -> String {
        tagged(&self.prefix, "user", tenant.as_str(), user.as_str(), part)
    }

    /// HASH: `user`, `epoch`, `seq` (last assigned), `created_ms`.
    pub fn meta(&self, key: &ConversationKey) -> String {
        self.conversation(key, "meta")
    }

    /// LIST: the durable events (entries: [`super::wire`]), oldest first, capped.
    pub fn log(&self, key: &ConversationKey) -> String {
        self.conversation(key, "log")
    }

    /// ZSET: customer message id → seq, for idempotent resends.
    pub fn message_ids(&self, key: &ConversationKey) -> String {
        self.conversation(key, "ids")
    }

    /// Pub/sub channel carrying the conversation's events to every node
    /// (payloads: [`super::wire::Payload`]).
    pub fn channel(&self, key: &ConversationKey) -> String {
        self.conversation(key, "events")
    }

    /// HASH: node id → 1 for each node with a socket of the conversation
    /// (set before it subscribes, removed after it unsubscribes): the
    /// append publishes only while another node is in it.
    pub fn listeners(&self, key: &ConversationKey) -> String {
        self.conversation(key, "listeners")
    }

    /// HASH: node id → `<until ms>\n<entry>`, each node's presence entry
    /// ([`crate::presence::Present`] as JSON), valid until then; the key
    /// expires when no node refreshes it.
    pub fn presence(&self, key: &ConversationKey) -> String {
        self.conversation(key, "presence")
    }

    /// Agents' private notes of a conversation (a list of JSON notes).
    pub fn notes(&self, key: &ConversationKey) -> String {
        self.conversation(key, "notes")
    }

    /// Every name of one conversation, its tag escaped and joined once
    /// (an append needs them all).
    pub fn conversation_names(&self, key: &ConversationKey) -> ConversationNames {
        let tag = self.conversation(key, "");
        let name = |part: &str| {
            let mut name = String::with_capacity(tag.len() + part.len());
            name.push_str(&tag);
            name.push_str(part);
            name
        };
        ConversationNames {
            meta: name("meta"),
            log: name("log"),
            message_ids: name("ids"),
            listeners: name("listeners"),
            notes: name("notes"),
            channel: name("events"),
            active: self.active(key.tenant()),
            listing: self.listing(key.tenant()),
            changes: self.changes(key.tenant()),
            latest: std::sync::OnceLock::new(),
        }
    }

    /// HASH: the user's most recent `conversation` and its `last_active_ms`.
    pub fn latest(&self, tenant: &TenantId, user: &UserId) -> String {
        self.user(tenant, user, "latest")
    }

    /// ZSET: the conversations the user created lately → when (ms), for
    /// the per-user creation cap.
    pub fn created(&self, tenant: &TenantId, user: &UserId) -> String {
        self.user(tenant, user, "created")
    }

    /// ZSET: the tenant's conversations → their last durable event (ms),
    /// for the agents' list; written by the append, older than the
    /// retention trimmed there.
    pub fn active(&self, tenant: &TenantId) -> String {
        format!("{}:tenant:{{{}}}:active", self.prefix, escape(tenant.as_str()))
    }

    /// STRING with a TTL: set while some node has an agent listing the
    /// tenant's conversations (refreshed by each such node); without it
    /// appends and presence changes publish nothing on [`Keys::changes`].
    pub fn listing(&self, tenant: &TenantId) -> String {
        format!("{}:tenant:{{{}}}:listing", self.prefix, escape(tenant.as_str()))
    }

    /// Pub/sub channel carrying the ids of the tenant's conversations that
    /// changed, to the nodes listing them.
    pub fn changes(&self, tenant: &TenantId) -> String {
        format!("{}:tenant:{{{}}}:changes", self.prefix, escape(tenant.as_str()))
    }

    /// Pub/sub channel each node subscribes for its whole life (node ids
    /// are the hub's hex tokens).
    pub fn heartbeat(&self, node: &str) -> String {
        format!("{}:node:{node}:heartbeat", self.prefix)
    }
}

/// The names an append to one conversation uses (see the [`Keys`] method
/// of each): its own, and its tenant's that the agents' list keeps.
/// Built once per conversation a node listens to (see `publisher.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationNames {
    pub meta: String,
    pub log: String,
    pub message_ids: String,
    pub listeners: String,
    pub notes: String,
    pub channel: String,
    pub active: String,
    pub listing: String,
    pub changes: String,
    /// The `latest` pointer of the conversation's customer, once an append
    /// named them (see [`ConversationNames::latest`]).
    latest: std::sync::OnceLock<(UserId, String)>,
}

impl ConversationNames {
    /// [`Keys::latest`] of `user` in `key`'s tenant: made once for the
    /// conversation's customer (the only user whose messages it holds).
    pub fn latest(&self, keys: &Keys, key: &ConversationKey, user: &UserId) -> std::borrow::Cow<'_, str> {
        let (customer, name) = self.latest.get_or_init(|| (user.clone(), keys.latest(key.tenant(), user)));
        match customer == user {
            true => std::borrow::Cow::Borrowed(name),
            false => std::borrow::Cow::Owned(keys.latest(key.tenant(), user)),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const CONVERSATION: &str = "3f2a9c0e5b7d4e1f8a6c2b9d0e4f7a1c";

    fn conversation_key(tenant: &str, conversation: &str) -> ConversationKey {
        ConversationKey::for_test(tenant, conversation)
    }

    /// The part of a name Redis Cluster hashes: between the first `{` and
    /// the first `}` after it, if not empty; else the whole name.
    fn hash_tag(name: &str) -> &str {
        if let Some(open) = name.find('{')
            && let Some(len) = name[open + 1..].find('}')
            && len > 0
        {
            return &name[open + 1..open + 1 + len];
        }
        name
    }

    #[test]
    fn one_conversation_shares_one_hash_tag() {
        let keys = Keys::new("fengda");
        let key = conversation_key("bank-a", CONVERSATION);
        let tag = format!("fengda:conv:{{bank-a:{CONVERSATION}}}");
        assert_eq!(keys.meta(&key), format!("{tag}:meta"));
        assert_eq!(keys.log(&key), format!("{tag}:log"));
        assert_eq!(keys.message_ids(&key), format!("{tag}:ids"));
        assert_eq!(keys.channel(&key), format!("{tag}:events"));
        assert_eq!(keys.listeners(&key), format!("{tag}:listeners"));
        let names = ConversationNames {
            meta: keys.meta(&key),
            log: keys.log(&key),
            message_ids: keys.message_ids(&key),
            listeners: keys.listeners(&key),
            notes: keys.notes(&key),
            channel: keys.channel(&key),
            active: keys.active(key.tenant()),
            listing: keys.listing(key.tenant()),
            changes: keys.changes(key.tenant()),
            latest: Default::default(),
        };
        assert_eq!(keys.conversation_names(&key), names);
        let (alice, bob) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        for user in [&alice, &bob, &alice] {
            assert_eq!(names.latest(&keys, &key, user), keys.latest(key.tenant(), user));
        }
        let (tenant, user) = (TenantId::parse("bank-a").unwrap(), UserId::parse("alice").unwrap());
        assert_eq!(keys.latest(&tenant, &user), "fengda:user:{bank-a:alice}:latest");
        assert_eq!(keys.created(&tenant, &user), "fengda:user:{bank-a:alice}:created");
    }

    #[test]
    fn ids_with_the_separator_are_escaped_so_the_known_collisions_are_gone() {
        let keys = Keys::new("fengda");
        // Tenant `x:y` with conversation c, and what tenant `x` naming `y:c` used to reach.
        let victim = conversation_key("x:y", CONVERSATION);
        assert_eq!(keys.log(&victim), format!("fengda:conv:{{x%3Ay:{CONVERSATION}}}:log"));
        assert_ne!(tagged("fengda", "conv", "x", &format!("y:{CONVERSATION}"), "log"), keys.log(&victim));
        let id = |raw: &str| UserId::parse(raw).unwrap();
        let tenant = |raw: &str| TenantId::parse(raw).unwrap();
        let one = keys.latest(&tenant("a:b"), &id("c"));
        let other = keys.latest(&tenant("a"), &id("b:c"));
        assert_eq!((one.as_str(), other.as_str()), ("fengda:user:{a%3Ab:c}:latest", "fengda:user:{a:b%3Ac}:latest"));
    }

    /// Ids drawn from an alphabet where naive joins collide often: the
    /// separator, braces, `%` and what escapes look like, possibly empty,
    /// up to the longest id a client may send.
    fn id() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec!["a", "b", ":", "{", "}", "%", "3A", "%3A", "", "é", "\n"]);
        prop_oneof![
            prop::collection::vec(piece, 0..6).prop_map(|pieces| pieces.concat()),
            prop::collection::vec(prop::sample::select(vec!['a', ':', '{', '}', '%']), 128)
                .prop_map(|chars| chars.into_iter().collect()),
        ]
    }

    /// Two pairs: independent, or the second cut from the first's naive
    /// join `<a>:<b>` at another `:` (or anywhere), the pairs that collide
    /// when ids are joined as they are.
    fn two_pairs() -> impl Strategy<Value = ((String, String), (String, String))> {
        ((id(), id()), (id(), id()), any::<prop::sample::Index>(), any::<bool>()).prop_map(|(a, other, at, colons)| {
            let joined = format!("{}:{}", a.0, a.1);
            let cuts: Vec<usize> = joined
                .char_indices()
                .filter(|(_, c)| !colons || *c == ':')
                .map(|(i, _)| i)
                .chain((!colons).then_some(joined.len()))
                .collect();
            let b = match cuts.get(at.index(cuts.len().max(1))) {
                Some(&cut) if colons => (joined[..cut].to_owned(), joined[cut + 1..].to_owned()),
                Some(&cut) => (joined[..cut].to_owned(), joined[cut..].to_owned()),
                None => other,
            };
            (a, b)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn distinct_pairs_never_share_a_name((a, b) in two_pairs(), part in 0usize..2) {
            let kinds = ["conv", "user"];
            let parts = [["meta", "log", "ids", "events", "listeners"], ["latest", "created", "latest", "created", "latest"]];
            for (k, kind) in kinds.iter().enumerate() {
                for name in parts[k] {
                    let (x, y) = (tagged("fengda", kind, &a.0, &a.1, name), tagged("fengda", kind, &b.0, &b.1, name));
                    prop_assert_eq!(x == y, a == b, "{} vs {}", x, y);
                }
            }
            // Names of different kinds or parts never meet either.
            let kind = kinds[part];
            prop_assert_ne!(tagged("fengda", kind, &a.0, &a.1, "log"), tagged("fengda", kinds[1 - part], &b.0, &b.1, "log"));
            prop_assert_ne!(tagged("fengda", kind, &a.0, &a.1, "log"), tagged("fengda", kind, &b.0, &b.1, "ids"));
        }

        #[test]
        fn every_name_of_a_pair_hashes_its_own_whole_tag(pair in (id(), id())) {
            let names: Vec<_> =
                ["meta", "log", "ids", "events", "listeners"].map(|part| tagged("fengda", "conv", &pair.0, &pair.1, part)).into();
            let tag = format!("{}:{}", escape(&pair.0), escape(&pair.1));
            for name in &names {
                prop_assert_eq!(hash_tag(name), tag.as_str(), "{}", name);
            }
        }

        #[test]
        fn escaping_is_reversible(raw in id()) {
            let escaped = escape(&raw);
            prop_assert!(!escaped.contains([':', '{', '}']), "{}", escaped);
            prop_assert_eq!(percent_encoding::percent_decode_str(&escaped).decode_utf8().unwrap(), raw.as_str());
        }
    }
}
