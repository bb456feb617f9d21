//! Frames a client sends: parsed field by field with a precise error code
//! for each way a frame can be wrong (see `docs/protocol.md` §5).

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;

use super::{ErrorCode, ServerFrame};

/// A frame a client may send.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// A message; `id` is chosen by the client and makes resends
    /// idempotent. An agent's names its `conversation`.
    Message { id: String, text: String, conversation: Option<String> },
    /// Application-level keepalive, answered by `pong`.
    Ping,
    /// Stop a reply in progress; it ends with `reply.done` and `cancelled: true`.
    Cancel { reply: String },
    /// A new token for this socket, before the current one expires.
    Refresh { token: String },
    /// Agents: the conversation's history, then its events live.
    Watch { conversation: String, after: Option<u64> },
    /// Agents: stop a conversation's events.
    Unwatch { conversation: String },
    /// Agents: become the conversation's owner (`steal`: from another agent).
    Take { conversation: String, steal: bool },
    /// Agents: hand the conversation back to the assistant.
    Release { conversation: String },
    /// Customers: ask for a person.
    Handoff,
    /// Agents: a private note about the conversation.
    Note { conversation: String, id: String, text: String },
    /// The sender is typing (`on`) or stopped; an agent's names its
    /// `conversation` and says whether it types a `note`.
    Typing { conversation: Option<String>, on: bool, note: bool },
    /// Agents: the tenant's live conversations, then their changes.
    List,
    /// Agents: stop the list's changes.
    Unlist,
}

impl ClientFrame {
    /// Whether only agents' sockets may send this frame (customers get `forbidden`).
    pub fn is_agents(&self) -> bool {
        matches!(
            self,
            Self::Watch { .. }
                | Self::Unwatch { .. }
                | Self::Take { .. }
                | Self::Release { .. }
                | Self::Note { .. }
                | Self::List
                | Self::Unlist
        )
    }

    /// Whether only customers' sockets may send this frame (agents get `forbidden`).
    pub fn is_customers(&self) -> bool {
        matches!(self, Self::Cancel { .. } | Self::Handoff)
    }

    /// The wire name of the frame's type.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Message { .. } => "message",
            Self::Ping => "ping",
            Self::Cancel { .. } => "cancel",
            Self::Refresh { .. } => "refresh",
            Self::Watch { .. } => "watch",
            Self::Unwatch { .. } => "unwatch",
            Self::Take { .. } => "take",
            Self::Release { .. } => "release",
            Self::Handoff => "handoff",
            Self::Note { .. } => "note",
            Self::Typing { .. } => "typing",
            Self::List => "list",
            Self::Unlist => "unlist",
        }
    }
}

/// Why a client frame was rejected; becomes an `error` frame.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// The client message id, when the frame carried a usable one.
    pub id: Option<String>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), id: None }
    }

    pub fn to_frame(&self) -> Utf8Bytes {
        ServerFrame::Error {
            code: self.code.as_str(),
            message: &self.message,
            id: self.id.as_deref(),
            retry_after_ms: None,
        }
        .encode()
    }
}

/// Longest client message id, in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// How long a message `text` may be.
#[derive(Clone, Copy, Debug)]
pub struct TextLimit {
    /// Unicode code points (`websocket.max_text_chars`).
    pub chars: usize,
    /// UTF-8 bytes (`websocket.max_text_bytes`, the NLP bridge's bound).
    pub bytes: usize,
}

