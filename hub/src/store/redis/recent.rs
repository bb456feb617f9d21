//! This node's copy of the last turns of each conversation it listens to,
//! so that a question's append need not read its history back from Redis.
//!
//! A question's append returns the turns before it (`append.lua` reads
//! them from the log list). While this node has sockets of a conversation
//! it keeps the last few events of its log here, with the log's epoch and
//! last seq, and hands the append that pair as a hint: the script reads the
//! turns only if the log is not at exactly that epoch and seq, and the hub
//! then takes the turns from here. The script is the judge: whatever this
//! copy believes, a log that moved on (another node appended, an event was
//! lost, the log was recreated) is read as before.
//!
//! The copy only ever holds events in seq order with no gap, ending at its
//! `last`, all of one log incarnation (`epoch`), exactly as the log holds
//! them. It learns them from what decides that for sure, this node's own
//! appends: an append whose answer shows the log was at this copy's epoch
//! and `last` extends it by the new event; one that read the turns replaces
//! it with them and the new event. Anything else empties it: an append that
//! moved past it without reading, an event another node appended past it
//! (this copy learns events only from this node's own appends), and anything that may have lost events (the subscription
//! dropped). A conversation is here from this node's first socket of it
//! (its subscription) to its last one.

use std::collections::VecDeque;
use std::sync::Arc;

use dashmap::DashMap;

use crate::event::StoredEvent;
use crate::ids::ConversationKey;
use crate::protocol::Role;

/// The recent turns of the conversations this node listens to.
pub(super) struct RecentTurns {
    conversations: DashMap<ConversationKey, Option<Known>, foldhash::fast::RandomState>,
    /// Events kept per conversation: `conversation.history_turns`, at most
    /// `conversation.log_cap` (the log holds no more).
    capacity: usize,
    /// `conversation.log_cap`: how many entries the log list holds at most.
    log_cap: usize,
}

/// What this node knows of a log's tail.
#[derive(Debug, Clone)]
struct Known {
    /// Shared with every hint given: no copy per append.
    epoch: Arc<str>,
    /// The log's last seq.
    last: u64,
    /// The events up to `last`, consecutive, oldest first, at most `capacity`.
    events: VecDeque<Arc<StoredEvent>>,
}

/// What an append tells `append.lua`: the log's epoch and last seq as this
/// node knows them, and the turns it then returns.
#[derive(Debug, Clone, Default)]
pub(super) struct Hint {
    /// Empty when nothing is known (the script then reads).
    pub epoch: Arc<str>,
    pub last: u64,
    /// The turns the append returns if the log is at `epoch` and `last`.
    pub turns: Vec<Arc<StoredEvent>>,
}

/// What an append's answer says about the log.
#[derive(Debug)]
pub(super) struct Outcome<'a> {
    pub epoch: &'a str,
    /// The appended event, with its seq.
    pub event: &'a Arc<StoredEvent>,
    /// The entries read before it (all of them, oldest first, decoded), if
    /// the script read them.
    pub read: Option<&'a [Arc<StoredEvent>]>,
}

impl RecentTurns {
    pub fn new(history_turns: usize, log_cap: usize) -> Self {
        Self { conversations: DashMap::default(), capacity: history_turns.min(log_cap), log_cap }
    }

    /// This node listens to `key` from now on (knowing nothing of it yet).
    pub fn listen(&self, key: &ConversationKey) {
        self.conversations.entry(key.clone()).or_insert(None);
    }

    /// This node stopped listening to `key`.
    pub fn forget(&self, key: &ConversationKey) {
        self.conversations.remove(key);
    }

    /// Events may have been missed on every conversation (the subscription dropped).
    pub fn invalidate_all(&self) {
        self.conversations.iter_mut().for_each(|mut known| *known = None);
    }

