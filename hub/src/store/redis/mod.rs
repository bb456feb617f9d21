//! The Redis store: many hub nodes sharing one Redis (cluster mode).
//!
//! Storage: each conversation is a meta hash (owner, epoch, last seq), a
//! capped list of durable events (JSON) and a zset of customer message ids
//! for idempotent resends, all under one hash tag (see [`keys`]) and all
//! refreshed to the retention TTL on every append. Append is one Lua script
//! (`append.lua`): check duplicate, assign seq, push, trim, publish — atomic,
//! so two nodes appending to one conversation can never race or leave a gap.
//! The hub encodes the event and its payload ([`wire`]); the script splices
//! in the seq and decodes nothing.
//! Opening a socket writes nothing for a conversation that has no log yet:
//! the first message's append creates it (same script), after counting it
//! against the user's creation cap (`quota.lua`, in the user's slot).
//!
//! Routing: pub/sub is the doorbell, the log is the truth. Every event of a
//! conversation is published once on its channel (every payload is a
//! [`wire::Payload`]); a node subscribes (on one
//! dedicated RESP3 connection, whatever its socket count) when its first
//! socket of the conversation arrives and unsubscribes when the last leaves.
//! The dispatcher task hands pushes to the [`FanOut`] without blocking.
//! Deltas are published by one publisher task in pipelined batches, in order.
//!
//! Local sockets do not wait for the round trip: the node delivers what it
//! appends (once the script returns its seq) and what it publishes (deltas,
//! `queued`) to its own sessions at once. A delta carries its node's id and
//! the node skips its own when they come back; durable events come back too
//! and the fan-out drops the copies its sessions already have (keeping them
//! is what repairs an append whose reply was lost on the way back, or one
//! that finished out of order: the fan-out hands an appended event over at
//! once only if it is the next seq its sessions need). PUBLISH answers how many nodes
//! got the delta: when no other node listens to the conversation (the usual
//! case: a customer's one socket), the conversation's deltas are not
//! published for [`ALONE_RECHECK`], then one is again to ask anew. (Only
//! while this node listens itself: a reply whose sockets are all gone is
//! published for whoever reconnects, wherever.) A node
//! that starts listening to a conversation says so on its channel (`H`), and
//! nodes streaming into it publish again from the next delta; should that
//! word be lost, the newcomer misses at most [`ALONE_RECHECK`] of deltas,
//! which the `reply.done` repairs, like any lost delta.
//! If the subscription drops, `/readyz` turns red, the connection manager
//! reconnects and resubscribes by itself (a heartbeat PING makes sure it
//! tries), and every local session re-reads the log after its last seq, so
//! nothing durable is missed; deltas published meanwhile are lost and
//! repaired by their `reply.done`.
//!
//! All reads that decide correctness go to the one configured Redis (the
//! primary); there are no replica reads.

pub mod keys;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, RedisError, Script, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Appended, ConversationStore, NewEvent, Opened, Pending, Snapshot, StoreError, StoredEvent, now_ms};
use crate::config::{ConversationConfig, CreationLimit, RedisConfig};
use crate::fanout::{FanOut, SessionHandle};
use crate::ids::{ConversationId, ConversationKey, SessionId, TenantId, UserId};
use crate::protocol::Role;
use keys::Keys;
use wire::{EncodedEvent, NodeId, Origin, Payload};

/// Deltas waiting for the publisher task; beyond this they are dropped
/// (best effort: `reply.done` carries the whole text).
const PUBLISH_QUEUE: usize = 8192;
/// Deltas sent per pipelined round trip at most.
const PUBLISH_BATCH: usize = 256;
/// How long a conversation's deltas stay unpublished after a PUBLISH
/// reached no other node.
const ALONE_RECHECK: Duration = Duration::from_secs(1);
/// How often the subscriber connection is probed.
const HEARTBEAT: Duration = Duration::from_secs(1);

