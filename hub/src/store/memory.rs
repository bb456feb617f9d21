//! The in-memory store: one node, no Redis; the embedded default.
//!
//! Each conversation's log sits behind its own `std::sync::Mutex`. Append
//! assigns the seq, stores the event and hands it to the [`FanOut`] under
//! that lock, so events reach sockets in seq order; the lock is never held
//! across an `.await` (delivery only does non-blocking `try_send`s).
//! `attach` takes the same lock to snapshot the log and join the fan-out, so
//! a new session cannot miss an event appended in between.
//!
//! Logs are capped at `log_cap` events. A user who comes back after
//! `idle_window` gets a new conversation; the old one stays readable by id
//! until it has had no socket and no activity for `retention`: then the
//! [`MemoryStore::run_sweeper`] task forgets it, as Redis expires its keys.
//! Without that a long-running node would keep every conversation it ever
//! saw. A conversation enters the map with its first message (see
//! [`Pending`]); a socket that never sends one leaves only its fan-out entry,
//! which goes with it.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Appended, ConversationStore, NewEvent, Opened, Pending, Snapshot, StoreError, StoredEvent, now_ms};
use crate::config::{ConversationConfig, CreationLimit};
use crate::fanout::{FanOut, SessionHandle};
use crate::ids::{ConversationId, ConversationKey, SessionId, TenantId, UserId};
use crate::protocol::Role;

#[derive(Debug)]
pub struct MemoryStore {
    fanout: Arc<FanOut>,
    /// foldhash (seeded per process): looked up on every append.
    conversations: DashMap<ConversationKey, Arc<Mutex<ConversationLog>>, foldhash::fast::RandomState>,
    /// Each user's most recent conversation and when they were last active in it.
    latest: DashMap<(TenantId, UserId), Latest>,
    /// When each user created their conversations within the creation
    /// window, oldest first (only users with a recent creation have an entry).
    created: DashMap<(TenantId, UserId), VecDeque<u64>, RandomState>,
    log_cap: usize,
    idle_window: Duration,
    retention: Duration,
    creation_limit: Option<CreationLimit>,
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

impl MemoryStore {
    pub fn new(fanout: Arc<FanOut>, config: &ConversationConfig) -> Self {
        Self {
            fanout,
            conversations: DashMap::default(),
            latest: DashMap::new(),
            created: DashMap::default(),
            log_cap: config.log_cap,
            idle_window: Duration::from_millis(config.idle_window_ms),
            retention: Duration::from_secs(config.retention_secs),
            creation_limit: config.creation_limit(),
        }
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
                        metrics::counter!(crate::metric::CONVERSATIONS_EXPIRED).increment(forgotten as u64);
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
            let keep = lock(log).last_active_ms > cutoff || self.fanout.local_sessions(key) > 0;
            forgotten += usize::from(!keep);
            keep
        });
        self.latest.retain(|(tenant, _), latest| {
            let key = ConversationKey { tenant: tenant.clone(), conversation: latest.conversation.clone() };
            self.conversations.contains_key(&key)
        });
        if let Some(limit) = self.creation_limit {
            let window = limit.window.as_millis() as u64;
            self.created.retain(|_, times| times.back().is_some_and(|at| now_ms.saturating_sub(*at) < window));
        }
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

    /// The log to append to; with `create`, a missing one is created (within
    /// the user's creation cap) and becomes the user's most recent.
    fn log_or_create(
        &self,
        key: &ConversationKey,
        create: &Pending,
    ) -> Result<Arc<Mutex<ConversationLog>>, StoreError> {
        let vacant = match self.conversations.entry(key.clone()) {
            Entry::Occupied(existing) => {
                let log = existing.get().clone();
                drop(existing);
                let ours = {
                    let log = lock(&log);
                    log.user == create.user && log.epoch == create.epoch
                };
                return if ours { Ok(log) } else { Err(StoreError::ConversationNotFound) };
            }
            Entry::Vacant(vacant) => vacant,
        };
        self.count_creation(&key.tenant, &create.user)?;
        let now = now_ms();
        let log = ConversationLog {
            user: create.user.clone(),
            epoch: create.epoch.clone(),
            last_seq: 0,
            last_active_ms: now,
            events: VecDeque::new(),
            customer_ids: HashMap::new(),
        };
        let log = vacant.insert(Arc::new(Mutex::new(log))).clone();
        self.latest.insert(
            (key.tenant.clone(), create.user.clone()),
            Latest { conversation: key.conversation.clone(), last_active_ms: now },
        );
        Ok(log)
    }

