//! Setting a watch up: joined to the fan-out first, then the snapshot
//! (`watching`, the history, the notes) written, so it always precedes the
//! live events queued meanwhile (see the parent module).

use axum::extract::ws::Message;
use futures::SinkExt;
use tracing::debug;

use super::{Watch, Watches};
use crate::event::{Cursor, LogEpoch};
use crate::ids::ConversationId;
use crate::protocol::{ErrorCode, ServerFrame};
use crate::store::StoreError;
use crate::writer::{Sink, WriteError};

impl Watches {
    /// Joins the conversation, then writes `watching` and its history; the
    /// live events queued meanwhile follow through the watch's cursor.
    pub(super) async fn watch(
        &mut self,
        sink: &mut Sink,
        conversation: ConversationId,
        after: Option<u64>,
    ) -> Result<(), WriteError> {
        let app = self.app.clone();
        let key = self.party.conversation(conversation.clone());
        // Watching again: the snapshot again, from a fresh join (the cursor
        // remembers the logs it followed, so a lost log's late events stay dropped).
        let previous = self.watched.remove(&conversation);
        if previous.is_some() {
            app.conversations.detach(&key, self.handle.id).await;
        } else if self.watched.len() >= app.config.agents.max_watched {
            let message = format!("an agent may watch at most {} conversations at once", app.config.agents.max_watched);
            let code = ErrorCode::TooManyWatched.as_str();
            let frame = ServerFrame::ConversationError {
                code,
                message: &message,
                conversation: conversation.as_str(),
                id: None,
            };
            return Ok(sink.send(Message::Text(frame.encode())).await?);
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
        let snapshot = match app.conversations.attach(&key, self.handle.watching(key.clone()), after, None).await {
            Ok(snapshot) => snapshot,
            Err(error) => {
                debug!(conversation_id = %conversation, %error, "watch refused");
                return Ok(sink.send(Message::Text(refused(&error))).await?);
            }
        };
        let mut history = snapshot.missed;
        let last_seq = snapshot.last_seq;
        let newest = app.config.agents.watch_history as u64;
        if after.is_none() && newest > 0 && last_seq > 0 {
            match app.conversations.events_after(&key, last_seq.saturating_sub(newest)).await {
                Ok(events) => history = events.into_iter().filter(|e| e.seq <= last_seq).collect(),
                Err(error) => {
                    app.conversations.detach(&key, self.handle.id).await;
                    return Ok(sink.send(Message::Text(refused(&error))).await?);
                }
            }
        }
        let present = match app.conversations.presence(&key, self.handle.id).await {
            Ok(present) => present,
            Err(error) => {
                app.conversations.detach(&key, self.handle.id).await;
                return Ok(sink.send(Message::Text(refused(&error))).await?);
            }
        };
        // Notes written since the first event replayed (all, without history).
        let notes = match app.conversations.notes(&key).await {
            Ok(notes) => notes,
            Err(error) => {
                app.conversations.detach(&key, self.handle.id).await;
                return Ok(sink.send(Message::Text(refused(&error))).await?);
            }
        };
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
        sink.feed(Message::Text(watching)).await?;
        for event in &history {
            sink.feed(Message::Text(event.message_frame(conversation.as_str()))).await?;
        }
        let mut notes_sent = 0;
        for note in &notes {
            if note.after >= from {
                sink.feed(Message::Text(note.note_frame(conversation.as_str()))).await?;
            }
            notes_sent = note.seq;
        }
        sink.flush().await?;
        debug!(conversation_id = %conversation, last_seq, replayed = history.len(), "watching");
        let sent = match previous {
            Some(Watch { mut sent, .. }) => {
                sent.restart(LogEpoch::of(&snapshot.epoch), last_seq);
                sent
            }
            None => Cursor::in_epoch(LogEpoch::of(&snapshot.epoch), last_seq),
        };
        let watch = Watch { key, sent, owner_epoch: snapshot.ownership.epoch, notes_sent };
        self.watched.insert(conversation, watch);
        Ok(())
    }
}
