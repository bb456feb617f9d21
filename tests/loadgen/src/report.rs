//! What a run counts and how it is summed up: failure kinds, latency
//! histograms (HdrHistogram, µs, 1 µs … 10 min, 3 significant digits) and
//! their percentiles in ms, the statistics of a set of questions, the hub ÷
//! bare ratios of `--compare`, and start/end/max of sampled series.
//!
//! In [`ReplyStats`], a question ends as exactly one of: `ok`, `fallbacks`
//! (only when fallbacks are counted, see `frames::FallbackPolicy`) or a
//! failure. The latency histograms hold `ok` replies only; `ack_ms` holds
//! every acknowledged answer, fallbacks included, since the `ack` does not
//! depend on how the answer ends.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::frames::{Answered, ReplyTiming};

/// Why a question (or a connect) did not get its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    Connect,
    Timeout,
    Closed,
    ErrorFrame,
    Mismatch,
    Fallback,
}

impl Failure {
    /// The name in the JSON report (`failures.by_kind`).
    pub fn name(self) -> &'static str {
        match self {
            Failure::Connect => "connect_failed",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed_by_hub",
            Failure::ErrorFrame => "error_frame",
            Failure::Mismatch => "mismatch",
            Failure::Fallback => "fallback_reply",
        }
    }
}

/// One failure with what was seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    pub kind: Failure,
    pub detail: String,
}

impl Failed {
    pub fn new(kind: Failure, detail: String) -> Failed {
        Failed { kind, detail }
    }
}

/// How many samples of failure details a report keeps.
const FAILURE_SAMPLES: usize = 8;

/// Failure counts by kind plus the first few details.
#[derive(Debug, Default)]
pub struct Failures {
    counts: BTreeMap<&'static str, u64>,
    samples: Vec<String>,
}

impl Failures {
    pub fn add(&mut self, failed: Failed) {
        *self.counts.entry(failed.kind.name()).or_default() += 1;
        if self.samples.len() < FAILURE_SAMPLES {
            self.samples.push(format!("{}: {}", failed.kind.name(), failed.detail));
        }
    }

    pub fn merge(&mut self, other: Failures) {
        for (kind, n) in other.counts {
            *self.counts.entry(kind).or_default() += n;
        }
        let room = FAILURE_SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(other.samples.into_iter().take(room));
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn count(&self, kind: Failure) -> u64 {
        self.counts.get(kind.name()).copied().unwrap_or(0)
    }

    pub fn json(&self) -> Value {
        json!({ "total": self.total(), "by_kind": self.counts, "samples": self.samples })
    }
}

/// Upper bound of every histogram: 10 minutes in µs.
const HISTOGRAM_MAX_US: u64 = 600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("histogram bounds")
}

/// Records a duration (below 1 µs counts as 1 µs, above 10 min as 10 min).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_micros() as u64).clamp(1, HISTOGRAM_MAX_US));
}

/// Records milliseconds given as a float (the hub's `timing` fields).
pub fn record_ms(h: &mut Histogram<u64>, ms: f64) {
    let us = (ms * 1000.0).round();
    let _ = h.record(if us.is_finite() { (us as u64).clamp(1, HISTOGRAM_MAX_US) } else { HISTOGRAM_MAX_US });
}

/// p50/p95/p99/max in ms (2 decimals), or null for an empty histogram.
pub fn percentiles_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let ms = |us: u64| round2(us as f64 / 1000.0);
    json!({
        "p50": ms(h.value_at_quantile(0.50)),
        "p95": ms(h.value_at_quantile(0.95)),
        "p99": ms(h.value_at_quantile(0.99)),
        "max": ms(h.max()),
    })
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `numerator / denominator` rounded, or null when there is nothing to divide by.
pub fn per(numerator: f64, denominator: u64) -> Value {
    if denominator == 0 { Value::Null } else { json!(round2(numerator / denominator as f64)) }
}

/// The hub's `timing` objects of a set of replies: its share of the time to
/// first token apart from the NLP service's and the queue's.
#[derive(Debug)]
pub struct TimingStats {
    hub_share: Histogram<u64>,
    hub_before_nlp: Histogram<u64>,
    relay_max: Histogram<u64>,
    queue: Histogram<u64>,
    nlp_first_token: Histogram<u64>,
    total: Histogram<u64>,
    /// Replies that had a `timing` object.
    with_timing: u64,
    /// Replies without one (the socket asked for it, the server did not send it).
    without_timing: u64,
}

