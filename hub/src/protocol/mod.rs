//! The WebSocket wire protocol: frame shapes, error codes and close codes.
//!
//! Everything a client can observe by name lives here, so the contract in
//! `docs/protocol.md` has one place in the code. Client frames are parsed
//! with precise error codes; server frames are serialized once into
//! [`Utf8Bytes`](axum::extract::ws::Utf8Bytes) and shared by every socket
//! that receives them.

mod client;
pub mod close;
mod server;

use serde::{Deserialize, Serialize};

pub use client::{ClientFrame, FrameError, MAX_MESSAGE_ID_LEN, TextLimit, is_blank, parse_client_frame};
pub use server::{DeltaEncoder, LastEvent, ReplyTiming, ServerFrame, Summary, Viewer};

/// Who wrote a durable event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Assistant,
    Agent,
    System,
}

/// Stable, snake_case error codes sent in `error` frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    InvalidJson,
    /// The frame is JSON but not an object, a field has the wrong type, or
    /// a key appears twice in one object.
    InvalidFrame,
    /// A required field is absent.
    MissingField,
    /// `type` names no frame the hub knows.
    UnknownType,
    /// A message `id` is empty or too long.
    InvalidId,
    /// A message `text` is empty or shows nothing ([`is_blank`]).
    EmptyText,
    /// A message `text` is longer than `max_text_chars` characters or
    /// `max_text_bytes` bytes.
    TextTooLong,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
    /// Too many questions of this socket are waiting for an answer.
    TooManyPending,
    /// The conversation store is unreachable; the message was NOT stored.
    Unavailable,
    /// The requested conversation does not exist for this user (then close 4004).
    ConversationNotFound,
    /// The conversation's log was lost and recreated (new epoch): events
    /// before it cannot be replayed.
    HistoryLost,
    /// The socket sent frames faster than `websocket.max_frames_per_second`
    /// allows; the frame was ignored (a message was NOT stored).
    RateLimited,
    /// The conversation already has `conversation.max_sockets` sockets on
    /// this hub node (then close 4409).
    TooManySockets,
    /// The user created `conversation.max_created_per_user` conversations
    /// within the window; the message was NOT stored (then close 4430).
    TooManyConversations,
    /// The socket's token has expired: the message was NOT stored; send
    /// `refresh` (or reconnect with a new token).
    TokenExpired,
    /// A `refresh` token names another tenant, user or role than the socket's.
    IdentityMismatch,
    /// `refresh` on a socket that was not opened with a token.
    RefreshNotApplicable,
    /// A frame this socket's role may not send (a customer frame on an
    /// agent's socket, an agent frame on a customer's).
    Forbidden,
    /// A `watch` beyond `agents.max_watched`.
    TooManyWatched,
    /// An agent's `message` or `release` in a conversation it does not own.
    NotOwner,
    /// A `take` (without `steal`) of a conversation another agent owns.
    AlreadyOwned,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidFrame => "invalid_frame",
            Self::MissingField => "missing_field",
            Self::UnknownType => "unknown_type",
            Self::InvalidId => "invalid_id",
            Self::EmptyText => "empty_text",
            Self::TextTooLong => "text_too_long",
            Self::BinaryNotSupported => "binary_not_supported",
            Self::TooManyPending => "too_many_pending",
            Self::Unavailable => "unavailable",
            Self::ConversationNotFound => "conversation_not_found",
            Self::HistoryLost => "history_lost",
            Self::RateLimited => "rate_limited",
            Self::TooManySockets => "too_many_sockets",
            Self::TooManyConversations => "too_many_conversations",
            Self::TokenExpired => "token_expired",
            Self::IdentityMismatch => "identity_mismatch",
            Self::RefreshNotApplicable => "refresh_not_applicable",
            Self::Forbidden => "forbidden",
            Self::TooManyWatched => "too_many_watched",
            Self::NotOwner => "not_owner",
            Self::AlreadyOwned => "already_owned",
        }
    }
}