impl From<RedisError> for StoreError {
    fn from(error: RedisError) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    fanout: Arc<FanOut>,
    keys: Keys,
    /// Distinguishes this node's sessions in published events (for acks)
    /// and its own deltas when they come back.
    node_id: NodeId,
    commands: ConnectionManager,
    /// RESP3 connection used only for SUBSCRIBE/UNSUBSCRIBE and its pushes.
    subscriber: ConnectionManager,
    /// Serializes fan-out join/leave with SUBSCRIBE/UNSUBSCRIBE so a leave and
    /// a join of the same conversation cannot reorder.
    subscriptions: tokio::sync::Mutex<()>,
    /// Subscribed channel name → conversation, for dispatching pushes.
    channels: DashMap<String, ConversationKey>,
    /// Channels whose last delta reached no other node → until when this
    /// node delivers their deltas only locally.
    alone_until: DashMap<String, std::time::Instant>,
    /// Channels on which another node said hello lately → when: a PUBLISH
    /// sent before that must not mark the channel alone again.
    hello_at: DashMap<String, std::time::Instant>,
    receiving: AtomicBool,
    /// Always subscribed, so every reconnect yields a `subscribe` push.
    heartbeat_channel: String,
    publish_tx: mpsc::Sender<Publish>,
    append: Script,
    quota: Script,
    read_after: Script,
    log_cap: usize,
    creation_limit: Option<CreationLimit>,
    retention_secs: u64,
    idle_window_ms: u64,
    command_timeout: Duration,
}

enum Publish {
    Frame { channel: String, payload: Vec<u8> },
    Flush(oneshot::Sender<()>),
}

impl RedisStore {
    /// Connects to Redis (it must be reachable at startup) and starts the
    /// dispatcher and publisher tasks on `tracker`, stopped by `shutdown`.
    pub async fn connect(
        config: &RedisConfig,
        conversation: &ConversationConfig,
        fanout: Arc<FanOut>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let command_timeout = Duration::from_millis(config.command_timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(command_timeout))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let client = redis::Client::open(config.url.as_str())?;
        let commands = with_timeout(command_timeout, client.get_connection_manager_with_config(manager_config.clone()))
            .await
            .and_then(|r| r.map_err(StoreError::from))?;

        let resp3_url = with_resp3(&config.url);
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        // Unbounded like the library's own internal push channel that feeds
        // it; the dispatcher does only non-blocking work per push, so it keeps up.
        let subscriber_config = manager_config.set_push_sender(push_tx).set_automatic_resubscription();
        let subscriber = with_timeout(
            command_timeout,
            redis::Client::open(resp3_url)?.get_connection_manager_with_config(subscriber_config),
        )
        .await
        .and_then(|r| r.map_err(StoreError::from))?;

        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let node_id = NodeId::generate();
        let keys = Keys::new(&config.key_prefix);
        let heartbeat_channel = keys.heartbeat(node_id.as_str());
        let shared = Arc::new(Shared {
            fanout,
            keys,
            node_id,
            commands,
            subscriber,
            subscriptions: tokio::sync::Mutex::new(()),
            channels: DashMap::new(),
            alone_until: DashMap::new(),
            hello_at: DashMap::new(),
            receiving: AtomicBool::new(false),
            heartbeat_channel,
            publish_tx,
            append: Script::new(include_str!("append.lua")),
            quota: Script::new(include_str!("quota.lua")),
            read_after: Script::new(include_str!("read_after.lua")),
            log_cap: conversation.log_cap,
            creation_limit: conversation.creation_limit(),
            retention_secs: conversation.redis_retention_secs(config),
            idle_window_ms: conversation.idle_window_ms,
            command_timeout,
        });
        shared.subscriber.clone().subscribe(&shared.heartbeat_channel).await?;
        // Subscribed: routing works from the first socket on (`/readyz` green).
        shared.receiving.store(true, Ordering::Release);
        tracker.spawn(run_dispatcher(shared.clone(), push_rx, shutdown.clone()));
        tracker.spawn(run_publisher(shared.clone(), publish_rx, shutdown));
        let url = crate::redact::display_url(&config.url);
        info!(node_id = %shared.node_id, prefix = %config.key_prefix, %url, "connected to Redis");
        Ok(Self { shared })
    }
}

