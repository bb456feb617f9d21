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
    /// `rate_limited`: the hub refused the question at its tenant's message
    /// rate (the connection stays usable); counted apart from the errors.
    RateLimited,
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
            Failure::RateLimited => "rate_limited",
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

/// p50/p95/p99/p99.9/max in ms (2 decimals), or null for an empty histogram.
pub fn percentiles_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let ms = |us: u64| round2(us as f64 / 1000.0);
    json!({
        "p50": ms(h.value_at_quantile(0.50)),
        "p95": ms(h.value_at_quantile(0.95)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
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
    /// The client-seen time to the first delta minus what the hub timed of it
    /// (before NLP, queue, NLP first token): reading the question off the
    /// socket, relaying and writing the first token, both ends' runtimes and
    /// the load generator itself (in open loops, its wait for a connection too).
    untimed: Histogram<u64>,
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
            untimed: new_histogram(),
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

    /// The part of a reply's client-seen time to first delta that its
    /// `timing` does not cover (0 if the hub's parts add up to more).
    pub fn record_untimed(&mut self, timing: &ReplyTiming, first_delta: Duration) {
        let timed = timing.hub_before_nlp_ms + timing.queue_ms + timing.nlp_first_token_ms;
        record_ms(&mut self.untimed, (first_delta.as_secs_f64() * 1000.0 - timed).max(0.0));
    }

    pub fn merge(&mut self, other: &TimingStats) {
        for (mine, theirs) in [
            (&mut self.hub_share, &other.hub_share),
            (&mut self.hub_before_nlp, &other.hub_before_nlp),
            (&mut self.relay_max, &other.relay_max),
            (&mut self.queue, &other.queue),
            (&mut self.nlp_first_token, &other.nlp_first_token),
            (&mut self.total, &other.total),
            (&mut self.untimed, &other.untimed),
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
            "first_delta_untimed_ms": percentiles_ms(&self.untimed),
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
    /// `queued` frames of the answered questions, all told.
    pub queued_frames: u64,
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
            queued_frames: 0,
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
        self.queued_frames += answer.queued_frames;
        if answer.fallback {
            self.fallbacks += 1;
            return;
        }
        self.ok += 1;
        self.tokens += answer.tokens;
        record(&mut self.done, answer.done);
        record(&mut self.first_delta, answer.first_delta);
        self.timing.record(answer.timing.as_ref());
        if let Some(timing) = &answer.timing {
            self.timing.record_untimed(timing, answer.first_delta);
        }
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
        self.queued_frames += other.queued_frames;
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

    /// How a set of questions ended and how long they took (open-loop phases,
    /// per tenant): `ok`, `fallbacks` (counted apart, not failures, where
    /// the policy says so), `queued` (questions that waited in line) and
    /// `queued_frames`, `timeouts` (also among `failures`), and the ack,
    /// first-delta and `reply.done` percentiles from the question's start.
    /// `timing` (the hub's share, from `reply.done.timing`) only if the
    /// sockets asked for it.
    pub fn outcome_json(&self, with_timing: bool) -> Value {
        json!({
            "ok": self.ok,
            "fallbacks": self.fallbacks,
            "queued": self.queued,
            "queued_frames": self.queued_frames,
            "timeouts": self.failures.count(Failure::Timeout),
            "failures": self.failures.json(),
            "ack_ms": percentiles_ms(&self.ack),
            "first_delta_ms": percentiles_ms(&self.first_delta),
            "latency_ms": percentiles_ms(&self.done),
            "wait_for_connection_ms": percentiles_ms(&self.wait_for_connection),
            "timing": if with_timing { self.timing.json() } else { Value::Null },
        })
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

/// Acks must come within this in every phase of a peak (issue #7).
pub const PEAK_ACK_P99_MS: f64 = 100.0;

/// "The steady tenant's p95 is unchanged while another tenant bursts": its
/// p95 time to first token in the peak phase is at most this many times its
/// baseline p95, plus [`STEADY_P95_SLACK_MS`] (scheduling noise on a small
/// shared machine, which matters when the baseline is a few ms).
pub const STEADY_P95_RATIO: f64 = 1.2;
pub const STEADY_P95_SLACK_MS: f64 = 20.0;

/// The peak's targets, checked on the report's phases (the bursting
/// tenant's `phases` and, if there is one, the steady tenant's object):
/// zero timeouts over both tenants; ack p99 under [`PEAK_ACK_P99_MS`] in
/// every phase of both; and the steady tenant's p95 time to first token in
/// the `peak` phase against its `baseline` phase (and, for information,
/// the same of `reply.done`). A target that cannot be judged (no steady
/// tenant, no acks) has `met: null`.
pub fn peak_targets(bursting_phases: &Value, steady: &Value) -> Value {
    let phases = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let mut all = phases(bursting_phases);
    all.extend(phases(&steady["phases"]));
    let timeouts: u64 = all.iter().map(|p| p["timeouts"].as_u64().unwrap_or(0)).sum();
    let ack_p99 = all.iter().filter_map(|p| p["ack_ms"]["p99"].as_f64()).reduce(f64::max);
    let steady_phases = phases(&steady["phases"]);
    let named = |name: &str| steady_phases.iter().find(|p| p["phase"] == name);
    let p95 = |phase: Option<&Value>, key: &str| phase.and_then(|p| p[key]["p95"].as_f64());
    let (baseline, peak) = (named("baseline"), named("peak"));
    let (ttft_base, ttft_peak) = (p95(baseline, "first_delta_ms"), p95(peak, "first_delta_ms"));
    let (done_base, done_peak) = (p95(baseline, "latency_ms"), p95(peak, "latency_ms"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(peak), Some(base)) if base > 0.0 => json!(round2(peak / base)),
        _ => Value::Null,
    };
    let steady_met = match (ttft_base, ttft_peak) {
        (Some(base), Some(peak)) => json!(peak <= base * STEADY_P95_RATIO + STEADY_P95_SLACK_MS),
        _ => Value::Null,
    };
    json!({
        "timeouts": { "value": timeouts, "target": 0, "met": timeouts == 0 },
        "ack_p99_ms_worst_phase": {
            "value": ack_p99,
            "target_below": PEAK_ACK_P99_MS,
            "met": ack_p99.map(|ms| ms < PEAK_ACK_P99_MS),
        },
        "steady_first_delta_p95_ms": {
            "baseline": ttft_base,
            "peak": ttft_peak,
            "peak_over_baseline": ratio(ttft_peak, ttft_base),
            "target": format!("peak <= {STEADY_P95_RATIO} × baseline + {STEADY_P95_SLACK_MS} ms"),
            "met": steady_met,
        },
        "steady_done_p95_ms": {
            "baseline": done_base,
            "peak": done_peak,
            "peak_over_baseline": ratio(done_peak, done_base),
        },
    })
}

/// One sample of one hub node in a soak: its resident memory (`/proc`) and
/// its live-task and open-session gauges (`/metrics`); `None` where unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeSample {
    pub rss_kib: Option<u64>,
    pub tasks_alive: Option<f64>,
    pub sessions_open: Option<f64>,
}

impl NodeSample {
    pub fn json(&self) -> Value {
        json!({ "rss_kib": self.rss_kib, "tasks_alive": self.tasks_alive, "sessions_open": self.sessions_open })
    }
}

/// The samples a soak takes of every hub node, every `interval_s` while the
/// load runs (the first at its start, the last after the last reply).
#[derive(Debug)]
pub struct ResourceSeries {
    interval_s: u64,
    /// Seconds from the start of the load, one per sample.
    at_s: Vec<f64>,
    /// `nodes[n][k]`: node n's k-th sample.
    nodes: Vec<Vec<NodeSample>>,
}

impl ResourceSeries {
    pub fn new(nodes: usize, interval_s: u64) -> ResourceSeries {
        ResourceSeries { interval_s, at_s: Vec::new(), nodes: vec![Vec::new(); nodes] }
    }

    /// One sample of every node (in node order), taken `at` into the load.
    pub fn push(&mut self, at: Duration, samples: &[NodeSample]) {
        self.at_s.push(round2(at.as_secs_f64()));
        for (i, series) in self.nodes.iter_mut().enumerate() {
            series.push(samples.get(i).copied().unwrap_or_default());
        }
    }

    /// Per node: start / end / max ([`series_summary`]) and growth (end −
    /// start) of each series, the series itself, and the samples `before`
    /// the load's connections opened and `after_close` (after they closed,
    /// when the hub should be back where it started). A note says which
    /// gauges no node exported.
    pub fn json(&self, before: &[NodeSample], after_close: &[NodeSample]) -> Value {
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, samples)| {
                let rss: Vec<Option<f64>> = samples.iter().map(|s| s.rss_kib.map(|k| k as f64)).collect();
                let tasks: Vec<Option<f64>> = samples.iter().map(|s| s.tasks_alive).collect();
                let sessions: Vec<Option<f64>> = samples.iter().map(|s| s.sessions_open).collect();
                let growth = |v: &[Option<f64>]| match (v.first().copied().flatten(), v.last().copied().flatten()) {
                    (Some(start), Some(end)) => json!(end - start),
                    _ => Value::Null,
                };
                json!({
                    "node": i + 1,
                    "rss_kib": series_summary(&rss),
                    "tasks_alive": series_summary(&tasks),
                    "sessions_open": series_summary(&sessions),
                    "growth": { "rss_kib": growth(&rss), "tasks_alive": growth(&tasks), "sessions_open": growth(&sessions) },
                    "series": { "rss_kib": rss, "tasks_alive": tasks, "sessions_open": sessions },
                    "before": before.get(i).map(NodeSample::json),
                    "after_close": after_close.get(i).map(NodeSample::json),
                })
            })
            .collect();
        let all = || self.nodes.iter().flatten().chain(before).chain(after_close);
        let mut missing = Vec::new();
        if all().all(|s| s.tasks_alive.is_none()) {
            missing.push(crate::prometheus::TASKS_ALIVE);
        }
        if all().all(|s| s.sessions_open.is_none()) {
            missing.push(crate::prometheus::SESSIONS_OPEN);
        }
        let note = (!missing.is_empty())
            .then(|| format!("no {} in /metrics (the bare server has no /metrics)", missing.join(" or ")));
        json!({
            "interval_s": self.interval_s,
            "samples_taken": self.at_s.len(),
            "at_s": self.at_s,
            "nodes": nodes,
            "note": note,
        })
    }
}

/// The median of each figure over reports of the same shape (the rounds of
/// `--compare --rounds`): numbers by their median (the mean of the middle
/// two for an even count) over the reports that have the figure (null if
/// none does), objects key by key and arrays item by item; any other value
/// is taken from the first report.
pub fn median_of(reports: &[Value]) -> Value {
    let mut numbers: Vec<f64> = reports.iter().filter_map(Value::as_f64).collect();
    if let Some(first) = reports.iter().find(|r| r.is_number()) {
        numbers.sort_by(f64::total_cmp);
        let mid = numbers.len() / 2;
        let median = if numbers.len() % 2 == 1 { numbers[mid] } else { (numbers[mid - 1] + numbers[mid]) / 2.0 };
        return if first.is_f64() { json!(round2(median)) } else { json!(median.round() as i64) };
    }
    match reports.iter().find(|r| r.is_object() || r.is_array()) {
        Some(Value::Object(fields)) => Value::Object(
            fields
                .keys()
                .map(|key| {
                    let values: Vec<Value> = reports.iter().map(|r| r[key.as_str()].clone()).collect();
                    (key.clone(), median_of(&values))
                })
                .collect(),
        ),
        Some(Value::Array(items)) => Value::Array(
            (0..items.len()).map(|i| median_of(&reports.iter().map(|r| r[i].clone()).collect::<Vec<_>>())).collect(),
        ),
        _ => reports.iter().find(|r| !r.is_null()).or(reports.first()).cloned().unwrap_or(Value::Null),
    }
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
            "deltas_per_s": ratio(&["tokens_per_s"]),
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
            Failure::RateLimited,
        ];
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        let expected =
            ["connect_failed", "timeout", "closed_by_hub", "error_frame", "mismatch", "fallback_reply", "rate_limited"];
        assert_eq!(names, expected);
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
        assert_eq!(percentiles_ms(&h), json!({"p50": 0.5, "p95": 0.95, "p99": 0.99, "p99_9": 1.0, "max": 1.0}));
        // p99.9 tells one slow reply in a thousand apart from the max.
        let mut h = new_histogram();
        for _ in 0..998 {
            record(&mut h, Duration::from_micros(100));
        }
        record(&mut h, Duration::from_micros(900));
        record(&mut h, Duration::from_micros(2000));
        assert_eq!(percentiles_ms(&h), json!({"p50": 0.1, "p95": 0.1, "p99": 0.1, "p99_9": 0.9, "max": 2.0}));
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
        // The client saw its first delta at 5 ms; the hub timed 0.5 + 0 + 1.5 ms of it.
        assert_eq!(json["first_delta_untimed_ms"]["p50"], 3.0);
        // More timed than seen (clocks apart) counts as nothing untimed.
        let mut t = TimingStats::default();
        t.record_untimed(&timing, Duration::from_millis(1));
        assert_eq!(t.json()["first_delta_untimed_ms"]["max"], 0.0);
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
    fn median_of_takes_each_figure_on_its_own() {
        let rounds = [
            json!({"replies_per_s": 0.7, "n": 3, "bare": {"cpu": 30.0}, "phases": [{"p": 1.0}], "pid": 11}),
            json!({"replies_per_s": 1.1, "n": 3, "bare": {"cpu": 50.0}, "phases": [{"p": 3.0}], "pid": 12}),
            json!({"replies_per_s": 0.9, "n": 3, "bare": {"cpu": 20.0}, "phases": [{"p": 2.0}], "pid": null}),
        ];
        let m = median_of(&rounds);
        assert_eq!(m["replies_per_s"], 0.9);
        assert_eq!(m["n"], 3);
        assert_eq!(m["bare"]["cpu"], 30.0);
        assert_eq!(m["phases"][0]["p"], 2.0);
        // Missing in one report: the median of the others.
        assert_eq!(m["pid"], 12, "integers stay integers (11.5 rounds up)");
        assert_eq!(median_of(&[json!(null), json!(0.8), json!(null)]), json!(0.8));
        assert_eq!(median_of(&[json!({"r": null}), json!({"r": null})]), json!({"r": null}));
        // An even count: the mean of the middle two.
        assert_eq!(median_of(&[json!(1.0), json!(4.0), json!(2.0), json!(3.0)]), json!(2.5));
        assert_eq!(median_of(&[json!("a"), json!("b")]), json!("a"));
        assert_eq!(median_of(&[]), Value::Null);
    }

    #[test]
    fn ratios_divide_hub_by_bare() {
        let bare = json!({"scenario": "replies", "replies_per_s": 10_000.0, "tokens_per_s": 400_000.0,
            "latency_ms": {"p50": 5.0, "p99": 10.0},
            "first_delta_ms": {"p50": 4.0}, "cpu": {"hub_us_per_reply": 25.0}});
        let hub = json!({"scenario": "replies", "replies_per_s": 4_000.0, "tokens_per_s": 100_000.0,
            "latency_ms": {"p50": 20.0, "p99": 40.0},
            "first_delta_ms": {"p50": 18.0}, "cpu": {"hub_us_per_reply": 100.0, "bridge_us_per_reply": 75.0}});
        let r = ratios(&bare, &hub);
        assert_eq!(r["replies_per_s"], 0.4);
        assert_eq!(r["deltas_per_s"], 0.25);
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
    fn outcome_json_counts_fallbacks_queued_and_timeouts_apart() {
        let mut stats = ReplyStats::default();
        stats.answered(&answer(10));
        stats.answered(&Answered { queued_frames: 3, ..answer(20) });
        stats.answered(&Answered { fallback: true, queued_frames: 2, ..answer(10_000) });
        stats.failed(Failed::new(Failure::Timeout, "q4".into()));
        stats.failed(Failed::new(Failure::Closed, "q5".into()));
        record(&mut stats.wait_for_connection, Duration::from_micros(5));
        let json = stats.outcome_json(false);
        assert_eq!(
            (&json["ok"], &json["fallbacks"], &json["queued"], &json["queued_frames"], &json["timeouts"]),
            (&json!(2), &json!(1), &json!(2), &json!(5), &json!(1))
        );
        assert_eq!(json["failures"]["total"], 2);
        assert_eq!(json["ack_ms"]["p99"], 1.0);
        // 10 ms reads 10.01 ms (three significant digits, never low).
        assert_eq!(json["first_delta_ms"]["max"], 10.01);
        assert_eq!(json["latency_ms"]["max"], 20.02);
        assert_eq!(json["wait_for_connection_ms"]["max"], 0.01);
        assert_eq!(json["timing"], Value::Null);
        assert_eq!(stats.outcome_json(true)["timing"]["replies_without_timing"], 2);
        assert_eq!(ReplyStats::default().outcome_json(false)["ack_ms"], Value::Null);
    }

    fn phase(name: &str, timeouts: u64, ack_p99: f64, ttft_p95: f64) -> Value {
        json!({"phase": name, "timeouts": timeouts, "ack_ms": {"p99": ack_p99},
            "first_delta_ms": {"p95": ttft_p95}, "latency_ms": {"p95": ttft_p95 + 1000.0}})
    }

    #[test]
    fn peak_targets_are_met() {
        let bursting = json!([phase("baseline", 0, 5.0, 400.0), phase("peak", 0, 60.0, 9000.0)]);
        let steady = json!({"phases": [phase("baseline", 0, 4.0, 350.0), phase("peak", 0, 8.0, 400.0),
            phase("recovery", 0, 4.0, 2000.0)]});
        let t = peak_targets(&bursting, &steady);
        assert_eq!(t["timeouts"], json!({"value": 0, "target": 0, "met": true}));
        assert_eq!(t["ack_p99_ms_worst_phase"]["value"], 60.0);
        assert_eq!(t["ack_p99_ms_worst_phase"]["met"], true);
        let s = &t["steady_first_delta_p95_ms"];
        assert_eq!(
            (&s["baseline"], &s["peak"], &s["peak_over_baseline"]),
            (&json!(350.0), &json!(400.0), &json!(1.14))
        );
        // 400 <= 1.2 × 350 + 20: met; the recovery phase is not judged.
        assert_eq!(s["met"], true);
        assert_eq!(t["steady_done_p95_ms"]["peak_over_baseline"], 1.04);
    }

    #[test]
    fn peak_targets_are_missed_or_cannot_be_judged() {
        let bursting = json!([phase("baseline", 1, 5.0, 2.0), phase("peak", 2, 150.0, 9.0)]);
        let steady = json!({"phases": [phase("baseline", 3, 4.0, 2.0), phase("peak", 0, 8.0, 23.0)]});
        let t = peak_targets(&bursting, &steady);
        assert_eq!(t["timeouts"]["value"], 6);
        assert_eq!(t["timeouts"]["met"], false);
        assert_eq!(t["ack_p99_ms_worst_phase"]["met"], false);
        // 23 > 1.2 × 2 + 20 = 22.4.
        assert_eq!(t["steady_first_delta_p95_ms"]["met"], false);
        // Without a steady tenant (or without acks) there is nothing to judge.
        let t = peak_targets(&json!([{"phase": "peak", "timeouts": 0, "ack_ms": null}]), &Value::Null);
        assert_eq!(t["ack_p99_ms_worst_phase"], json!({"value": null, "target_below": 100.0, "met": null}));
        assert_eq!(t["steady_first_delta_p95_ms"]["met"], Value::Null);
        assert_eq!(t["steady_first_delta_p95_ms"]["peak_over_baseline"], Value::Null);
        assert_eq!(t["timeouts"]["met"], true);
    }

    #[test]
    fn resource_series_sum_up_each_node() {
        let sample = |rss: u64, tasks: f64, sessions: f64| NodeSample {
            rss_kib: Some(rss),
            tasks_alive: Some(tasks),
            sessions_open: Some(sessions),
        };
        let mut series = ResourceSeries::new(2, 30);
        series.push(Duration::ZERO, &[sample(1000, 50.0, 200.0), sample(900, 40.0, 100.0)]);
        series.push(Duration::from_millis(30_004), &[sample(1500, 52.0, 200.0)]);
        series.push(Duration::from_secs(60), &[sample(1200, 50.0, 200.0), sample(950, 41.0, 100.0)]);
        let before = [sample(800, 10.0, 0.0), sample(700, 9.0, 0.0)];
        let after = [sample(1100, 10.0, 0.0)];
        let json = series.json(&before, &after);
        assert_eq!((&json["interval_s"], &json["samples_taken"]), (&json!(30), &json!(3)));
        assert_eq!(json["at_s"], json!([0.0, 30.0, 60.0]));
        let first = &json["nodes"][0];
        assert_eq!(first["node"], 1);
        assert_eq!(first["rss_kib"], json!({"start": 1000.0, "end": 1200.0, "max": 1500.0}));
        assert_eq!(first["tasks_alive"], json!({"start": 50.0, "end": 50.0, "max": 52.0}));
        assert_eq!(first["growth"], json!({"rss_kib": 200.0, "tasks_alive": 0.0, "sessions_open": 0.0}));
        assert_eq!(first["series"]["sessions_open"], json!([200.0, 200.0, 200.0]));
        assert_eq!(first["before"]["tasks_alive"], 10.0);
        assert_eq!(first["after_close"]["rss_kib"], 1100);
        // Node 2 missed a sample: it is null in its series, and it has no after_close.
        let second = &json["nodes"][1];
        assert_eq!(second["series"]["rss_kib"], json!([900.0, null, 950.0]));
        assert_eq!(second["rss_kib"]["max"], 950.0);
        assert_eq!(second["after_close"], Value::Null);
        assert_eq!(json["note"], Value::Null);
    }

    #[test]
    fn resource_series_note_gauges_no_node_exports() {
        let rss_only = NodeSample { rss_kib: Some(100), ..NodeSample::default() };
        let mut series = ResourceSeries::new(1, 5);
        series.push(Duration::ZERO, &[rss_only]);
        let json = series.json(&[rss_only], &[rss_only]);
        assert_eq!(
            json["note"],
            "no fengda_hub_runtime_tasks_alive or fengda_hub_sessions_open in /metrics (the bare server has no /metrics)"
        );
        assert_eq!(json["nodes"][0]["growth"]["tasks_alive"], Value::Null);
        let some_tasks = NodeSample { tasks_alive: Some(3.0), ..rss_only };
        let json = series.json(&[some_tasks], &[]);
        assert_eq!(json["note"], "no fengda_hub_sessions_open in /metrics (the bare server has no /metrics)");
    }

    #[test]
    fn per_divides_or_is_null() {
        assert_eq!(per(10.0, 4), json!(2.5));
        assert_eq!(per(10.0, 0), Value::Null);
    }
}
