//! The event bus seam: a conversation's events between hub nodes.
//!
//! The bus carries what one node's sockets need from another node: durable
//! events appended elsewhere and non-durable frames (`reply.delta`,
//! `queued`) streamed elsewhere. It never sees sockets: what it receives it
//! hands to an [`IncomingEvents`] handler, which the node's
//! [`crate::fanout::FanOut`] implements (as centrifuge's broker hands
//! publications to a `BrokerEventHandler`, and socketioxide's adapter
//! reaches sockets only through an injected emitter). What the node
//! produces itself goes to its own sockets directly, never through the bus
//! (see [`crate::conversations`]).
//!
//! Two implementations: [`LocalBus`] for a single node (nothing to carry),
//! and [`crate::store::redis::RedisBus`] (Redis pub/sub, cluster mode).
//! Durable events are published by the log's append itself (atomically with
//! storing them, centrifuge's "publish and save atomically"), so the bus
//! publishes only frames.
//!
//! Contract: delivery is at most once (pub/sub is a doorbell, the log is the
//! truth): the fan-out drops what its sockets already have, and a socket
//! that sees a later seq first fills the gap from the log; a bus that may
//! have missed events (its subscription dropped) calls
//! [`IncomingEvents::resync`].
//!
//! Presence and typing ([`crate::presence`]) ride on the conversation's
//! channel too: typing signals published by the typist's node
//! ([`EventBus::publish_typing`]), and each node's presence entry when it
//! changes (written by the node's [`crate::presence::PresenceBoard`]).
//!
//! The agents' live list ([`crate::listing`]) has a tenant-wide feed: while
//! a node lists a tenant ([`EventBus::list_tenant`]) the ids of the
//! tenant's conversations that change anywhere reach
//! [`IncomingEvents::listed`] (in Redis: the append and the presence board
//! publish them on the tenant's channel, only while some node lists it).
//!
//! Room left for what comes next, each with its place here:
//! sharded pub/sub on Redis Cluster (`SSUBSCRIBE`/`SPUBLISH` inside
//! [`crate::store::redis::RedisBus`]; channel names already share their
//! conversation's hash tag).

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;

use crate::event::{LogEpoch, OwnerEpoch, StoredEvent};
use crate::ids::{ConversationId, ConversationKey, TenantId};
use crate::presence::{Present, Typing};
use crate::protocol::ReplyTiming;
use crate::store::StoreError;

/// Where a bus hands what it receives from other nodes. Never blocks: it is
/// called from the bus's receiving loop.
pub trait IncomingEvents: Send + Sync + 'static {
    /// A durable event another node appended to the log incarnation
    /// `epoch` (`timing` rides along on a reply's `reply.done`; it is not stored).
    fn event(&self, key: &ConversationKey, epoch: LogEpoch, event: &StoredEvent, timing: Option<&ReplyTiming>);
    /// Non-durable frames another node streamed, in order, of a reply asked under `asked`.
    fn frames(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>, asked: OwnerEpoch);
    /// An agents' note another node stored (for agents' sockets only).
    fn note(&self, key: &ConversationKey, note: &crate::event::StoredNote);
    /// Events may have been missed (the subscription was down): every
    /// session re-reads its log after the last seq it sent.
    fn resync(&self);
    /// Events of this conversation may have been missed (the node was not
    /// told of them: its log was recreated elsewhere): its sessions re-read
    /// its log after the last seq each sent.
    fn resync_conversation(&self, key: &ConversationKey);
    /// Someone typing on another node.
    fn typing(&self, key: &ConversationKey, typing: &Typing);
    /// Another node's presence entry of the conversation changed (empty: it has none).
    fn presence(&self, key: &ConversationKey, node: &str, entry: Present);
    /// A conversation of a tenant this node lists changed (on any node).
    fn listed(&self, tenant: &TenantId, conversation: ConversationId);
}

/// Carries a conversation's events between nodes (see the module doc).
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Starts receiving the conversation's events from other nodes (this
    /// node's first socket of it). Once this returns, every event another
    /// node appends reaches the handler, or is in a log read started now.
    async fn subscribe(&self, key: &ConversationKey) -> Result<(), StoreError>;

    /// [`EventBus::subscribe`] for a fresh conversation (see
    /// [`crate::store::Pending::fresh`]) that this node's next append creates:
    /// no other node can name it yet, so none has to be told that this node
    /// listens (the creating append records it).
    async fn subscribe_fresh(&self, key: &ConversationKey) -> Result<(), StoreError>;

    /// Stops receiving them (this node's last socket left). Never fails.
    async fn unsubscribe(&self, key: &ConversationKey);

    /// Publishes non-durable frames of a reply asked under `asked` for other
    /// nodes' sockets, in order. Best effort and never waits; frames no
    /// other node listens for are not sent.
    fn publish_frames(&self, key: &ConversationKey, frames: &[Utf8Bytes], asked: OwnerEpoch);

    /// Publishes a typing signal for other nodes' sockets; best effort and
    /// never waits, like frames.
    fn publish_typing(&self, key: &ConversationKey, typing: &Typing);

    /// Waits until every frame given to `publish_frames` so far has been
    /// published, so that a reply's deltas reach other nodes before its
    /// `reply.done`.
    async fn flush(&self);

    /// Whether another node has a socket of the conversation. Errs on the
    /// side of true.
    async fn has_remote_listeners(&self, key: &ConversationKey) -> bool;

    /// Starts hearing which of the tenant's conversations change on other
    /// nodes (this node's first agent listing it), and tells them to say so.
    async fn list_tenant(&self, tenant: &TenantId) -> Result<(), StoreError>;

    /// Stops hearing them (this node's last agent listing it left). Never fails.
    async fn unlist_tenant(&self, tenant: &TenantId);

    /// Tells the other nodes again that these tenants are listed here (a
    /// node that stops saying so, or dies, costs them nothing after a while).
    async fn keep_listing(&self, tenants: &[TenantId]);

    /// Whether this node currently receives other nodes' events (false
    /// while a subscription is down). Drives `/readyz`.
    fn is_receiving(&self) -> bool;
}

/// The bus of a single node: there is no other node to hear from or to tell.
#[derive(Debug, Default)]
pub struct LocalBus;

#[async_trait]
impl EventBus for LocalBus {
    async fn subscribe(&self, _: &ConversationKey) -> Result<(), StoreError> {
        Ok(())
    }

    async fn subscribe_fresh(&self, _: &ConversationKey) -> Result<(), StoreError> {
        Ok(())
    }

    async fn unsubscribe(&self, _: &ConversationKey) {}

    fn publish_frames(&self, _: &ConversationKey, _: &[Utf8Bytes], _: OwnerEpoch) {}

    fn publish_typing(&self, _: &ConversationKey, _: &Typing) {}

    async fn flush(&self) {}

    async fn has_remote_listeners(&self, _: &ConversationKey) -> bool {
        false
    }

    async fn list_tenant(&self, _: &TenantId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn unlist_tenant(&self, _: &TenantId) {}

    async fn keep_listing(&self, _: &[TenantId]) {}

    fn is_receiving(&self) -> bool {
        true
    }
}
