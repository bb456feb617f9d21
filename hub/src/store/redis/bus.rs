//! The Redis event bus: a conversation's events between nodes over pub/sub.
//!
//! One dedicated RESP3 connection carries every SUBSCRIBE and its pushes;
//! the dispatcher task reads them and hands each payload ([`wire::Payload`])
//! to the [`IncomingEvents`] handler without blocking, skipping this node's
//! own echoes unread. It also probes the connection every [`HEARTBEAT`] so
//! the node never goes deaf unnoticed, and resyncs every session when the
//! subscriptions come back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::leftovers::{self, Leftovers};
use super::publisher::{PUBLISH_QUEUE, Publisher, run_publisher};
use super::wire::{self, Payload};
use super::{Link, StoreError};
use crate::bus::{EventBus, IncomingEvents};
use crate::event::{LogEpoch, OwnerEpoch};
use crate::ids::{ConversationId, ConversationKey, TenantId};

/// How often the subscriber connection is probed.
const HEARTBEAT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct RedisBus {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) link: Arc<Link>,
    /// RESP3 connection used only for SUBSCRIBE/UNSUBSCRIBE and its pushes.
    subscriber: ConnectionManager,
    /// Always subscribed, so every reconnect yields a `subscribe` push.
    heartbeat_channel: String,
    publisher: Publisher,
    listen: redis::Script,
    /// The tenants' changes channels this node subscribes (it lists them).
    tenant_channels: dashmap::DashMap<String, TenantId>,
    /// Channels left while Redis could not hear it, tried again.
    leftovers: Arc<Leftovers>,
    /// Owns the tasks the dispatcher starts ([`rejoin`], [`leftovers::unsubscribe`]).
    tracker: TaskTracker,
}

impl RedisBus {
    pub(super) async fn start(
        link: Arc<Link>,
        subscriber: ConnectionManager,
        incoming: Arc<dyn IncomingEvents>,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let publisher = Publisher::new(publish_tx);
        let unpublished = publisher.unpublished();
        let heartbeat_channel = link.keys.heartbeat(link.node_id.as_str());
        let listen = redis::Script::new(include_str!("listen.lua"));
        let inner = Arc::new(Inner {
            link: link.clone(),
            subscriber,
            heartbeat_channel,
            publisher,
            listen,
            tenant_channels: Default::default(),
            leftovers: Arc::default(),
            tracker: tracker.clone(),
        });
        inner.subscriber.clone().subscribe(&inner.heartbeat_channel).await?;
        // Subscribed: routing works from the first socket on (`/readyz` green).
        link.listeners.receiving.store(true, Ordering::Release);
        tracker.spawn(run_dispatcher(inner.clone(), incoming, pushes, shutdown.clone()));
        tracker.spawn(run_publisher(link, publish_rx, unpublished, shutdown));
        Ok(Self { inner })
    }
}

#[async_trait]
impl EventBus for RedisBus {
    async fn subscribe(&self, key: &ConversationKey) -> Result<(), StoreError> {
        let channel = self.inner.link.keys.channel(key);
        // Before the listeners hash: no try at unsubscribing a channel left
        // behind (which leaves the hash too) runs until it is subscribed.
        let reclaiming = self.inner.leftovers.reclaim(&channel).await;
        // In the listeners hash before subscribed: an append from now on is
        // published (or in the log read that follows the subscription).
        self.inner.listen(key, &channel).await?;
        let subscribed = self.subscribe_channel(key, channel.clone()).await;
        match subscribed {
            Ok(()) => reclaiming.subscribed(),
            Err(_) => self.leave_listeners(key).await,
        }
        subscribed
    }

    async fn subscribe_fresh(&self, key: &ConversationKey) -> Result<(), StoreError> {
        // No `listen.lua`: no log to enter this node in the listeners of, no
        // node streaming into it to say hello to; the creating append enters it.
        let channel = self.inner.link.keys.channel(key);
        let reclaiming = self.inner.leftovers.reclaim(&channel).await;
        self.subscribe_channel(key, channel.clone()).await?;
        reclaiming.subscribed();
        Ok(())
    }

    async fn unsubscribe(&self, key: &ConversationKey) {
        let link = &self.inner.link;
        let channel = link.keys.channel(key);
        link.listeners.left(key, &channel);
        link.recent.forget(key);
        let mut subscriber = self.inner.subscriber.clone();
        let unsubscribed = link.call(subscriber.unsubscribe(&channel)).await;
        self.leave_listeners(key).await;
        if let Err(error) = unsubscribed {
            debug!(%error, "unsubscribe failed; tried again once Redis answers");
            self.inner.leftovers.left(channel, Some(key.clone()));
        }
    }

    fn publish_frames(&self, key: &ConversationKey, frames: &[Utf8Bytes], asked: OwnerEpoch) {
        let link = &self.inner.link;
        if !link.listeners.others_may_listen(key) {
            return;
        }
        let channel = link.keys.channel(key);
        for frame in frames {
            // The node id lets this node skip its own echo.
            self.inner.publisher.publish(key, channel.clone(), Payload::encode_frame(&link.node_id, frame, asked));
        }
    }

