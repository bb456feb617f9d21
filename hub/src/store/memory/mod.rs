//! The in-memory log: one node, no Redis; the embedded default.
//!
//! Each conversation's log sits behind its own `std::sync::Mutex`, never
//! held across an `.await`: append assigns the seq and stores the event
//! under it.
//!
//! Logs are capped at `log_cap` events. A user who comes back after
//! `idle_window` gets a new conversation; the old one stays readable by id
//! until it has had no socket and no activity for `retention`: then the
//! [`MemoryLog::run_sweeper`] task forgets it, as Redis expires its keys.
//! Without that a long-running node would keep every conversation it ever
//! saw (a conversation with a socket open on the node is kept). A
//! conversation enters the map with its first message (see [`Pending`]); a
//! socket that never sends one leaves only its fan-out entry, which goes
//! with it.

mod users;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use users::Users;

use super::{
    AppendWith, Appended, ConversationLog, LogEpoch, LogSummary, NOTE_IDS_CHECKED, NewEvent, NoteAdded, NoteLog,
    Opened, OwnerOp, Pending, Snapshot, StoreError, StoredEvent, StoredNote, now_ms,
};
use crate::config::ConversationConfig;
use crate::event::dedup_key;
use crate::fanout::FanOut;
use crate::ids::{ConversationId, ConversationKey, Party, TenantId, UserId};
use crate::owner::{Owner, Ownership};
use crate::protocol::Role;

#[derive(Debug)]
pub struct MemoryLog {
    /// foldhash (seeded per process): looked up on every append.
    conversations: DashMap<ConversationKey, Arc<Mutex<Conversation>>, foldhash::fast::RandomState>,
    /// Which conversation each user comes back to, and their creations.
    users: Users,
    log_cap: usize,
    retention: Duration,
}

/// How often the sweeper looks for conversations past their retention.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Conversation {
    user: UserId,
    epoch: String,
    last_seq: u64,
    /// Last open, attach, detach or append; retention counts from here.
    last_active_ms: u64,
    /// The newest `log_cap` events, oldest first.
    events: VecDeque<Arc<StoredEvent>>,
    /// Seq of each customer's and agent's message in `events`, by
    /// [`dedup_key`]: a resent message is found without scanning the log.
    message_ids: HashMap<String, u64>,
    /// Who answers it.
    ownership: Ownership,
    /// Agents' notes, the newest `log_cap`, oldest first.
    notes: VecDeque<Arc<StoredNote>>,
    /// The seq of the last note written.
    last_note: u64,
    /// When the customer last wrote.
    customer_at: Option<u64>,
}

impl MemoryLog {
    pub fn new(config: &ConversationConfig) -> Self {
        Self {
            conversations: DashMap::default(),
            users: Users::new(config),
            log_cap: config.log_cap,
            retention: Duration::from_secs(config.retention_secs),
        }
    }

    /// Forgets expired conversations every [`SWEEP_INTERVAL`] until
    /// `shutdown`, but none that has a socket in `fanout`.
    pub async fn run_sweeper(self: Arc<Self>, fanout: Arc<FanOut>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let forgotten = self.sweep(now_ms(), |key| fanout.local_sessions(key) > 0);
                    if forgotten > 0 {
                        debug!(forgotten, "conversations past their retention forgotten");
                        metrics::counter!(crate::metric::CONVERSATIONS_EXPIRED).increment(forgotten as u64);
                    }
                }
            }
        }
    }

    /// Forgets the conversations that are not `watched` (no socket on them)
    /// and have had no activity since `retention` before `now_ms`, and
    /// users' pointers to them. Returns how many conversations went.
    fn sweep(&self, now_ms: u64, watched: impl Fn(&ConversationKey) -> bool) -> usize {
        let cutoff = now_ms.saturating_sub(self.retention.as_millis() as u64);
        let mut forgotten = 0;
        self.conversations.retain(|key, log| {
            let keep = lock(log).last_active_ms > cutoff || watched(key);
            forgotten += usize::from(!keep);
            keep
        });
        self.users.sweep(now_ms, |key| self.conversations.contains_key(key));
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
    fn log_or_create(&self, key: &ConversationKey, create: &Pending) -> Result<Arc<Mutex<Conversation>>, StoreError> {
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
        self.users.count_creation(key.tenant(), &create.user)?;
        let now = now_ms();
        let log = Conversation {
            user: create.user.clone(),
            epoch: create.epoch.clone(),
            last_seq: 0,
            last_active_ms: now,
            events: VecDeque::new(),
            message_ids: HashMap::new(),
            ownership: Ownership::default(),
            notes: VecDeque::new(),
            last_note: 0,
            customer_at: None,
        };
        let log = vacant.insert(Arc::new(Mutex::new(log))).clone();
        self.users.point(key.tenant(), &create.user, key.conversation(), now);
        Ok(log)
    }

    fn log(&self, key: &ConversationKey) -> Result<Arc<Mutex<Conversation>>, StoreError> {
        self.conversations.get(key).map(|log| log.clone()).ok_or(StoreError::ConversationNotFound)
    }
}

