//! The replies streaming on this node, by reply id, so that a client's
//! `cancel` (on any socket of the conversation on this node) reaches the one
//! it names and no other conversation's.

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::ids::ConversationKey;

/// Reply id → its conversation and the token that cancels it.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    /// Keyed by the hub's own random ids: a fast hash is safe.
    replies: DashMap<String, (ConversationKey, CancellationToken), foldhash::fast::RandomState>,
}

impl InFlight {
    /// Registers a reply until the returned guard is dropped.
    pub fn register<'a>(
        &'a self,
        reply_id: &'a str,
        key: &ConversationKey,
        cancel: CancellationToken,
    ) -> Registered<'a> {
        self.replies.insert(reply_id.to_owned(), (key.clone(), cancel));
        Registered { in_flight: self, reply_id }
    }

    /// Cancels the reply `reply_id`, if it streams here and belongs to `key`.
    pub fn cancel(&self, key: &ConversationKey, reply_id: &str) {
        if let Some(entry) = self.replies.get(reply_id)
            && entry.0 == *key
        {
            entry.1.cancel();
        }
    }
}

/// Removes a reply from the registry however its answer ends.
pub(super) struct Registered<'a> {
    in_flight: &'a InFlight,
    reply_id: &'a str,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.in_flight.replies.remove(self.reply_id);
    }
}
