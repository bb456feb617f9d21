//! Frames this node publishes for other nodes, and what it knows of who
//! listens.
//!
//! Deltas are published by one task in pipelined batches, in order. They are
//! published only while another node may listen: an append answers how many
//! other nodes are in the conversation's listeners hash, a PUBLISH how many
//! nodes got it; when none did, the conversation's deltas stay local for
//! [`ALONE_RECHECK`], then one is published again to ask anew. (Only while
//! this node listens itself: a reply whose sockets are all gone is published
//! for whoever reconnects, wherever.) A node that starts listening to a
//! conversation says hello on its channel, and nodes streaming into it
//! publish again from the next delta; should that word be lost, the
//! newcomer misses at most [`ALONE_RECHECK`] of deltas, which the
//! `reply.done` repairs, like any lost delta.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Link;
use super::keys::ConversationNames;
use crate::ids::ConversationKey;

/// Deltas waiting for the publisher task; beyond this they are dropped
/// (best effort: `reply.done` carries the whole text).
pub(super) const PUBLISH_QUEUE: usize = 8192;
/// Deltas sent per pipelined round trip at most.
const PUBLISH_BATCH: usize = 256;
/// How long a conversation's deltas stay unpublished after an append or a
/// PUBLISH reached no other node.
const ALONE_RECHECK: Duration = Duration::from_secs(1);

/// Who listens to the conversations this node deals with: itself (its
/// subscriptions) and, as far as it knows, other nodes.
#[derive(Default)]
pub(super) struct Listeners {
    /// Subscribed channel name → conversation, for dispatching pushes
    /// (foldhash, seeded per process, like the fan-out's map).
    pub channels: DashMap<String, ConversationKey, foldhash::fast::RandomState>,
    /// The conversations this node listens to (subscribed) → their names,
    /// built once: every append looks its conversation up here, which also
    /// tells it that this node listens.
    names: DashMap<ConversationKey, Arc<ConversationNames>, foldhash::fast::RandomState>,
    /// Whether the subscriber connection works (`/readyz`).
    pub receiving: AtomicBool,
    /// Conversations whose last append or PUBLISH reached no other node →
    /// until when this node delivers their deltas only locally. Looked up
    /// for every batch of deltas, by key (no channel name built for a
    /// delta that stays local).
    alone_until: DashMap<ConversationKey, Instant, foldhash::fast::RandomState>,
    /// Conversations in which another node said hello lately → when: an
    /// answer to something sent before that must not mark them alone again.
    hello_at: DashMap<ConversationKey, Instant, foldhash::fast::RandomState>,
}

impl Listeners {
    /// Whether frames of `key` must be published for other nodes.
    pub fn others_may_listen(&self, key: &ConversationKey) -> bool {
        self.alone_until.get(key).is_none_or(|until| Instant::now() >= *until)
    }

    /// This node listens to `key` (on `channel`) from now on.
    pub fn listen(&self, key: &ConversationKey, names: ConversationNames) {
        self.channels.insert(names.channel.clone(), key.clone());
        self.names.insert(key.clone(), Arc::new(names));
    }

    /// The names of `key`, if this node listens to it.
    pub fn names(&self, key: &ConversationKey) -> Option<Arc<ConversationNames>> {
        self.names.get(key).map(|names| names.clone())
    }

    /// Notes that what was sent on `key`'s channel at `sent_at` reached
    /// `others` other nodes; `listening`: this node listens to `key`.
    pub fn note(&self, key: &ConversationKey, listening: bool, sent_at: Instant, others: i64) {
        if self.hello_at.get(key).is_some_and(|hello| *hello >= sent_at) {
            // Someone started listening after it went out.
            return;
        }
        // Only a node that listens itself can hear a newcomer's hello.
        let here = listening && self.receiving.load(Ordering::Acquire);
        if here && others <= 0 {
            let until = Instant::now() + ALONE_RECHECK;
            // Updated in place when present: no key cloned per append.
            match self.alone_until.get_mut(key) {
                Some(mut alone) => *alone = until,
                None => {
                    self.alone_until.insert(key.clone(), until);
                }
            }
        } else {
            self.alone_until.remove(key);
        }
    }

    /// Another node started listening to `key`.
    pub fn hello(&self, key: &ConversationKey) {
        self.alone_until.remove(key);
        self.hello_at.insert(key.clone(), Instant::now());
    }

    /// This node stopped listening to `key` (on `channel`).
    pub fn left(&self, key: &ConversationKey, channel: &str) {
        self.channels.remove(channel);
        self.names.remove(key);
        self.alone_until.remove(key);
    }

    /// Drops the bookkeeping entries that no longer mean anything (called
    /// every heartbeat), so neither map grows with conversations.
    pub fn forget_expired(&self) {
        let now = Instant::now();
        self.alone_until.retain(|_, until| *until > now);
        self.hello_at.retain(|_, at| now.duration_since(*at) < ALONE_RECHECK);
    }
}

pub(super) enum Publish {
    Frame { key: ConversationKey, channel: String, payload: Vec<u8> },
    Flush(oneshot::Sender<()>),
}

/// The way to the publisher task.
pub(super) struct Publisher {
    tx: mpsc::Sender<Publish>,
    /// Frames queued and not yet sent: a flush with none waits for nothing.
    unpublished: Arc<AtomicUsize>,
}

impl Publisher {
    pub fn new(tx: mpsc::Sender<Publish>) -> Self {
        Self { tx, unpublished: Arc::default() }
    }

    pub fn unpublished(&self) -> Arc<AtomicUsize> {
        self.unpublished.clone()
    }

    /// Queues a frame's payload without waiting; a full queue drops it.
    pub fn publish(&self, key: &ConversationKey, channel: String, payload: Vec<u8>) {
        self.unpublished.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send(Publish::Frame { key: key.clone(), channel, payload }).is_err() {
            self.unpublished.fetch_sub(1, Ordering::AcqRel);
            debug!("delta dropped: publish queue full");
        }
    }

    /// Waits until every frame queued so far is published (at most `limit`).
    pub async fn flush(&self, limit: Duration) {
        if self.unpublished.load(Ordering::Acquire) == 0 {
            return;
        }
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Publish::Flush(done_tx)).await.is_ok() {
            let _ = tokio::time::timeout(limit, done_rx).await;
        }
    }
}

/// Publishes frames in order, one pipelined round trip per batch, and notes
/// which conversations no other node listens to.
pub(super) async fn run_publisher(
    link: Arc<Link>,
    mut queue: mpsc::Receiver<Publish>,
    unpublished: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut con = link.commands.clone();
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
                Publish::Frame { key, channel, payload } => {
                    pipe.cmd("PUBLISH").arg(&channel).arg(payload);
                    published.push((key, channel));
                }
                Publish::Flush(done) => flushed.push(done),
            }
        }
        if !pipe.is_empty() {
            let sent_at = Instant::now();
            match pipe.query_async::<Vec<i64>>(&mut con).await {
                Ok(receivers) => {
                    for ((key, channel), receivers) in published.iter().zip(receivers) {
                        // This node's own subscriber is one of the receivers, if it listens.
                        let here = link.listeners.channels.contains_key(channel);
                        link.listeners.note(key, here, sent_at, receivers - i64::from(here));
                    }
                }
                Err(error) => debug!(%error, "deltas not published"),
            }
        }
        unpublished.fetch_sub(published.len(), Ordering::AcqRel);
        published.clear();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}
