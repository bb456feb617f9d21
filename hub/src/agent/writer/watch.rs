//! Setting a watch up: joined to the fan-out first, then the snapshot
//! (`watching`, the history, the notes) written, so it always precedes the
//! live events queued meanwhile (see the parent module).

use std::sync::Arc;

use axum::extract::ws::Message;
use futures::SinkExt;
use tracing::debug;

use super::{Watch, Watches};
use crate::event::{Cursor, LogEpoch, StoredEvent, StoredNote};
use crate::ids::{ConversationId, ConversationKey};
use crate::presence::Present;
use crate::protocol::{ErrorCode, ServerFrame};
use crate::store::{Snapshot, StoreError};
use crate::writer::{Sink, WriteError};

/// What a watch starts with: where the log stands, the events to replay,
/// who is in the conversation, its notes.
struct WatchSnapshot {
    log: Snapshot,
    history: Vec<Arc<StoredEvent>>,
    present: Present,
    notes: Vec<Arc<StoredNote>>,
}

impl Watches {
    /// Joins the conversation, then writes `watching` and its history; the
    /// live events queued meanwhile follow through the watch's cursor.
    pub(super) async fn watch(
        &mut self,
        sink: &mut Sink<'_>,
        conversation: ConversationId,
        after: Option<u64>,
    ) -> Result<(), WriteError> {
        let app = self.app.clone();
        let key = self.party.conversation(conversation.clone());
        // Watching again: the snapshot again; the socket stays joined (the
        // cursor remembers the logs it followed, so a lost log's late events
        // stay dropped).
        let previous = self.watched.remove(&conversation);
        if previous.is_none() && self.watched.len() >= app.config.agents.max_watched {
            let message = format!("an agent may watch at most {} conversations at once", app.config.agents.max_watched);
            let code = ErrorCode::TooManyWatched.as_str();
            let frame = ServerFrame::ConversationError {
                code,
                message: &message,
                conversation: conversation.as_str(),
                id: None,
            };
            return sink.send(Message::Text(frame.encode())).await;
        }
        let refused = |error: &StoreError| {
            let (code, _) = crate::session::refusal(error);
            let message = match error {
                StoreError::ConversationNotFound => "no such conversation".to_owned(),
                other => other.to_string(),
            };
            ServerFrame::ConversationError { code, message: &message, conversation: conversation.as_str(), id: None }
                .encode()
        };
        let joined = match previous {
            Some(_) => app.conversations.snapshot(&key, after).await,
            None => app.conversations.attach(&key, self.handle.watching(key.clone()), after, None).await,
        };
        // Joined from here on, unless an attach failed (it has left again):
        // every way out leaves, or records the watch for `finish` to leave.
        let attach_failed = previous.is_none() && joined.is_err();
        let read = match joined {
            Ok(snapshot) => self.rest_of_snapshot(&key, snapshot, after).await,
            Err(error) => Err(error),
        };
        let WatchSnapshot { log: snapshot, history, present, notes } = match read {
            Ok(read) => read,
            Err(error) => {
                if !attach_failed {
                    app.conversations.detach(&key, self.handle.id).await;
                }
                debug!(conversation_id = %conversation, %error, "watch refused");
                return sink.send(Message::Text(refused(&error))).await;
            }
        };
        let last_seq = snapshot.last_seq;
        let from = history.first().map_or(last_seq, |event| event.seq.saturating_sub(1));
        let customer = snapshot.customer.as_ref().map_or("", |c| c.as_str());
        let watching = ServerFrame::Watching {
            conversation: conversation.as_str(),
            customer,
            seq: last_seq,
            epoch: &snapshot.epoch,
            owner: snapshot.ownership.owner.kind(),
            agent: snapshot.ownership.owner.agent().map(|(id, _)| id),
            agent_name: snapshot.ownership.owner.agent().map(|(_, name)| name),
            owner_epoch: snapshot.ownership.epoch,
            online: present.online,
            viewers: &present.viewers,
        }
        .encode();
        // Recorded before the writes: a session whose socket fails meanwhile
        // still leaves the conversation when it finishes.
        let mut sent = match previous {
            Some(Watch { mut sent, .. }) => {
                sent.restart(LogEpoch::of(&snapshot.epoch), last_seq);
                sent
            }
            None => Cursor::in_epoch(LogEpoch::of(&snapshot.epoch), last_seq),
        };
        sent.raise_owner(snapshot.ownership.epoch);
        let notes_sent = notes.last().map_or(0, |note| note.seq);
        let watch = Watch { key, sent, notes_sent };
        self.watched.insert(conversation.clone(), watch);
        sink.feed(Message::Text(watching)).await?;
        for event in &history {
            sink.feed(Message::Text(event.message_frame(conversation.as_str()))).await?;
        }
        for note in notes.iter().filter(|note| note.after >= from) {
            sink.feed(Message::Text(note.note_frame(conversation.as_str()))).await?;
        }
        sink.flush().await?;
        debug!(conversation_id = %conversation, last_seq, replayed = history.len(), "watching");
        Ok(())
    }

    /// What a watch's snapshot adds to the log's: the newest events when
    /// no `after` was given, who is in the conversation, its notes.
    async fn rest_of_snapshot(
        &self,
        key: &ConversationKey,
        mut log: Snapshot,
        after: Option<u64>,
    ) -> Result<WatchSnapshot, StoreError> {
        let conversations = &self.app.conversations;
        let mut history = std::mem::take(&mut log.missed);
        let last_seq = log.last_seq;
        let newest = self.app.config.agents.watch_history as u64;
        if after.is_none() && newest > 0 && last_seq > 0 {
            let events = conversations.events_after(key, last_seq.saturating_sub(newest)).await?;
            history = events.into_iter().filter(|e| e.seq <= last_seq).collect();
        }
        let present = conversations.presence(key, self.handle.id).await?;
        // Notes written since the first event replayed (all, without history).
        let notes = conversations.notes(key).await?;
        Ok(WatchSnapshot { log, history, present, notes })
    }
}