impl Default for TimingStats {
    fn default() -> TimingStats {
        TimingStats {
            hub_share: new_histogram(),
            hub_before_nlp: new_histogram(),
            relay_max: new_histogram(),
            queue: new_histogram(),
            nlp_first_token: new_histogram(),
            total: new_histogram(),
            with_timing: 0,
            without_timing: 0,
        }
    }
}

impl TimingStats {
    pub fn record(&mut self, timing: Option<&ReplyTiming>) {
        let Some(t) = timing else {
            self.without_timing += 1;
            return;
        };
        self.with_timing += 1;
        record_ms(&mut self.hub_share, t.hub_share_ms());
        record_ms(&mut self.hub_before_nlp, t.hub_before_nlp_ms);
        record_ms(&mut self.relay_max, t.relay_max_us / 1000.0);
        record_ms(&mut self.queue, t.queue_ms);
        record_ms(&mut self.nlp_first_token, t.nlp_first_token_ms);
        record_ms(&mut self.total, t.total_ms);
    }

    pub fn merge(&mut self, other: &TimingStats) {
        for (mine, theirs) in [
            (&mut self.hub_share, &other.hub_share),
            (&mut self.hub_before_nlp, &other.hub_before_nlp),
            (&mut self.relay_max, &other.relay_max),
            (&mut self.queue, &other.queue),
            (&mut self.nlp_first_token, &other.nlp_first_token),
            (&mut self.total, &other.total),
        ] {
            mine.add(theirs).expect("histograms with the same bounds");
        }
        self.with_timing += other.with_timing;
        self.without_timing += other.without_timing;
    }

    pub fn json(&self) -> Value {
        json!({
            "replies_with_timing": self.with_timing,
            "replies_without_timing": self.without_timing,
            "hub_share_ms": percentiles_ms(&self.hub_share),
            "hub_before_nlp_ms": percentiles_ms(&self.hub_before_nlp),
            "relay_max_ms": percentiles_ms(&self.relay_max),
            "queue_ms": percentiles_ms(&self.queue),
            "nlp_first_token_ms": percentiles_ms(&self.nlp_first_token),
            "total_ms": percentiles_ms(&self.total),
        })
    }
}

/// The outcome of a set of questions (one client, one phase, one run).
#[derive(Debug)]
pub struct ReplyStats {
    pub ok: u64,
    /// Fallback replies, when counted apart from failures.
    pub fallbacks: u64,
    /// Answered questions (ok or fallback) that got at least one `queued` frame first.
    pub queued: u64,
    /// `reply.delta` frames of the ok replies.
    pub tokens: u64,
    pub done: Histogram<u64>,
    pub first_delta: Histogram<u64>,
    pub ack: Histogram<u64>,
    /// Open loops: from the scheduled send time to a free pool connection.
    pub wait_for_connection: Histogram<u64>,
    pub timing: TimingStats,
    pub failures: Failures,
}

impl Default for ReplyStats {
    fn default() -> ReplyStats {
        ReplyStats {
            ok: 0,
            fallbacks: 0,
            queued: 0,
            tokens: 0,
            done: new_histogram(),
            first_delta: new_histogram(),
            ack: new_histogram(),
            wait_for_connection: new_histogram(),
            timing: TimingStats::default(),
            failures: Failures::default(),
        }
    }
}

impl ReplyStats {
    /// An answer that `frames::ReplyCheck` accepted.
    pub fn answered(&mut self, answer: &Answered) {
        record(&mut self.ack, answer.ack);
        if answer.queued_frames > 0 {
            self.queued += 1;
        }
        if answer.fallback {
            self.fallbacks += 1;
            return;
        }
        self.ok += 1;
        self.tokens += answer.tokens;
        record(&mut self.done, answer.done);
        record(&mut self.first_delta, answer.first_delta);
        self.timing.record(answer.timing.as_ref());
    }

    pub fn failed(&mut self, failed: Failed) {
        self.failures.add(failed);
    }

    /// Questions that ended one way or another.
    pub fn ended(&self) -> u64 {
        self.ok + self.fallbacks + self.failures.total()
    }

    pub fn merge(&mut self, other: ReplyStats) {
        self.ok += other.ok;
        self.fallbacks += other.fallbacks;
        self.queued += other.queued;
        self.tokens += other.tokens;
        for (mine, theirs) in [
            (&mut self.done, &other.done),
            (&mut self.first_delta, &other.first_delta),
            (&mut self.ack, &other.ack),
            (&mut self.wait_for_connection, &other.wait_for_connection),
        ] {
            mine.add(theirs).expect("histograms with the same bounds");
        }
        self.timing.merge(&other.timing);
        self.failures.merge(other.failures);
    }
}

