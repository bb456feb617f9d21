//! The in-memory backend: one node, no Redis; the embedded default.
//!
//! Each conversation's log sits behind its own `std::sync::Mutex`. Append
//! assigns the seq, stores the event and hands it to the [`Router`] under
//! that lock, so events reach sockets in seq order; the lock is never held
//! across an `.await` (delivery only does non-blocking `try_send`s).
//! `attach` takes the same lock to snapshot the log and join the router, so
//! a new session cannot miss an event appended in between.
//!
//! Logs are capped at `log_cap` events. A user who comes back after
//! `idle_window` gets a new conversation; the old one stays readable by id
//! until it has had no socket and no activity for `retention`: then the
//! [`MemoryBackend::run_sweeper`] task forgets it, as Redis expires its keys.
//! Without that a long-running node would keep every conversation it ever
//! saw.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Appended, Backend, BackendError, NewEvent, Snapshot, StoredEvent, now_ms};
use crate::ids::{ConversationId, ConversationKey, SessionId, TenantId, UserId, generate_token};
use crate::protocol::Role;
use crate::router::{Router, SessionHandle};

#[derive(Debug)]
pub struct MemoryBackend {
    router: Arc<Router>,
    /// foldhash (seeded per process): looked up on every append.
    conversations: DashMap<ConversationKey, Arc<Mutex<ConversationLog>>, foldhash::fast::RandomState>,
    /// Each user's most recent conversation and when they were last active in it.
    latest: DashMap<(TenantId, UserId), Latest>,
    log_cap: usize,
    idle_window: Duration,
    retention: Duration,
}

/// How often the sweeper looks for conversations past their retention.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Latest {
    conversation: ConversationId,
    last_active_ms: u64,
}

#[derive(Debug)]
struct ConversationLog {
    user: UserId,
    epoch: String,
    last_seq: u64,
    /// Last open, attach, detach or append; retention counts from here.
    last_active_ms: u64,
    /// The newest `log_cap` events, oldest first.
    events: VecDeque<Arc<StoredEvent>>,
    /// Seq of each customer message in `events`, by client message id: a
    /// resent message is found without scanning the log.
    customer_ids: HashMap<String, u64>,
}

impl MemoryBackend {
    pub fn new(router: Arc<Router>, log_cap: usize, idle_window: Duration, retention: Duration) -> Self {
        Self { router, conversations: DashMap::default(), latest: DashMap::new(), log_cap, idle_window, retention }
    }

    /// Forgets expired conversations every [`SWEEP_INTERVAL`] until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let forgotten = self.sweep(now_ms());
                    if forgotten > 0 {
                        debug!(forgotten, "conversations past their retention forgotten");
                        metrics::counter!("fengda_hub_conversations_expired_total").increment(forgotten as u64);
                    }
                }
            }
        }
    }

    /// Forgets the conversations that have had no socket on them and no
    /// activity since `retention` before `now_ms`, and users' pointers to
    /// them. Returns how many conversations went.
    fn sweep(&self, now_ms: u64) -> usize {
        let cutoff = now_ms.saturating_sub(self.retention.as_millis() as u64);
        let mut forgotten = 0;
        self.conversations.retain(|key, log| {
            let keep = lock(log).last_active_ms > cutoff || self.router.local_sessions(key) > 0;
            forgotten += usize::from(!keep);
            keep
        });
        self.latest.retain(|(tenant, _), latest| {
            let key = ConversationKey { tenant: tenant.clone(), conversation: latest.conversation.clone() };
            self.conversations.contains_key(&key)
        });
        forgotten
    }

    /// Marks a conversation active now; false if it no longer exists.
    fn touch_log(&self, key: &ConversationKey) -> bool {
        match self.conversations.get(key) {
            Some(log) => {
                lock(&log).last_active_ms = now_ms();
                true
            }
            None => false,
        }
    }

    fn create(&self, tenant: &TenantId, user: &UserId) -> ConversationId {
        let conversation = ConversationId::generate();
        let key = ConversationKey { tenant: tenant.clone(), conversation: conversation.clone() };
        let log = ConversationLog {
            user: user.clone(),
            epoch: generate_token(),
            last_seq: 0,
            last_active_ms: now_ms(),
            events: VecDeque::new(),
            customer_ids: HashMap::new(),
        };
        self.conversations.insert(key, Arc::new(Mutex::new(log)));
        conversation
    }

    fn log(&self, key: &ConversationKey) -> Result<Arc<Mutex<ConversationLog>>, BackendError> {
        self.conversations.get(key).map(|log| log.clone()).ok_or(BackendError::ConversationNotFound)
    }
}

