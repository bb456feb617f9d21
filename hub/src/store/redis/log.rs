//! The Redis conversation log (see the parent module for its layout); its
//! agents' notes are in [`notes`].

mod notes;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use redis::{Script, Value};
use tracing::{debug, warn};

use super::answer::AppendAnswer;
use super::wire::{self, EncodedEvent};
use super::{Link, Request, recent};
use crate::config::{ConversationConfig, CreationLimit};
use crate::event::dedup_key;
use crate::ids::{ConversationId, ConversationKey, Party, TenantId, UserId};
use crate::owner::{Owner, Ownership};
use crate::protocol::Role;
use crate::store::{
    AppendWith, Appended, ConversationLog, LogEpoch, LogSummary, NewEvent, Opened, OwnerOp, Pending, Snapshot,
    StoreError, StoredEvent, now_ms,
};

#[derive(Clone)]
pub struct RedisLog {
    inner: Arc<Inner>,
}

struct Inner {
    link: Arc<Link>,
    append: Script,
    read_after: Script,
    note: Script,
    log_cap: usize,
    creation_limit: Option<CreationLimit>,
    idle_window_ms: u64,
}

impl RedisLog {
    pub(super) fn new(link: Arc<Link>, conversation: &ConversationConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                link,
                append: Script::new(include_str!("append.lua")),
                read_after: Script::new(include_str!("read_after.lua")),
                note: Script::new(include_str!("note.lua")),
                log_cap: conversation.log_cap,
                creation_limit: conversation.creation_limit(),
                idle_window_ms: conversation.idle_window_ms,
            }),
        }
    }
}

impl Inner {
    /// The log's last seq, its epoch, its customer and the events after `after`, or
    /// `None` if it does not exist.
    async fn read_after(&self, key: &ConversationKey, after: u64) -> Result<Option<Snapshot>, StoreError> {
        let link = &self.link;
        let mut con = link.commands.clone();
        let value: Value = link
            .call(self.read_after.key(link.keys.meta(key)).key(link.keys.log(key)).arg(after).invoke_async(&mut con))
            .await?;
        let Value::Array(mut parts) = value else {
            return Err(StoreError::Unavailable("unexpected reply from read_after".into()));
        };
        if parts.is_empty() {
            return Ok(None);
        }
        let missed = match parts.pop() {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|item| match item {
                    Value::BulkString(entry) => parse_entry(entry),
                    _ => None,
                })
                .filter(|e| e.seq > after)
                .collect(),
            _ => Vec::new(),
        };
        let malformed =
            |e: redis::ParsingError| StoreError::Unavailable(format!("unexpected reply from read_after: {e}"));
        let next = |parts: &mut Vec<Value>| parts.pop().unwrap_or(Value::Nil);
        let owner_since: u64 = redis::from_redis_value(next(&mut parts)).map_err(malformed)?;
        let owner_epoch: u64 = redis::from_redis_value(next(&mut parts)).map_err(malformed)?;
        let owner_name: String = redis::from_redis_value(next(&mut parts)).map_err(malformed)?;
        let owner: String = redis::from_redis_value(next(&mut parts)).map_err(malformed)?;
        let ownership =
            Ownership { owner: Owner::decode(&owner, &owner_name), epoch: owner_epoch, since_ms: owner_since };
        let customer: String = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil)).map_err(malformed)?;
        let epoch: String = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil)).map_err(malformed)?;
        let last_seq: u64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil)).map_err(malformed)?;
        let customer = UserId::parse(&customer).ok();
        Ok(Some(Snapshot { exists: true, last_seq, epoch, missed, customer, ownership }))
    }

    /// The owner of a conversation, `None` if it has no log.
    async fn owner(&self, key: &ConversationKey) -> Result<Option<String>, StoreError> {
        let link = &self.link;
        let mut con = link.commands.clone();
        link.call(redis::cmd("HGET").arg(link.keys.meta(key)).arg("user").query_async(&mut con)).await
    }

    /// Refreshes the retention of a conversation's keys and the user's
    /// pointer to it, in one round trip (not atomic: the pointer lives in
    /// another cluster slot; should the link drop between its HSET and
    /// EXPIRE, the next refresh sets the expiry).
    async fn refresh(&self, user: &UserId, key: &ConversationKey) -> Result<(), StoreError> {
        let link = &self.link;
        let keys = &link.keys;
        let mut con = link.commands.clone();
        let mut pipe = redis::pipe();
        for name in [keys.meta(key), keys.log(key), keys.message_ids(key), keys.listeners(key), keys.notes(key)] {
            pipe.cmd("EXPIRE").arg(name).arg(link.retention.expire_secs()).ignore();
        }
        self.point_latest(&mut pipe, user, key);
        link.call(pipe.query_async::<()>(&mut con)).await
    }

    /// Adds to `pipe` what makes `key` the user's most recent conversation,
    /// active now (an append does the same in `append.lua`).
    fn point_latest(&self, pipe: &mut redis::Pipeline, user: &UserId, key: &ConversationKey) {
        let latest = self.link.keys.latest(key.tenant(), user);
        pipe.cmd("HSET")
            .arg(&latest)
            .arg("conversation")
            .arg(key.conversation().as_str())
            .arg("last_active_ms")
            .arg(now_ms())
            .ignore()
            .cmd("EXPIRE")
            .arg(latest)
            .arg(self.link.retention.secs)
            .ignore();
    }

    /// The user's most recent conversation, if it was active within the idle window.
    async fn recent(&self, tenant: &TenantId, user: &UserId) -> Result<Option<ConversationId>, StoreError> {
        let link = &self.link;
        let mut con = link.commands.clone();
        let latest: (Option<String>, Option<u64>) = link
            .call(
                redis::cmd("HMGET")
                    .arg(link.keys.latest(tenant, user))
                    .arg("conversation")
                    .arg("last_active_ms")
                    .query_async(&mut con),
            )
            .await?;
        Ok(match latest {
            (Some(conversation), Some(last_active)) if now_ms().saturating_sub(last_active) <= self.idle_window_ms => {
                ConversationId::parse(&conversation).ok()
            }
            _ => None,
        })
    }
}

