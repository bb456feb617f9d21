//! The Redis wire: every payload nodes publish on a conversation's channel,
//! and the bytes of a durable event in its log. Both are defined here only.
//!
//! # Channels
//!
//! Each conversation has one pub/sub channel ([`Keys::channel`]), which a
//! node subscribes while it has a socket of the conversation. Every payload
//! on it is one [`Payload`], its kind told by its first byte:
//!
//! | payload | bytes | published by | why |
//! |---|---|---|---|
//! | [`Payload::Event`] | `E<node>\n<timing>\n<log epoch>\n<entry>` | `append.lua`, in the call that stores the event, when another node listens, and always for the event that creates a log (seq 1: nodes with sockets of a lost conversation learn of its new log) | every durable event (customer message, reply) reaches the other nodes' sockets; `<node>` is the appending node (its own sockets had the event at once, so it skips the echo); `<timing>` (JSON, or empty) rides along to a reply's `reply.done`; `<log epoch>` is the epoch of the log it was stored in (the cursors' incarnation, [`LogEpoch`](crate::event::LogEpoch)); `<entry>` is the log entry, byte for byte |
//! | [`Payload::Frame`] | `f<node>\n<log> <owner epoch>\n<frame>` | the node streaming a reply, from its publisher task, when another node listens | a server frame that is not stored (`reply.delta`, `queued`), already encoded for sockets and passed on as it is; the node that sent it skips its own echo. `<log> <owner epoch>` (both decimal) is what the reply was asked under ([`OwnerEpoch`]: the digest of its log's epoch, XXH3-64 with seed 0 of the epoch's bytes, and the owner epoch in that log), for the fences of the fan-out and the writers |
//! | [`Payload::Note`] | `N<node>\n<note>` | `note.lua`, in the call that stores the note, when another node listens | an agents' private note reaches the other nodes' agents (never a customer's socket); `<note>` is the stored note, byte for byte |
//! | [`Payload::Typing`] | `T<node>\n<typing>` | the typist's node, from its publisher task, when another node listens | someone is typing (or stopped): each node holds it until it expires and tells its sockets ([`crate::presence`]); `<typing>` is a [`Typing`] as JSON |
//! | [`Payload::Presence`] | `P<node>\n<entry>` | a node whose entry of the conversation changed (a socket came or went), in the pipeline that writes it | the other nodes' agents see who is there at once; `<entry>` is a [`Present`] as JSON, empty when the node has none left |
//! | [`Payload::Hello`] | `H` | a node that starts listening to the conversation | nodes that stopped publishing the conversation's deltas because no other node listened publish them again |
//!
//! Node ids are ASCII letters and digits ([`NodeId`]), log epochs
//! ([`crate::ids::generate_token`]) hex digits, and timings compact
//! JSON: none holds a raw `\n`, so the first `\n`s split a payload
//! without escaping (what comes last, an entry or a frame, is taken whole),
//! and a delta is published with one allocation and received without
//! copying its frame. A payload published by a node comes back to that node
//! too when it listens to the conversation: [`published_by`] tells it so
//! from the first bytes, without decoding the rest.
//!
//! ```text
//!  node A (customer)                Redis                         node B (agent)
//!  message ──▶ EVALSHA append.lua ─▶ RPUSH entry; another node listens?
//!  ack + `message` locally at once ◀─ seq ┘  └ yes: PUBLISH E<A>… ─▶ `message` to its sockets
//!                                               (echo to A: skipped unread)
//!  reply.delta locally ──▶ PUBLISH f<A>\n… ────────────────────────▶ `reply.delta` to its sockets
//!                                                                    (first socket of a conversation:)
//!  publishes deltas again ◀──── HSET listeners B; PUBLISH H ◀─────── says hello, then subscribes
//! ```
//!
//! # The log entry
//!
//! A durable event is stored as [`StoredEvent`]'s JSON (serde), encoded once
//! by the hub. Its seq is assigned inside the atomic append, so the hub hands
//! `append.lua` the entry cut around the seq ([`EncodedEvent`]) and the script
//! splices the number in, stores the result and publishes it: Lua never
//! decodes nor re-encodes an event.
//!
//! [`Keys::channel`]: super::keys::Keys::channel

use axum::extract::ws::Utf8Bytes;
use bytes::{Buf, Bytes};

