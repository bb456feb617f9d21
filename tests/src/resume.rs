//! The lost-reply scenario: a customer's only socket drops while a reply
//! streams, and the customer comes back (maybe on another node) some time
//! later with `conversation`, `after` and `epoch`.
//!
//! [`drop_and_resume`] plays it against a [`RecordingAnswerer`] whose
//! answer is [`TOKENS`] tokens of `"tok{i} "`, one per [`TOKEN_DELAY`], and
//! checks everything the protocol promises for it, whichever way the reply
//! reaches the customer: live (deltas and `reply.done`) or replayed.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Client, Hub, RecordingAnswerer, STEP_TIMEOUT, Script};

/// Tokens of the scripted answer.
pub const TOKENS: usize = 40;
/// Pause between two tokens: the whole answer takes 4 s.
pub const TOKEN_DELAY: Duration = Duration::from_millis(100);
/// The reply grace the scenario's hubs run with (`--reply-grace-ms`).
pub const GRACE: Duration = Duration::from_millis(1500);

/// The answerer's script for the scenario.
pub fn script() -> Script {
    Script { tokens: TOKENS, token_delay: TOKEN_DELAY, ..Script::default() }
}

/// Hub flags for the scenario: answers from `answerer`, the short grace.
pub fn hub_flags(answerer: &RecordingAnswerer) -> Vec<String> {
    let grace = GRACE.as_millis().to_string();
    vec!["--nlp-url".into(), answerer.url.clone(), "--reply-grace-ms".into(), grace]
}

/// The first `n` tokens of the answer, concatenated.
pub fn answer_prefix(n: usize) -> String {
    (0..n).map(|i| format!("tok{i} ")).collect()
}

/// A number in `1..=max`, different on every run (printed by the callers'
/// assertions, so a failure can be replayed).
pub fn random_in(max: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    1 + (random % max as u64) as usize
}

/// How the stored reply reached the returning customer.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Deltas (from `first_index` on) and `reply.done`. `sent_at_attach`:
    /// the tokens the answerer had sent when the customer was back (known
    /// when [`Away::Watching`] gave the answerer).
    Live { first_index: u64, sent_at_attach: Option<usize> },
    /// A replayed `message` `from: "assistant"`.
    Replayed,
}

/// What the returning customer got.
#[derive(Debug)]
pub struct Outcome {
    /// The stored reply as the customer got it (`reply.done` or `message`).
    pub reply: Value,
    pub delivery: Delivery,
    /// Deltas the first socket read before it dropped.
    pub k: usize,
}