/// A log entry as read back; one that does not decode is skipped.
fn parse_entry(entry: &[u8]) -> Option<Arc<StoredEvent>> {
    match wire::decode_entry(entry) {
        Ok(event) => Some(Arc::new(event)),
        Err(error) => {
            warn!(%error, "skipping a log entry that does not decode");
            None
        }
    }
}

#[async_trait]
impl ConversationLog for RedisLog {
    async fn open(&self, party: &Party, requested: Option<&ConversationId>) -> Result<Opened, StoreError> {
        let (inner, tenant, user) = (&self.inner, &party.tenant, &party.user);
        if let Some(conversation) = requested {
            let key = party.conversation(conversation.clone());
            if inner.owner(&key).await?.as_deref() != Some(user.as_str()) {
                return Err(StoreError::ConversationNotFound);
            }
            inner.refresh(user, &key).await?;
            return Ok(Opened { key, pending: None });
        }
        if let Some(conversation) = inner.recent(tenant, user).await? {
            let key = party.conversation(conversation);
            match inner.owner(&key).await? {
                Some(owner) if owner == user.as_str() => {
                    inner.refresh(user, &key).await?;
                    return Ok(Opened { key, pending: None });
                }
                // Lost (flush, failover, expiry): its first message starts it
                // again under the same id, with a new epoch.
                None => return Ok(Opened { key, pending: Some(Pending::lost(user)) }),
                Some(_) => {}
            }
        }
        let key = party.conversation(ConversationId::generate());
        Ok(Opened { key, pending: Some(Pending::fresh(user)) })
    }

    async fn snapshot(&self, key: &ConversationKey, after: Option<u64>) -> Result<Option<Snapshot>, StoreError> {
        self.inner.read_after(key, after.unwrap_or(u64::MAX)).await
    }

    async fn touch(&self, user: &UserId, key: &ConversationKey) {
        if let Err(error) = self.inner.refresh(user, key).await {
            debug!(%error, "could not record activity");
        }
    }

    async fn summary(&self, key: &ConversationKey) -> Result<Option<LogSummary>, StoreError> {
        let link = &self.inner.link;
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(link.keys.meta(key))
            .arg(&["user", "owner", "owner_name", "owner_epoch", "owner_since", "customer_at"])
            .cmd("LINDEX")
            .arg(link.keys.log(key))
            .arg(-1);
        type Meta = (Option<String>, Option<String>, Option<String>, Option<u64>, Option<u64>, Option<u64>);
        let mut con = link.commands.clone();
        let ((user, owner, owner_name, owner_epoch, owner_since, customer_at), last): (Meta, Option<Vec<u8>>) =
            link.call(pipe.query_async(&mut con)).await?;
        let Some(customer) = user.and_then(|user| UserId::parse(&user).ok()) else { return Ok(None) };
        let ownership = Ownership {
            owner: Owner::decode(owner.as_deref().unwrap_or(""), owner_name.as_deref().unwrap_or("")),
            epoch: owner_epoch.unwrap_or(0),
            since_ms: owner_since.unwrap_or(0),
        };
        Ok(Some(LogSummary { customer, ownership, last: last.and_then(|entry| parse_entry(&entry)), customer_at }))
    }

    async fn active(&self, tenant: &TenantId, since_ms: u64, max: usize) -> Result<Vec<ConversationId>, StoreError> {
        let link = &self.inner.link;
        let mut con = link.commands.clone();
        let mut range = redis::cmd("ZREVRANGEBYSCORE");
        range.arg(link.keys.active(tenant)).arg("+inf").arg(since_ms).arg("LIMIT").arg(0).arg(max);
        let ids: Vec<String> = link.call(range.query_async(&mut con)).await?;
        Ok(ids.iter().filter_map(|id| ConversationId::parse(id).ok()).collect())
    }

