//! The fan-out's part in ownership ([`crate::owner`]): the replies
//! streaming on this node, each with what it was asked under, told to stop
//! when an owner change that takes them over is delivered here (the
//! takeover fence, [`Cursor::fences_off`](crate::event::Cursor::fences_off)), and the
//! conversations seen waiting for a person, for the hand-over's timeout
//! ([`crate::session::handoff`]).

use tokio_util::sync::CancellationToken;

use super::FanOut;
use crate::event::OwnerEpoch;
use crate::ids::ConversationKey;

impl FanOut {
    /// Notes the conversation's owner as of owner epoch `epoch`: `waiting`
    /// since `since_ms`, or anyone else (a later epoch replaces an earlier).
    pub fn saw_owner(&self, key: &ConversationKey, epoch: u64, waiting: bool, since_ms: u64) {
        match self.waiting.entry(key.clone()) {
            dashmap::Entry::Occupied(seen) if seen.get().0 > epoch => {}
            dashmap::Entry::Occupied(seen) if !waiting => {
                seen.remove();
            }
            dashmap::Entry::Occupied(mut seen) => *seen.get_mut() = (epoch, since_ms),
            dashmap::Entry::Vacant(new) if waiting => {
                new.insert((epoch, since_ms));
            }
            dashmap::Entry::Vacant(_) => {}
        }
    }

    /// Takes the conversations seen `waiting` since `cutoff_ms` or earlier,
    /// with their owner epoch and since when.
    pub fn take_waiting_since(&self, cutoff_ms: u64) -> Vec<(ConversationKey, u64, u64)> {
        let due: Vec<(ConversationKey, u64, u64)> = self
            .waiting
            .iter()
            .filter(|seen| seen.value().1 <= cutoff_ms)
            .map(|seen| (seen.key().clone(), seen.value().0, seen.value().1))
            .collect();
        for (key, epoch, _) in &due {
            self.waiting.remove_if(key, |_, seen| seen.0 == *epoch);
        }
        due
    }

    /// Registers a reply streaming on this node, asked under `asked`:
    /// `takeover` is cancelled when an owner change that takes it over is
    /// delivered here (at once if one already was: see
    /// [`Cursor::fences_off`](crate::event::Cursor::fences_off)). Returns
    /// true when the conversation had nothing on this node before
    /// (subscribe it).
    pub fn hold(&self, key: &ConversationKey, asked: OwnerEpoch, takeover: CancellationToken) -> bool {
        let mut entry = self.sessions.entry(key.clone()).or_default();
        let first = entry.is_empty();
        if entry.delivered.fences_off(asked) {
            takeover.cancel();
        }
        entry.replies.push((asked, takeover));
        first
    }

    /// [`FanOut::hold`] when the conversation already has something on this
    /// node (it is subscribed: nothing more to do); false, doing nothing, if not.
    pub fn hold_if_present(&self, key: &ConversationKey, asked: OwnerEpoch, takeover: &CancellationToken) -> bool {
        let Some(mut local) = self.sessions.get_mut(key) else { return false };
        if local.is_empty() {
            return false;
        }
        if local.delivered.fences_off(asked) {
            takeover.cancel();
        }
        local.replies.push((asked, takeover.clone()));
        true
    }

    /// [`FanOut::unhold`] when it is not the conversation's last thing on
    /// this node; false, doing nothing, if it is.
    pub fn unhold_unless_last(&self, key: &ConversationKey, takeover: &CancellationToken) -> bool {
        let Some(mut local) = self.sessions.get_mut(key) else { return false };
        let Some(at) = local.replies.iter().position(|(_, t)| t == takeover) else { return false };
        if local.handles.is_empty() && local.replies.len() == 1 {
            return false;
        }
        local.replies.swap_remove(at);
        true
    }

    /// Ends a [`FanOut::hold`]; returns true when it was the conversation's
    /// last thing on this node (unsubscribe it).
    pub fn unhold(&self, key: &ConversationKey, takeover: &CancellationToken) -> bool {
        self.sessions
            .remove_if_mut(key, |_, local| {
                if let Some(at) = local.replies.iter().position(|(_, t)| t == takeover) {
                    local.replies.swap_remove(at);
                }
                local.is_empty()
            })
            .is_some()
    }
}