/// Adds `protocol=resp3` to a Redis URL (pushes need RESP3).
fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

async fn with_timeout<T>(limit: Duration, future: impl Future<Output = T>) -> Result<T, StoreError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| StoreError::Unavailable(format!("Redis did not answer within {limit:?}")))
}

impl Shared {
    /// Runs one Redis call with the command timeout (a connection manager
    /// that is reconnecting would otherwise make the caller wait for it).
    async fn call<T>(&self, future: impl Future<Output = Result<T, RedisError>>) -> Result<T, StoreError> {
        with_timeout(self.command_timeout, future).await?.map_err(StoreError::from)
    }

    async fn read_after(
        &self,
        key: &ConversationKey,
        after: u64,
    ) -> Result<Option<(u64, String, Vec<Arc<StoredEvent>>)>, StoreError> {
        let mut con = self.commands.clone();
        let value: Value = self
            .call(self.read_after.key(self.keys.meta(key)).key(self.keys.log(key)).arg(after).invoke_async(&mut con))
            .await?;
        let Value::Array(mut parts) = value else {
            return Err(StoreError::Unavailable("unexpected reply from read_after".into()));
        };
        if parts.is_empty() {
            return Ok(None);
        }
        let events = match parts.pop() {
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
        let epoch: String = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil)).map_err(malformed)?;
        let seq: u64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil)).map_err(malformed)?;
        Ok(Some((seq, epoch, events)))
    }

    /// Counts the creation of `key`'s conversation against its user's cap
    /// (`quota.lua`; counting one conversation twice is a no-op).
    async fn count_creation(&self, key: &ConversationKey, user: &UserId) -> Result<(), StoreError> {
        let Some(limit) = self.creation_limit else {
            return Ok(());
        };
        let mut con = self.commands.clone();
        let mut invocation = self.quota.prepare_invoke();
        invocation
            .key(self.keys.created(&key.tenant, user))
            .arg(key.conversation.as_str())
            .arg(now_ms())
            .arg(limit.window.as_millis() as u64)
            .arg(limit.max);
        match self.call(invocation.invoke_async::<i64>(&mut con)).await? {
            1 => Ok(()),
            _ => Err(StoreError::TooManyConversations { max: limit.max, window_secs: limit.window.as_secs() }),
        }
    }

    /// The owner of a conversation, `None` if it has no log.
    async fn owner(&self, key: &ConversationKey) -> Result<Option<String>, StoreError> {
        let mut con = self.commands.clone();
        self.call(redis::cmd("HGET").arg(self.keys.meta(key)).arg("user").query_async(&mut con)).await
    }

    /// Refreshes the retention of a conversation's keys and the user's
    /// pointer to it, in one round trip (not atomic: the pointer lives in
    /// another cluster slot; should the link drop between its HSET and
    /// EXPIRE, the next refresh sets the expiry).
    async fn refresh(&self, user: &UserId, key: &ConversationKey) -> Result<(), StoreError> {
        let mut con = self.commands.clone();
        let mut pipe = redis::pipe();
        for name in [self.keys.meta(key), self.keys.log(key), self.keys.message_ids(key)] {
            pipe.cmd("EXPIRE").arg(name).arg(self.retention_secs).ignore();
        }
        self.point_latest(&mut pipe, &key.tenant, user, &key.conversation);
        self.call(pipe.query_async::<()>(&mut con)).await
    }

    /// Adds to `pipe`: the user's pointer to its latest conversation, active now.
    fn point_latest(
        &self,
        pipe: &mut redis::Pipeline,
        tenant: &TenantId,
        user: &UserId,
        conversation: &ConversationId,
    ) {
        let latest = self.keys.latest(tenant, user);
        pipe.cmd("HSET")
            .arg(&latest)
            .arg("conversation")
            .arg(conversation.as_str())
            .arg("last_active_ms")
            .arg(now_ms())
            .ignore()
            .cmd("EXPIRE")
            .arg(&latest)
            .arg(self.retention_secs)
            .ignore();
    }

    /// Hands one pushed message to the fan-out.
    fn dispatch(&self, data: Vec<Value>) {
        let mut data = data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.next(), data.next()) else {
            return;
        };
        let Some(key) = std::str::from_utf8(&channel).ok().and_then(|c| self.channels.get(c).map(|k| k.clone())) else {
            return;
        };
        match Payload::decode(Bytes::from(payload)) {
            // Delivered locally when it was published.
            Ok(Payload::Frame { node, .. }) if node == self.node_id => {}
            Ok(Payload::Frame { frame, .. }) => self.fanout.deliver_frames(&key, vec![frame]),
            // Another node started listening: publish this conversation's deltas again.
            Ok(Payload::Hello) => {
                let channel = std::str::from_utf8(&channel).unwrap_or_default();
                self.alone_until.remove(channel);
                self.hello_at.insert(channel.to_owned(), std::time::Instant::now());
            }
            Ok(Payload::Event { origin, timing, event }) => {
                let origin = origin.filter(|o| o.node == self.node_id).map(|o| o.session);
                self.fanout.deliver_event(&key, &event, origin, timing.as_ref());
            }
            Err(error) => warn!(%error, "dropping a payload that does not decode"),
        }
    }

    /// Records, from the replies to PUBLISHes sent at `sent_at`, which
    /// channels reached no other node.
    fn note_receivers(&self, sent_at: std::time::Instant, replies: impl Iterator<Item = (String, i64)>) {
        let now = std::time::Instant::now();
        for (channel, receivers) in replies {
            if self.hello_at.get(&channel).is_some_and(|hello| *hello >= sent_at) {
                // Someone started listening after this PUBLISH went out.
                continue;
            }
            // This node's own subscriber is one of the receivers, if it works.
            // Only then can it hear a newcomer's hello: a node with no socket
            // of the conversation (a reply outliving its sockets) keeps publishing.
            let here = self.receiving.load(Ordering::Acquire) && self.channels.contains_key(&channel);
            if here && receivers <= 1 {
                self.alone_until.insert(channel, now + ALONE_RECHECK);
            } else {
                self.alone_until.remove(&channel);
            }
        }
    }

    /// Drops the bookkeeping entries that no longer mean anything (called
    /// every heartbeat), so neither map grows with conversations.
    fn forget_expired(&self) {
        let now = std::time::Instant::now();
        self.alone_until.retain(|_, until| *until > now);
        self.hello_at.retain(|_, at| now.duration_since(*at) < ALONE_RECHECK);
    }

    fn origin_of(&self, session: Option<SessionId>) -> Option<Origin> {
        session.map(|session| Origin { node: self.node_id.clone(), session })
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

/// Reads pushes from the subscriber connection and routes them; tracks
/// whether routing works and probes the connection so it never goes deaf.
async fn run_dispatcher(shared: Arc<Shared>, mut pushes: mpsc::UnboundedReceiver<PushInfo>, stop: CancellationToken) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let push = tokio::select! {
            _ = stop.cancelled() => return,
            push = pushes.recv() => match push {
                Some(push) => push,
                None => return,
            },
            _ = heartbeat.tick() => {
                shared.forget_expired();
                // A PING on the subscriber connection: fails (and makes the
                // manager reconnect and resubscribe) if the link is dead.
                let mut con = shared.subscriber.clone();
                let ping = redis::cmd("PING");
                match shared.call(ping.query_async::<Value>(&mut con)).await {
                    Err(error) => {
                        if shared.receiving.swap(false, Ordering::AcqRel) {
                            warn!(%error, "Redis subscriber connection failed its heartbeat");
                        }
                    }
                    // The link answers but no `subscribe` confirmation came
                    // (e.g. a heartbeat timed out on a slow link): subscribe
                    // the heartbeat channel again; its confirmation restores
                    // `receiving` and resyncs sessions.
                    Ok(_) if !shared.receiving.load(Ordering::Acquire) => {
                        if let Err(error) = shared.call(con.subscribe(&shared.heartbeat_channel)).await {
                            debug!(%error, "heartbeat resubscribe failed");
                        }
                    }
                    Ok(_) => {}
                }
                continue;
            }
        };
        match push.kind {
            PushKind::Message => shared.dispatch(push.data),
            PushKind::Disconnection if shared.receiving.swap(false, Ordering::AcqRel) => {
                warn!("Redis subscriber connection lost; reconnecting");
            }
            PushKind::Subscribe if !shared.receiving.swap(true, Ordering::AcqRel) => {
                info!(channels = shared.channels.len(), "Redis subscriptions active; resyncing local sessions");
                shared.fanout.resync_all();
            }
            _ => {}
        }
    }
}

