//! The hub's frames as the load generator reads them, and the verification
//! of one question's answer, fed frame by frame with no socket involved.
//!
//! [`ReplyCheck`] is what `ask` runs for each question. It accepts, in order:
//! the `ack` of the question's id (exactly once, before `reply.done`), any
//! number of `queued` frames before the first delta, `reply.delta` frames
//! with indexes 0, 1, 2, … of one reply id, then `reply.done` of that reply
//! whose text equals the deltas' concatenation. A fallback reply
//! (`fallback: true`) is a failure or an answer depending on
//! [`FallbackPolicy`]; any other frame type is a mismatch, since every
//! client of the load generator is its own user with its own conversation.

use std::time::Duration;

use serde::Deserialize;

use crate::report::{Failed, Failure};

/// Any frame the hub sends; fields a frame type lacks are `None`.
#[derive(Debug, Default, Deserialize)]
pub struct Frame {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: Option<String>,
    pub reply: Option<String>,
    pub index: Option<u64>,
    pub text: Option<String>,
    pub fallback: Option<bool>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub seq: Option<u64>,
    pub conversation: Option<String>,
    pub epoch: Option<String>,
    pub position: Option<u64>,
    pub timing: Option<ReplyTiming>,
}

impl Frame {
    pub fn parse(text: &str) -> serde_json::Result<Frame> {
        serde_json::from_str(text)
    }
}

/// `reply.done.timing` (docs/protocol.md): where one reply's time went, as
/// the hub measured it. Present only for sockets that connected with `timing=1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ReplyTiming {
    /// Message received → NLP request sent (storing, history, hand-over), without the slot wait.
    pub hub_before_nlp_ms: f64,
    /// Waiting for an NLP slot.
    pub queue_ms: f64,
    /// NLP request sent → first token, retries included.
    pub nlp_first_token_ms: f64,
    /// A token's arrival → its frame queued for every socket, mean and max.
    pub relay_mean_us: f64,
    pub relay_max_us: f64,
    /// Message received → reply complete.
    pub total_ms: f64,
}

impl ReplyTiming {
    /// The hub's own share of the time to first token: its work before the
    /// NLP call plus the relay of a token (the slowest one, an upper bound
    /// for the first). The queue wait is reported apart: it is the
    /// admission limit doing its job, not hub work.
    pub fn hub_share_ms(&self) -> f64 {
        self.hub_before_nlp_ms + self.relay_max_us / 1000.0
    }
}

/// The client's `message` frame.
pub fn message_frame(id: &str, text: &str) -> String {
    serde_json::json!({"type": "message", "id": id, "text": text}).to_string()
}

/// Whether a `reply.done` with `fallback: true` fails the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackPolicy {
    /// Closed-loop and steady-rate runs: the NLP service never fails there,
    /// so a fallback means something went wrong.
    Failure,
    /// Peaks: the hub legitimately answers with the polite fallback after
    /// the longest queue wait; such questions are counted apart.
    Counted,
}

/// One question's verified answer. Times are from the question's start
/// (its scheduled send time in open loops).
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    pub ack: Duration,
    pub first_delta: Duration,
    pub done: Duration,
    /// `reply.delta` frames received.
    pub tokens: u64,
    /// `reply.done.seq`.
    pub done_seq: Option<u64>,
    /// The reply is the hub's fallback (only with [`FallbackPolicy::Counted`]).
    pub fallback: bool,
    /// `queued` frames received before the reply started.
    pub queued_frames: u64,
    pub timing: Option<ReplyTiming>,
}

/// Where the answer stands after a frame.
#[derive(Debug, PartialEq)]
pub enum Progress {
    Waiting,
    Answered(Answered),
}

/// Verifies the frames answering one question (see the module doc).
#[derive(Debug)]
pub struct ReplyCheck {
    id: String,
    policy: FallbackPolicy,
    ack: Option<Duration>,
    reply: Option<String>,
    joined: String,
    deltas: u64,
    first_delta: Option<Duration>,
    queued_frames: u64,
    /// A second socket of the conversation: the question arrives as the
    /// customer's `message` instead of the `ack` (its time is `ack`).
    watching: bool,
}

impl ReplyCheck {
    pub fn new(id: &str, policy: FallbackPolicy) -> ReplyCheck {
        ReplyCheck {
            id: id.to_owned(),
            policy,
            ack: None,
            reply: None,
            joined: String::new(),
            deltas: 0,
            first_delta: None,
            queued_frames: 0,
            watching: false,
        }
    }

