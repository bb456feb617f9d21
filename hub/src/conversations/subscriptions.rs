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
//! A lock lives while a task holds or waits for it. The fresh
//! conversations, joined by sessions but not subscribed because they have
//! no log yet and no other node can name them (the first append subscribes
//! one, see [`super::Conversations::append`]), are a set of their own,
//! changed only in their conversation's turn: an idle socket's conversation
//! costs one set entry, no lock. The subscribed conversations themselves
//! are the fan-out's and the bus's to know.
//!
//! A conversation whose subscription failed while a reply held it (see
//! [`super::Conversations::hold`]: the reply goes on regardless) is marked
//! too, so that the next session to join it subscribes it rather than
//! take it for subscribed.

use std::sync::Arc;

use dashmap::{DashMap, DashSet};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::ids::ConversationKey;

type Locks = DashMap<ConversationKey, Arc<Mutex<()>>, foldhash::fast::RandomState>;

type Keys = DashSet<ConversationKey, foldhash::fast::RandomState>;

/// The per-conversation locks, the fresh conversations and those whose
/// subscription failed (see the module doc).
#[derive(Default)]
pub(super) struct Subscriptions {
    locks: Locks,
    fresh: Keys,
    failed: Keys,
}

impl Subscriptions {
    /// Waits for `key`'s turn, which lasts until the returned value drops.
    pub async fn lock<'a>(&'a self, key: &'a ConversationKey) -> Turn<'a> {
        // Cloned under the map's shard lock, where `Leave` decides to remove.
        let lock = self.locks.entry(key.clone()).or_default().clone();
        // Made before the wait: a waiter given up (its future dropped)
        // drops the wait first, then this, and leaves no entry behind.
        let leave = Leave { locks: &self.locks, key };
        let guard = lock.lock_owned().await;
        Turn { _guard: guard, _leave: leave, fresh: &self.fresh, failed: &self.failed, key }
    }
}

/// One conversation's turn to change its subscription.
pub(super) struct Turn<'a> {
    // Fields drop in order: the lock is released before `Leave` looks.
    _guard: OwnedMutexGuard<()>,
    _leave: Leave<'a>,
    fresh: &'a Keys,
    failed: &'a Keys,
    key: &'a ConversationKey,
}

impl Turn<'_> {
    /// Whether the conversation is fresh: joined here, not subscribed.
    pub fn is_fresh(&self) -> bool {
        self.fresh.contains(self.key)
    }

    /// Its sessions joined it before it has a log: not subscribed yet.
    pub fn mark_fresh(&self) {
        self.fresh.insert(self.key.clone());
    }

    /// It is fresh no more (subscribed, or left); whether it was.
    pub fn take_fresh(&self) -> bool {
        self.fresh.remove(self.key).is_some()
    }

    /// Joined here, but subscribing it failed.
    pub fn mark_failed(&self) {
        self.failed.insert(self.key.clone());
    }

    /// Its failed subscription is over (subscribed again, or left); whether it had one.
    pub fn take_failed(&self) -> bool {
        self.failed.remove(self.key).is_some()
    }
}

/// Removes a conversation's lock that no one holds or waits for, once a
/// turn (or a wait for one) ends.
struct Leave<'a> {
    locks: &'a Locks,
    key: &'a ConversationKey,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        // Decided under the map's shard lock, where every holder got its
        // reference: the map's own reference alone means no one holds or waits.
        self.locks.remove_if(self.key, |_, lock| Arc::strong_count(lock) == 1);
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
                let turn = subscriptions.lock(&a).await;
                let _ = got_tx.send(());
                turn.mark_fresh();
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
        assert!(subscriptions.lock(&a).await.is_fresh(), "the state outlives the turn");
    }

    #[tokio::test]
    async fn locks_last_only_for_their_turns_and_fresh_conversations_stay_until_taken() {
        let subscriptions = Subscriptions::default();
        let (a, b) = (ConversationKey::for_test("t", "a"), ConversationKey::for_test("t", "b"));
        subscriptions.lock(&a).await.mark_fresh();
        drop(subscriptions.lock(&b).await);
        assert_eq!((subscriptions.locks.len(), subscriptions.fresh.len()), (0, 1));
        let turn = subscriptions.lock(&a).await;
        assert!(turn.is_fresh());
        assert!(turn.take_fresh());
        assert!(!turn.take_fresh(), "taken once");
        drop(turn);
        assert_eq!((subscriptions.locks.len(), subscriptions.fresh.len()), (0, 0));
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
        assert_eq!(subscriptions.locks.len(), 0);
        // Given up after the turn ended, before it ran (the turn seemed wanted when it ended).
        let first = subscriptions.lock(&a).await;
        let mut waiter = Box::pin(subscriptions.lock(&a));
        assert!(futures::poll!(&mut waiter).is_pending());
        drop(first);
        drop(waiter);
        assert_eq!(subscriptions.locks.len(), 0);
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
        assert_eq!(subscriptions.locks.len(), 0);
    }
}