use crate::event::{LogEpoch, OwnerEpoch};
use crate::ids::generate_token;
use crate::presence::{Present, Typing};
use crate::protocol::ReplyTiming;
use crate::store::{StoredEvent, StoredNote};

/// How a note's agent and id are written in its stored JSON (`,"agent":"…",`
/// and `,"id":"…",`), for `note.lua` to find a resend by: no field's value
/// can hold either, since every quote in a value is escaped.
pub fn note_author_and_id(note: &StoredNote) -> (String, String) {
    let json = |value: &str| serde_json::to_string(value).expect("strings always serialize");
    (format!(",\"agent\":{},", json(&note.agent)), format!(",\"id\":{},", json(&note.id)))
}

/// A note encoded for `note.lua`, which splices in `"seq":<n>,"after":<m>`
/// before it: the note's JSON after its `after` field.
pub fn note_tail(note: &StoredNote) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"seq\":0,\"after\":0";
    let json = serde_json::to_vec(&StoredNote { seq: 0, after: 0, ..note.clone() }).expect("notes always serialize");
    debug_assert!(json.starts_with(HEAD), "seq and after are a note's first fields");
    json[HEAD.len()..].to_vec()
}

/// Kind bytes, first of every payload.
const EVENT: u8 = b'E';
const FRAME: u8 = b'f';
const HELLO: u8 = b'H';
const NOTE: u8 = b'N';
const TYPING: u8 = b'T';
const PRESENCE: u8 = b'P';

/// A payload that is not one this module encodes.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty payload")]
    Empty,
    #[error("unknown payload kind {0:#04x}")]
    UnknownKind(u8),
    #[error("`{0}` payload cut short")]
    Truncated(char),
    #[error("`{0}` payload with unexpected bytes")]
    Trailing(char),
    #[error("node id is not ASCII letters and digits")]
    NodeId,
    #[error("a frame's log and owner epoch are not two decimal numbers")]
    Epoch,
    #[error("frame is not UTF-8")]
    NotUtf8,
    #[error("timing does not parse: {0}")]
    Timing(serde_json::Error),
    #[error("event does not parse: {0}")]
    Event(serde_json::Error),
    #[error("typing or presence does not parse: {0}")]
    Signal(serde_json::Error),
}

/// One hub node in a cluster, as payloads name it: fresh at every start,
/// never empty, ASCII letters and digits only (so never `\n` nor `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId(Utf8Bytes);

impl NodeId {
    pub fn generate() -> Self {
        Self(generate_token().into())
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    fn parse(raw: Bytes) -> Result<Self, WireError> {
        if raw.is_empty() || !raw.iter().all(u8::is_ascii_alphanumeric) {
            return Err(WireError::NodeId);
        }
        Utf8Bytes::try_from(raw).map(Self).map_err(|_| WireError::NodeId)
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One payload on a conversation's channel (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A durable event, as stored, from the node that appended it.
    Event { node: NodeId, timing: Option<ReplyTiming>, log_epoch: String, event: StoredEvent },
    /// A server frame that is not stored, as sockets receive it, of a reply
    /// asked under `asked`.
    Frame { node: NodeId, frame: Utf8Bytes, asked: OwnerEpoch },
    /// An agents' note, as stored, from the node that stored it.
    Note { node: NodeId, note: StoredNote },
    /// Someone typing, from the typist's node.
    Typing { node: NodeId, typing: Typing },
    /// A node's presence entry (empty: it has none left).
    Presence { node: NodeId, entry: Present },
    /// A node started listening.
    Hello,
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Payload::Event { node, timing, log_epoch, event } => {
                let mut out = event_head(node, timing.as_ref());
                out.extend_from_slice(log_epoch.as_bytes());
                out.push(b'\n');
                serde_json::to_writer(&mut out, event).expect("stored events always serialize");
                out
            }
            Payload::Frame { node, frame, asked } => Self::encode_frame(node, frame, *asked),
            Payload::Note { node, note } => {
                let mut out = vec![NOTE];
                out.extend_from_slice(node.as_str().as_bytes());
                out.push(b'\n');
                serde_json::to_writer(&mut out, note).expect("notes always serialize");
                out
            }
            Payload::Typing { node, typing } => signal(TYPING, node, Some(typing)),
            Payload::Presence { node, entry } => signal(PRESENCE, node, Some(entry).filter(|e| !e.is_empty())),
            Payload::Hello => vec![HELLO],
        }
    }