    /// Counts one creation against the user's cap, or refuses it.
    fn count_creation(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let Some(limit) = self.creation_limit else {
            return Ok(());
        };
        let now = now_ms();
        let window = limit.window.as_millis() as u64;
        let mut times = self.created.entry((tenant.clone(), user.clone())).or_default();
        while times.front().is_some_and(|at| now.saturating_sub(*at) >= window) {
            times.pop_front();
        }
        if times.len() >= limit.max as usize {
            return Err(StoreError::TooManyConversations { max: limit.max, window_secs: limit.window.as_secs() });
        }
        times.push_back(now);
        Ok(())
    }

    fn log(&self, key: &ConversationKey) -> Result<Arc<Mutex<ConversationLog>>, StoreError> {
        self.conversations.get(key).map(|log| log.clone()).ok_or(StoreError::ConversationNotFound)
    }
}

fn lock(log: &Mutex<ConversationLog>) -> std::sync::MutexGuard<'_, ConversationLog> {
    // A panic while holding the lock cannot leave the log half-written (every
    // mutation is a single push or pop), so a poisoned lock is still usable.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl ConversationStore for MemoryStore {
    async fn open(
        &self,
        tenant: &TenantId,
        user: &UserId,
        requested: Option<&ConversationId>,
    ) -> Result<Opened, StoreError> {
        let now = now_ms();
        if let Some(conversation) = requested {
            let key = ConversationKey { tenant: tenant.clone(), conversation: conversation.clone() };
            let owned = self.conversations.get(&key).is_some_and(|log| {
                let mut log = lock(&log);
                let owned = log.user == *user;
                if owned {
                    log.last_active_ms = now;
                }
                owned
            });
            if !owned {
                return Err(StoreError::ConversationNotFound);
            }
            self.latest.insert(
                (tenant.clone(), user.clone()),
                Latest { conversation: conversation.clone(), last_active_ms: now },
            );
            return Ok(Opened { key, pending: None });
        }
        let idle_window = self.idle_window.as_millis() as u64;
        let recent = self.latest.get_mut(&(tenant.clone(), user.clone())).and_then(|mut latest| {
            if now.saturating_sub(latest.last_active_ms) > idle_window {
                return None;
            }
            latest.last_active_ms = now;
            Some(latest.conversation.clone())
        });
        match recent {
            Some(conversation) => {
                let key = ConversationKey { tenant: tenant.clone(), conversation };
                // A log the sweeper forgot meanwhile starts again under the same id.
                let pending = (!self.touch_log(&key)).then(|| Pending::new(user));
                Ok(Opened { key, pending })
            }
            None => {
                let key = ConversationKey { tenant: tenant.clone(), conversation: ConversationId::generate() };
                Ok(Opened { key, pending: Some(Pending::new(user)) })
            }
        }
    }

    async fn attach(
        &self,
        key: &ConversationKey,
        session: SessionHandle,
        after: Option<u64>,
        pending: Option<&Pending>,
    ) -> Result<Snapshot, StoreError> {
        // The entry's lock orders this against a creating append: the
        // session joins either before the first event or after the log exists.
        let log = match self.conversations.entry(key.clone()) {
            Entry::Occupied(log) => log.get().clone(),
            Entry::Vacant(_) => {
                let Some(pending) = pending else {
                    return Err(StoreError::ConversationNotFound);
                };
                self.fanout.join(key, session).map_err(|_| StoreError::TooManySockets)?;
                return Ok(Snapshot { exists: false, last_seq: 0, epoch: pending.epoch.clone(), missed: Vec::new() });
            }
        };
        let mut log = lock(&log);
        log.last_active_ms = now_ms();
        self.fanout.join(key, session).map_err(|_| StoreError::TooManySockets)?;
        let missed = match after {
            Some(after) => log.events.iter().filter(|e| e.seq > after).cloned().collect(),
            None => Vec::new(),
        };
        Ok(Snapshot { exists: true, last_seq: log.last_seq, epoch: log.epoch.clone(), missed })
    }

    async fn detach(&self, key: &ConversationKey, session: SessionId) {
        self.fanout.leave(key, session);
        let _ = self.touch_log(key);
    }

    async fn has_listeners(&self, key: &ConversationKey) -> bool {
        self.fanout.local_sessions(key) > 0
    }

    async fn touch(&self, user: &UserId, key: &ConversationKey) {
        if let Some(mut latest) = self.latest.get_mut(&(key.tenant.clone(), user.clone()))
            && latest.conversation == key.conversation
        {
            latest.last_active_ms = now_ms();
        }
    }

    async fn events_after(&self, key: &ConversationKey, after: u64) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let log = self.log(key)?;
        let log = lock(&log);
        Ok(log.events.iter().filter(|e| e.seq > after).cloned().collect())
    }

    async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        origin: Option<SessionId>,
        create: Option<&Pending>,
    ) -> Result<Appended, StoreError> {
        let log = match create {
            Some(create) => self.log_or_create(key, create)?,
            None => self.log(key)?,
        };
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
        self.fanout.deliver_event(key, &stored, origin, event_timing.as_ref());
        Ok(Appended::New(stored.seq))
    }

    async fn recent_turns(&self, key: &ConversationKey, limit: usize) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let log = self.log(key)?;
        let log = lock(&log);
        let mut turns: Vec<_> =
            log.events.iter().rev().filter(|e| e.from != Role::System).take(limit).cloned().collect();
        turns.reverse();
        Ok(turns)
    }

    fn publish_ephemeral(&self, key: &ConversationKey, frames: Vec<Utf8Bytes>) {
        self.fanout.deliver_frames(key, frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(log_cap: usize, max_created_per_user: u32) -> ConversationConfig {
        ConversationConfig {
            log_cap,
            idle_window_ms: 60_000,
            retention_secs: 3600,
            max_created_per_user,
            ..ConversationConfig::default()
        }
    }

    fn backend(log_cap: usize) -> MemoryStore {
        MemoryStore::new(Arc::new(FanOut::default()), &config(log_cap, 20))
    }

    fn session() -> (SessionHandle, tokio::sync::mpsc::Receiver<Box<crate::fanout::Outbound>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let closer = crate::fanout::SessionCloser::child_of(&CancellationToken::new());
        (SessionHandle { id: SessionId::next(), tx, closer }, rx)
    }

    /// Opens a new conversation for `user` and stores a first message in it.
    async fn started(backend: &MemoryStore, tenant: &TenantId, user: &UserId) -> ConversationKey {
        let opened = backend.open(tenant, user, None).await.unwrap();
        let first = NewEvent::customer("m0".into(), "hi".into());
        backend.append(&opened.key, first, None, opened.pending.as_ref()).await.unwrap();
        opened.key
    }

    #[tokio::test]
    async fn a_resent_message_is_a_duplicate_while_it_is_in_the_log() {
        let backend = backend(3);
        let opened = backend.open(&TenantId::parse("t").unwrap(), &UserId::parse("u").unwrap(), None).await.unwrap();
        let key = opened.key;
        let first = NewEvent::customer("m1".into(), "hi".into());
        assert_eq!(backend.append(&key, first, None, opened.pending.as_ref()).await.unwrap(), Appended::New(1));
        let send = |id: &str| backend.append(&key, NewEvent::customer(id.into(), "hi".into()), None, None);
        assert_eq!(send("m2").await.unwrap(), Appended::New(2));
        assert_eq!(send("m1").await.unwrap(), Appended::Duplicate(1));
        // An assistant event with a customer's id is not a customer message.
        let reply = NewEvent { from: Role::Assistant, ..NewEvent::customer("m2".into(), "answer".into()) };
        assert_eq!(backend.append(&key, reply, None, None).await.unwrap(), Appended::New(3));
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
    async fn a_socket_that_never_sends_leaves_nothing_behind() {
        let backend = backend(10);
        let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
        for _ in 0..3 {
            let opened = backend.open(&tenant, &user, None).await.unwrap();
            let pending = opened.pending.expect("a new conversation is pending");
            let (handle, _rx) = session();
            let id = handle.id;
            let snapshot = backend.attach(&opened.key, handle, Some(0), Some(&pending)).await.unwrap();
            assert_eq!(
                (snapshot.exists, snapshot.last_seq, snapshot.epoch.as_str()),
                (false, 0, pending.epoch.as_str())
            );
            // Not resumable by id: it does not exist.
            let resumed = backend.open(&tenant, &user, Some(&opened.key.conversation)).await;
            assert!(matches!(resumed, Err(StoreError::ConversationNotFound)));
            backend.detach(&opened.key, id).await;
            backend.touch(&user, &opened.key).await;
        }
        assert_eq!((backend.conversations.len(), backend.latest.len(), backend.created.len()), (0, 0, 0));
        assert_eq!(
            backend.fanout.local_sessions(&ConversationKey { tenant, conversation: ConversationId::generate() }),
            0
        );
    }

    #[tokio::test]
    async fn the_first_message_creates_the_conversation_with_the_announced_epoch() {
        let backend = backend(10);
        let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
        let opened = backend.open(&tenant, &user, None).await.unwrap();
        let pending = opened.pending.clone().unwrap();
        // Another user cannot take it over by naming it, nor create it with another epoch.
        let thief = Pending::new(&UserId::parse("mallory").unwrap());
        let key = started(&backend, &tenant, &user).await;
        assert_ne!(key, opened.key, "the second open got its own new id: nothing pointed to the first");
        let first = NewEvent::customer("m1".into(), "hi".into());
        assert_eq!(backend.append(&opened.key, first.clone(), None, Some(&pending)).await.unwrap(), Appended::New(1));
        let stolen = backend.append(&opened.key, first.clone(), None, Some(&thief)).await;
        assert!(matches!(stolen, Err(StoreError::ConversationNotFound)));
        // The creator's resend (its first ack lost) is recognised.
        assert_eq!(backend.append(&opened.key, first, None, Some(&pending)).await.unwrap(), Appended::Duplicate(1));
        let (handle, _rx) = session();
        let snapshot = backend.attach(&opened.key, handle, None, None).await.unwrap();
        assert_eq!((snapshot.exists, snapshot.last_seq, snapshot.epoch), (true, 1, pending.epoch));
        // The latest created conversation is the user's most recent.
        assert_eq!(backend.open(&tenant, &user, None).await.unwrap().key, opened.key);
    }

    #[tokio::test]
    async fn creations_beyond_the_cap_are_refused_for_that_user_only() {
        let backend = MemoryStore::new(Arc::new(FanOut::default()), &config(10, 2));
        let tenant = TenantId::parse("t").unwrap();
        let (greedy, other) = (UserId::parse("greedy").unwrap(), UserId::parse("other").unwrap());
        for _ in 0..2 {
            let opened = backend.open(&tenant, &greedy, None).await.unwrap();
            let first = NewEvent::customer("m1".into(), "hi".into());
            backend.append(&opened.key, first, None, opened.pending.as_ref()).await.unwrap();
            backend.latest.clear(); // as if the idle window had passed
        }
        let opened = backend.open(&tenant, &greedy, None).await.unwrap();
        let first = NewEvent::customer("m1".into(), "hi".into());
        let refused = backend.append(&opened.key, first, None, opened.pending.as_ref()).await;
        assert!(matches!(refused, Err(StoreError::TooManyConversations { max: 2, window_secs: 3600 })), "{refused:?}");
        assert!(matches!(backend.events_after(&opened.key, 0).await, Err(StoreError::ConversationNotFound)));
        started(&backend, &tenant, &other).await;
        // Past the window the user may create again, and the sweeper forgets the count.
        assert_eq!(backend.created.len(), 2);
        backend.sweep(now_ms() + 3_600_001);
        assert_eq!(backend.created.len(), 0);
    }

    #[tokio::test]
    async fn conversations_past_their_retention_are_forgotten_unless_a_socket_is_open() {
        let backend = backend(10);
        let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
        let idle = started(&backend, &tenant, &user).await;
        let watched = started(&backend, &tenant, &UserId::parse("w").unwrap()).await;
        let (handle, _rx) = session();
        backend.attach(&watched, handle, None, None).await.unwrap();

        // Within the hour nothing goes.
        assert_eq!(backend.sweep(now_ms() + 59 * 60 * 1000), 0);
        assert_eq!(backend.events_after(&idle, 0).await.unwrap().len(), 1);
        // Past it, the idle conversation and the user's pointer to it go; the watched one stays.
        assert_eq!(backend.sweep(now_ms() + 61 * 60 * 1000), 1);
        assert!(matches!(backend.events_after(&idle, 0).await, Err(StoreError::ConversationNotFound)));
        assert!(matches!(
            backend.open(&tenant, &user, Some(&idle.conversation)).await,
            Err(StoreError::ConversationNotFound)
        ));
        assert!(backend.events_after(&watched, 0).await.is_ok());
        // The user starts a new conversation, not a dangling one.
        let fresh = started(&backend, &tenant, &user).await;
        assert_ne!(fresh, idle);
        assert!(backend.events_after(&fresh, 0).await.is_ok());
    }
}
