//! What an agent does as a conversation's owner: `take`, `release` and its
//! `message`s, each one append through the log's owner check (protocol
//! §14). A take reads the owner, applies the rules of [`crate::owner::take`]
//! and appends `agent_joined` under a compare-and-set on the owner epoch it
//! read; losing the race means reading the winner from the refusal and
//! applying the rules again (now `already_owned`). The epoch of a take is
//! remembered, and the agent's messages are fenced by it: after any change
//! of owner they are refused with `not_owner`, even if the agent took the
//! conversation back meanwhile.

use std::collections::HashMap;

use axum::extract::ws::Utf8Bytes;
use tracing::{debug, info, warn};

use crate::AppState;
use crate::auth::Identity;
use crate::event::SystemEvent;
use crate::fanout::SessionHandle;
use crate::ids::{ConversationId, ConversationKey, Party};
use crate::owner::{self, Owner, Take, TakeRefused};
use crate::presence::{Typing, Typist};
use crate::protocol::{ErrorCode, ServerFrame};
use crate::session::send_to_this_socket;
use crate::store::{AppendWith, Appended, NewEvent, NoteAdded, OwnerOp, StoreError, StoredNote};

/// How often a take re-reads the owner after losing a compare-and-set
/// before it reports the store unavailable (each loss names a new owner).
const TAKE_ATTEMPTS: usize = 4;

/// One agent socket's view of the conversations it owns.
pub(super) struct Owning<'a> {
    pub app: &'a AppState,
    pub party: &'a Party,
    pub identity: &'a Identity,
    pub handle: &'a SessionHandle,
    /// The owner epoch of each take this socket made.
    pub taken: HashMap<ConversationId, u64>,
}

