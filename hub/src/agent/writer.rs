//! What an agent's socket writes ([`Watches`], its [`Writes`]), and its
//! watches, which only the writer touches. The loop around it is
//! [`crate::writer`]'s, as for a customer's socket, but the durable events
//! on the queue belong to many conversations: each arrives wrapped
//! with its conversation ([`Outbound::Watched`]) and goes through that
//! watch's own [`Cursor`] (a duplicate is skipped, a gap is filled from the
//! log first). A watch is set up here, not in the reader: joined to the
//! fan-out, then its snapshot read and written, while what the fan-out
//! pushes meanwhile waits in the queue; so the snapshot always precedes the
//! live events, and an event in both is sent once.

mod watch;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes};
use futures::SinkExt;
use tracing::debug;

use crate::AppState;
use crate::event::{Cursor, LogEpoch, Step};
use crate::fanout::{Outbound, SessionHandle};
use crate::ids::{ConversationId, ConversationKey, Party};
use crate::writer::{Sink, WriteError, Writes, read_log_gap};

/// What the reader asks of the writer.
#[derive(Debug)]
pub(super) enum Command {
    /// Send the conversation's snapshot, then its events live (`again`:
    /// also when it is watched already; a `take` watches only if not).
    Watch {
        conversation: ConversationId,
        after: Option<u64>,
        again: bool,
        /// Told once the watch is set up (`true`) or refused (`false`).
        done: Option<tokio::sync::oneshot::Sender<bool>>,
    },
    /// Stop the conversation's events.
    Unwatch { conversation: ConversationId },
}

/// One watched conversation.
struct Watch {
    key: ConversationKey,
    /// The durable events of this conversation the agent has, and the
    /// latest owner change it was told of (`watching`, `owner` frames).
    sent: Cursor,
    /// The last note sent (notes have their own seq).
    notes_sent: u64,
}

/// An agent socket's watched conversations, and what it needs to set them up.
pub(super) struct Watches {
    app: Arc<AppState>,
    party: Party,
    /// The socket's own handle; each watch joins the fan-out with
    /// [`SessionHandle::watching`] it.
    handle: SessionHandle,
    /// `ready`, written first.
    intro: Option<Utf8Bytes>,
    watched: HashMap<ConversationId, Watch>,
}

impl Watches {
    pub(super) fn new(app: Arc<AppState>, party: Party, handle: SessionHandle, ready: Utf8Bytes) -> Self {
        Self { app, party, handle, intro: Some(ready), watched: HashMap::new() }
    }
}

impl Writes for Watches {
    type Command = Command;

    fn intro(&mut self) -> Vec<Utf8Bytes> {
        self.intro.take().into_iter().collect()
    }

    #[allow(clippy::vec_box, reason = "the items arrive boxed from the queue (see `SessionHandle::tx`)")]
    async fn burst(&mut self, sink: &mut Sink<'_>, burst: &mut Vec<Box<Outbound>>) -> Result<(), WriteError> {
        for item in burst.drain(..) {
            match *item {
                Outbound::Frame { frame, .. } => sink.feed(Message::Text(frame)).await?,
                Outbound::Frames { frames, .. } => {
                    for frame in frames {
                        sink.feed(Message::Text(frame)).await?;
                    }
                }
                Outbound::Watched { key, item } => {
                    if self.deliver(sink, key.conversation(), *item).await? == Delivered::NewLog {
                        // The log was lost and recreated: the snapshot again, of the new one.
                        debug!(conversation_id = %key.conversation(), "a watched conversation's log was recreated");
                        Box::pin(self.watch(sink, key.conversation().clone(), None)).await?;
                    }
                }
                // Conversations' items reach an agent's socket only wrapped.
                Outbound::Event { .. } | Outbound::Resync | Outbound::Owner { .. } | Outbound::Note { .. } => {}
            }
        }
        sink.flush().await
    }

    async fn command(&mut self, sink: &mut Sink<'_>, command: Command) -> Result<(), WriteError> {
        match command {
            Command::Watch { conversation, after, again, done } => {
                let result = match again || !self.watched.contains_key(&conversation) {
                    true => self.watch(sink, conversation.clone(), after).await,
                    false => Ok(()),
                };
                if let Some(done) = done {
                    let _ = done.send(self.watched.contains_key(&conversation));
                }
                result
            }
            Command::Unwatch { conversation } => {
                if let Some(watch) = self.watched.remove(&conversation) {
                    self.app.conversations.detach(&watch.key, self.handle.id).await;
                    debug!(conversation_id = %conversation, "unwatched");
                }
                Ok(())
            }
        }
    }

    /// Nothing: an agent's client resumes each watch from its log, and
    /// what was not durable is not sent again.
    fn before_close(&mut self, _: &mut dyn Iterator<Item = Outbound>) -> Vec<Utf8Bytes> {
        Vec::new()
    }

    /// Leaves every watched conversation (the session is over).
    async fn finish(&mut self) {
        for (_, watch) in self.watched.drain() {
            self.app.conversations.detach(&watch.key, self.handle.id).await;
        }
    }
}