    /// The check of another socket of the conversation, which sees the
    /// question as a `message` from the customer.
    pub fn watching(id: &str, policy: FallbackPolicy) -> ReplyCheck {
        ReplyCheck { watching: true, ..ReplyCheck::new(id, policy) }
    }

    /// What has arrived so far, for a timeout's detail.
    pub fn state(&self) -> String {
        format!("acked={} queued={} deltas={}", self.ack.is_some(), self.queued_frames, self.deltas)
    }

    fn fail(&self, kind: Failure, what: impl std::fmt::Display) -> Failed {
        Failed::new(kind, format!("{}: {what}", self.id))
    }

    /// A text message received `at` after the question's start.
    pub fn on_text(&mut self, text: &str, at: Duration) -> Result<Progress, Failed> {
        match Frame::parse(text) {
            Ok(frame) => self.on_frame(frame, at),
            Err(e) => Err(self.fail(Failure::Mismatch, format!("frame is not JSON: {e}"))),
        }
    }

    /// One parsed frame received `at` after the question's start.
    pub fn on_frame(&mut self, frame: Frame, at: Duration) -> Result<Progress, Failed> {
        match frame.kind.as_str() {
            "ack" | "message" if (frame.kind == "message") == self.watching => {
                if frame.id.as_deref() != Some(self.id.as_str()) || self.ack.is_some() {
                    return Err(self.fail(Failure::Mismatch, format!("unexpected ack {:?}", frame.id)));
                }
                self.ack = Some(at);
            }
            "queued" => {
                if self.deltas > 0 {
                    return Err(self.fail(Failure::Mismatch, "queued after the reply started"));
                }
                self.same_reply(&frame, "queued")?;
                self.queued_frames += 1;
            }
            "reply.delta" => {
                self.first_delta.get_or_insert(at);
                if frame.index != Some(self.deltas) {
                    let detail = format!("delta index {:?}, expected {}", frame.index, self.deltas);
                    return Err(self.fail(Failure::Mismatch, detail));
                }
                self.same_reply(&frame, "delta")?;
                self.joined.push_str(frame.text.as_deref().unwrap_or_default());
                self.deltas += 1;
            }
            "reply.done" => return self.done(frame, at).map(Progress::Answered),
            "error" => {
                let detail = format!("error {:?} {:?}", frame.code, frame.message);
                let kind = match frame.code.as_deref() {
                    Some("rate_limited") => Failure::RateLimited,
                    _ => Failure::ErrorFrame,
                };
                return Err(self.fail(kind, detail));
            }
            other => return Err(self.fail(Failure::Mismatch, format!("unexpected frame type {other}"))),
        }
        Ok(Progress::Waiting)
    }

    /// `queued` and `reply.delta` frames must all name one reply id.
    fn same_reply(&mut self, frame: &Frame, what: &str) -> Result<(), Failed> {
        match (&self.reply, &frame.reply) {
            (None, Some(reply)) => self.reply = Some(reply.clone()),
            (Some(a), Some(b)) if a == b => {}
            _ => return Err(self.fail(Failure::Mismatch, format!("{what} of another reply {:?}", frame.reply))),
        }
        Ok(())
    }

