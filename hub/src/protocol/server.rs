//! Frames the hub sends: serialized once into `Utf8Bytes` and shared by
//! every socket that receives them; reply deltas have their own fast encoder.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

use super::Role;

/// Where one reply's time went, split between the hub and the NLP service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplyTiming {
    /// Hub: from the message reaching the hub to the NLP request leaving it
    /// (storing, history, hand-over), excluding the wait for an NLP slot.
    pub hub_before_nlp_ms: f64,
    /// Waiting for an NLP slot (admission queue).
    pub queue_ms: f64,
    /// NLP: from the request leaving the hub to its first token (retries included).
    pub nlp_first_token_ms: f64,
    /// Hub: mean time from a token's arrival to its frame being queued for every socket.
    pub relay_mean_us: f64,
    /// Hub: the longest such time.
    pub relay_max_us: f64,
    /// From the message reaching the hub to the reply being complete.
    pub total_ms: f64,
    /// The model's count of the prompt's tokens, when its server reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    /// The model's count of the answer's tokens, when its server reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u32>,
}

/// A frame the hub sends. Encode it once and share the bytes.
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum ServerFrame<'a> {
    #[serde(rename = "ready")]
    Ready { conversation: &'a str, seq: u64, epoch: &'a str },
    #[serde(rename = "ack")]
    Ack {
        /// On agents' sockets only.
        #[serde(skip_serializing_if = "Option::is_none")]
        conversation: Option<&'a str>,
        id: &'a str,
        seq: u64,
    },
    #[serde(rename = "reply.delta")]
    ReplyDelta { conversation: &'a str, reply: &'a str, index: u32, text: &'a str },
    /// The question waits for an NLP slot; `position` 1 is next. Repeated
    /// when the place changes, until the reply's first `reply.delta`.
    #[serde(rename = "queued")]
    Queued { conversation: &'a str, reply: &'a str, position: usize },
    #[serde(rename = "reply.done")]
    ReplyDone {
        conversation: &'a str,
        reply: &'a str,
        seq: u64,
        text: &'a str,
        fallback: bool,
        /// The NLP stream broke after some tokens; the text is what arrived plus the fallback.
        interrupted: bool,
        /// Only present (and true) when a client cancelled the reply.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
        /// Where the reply's time went; only when the asking socket connected with `timing=1`.
        #[serde(skip_serializing_if = "Option::is_none")]
        timing: Option<&'a ReplyTiming>,
    },
    #[serde(rename = "message")]
    Message {
        conversation: &'a str,
        seq: u64,
        from: Role,
        id: &'a str,
        text: &'a str,
        /// Only present (and true) on replayed fallback replies.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        fallback: bool,
        /// Only present (and true) on replayed interrupted replies.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        interrupted: bool,
        /// Only present (and true) on replayed cancelled replies.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
        /// On system events that name an agent: the agent's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<&'a str>,
        /// On agents' messages and system events that name an agent: the display name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        /// On system events: what happened.
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<crate::event::SystemEvent>,
    },
    #[serde(rename = "error")]
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        /// With `rate_limited` for a tenant's message rate: when to send again.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    #[serde(rename = "pong")]
    Pong,
    /// The socket's token expires at `exp` (Unix seconds): send `refresh`.
    #[serde(rename = "token.expiring")]
    TokenExpiring { exp: u64 },
    /// A `refresh` was accepted; the socket's token now expires at `exp`.
    #[serde(rename = "refreshed")]
    Refreshed { exp: u64 },
    /// An agent's socket is open (`role` is always `"agent"`).
    #[serde(rename = "ready")]
    AgentReady { role: &'a str, agent: &'a str, name: &'a str, supervisor: bool },
    /// The snapshot that precedes a watched conversation's events.
    #[serde(rename = "watching")]
    Watching {
        conversation: &'a str,
        customer: &'a str,
        seq: u64,
        epoch: &'a str,
        owner: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        agent_name: Option<&'a str>,
        owner_epoch: u64,
        online: bool,
        viewers: &'a [Viewer],
    },
    /// A watched conversation's owner changed (agents only).
    #[serde(rename = "owner")]
    Owner {
        conversation: &'a str,
        owner: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        agent_name: Option<&'a str>,
        owner_epoch: u64,
    },
    /// A private note (agents only).
    #[serde(rename = "note")]
    Note {
        conversation: &'a str,
        id: &'a str,
        seq: u64,
        after: u64,
        agent: &'a str,
        name: &'a str,
        text: &'a str,
        at: u64,
    },
    /// Someone in the conversation is typing (`on`) or stopped. `agent` and
    /// `note` only on agents' sockets; `name` for an agent typist.
    #[serde(rename = "typing")]
    Typing {
        conversation: &'a str,
        from: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        on: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<bool>,
    },
    /// Who is in a watched conversation (agents only).
    #[serde(rename = "presence")]
    Presence { conversation: &'a str, online: bool, viewers: &'a [Viewer] },
    /// The tenant's live conversations, most recent activity first (agents only).
    #[serde(rename = "conversations")]
    Conversations { conversations: &'a [Summary] },
    /// One conversation entered the list or changed (agents only).
    #[serde(rename = "conversation")]
    Conversation(&'a Summary),
    /// One conversation left the list (agents only).
    #[serde(rename = "conversation.removed")]
    ConversationRemoved { conversation: &'a str },
    /// `already_owned`: the conversation's owner, on an agent's socket.
    #[serde(rename = "error")]
    AlreadyOwned { code: &'a str, message: &'a str, conversation: &'a str, agent: &'a str, agent_name: &'a str },
    /// An `error` about one conversation, on an agent's socket.
    #[serde(rename = "error")]
    ConversationError {
        code: &'a str,
        message: &'a str,
        conversation: &'a str,
        /// The message id, when the refused frame was a `message`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
}

/// A conversation as the agents' live list shows it (`conversations`,
/// `conversation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub conversation: String,
    pub customer: String,
    /// `assistant`, `waiting` or `agent`.
    pub owner: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    pub owner_epoch: u64,
    /// Since when the owner is the one it is (ms since the Unix epoch;
    /// absent if it never changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_since: Option<u64>,
    pub online: bool,
    /// The customer is typing.
    pub typing: bool,
    pub last: Option<LastEvent>,
    pub customer_at: Option<u64>,
    pub viewers: Vec<Viewer>,
}

/// A summary's last durable event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastEvent {
    pub seq: u64,
    pub from: Role,
    /// Cut to [`LastEvent::MAX_CHARS`] characters.
    pub text: String,
    pub at: u64,
}

impl LastEvent {
    /// How much of the last event's text a summary carries.
    pub const MAX_CHARS: usize = 200;
}

/// An agent watching a conversation, as `watching` and `presence` list them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Viewer {
    pub agent: String,
    pub name: String,
}

impl ServerFrame<'_> {
    /// Serializes the frame once; clones of the result share one buffer.
    pub fn encode(&self) -> Utf8Bytes {
        // Serialized into a buffer kept per thread, then copied once into an
        // allocation of the exact length: `to_string` grows its buffer by
        // doubling (half a dozen reallocations for a `reply.done`), and a
        // buffer with spare capacity becomes a `Bytes` with a separately
        // allocated, reference-counted header.
        ENCODE_BUFFER.with_borrow_mut(|buffer| {
            buffer.clear();
            // Serializing these plain structs cannot fail: no maps with non-string keys, no custom impls.
            serde_json::to_writer(&mut *buffer, self).expect("server frames always serialize");
            let frame = Utf8Bytes::from(std::str::from_utf8(buffer).expect("serde_json writes UTF-8").to_owned());
            // One huge frame (a long replayed message) must not stay allocated for the thread's life.
            if buffer.capacity() > MAX_KEPT_ENCODE_BUFFER {
                *buffer = Vec::new();
            }
            frame
        })
    }
}

/// The largest scratch buffer [`ServerFrame::encode`] keeps between frames.
const MAX_KEPT_ENCODE_BUFFER: usize = 64 * 1024;

thread_local! {
    /// [`ServerFrame::encode`]'s scratch buffer.
    static ENCODE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Encodes one reply's `reply.delta` frames, byte for byte what
/// [`ServerFrame::ReplyDelta`] encodes. Everything before the index is the
/// same for every token of a reply, so it is serialized once per reply
/// instead of once per token (the hottest path of the hub).
#[derive(Debug)]
pub struct DeltaEncoder {
    /// `{"type":"reply.delta","conversation":"…","reply":"…","index":`
    prefix: String,
}

impl DeltaEncoder {
    pub fn new(conversation: &str, reply: &str) -> Self {
        let mut prefix = String::with_capacity(64 + conversation.len() + reply.len());
        prefix.push_str(r#"{"type":"reply.delta","conversation":"#);
        push_json_string(&mut prefix, conversation);
        prefix.push_str(r#","reply":"#);
        push_json_string(&mut prefix, reply);
        prefix.push_str(r#","index":"#);
        Self { prefix }
    }

    pub fn encode(&self, index: u32, text: &str) -> Utf8Bytes {
        let mut digits = itoa::Buffer::new();
        let index = digits.format(index);
        const TEXT_FIELD: &str = r#","text":"#;
        // The exact length: a buffer with spare capacity becomes a `Bytes`
        // with a separately allocated, reference-counted header.
        // Most tokens need no escape: then the text is copied as it is.
        let plain = !text.bytes().any(needs_escape);
        let quoted = if plain { text.len() + 2 } else { json_string_len(text) };
        let len = self.prefix.len() + index.len() + TEXT_FIELD.len() + quoted + 1;
        let mut out = String::with_capacity(len);
        out.push_str(&self.prefix);
        out.push_str(index);
        out.push_str(TEXT_FIELD);
        if plain {
            out.push('"');
            out.push_str(text);
            out.push('"');
        } else {
            push_json_string(&mut out, text);
        }
        out.push('}');
        debug_assert_eq!(out.len(), len);
        Utf8Bytes::from(out)
    }
}

/// Whether JSON needs this byte of a string escaped.
fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// The length of `text` as a quoted JSON string from [`push_json_string`].
fn json_string_len(text: &str) -> usize {
    let escapes: usize = text
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0x00..=0x1f => 5,
            _ => 0,
        })
        .sum();
    text.len() + escapes + 2
}

/// Appends `text` as a quoted JSON string, escaped exactly as `serde_json`
/// escapes it (so both encoders give the same bytes). Written out rather
/// than going through `serde_json::to_writer`: this runs for every token, and
/// tokens rarely need an escape, so the common case is one copy.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    let mut start = 0;
    for (i, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` is an ASCII byte, so both slices end on character boundaries.
        out.push_str(&text[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests;
