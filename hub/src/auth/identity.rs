//! Who a verified token says is connecting: the claims the hub reads, and
//! the [`Identity`] a session carries.

use serde::{Deserialize, Serialize};

use super::key::KeyFingerprint;
use crate::ids::{TenantId, UserId};

/// What a connecting party is, from the token's `role` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Agent => "agent",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "customer" => Some(Self::Customer),
            "agent" => Some(Self::Agent),
            _ => None,
        }
    }
}

/// The claims a token must carry (beyond the registered ones the
/// validation checks: `exp`, `nbf`, `aud`, `iss`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The tenant.
    pub tid: String,
    pub role: Role,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// An agent's display name, shown to customers (1–64 characters; the
    /// `sub` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An agent who may take a conversation another agent owns (a steal).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub supervisor: bool,
}

/// Longest display name (`name` claim), in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// Whether `name` may be a display name: 1 to [`MAX_NAME_CHARS`]
/// characters, not blank, no control characters.
pub fn is_display_name(name: &str) -> bool {
    !crate::protocol::is_blank(name) && name.chars().count() <= MAX_NAME_CHARS && !name.chars().any(char::is_control)
}

impl Claims {
    /// The display name: the `name` claim, else the `sub`; `None` when the
    /// claim is not a display name ([`is_display_name`]).
    pub fn display_name(&self) -> Option<String> {
        match &self.name {
            None => Some(self.sub.clone()),
            Some(name) if !is_display_name(name) => None,
            Some(name) => Some(name.clone()),
        }
    }
}

/// A verified identity: every socket authenticated by a token carries one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: TenantId,
    pub user: UserId,
    pub role: Role,
    /// The header's `kid`, when the token had one.
    pub kid: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The key that verified the token: when a reload removes it, the socket closes.
    pub key: KeyFingerprint,
    /// The display name (the `name` claim, else the user id).
    pub name: String,
    /// The `supervisor` claim: this agent may steal conversations.
    pub supervisor: bool,
}

impl Identity {
    /// Whether `other` (a refreshed token's identity) names the same party.
    pub fn same_party(&self, other: &Identity) -> bool {
        self.tenant == other.tenant && self.user == other.user && self.role == other.role
    }
}

/// Seconds since the Unix epoch, as JWTs count time.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