    fn publish_typing(&self, key: &ConversationKey, typing: &crate::presence::Typing) {
        let link = &self.inner.link;
        if !link.listeners.others_may_listen(key) {
            return;
        }
        let payload = Payload::Typing { node: link.node_id.clone(), typing: typing.clone() }.encode();
        self.inner.publisher.publish(key, link.keys.channel(key), payload);
    }

    async fn flush(&self) {
        self.inner.publisher.flush(self.inner.link.command_timeout).await;
    }

    async fn has_remote_listeners(&self, key: &ConversationKey) -> bool {
        let link = &self.inner.link;
        // Asked while this node has no socket of it; it may still be
        // subscribed (a reply streaming here holds the conversation): any
        // other subscriber is another node's.
        let channel = link.keys.channel(key);
        let here = u64::from(link.listeners.channels.contains_key(&channel));
        let mut con = link.commands.clone();
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB").arg(&channel);
        match link.call(numsub.query_async::<(String, u64)>(&mut con)).await {
            Ok((_, subscribers)) => subscribers > here,
            Err(_) => true,
        }
    }

    async fn list_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let link = &self.inner.link;
        let channel = link.keys.changes(tenant);
        self.inner.tenant_channels.insert(channel.clone(), tenant.clone());
        let reclaiming = self.inner.leftovers.reclaim(&channel).await;
        let mut subscriber = self.inner.subscriber.clone();
        if let Err(error) = link.call(subscriber.subscribe(&channel)).await {
            self.inner.tenant_channels.remove(&channel);
            return Err(error);
        }
        reclaiming.subscribed();
        // Subscribed first: a change published once the flag is up is heard.
        self.keep_listing(std::slice::from_ref(tenant)).await;
        Ok(())
    }

    async fn unlist_tenant(&self, tenant: &TenantId) {
        let link = &self.inner.link;
        let channel = link.keys.changes(tenant);
        self.inner.tenant_channels.remove(&channel);
        let mut subscriber = self.inner.subscriber.clone();
        if let Err(error) = link.call(subscriber.unsubscribe(&channel)).await {
            debug!(%error, "unsubscribe failed; tried again once Redis answers");
            self.inner.leftovers.left(channel, None);
        }
        // The flag stays until it expires: another node may list the tenant too.
    }

    async fn keep_listing(&self, tenants: &[TenantId]) {
        if tenants.is_empty() {
            return;
        }
        let link = &self.inner.link;
        let ttl_ms = u64::try_from(crate::listing::changes::LISTING_TTL.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for tenant in tenants {
            pipe.cmd("SET").arg(link.keys.listing(tenant)).arg(1).arg("PX").arg(ttl_ms).ignore();
        }
        let mut con = link.commands.clone();
        if let Err(error) = link.call(pipe.query_async::<()>(&mut con)).await {
            debug!(%error, "listing flags not written; the next refresh writes them");
        }
    }

    fn is_receiving(&self) -> bool {
        self.inner.link.listeners.receiving.load(Ordering::Acquire)
    }
}

impl RedisBus {
    /// Subscribes to the conversation's `channel`, once this node is in its
    /// listeners hash (or about to be entered by its creating append); on
    /// failure, forgets it again (the caller leaves the hash it entered).
    async fn subscribe_channel(&self, key: &ConversationKey, channel: String) -> Result<(), StoreError> {
        let link = &self.inner.link;
        link.listeners.listen(key, link.keys.conversation_names(key));
        link.recent.listen(key);
        let mut subscriber = self.inner.subscriber.clone();
        if let Err(error) = link.call(subscriber.subscribe(&channel)).await {
            link.listeners.left(key, &channel);
            link.recent.forget(key);
            // A SUBSCRIBE that timed out may still be confirmed, and redis-rs
            // then keeps it (and renews it after every reconnect): undo it,
            // in the caller's turn, so a later SUBSCRIBE cannot be overtaken.
            if let Err(error) = link.call(subscriber.unsubscribe(&channel)).await {
                debug!(%error, "could not undo a failed subscription; tried again once Redis answers");
                self.inner.leftovers.left(channel, Some(key.clone()));
            }
            return Err(error);
        }
        Ok(())
    }

    /// Takes this node out of the conversation's listeners hash (best
    /// effort: a name left behind costs other nodes needless PUBLISHes
    /// until the hash expires).
    async fn leave_listeners(&self, key: &ConversationKey) {
        if let Err(error) = self.inner.link.leave_listeners(key).await {
            debug!(%error, "could not leave the listeners of a conversation");
        }
    }
}

impl Inner {
    /// Enters this node in the conversation's listeners hash and says hello
    /// on its `channel` (`listen.lua`).
    async fn listen(&self, key: &ConversationKey, channel: &str) -> Result<(), StoreError> {
        let link = &self.link;
        let mut con = link.commands.clone();
        let mut listen = self.listen.prepare_invoke();
        listen
            .key(link.keys.meta(key))
            .key(link.keys.listeners(key))
            .arg(link.node_id.as_str())
            .arg(link.retention.expire_secs())
            .arg(channel)
            .arg(Payload::Hello.encode());
        link.call(listen.invoke_async::<i64>(&mut con)).await.map(drop)
    }
}