/// Publishes deltas in order, one pipelined round trip per batch, and
/// notes which conversations no other node listens to.
async fn run_publisher(shared: Arc<Shared>, mut queue: mpsc::Receiver<Publish>, stop: CancellationToken) {
    let mut con = shared.commands.clone();
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut flushed = Vec::new();
    let mut published = Vec::new();
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            received = queue.recv_many(&mut batch, PUBLISH_BATCH) => received,
        };
        if received == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for item in batch.drain(..) {
            match item {
                Publish::Frame { channel, payload } => {
                    pipe.cmd("PUBLISH").arg(&channel).arg(payload);
                    published.push(channel);
                }
                Publish::Flush(done) => flushed.push(done),
            }
        }
        if !pipe.is_empty() {
            let sent_at = std::time::Instant::now();
            match pipe.query_async::<Vec<i64>>(&mut con).await {
                Ok(receivers) => shared.note_receivers(sent_at, published.drain(..).zip(receivers)),
                Err(error) => debug!(%error, "deltas not published"),
            }
        }
        published.clear();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

#[async_trait]
impl ConversationStore for RedisStore {
    async fn open(
        &self,
        tenant: &TenantId,
        user: &UserId,
        requested: Option<&ConversationId>,
    ) -> Result<Opened, StoreError> {
        let shared = &self.shared;
        if let Some(conversation) = requested {
            let key = ConversationKey { tenant: tenant.clone(), conversation: conversation.clone() };
            if shared.owner(&key).await?.as_deref() != Some(user.as_str()) {
                return Err(StoreError::ConversationNotFound);
            }
            shared.refresh(user, &key).await?;
            return Ok(Opened { key, pending: None });
        }
        let mut con = shared.commands.clone();
        let latest: (Option<String>, Option<u64>) = shared
            .call(
                redis::cmd("HMGET")
                    .arg(shared.keys.latest(tenant, user))
                    .arg("conversation")
                    .arg("last_active_ms")
                    .query_async(&mut con),
            )
            .await?;
        let recent = match latest {
            (Some(conversation), Some(last_active))
                if now_ms().saturating_sub(last_active) <= shared.idle_window_ms =>
            {
                ConversationId::parse(&conversation).ok()
            }
            _ => None,
        };
        if let Some(conversation) = recent {
            let key = ConversationKey { tenant: tenant.clone(), conversation };
            match shared.owner(&key).await? {
                Some(owner) if owner == user.as_str() => {
                    shared.refresh(user, &key).await?;
                    return Ok(Opened { key, pending: None });
                }
                // Lost (flush, failover, expiry): its first message starts it
                // again under the same id, with a new epoch.
                None => return Ok(Opened { key, pending: Some(Pending::new(user)) }),
                Some(_) => {}
            }
        }
        let key = ConversationKey { tenant: tenant.clone(), conversation: ConversationId::generate() };
        Ok(Opened { key, pending: Some(Pending::new(user)) })
    }

