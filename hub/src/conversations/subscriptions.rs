//! Turns at changing a conversation's bus subscription, one conversation at
//! a time, and which joined conversations are not subscribed yet.
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
//! subscribes it, see [`super::Conversations::append`]). The subscribed
//! conversations themselves are the fan-out's and the bus's to know.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::ids::ConversationKey;

/// A conversation's subscription state, behind its lock.
#[derive(Debug, Default)]
pub(super) struct Subscription {
    /// Sessions here have joined it, but the bus is not subscribed to it:
    /// it has no log yet.
    pub fresh: bool,
}

/// The per-conversation locks (see the module doc).
#[derive(Default)]
pub(super) struct Subscriptions {
    locks: DashMap<ConversationKey, Arc<Mutex<Subscription>>, foldhash::fast::RandomState>,
}

impl Subscriptions {
    /// Waits for `key`'s turn; its state is the turn's until it drops.
    pub async fn lock<'a>(&'a self, key: &'a ConversationKey) -> Turn<'a> {
        // Cloned under the map's shard lock, where `Leave` decides to remove.
        let lock = self.locks.entry(key.clone()).or_default().clone();
        // Made before the wait: a waiter given up (its future dropped)
        // drops the wait first, then this, and leaves no entry behind.
        let leave = Leave { subscriptions: self, key };
        let guard = lock.lock_owned().await;
        Turn { guard, _leave: leave }
    }

    /// Conversations with an entry (fresh, or being changed).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.len()
    }
}

/// One conversation's turn to change its subscription.
pub(super) struct Turn<'a> {
    // Fields drop in order: the lock is released before `Leave` looks.
    guard: OwnedMutexGuard<Subscription>,
    _leave: Leave<'a>,
}

impl std::ops::Deref for Turn<'_> {
    type Target = Subscription;

    fn deref(&self) -> &Subscription {
        &self.guard
    }
}

impl std::ops::DerefMut for Turn<'_> {
    fn deref_mut(&mut self) -> &mut Subscription {
        &mut self.guard
    }
}

/// Removes a conversation's entry that no one holds or waits for and that
/// is not fresh, once a turn (or a wait for one) ends.
struct Leave<'a> {
    subscriptions: &'a Subscriptions,
    key: &'a ConversationKey,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        // Decided under the map's shard lock, where every holder got its
        // reference: the map's own reference alone means no one holds or
        // waits (so the state can be read at once).
        self.subscriptions
            .locks
            .remove_if(self.key, |_, lock| Arc::strong_count(lock) == 1 && lock.try_lock().is_ok_and(|s| !s.fresh));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_conversation_takes_turns_and_others_do_not_wait() {
        let subscriptions = Arc::new(Subscriptions::default());
        let (a, b) = (ConversationKey::for_test("t", "a"), ConversationKey::for_test("t", "b"));
        let first = subscriptions.lock(&a).await;
        let (got_tx, mut got_rx) = tokio::sync::oneshot::channel();
        let second = {
            let (subscriptions, a) = (subscriptions.clone(), a.clone());
            tokio::spawn(async move {
                let mut turn = subscriptions.lock(&a).await;
                let _ = got_tx.send(());
                turn.fresh = true;
            })
        };
        // Another conversation's turn comes while `a` is held.
        drop(
            tokio::time::timeout(Duration::from_secs(5), subscriptions.lock(&b)).await.expect("b does not wait for a"),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(got_rx.try_recv().is_err(), "a's second turn waits for the first");
        drop(first);
        second.await.unwrap();
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

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_entry() {
        let subscriptions = Subscriptions::default();
        let a = ConversationKey::for_test("t", "a");
        // Given up before the turn ended.
        let first = subscriptions.lock(&a).await;
        let mut waiter = Box::pin(subscriptions.lock(&a));
        assert!(futures::poll!(&mut waiter).is_pending());
        drop(waiter);
        drop(first);
        assert_eq!(subscriptions.len(), 0);
        // Given up after the turn ended, before it ran (the turn seemed wanted when it ended).
        let first = subscriptions.lock(&a).await;
        let mut waiter = Box::pin(subscriptions.lock(&a));
        assert!(futures::poll!(&mut waiter).is_pending());
        drop(first);
        drop(waiter);
        assert_eq!(subscriptions.len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn turns_of_one_conversation_never_overlap_while_its_entry_comes_and_goes() {
        let subscriptions = Arc::new(Subscriptions::default());
        let holders = Arc::new(AtomicUsize::new(0));
        let a = ConversationKey::for_test("t", "a");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (subscriptions, holders, a) = (subscriptions.clone(), holders.clone(), a.clone());
                tokio::spawn(async move {
                    for turn in 0..500 {
                        let _turn = subscriptions.lock(&a).await;
                        assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two turns at once");
                        if turn % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                        holders.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(subscriptions.len(), 0);
    }
}
