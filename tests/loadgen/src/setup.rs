//! What the load generator tells the processes it starts and the sockets it
//! opens, and what it must know of them: the bridge's pace and stream
//! limit, hub flags that bound a reply (its longest queue wait, its NLP
//! slots), a customer's WebSocket URL, how long one reply may take before
//! it is a timeout, and whether the sockets fit the open-files limit.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};

/// Tokens the deadline of one reply allows for: the longest answer of the
/// built-in knowledge base is 43 tokens; a few more for slack.
pub const ANSWER_TOKENS: u64 = 48;

/// The hub's default `nlp.max_queue_wait_ms`: a question waits at most this
/// long for an NLP slot before it gets the polite fallback.
pub const HUB_MAX_QUEUE_WAIT_MS: u64 = 10_000;

/// File descriptors the load generator keeps for itself besides its sockets
/// (logs, pipes to the children, `/proc` reads, `/metrics` fetches).
pub const SPARE_FDS: usize = 200;

/// How the bridge we start paces the built-in answerer's tokens (its
/// `--first-token-delay-ms` and `--tokens-per-second`). Zero is no pacing:
/// the hub is then the thing under load.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pace {
    pub first_token_ms: u64,
    pub tokens_per_s: f64,
}

impl Pace {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.tokens_per_s.is_finite() && self.tokens_per_s >= 0.0,
            "--pace-tokens-per-s must be a finite number >= 0, got {}",
            self.tokens_per_s
        );
        Ok(())
    }

    pub fn is_zero(&self) -> bool {
        self.first_token_ms == 0 && self.tokens_per_s == 0.0
    }

    /// How long the bridge takes to stream an answer of `tokens` tokens: the
    /// delay to the first, then one every 1 / tokens_per_s seconds (a bound:
    /// the first token does not wait for its interval).
    pub fn reply_time(&self, tokens: u64) -> Duration {
        let streaming = if self.tokens_per_s > 0.0 {
            Duration::from_secs_f64(tokens as f64 / self.tokens_per_s)
        } else {
            Duration::ZERO
        };
        Duration::from_millis(self.first_token_ms) + streaming
    }

    /// The bridge's command-line flags for this pace.
    pub fn bridge_args(&self) -> [String; 4] {
        [
            "--first-token-delay-ms".into(),
            self.first_token_ms.to_string(),
            "--tokens-per-second".into(),
            self.tokens_per_s.to_string(),
        ]
    }

    /// The same pace for a hub's in-process answerer (`fengda serve`'s flags).
    pub fn hub_answerer_args(&self) -> [String; 4] {
        [
            "--answerer-first-token-delay-ms".into(),
            self.first_token_ms.to_string(),
            "--answerer-tokens-per-second".into(),
            self.tokens_per_s.to_string(),
        ]
    }

    /// `setup.nlp_pace` of the report.
    pub fn json(&self) -> Value {
        json!({ "first_token_delay_ms": self.first_token_ms, "tokens_per_second": self.tokens_per_s })
    }
}

/// How long one question may take, from its (scheduled) send to
/// `reply.done`, before it counts as a timeout: `base` (`--timeout-secs`),
/// plus the time the paced bridge needs for an answer, plus `queue_wait`
/// (in peaks, the hub's longest wait for an NLP slot, after which the
/// answer is the fallback: that is not a timeout).
pub fn reply_timeout(base: Duration, pace: Pace, queue_wait: Duration) -> Duration {
    base + pace.reply_time(ANSWER_TOKENS) + queue_wait
}

/// The value of `name` among command-line `args` given as `--name=VALUE` or
/// `--name VALUE`; the last one wins, as with clap.
pub fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut found = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if let Some(value) = arg.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')) {
            found = Some(value);
        } else if arg == name {
            found = iter.next().map(String::as_str);
        }
    }
    found
}

/// A numeric hub setting: its `--hub-arg` flag, else its environment
/// variable (the hub inherits ours), else the hub's default. A config file
/// (`--hub-arg=--config=…`) is not read: pass the flag too.
fn hub_setting(args: &[String], flag: &str, env: Option<&str>, default: u64) -> anyhow::Result<u64> {
    match flag_value(args, flag).or(env) {
        Some(value) => value.trim().parse().with_context(|| format!("{flag}: not a number: {value:?}")),
        None => Ok(default),
    }
}

/// The hub's `nlp.max_queue_wait_ms` from `--hub-arg=--nlp-max-queue-wait-ms=N`
/// or `FENGDA_NLP_MAX_QUEUE_WAIT_MS` (`env`), else its default.
pub fn hub_max_queue_wait(hub_args: &[String], env: Option<&str>) -> anyhow::Result<Duration> {
    hub_setting(hub_args, "--nlp-max-queue-wait-ms", env, HUB_MAX_QUEUE_WAIT_MS).map(Duration::from_millis)
}

/// Hub flags the load generator adds (before `--hub-arg`s, which may
/// override them): its thousands of sockets come from a few loopback
/// addresses and its customers ask back to back, so the hub's per-address
/// connection limits and per-socket frame rate would throttle the
/// generator instead of measuring the hub.
pub const HUB_LIMIT_ARGS: [&str; 8] = [
    "--max-connections-per-ip",
    "0",
    "--connection-rate-per-ip",
    "0",
    "--max-frames-per-second",
    "1000000",
    "--frame-burst",
    "1000000",
];

/// The TOML config file of the bridge we start (`fengda-nlp --config`):
/// only its stream limit; everything else keeps the bridge's defaults.
pub fn bridge_config(max_streams: usize) -> String {
    format!("# Written by fengda-load for the bridge it starts.\n[limits]\nmax_concurrent_streams = {max_streams}\n")
}