    async fn attach(
        &self,
        key: &ConversationKey,
        session: SessionHandle,
        after: Option<u64>,
        pending: Option<&Pending>,
    ) -> Result<Snapshot, StoreError> {
        let shared = &self.shared;
        let session_id = session.id;
        let subscribed = {
            let _guard = shared.subscriptions.lock().await;
            if shared.fanout.join(key, session).map_err(|_| StoreError::TooManySockets)? {
                let channel = shared.keys.channel(key);
                shared.channels.insert(channel.clone(), key.clone());
                let mut subscriber = shared.subscriber.clone();
                if let Err(error) = shared.call(subscriber.subscribe(&channel)).await {
                    shared.fanout.leave(key, session_id);
                    shared.channels.remove(&channel);
                    return Err(error);
                }
                Some(channel)
            } else {
                None
            }
        };
        if let Some(channel) = &subscribed {
            // Tells nodes streaming into this conversation to publish its
            // deltas again (outside the lock: other attaches need not wait for it).
            let mut con = shared.commands.clone();
            if let Err(error) = shared
                .call(redis::cmd("PUBLISH").arg(channel).arg(Payload::Hello.encode()).query_async::<i64>(&mut con))
                .await
            {
                debug!(%error, "could not announce the new listener; deltas resume within a second");
            }
        }
        // Subscribed first, read second: nothing falls between; duplicates
        // are dropped by the session's writer.
        let read = shared.read_after(key, after.unwrap_or(u64::MAX)).await;
        match read {
            Ok(Some((last_seq, epoch, missed))) => {
                if subscribed.is_some() {
                    shared.fanout.delivered_up_to(key, last_seq);
                }
                Ok(Snapshot { exists: true, last_seq, epoch, missed })
            }
            // Not created yet: subscribed all the same, so the session hears
            // its conversation from the first event on.
            Ok(None) if let Some(pending) = pending => {
                Ok(Snapshot { exists: false, last_seq: 0, epoch: pending.epoch.clone(), missed: Vec::new() })
            }
            Ok(None) => {
                self.detach(key, session_id).await;
                Err(StoreError::ConversationNotFound)
            }
            Err(error) => {
                self.detach(key, session_id).await;
                Err(error)
            }
        }
    }