    /// Encodes a [`Payload::Frame`] from borrowed parts (the hot path: one
    /// allocation per delta, no clone).
    pub fn encode_frame(node: &NodeId, frame: &str, asked: OwnerEpoch) -> Vec<u8> {
        let (mut log_digits, mut epoch_digits) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (log, epoch) = (log_digits.format(asked.log.digest()), epoch_digits.format(asked.epoch));
        let mut out = Vec::with_capacity(4 + node.as_str().len() + log.len() + epoch.len() + frame.len());
        out.push(FRAME);
        out.extend_from_slice(node.as_str().as_bytes());
        out.push(b'\n');
        out.extend_from_slice(log.as_bytes());
        out.push(b' ');
        out.extend_from_slice(epoch.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(frame.as_bytes());
        out
    }

    /// Decodes a payload; a frame is sliced out of `payload`, not copied.
    pub fn decode(payload: Bytes) -> Result<Self, WireError> {
        let kind = *payload.first().ok_or(WireError::Empty)?;
        let mut rest = payload.slice(1..);
        match kind {
            EVENT => {
                let node = NodeId::parse(split_line(&mut rest, 'E')?)?;
                let timing = split_line(&mut rest, 'E')?;
                let log_epoch = split_line(&mut rest, 'E')?;
                Ok(Payload::Event {
                    node,
                    timing: match timing.is_empty() {
                        true => None,
                        false => Some(serde_json::from_slice(&timing).map_err(WireError::Timing)?),
                    },
                    log_epoch: String::from_utf8(log_epoch.to_vec()).map_err(|_| WireError::NotUtf8)?,
                    event: decode_entry(&rest)?,
                })
            }
            FRAME => {
                let node = NodeId::parse(split_line(&mut rest, 'f')?)?;
                let asked = split_line(&mut rest, 'f')?;
                let (log, epoch) = std::str::from_utf8(&asked)
                    .ok()
                    .and_then(|asked| asked.split_once(' '))
                    .and_then(|(log, epoch)| Some((log.parse().ok()?, epoch.parse().ok()?)))
                    .ok_or(WireError::Epoch)?;
                let frame = Utf8Bytes::try_from(rest).map_err(|_| WireError::NotUtf8)?;
                Ok(Payload::Frame { node, frame, asked: OwnerEpoch { log: LogEpoch::from_digest(log), epoch } })
            }
            NOTE => {
                let node = NodeId::parse(split_line(&mut rest, 'N')?)?;
                Ok(Payload::Note { node, note: serde_json::from_slice(&rest).map_err(WireError::Event)? })
            }
            TYPING => {
                let node = NodeId::parse(split_line(&mut rest, 'T')?)?;
                Ok(Payload::Typing { node, typing: serde_json::from_slice(&rest).map_err(WireError::Signal)? })
            }
            PRESENCE => {
                let node = NodeId::parse(split_line(&mut rest, 'P')?)?;
                let entry = match rest.is_empty() {
                    true => Present::default(),
                    false => serde_json::from_slice(&rest).map_err(WireError::Signal)?,
                };
                Ok(Payload::Presence { node, entry })
            }
            HELLO if rest.is_empty() => Ok(Payload::Hello),
            HELLO => Err(WireError::Trailing('H')),
            other => Err(WireError::UnknownKind(other)),
        }
    }
}

/// A durable event encoded for `append.lua`, which assigns its seq: the log
/// entry is [`EncodedEvent::entry_head`] + seq + [`EncodedEvent::entry_tail`],
/// and the payload published is [`EncodedEvent::payload_head`] + the log's
/// epoch + `\n` + that entry ([`Payload::Event`]). All three parts are
/// slices of one buffer, written once.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// The payload head, then the event's JSON.
    bytes: Vec<u8>,
    /// Where the JSON starts.
    entry_at: usize,
    /// The seq's digits in the JSON, cut out.
    seq: std::ops::Range<usize>,
}

