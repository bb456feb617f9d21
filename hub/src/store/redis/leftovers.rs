//! Channels this node left while Redis could not hear it. redis-rs forgets
//! a subscription only when Redis confirms its `UNSUBSCRIBE`, and renews
//! every subscription it remembers after a reconnect: a channel left while
//! the subscriber link was down would be heard again, for nothing, for the
//! node's life (and counted by `PUBSUB NUMSUB`), with this node still named
//! in its conversation's listeners hash. The bus's heartbeat tries such
//! channels again once Redis answers ([`unsubscribe`]), one at a time.
//!
//! A try at one channel (its `UNSUBSCRIBE`, then leaving the listeners
//! hash) and a subscribe of that channel must not interleave: a try's
//! `HDEL` after the subscribe entered the hash, or its `UNSUBSCRIBE` after
//! the `SUBSCRIBE`, would leave the node deaf to the conversation. So both
//! hold the left channel's own lock ([`Leftovers::reclaim`]): a try while
//! it works on the channel, a subscribe from before it enters the hash
//! until its `SUBSCRIBE` is answered. Other channels' subscribes take none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use redis::aio::ConnectionManager;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::debug;

use super::Link;
use crate::ids::ConversationKey;

pub(super) struct Leftovers {
    /// Each left channel.
    channels: DashMap<String, Left>,
    /// Whether a try is under way (one at a time).
    trying: Arc<AtomicBool>,
    /// `fengda_hub_redis_unsubscribes_pending`: how many channels.
    pending: metrics::Gauge,
}

/// One left channel.
struct Left {
    /// Its conversation (`None`: a tenant's changes).
    key: Option<ConversationKey>,
    /// Held by a try at it, or a subscribe of it (see the module doc).
    lock: Arc<Mutex<()>>,
}

impl Default for Leftovers {
    fn default() -> Self {
        let pending = metrics::gauge!(crate::metric::REDIS_UNSUBSCRIBES_PENDING);
        Self { channels: DashMap::new(), trying: Arc::default(), pending }
    }
}

/// A try under way: the next starts once this drops.
pub(super) struct Trying(Arc<AtomicBool>);

impl Drop for Trying {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A subscribe under way; of a left channel, it holds off the tries at it
/// until it drops.
pub(super) struct Reclaiming<'a> {
    leftovers: &'a Leftovers,
    channel: &'a str,
    /// The channel's lock, held when it was left.
    lock: Option<OwnedMutexGuard<()>>,
}

impl Reclaiming<'_> {
    /// The channel is subscribed: left no more.
    pub fn subscribed(self) {
        if self.lock.is_some() {
            self.leftovers.done(self.channel);
        }
    }
}

/// A try's hold on one left channel.
pub(super) struct Turn {
    pub key: Option<ConversationKey>,
    _lock: OwnedMutexGuard<()>,
}

impl Leftovers {
    /// The channel's `UNSUBSCRIBE` failed (in its conversation's turn, or
    /// the listing task's: never while it is being subscribed).
    pub fn left(&self, channel: String, key: Option<ConversationKey>) {
        if let dashmap::Entry::Vacant(vacant) = self.channels.entry(channel) {
            vacant.insert(Left { key, lock: Arc::default() });
            self.pending.increment(1.0);
        }
    }

    /// Before subscribing `channel` (and entering its listeners hash): if
    /// it was left, holds off tries at it until the returned value is
    /// dropped (after the `SUBSCRIBE`), and forgets it on
    /// [`Reclaiming::subscribed`]; a failed subscribe leaves it to the tries.
    pub async fn reclaim<'a>(&'a self, channel: &'a str) -> Reclaiming<'a> {
        let lock = self.channels.get(channel).map(|left| left.lock.clone());
        let lock = match lock {
            Some(lock) => Some(lock.lock_owned().await),
            None => None,
        };
        Reclaiming { leftovers: self, channel, lock }
    }

    /// The right to try the left channels again, if there are any and no
    /// try is under way.
    pub fn start_try(&self) -> Option<Trying> {
        if self.channels.is_empty() || self.trying.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Trying(self.trying.clone()))
    }

    /// The left channels as they are now.
    pub fn list(&self) -> Vec<String> {
        self.channels.iter().map(|entry| entry.key().clone()).collect()
    }

    /// A try's turn at `channel`, once no subscribe of it is under way;
    /// `None` if it is left no more (subscribed again meanwhile).
    pub async fn turn(&self, channel: &str) -> Option<Turn> {
        let lock = self.channels.get(channel)?.lock.clone();
        let guard = lock.clone().lock_owned().await;
        // Still the same leftover (not subscribed, nor left again since).
        let left = self.channels.get(channel).filter(|left| Arc::ptr_eq(&left.lock, &lock))?;
        Some(Turn { key: left.key.clone(), _lock: guard })
    }

    /// The channel is unsubscribed, or subscribed again.
    pub fn done(&self, channel: &str) {
        if self.channels.remove(channel).is_some() {
            self.pending.decrement(1.0);
        }
    }
}

/// Unsubscribes the left channels (on the bus's `subscriber` connection)
/// and leaves their conversations' listeners hashes, one channel per turn;
/// stops at the first failure (the next heartbeat tries again).
pub(super) async fn unsubscribe(
    leftovers: Arc<Leftovers>,
    link: Arc<Link>,
    mut subscriber: ConnectionManager,
    _trying: Trying,
) {
    for channel in leftovers.list() {
        let Some(turn) = leftovers.turn(&channel).await else { continue };
        if let Err(error) = link.call(subscriber.unsubscribe(&channel)).await {
            return debug!(%error, "a left channel is still subscribed; trying again later");
        }
        if let Some(key) = &turn.key
            && let Err(error) = link.leave_listeners(key).await
        {
            return debug!(%error, "a left conversation still names this node; trying again later");
        }
        leftovers.done(&channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscribe_of_a_left_channel_and_a_try_at_it_take_turns() {
        let leftovers = Leftovers::default();
        assert!(leftovers.start_try().is_none(), "nothing to try");
        leftovers.reclaim("a").await.subscribed(); // not left: at once, and nothing to forget
        leftovers.left("a".into(), None);
        leftovers.left("b".into(), None);
        let trying = leftovers.start_try().expect("a try");
        assert!(leftovers.start_try().is_none(), "one try at a time");
        // A try's turn at a channel holds off a subscribe of it, not of another.
        let turn = leftovers.turn("a").await.expect("left");
        let mut reclaim = Box::pin(leftovers.reclaim("a"));
        assert!(futures::poll!(&mut reclaim).is_pending(), "waits for the try's turn");
        drop(leftovers.reclaim("b").await);
        drop(turn);
        let reclaiming = reclaim.await;
        // And back.
        let mut turn = Box::pin(leftovers.turn("a"));
        assert!(futures::poll!(&mut turn).is_pending(), "waits for the subscribe");
        // A subscribe that failed leaves the channel to the tries; one that
        // succeeded forgets it, and a try finds it gone.
        drop(reclaiming);
        drop(turn.await.expect("still left"));
        let reclaiming = leftovers.reclaim("a").await;
        let mut turn = Box::pin(leftovers.turn("a"));
        assert!(futures::poll!(&mut turn).is_pending());
        reclaiming.subscribed();
        assert!(turn.await.is_none(), "subscribed again meanwhile");
        assert_eq!(leftovers.list(), ["b"]);
        // The next try starts once this one ends.
        drop(trying);
        assert!(leftovers.start_try().is_some());
    }
}