/// How long the customer stays away.
pub enum Away<'a> {
    /// This long, within the grace: the time away is what the test is about.
    For(Duration),
    /// Like `For`, noting how many tokens `answerer` had sent when the
    /// customer was back.
    Watching(Duration, &'a RecordingAnswerer),
    /// Until the hub stored the reply (it finished while nobody listened).
    UntilStored,
    /// Past the grace: until the hub cancelled the NLP call (`answerer` saw
    /// it) and stored the reply.
    PastGrace(&'a RecordingAnswerer),
}

/// Asks on `asking`, drops the only socket after `k` deltas, stays `away`,
/// resumes on `resuming`, and returns the reply once it arrives (live or
/// replayed), after checking that the deltas the customer saw agree with
/// it, that it arrives exactly once, and that the conversation's log holds
/// the question and exactly one answer after it.
pub async fn drop_and_resume(asking: &Hub, resuming: &Hub, user: &str, k: usize, away: Away<'_>) -> Outcome {
    let mut first = Client::connect(&asking.ws_url(&format!("tenant=demo&user={user}"))).await;
    let conversation = first.conversation();
    let epoch = first.ready["epoch"].as_str().expect("ready.epoch").to_owned();
    first.send_message("m1", "Tell me a story").await;
    assert_eq!(first.expect("ack").await["seq"], 1);
    for index in 0..k {
        let delta = first.expect("reply.delta").await;
        assert_eq!(delta["index"], index, "{delta}");
    }
    // The phone loses its network: no close frame, the TCP connection just goes.
    drop(first);
    match away {
        Away::For(away) | Away::Watching(away, _) => tokio::time::sleep(away).await,
        Away::UntilStored => wait_until_stored(asking, user, &conversation, 2).await,
        Away::PastGrace(answerer) => {
            answerer.wait_cancelled(1).await;
            wait_until_stored(asking, user, &conversation, 2).await;
        }
    }

    let query = format!("tenant=demo&user={user}&conversation={conversation}&after=1&epoch={epoch}");
    let mut back = Client::connect(&resuming.ws_url(&query)).await;
    let sent_at_attach = match away {
        Away::Watching(_, answerer) => Some(answerer.tokens_sent()),
        _ => None,
    };
    assert_eq!(back.conversation(), conversation);
    assert_eq!(back.ready["epoch"], epoch.as_str());
    let mut deltas: Vec<Value> = Vec::new();
    let (reply, delivery) = loop {
        let frame = back.next().await;
        match frame["type"].as_str() {
            Some("reply.delta") => {
                deltas.push(frame);
            }
            Some("reply.done") => {
                let first = deltas.first().expect("a reply continuing live streams deltas before its reply.done");
                let first_index = first["index"].as_u64().expect("index");
                break (frame, Delivery::Live { first_index, sent_at_attach });
            }
            Some("message") => {
                assert_eq!(frame["from"], "assistant", "only the reply was missed: {frame}");
                assert!(deltas.is_empty(), "a replayed reply comes before any live delta: {deltas:?}");
                break (frame, Delivery::Replayed);
            }
            _ => panic!("unexpected frame while waiting for the reply: {frame}"),
        }
    };
    assert_eq!(reply["seq"], 2, "the reply follows its question: {reply}");
    let text = reply["text"].as_str().expect("reply text");
    for delta in &deltas {
        let index = delta["index"].as_u64().expect("index") as usize;
        assert_eq!(delta["text"], format!("tok{index} "), "the deltas agree with the answer: {delta}");
        assert_eq!(delta["reply"], reply["reply"], "{delta}");
    }
    let indexes: Vec<_> = deltas.iter().map(|d| d["index"].as_u64().expect("index")).collect();
    assert!(indexes.windows(2).all(|w| w[1] == w[0] + 1), "no delta lost or repeated: {indexes:?}");
    if let Some(last) = indexes.last() {
        assert!(text.starts_with(&answer_prefix(*last as usize + 1)), "deltas add up to the text: {text:?}");
    }
    // Exactly once: nothing else of the reply is on its way.
    back.assert_alive().await;

    // The log: the question, then exactly one answer.
    let query = format!("tenant=demo&user={user}&conversation={conversation}&after=0&epoch={epoch}");
    let mut transcript = Client::connect(&asking.ws_url(&query)).await;
    assert_eq!(transcript.ready["seq"], 2, "one question, one answer, nothing else: {}", transcript.ready);
    let question = transcript.expect("message").await;
    assert_eq!((question["from"].as_str(), question["id"].as_str()), (Some("customer"), Some("m1")));
    let answer = transcript.expect("message").await;
    assert_eq!(answer["from"], "assistant");
    assert_eq!(answer["text"], reply["text"]);
    transcript.assert_alive().await;
    Outcome { reply, delivery, k }
}

/// Waits until the answerer has seen `n` cancelled calls (it notices at its
/// next token), failing after a step timeout.
pub async fn wait_for_cancellations(answerer: &RecordingAnswerer, n: usize) {
    answerer.wait_cancelled(n).await;
}

/// Waits until `conversation`'s log on `hub` holds `seq` events (each look
/// is a socket that reads `ready.seq` and goes), failing after a step timeout.
pub async fn wait_until_stored(hub: &Hub, user: &str, conversation: &str, seq: u64) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let query = format!("tenant=demo&user={user}&conversation={conversation}");
    loop {
        let look = Client::connect(&hub.ws_url(&query)).await;
        let stored = look.ready["seq"].as_u64().expect("ready.seq");
        if stored >= seq {
            return;
        }
        assert!(Instant::now() < deadline, "{conversation} holds {stored} events, not {seq}");
        drop(look);
        // Pacing between looks, not a wait for the event itself.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks an outcome past the grace: the stored reply is cancelled and holds
/// the answer's first tokens, at least the `k` the customer saw, not all.
pub fn assert_cancelled_partial(outcome: &Outcome) {
    assert_eq!(outcome.delivery, Delivery::Replayed, "{outcome:?}");
    assert_eq!(outcome.reply["cancelled"], true, "{outcome:?}");
    assert!(outcome.reply.get("fallback").is_none(), "{outcome:?}");
    let text = outcome.reply["text"].as_str().expect("text");
    let streamed = text.matches(' ').count();
    assert_eq!(text, answer_prefix(streamed), "the text streamed so far: {outcome:?}");
    assert!((outcome.k..TOKENS).contains(&streamed), "{streamed} tokens stored: {outcome:?}");
}