/// Parses one text frame from a client, checking every field.
pub fn parse_client_frame(text: &str, limit: TextLimit) -> Result<ClientFrame, FrameError> {
    let Raw::Object(mut fields) = serde_json::from_str(text).map_err(|e| {
        // Our own words, with where it went wrong; a visitor's error (Data) is a repeated key.
        let (line, column) = (e.line(), e.column());
        match e.classify() {
            serde_json::error::Category::Data => FrameError::new(
                ErrorCode::InvalidFrame,
                format!("a key appears twice in one object (line {line}, column {column})"),
            ),
            _ => FrameError::new(
                ErrorCode::InvalidJson,
                format!("frame is not valid JSON (line {line}, column {column})"),
            ),
        }
    })?
    else {
        return Err(FrameError::new(ErrorCode::InvalidFrame, "frame must be a JSON object"));
    };
    // A field that is `null` counts as absent, for every field.
    let kind = match &fields.kind {
        None | Some(Field::Null) => return Err(FrameError::new(ErrorCode::MissingField, "missing field `type`")),
        Some(Field::Str(kind)) => kind.as_ref(),
        Some(_) => return Err(FrameError::new(ErrorCode::InvalidFrame, "field `type` must be a string")),
    };
    match kind {
        "ping" => Ok(ClientFrame::Ping),
        "cancel" => Ok(ClientFrame::Cancel { reply: take_string(fields.reply.take(), "reply")? }),
        "refresh" => Ok(ClientFrame::Refresh { token: take_string(fields.token.take(), "token")? }),
        "watch" => Ok(ClientFrame::Watch {
            conversation: take_string(fields.conversation.take(), "conversation")?,
            after: take_optional_u64(fields.after.take(), "after")?,
        }),
        "unwatch" => {
            Ok(ClientFrame::Unwatch { conversation: take_string(fields.conversation.take(), "conversation")? })
        }
        "take" => Ok(ClientFrame::Take {
            conversation: take_string(fields.conversation.take(), "conversation")?,
            steal: take_optional_bool(fields.steal.take(), "steal")?,
        }),
        "release" => {
            Ok(ClientFrame::Release { conversation: take_string(fields.conversation.take(), "conversation")? })
        }
        "handoff" => Ok(ClientFrame::Handoff),
        "list" => Ok(ClientFrame::List),
        "unlist" => Ok(ClientFrame::Unlist),
        "typing" => Ok(ClientFrame::Typing {
            conversation: match fields.conversation.take() {
                None | Some(Field::Null) => None,
                field => Some(take_string(field, "conversation")?),
            },
            on: match fields.on.take() {
                Some(Field::Bool(on)) => on,
                None | Some(Field::Null) => return Err(FrameError::new(ErrorCode::MissingField, "missing field `on`")),
                Some(_) => return Err(FrameError::new(ErrorCode::InvalidFrame, "field `on` must be a boolean")),
            },
            note: take_optional_bool(fields.note.take(), "note")?,
        }),
        "message" | "note" => {
            let id = take_string(fields.id.take(), "id")?;
            if id.is_empty() || id.len() > MAX_MESSAGE_ID_LEN || id.chars().any(char::is_control) {
                return Err(FrameError::new(
                    ErrorCode::InvalidId,
                    format!("`id` must be 1 to {MAX_MESSAGE_ID_LEN} bytes, without control characters"),
                ));
            }
            let with_id = |mut e: FrameError| {
                e.id = Some(id.clone());
                e
            };
            let text = take_string(fields.text.take(), "text").map_err(with_id)?;
            if is_blank(&text) {
                return Err(with_id(FrameError::new(ErrorCode::EmptyText, "`text` must not be empty")));
            }
            if text.len() > limit.bytes {
                return Err(with_id(FrameError::new(
                    ErrorCode::TextTooLong,
                    format!("`text` must be at most {} bytes of UTF-8", limit.bytes),
                )));
            }
            if text.chars().count() > limit.chars {
                return Err(with_id(FrameError::new(
                    ErrorCode::TextTooLong,
                    format!("`text` must be at most {} characters", limit.chars),
                )));
            }
            let conversation = match fields.conversation.take() {
                None | Some(Field::Null) => None,
                field => Some(take_string(field, "conversation").map_err(with_id)?),
            };
            match (kind, conversation) {
                ("note", Some(conversation)) => Ok(ClientFrame::Note { conversation, id, text }),
                ("note", None) => {
                    Err(with_id(FrameError::new(ErrorCode::MissingField, "missing field `conversation`")))
                }
                (_, conversation) => Ok(ClientFrame::Message { id, text, conversation }),
            }
        }
        other => {
            let shown: String = other.chars().take(40).collect();
            Err(FrameError::new(ErrorCode::UnknownType, format!("unknown frame type `{shown}`")))
        }
    }
}

/// Whether a message text shows nothing: every character is Unicode
/// White_Space (spaces of every script, U+00A0, U+3000, line breaks, …) or
/// one of the invisible zero-width characters below.
pub fn is_blank(text: &str) -> bool {
    const ZERO_WIDTH: [char; 6] = [
        '\u{180E}', // Mongolian vowel separator (White_Space before Unicode 6.3)
        '\u{200B}', // zero width space
        '\u{200C}', // zero width non-joiner
        '\u{200D}', // zero width joiner
        '\u{2060}', // word joiner
        '\u{FEFF}', // zero width no-break space (byte order mark)
    ];
    text.chars().all(|c| c.is_whitespace() || ZERO_WIDTH.contains(&c))
}

fn take_string(field: Option<Field<'_>>, name: &str) -> Result<String, FrameError> {
    match field {
        None | Some(Field::Null) => Err(FrameError::new(ErrorCode::MissingField, format!("missing field `{name}`"))),
        Some(Field::Str(s)) => Ok(s.into_owned()),
        Some(_) => Err(FrameError::new(ErrorCode::InvalidFrame, format!("field `{name}` must be a string"))),
    }
}