/// A customer's socket URL; `timing` adds `timing=1` (docs/protocol.md),
/// which asks for the `timing` object on `reply.done`.
pub fn ws_url(ip: &str, port: u16, tenant: &str, user: &str, timing: bool) -> String {
    let timing = if timing { "&timing=1" } else { "" };
    format!("ws://{ip}:{port}/ws?tenant={tenant}&user={user}{timing}")
}

/// The sockets the load generator holds at once must fit its open-files
/// limit, with [`SPARE_FDS`] to spare.
pub fn check_nofile(sockets: usize, nofile: u64) -> anyhow::Result<()> {
    let needed = sockets + SPARE_FDS;
    ensure!(
        needed as u64 <= nofile,
        "{sockets} sockets need {needed} open files, but RLIMIT_NOFILE is {nofile} \
         (each process may open 20,000 here; raise the hard limit or open fewer)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_paced_reply_takes_the_first_token_delay_plus_its_tokens() {
        let zero = Pace::default();
        assert!(zero.is_zero());
        assert_eq!(zero.reply_time(40), Duration::ZERO);
        let realistic = Pace { first_token_ms: 300, tokens_per_s: 30.0 };
        assert!(!realistic.is_zero());
        assert_eq!(realistic.reply_time(30), Duration::from_millis(1300));
        assert_eq!(realistic.reply_time(ANSWER_TOKENS), Duration::from_millis(1900));
        // A delay without token pacing, and pacing without a delay.
        assert_eq!(Pace { first_token_ms: 150, tokens_per_s: 0.0 }.reply_time(40), Duration::from_millis(150));
        assert_eq!(Pace { first_token_ms: 0, tokens_per_s: 20.0 }.reply_time(40), Duration::from_secs(2));
    }

    #[test]
    fn pace_is_passed_to_the_bridge_and_reported() {
        let pace = Pace { first_token_ms: 300, tokens_per_s: 30.0 };
        assert_eq!(pace.bridge_args(), ["--first-token-delay-ms", "300", "--tokens-per-second", "30"]);
        assert_eq!(Pace { first_token_ms: 0, tokens_per_s: 2.5 }.bridge_args()[3], "2.5");
        assert_eq!(
            pace.hub_answerer_args(),
            ["--answerer-first-token-delay-ms", "300", "--answerer-tokens-per-second", "30"]
        );
        assert_eq!(pace.json(), json!({"first_token_delay_ms": 300, "tokens_per_second": 30.0}));
        assert!(pace.validate().is_ok());
        assert!(Pace { first_token_ms: 0, tokens_per_s: -1.0 }.validate().is_err());
        assert!(Pace { first_token_ms: 0, tokens_per_s: f64::INFINITY }.validate().is_err());
    }

    #[test]
    fn the_reply_timeout_grows_with_the_pace_and_the_queue_wait() {
        let base = Duration::from_secs(10);
        assert_eq!(reply_timeout(base, Pace::default(), Duration::ZERO), base);
        let realistic = Pace { first_token_ms: 300, tokens_per_s: 30.0 };
        assert_eq!(reply_timeout(base, realistic, Duration::ZERO), Duration::from_millis(11_900));
        assert_eq!(reply_timeout(base, realistic, Duration::from_secs(10)), Duration::from_millis(21_900));
    }

    #[test]
    fn flags_are_found_in_both_spellings_and_the_last_wins() {
        let hub = args(&["--idle-timeout-ms=1", "--nlp-max-queue-wait-ms", "2000", "--nlp-max-concurrent=64"]);
        assert_eq!(flag_value(&hub, "--nlp-max-queue-wait-ms"), Some("2000"));
        assert_eq!(flag_value(&hub, "--nlp-max-concurrent"), Some("64"));
        assert_eq!(flag_value(&hub, "--nlp-max"), None);
        assert_eq!(flag_value(&hub, "--nlp-max-queued"), None);
        assert_eq!(flag_value(&args(&["--x=1", "--x=2"]), "--x"), Some("2"));
        // A flag at the end without its value has none.
        assert_eq!(flag_value(&args(&["--x"]), "--x"), None);
    }

    #[test]
    fn hub_settings_come_from_flag_env_or_default() {
        let none: Vec<String> = Vec::new();
        assert_eq!(hub_max_queue_wait(&none, None).unwrap(), Duration::from_secs(10));
        assert_eq!(hub_max_queue_wait(&none, Some("2500")).unwrap(), Duration::from_millis(2500));
        let flag = args(&["--nlp-max-queue-wait-ms=3000"]);
        assert_eq!(hub_max_queue_wait(&flag, Some("2500")).unwrap(), Duration::from_secs(3));
        assert!(hub_max_queue_wait(&args(&["--nlp-max-queue-wait-ms=soon"]), None).is_err());
    }

    #[test]
    fn the_bridge_config_sets_only_its_stream_limit() {
        assert_eq!(
            bridge_config(1536),
            "# Written by fengda-load for the bridge it starts.\n[limits]\nmax_concurrent_streams = 1536\n"
        );
    }

    #[test]
    fn the_socket_url_asks_for_timing_on_request() {
        assert_eq!(ws_url("127.0.0.2", 9000, "demo", "u-1", false), "ws://127.0.0.2:9000/ws?tenant=demo&user=u-1");
        assert_eq!(
            ws_url("127.0.0.2", 9000, "telco", "u-1", true),
            "ws://127.0.0.2:9000/ws?tenant=telco&user=u-1&timing=1"
        );
    }

    #[test]
    fn sockets_must_fit_the_open_files_limit() {
        assert!(check_nofile(19_800, 20_000).is_ok());
        let error = check_nofile(19_801, 20_000).unwrap_err().to_string();
        assert!(error.contains("19801 sockets need 20001 open files"), "{error}");
    }
}