impl Owning<'_> {
    fn agent(&self) -> &str {
        self.identity.user.as_str()
    }

    fn reply(&self, frame: Utf8Bytes) {
        send_to_this_socket(self.handle, frame);
    }

    fn error(&self, code: ErrorCode, message: &str, conversation: &ConversationId) {
        let conversation = conversation.as_str();
        let frame = ServerFrame::ConversationError { code: code.as_str(), message, conversation, id: None };
        self.reply(frame.encode());
    }

    fn store_error(&self, error: &StoreError, conversation: &ConversationId) {
        match error {
            StoreError::ConversationNotFound => self.reply(super::not_found(conversation.as_str())),
            other => {
                warn!(%other, conversation_id = %conversation, "agent action not stored");
                self.error(ErrorCode::Unavailable, "not stored; send it again", conversation);
            }
        }
    }

    fn not_owner(&self, conversation: &ConversationId) {
        self.error(ErrorCode::NotOwner, "this agent does not own the conversation (any more)", conversation);
    }

    /// `take`: become the owner (see the module doc).
    pub async fn take(&mut self, conversation: ConversationId, steal: bool) {
        let key = self.party.conversation(conversation.clone());
        let may_steal = self.identity.supervisor || self.app.config.agents.allow_steal;
        let mut current = match self.app.conversations.ownership(&key).await {
            Ok(Some(ownership)) => ownership,
            Ok(None) => return self.store_error(&StoreError::ConversationNotFound, &conversation),
            Err(error) => return self.store_error(&error, &conversation),
        };
        for _ in 0..TAKE_ATTEMPTS {
            let stolen = match owner::take(&current.owner, self.agent(), steal, may_steal) {
                Ok(Take::AlreadyMine) => {
                    self.taken.insert(conversation, current.epoch);
                    return;
                }
                Ok(Take::Over { steal }) => steal,
                Err(TakeRefused::AlreadyOwned { agent, name }) => {
                    let frame = ServerFrame::AlreadyOwned {
                        code: ErrorCode::AlreadyOwned.as_str(),
                        message: "another agent owns the conversation",
                        conversation: conversation.as_str(),
                        agent: &agent,
                        agent_name: &name,
                    };
                    return self.reply(frame.encode());
                }
                Err(TakeRefused::Forbidden) => {
                    let message = "taking a conversation another agent owns needs steal rights";
                    return self.error(ErrorCode::Forbidden, message, &conversation);
                }
            };
            let me = Owner::Agent { id: self.agent().to_owned(), name: self.identity.name.clone() };
            let event = NewEvent::system(SystemEvent::AgentJoined, Some((self.agent(), &self.identity.name)));
            let with = AppendWith { owner: OwnerOp::Change { expected: current.epoch, to: &me }, ..Default::default() };
            match self.app.conversations.append(&key, event, None, with).await {
                Ok(Appended::New { ownership, .. }) => {
                    metrics::counter!(crate::metric::AGENT_TAKEOVERS).increment(1);
                    if stolen {
                        metrics::counter!(crate::metric::AGENT_STEALS).increment(1);
                        let from = current.owner.agent().map_or("", |(id, _)| id);
                        info!(tenant_id = %key.tenant(), conversation_id = %conversation, from_agent = from, to_agent = self.agent(), "conversation stolen");
                    } else {
                        debug!(conversation_id = %conversation, owner_epoch = ownership.epoch, "conversation taken");
                    }
                    self.taken.insert(conversation, ownership.epoch);
                    return;
                }
                // Someone else changed it first: the rules again, against the winner.
                Err(StoreError::OwnerChanged(now)) => current = now,
                Err(error) => return self.store_error(&error, &conversation),
                Ok(Appended::Duplicate(_)) => return,
            }
        }
        self.error(ErrorCode::Unavailable, "the owner keeps changing; try again", &conversation);
    }

    /// `release`: the owner hands the conversation back to the assistant.
    pub async fn release(&mut self, conversation: ConversationId) {
        let key = self.party.conversation(conversation.clone());
        let current = match self.app.conversations.ownership(&key).await {
            Ok(Some(ownership)) => ownership,
            Ok(None) => return self.store_error(&StoreError::ConversationNotFound, &conversation),
            Err(error) => return self.store_error(&error, &conversation),
        };
        let fenced = self.taken.get(&conversation).is_some_and(|epoch| *epoch != current.epoch);
        if !current.owner.is_agent(self.agent()) || fenced {
            metrics::counter!(crate::metric::AGENT_STALE_WRITES).increment(1);
            return self.not_owner(&conversation);
        }
        let event = NewEvent::system(SystemEvent::AgentLeft, Some((self.agent(), &self.identity.name)));
        let with = AppendWith {
            owner: OwnerOp::Change { expected: current.epoch, to: &Owner::Assistant },
            ..Default::default()
        };
        match self.app.conversations.append(&key, event, None, with).await {
            Ok(_) => {
                self.taken.remove(&conversation);
                debug!(conversation_id = %conversation, "conversation handed back");
            }
            Err(StoreError::OwnerChanged(_)) => {
                metrics::counter!(crate::metric::AGENT_STALE_WRITES).increment(1);
                self.not_owner(&conversation);
            }
            Err(error) => self.store_error(&error, &conversation),
        }
    }

    /// A private note: any agent of the tenant may write one; every
    /// watcher gets it (the writer too, directly when not watching).
    /// `typing`: to the conversation's other watchers, and to its customer
    /// when this agent owns it and is not writing a note (the owner is read
    /// for each signal: a typist who lost the conversation is not shown).
    pub async fn typing(&mut self, conversation: ConversationId, on: bool, note: bool) {
        let key = self.party.conversation(conversation.clone());
        let ownership = match self.app.conversations.ownership(&key).await {
            Ok(Some(ownership)) => ownership,
            Ok(None) => return self.reply(super::not_found(conversation.as_str())),
            Err(error) => return self.store_error(&error, &conversation),
        };
        let owns = ownership.owner.agent().is_some_and(|(id, _)| id == self.agent());
        let typist = Typist::Agent { agent: self.agent().to_owned(), name: self.identity.name.clone() };
        let typing = Typing { typist, on, note, to_customer: owns && !note };
        self.app.conversations.typing(&key, &typing, self.handle.id);
    }

    pub async fn note(&mut self, conversation: ConversationId, id: String, text: String) {
        let key = self.party.conversation(conversation.clone());
        let note = StoredNote {
            seq: 0,
            after: 0,
            agent: self.agent().to_owned(),
            name: self.identity.name.clone(),
            id,
            text,
            at_ms: 0,
        };
        match self.app.conversations.add_note(&key, note).await {
            // The fan-out gave it to this socket if it watches the conversation.
            Ok(NoteAdded::New(note)) => {
                if !self.app.conversations.has_session(&key, self.handle.id) {
                    self.reply(note.note_frame(conversation.as_str()));
                }
            }
            // A resend: only its sender is told (again), as a message's resend is acked.
            Ok(NoteAdded::Duplicate(note)) => self.reply(note.note_frame(conversation.as_str())),
            Err(error) => self.store_error(&error, &conversation),
        }
    }

    /// An agent's `message` to the customer: only the owner's is stored.
    pub async fn message(&mut self, conversation: ConversationId, id: String, text: String) {
        let key: ConversationKey = self.party.conversation(conversation.clone());
        let event = NewEvent::agent(id.clone(), text, self.agent(), &self.identity.name);
        let epoch = self.taken.get(&conversation).copied();
        let with = AppendWith { owner: OwnerOp::Fence { agent: self.agent(), epoch }, ..Default::default() };
        match self.app.conversations.append(&key, event, Some(self.handle.id), with).await {
            Ok(Appended::New { event, .. }) => {
                // Watchers (this socket among them) got it through the fan-out.
                if !self.app.conversations.has_session(&key, self.handle.id) {
                    let conversation = Some(conversation.as_str());
                    self.reply(ServerFrame::Ack { conversation, id: &id, seq: event.seq }.encode());
                }
            }
            Ok(Appended::Duplicate(seq)) => {
                // A resend of a stored message: acknowledged again, not stored twice.
                self.reply(ServerFrame::Ack { conversation: Some(conversation.as_str()), id: &id, seq }.encode());
            }
            Err(StoreError::OwnerChanged(_)) => {
                metrics::counter!(crate::metric::AGENT_STALE_WRITES).increment(1);
                let frame = ServerFrame::ConversationError {
                    code: ErrorCode::NotOwner.as_str(),
                    message: "this agent does not own the conversation (any more); nothing was stored",
                    conversation: conversation.as_str(),
                    id: Some(&id),
                };
                self.reply(frame.encode());
            }
            Err(error) => self.store_error(&error, &conversation),
        }
    }
}