impl EncodedEvent {
    /// Encodes `event` with its seq cut out (whatever it is: the script
    /// assigns the one stored).
    pub fn new(event: &StoredEvent, node: &NodeId, timing: Option<&ReplyTiming>) -> Self {
        const SEQ_KEY: &[u8] = b"\"seq\":";
        let mut bytes = event_head(node, timing);
        let entry_at = bytes.len();
        serde_json::to_writer(&mut bytes, event).expect("stored events always serialize");
        // The first `"seq":` is the key: inside a JSON string every `"` is escaped.
        let seq_at =
            bytes[entry_at..].windows(SEQ_KEY.len()).position(|w| w == SEQ_KEY).expect("a stored event has a seq")
                + entry_at
                + SEQ_KEY.len();
        let digits = itoa::Buffer::new().format(event.seq).len();
        Self { bytes, entry_at, seq: seq_at..seq_at + digits }
    }

    /// `E<node>\n<timing>\n`: what the published payload starts with.
    pub fn payload_head(&self) -> &[u8] {
        &self.bytes[..self.entry_at]
    }

    /// The log entry before its seq.
    pub fn entry_head(&self) -> &[u8] {
        &self.bytes[self.entry_at..self.seq.start]
    }

    /// The log entry after its seq.
    pub fn entry_tail(&self) -> &[u8] {
        &self.bytes[self.seq.end..]
    }

    /// Bytes in all three parts.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Decodes one log entry.
pub fn decode_entry(entry: &[u8]) -> Result<StoredEvent, WireError> {
    serde_json::from_slice(entry).map_err(WireError::Event)
}

/// Whether `payload` is an event or a frame `node` published (its own
/// echo), read from its first bytes only.
pub fn published_by(payload: &[u8], node: &NodeId) -> bool {
    let node = node.as_str().as_bytes();
    matches!(payload.first(), Some(&(EVENT | FRAME | NOTE | TYPING | PRESENCE)))
        && payload.get(1..=node.len()) == Some(node)
        && payload.get(node.len() + 1) == Some(&b'\n')
}

/// `<kind><node>\n<json>` (nothing after the `\n` for `None`).
fn signal(kind: u8, node: &NodeId, value: Option<&impl serde::Serialize>) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(node.as_str().as_bytes());
    out.push(b'\n');
    if let Some(value) = value {
        serde_json::to_writer(&mut out, value).expect("typing and presence always serialize");
    }
    out
}

/// `E<node>\n<timing>\n`, what a published event starts with.
fn event_head(node: &NodeId, timing: Option<&ReplyTiming>) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.push(EVENT);
    out.extend_from_slice(node.as_str().as_bytes());
    out.push(b'\n');
    if let Some(timing) = timing {
        serde_json::to_writer(&mut out, timing).expect("timings always serialize");
    }
    out.push(b'\n');
    out
}

