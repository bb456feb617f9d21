//! The customer's side of the hand-over (protocol §14): asking for a
//! person (a `handoff` frame, or a message whose whole text is `agent`,
//! `human` or `人工`) makes an assistant-owned conversation `waiting`; a
//! conversation left waiting past `agents.handoff_timeout_secs` goes back
//! to the assistant. Every node that saw it become waiting (the customer's,
//! those of the agents watching it, those listing its tenant) hands it back
//! when the time is up ([`run_timeouts`]; the owner's compare-and-set lets
//! exactly one of them; one that cannot reach the store tries again at its
//! next check), and the customer's next message does it too if none did (a
//! node that saw it died).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::AppState;
use crate::conversations::Conversations;
use crate::event::SystemEvent;
use crate::ids::ConversationKey;
use crate::owner::{Owner, Ownership};
use crate::store::{AppendWith, Appended, NewEvent, OwnerOp, Pending, StoreError};

/// Whether a message's whole text asks for a person.
pub(crate) fn asks_for_person(text: &str) -> bool {
    let text = text.trim();
    ["agent", "human"].iter().any(|word| text.eq_ignore_ascii_case(word)) || text == "人工"
}

/// Puts the conversation in `waiting` if the assistant owns it (under
/// `epoch`); returns the ownership after. A conversation not created yet
/// is created by the `waiting` event (with `pending`).
pub(crate) async fn request(
    app: &AppState,
    key: &ConversationKey,
    pending: Option<&Pending>,
    epoch: u64,
) -> Result<Ownership, StoreError> {
    let event = NewEvent::system(SystemEvent::Waiting, None);
    let with = AppendWith {
        create: pending,
        owner: OwnerOp::Change { expected: epoch, to: &Owner::Waiting },
        ..Default::default()
    };
    match app.conversations.append(key, event, None, with).await {
        Ok(Appended::New { ownership, .. }) => {
            info!(conversation_id = %key.conversation(), "the customer asked for a person");
            metrics::counter!(crate::metric::AGENT_HANDOFFS).increment(1);
            Ok(ownership)
        }
        Ok(Appended::Duplicate(_)) => Err(StoreError::Unavailable("a system event was taken for a duplicate".into())),
        Err(StoreError::OwnerChanged(now)) => Ok(now),
        Err(error) => Err(error),
    }
}

/// Whether a waiting conversation has waited past the timeout.
pub(crate) fn waited_too_long(app: &AppState, ownership: &Ownership) -> bool {
    let timeout_ms = app.config.agents.handoff_timeout_secs.saturating_mul(1000);
    ownership.owner == Owner::Waiting && crate::store::now_ms().saturating_sub(ownership.since_ms) >= timeout_ms
}

/// Hands a conversation that waited too long back to the assistant (the
/// `assistant_back` event); returns the ownership after.
pub(crate) async fn give_up_waiting(
    conversations: &Conversations,
    key: &ConversationKey,
    waiting: &Ownership,
) -> Result<Ownership, StoreError> {
    let event = NewEvent::system(SystemEvent::AssistantBack, None);
    let with =
        AppendWith { owner: OwnerOp::Change { expected: waiting.epoch, to: &Owner::Assistant }, ..Default::default() };
    match conversations.append(key, event, None, with).await {
        Ok(Appended::New { ownership, .. }) => {
            debug!(conversation_id = %key.conversation(), "nobody took the conversation; the assistant answers again");
            Ok(ownership)
        }
        Ok(Appended::Duplicate(_)) => Err(StoreError::Unavailable("a system event was taken for a duplicate".into())),
        Err(StoreError::OwnerChanged(now)) => Ok(now),
        Err(error) => Err(error),
    }
}

/// How often [`run_timeouts`] looks for conversations waiting too long.
const TIMEOUT_CHECK: Duration = Duration::from_millis(250);

/// The node's hand-over timeouts (see the module doc): hands back the
/// conversations this node saw waiting for `timeout` or longer.
pub async fn run_timeouts(conversations: Arc<Conversations>, timeout: Duration, stop: CancellationToken) {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut check = tokio::time::interval(TIMEOUT_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = check.tick() => {}
        }
        let cutoff = crate::store::now_ms().saturating_sub(timeout_ms);
        for (key, epoch, since_ms) in conversations.take_waiting_since(cutoff) {
            let waiting = Ownership { owner: Owner::Waiting, epoch, since_ms };
            match give_up_waiting(&conversations, &key, &waiting).await {
                Ok(_) => {}
                // The store could not be reached: the next check tries again.
                Err(error @ StoreError::Unavailable(_)) => {
                    debug!(%error, conversation_id = %key.conversation(), "a waiting conversation not handed back yet");
                    conversations.saw_owner(&key, epoch, true, since_ms);
                }
                Err(error) => {
                    debug!(%error, conversation_id = %key.conversation(), "a waiting conversation not handed back")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_text_of_the_words_asks_for_a_person() {
        for yes in ["agent", " Agent\n", "HUMAN", "人工", " 人工 "] {
            assert!(asks_for_person(yes), "{yes:?}");
        }
        for no in ["an agent please", "agents", "humane", "人工智能", ""] {
            assert!(!asks_for_person(no), "{no:?}");
        }
    }
}