    /// The hint for an append to `key` that wants `wanted` turns before it:
    /// empty unless this node knows at least the turns the log would return.
    pub fn hint(&self, key: &ConversationKey, wanted: usize) -> Hint {
        if wanted == 0 {
            // Nothing to return: the script reads nothing either way.
            return Hint::default();
        }
        let Some(entry) = self.conversations.get(key) else { return Hint::default() };
        let Some(known) = entry.as_ref() else { return Hint::default() };
        // What `LRANGE log -wanted -1` returns: the list holds min(last, log_cap).
        let returned = wanted.min(known.last.min(self.log_cap as u64) as usize);
        if known.events.len() < returned {
            return Hint::default();
        }
        let turns = known.events.range(known.events.len() - returned..).filter(|e| e.from != Role::System).cloned();
        Hint { epoch: known.epoch.clone(), last: known.last, turns: turns.collect() }
    }

    /// Learns from an append's answer (see the module doc).
    pub fn appended(&self, key: &ConversationKey, outcome: Outcome<'_>) {
        let Some(mut entry) = self.conversations.get_mut(key) else { return };
        let seq = outcome.event.seq;
        *entry = match (entry.take(), outcome.read) {
            (Some(mut known), _) if *known.epoch == *outcome.epoch && known.last + 1 == seq => {
                known.push(outcome.event.clone(), self.capacity);
                Some(known)
            }
            // A newer answer of the same incarnation was learnt first.
            (Some(known), _) if *known.epoch == *outcome.epoch && known.last >= seq => Some(known),
            (_, Some(read)) if consecutive(read, seq) => {
                let mut known = Known { epoch: outcome.epoch.into(), last: seq - 1, events: VecDeque::new() };
                for event in read.iter().chain([outcome.event]) {
                    known.push(event.clone(), self.capacity);
                }
                Some(known)
            }
            _ => None,
        };
    }

    /// Another node appended the event `seq` to `key`.
    pub fn heard(&self, key: &ConversationKey, seq: u64) {
        if let Some(mut entry) = self.conversations.get_mut(key)
            && entry.as_ref().is_some_and(|known| seq > known.last)
        {
            *entry = None;
        }
    }
}

impl Known {
    fn push(&mut self, event: Arc<StoredEvent>, capacity: usize) {
        self.last = event.seq;
        self.events.push_back(event);
        while self.events.len() > capacity {
            self.events.pop_front();
        }
    }
}