fn lock(log: &Mutex<ConversationLog>) -> std::sync::MutexGuard<'_, ConversationLog> {
    // A panic while holding the lock cannot leave the log half-written (every
    // mutation is a single push or pop), so a poisoned lock is still usable.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn open(
        &self,
        tenant: &TenantId,
        user: &UserId,
        requested: Option<&ConversationId>,
    ) -> Result<ConversationKey, BackendError> {
        if let Some(conversation) = requested {
            let key = ConversationKey { tenant: tenant.clone(), conversation: conversation.clone() };
            let owned = self.conversations.get(&key).is_some_and(|log| {
                let mut log = lock(&log);
                let owned = log.user == *user;
                if owned {
                    log.last_active_ms = now_ms();
                }
                owned
            });
            if !owned {
                return Err(BackendError::ConversationNotFound);
            }
            self.latest.insert(
                (tenant.clone(), user.clone()),
                Latest { conversation: conversation.clone(), last_active_ms: now_ms() },
            );
            return Ok(key);
        }
        let now = now_ms();
        let idle_window = self.idle_window.as_millis() as u64;
        let mut latest = self
            .latest
            .entry((tenant.clone(), user.clone()))
            .or_insert_with(|| Latest { conversation: self.create(tenant, user), last_active_ms: now });
        let key = ConversationKey { tenant: tenant.clone(), conversation: latest.conversation.clone() };
        // A conversation the sweeper forgot starts over, like an idle one.
        if now.saturating_sub(latest.last_active_ms) > idle_window || !self.touch_log(&key) {
            latest.conversation = self.create(tenant, user);
        }
        latest.last_active_ms = now;
        Ok(ConversationKey { tenant: tenant.clone(), conversation: latest.conversation.clone() })
    }

    async fn attach(
        &self,
        key: &ConversationKey,
        session: SessionHandle,
        after: Option<u64>,
    ) -> Result<Snapshot, BackendError> {
        let log = self.log(key)?;
        let mut log = lock(&log);
        log.last_active_ms = now_ms();
        self.router.join(key, session).map_err(|_| BackendError::TooManySockets)?;
        let missed = match after {
            Some(after) => log.events.iter().filter(|e| e.seq > after).cloned().collect(),
            None => Vec::new(),
        };
        Ok(Snapshot { last_seq: log.last_seq, epoch: log.epoch.clone(), missed })
    }

    async fn detach(&self, key: &ConversationKey, session: SessionId) {
        self.router.leave(key, session);
        let _ = self.touch_log(key);
    }

    async fn has_listeners(&self, key: &ConversationKey) -> bool {
        self.router.local_sessions(key) > 0
    }

    async fn touch(&self, user: &UserId, key: &ConversationKey) {
        if let Some(mut latest) = self.latest.get_mut(&(key.tenant.clone(), user.clone()))
            && latest.conversation == key.conversation
        {
            latest.last_active_ms = now_ms();
        }
    }

    async fn events_after(&self, key: &ConversationKey, after: u64) -> Result<Vec<Arc<StoredEvent>>, BackendError> {
        let log = self.log(key)?;
        let log = lock(&log);
        Ok(log.events.iter().filter(|e| e.seq > after).cloned().collect())
    }

    async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        origin: Option<SessionId>,
    ) -> Result<Appended, BackendError> {
        let log = self.log(key)?;
        let mut log = lock(&log);
        if event.from == Role::Customer
            && let Some(&seq) = log.customer_ids.get(&event.id)
        {
            return Ok(Appended::Duplicate(seq));
        }
        let event_timing = event.timing;
        let now = now_ms();
        log.last_seq += 1;
        log.last_active_ms = now;
        let stored = Arc::new(event.stored(log.last_seq, now));
        if stored.from == Role::Customer {
            log.customer_ids.insert(stored.id.clone(), stored.seq);
        }
        log.events.push_back(stored.clone());
        while log.events.len() > self.log_cap {
            if let Some(old) = log.events.pop_front()
                && old.from == Role::Customer
            {
                log.customer_ids.remove(&old.id);
            }
        }
        self.router.deliver_event(key, &stored, origin, event_timing.as_ref());
        Ok(Appended::New(stored.seq))
    }

    async fn recent_turns(&self, key: &ConversationKey, limit: usize) -> Result<Vec<Arc<StoredEvent>>, BackendError> {
        let log = self.log(key)?;
        let log = lock(&log);
        let mut turns: Vec<_> =
            log.events.iter().rev().filter(|e| e.from != Role::System).take(limit).cloned().collect();
        turns.reverse();
        Ok(turns)
    }

    fn publish_ephemeral(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>) {
        self.router.deliver_frames(key, frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(log_cap: usize) -> MemoryBackend {
        MemoryBackend::new(Arc::new(Router::default()), log_cap, Duration::from_secs(60), Duration::from_secs(3600))
    }

    #[tokio::test]
    async fn a_resent_message_is_a_duplicate_while_it_is_in_the_log() {
        let backend = backend(3);
        let key = backend.open(&TenantId::parse("t").unwrap(), &UserId::parse("u").unwrap(), None).await.unwrap();
        let send = |id: &str| backend.append(&key, NewEvent::customer(id.into(), "hi".into()), None);
        assert_eq!(send("m1").await.unwrap(), Appended::New(1));
        assert_eq!(send("m2").await.unwrap(), Appended::New(2));
        assert_eq!(send("m1").await.unwrap(), Appended::Duplicate(1));
        // An assistant event with a customer's id is not a customer message.
        let reply = NewEvent { from: Role::Assistant, ..NewEvent::customer("m2".into(), "answer".into()) };
        assert_eq!(backend.append(&key, reply, None).await.unwrap(), Appended::New(3));
        assert_eq!(send("m2").await.unwrap(), Appended::Duplicate(2));
        // m1 and m2 fall out of the capped log; m1 is new again, m4's index entry stays.
        assert_eq!(send("m4").await.unwrap(), Appended::New(4));
        assert_eq!(send("m5").await.unwrap(), Appended::New(5));
        assert_eq!(send("m1").await.unwrap(), Appended::New(6));
        assert_eq!(send("m4").await.unwrap(), Appended::Duplicate(4));
        let ids: Vec<_> = backend.events_after(&key, 0).await.unwrap().iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, ["m4", "m5", "m1"]);
    }

    #[tokio::test]
    async fn conversations_past_their_retention_are_forgotten_unless_a_socket_is_open() {
        let backend = backend(10);
        let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
        let idle = backend.open(&tenant, &user, None).await.unwrap();
        backend.append(&idle, NewEvent::customer("m1".into(), "hi".into()), None).await.unwrap();
        let watched = backend.open(&tenant, &UserId::parse("w").unwrap(), None).await.unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let closer = crate::router::SessionCloser::child_of(&CancellationToken::new());
        let session = SessionHandle { id: SessionId::next(), tx, closer };
        backend.attach(&watched, session, None).await.unwrap();

        // Within the hour nothing goes.
        assert_eq!(backend.sweep(now_ms() + 59 * 60 * 1000), 0);
        assert_eq!(backend.events_after(&idle, 0).await.unwrap().len(), 1);
        // Past it, the idle conversation and the user's pointer to it go; the watched one stays.
        assert_eq!(backend.sweep(now_ms() + 61 * 60 * 1000), 1);
        assert!(matches!(backend.events_after(&idle, 0).await, Err(BackendError::ConversationNotFound)));
        assert!(matches!(
            backend.open(&tenant, &user, Some(&idle.conversation)).await,
            Err(BackendError::ConversationNotFound)
        ));
        assert!(backend.events_after(&watched, 0).await.is_ok());
        // The user starts a new conversation, not a dangling one.
        let fresh = backend.open(&tenant, &user, None).await.unwrap();
        assert_ne!(fresh, idle);
        assert!(backend.events_after(&fresh, 0).await.is_ok());
    }
}