    async fn events_after(&self, key: &ConversationKey, after: u64) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        match self.inner.read_after(key, after).await? {
            Some(snapshot) => Ok(snapshot.missed),
            None => Err(StoreError::ConversationNotFound),
        }
    }

    async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        with: AppendWith<'_>,
    ) -> Result<Appended, StoreError> {
        let inner = &self.inner;
        let link = &inner.link;
        let create = with.create;
        let timing = event.timing;
        let mut event = event;
        // The epoch a change begins, if it succeeds (the script checks the expected one).
        let (op, owner_arg, epoch_arg, name_arg) = match with.owner {
            OwnerOp::Any => ("", String::new(), String::new(), ""),
            OwnerOp::Fence { agent, epoch } => {
                ("fence", format!("agent:{agent}"), epoch.map_or_else(String::new, |e| e.to_string()), "")
            }
            OwnerOp::Assistant { epoch } => ("fence", Owner::Assistant.encode(), epoch.to_string(), ""),
            OwnerOp::Change { expected, to } => {
                event.owner_epoch = Some(expected + 1);
                ("change", to.encode(), expected.to_string(), to.name())
            }
        };
        let mut stored = event.stored(0, now_ms());
        let dedup = dedup_key(stored.from, &stored.id, stored.agent.as_deref());
        let dedup_id = dedup.as_deref().unwrap_or("");
        let encoded = EncodedEvent::new(&stored, &link.node_id, timing.as_ref());
        let hint = link.recent.hint(key, with.turns_before);
        let listened = link.listeners.names(key);
        let listening = listened.is_some();
        let names = listened.unwrap_or_else(|| Arc::new(link.keys.conversation_names(key)));
        // The user's activity rides in the same script (a new conversation
        // becomes their most recent): one command per append.
        let latest = with.active_user.or(create.map(|c| &c.user)).map(|user| names.latest(&link.keys, key, user));
        // A creation counts against its user's cap in the same script.
        let creation_cap =
            create.zip(inner.creation_limit).map(|(c, limit)| (link.keys.created(key.tenant(), &c.user), limit));
        // Sized once: growing the buffer arg by arg showed in profiles.
        let size = 200 + names.meta.len() * 11 + encoded.byte_len() + hint.epoch.len() + dedup_id.len();
        let mut append = redis::Cmd::with_capacity(35, size + owner_arg.len() + name_arg.len());
        append
            .arg("EVALSHA")
            .arg(inner.append.get_hash())
            .arg(7 + usize::from(latest.is_some()) + usize::from(creation_cap.is_some()))
            .arg(&names.meta)
            .arg(&names.log)
            .arg(&names.message_ids)
            .arg(&names.listeners)
            .arg(&names.active)
            .arg(&names.listing)
            .arg(&names.notes);
        if let Some(latest) = &latest {
            append.arg(&**latest);
        }
        if let Some((created, _)) = &creation_cap {
            append.arg(created);
        }
        append
            .arg(dedup_id)
            .arg(encoded.entry_head())
            .arg(encoded.entry_tail())
            .arg(encoded.payload_head())
            .arg(stored.at_ms)
            .arg(inner.log_cap)
            .arg(link.retention.secs)
            .arg(&names.channel)
            .arg(create.map_or("", |c| c.user.as_str()))
            .arg(create.map_or("", |c| c.epoch.as_str()))
            .arg(link.node_id.as_str())
            .arg(with.turns_before)
            .arg(&*hint.epoch)
            .arg(hint.last)
            .arg(op)
            .arg(&owner_arg)
            .arg(&epoch_arg)
            .arg(name_arg)
            .arg(key.conversation().as_str())
            .arg(&names.changes)
            .arg(link.retention.refresh_secs);
        if let Some((_, limit)) = creation_cap {
            append.arg(limit.max).arg(limit.window.as_millis() as u64);
        }
        let sent_at = Instant::now();
        let answer: Vec<u8> = link.run_with_scripts(&[&inner.append], Request::Cmd(&append)).await?;
        let answer = AppendAnswer::decode(&answer).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let ownership = || Ownership {
            owner: Owner::decode(answer.owner, answer.owner_name),
            epoch: answer.owner_epoch,
            since_ms: answer.owner_since,
        };
        match answer.status {
            1 => {
                // The reply's deltas that follow go out only if someone else listens.
                link.listeners.note(key, listening, sent_at, answer.others);
                stored.seq = answer.seq;
                let event = Arc::new(stored);
                let read: Option<Vec<_>> =
                    answer.before.as_ref().map(|entries| entries.iter().filter_map(|e| parse_entry(e)).collect());
                link.recent
                    .appended(key, recent::Outcome { epoch: answer.epoch, event: &event, read: read.as_deref() });
                let turns_before = match read {
                    Some(read) => read.into_iter().filter(|e| e.from != Role::System).collect(),
                    // Not read: the log was where the hint said, so its turns are the hint's.
                    None => hint.turns,
                };
                Ok(Appended::New { event, epoch: LogEpoch::of(answer.epoch), turns_before, ownership: ownership() })
            }
            0 => Ok(Appended::Duplicate(answer.seq)),
            -2 => Err(StoreError::OwnerChanged(ownership())),
            -3 if let Some((_, limit)) = creation_cap => {
                Err(StoreError::TooManyConversations { max: limit.max, window_secs: limit.window.as_secs() })
            }
            _ => Err(StoreError::ConversationNotFound),
        }
    }
}