    async fn detach(&self, key: &ConversationKey, session: SessionId) {
        let shared = &self.shared;
        let _guard = shared.subscriptions.lock().await;
        if shared.fanout.leave(key, session) {
            let channel = shared.keys.channel(key);
            shared.channels.remove(&channel);
            shared.alone_until.remove(&channel);
            let mut subscriber = shared.subscriber.clone();
            if let Err(error) = shared.call(subscriber.unsubscribe(&channel)).await {
                debug!(%error, "unsubscribe failed; the channel stays subscribed until reconnect");
            }
        }
    }

    async fn has_listeners(&self, key: &ConversationKey) -> bool {
        let shared = &self.shared;
        if shared.fanout.local_sessions(key) > 0 {
            return true;
        }
        // This node unsubscribes after its last socket; any subscriber left is another node's.
        let mut con = shared.commands.clone();
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB").arg(shared.keys.channel(key));
        match shared.call(numsub.query_async::<(String, u64)>(&mut con)).await {
            Ok((_, subscribers)) => subscribers > 0,
            Err(_) => true,
        }
    }

    async fn touch(&self, user: &UserId, key: &ConversationKey) {
        if let Err(error) = self.shared.refresh(user, key).await {
            debug!(%error, "could not record activity");
        }
    }

    async fn events_after(&self, key: &ConversationKey, after: u64) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        match self.shared.read_after(key, after).await? {
            Some((_, _, events)) => Ok(events),
            None => Err(StoreError::ConversationNotFound),
        }
    }

    fn is_receiving(&self) -> bool {
        self.shared.receiving.load(Ordering::Acquire)
    }

    async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        origin: Option<SessionId>,
        create: Option<&Pending>,
    ) -> Result<Appended, StoreError> {
        let shared = &self.shared;
        if let Some(create) = create {
            shared.count_creation(key, &create.user).await?;
        }
        let timing = event.timing;
        let mut stored = event.stored(0, now_ms());
        // Only customer messages are de-duplicated (by their client-chosen id).
        let dedup_id = if stored.from == Role::Customer { stored.id.as_str() } else { "" };
        let encoded = EncodedEvent::new(&stored, shared.origin_of(origin).as_ref(), timing.as_ref());
        let mut con = shared.commands.clone();
        let mut invocation = shared.append.prepare_invoke();
        invocation
            .key(shared.keys.meta(key))
            .key(shared.keys.log(key))
            .key(shared.keys.message_ids(key))
            .arg(dedup_id)
            .arg(encoded.entry_head)
            .arg(encoded.entry_tail)
            .arg(encoded.payload_head)
            .arg(stored.at_ms)
            .arg(shared.log_cap)
            .arg(shared.retention_secs)
            .arg(shared.keys.channel(key))
            .arg(create.map_or("", |c| c.user.as_str()))
            .arg(create.map_or("", |c| c.epoch.as_str()));
        match shared.call(invocation.invoke_async::<(i64, u64)>(&mut con)).await? {
            (1, seq) => {
                // This node's sockets get it now; the echo through pub/sub is dropped by seq.
                stored.seq = seq;
                shared.fanout.deliver_appended(key, &stored, origin, timing.as_ref());
                // A new conversation is the user's most recent (best effort,
                // like every touch: the message is stored either way).
                if let Some(create) = create
                    && let Err(error) = shared.refresh(&create.user, key).await
                {
                    debug!(%error, "could not point the user to the new conversation");
                }
                Ok(Appended::New(seq))
            }
            (0, seq) => Ok(Appended::Duplicate(seq)),
            _ => Err(StoreError::ConversationNotFound),
        }
    }

    async fn recent_turns(&self, key: &ConversationKey, limit: usize) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let shared = &self.shared;
        let mut con = shared.commands.clone();
        let start = -(limit as i64).max(1);
        let raw: Vec<Vec<u8>> = shared
            .call(redis::cmd("LRANGE").arg(shared.keys.log(key)).arg(start).arg(-1).query_async(&mut con))
            .await?;
        Ok(raw.iter().filter_map(|entry| parse_entry(entry)).filter(|e| e.from != Role::System).collect())
    }

    fn publish_ephemeral(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>) {
        let channel = self.shared.keys.channel(key);
        if self.shared.alone_until.get(&channel).is_some_and(|until| std::time::Instant::now() < *until) {
            self.shared.fanout.deliver_frames(key, frames);
            return;
        }
        // The node id lets this node skip its own echo.
        let node = &self.shared.node_id;
        let payloads: Vec<_> = frames.iter().map(|frame| Payload::encode_frame(node, frame)).collect();
        self.shared.fanout.deliver_frames(key, frames);
        for payload in payloads {
            let item = Publish::Frame { channel: channel.clone(), payload };
            if self.shared.publish_tx.try_send(item).is_err() {
                debug!("delta dropped: publish queue full");
            }
        }
    }

    async fn flush_ephemeral(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.shared.publish_tx.send(Publish::Flush(done_tx)).await.is_ok() {
            let _ = tokio::time::timeout(self.shared.command_timeout, done_rx).await;
        }
    }
}