/// What became of an item of a watched conversation.
#[derive(Debug, PartialEq, Eq)]
enum Delivered {
    /// Written, or dropped as seen or not watched.
    Done,
    /// The conversation's log is another one than the watch's: watch again.
    NewLog,
}

impl Watches {
    /// Writes one item of a watched conversation through its watch's
    /// cursor (a durable event once, in order, a gap filled first).
    async fn deliver(
        &mut self,
        sink: &mut Sink<'_>,
        conversation: &ConversationId,
        item: Outbound,
    ) -> Result<Delivered, WriteError> {
        // Left over from a conversation no longer watched: dropped.
        let Some(watch) = self.watched.get_mut(conversation) else { return Ok(Delivered::Done) };
        match item {
            Outbound::Frame { frame, .. } => sink.feed(Message::Text(frame)).await?,
            // A taken-over reply's, after the agent was told of the change.
            Outbound::Frames { asked, .. } if watch.sent.fences_off(asked) => {}
            Outbound::Frames { frames, .. } => {
                for frame in frames {
                    sink.feed(Message::Text(frame)).await?;
                }
            }
            Outbound::Event { epoch, seq, frame, .. } => match watch.sent.arrive(epoch, seq) {
                Step::Seen | Step::Stale => {}
                Step::NewLog => return Ok(Delivered::NewLog),
                Step::Gap => {
                    if Box::pin(fill_gap(&self.app, sink, watch, seq)).await? == Delivered::NewLog {
                        return Ok(Delivered::NewLog);
                    }
                    if watch.sent.arrive(epoch, seq) == Step::Next {
                        sink.feed(Message::Text(frame)).await?;
                        watch.sent.advance(seq);
                    }
                }
                Step::Next => {
                    sink.feed(Message::Text(frame)).await?;
                    watch.sent.advance(seq);
                }
            },
            Outbound::Resync => {
                let delivered = Box::pin(fill_gap(&self.app, sink, watch, u64::MAX)).await?;
                if delivered == Delivered::Done {
                    Box::pin(catch_up_notes(&self.app, sink, watch)).await?;
                }
                return Ok(delivered);
            }
            Outbound::Owner { change, frame } => {
                if watch.sent.learn_owner(change) {
                    sink.feed(Message::Text(frame)).await?;
                }
            }
            Outbound::Note { seq, frame } => {
                // Notes are numbered 1, 2, …: one skipped was written while
                // this node could not hear the others.
                if seq > watch.notes_sent + 1 {
                    Box::pin(catch_up_notes(&self.app, sink, watch)).await?;
                }
                if seq > watch.notes_sent {
                    watch.notes_sent = seq;
                    sink.feed(Message::Text(frame)).await?;
                }
            }
            Outbound::Watched { .. } => {}
        }
        Ok(Delivered::Done)
    }
}

/// Sends the watched conversation's notes newer than the last one sent, in
/// order (written while this node could not hear the other nodes). A read
/// that fails leaves them to the next resync, note or watch.
async fn catch_up_notes(app: &AppState, sink: &mut Sink<'_>, watch: &mut Watch) -> Result<(), WriteError> {
    let notes = match app.conversations.notes(&watch.key).await {
        Ok(notes) => notes,
        Err(error) => {
            debug!(%error, "cannot re-read a watched conversation's notes");
            return Ok(());
        }
    };
    let conversation = watch.key.conversation().as_str();
    let sent = watch.notes_sent;
    for note in notes.iter().filter(|note| note.seq > sent) {
        sink.feed(Message::Text(note.note_frame(conversation))).await?;
        watch.notes_sent = note.seq;
    }
    Ok(())
}

/// Sends a watched conversation's logged events between the last sent seq
/// and `before` (exclusive); `u64::MAX` after a resync. Sends nothing if
/// the log is another one than the watch's ([`Delivered::NewLog`]).
async fn fill_gap(
    app: &AppState,
    sink: &mut Sink<'_>,
    watch: &mut Watch,
    before: u64,
) -> Result<Delivered, WriteError> {
    let after = watch.sent.last();
    let Some(log) = read_log_gap(&app.conversations, &watch.key, after, before).await? else {
        return Ok(Delivered::Done);
    };
    if watch.sent.epoch() != Some(LogEpoch::of(&log.epoch)) {
        return Ok(Delivered::NewLog);
    }
    let conversation = watch.key.conversation().as_str();
    for event in log.missed.iter().filter(|e| e.seq > after && e.seq < before) {
        sink.feed(Message::Text(event.message_frame(conversation))).await?;
        watch.sent.advance(event.seq);
        // An owner change this node did not hear live is told all the same.
        if let Some((epoch, frame)) = event.owner_frame(conversation)
            && watch.sent.raise_owner(epoch)
        {
            sink.feed(Message::Text(frame)).await?;
        }
    }
    Ok(Delivered::Done)
}