/// An optional boolean field; absent or `null` is false.
fn take_optional_bool(field: Option<Field<'_>>, name: &str) -> Result<bool, FrameError> {
    match field {
        None | Some(Field::Null) => Ok(false),
        Some(Field::Bool(value)) => Ok(value),
        Some(_) => Err(FrameError::new(ErrorCode::InvalidFrame, format!("field `{name}` must be a boolean"))),
    }
}

fn take_optional_u64(field: Option<Field<'_>>, name: &str) -> Result<Option<u64>, FrameError> {
    match field {
        None | Some(Field::Null) => Ok(None),
        Some(Field::U64(n)) => Ok(Some(n)),
        Some(_) => {
            Err(FrameError::new(ErrorCode::InvalidFrame, format!("field `{name}` must be a non-negative integer")))
        }
    }
}

/// One JSON value of a client frame, read without building a
/// `serde_json::Value` (whose map and keys cost several allocations for
/// every message): an object keeps just the fields we read, a string is
/// borrowed from the text when it needs no unescaping, anything else is
/// checked and dropped. Every value, skipped ones too, goes through
/// serde_json's checks (nesting depth, number range, lone surrogates):
/// serde's `IgnoredAny` would skip them unchecked.
#[allow(
    clippy::large_enum_variant,
    reason = "lives on the stack while one frame parses; boxing the object would allocate for every frame"
)]
enum Raw<'a> {
    Object(RawFields<'a>),
    Str(std::borrow::Cow<'a, str>),
    U64(u64),
    Bool(bool),
    Null,
    Other,
}

/// The fields of an object we read. A key may appear once per object: a
/// repeated key fails the parse (a filter in front of the hub may read the
/// first value where a JSON library keeps the last).
#[derive(Default)]
struct RawFields<'a> {
    kind: Option<Field<'a>>,
    id: Option<Field<'a>>,
    text: Option<Field<'a>>,
    reply: Option<Field<'a>>,
    token: Option<Field<'a>>,
    conversation: Option<Field<'a>>,
    after: Option<Field<'a>>,
    steal: Option<Field<'a>>,
    on: Option<Field<'a>>,
    note: Option<Field<'a>>,
}

/// A field's value: a string, null, or anything else (an error for every
/// field we read).
enum Field<'a> {
    Str(std::borrow::Cow<'a, str>),
    U64(u64),
    Bool(bool),
    Null,
    Other,
}

impl<'a> From<Raw<'a>> for Field<'a> {
    fn from(raw: Raw<'a>) -> Self {
        match raw {
            Raw::Str(s) => Field::Str(s),
            Raw::U64(n) => Field::U64(n),
            Raw::Bool(b) => Field::Bool(b),
            Raw::Null => Field::Null,
            Raw::Object(_) | Raw::Other => Field::Other,
        }
    }
}

impl<'de> Deserialize<'de> for Raw<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                use serde::de::Error;
                let mut fields = RawFields::default();
                // Keys we do not read, to refuse their repetition too; only
                // allocated for a frame that has such keys (SipHash: a
                // client cannot pick colliding keys).
                let mut others: Option<std::collections::HashSet<std::borrow::Cow<'de, str>>> = None;
                // (`Raw`, not `Cow<str>`, for the key: serde's `Cow` never borrows.)
                while let Some(key) = map.next_key::<Raw<'de>>()? {
                    let value: Raw<'de> = map.next_value()?;
                    let Raw::Str(key) = key else { continue };
                    let slot = match key.as_ref() {
                        "type" => &mut fields.kind,
                        "id" => &mut fields.id,
                        "text" => &mut fields.text,
                        "reply" => &mut fields.reply,
                        "token" => &mut fields.token,
                        "conversation" => &mut fields.conversation,
                        "after" => &mut fields.after,
                        "steal" => &mut fields.steal,
                        "on" => &mut fields.on,
                        "note" => &mut fields.note,
                        _ => {
                            if !others.get_or_insert_default().insert(key) {
                                return Err(A::Error::custom("repeated key"));
                            }
                            continue;
                        }
                    };
                    if slot.replace(value.into()).is_some() {
                        return Err(A::Error::custom("repeated key"));
                    }
                }
                Ok(Raw::Object(fields))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<Raw<'de>>()?.is_some() {}
                Ok(Raw::Other)
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Raw::Str(s.into()))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Raw::Str(s.to_owned().into()))
            }
            fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
                Ok(Raw::Str(s.into()))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Raw::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
                Ok(Raw::Bool(b))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Raw::Other)
            }
            fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
                Ok(Raw::U64(n))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Raw::Other)
            }
        }
        deserializer.deserialize_any(RawVisitor)
    }
}

#[cfg(test)]
mod tests;
