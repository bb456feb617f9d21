//! How a node's bus subscriptions follow its sessions and reply holds,
//! through a bus whose subscribing can be made to fail.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::ConversationConfig;
use crate::fanout::SessionCloser;
use crate::presence::LocalBoard;
use crate::store::memory::MemoryLog;

/// A bus that knows which conversations it is subscribed to and counts
/// the changes asked of it, and fails every subscription while `failing`.
#[derive(Default)]
struct FlakyBus {
    failing: AtomicBool,
    subscribed: Mutex<HashSet<ConversationKey>>,
    subscribes: AtomicUsize,
    unsubscribes: AtomicUsize,
}

impl FlakyBus {
    fn is_subscribed(&self, key: &ConversationKey) -> bool {
        self.subscribed.lock().unwrap().contains(key)
    }
}

#[async_trait]
impl EventBus for FlakyBus {
    async fn subscribe(&self, key: &ConversationKey) -> Result<(), StoreError> {
        self.subscribes.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable("failing on purpose".into()));
        }
        self.subscribed.lock().unwrap().insert(key.clone());
        Ok(())
    }

    async fn subscribe_fresh(&self, key: &ConversationKey) -> Result<(), StoreError> {
        self.subscribe(key).await
    }

    async fn unsubscribe(&self, key: &ConversationKey) {
        self.unsubscribes.fetch_add(1, Ordering::Relaxed);
        self.subscribed.lock().unwrap().remove(key);
    }

    fn publish_frames(&self, _: &ConversationKey, _: &[Utf8Bytes], _: crate::event::OwnerEpoch) {}

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

fn session() -> SessionHandle {
    let (tx, _) = tokio::sync::mpsc::channel(8);
    SessionHandle::customer(SessionId::next(), tx, SessionCloser::child_of(&CancellationToken::new()))
}

/// A node on the memory log and a [`FlakyBus`], with one conversation that
/// has a log and no session on the node.
async fn node_with_a_conversation() -> (Conversations, Arc<FlakyBus>, ConversationKey) {
    let bus = Arc::new(FlakyBus::default());
    let log = Arc::new(MemoryLog::new(&ConversationConfig::default()));
    let conversations = Conversations::new(log, bus.clone(), Arc::new(FanOut::default()), Arc::new(LocalBoard));
    let party = Party { tenant: TenantId::parse("t").unwrap(), user: UserId::parse("u").unwrap() };
    let opened = conversations.open(&party, None).await.unwrap();
    let (key, pending) = (opened.key, opened.pending.expect("a new conversation"));
    let starter = session();
    conversations.attach(&key, starter.clone(), None, Some(&pending)).await.unwrap();
    let with = AppendWith { create: Some(&pending), ..AppendWith::default() };
    conversations.append(&key, NewEvent::customer("m1".into(), "hi".into()), None, with).await.unwrap();
    conversations.detach(&key, starter.id).await;
    assert!(!bus.is_subscribed(&key));
    (conversations, bus, key)
}

#[tokio::test]
async fn a_session_that_joins_a_conversation_whose_reply_could_not_subscribe_subscribes_it() {
    let (conversations, bus, key) = node_with_a_conversation().await;
    // A reply streams with no session here; subscribing it fails.
    bus.failing.store(true, Ordering::Relaxed);
    let takeover = CancellationToken::new();
    conversations
        .hold(&key, crate::event::OwnerEpoch { log: crate::event::LogEpoch::of("e"), epoch: 0 }, &takeover)
        .await;
    assert!(!bus.is_subscribed(&key));
    // A session joining now fails to subscribe too: it is refused, and
    // the next one tries again.
    let refused = session();
    assert!(conversations.attach(&key, refused.clone(), None, None).await.is_err());
    assert!(!conversations.has_session(&key, refused.id));
    bus.failing.store(false, Ordering::Relaxed);
    let customer = session();
    conversations.attach(&key, customer.clone(), None, None).await.unwrap();
    assert!(bus.is_subscribed(&key), "the session must hear other nodes");
    // The last of the reply and the session to leave unsubscribes it.
    conversations.unhold(&key, &takeover).await;
    assert!(bus.is_subscribed(&key));
    conversations.detach(&key, customer.id).await;
    assert!(!bus.is_subscribed(&key));
}

#[tokio::test]
async fn a_reply_that_could_not_subscribe_ends_alone_and_leaves_no_mark() {
    let (conversations, bus, key) = node_with_a_conversation().await;
    let counts = |bus: &FlakyBus| (bus.subscribes.load(Ordering::Relaxed), bus.unsubscribes.load(Ordering::Relaxed));
    let before = counts(&bus);
    bus.failing.store(true, Ordering::Relaxed);
    let takeover = CancellationToken::new();
    conversations
        .hold(&key, crate::event::OwnerEpoch { log: crate::event::LogEpoch::of("e"), epoch: 0 }, &takeover)
        .await;
    bus.failing.store(false, Ordering::Relaxed);
    // Unsubscribed all the same: a failed subscription may have left part
    // of itself behind (in Redis, the node's name among the listeners).
    conversations.unhold(&key, &takeover).await;
    assert_eq!(counts(&bus), (before.0 + 1, before.1 + 1));
    // No mark is left: the first session subscribes, the second does not.
    let (first, second) = (session(), session());
    conversations.attach(&key, first.clone(), None, None).await.unwrap();
    conversations.attach(&key, second.clone(), None, None).await.unwrap();
    assert_eq!(counts(&bus), (before.0 + 2, before.1 + 1));
    assert!(bus.is_subscribed(&key));
    conversations.detach(&key, first.id).await;
    conversations.detach(&key, second.id).await;
    assert_eq!(counts(&bus), (before.0 + 2, before.1 + 2));
    assert!(!bus.is_subscribed(&key));
}