fn lock(log: &Mutex<Conversation>) -> std::sync::MutexGuard<'_, Conversation> {
    // A panic while holding the lock cannot leave the log half-written (every
    // mutation is a single push or pop), so a poisoned lock is still usable.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl NoteLog for MemoryLog {
    async fn add_note(&self, key: &ConversationKey, note: StoredNote) -> Result<NoteAdded, StoreError> {
        let log = self.log(key)?;
        let mut log = lock(&log);
        let resend = |stored: &&Arc<StoredNote>| stored.id == note.id && stored.agent == note.agent;
        if let Some(stored) = log.notes.iter().rev().take(NOTE_IDS_CHECKED).find(resend) {
            return Ok(NoteAdded::Duplicate(stored.clone()));
        }
        log.last_note += 1;
        let note = Arc::new(StoredNote { seq: log.last_note, after: log.last_seq, at_ms: now_ms(), ..note });
        log.notes.push_back(note.clone());
        while log.notes.len() > self.log_cap {
            log.notes.pop_front();
        }
        Ok(NoteAdded::New(note))
    }

    async fn notes(&self, key: &ConversationKey) -> Result<Vec<Arc<StoredNote>>, StoreError> {
        let log = self.log(key)?;
        let log = lock(&log);
        Ok(log.notes.iter().cloned().collect())
    }
}

#[async_trait]
impl ConversationLog for MemoryLog {
    async fn open(&self, party: &Party, requested: Option<&ConversationId>) -> Result<Opened, StoreError> {
        let (tenant, user) = (&party.tenant, &party.user);
        let now = now_ms();
        if let Some(conversation) = requested {
            let key = party.conversation(conversation.clone());
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
            self.users.point(tenant, user, conversation, now);
            return Ok(Opened { key, pending: None });
        }
        match self.users.recent(tenant, user, now) {
            Some(conversation) => {
                let key = party.conversation(conversation);
                // A log the sweeper forgot meanwhile starts again under the same id.
                let pending = (!self.touch_log(&key)).then(|| Pending::lost(user));
                Ok(Opened { key, pending })
            }
            None => {
                let key = party.conversation(ConversationId::generate());
                Ok(Opened { key, pending: Some(Pending::fresh(user)) })
            }
        }
    }

    async fn snapshot(&self, key: &ConversationKey, after: Option<u64>) -> Result<Option<Snapshot>, StoreError> {
        let Some(log) = self.conversations.get(key).map(|log| log.clone()) else {
            return Ok(None);
        };
        let mut log = lock(&log);
        log.last_active_ms = now_ms();
        let missed = match after {
            Some(after) => log.events.iter().filter(|e| e.seq > after).cloned().collect(),
            None => Vec::new(),
        };
        Ok(Some(Snapshot {
            exists: true,
            last_seq: log.last_seq,
            epoch: log.epoch.clone(),
            missed,
            customer: Some(log.user.clone()),
            ownership: log.ownership.clone(),
        }))
    }

