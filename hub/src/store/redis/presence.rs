//! The presence board in Redis: one hash per conversation
//! ([`Keys::presence`](super::keys::Keys::presence)), a field per node
//! holding its entry and until when it is valid. Redis 7.0 cannot expire a
//! hash field, so readers skip the entries past their time (a node's clock
//! decides its own entries' time: clocks kept within a second of each other
//! are plenty for a TTL of seconds), and the whole key expires once no node
//! has refreshed it for a TTL. An entry is written only for a conversation
//! that exists (its `meta` hash, checked in the same script): a socket that
//! never sends leaves no key, as everywhere else. A write is one pipeline
//! for all the entries given; a change is announced on the conversation's
//! channel in the same pipeline ([`Payload::Presence`]).

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};
use tracing::debug;

use super::wire::Payload;
use super::{RedisBus, Request};
use crate::ids::ConversationKey;
use crate::presence::{PresenceBoard, Present};
use crate::store::{StoreError, now_ms};

/// Sets this node's entry, valid for the TTL, if the conversation exists.
static WRITE_ENTRY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("presence.lua")));
/// Tells the nodes listing the conversation's tenant that it changed.
static TELL_LISTING: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("tell_listing.lua")));

#[async_trait]
impl PresenceBoard for RedisBus {
    async fn write(&self, entries: &[(ConversationKey, Present)], ttl: Duration, announce: bool) {
        if entries.is_empty() {
            return;
        }
        let link = &self.inner.link;
        let node = link.node_id.as_str();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let until = now_ms().saturating_add(ttl_ms);
        let mut pipe = redis::pipe();
        for (key, entry) in entries {
            let name = link.keys.presence(key);
            if entry.is_empty() {
                pipe.cmd("HDEL").arg(&name).arg(node).ignore();
            } else {
                let json = serde_json::to_string(entry).expect("presence entries always serialize");
                let mut write = WRITE_ENTRY.key(&name);
                write.key(link.keys.meta(key)).arg(node).arg(format!("{until}\n{json}")).arg(ttl_ms);
                pipe.invoke_script(&write).ignore();
            }
            if announce {
                let payload = Payload::Presence { node: link.node_id.clone(), entry: entry.clone() }.encode();
                pipe.cmd("PUBLISH").arg(link.keys.channel(key)).arg(payload).ignore();
                let mut listed = TELL_LISTING.key(link.keys.listing(key.tenant()));
                listed.arg(link.keys.changes(key.tenant())).arg(key.conversation().as_str());
                pipe.invoke_script(&listed).ignore();
            }
        }
        // Every command may run twice: the same entries, and announcements, again.
        let written = link.run_with_scripts::<()>(&[&WRITE_ENTRY, &TELL_LISTING], Request::Pipeline(&pipe)).await;
        if let Err(error) = written {
            debug!(%error, entries = entries.len(), "presence not written; the next heartbeat writes it");
        }
    }

    async fn read(&self, keys: &[ConversationKey]) -> Result<Vec<Vec<(String, Present)>>, StoreError> {
        let link = &self.inner.link;
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HGETALL").arg(link.keys.presence(key));
        }
        let mut con = link.commands.clone();
        let hashes: Vec<Vec<(String, Value)>> = link.call(pipe.query_async(&mut con)).await?;
        let now = now_ms();
        let me = link.node_id.as_str();
        Ok(hashes
            .into_iter()
            .map(|fields| {
                fields
                    .into_iter()
                    .filter(|(node, _)| node != me)
                    .filter_map(|(node, value)| Some((node, live_entry(&value, now)?)))
                    .collect()
            })
            .collect())
    }
}

/// A stored entry, if it is still valid at `now`.
fn live_entry(value: &Value, now: u64) -> Option<Present> {
    let Value::BulkString(raw) = value else { return None };
    let at = raw.iter().position(|b| *b == b'\n')?;
    let until: u64 = std::str::from_utf8(&raw[..at]).ok()?.parse().ok()?;
    if until <= now {
        return None;
    }
    serde_json::from_slice(&raw[at + 1..]).ok()
}