/// First, last and largest value of a sampled series (null where unknown).
pub fn series_summary(values: &[Option<f64>]) -> Value {
    let max = values.iter().flatten().copied().reduce(f64::max);
    json!({
        "start": values.first().copied().flatten(),
        "end": values.last().copied().flatten(),
        "max": max,
    })
}

/// hub ÷ bare for the figures both runs of one scenario have (`--compare`).
pub fn ratios(bare: &Value, hub: &Value) -> Value {
    let divide = |h: Option<f64>, b: Option<f64>| match (h, b) {
        (Some(h), Some(b)) if b > 0.0 => json!(round2(h / b)),
        _ => Value::Null,
    };
    let at = |r: &Value, path: &[&str]| path.iter().fold(r, |v, k| &v[*k]).as_f64();
    let ratio = |path: &[&str]| divide(at(hub, path), at(bare, path));
    let hub_plus_bridge = {
        let bridge = hub["cpu"]["bridge_us_per_reply"].as_f64().unwrap_or(0.0);
        divide(hub["cpu"]["hub_us_per_reply"].as_f64().map(|h| h + bridge), bare["cpu"]["hub_us_per_reply"].as_f64())
    };
    match hub["scenario"].as_str() {
        Some("replies") => json!({
            "replies_per_s": ratio(&["replies_per_s"]),
            "cpu_us_per_reply": ratio(&["cpu", "hub_us_per_reply"]),
            "cpu_us_per_reply_hub_plus_bridge": hub_plus_bridge,
            "latency_p50": ratio(&["latency_ms", "p50"]),
            "latency_p99": ratio(&["latency_ms", "p99"]),
            "first_delta_p50": ratio(&["first_delta_ms", "p50"]),
            "bare": { "replies_per_s": bare["replies_per_s"], "cpu_us_per_reply": bare["cpu"]["hub_us_per_reply"] },
            "hub": {
                "replies_per_s": hub["replies_per_s"],
                "cpu_us_per_reply": hub["cpu"]["hub_us_per_reply"],
                "bridge_us_per_reply": hub["cpu"]["bridge_us_per_reply"],
            },
        }),
        Some("idle") => json!({
            "kib_per_idle_socket": ratio(&["hub_kib_per_idle_socket"]),
            "sockets_per_s": ratio(&["connects_per_s"]),
            "cpu_us_per_connect": ratio(&["hub_us_per_connect"]),
            "bare": {
                "kib_per_idle_socket": bare["hub_kib_per_idle_socket"],
                "sockets_per_s": bare["connects_per_s"],
                "cpu_us_per_connect": bare["hub_us_per_connect"],
            },
            "hub": {
                "kib_per_idle_socket": hub["hub_kib_per_idle_socket"],
                "sockets_per_s": hub["connects_per_s"],
                "cpu_us_per_connect": hub["hub_us_per_connect"],
            },
        }),
        Some("storm") => json!({
            "reconnects_per_s": ratio(&["reconnects_per_s"]),
            "cpu_us_per_reconnect": ratio(&["hub_us_per_reconnect"]),
            "bare": { "reconnects_per_s": bare["reconnects_per_s"], "cpu_us_per_reconnect": bare["hub_us_per_reconnect"] },
            "hub": { "reconnects_per_s": hub["reconnects_per_s"], "cpu_us_per_reconnect": hub["hub_us_per_reconnect"] },
        }),
        Some("burst" | "rate" | "soak") => {
            let phases: Vec<Value> = hub["phases"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, p)| {
                    let b = &bare["phases"][i];
                    let r = |k: &str| divide(p["latency_ms"][k].as_f64(), b["latency_ms"][k].as_f64());
                    json!({ "phase": p["phase"], "latency_p50": r("p50"), "latency_p99": r("p99") })
                })
                .collect();
            json!({
                "cpu_us_per_reply": ratio(&["cpu", "hub_us_per_reply"]),
                "cpu_us_per_reply_hub_plus_bridge": hub_plus_bridge,
                "phases": phases,
            })
        }
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(done_ms: u64) -> Answered {
        Answered {
            ack: Duration::from_millis(1),
            first_delta: Duration::from_millis(done_ms / 2),
            done: Duration::from_millis(done_ms),
            tokens: 40,
            done_seq: Some(2),
            fallback: false,
            queued_frames: 0,
            timing: None,
        }
    }

    #[test]
    fn failures_count_by_kind_and_keep_a_few_samples() {
        let mut failures = Failures::default();
        for i in 0..10 {
            failures.add(Failed::new(Failure::Timeout, format!("q{i}")));
        }
        let mut other = Failures::default();
        other.add(Failed::new(Failure::Closed, "gone".into()));
        failures.merge(other);
        assert_eq!(failures.total(), 11);
        assert_eq!(failures.count(Failure::Timeout), 10);
        assert_eq!(failures.count(Failure::Fallback), 0);
        let json = failures.json();
        assert_eq!(json["by_kind"], json!({"timeout": 10, "closed_by_hub": 1}));
        assert_eq!(json["samples"].as_array().unwrap().len(), FAILURE_SAMPLES);
        assert_eq!(json["samples"][0], "timeout: q0");
    }

    #[test]
    fn failure_kinds_have_distinct_report_names() {
        let kinds = [
            Failure::Connect,
            Failure::Timeout,
            Failure::Closed,
            Failure::ErrorFrame,
            Failure::Mismatch,
            Failure::Fallback,
        ];
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        assert_eq!(names, ["connect_failed", "timeout", "closed_by_hub", "error_frame", "mismatch", "fallback_reply"]);
        let mut failures = Failures::default();
        for kind in kinds {
            failures.add(Failed::new(kind, "x".into()));
        }
        assert_eq!(failures.json()["by_kind"].as_object().unwrap().len(), kinds.len());
        assert_eq!(failures.json()["samples"][3], "error_frame: x");
    }

    #[test]
    fn percentiles_are_in_ms() {
        let mut h = new_histogram();
        assert_eq!(percentiles_ms(&h), Value::Null);
        // Below 2,048 µs the histogram holds every microsecond exactly.
        for tenth in 1..=100 {
            record(&mut h, Duration::from_micros(tenth * 10));
        }
        assert_eq!(percentiles_ms(&h), json!({"p50": 0.5, "p95": 0.95, "p99": 0.99, "max": 1.0}));
    }

    #[test]
    fn large_percentiles_keep_three_significant_digits() {
        // Above 2,048 µs values share buckets; a percentile is reported as
        // the highest value of its bucket: 50 ms reads 50.02 ms, less than
        // 0.1 % high, and never low.
        let mut h = new_histogram();
        for ms in 1..=100 {
            record(&mut h, Duration::from_millis(ms));
        }
        let p = percentiles_ms(&h);
        for (key, exact) in [("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0)] {
            let reported = p[key].as_f64().unwrap();
            assert!(reported >= exact && reported <= exact * 1.001, "{key}: {reported} for {exact}");
        }
        assert_eq!(p["p50"], 50.02);
    }

    #[test]
    fn out_of_range_durations_are_clamped() {
        let mut h = new_histogram();
        record(&mut h, Duration::ZERO);
        record_ms(&mut h, 0.25);
        record_ms(&mut h, f64::NAN);
        record(&mut h, Duration::from_secs(3600));
        assert_eq!(h.len(), 4);
        assert_eq!(h.min(), 1);
        assert_eq!(h.value_at_quantile(0.5), 250);
        assert!(h.equivalent(h.max(), HISTOGRAM_MAX_US));
        assert_eq!(h.count_between(HISTOGRAM_MAX_US, HISTOGRAM_MAX_US), 2);
    }

    #[test]
    fn fallbacks_and_queued_questions_are_counted_apart() {
        let mut stats = ReplyStats::default();
        stats.answered(&answer(10));
        stats.answered(&Answered { queued_frames: 3, ..answer(20) });
        stats.answered(&Answered { fallback: true, queued_frames: 1, ..answer(10_000) });
        stats.failed(Failed::new(Failure::Timeout, "q4".into()));
        assert_eq!((stats.ok, stats.fallbacks, stats.queued, stats.tokens), (2, 1, 2, 80));
        assert_eq!(stats.ended(), 4);
        // The fallback's ack counts; its latency does not.
        assert_eq!(stats.ack.len(), 3);
        assert_eq!(stats.done.len(), 2);
        assert!(stats.done.equivalent(stats.done.max(), 20_000), "the fallback's 10 s is not a latency");
        let mut all = ReplyStats::default();
        all.merge(stats);
        assert_eq!((all.ok, all.fallbacks, all.queued, all.failures.count(Failure::Timeout)), (2, 1, 2, 1));
        assert_eq!(all.ack.len(), 3);
    }

    #[test]
    fn timing_splits_hub_from_nlp() {
        let mut stats = ReplyStats::default();
        let timing = ReplyTiming {
            hub_before_nlp_ms: 0.5,
            queue_ms: 0.0,
            nlp_first_token_ms: 1.5,
            relay_mean_us: 10.0,
            relay_max_us: 500.0,
            total_ms: 1900.0,
        };
        stats.answered(&Answered { timing: Some(timing), ..answer(10) });
        stats.answered(&answer(10));
        let json = stats.timing.json();
        assert_eq!(json["replies_with_timing"], 1);
        assert_eq!(json["replies_without_timing"], 1);
        assert_eq!(json["hub_share_ms"]["p50"], 1.0);
        assert_eq!(json["relay_max_ms"]["p99"], 0.5);
        assert_eq!(json["nlp_first_token_ms"]["p50"], 1.5);
        // A queue wait of zero is recorded as the 1 µs floor.
        assert_eq!(json["queue_ms"]["max"], 0.0);
    }

    #[test]
    fn series_summary_takes_first_last_and_max() {
        assert_eq!(
            series_summary(&[Some(3.0), Some(9.0), None, Some(4.0)]),
            json!({"start": 3.0, "end": 4.0, "max": 9.0})
        );
        assert_eq!(series_summary(&[None, None]), json!({"start": null, "end": null, "max": null}));
        assert_eq!(series_summary(&[]), json!({"start": null, "end": null, "max": null}));
    }

    #[test]
    fn ratios_divide_hub_by_bare() {
        let bare = json!({"scenario": "replies", "replies_per_s": 10_000.0, "latency_ms": {"p50": 5.0, "p99": 10.0},
            "first_delta_ms": {"p50": 4.0}, "cpu": {"hub_us_per_reply": 25.0}});
        let hub = json!({"scenario": "replies", "replies_per_s": 4_000.0, "latency_ms": {"p50": 20.0, "p99": 40.0},
            "first_delta_ms": {"p50": 18.0}, "cpu": {"hub_us_per_reply": 100.0, "bridge_us_per_reply": 75.0}});
        let r = ratios(&bare, &hub);
        assert_eq!(r["replies_per_s"], 0.4);
        assert_eq!(r["cpu_us_per_reply"], 4.0);
        assert_eq!(r["cpu_us_per_reply_hub_plus_bridge"], 7.0);
        assert_eq!(r["latency_p99"], 4.0);
        assert_eq!(r["first_delta_p50"], 4.5);
        let zero = json!({"scenario": "idle", "hub_kib_per_idle_socket": 0.0});
        assert_eq!(
            ratios(&zero, &json!({"scenario": "idle", "hub_kib_per_idle_socket": 20.0}))["kib_per_idle_socket"],
            Value::Null
        );
        let storm =
            |per_s: f64, us: f64| json!({"scenario": "storm", "reconnects_per_s": per_s, "hub_us_per_reconnect": us});
        let r = ratios(&storm(4000.0, 50.0), &storm(1000.0, 300.0));
        assert_eq!((&r["reconnects_per_s"], &r["cpu_us_per_reconnect"]), (&json!(0.25), &json!(6.0)));
        assert_eq!(r["bare"]["reconnects_per_s"], 4000.0);
        let idle = |kib: f64| json!({"scenario": "idle", "hub_kib_per_idle_socket": kib, "connects_per_s": 2000.0});
        let r = ratios(&idle(8.0), &idle(20.0));
        assert_eq!(
            (&r["kib_per_idle_socket"], &r["sockets_per_s"], &r["cpu_us_per_connect"]),
            (&json!(2.5), &json!(1.0), &Value::Null)
        );
        let rate = |p50: f64| json!({"scenario": "rate", "phases": [{"phase": "rate", "latency_ms": {"p50": p50, "p99": 4.0}}]});
        assert_eq!(ratios(&rate(2.0), &rate(3.0))["phases"][0]["latency_p50"], 1.5);
        assert_eq!(ratios(&bare, &json!({"scenario": "other"})), Value::Null);
    }

    #[test]
    fn per_divides_or_is_null() {
        assert_eq!(per(10.0, 4), json!(2.5));
        assert_eq!(per(10.0, 0), Value::Null);
    }
}
