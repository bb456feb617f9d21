//! Which conversations this node is subscribed to on the bus, changed one
//! conversation at a time.
//!
//! A conversation's first local session (or reply hold) subscribes it and
//! its last leave unsubscribes it; both take Redis round trips in cluster
//! mode. A leave and a join of one conversation must not reorder (an
//! `UNSUBSCRIBE` sent after the `SUBSCRIBE` it should precede would leave
//! a session deaf), so each conversation's changes take turns behind a
//! lock of their own. Different conversations' changes run at once: a
//! storm of reconnects after a node loss subscribes thousands of
//! conversations, pipelined on the bus's connections, not one round trip
//! after another.
//!
//! An entry lives while a task holds or waits for its lock, or while its
//! conversation is fresh: joined by sessions but not subscribed, because it
//! has no log yet and no other node can name it (its first append
//! subscribes it, see [`super::Conversations::append`]).

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::ids::ConversationKey;

/// A conversation's subscription state, behind its lock.
#[derive(Debug, Default)]
pub struct Subscription {
    /// Sessions here have joined it, but the bus is not subscribed to it:
    /// it has no log yet.
    pub fresh: bool,
}

/// The per-conversation locks (see the module doc).
#[derive(Default)]
pub struct Subscriptions {
    locks: DashMap<ConversationKey, Arc<Mutex<Subscription>>, foldhash::fast::RandomState>,
}

impl Subscriptions {
    /// Waits for `key`'s turn; its state is the guard's until it drops.
    pub async fn lock<'a>(&'a self, key: &'a ConversationKey) -> Turn<'a> {
        // Cloned under the map's shard lock: `Turn::drop` removes an entry
        // only when no one else holds it.
        let lock = self.locks.entry(key.clone()).or_default().clone();
        Turn { subscriptions: self, key, guard: Some(lock.lock_owned().await) }
    }

    /// Conversations with an entry (fresh, or being changed).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.len()
    }
}

/// One conversation's turn to change its subscription.
pub struct Turn<'a> {
    subscriptions: &'a Subscriptions,
    key: &'a ConversationKey,
    guard: Option<OwnedMutexGuard<Subscription>>,
}

impl std::ops::Deref for Turn<'_> {
    type Target = Subscription;

    fn deref(&self) -> &Subscription {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Turn<'_> {
    fn deref_mut(&mut self) -> &mut Subscription {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        let fresh = guard.fresh;
        drop(guard);
        if !fresh {
            // Only the map's own reference left: no one holds or waits for it.
            self.subscriptions.locks.remove_if(self.key, |_, lock| Arc::strong_count(lock) == 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_conversation_takes_turns_and_others_do_not_wait() {
        let subscriptions = Arc::new(Subscriptions::default());
        let (a, b) = (ConversationKey::for_test("t", "a"), ConversationKey::for_test("t", "b"));
        let first = subscriptions.lock(&a).await;
        let waiting = {
            let (subscriptions, a) = (subscriptions.clone(), a.clone());
            tokio::spawn(async move {
                let mut turn = subscriptions.lock(&a).await;
                turn.fresh = true;
            })
        };
        // Another conversation's turn comes while `a` is held.
        drop(
            tokio::time::timeout(Duration::from_secs(5), subscriptions.lock(&b)).await.expect("b does not wait for a"),
        );
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a's second turn waits for the first");
        drop(first);
        waiting.await.unwrap();
        assert!(subscriptions.lock(&a).await.fresh, "the state outlives the turn");
    }

    #[tokio::test]
    async fn entries_stay_only_for_fresh_conversations() {
        let subscriptions = Subscriptions::default();
        let (a, b) = (ConversationKey::for_test("t", "a"), ConversationKey::for_test("t", "b"));
        subscriptions.lock(&a).await.fresh = true;
        drop(subscriptions.lock(&b).await);
        assert_eq!(subscriptions.len(), 1, "b was never fresh");
        subscriptions.lock(&a).await.fresh = false;
        assert_eq!(subscriptions.len(), 0);
    }
}