    fn done(&mut self, frame: Frame, at: Duration) -> Result<Answered, Failed> {
        let Some(ack) = self.ack else {
            return Err(self.fail(Failure::Mismatch, "reply.done before ack"));
        };
        if self.reply.is_some() && frame.reply != self.reply {
            return Err(self.fail(Failure::Mismatch, format!("done of another reply {:?}", frame.reply)));
        }
        if frame.text.as_deref() != Some(self.joined.as_str()) {
            return Err(self.fail(Failure::Mismatch, "deltas do not add up to the done text"));
        }
        let fallback = frame.fallback == Some(true);
        if fallback && self.policy == FallbackPolicy::Failure {
            return Err(self.fail(Failure::Fallback, "fallback reply"));
        }
        Ok(Answered {
            ack,
            first_delta: self.first_delta.unwrap_or(at),
            done: at,
            tokens: self.deltas,
            done_seq: frame.seq,
            fallback,
            queued_frames: self.queued_frames,
            timing: frame.timing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn feed(check: &mut ReplyCheck, frames: &[&str]) -> Result<Progress, Failed> {
        let mut progress = Progress::Waiting;
        for (i, text) in frames.iter().enumerate() {
            progress = check.on_text(text, MS * (i as u32 + 1))?;
        }
        Ok(progress)
    }

    fn delta(index: u64, text: &str) -> String {
        format!(r#"{{"type":"reply.delta","conversation":"c","reply":"r-1","index":{index},"text":"{text}"}}"#)
    }

    fn done(text: &str, fallback: bool) -> String {
        format!(
            r#"{{"type":"reply.done","conversation":"c","reply":"r-1","seq":2,"text":"{text}","fallback":{fallback},"interrupted":false}}"#
        )
    }

    const ACK: &str = r#"{"type":"ack","id":"q1","seq":1}"#;
    const QUEUED: &str = r#"{"type":"queued","conversation":"c","reply":"r-1","position":2}"#;

    fn answered(frames: &[&str], policy: FallbackPolicy) -> Result<Answered, Failed> {
        match feed(&mut ReplyCheck::new("q1", policy), frames)? {
            Progress::Answered(answer) => Ok(answer),
            Progress::Waiting => panic!("no answer after {frames:?}"),
        }
    }

    fn failure(frames: &[&str]) -> (Failure, String) {
        let failed = answered(frames, FallbackPolicy::Failure).expect_err("should fail");
        (failed.kind, failed.detail)
    }

    #[test]
    fn a_whole_reply_is_answered_with_its_times() {
        let (d0, d1, end) = (delta(0, "Hello"), delta(1, " there"), done("Hello there", false));
        let answer = answered(&[ACK, &d0, &d1, &end], FallbackPolicy::Failure).unwrap();
        assert_eq!(answer.ack, MS);
        assert_eq!(answer.first_delta, MS * 2);
        assert_eq!(answer.done, MS * 4);
        assert_eq!(answer.tokens, 2);
        assert_eq!(answer.done_seq, Some(2));
        assert!(!answer.fallback);
        assert_eq!(answer.queued_frames, 0);
        assert_eq!(answer.timing, None);
    }

    #[test]
    fn waiting_until_reply_done() {
        let mut check = ReplyCheck::new("q1", FallbackPolicy::Failure);
        assert_eq!(feed(&mut check, &[ACK, &delta(0, "a")]).unwrap(), Progress::Waiting);
        assert_eq!(check.state(), "acked=true queued=0 deltas=1");
    }

    #[test]
    fn queued_frames_before_the_reply_are_counted() {
        let queued_1 = QUEUED.replace(":2}", ":1}");
        let frames = [ACK, QUEUED, &queued_1, &delta(0, "a"), &done("a", false)];
        let answer = answered(&frames, FallbackPolicy::Failure).unwrap();
        assert_eq!(answer.queued_frames, 2);
        assert_eq!(answer.first_delta, MS * 4);
    }

    #[test]
    fn queued_of_another_reply_or_after_a_delta_is_a_mismatch() {
        let other = QUEUED.replace("r-1", "r-2");
        let (kind, detail) = failure(&[ACK, &other, &delta(0, "a")]);
        assert_eq!(kind, Failure::Mismatch);
        assert!(detail.contains("delta of another reply"), "{detail}");
        let (kind, detail) = failure(&[ACK, &delta(0, "a"), QUEUED]);
        assert_eq!(kind, Failure::Mismatch);
        assert!(detail.contains("queued after the reply started"), "{detail}");
    }

    #[test]
    fn delta_indexes_must_count_from_zero() {
        let (kind, detail) = failure(&[ACK, &delta(1, "a")]);
        assert_eq!(kind, Failure::Mismatch);
        assert_eq!(detail, "q1: delta index Some(1), expected 0");
        let (kind, _) = failure(&[ACK, &delta(0, "a"), &delta(0, "a")]);
        assert_eq!(kind, Failure::Mismatch);
    }

    #[test]
    fn done_must_end_the_reply_of_the_deltas() {
        let other = done("a", false).replace("r-1", "r-2");
        let (kind, detail) = failure(&[ACK, &delta(0, "a"), &other]);
        assert_eq!(kind, Failure::Mismatch);
        assert!(detail.contains("done of another reply"), "{detail}");
        // Without deltas (an empty answer) any reply id will do.
        let answer =
            answered(&[ACK, &other.replace(r#""text":"a""#, r#""text":"""#)], FallbackPolicy::Failure).unwrap();
        assert_eq!((answer.tokens, answer.first_delta, answer.done), (0, MS * 2, MS * 2));
    }

    #[test]
    fn the_ready_frame_names_conversation_and_epoch() {
        let ready = r#"{"type":"ready","conversation":"c-1","seq":4,"epoch":"e-9"}"#;
        let frame = Frame::parse(ready).unwrap();
        assert_eq!(frame.kind, "ready");
        assert_eq!(
            (frame.conversation.as_deref(), frame.epoch.as_deref(), frame.seq),
            (Some("c-1"), Some("e-9"), Some(4))
        );
        assert!(Frame::parse(r#"{"id":"no type"}"#).is_err());
    }

    #[test]
    fn deltas_must_add_up_to_the_done_text() {
        let (kind, detail) = failure(&[ACK, &delta(0, "a"), &done("ab", false)]);
        assert_eq!(kind, Failure::Mismatch);
        assert!(detail.contains("do not add up"), "{detail}");
    }

    #[test]
    fn ack_must_come_once_for_the_question_and_before_done() {
        assert_eq!(failure(&[&done("", false)]).0, Failure::Mismatch);
        assert_eq!(failure(&[r#"{"type":"ack","id":"other","seq":1}"#]).0, Failure::Mismatch);
        assert_eq!(failure(&[ACK, ACK]).0, Failure::Mismatch);
    }

    #[test]
    fn a_watcher_sees_the_question_as_the_customers_message_and_never_an_ack() {
        let question = r#"{"type":"message","conversation":"c","seq":1,"from":"customer","id":"q1","text":"hi"}"#;
        let (d0, end) = (delta(0, "Hello"), done("Hello", false));
        let mut watcher = ReplyCheck::watching("q1", FallbackPolicy::Failure);
        let Progress::Answered(answer) = feed(&mut watcher, &[question, &d0, &end]).unwrap() else {
            panic!("the watcher saw the whole reply");
        };
        assert_eq!((answer.ack, answer.first_delta, answer.done, answer.tokens), (MS, MS * 2, MS * 3, 1));
        let other = r#"{"type":"message","conversation":"c","seq":1,"from":"customer","id":"q2","text":"hi"}"#;
        assert!(feed(&mut ReplyCheck::watching("q1", FallbackPolicy::Failure), &[other]).is_err());
        assert!(feed(&mut ReplyCheck::watching("q1", FallbackPolicy::Failure), &[ACK]).is_err());
        assert_eq!(failure(&[question]).0, Failure::Mismatch, "the asker gets an ack, not its message");
    }

    #[test]
    fn fallback_fails_or_is_counted_by_policy() {
        let polite = "Sorry, we are busy.";
        let frames = [ACK, QUEUED, &delta(0, polite), &done(polite, true)];
        let (kind, detail) = failure(&frames);
        assert_eq!((kind, detail.as_str()), (Failure::Fallback, "q1: fallback reply"));
        let answer = answered(&frames, FallbackPolicy::Counted).unwrap();
        assert!(answer.fallback);
        assert_eq!(answer.queued_frames, 1);
    }

    #[test]
    fn errors_and_unknown_frames_end_the_question() {
        let error = r#"{"type":"error","code":"too_many_pending","message":"slow down"}"#;
        let (kind, detail) = failure(&[error]);
        assert_eq!(kind, Failure::ErrorFrame);
        assert!(detail.contains("too_many_pending"), "{detail}");
        assert_eq!(failure(&[ACK, r#"{"type":"message","seq":3}"#]).0, Failure::Mismatch);
        assert_eq!(failure(&["not json"]).0, Failure::Mismatch);
        let limited = r#"{"type":"error","code":"rate_limited","message":"later","id":"q1","retry_after_ms":900}"#;
        assert_eq!(failure(&[limited]).0, Failure::RateLimited);
    }

    #[test]
    fn timing_is_read_from_reply_done() {
        let end = done("a", false).replace(
            r#""interrupted":false"#,
            r#""interrupted":false,"timing":{"hub_before_nlp_ms":0.25,"queue_ms":0.0,"nlp_first_token_ms":1.5,"relay_mean_us":20.0,"relay_max_us":750.0,"total_ms":3.0}"#,
        );
        let answer = answered(&[ACK, &delta(0, "a"), &end], FallbackPolicy::Failure).unwrap();
        let timing = answer.timing.unwrap();
        assert_eq!(timing.nlp_first_token_ms, 1.5);
        assert_eq!(timing.hub_share_ms(), 1.0);
    }

    #[test]
    fn the_message_frame_is_json() {
        let frame: serde_json::Value = serde_json::from_str(&message_frame("q1", "Hi \"there\"")).unwrap();
        assert_eq!(frame, serde_json::json!({"type": "message", "id": "q1", "text": "Hi \"there\""}));
    }
}