/// Another node created the log of a conversation this node listens to:
/// it was lost (flush, failover, expiry) with this node's name in its
/// listeners hash, and recreated. This node listens again, then its
/// sessions of the conversation re-read the log for what was appended
/// before (an append publishes only for the nodes in the hash).
async fn rejoin(inner: Arc<Inner>, incoming: Arc<dyn IncomingEvents>, key: ConversationKey, channel: String) {
    match inner.listen(&key, &channel).await {
        Ok(()) => incoming.resync_conversation(&key),
        Err(error) => warn!(%error, "cannot listen again to a recreated conversation log"),
    }
}

/// Hands one pushed message to `incoming`.
fn dispatch(inner: &Arc<Inner>, incoming: &Arc<dyn IncomingEvents>, data: Vec<Value>) {
    let link = &inner.link;
    let mut data = data.into_iter();
    let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.next(), data.next()) else {
        return;
    };
    let Ok(channel) = std::str::from_utf8(&channel) else { return };
    let Some(key) = link.listeners.channels.get(channel).map(|k| k.clone()) else {
        // A tenant's changes: the payload is the conversation id.
        if let Some(tenant) = inner.tenant_channels.get(channel).map(|t| t.clone())
            && let Some(conversation) = std::str::from_utf8(&payload).ok().and_then(|c| ConversationId::parse(c).ok())
        {
            incoming.listed(&tenant, conversation);
        }
        return;
    };
    // This node delivered what it published when it published it.
    if wire::published_by(&payload, &link.node_id) {
        return;
    }
    match Payload::decode(Bytes::from(payload)) {
        Ok(Payload::Frame { frame, asked, .. }) => incoming.frames(&key, vec![frame], asked),
        // Another node started listening: publish this conversation's deltas again.
        Ok(Payload::Hello) => link.listeners.hello(&key),
        Ok(Payload::Note { note, .. }) => incoming.note(&key, &note),
        Ok(Payload::Typing { typing, .. }) => incoming.typing(&key, &typing),
        Ok(Payload::Presence { node, entry }) => incoming.presence(&key, node.as_str(), entry),
        Ok(Payload::Event { timing, log_epoch, event, .. }) => {
            link.recent.heard(&key, event.seq);
            incoming.event(&key, LogEpoch::of(&log_epoch), &event, timing.as_ref());
            if event.seq == 1 {
                let rejoin = rejoin(inner.clone(), incoming.clone(), key, channel.to_owned());
                inner.tracker.spawn(rejoin);
            }
        }
        Err(error) => warn!(%error, "dropping a payload that does not decode"),
    }
}

/// Reads pushes from the subscriber connection and routes them; tracks
/// whether routing works and probes the connection so it never goes deaf.
async fn run_dispatcher(
    inner: Arc<Inner>,
    incoming: Arc<dyn IncomingEvents>,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    stop: CancellationToken,
) {
    let link = &inner.link;
    let receiving = &link.listeners.receiving;
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
                link.listeners.forget_expired();
                probe(&inner).await;
                if receiving.load(Ordering::Acquire)
                    && let Some(trying) = inner.leftovers.start_try()
                {
                    let (left, link, subscriber) = (inner.leftovers.clone(), link.clone(), inner.subscriber.clone());
                    inner.tracker.spawn(leftovers::unsubscribe(left, link, subscriber, trying));
                }
                continue;
            }
        };
        match push.kind {
            PushKind::Message => dispatch(&inner, &incoming, push.data),
            PushKind::Disconnection if receiving.swap(false, Ordering::AcqRel) => {
                link.recent.invalidate_all();
                warn!("Redis subscriber connection lost; reconnecting");
            }
            PushKind::Subscribe if !receiving.swap(true, Ordering::AcqRel) => {
                info!(channels = link.listeners.channels.len(), "Redis subscriptions active; resyncing local sessions");
                link.recent.invalidate_all();
                incoming.resync();
            }
            _ => {}
        }
    }
}

/// A PING on the subscriber connection: fails (and makes the manager
/// reconnect and resubscribe) if the link is dead.
async fn probe(inner: &Inner) {
    let link = &inner.link;
    let receiving = &link.listeners.receiving;
    let mut con = inner.subscriber.clone();
    let ping = redis::cmd("PING");
    match link.call(ping.query_async::<Value>(&mut con)).await {
        Err(error) => {
            if receiving.swap(false, Ordering::AcqRel) {
                link.recent.invalidate_all();
                warn!(%error, "Redis subscriber connection failed its heartbeat");
            }
        }
        // The link answers but no `subscribe` confirmation came (e.g. a
        // heartbeat timed out on a slow link): subscribe the heartbeat
        // channel again; its confirmation restores `receiving` and resyncs
        // sessions.
        Ok(_) if !receiving.load(Ordering::Acquire) => {
            if let Err(error) = link.call(con.subscribe(&inner.heartbeat_channel)).await {
                debug!(%error, "heartbeat resubscribe failed");
            }
        }
        Ok(_) => {}
    }
}