/// Takes the bytes before the next `\n` off `rest`, and the `\n`.
fn split_line(rest: &mut Bytes, kind: char) -> Result<Bytes, WireError> {
    let end = rest.iter().position(|b| *b == b'\n').ok_or(WireError::Truncated(kind))?;
    let line = rest.split_to(end);
    rest.advance(1);
    Ok(line)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::Role;

    fn node(raw: &str) -> NodeId {
        NodeId::parse(Bytes::copy_from_slice(raw.as_bytes())).unwrap()
    }

    fn event(seq: u64, text: &str) -> StoredEvent {
        StoredEvent {
            seq,
            from: Role::Assistant,
            id: "r-1".into(),
            text: text.into(),
            fallback: false,
            interrupted: true,
            cancelled: false,
            at_ms: 1_700_000_000_123,
            agent: None,
            name: None,
            event: None,
            owner_epoch: None,
        }
    }

    fn timing() -> ReplyTiming {
        ReplyTiming {
            hub_before_nlp_ms: 1.5,
            queue_ms: 0.0,
            nlp_first_token_ms: 12.25,
            total_ms: 40.0,
            ..Default::default()
        }
    }

    fn asked(epoch: u64) -> OwnerEpoch {
        OwnerEpoch { log: LogEpoch::of("5e1b7c9d2a4f"), epoch }
    }

    fn round_trip(payload: Payload) {
        let encoded = payload.encode();
        assert_eq!(Payload::decode(Bytes::from(encoded)).unwrap(), payload);
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(Payload::Hello);
        round_trip(Payload::Frame {
            node: node("a1b2c3d4e5f6"),
            frame: r#"{"type":"reply.delta","i":0}"#.into(),
            asked: asked(0),
        });
        round_trip(Payload::Frame { node: node("n"), frame: "".into(), asked: asked(0) });
        round_trip(Payload::Frame { node: node("n"), frame: "x\ny".into(), asked: asked(7) });
        let max = OwnerEpoch { log: LogEpoch::from_digest(u64::MAX), epoch: u64::MAX };
        round_trip(Payload::Frame { node: node("n"), frame: "x".into(), asked: max });
        let note = StoredNote {
            seq: 3,
            after: 9,
            agent: "anna".into(),
            name: "Anna \"A\"".into(),
            id: "n1".into(),
            text: "VIP\ncustomer".into(),
            at_ms: 5,
        };
        round_trip(Payload::Note { node: node("ab"), note: note.clone() });
        let agent = crate::presence::Typist::Agent { agent: "anna".into(), name: "Anna\n".into() };
        round_trip(Payload::Typing {
            node: node("ab"),
            typing: Typing { typist: agent, on: true, note: true, to_customer: false },
        });
        let customer = crate::presence::Typist::Customer;
        round_trip(Payload::Typing {
            node: node("ab"),
            typing: Typing { typist: customer, on: false, note: false, to_customer: false },
        });
        let viewers = vec![crate::protocol::Viewer { agent: "a".into(), name: "A".into() }];
        round_trip(Payload::Presence { node: node("ab"), entry: Present { online: true, viewers, typing: true } });
        assert_eq!(Payload::Presence { node: node("ab"), entry: Present::default() }.encode(), b"Pab\n");
        round_trip(Payload::Presence { node: node("ab"), entry: Present::default() });
        // What note.lua stores: its head spliced before the tail decodes as the note.
        let mut entry = br#"{"seq":3,"after":9"#.to_vec();
        entry.extend(note_tail(&note));
        assert_eq!(serde_json::from_slice::<StoredNote>(&entry).unwrap(), note);
        let asked = OwnerEpoch { log: LogEpoch::from_digest(7), epoch: 12 };
        let fenced = Payload::Frame { node: node("ab"), frame: "{}".into(), asked }.encode();
        assert_eq!(fenced, b"fab\n7 12\n{}");
        assert!(published_by(&fenced, &node("ab")));
        round_trip(Payload::Event {
            node: node("a1b2c3"),
            timing: Some(timing()),
            log_epoch: "5e1b7c9d2a4f".into(),
            event: event(7, "hi \"seq\":1\n"),
        });
        round_trip(Payload::Event { node: node("n"), timing: None, log_epoch: "e".into(), event: event(1, "") });
    }

    #[test]
    fn the_wire_bytes_are_the_documented_ones() {
        let asked = OwnerEpoch { log: LogEpoch::of(""), epoch: 0 };
        let frame = Payload::Frame { node: node("abc"), frame: r#"{"type":"queued"}"#.into(), asked };
        assert_eq!(frame.encode(), b"fabc\n3244421341483603138 0\n{\"type\":\"queued\"}");
        assert_eq!(Payload::Hello.encode(), b"H");
        let published =
            Payload::Event { node: node("abc"), timing: None, log_epoch: "a07c".into(), event: event(3, "x") }.encode();
        assert_eq!(
            String::from_utf8(published).unwrap(),
            "Eabc\n\na07c\n{\"seq\":3,\"from\":\"assistant\",\"id\":\"r-1\",\"text\":\"x\",\"interrupted\":true,\"at_ms\":1700000000123}"
        );
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let decode = |raw: &[u8]| Payload::decode(Bytes::copy_from_slice(raw)).unwrap_err();
        assert!(matches!(decode(b""), WireError::Empty));
        assert!(matches!(decode(b"D{\"type\":\"queued\"}"), WireError::UnknownKind(b'D')));
        assert!(matches!(decode(b"x"), WireError::UnknownKind(b'x')));
        assert!(matches!(decode(b"Hx"), WireError::Trailing('H')));
        assert!(matches!(decode(b"fabc"), WireError::Truncated('f')));
        assert!(matches!(decode(b"f\n1 0\n{}"), WireError::NodeId));
        assert!(matches!(decode(b"fa/b\n1 0\n{}"), WireError::NodeId));
        assert!(matches!(decode(b"fabc\n1 0\n\xff\xfe"), WireError::NotUtf8));
        assert!(matches!(decode(b"fa\n{}"), WireError::Truncated('f')), "no log and owner epoch");
        assert!(matches!(decode(b"fa\n12\nx"), WireError::Epoch), "no owner epoch");
        assert!(matches!(decode(b"fa\n12 -1\nx"), WireError::Epoch));
        assert!(matches!(decode(b"fa\n12 1 2\nx"), WireError::Epoch));
        assert!(matches!(decode(b"fa\n 1\nx"), WireError::Epoch));
        assert!(matches!(decode(b"E"), WireError::Truncated('E')));
        assert!(matches!(decode(b"Eabc\n"), WireError::Truncated('E')));
        assert!(matches!(decode(b"Eabc/1\n\n{}"), WireError::NodeId));
        assert!(matches!(decode(b"E\n\n{}"), WireError::NodeId));
        assert!(matches!(decode(b"Ea\n{\ne\n{}"), WireError::Timing(_)));
        assert!(matches!(decode(b"Ea\n\n{\"seq\":1}"), WireError::Truncated('E')), "no log epoch");
        assert!(matches!(decode(b"Ea\n\ne\n{\"seq\":1}"), WireError::Event(_)));
        assert!(matches!(decode(b"Ea\n\ne\nnot json"), WireError::Event(_)));
        assert!(matches!(decode(b"Ea\n\n\xff\n{}"), WireError::NotUtf8));
    }

    #[test]
    fn a_node_knows_its_own_payloads_from_their_first_bytes() {
        let (mine, other) = (node("abc"), node("abcd"));
        let delta = Payload::encode_frame(&mine, "{}", asked(0));
        let event =
            Payload::Event { node: mine.clone(), timing: None, log_epoch: "e".into(), event: event(1, "") }.encode();
        assert!(published_by(&delta, &mine) && published_by(&event, &mine));
        assert!(!published_by(&delta, &other) && !published_by(&event, &other));
        assert!(!published_by(&Payload::encode_frame(&other, "{}", asked(0)), &mine), "a longer id is another node");
        assert!(!published_by(b"H", &mine) && !published_by(b"", &mine) && !published_by(b"Eab", &mine));
    }

    #[test]
    fn entries_written_by_lua_cjson_still_decode() {
        let cjson = br#"{"cancelled":false,"interrupted":true,"fallback":false,"text":"x","id":"r-1","at_ms":1700000000123,"from":"assistant","seq":3}"#;
        assert_eq!(decode_entry(cjson).unwrap(), event(3, "x"));
    }

    /// What `append.lua` does with an [`EncodedEvent`].
    fn splice(encoded: &EncodedEvent, seq: u64) -> (Vec<u8>, Vec<u8>) {
        let entry = [encoded.entry_head(), seq.to_string().as_bytes(), encoded.entry_tail()].concat();
        let published = [encoded.payload_head(), b"5e1b7c9d2a4f\n", &entry[..]].concat();
        (entry, published)
    }

    proptest! {
        #[test]
        fn the_script_splices_exactly_what_serde_writes(
            text in any::<String>(),
            id in "[a-z\"\\\\:0-9-]{0,12}",
            flags in any::<(bool, bool, bool)>(),
            placeholder in any::<u64>(),
            seq in 1u64..(1 << 53),
        ) {
            let mut stored = StoredEvent {
                seq: placeholder, from: Role::Customer, id, text,
                fallback: flags.0, interrupted: flags.1, cancelled: flags.2, at_ms: 5, agent: None, name: None, event: None, owner_epoch: None,
            };
            let encoded = EncodedEvent::new(&stored, &node("f00d"), Some(&timing()));
            let (entry, published) = splice(&encoded, seq);
            stored.seq = seq;
            prop_assert_eq!(&entry, &serde_json::to_vec(&stored).unwrap());
            prop_assert_eq!(decode_entry(&entry).unwrap(), stored.clone());
            let payload = Payload::Event { node: node("f00d"), timing: Some(timing()), log_epoch: "5e1b7c9d2a4f".into(), event: stored };
            prop_assert_eq!(&published, &payload.encode());
            prop_assert_eq!(Payload::decode(Bytes::from(published)).unwrap(), payload);
        }

        #[test]
        fn frames_round_trip(frame in any::<String>(), epoch in any::<u64>()) {
            round_trip(Payload::Frame { node: node("a1"), frame: frame.into(), asked: asked(epoch) });
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..64), kind in prop::sample::select(vec![b'E', b'f', b'H'])) {
            let _ = Payload::decode(Bytes::from([&[kind][..], &raw[..]].concat()));
            let _ = Payload::decode(Bytes::from(raw));
        }
    }
}
