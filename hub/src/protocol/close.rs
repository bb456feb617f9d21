//! WebSocket close codes the hub sends, with the reason text clients see.

/// A close code and its short reason (reasons must stay under 123 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// The client closed, or the session ended normally.
pub const NORMAL: CloseReason = CloseReason { code: 1000, reason: "bye" };
/// The hub is shutting down; reconnect (to another node).
pub const GOING_AWAY: CloseReason = CloseReason { code: 1001, reason: "hub shutting down" };
/// A frame or message exceeded the transport limit (`max_frame_bytes`).
pub const TOO_BIG: CloseReason = CloseReason { code: 1009, reason: "frame too big" };
/// The hub failed internally; reconnect.
pub const INTERNAL: CloseReason = CloseReason { code: 1011, reason: "internal error" };
/// The socket's token expired and no `refresh` came within `auth.expiry_grace_secs`.
pub const TOKEN_EXPIRED: CloseReason = CloseReason { code: 4001, reason: "token expired" };
/// The key that verified the socket's token was removed from the configuration.
pub const TOKEN_REVOKED: CloseReason = CloseReason { code: 4001, reason: "token key removed" };
/// The requested conversation does not exist for this user; reconnect without it.
pub const CONVERSATION_NOT_FOUND: CloseReason = CloseReason { code: 4004, reason: "conversation not found" };
/// The client did not read fast enough and its outbound queue filled up.
pub const SLOW_CONSUMER: CloseReason = CloseReason { code: 4008, reason: "slow consumer" };
/// Nothing was heard from the client (not even a pong) within `idle_timeout`.
pub const IDLE_TIMEOUT: CloseReason = CloseReason { code: 4010, reason: "idle timeout" };
/// The conversation already has `conversation.max_sockets` sockets on this node.
pub const TOO_MANY_SOCKETS: CloseReason = CloseReason { code: 4409, reason: "too many sockets on this conversation" };
/// The client kept sending frames faster than its rate limit allows.
pub const RATE_LIMITED: CloseReason = CloseReason { code: 4429, reason: "too many frames" };
/// The user hit the cap on conversations created per window
/// (`conversation.max_created_per_user`); reconnecting does not help until it passes.
pub const TOO_MANY_CONVERSATIONS: CloseReason = CloseReason { code: 4430, reason: "too many conversations" };
/// The conversation store could not be reached while the session started.
pub const UNAVAILABLE: CloseReason = CloseReason { code: 4503, reason: "backend unavailable" };