/// Whether `read` are the events right before `seq`, with no gap (an entry
/// that did not decode leaves one).
fn consecutive(read: &[Arc<StoredEvent>], seq: u64) -> bool {
    seq > read.len() as u64 && read.iter().zip(seq - read.len() as u64..).all(|(event, expected)| event.seq == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ConversationKey {
        ConversationKey::for_test("t", "c")
    }

    fn event(seq: u64, from: Role) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            seq,
            from,
            id: format!("e{seq}"),
            text: format!("text {seq}"),
            fallback: false,
            interrupted: false,
            cancelled: false,
            at_ms: seq,
            agent: None,
            name: None,
            event: None,
            owner_epoch: None,
        })
    }

    fn seqs(hint: &Hint) -> Vec<u64> {
        hint.turns.iter().map(|e| e.seq).collect()
    }

    /// A log of `n` events at `epoch`, learnt from an append that read them.
    fn learnt(recent: &RecentTurns, epoch: &str, n: u64) {
        let read: Vec<_> = (1..n).map(|seq| event(seq, Role::Customer)).collect();
        recent.appended(&key(), Outcome { epoch, event: &event(n, Role::Assistant), read: Some(&read) });
    }

    #[test]
    fn nothing_is_known_before_listening_nor_before_an_append() {
        let recent = RecentTurns::new(3, 1000);
        learnt(&recent, "e1", 4);
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "not listening: nothing kept");
        recent.listen(&key());
        assert!(recent.hint(&key(), 3).epoch.is_empty());
    }

    #[test]
    fn an_append_that_read_the_turns_starts_the_copy_and_the_next_ones_extend_it() {
        let recent = RecentTurns::new(3, 1000);
        recent.listen(&key());
        learnt(&recent, "e1", 5);
        let hint = recent.hint(&key(), 3);
        assert_eq!((&*hint.epoch, hint.last, seqs(&hint)), ("e1", 5, vec![3, 4, 5]));
        recent.appended(&key(), Outcome { epoch: "e1", event: &event(6, Role::Customer), read: None });
        assert_eq!(seqs(&recent.hint(&key(), 3)), vec![4, 5, 6]);
        assert_eq!(seqs(&recent.hint(&key(), 1)), vec![6]);
        let none = recent.hint(&key(), 0);
        assert_eq!((&*none.epoch, none.last), ("", 0), "no turns wanted: nothing to skip, no lookup");
    }

    #[test]
    fn a_short_log_is_known_whole_and_a_new_one_from_its_first_append() {
        let recent = RecentTurns::new(3, 1000);
        recent.listen(&key());
        recent.appended(&key(), Outcome { epoch: "e1", event: &event(1, Role::Customer), read: Some(&[]) });
        let hint = recent.hint(&key(), 3);
        assert_eq!((hint.last, seqs(&hint)), (1, vec![1]));
    }

    #[test]
    fn system_events_count_in_the_window_like_the_logs_read_but_are_not_turns() {
        let recent = RecentTurns::new(3, 1000);
        recent.listen(&key());
        learnt(&recent, "e1", 3);
        recent.appended(&key(), Outcome { epoch: "e1", event: &event(4, Role::System), read: None });
        assert_eq!(seqs(&recent.hint(&key(), 3)), vec![2, 3]);
    }

    #[test]
    fn the_copy_is_never_longer_than_the_log_list() {
        let recent = RecentTurns::new(10, 2);
        recent.listen(&key());
        learnt(&recent, "e1", 2);
        recent.appended(&key(), Outcome { epoch: "e1", event: &event(3, Role::Customer), read: None });
        assert_eq!(seqs(&recent.hint(&key(), 10)), vec![2, 3]);
    }

    #[test]
    fn anything_but_the_next_seq_of_the_same_epoch_empties_it() {
        let recent = RecentTurns::new(3, 1000);
        recent.listen(&key());
        // An append that moved past the copy without reading (another node appended 6).
        learnt(&recent, "e1", 5);
        recent.appended(&key(), Outcome { epoch: "e1", event: &event(7, Role::Customer), read: None });
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "a gap");
        // Another incarnation of the log, even at the next seq.
        learnt(&recent, "e1", 5);
        recent.appended(&key(), Outcome { epoch: "e2", event: &event(6, Role::Customer), read: None });
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "an epoch change");
        // A read with a hole (an entry that did not decode).
        let read = [event(3, Role::Customer), event(5, Role::Customer)];
        recent.appended(&key(), Outcome { epoch: "e1", event: &event(6, Role::Customer), read: Some(&read) });
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "a read with a gap");
        // But a read of another epoch starts it again.
        learnt(&recent, "e1", 5);
        let read = [event(1, Role::Customer)];
        recent.appended(&key(), Outcome { epoch: "e2", event: &event(2, Role::Assistant), read: Some(&read) });
        let hint = recent.hint(&key(), 3);
        assert_eq!((&*hint.epoch, seqs(&hint)), ("e2", vec![1, 2]));
    }

    #[test]
    fn an_older_answer_learnt_late_keeps_the_newer_copy() {
        let recent = RecentTurns::new(3, 1000);
        recent.listen(&key());
        learnt(&recent, "e1", 5);
        recent.appended(&key(), Outcome { epoch: "e1", event: &event(4, Role::Customer), read: None });
        assert_eq!(recent.hint(&key(), 3).last, 5);
    }

    #[test]
    fn another_nodes_event_past_the_copy_a_lost_subscription_and_leaving_empty_it() {
        let recent = RecentTurns::new(3, 1000);
        recent.listen(&key());
        learnt(&recent, "e1", 5);
        recent.heard(&key(), 5);
        assert_eq!(recent.hint(&key(), 3).last, 5, "an event it has is no news");
        recent.heard(&key(), 6);
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "the next seq from elsewhere");
        learnt(&recent, "e1", 5);
        recent.heard(&key(), 9);
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "a gap");
        learnt(&recent, "e1", 5);
        recent.invalidate_all();
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "the subscription dropped");
        learnt(&recent, "e1", 5);
        recent.forget(&key());
        recent.listen(&key());
        assert!(recent.hint(&key(), 3).epoch.is_empty(), "left and came back");
    }
}