    async fn summary(&self, key: &ConversationKey) -> Result<Option<LogSummary>, StoreError> {
        let Some(log) = self.conversations.get(key).map(|log| log.clone()) else {
            return Ok(None);
        };
        let log = lock(&log);
        Ok(Some(LogSummary {
            customer: log.user.clone(),
            ownership: log.ownership.clone(),
            last: log.events.back().cloned(),
            customer_at: log.customer_at,
        }))
    }

    async fn active(&self, tenant: &TenantId, since_ms: u64, max: usize) -> Result<Vec<ConversationId>, StoreError> {
        // The whole map is scanned: one node's conversations, read only when
        // an agent lists.
        let mut active: Vec<(u64, ConversationId)> = self
            .conversations
            .iter()
            .filter(|entry| entry.key().tenant() == tenant)
            .filter_map(|entry| {
                let at = lock(entry.value()).events.back().map(|e| e.at_ms)?;
                (at >= since_ms).then(|| (at, entry.key().conversation().clone()))
            })
            .collect();
        active.sort_unstable_by(|a, b| b.cmp(a));
        Ok(active.into_iter().take(max).map(|(_, id)| id).collect())
    }

    async fn touch(&self, user: &UserId, key: &ConversationKey) {
        let _ = self.touch_log(key);
        self.users.touch(user, key);
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
        with: AppendWith<'_>,
    ) -> Result<Appended, StoreError> {
        let log = match with.create {
            Some(create) => self.log_or_create(key, create)?,
            None => self.log(key)?,
        };
        let appended = {
            let mut log = lock(&log);
            let dedup = dedup_key(event.from, &event.id, event.agent.as_deref()).map(std::borrow::Cow::into_owned);
            if let Some(&seq) = dedup.as_ref().and_then(|dedup| log.message_ids.get(dedup)) {
                return Ok(Appended::Duplicate(seq));
            }
            let now = now_ms();
            let mut event = event;
            match with.owner {
                OwnerOp::Any => {}
                OwnerOp::Fence { agent, epoch } => {
                    let ownership = &log.ownership;
                    if !ownership.owner.is_agent(agent) || epoch.is_some_and(|e| e != ownership.epoch) {
                        return Err(StoreError::OwnerChanged(ownership.clone()));
                    }
                }
                OwnerOp::Assistant { epoch } => {
                    let ownership = &log.ownership;
                    if ownership.owner != Owner::Assistant || ownership.epoch != epoch {
                        return Err(StoreError::OwnerChanged(ownership.clone()));
                    }
                }
                OwnerOp::Change { expected, to } => {
                    if log.ownership.epoch != expected {
                        return Err(StoreError::OwnerChanged(log.ownership.clone()));
                    }
                    log.ownership = Ownership { owner: to.clone(), epoch: expected + 1, since_ms: now };
                    event.owner_epoch = Some(expected + 1);
                }
            }
            let mut turns_before: Vec<_> =
                log.events.iter().rev().filter(|e| e.from != Role::System).take(with.turns_before).cloned().collect();
            turns_before.reverse();
            log.last_seq += 1;
            log.last_active_ms = now;
            let stored = Arc::new(event.stored(log.last_seq, now));
            if let Some(dedup) = dedup {
                log.message_ids.insert(dedup, stored.seq);
            }
            if stored.from == Role::Customer {
                log.customer_at = Some(now);
            }
            log.events.push_back(stored.clone());
            while log.events.len() > self.log_cap {
                if let Some(old) = log.events.pop_front()
                    && let Some(dedup) = dedup_key(old.from, &old.id, old.agent.as_deref())
                {
                    log.message_ids.remove(dedup.as_ref());
                }
            }
            Appended::New {
                event: stored,
                epoch: LogEpoch::of(&log.epoch),
                turns_before,
                ownership: log.ownership.clone(),
            }
        };
        if let Some(user) = with.active_user {
            self.users.touch(user, key);
        }
        Ok(appended)
    }
}

#[cfg(test)]
mod tests;
