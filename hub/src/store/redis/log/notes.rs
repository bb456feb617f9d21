//! The agents' notes of a conversation in Redis: their own capped list
//! beside the log (`note.lua` numbers and stores each, and publishes it
//! to the nodes listening), read whole on `watch`.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::warn;

use super::super::wire;
use super::RedisLog;
use crate::ids::ConversationKey;
use crate::store::{NOTE_IDS_CHECKED, NoteAdded, NoteLog, StoreError, StoredNote, now_ms};

#[async_trait]
impl NoteLog for RedisLog {
    async fn add_note(&self, key: &ConversationKey, note: StoredNote) -> Result<NoteAdded, StoreError> {
        let inner = &self.inner;
        let link = &inner.link;
        let at_ms = now_ms();
        let note = StoredNote { at_ms, ..note };
        let mut con = link.commands.clone();
        let mut invocation = inner.note.prepare_invoke();
        invocation
            .key(link.keys.meta(key))
            .key(link.keys.notes(key))
            .key(link.keys.listeners(key))
            .arg(wire::note_tail(&note))
            .arg(inner.log_cap)
            .arg(link.retention.expire_secs())
            .arg(link.keys.channel(key))
            .arg(link.node_id.as_str());
        let (author, id) = wire::note_author_and_id(&note);
        invocation.arg(author).arg(id).arg(NOTE_IDS_CHECKED);
        let placed: Vec<u64> = link.call(invocation.invoke_async(&mut con)).await?;
        match placed[..] {
            [seq, after] => Ok(NoteAdded::New(Arc::new(StoredNote { seq, after, ..note }))),
            [seq, after, at_ms] => Ok(NoteAdded::Duplicate(Arc::new(StoredNote { seq, after, at_ms, ..note }))),
            _ => Err(StoreError::ConversationNotFound),
        }
    }

    async fn notes(&self, key: &ConversationKey) -> Result<Vec<Arc<StoredNote>>, StoreError> {
        let link = &self.inner.link;
        let mut con = link.commands.clone();
        let entries: Vec<Vec<u8>> =
            link.call(redis::cmd("LRANGE").arg(link.keys.notes(key)).arg(0).arg(-1).query_async(&mut con)).await?;
        Ok(entries
            .iter()
            .filter_map(|entry| match serde_json::from_slice(entry) {
                Ok(note) => Some(Arc::new(note)),
                Err(error) => {
                    warn!(%error, "skipping a note that does not decode");
                    None
                }
            })
            .collect())
    }
}
