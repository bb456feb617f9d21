//! Who answers a conversation: the assistant, nobody yet (the customer is
//! waiting for a person) or one agent, with the owner epoch that every
//! change increases (protocol §14).
//!
//! The owner lives with the conversation's log and changes only in the
//! log's atomic append ([`crate::store::OwnerOp::Change`], a compare-and-set
//! on the epoch, together with the `system` event that tells everyone), so
//! two agents taking one conversation at once, on any nodes, cannot both
//! win. Writes on behalf of an owner carry the epoch they acted under
//! ([`crate::store::OwnerOp::Fence`]). This module holds the value and the
//! rules of `take`; the store holds the state.

use serde::{Deserialize, Serialize};

/// Who answers the customer's messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    /// The NLP service (the default).
    #[default]
    Assistant,
    /// The customer asked for a person; nobody answers automatically.
    Waiting,
    /// This agent (its id and display name).
    Agent { id: String, name: String },
}

/// The owner and its epoch, as stored with a conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    pub owner: Owner,
    /// 0 for a conversation whose owner never changed; +1 at every change.
    pub epoch: u64,
    /// When the owner became this one (ms since the Unix epoch; 0 if never changed).
    pub since_ms: u64,
}

impl Owner {
    /// `assistant`, `waiting` or `agent`: the wire's `owner` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Assistant => "assistant",
            Self::Waiting => "waiting",
            Self::Agent { .. } => "agent",
        }
    }

    /// How the store keeps it: `assistant`, `waiting` or `agent:<id>` (the
    /// name is kept beside it).
    pub fn encode(&self) -> String {
        match self {
            Self::Agent { id, .. } => format!("agent:{id}"),
            other => other.kind().to_owned(),
        }
    }

    /// The stored form back; anything unknown (or nothing) is the assistant.
    pub fn decode(raw: &str, name: &str) -> Self {
        match raw {
            "waiting" => Self::Waiting,
            _ => match raw.strip_prefix("agent:") {
                Some(id) => Self::Agent { id: id.to_owned(), name: name.to_owned() },
                None => Self::Assistant,
            },
        }
    }

    /// The owning agent's id and name.
    pub fn agent(&self) -> Option<(&str, &str)> {
        match self {
            Self::Agent { id, name } => Some((id, name)),
            _ => None,
        }
    }

    pub fn is_agent(&self, id: &str) -> bool {
        self.agent().is_some_and(|(owner, _)| owner == id)
    }

    /// The name the store keeps beside the owner ("" unless an agent).
    pub fn name(&self) -> &str {
        self.agent().map_or("", |(_, name)| name)
    }
}

/// What a `take` does, given the owner now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// The agent owns it already: nothing to do.
    AlreadyMine,
    /// Take it over (`steal`: from another agent).
    Over { steal: bool },
}

/// Why a `take` is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeRefused {
    /// Another agent owns it and the take did not ask to steal.
    AlreadyOwned { agent: String, name: String },
    /// A steal by an agent without steal rights.
    Forbidden,
}

/// The rules of `take` (protocol §14): from the assistant or a waiting
/// customer always; from another agent only with `steal` and steal rights.
pub fn take(current: &Owner, me: &str, steal: bool, may_steal: bool) -> Result<Take, TakeRefused> {
    match current {
        Owner::Assistant | Owner::Waiting => Ok(Take::Over { steal: false }),
        Owner::Agent { id, .. } if id == me => Ok(Take::AlreadyMine),
        Owner::Agent { id, name } if !steal => Err(TakeRefused::AlreadyOwned { agent: id.clone(), name: name.clone() }),
        Owner::Agent { .. } if !may_steal => Err(TakeRefused::Forbidden),
        Owner::Agent { .. } => Ok(Take::Over { steal: true }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str) -> Owner {
        Owner::Agent { id: id.into(), name: id.to_uppercase() }
    }

    #[test]
    fn the_stored_form_round_trips_and_unknown_is_the_assistant() {
        for owner in [Owner::Assistant, Owner::Waiting, agent("anna"), agent("a:b")] {
            assert_eq!(Owner::decode(&owner.encode(), owner.name()), owner);
        }
        assert_eq!(Owner::decode("", ""), Owner::Assistant);
        assert_eq!(Owner::decode("robot", ""), Owner::Assistant);
    }

    #[test]
    fn take_follows_the_steal_rules() {
        assert_eq!(take(&Owner::Assistant, "anna", false, false), Ok(Take::Over { steal: false }));
        assert_eq!(take(&Owner::Waiting, "anna", true, false), Ok(Take::Over { steal: false }));
        assert_eq!(take(&agent("anna"), "anna", false, false), Ok(Take::AlreadyMine));
        assert_eq!(
            take(&agent("bob"), "anna", false, true),
            Err(TakeRefused::AlreadyOwned { agent: "bob".into(), name: "BOB".into() })
        );
        assert_eq!(take(&agent("bob"), "anna", true, false), Err(TakeRefused::Forbidden));
        assert_eq!(take(&agent("bob"), "anna", true, true), Ok(Take::Over { steal: true }));
    }
}
