//! `fengda-load`: measures what one hub node costs per reply and per idle socket.
//!
//! It starts its own processes from the cargo target dir it lives in (build
//! them with `cargo build --release -p fengda -p fengda-nlp -p fengda-load --bins`)
//! the way the cross-process tests do (`fengda_tests::spawn`), each child's
//! log in `--log-dir`:
//! one external `fengda-nlp --first-token-delay-ms 0 --tokens-per-second 0`
//! (no pacing, so the hub is the thing under load; `--pace-first-token-ms`
//! and `--pace-tokens-per-s` set a realistic pace instead, and the reply
//! timeout grows by the paced answer's time), with its own default limits
//! unless `--bridge-max-streams` sets its answer streams, and one
//! `fengda serve --listen 0.0.0.0:0 --admin-listen 127.0.0.1:0 --insecure-demo --nlp-url <bridge>`
//! (demo identities on all addresses, so that clients can use every
//! loopback address: run it on a machine whose network you trust; with
//! `--allow-timing` under `--timing`), without the per-address
//! connection limits and per-socket frame rate (`setup::HUB_LIMIT_ARGS`;
//! `--hub-arg` may set them again). Or it attaches to a running hub with
//! `--hub-url` (add `--hub-pid` for CPU and memory figures, and
//! `--hub-admin-url` for its `/metrics` gauges): start that hub with the
//! same flags.
//! Client sockets are spread over 127.0.0.1–127.0.0.8 (`--addrs`) so that
//! many thousands of connections do not run out of ephemeral ports.
//! Everything targets loopback, is bounded in count and time, stops by
//! itself, and the child processes are killed when it ends.
//!
//! Cluster mode: `--nodes N --backend redis` starts a private `redis-server`
//! (free loopback port, `--save "" --appendonly no`), one shared bridge and N
//! hubs with `--backend redis --redis-url …`; connection i goes to node
//! i mod N. Hub CPU is summed over all nodes (and given per node), and
//! redis-server's CPU is reported separately. `--backend redis` with one node
//! works too; more than one node needs it.
//!
//! Scenarios:
//!
//! - `replies`: C connections (default 200), each asks Q questions (default
//!   20) one after another, the next after `reply.done`. Measures end-to-end
//!   latency send→`reply.done` (p50/p95/p99/p99.9/max), time to the first
//!   `reply.delta`, replies/s, tokens per reply, and CPU time per reply and
//!   per token of the hub and of the bridge, read just before the first
//!   question and just after the last reply (connection set-up is outside
//!   that window). With `--watchers` (two nodes or more) each conversation
//!   also has a reading socket on the next node from its second question
//!   on: cross-node delivery, checked and timed.
//! - `idle`: opens N sockets (default 10,000) that only wait, and reports the
//!   hub's VmRSS before, with all of them open, and after they closed, and
//!   KiB per idle socket.
//! - `burst` (alias `peak`): an open-loop schedule of questions: R/s for
//!   `--base-secs`, then `--factor`×R/s (15) for `--peak-secs`, then R/s
//!   again. Latency counts from the scheduled send time, so waiting for a
//!   free connection counts too (no coordinated omission). A fallback reply
//!   (after the hub's longest queue wait) is counted apart, not a failure,
//!   and a question may take that wait longer before it is a timeout. With
//!   `--steady-rate R2`, a second tenant (`--steady-tenant`, default
//!   `telco`) asks at R2/s through every phase on its own pool; both are
//!   reported per phase (ok, fallbacks, queued, timeouts, ack, first delta
//!   and `reply.done` percentiles), with the targets (zero timeouts,
//!   ack p99 < 100 ms, the steady tenant's p95 unchanged by the peak).
//!   A question the hub refuses with `rate_limited` (the bursting tenant's
//!   message rate, e.g. `--hub-arg=--config=tests/loadgen/tenant-limits.toml`)
//!   is counted apart too (`failures.by_kind.rate_limited`), and its socket
//!   stays in the pool.
//! - `soak`: open loop at R questions/s for S seconds that samples, every
//!   `--sample-secs`, each hub node's VmRSS and its `/metrics` gauges of live
//!   tasks and open sessions: start, end, max and growth, the series, and a
//!   sample before the load's sockets opened and after they closed.
//! - `rate`: open loop at a fixed R questions/s for S seconds (the `burst`
//!   machinery with one phase); latency from the scheduled send time.
//! - `storm`: N customers each get one question answered, then all lose their
//!   sockets at once (no close handshake, as when a node dies) and reconnect
//!   at once with `conversation`, `after` (the seq of their own message, so
//!   the reply must come back in the replay) and `epoch`. Reports
//!   reconnects/s, connect→`ready` latency, errors, and replayed/lost events.
//! - `hold` is another name for `idle` (sockets/s and KiB per socket).
//!
//! `--timing` connects every socket with `timing=1`, so each `reply.done`
//! carries the hub's `timing` object (docs/protocol.md), and reports the
//! hub's share of the time to first token (p50/p95/p99) apart from the
//! NLP's and the queue's (hub targets only; the bare server is connected
//! without it). `--idle-extra N` opens N more sockets that only wait before
//! `replies`, `rate`, `burst` or `soak` starts and holds them to its end
//! (e.g. `replies -c 1000 --idle-extra 9000`: 10,000 customers connected).
//!
//! The ceiling: `--target bare` runs a scenario against `fengda-bare`
//! (tests/loadgen/src/bin/fengda-bare.rs), a bare tokio-tungstenite server speaking
//! the same contract minimally with a canned 40-token answer, with the same
//! client code; its figures appear under the `hub_*` names. `--compare`
//! runs the scenario against the bare server, then against the hub, in one
//! invocation, and prints hub ÷ bare ratios (replies/s, CPU µs per reply,
//! KiB per idle socket, sockets/s, …); `--rounds N` repeats the pair N times,
//! alternating, and reports medians (one run on this shared machine moves by
//! ±20 % against the next run of the same server). The bare server replays nothing, so
//! `storm` counts lost events only against the hub.
//!
//! CPU time is the sum over the process's threads of
//! `/proc/<pid>/task/<tid>/schedstat` (ns), so that a bare server's few
//! tens of milliseconds are measured precisely; see [`fengda_load::procfs`].
//!
//! Every run ends with one line of JSON holding all its figures (with
//! `--json`, that line is all that is printed).
//!
//! Every reply is verified: an `ack` for the message id, delta indexes
//! 0..n-1 of one reply id, deltas that add up to the `reply.done` text, and
//! `fallback: false` (in `burst`, a fallback is counted instead);
//! `queued` frames of that reply may come before its first delta. Errors, timeouts, closes and mismatches are counted and
//! make the exit status non-zero.
//!
//! This file starts the processes, opens the sockets and runs the
//! scenarios; what needs no socket (schedules, reply verification,
//! statistics, `/proc`, the text report) is the `fengda_load` library, with
//! its tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, Parser, Subcommand};
use fengda_load::frames::{self, Answered, FallbackPolicy, Frame, Progress, ReplyCheck};
use fengda_load::procfs::{self, CpuSnapshot, Watched};
use fengda_load::prometheus;
use fengda_load::report::{self, Failed, Failure, Failures, NodeSample, ReplyStats, ResourceSeries, record, round2};
use fengda_load::schedule::{self, Phase};
use fengda_load::setup::{self, Pace};
use fengda_load::text;
use fengda_tests::RedisServer;
use fengda_tests::spawn::{ChildLog, Launch, LogTo, Started};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Parser)]
#[command(name = "fengda-load", about = "Load generator for the fengda hub (loopback only)")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// Attach to this running hub (`http://HOST:PORT`) instead of starting one.
    #[arg(long, global = true)]
    hub_url: Option<String>,
    /// PID of the attached hub, for its CPU and memory figures.
    #[arg(long, global = true)]
    hub_pid: Option<u32>,
    /// The attached hub's admin listener (`http://HOST:PORT`, its
    /// `admin_listen`), for its `/metrics` gauges.
    #[arg(long, global = true)]
    hub_admin_url: Option<String>,
    /// Spread connections over 127.0.0.1..=127.0.0.N (default 8 for a hub
    /// we start, which listens on 0.0.0.0; 1 when attaching).
    #[arg(long, global = true)]
    addrs: Option<u8>,
    #[arg(long, global = true, default_value = "demo")]
    tenant: String,
    /// The question every client asks (its answer is 40 tokens in the demo knowledge base,
    /// the same 40 tokens the bare server streams).
    #[arg(long, global = true, default_value = "Tell me about the Gold Card")]
    question: String,
    /// Worker threads of the load generator itself (the hub and bridge share the machine).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Seconds one reply (or one connect) may take before it counts as a
    /// timeout. A reply gets more with `--pace-*` (the time the paced answer
    /// takes) and in `burst`/`peak` (plus the hub's longest queue wait, after
    /// which its answer is the fallback).
    #[arg(long, global = true, default_value_t = 10)]
    timeout_secs: u64,
    /// Extra flag for `fengda serve`; repeat it (`--hub-arg=--idle-timeout-ms=120000`).
    #[arg(long = "hub-arg", global = true, allow_hyphen_values = true)]
    hub_args: Vec<String>,
    /// Where the children's stderr logs go (default: <target>/fengda-load/).
    #[arg(long, global = true)]
    log_dir: Option<PathBuf>,
    /// Print only the final JSON line (every run ends with it), not the text report.
    #[arg(long, global = true)]
    json: bool,
    /// Hub nodes to start (more than one needs `--backend redis`); connections
    /// go to them round-robin.
    #[arg(long, global = true, default_value_t = 1)]
    nodes: usize,
    /// Conversation store of the hubs we start. `redis` starts a private
    /// `redis-server` on a free loopback port (no persistence) for the run.
    #[arg(long, global = true, value_enum, default_value_t = Backend::Memory)]
    backend: Backend,
    /// What to start and measure: the hub (with its bridge), or `fengda-bare`,
    /// the bare tokio-tungstenite server that is the ceiling. With `bare`,
    /// the figures named `hub_*` are the bare server's.
    #[arg(long, global = true, value_enum, default_value_t = TargetKind::Hub)]
    target: TargetKind,
    /// Run the scenario against the bare server, then against the hub, and
    /// print hub ÷ bare ratios.
    #[arg(long, global = true)]
    compare: bool,
    /// With `--compare`: run the pair this many times (bare first in odd
    /// rounds, hub first in even ones) and report every figure and ratio as
    /// its median over the rounds (each round's ratios are kept under `rounds`). On a shared machine one
    /// run of the same server moves by ±20 %; a median of rounds does not.
    #[arg(long, global = true, default_value_t = 1, value_name = "N")]
    rounds: usize,
    /// Connect with `timing=1`, so that every `reply.done` carries the hub's
    /// `timing` object, and report the hub's share of the time to first token
    /// apart from the NLP's (p50/p95/p99). Hub targets only: the bare server
    /// is connected without it.
    #[arg(long, global = true)]
    timing: bool,
    /// The bridge we start waits this long before an answer's first token
    /// (its `--first-token-delay-ms`; 0, the default, is no delay). With a
    /// pace, the reply timeout grows by the time an answer takes.
    #[arg(long, global = true, default_value_t = 0, value_name = "MS")]
    pace_first_token_ms: u64,
    /// The bridge we start streams this many tokens per second (its
    /// `--tokens-per-second`; 0, the default, is no pacing).
    #[arg(long, global = true, default_value_t = 0.0, value_name = "N")]
    pace_tokens_per_s: f64,
    /// Start the hubs without a bridge: each answers with its built-in
    /// answerer in-process (the single-binary mode, `fengda serve` without
    /// `--nlp-url`), so the hub's CPU includes the answerer's. The `--pace-*`
    /// options then pace the hubs' answerers.
    #[arg(long, global = true)]
    embedded: bool,
    /// Answer streams the bridge we start allows at once (default: the
    /// bridge's own default, 256; the hubs learn it and queue the rest).
    #[arg(long, global = true, value_name = "N")]
    bridge_max_streams: Option<usize>,
    /// `replies`, `rate`, `burst`/`peak`, `soak`: open N more sockets that only
    /// wait (spread over the addresses and nodes) before the scenario starts,
    /// and hold them to its end: the scenario then runs with N more customers
    /// connected.
    #[arg(long, global = true, default_value_t = 0, value_name = "N")]
    idle_extra: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetKind {
    Hub,
    Bare,
}

impl TargetKind {
    fn name(self) -> &'static str {
        match self {
            TargetKind::Hub => "hub",
            TargetKind::Bare => "bare",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Memory,
    Redis,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
        }
    }
}

#[derive(Subcommand, Clone)]
enum Scenario {
    /// C connections × Q sequential questions (alias `chat`): latency, throughput, CPU per reply.
    #[command(alias = "chat")]
    Replies {
        #[arg(short = 'c', long, default_value_t = 200)]
        connections: usize,
        #[arg(short = 'q', long, default_value_t = 20)]
        questions: usize,
        /// Give each customer's conversation a second socket on the next hub
        /// node that only reads (an agent or a second device elsewhere):
        /// every event and delta then also crosses nodes. Needs two nodes or
        /// more. Reports the watchers' replies under `watchers`.
        #[arg(long)]
        watchers: bool,
    },
    /// N idle sockets (alias `hold`): sockets/s, and the hub's resident memory per socket.
    #[command(alias = "hold")]
    Idle {
        #[arg(short = 'n', long, default_value_t = 10_000)]
        sockets: usize,
        /// Seconds to hold the sockets open after the last `ready`.
        #[arg(long, default_value_t = 3)]
        hold_secs: u64,
    },
    /// R questions/s, then factor×R/s, then R/s again (alias `peak`): latency per phase.
    /// With `--steady-rate`, a second tenant asks at a constant rate throughout.
    /// A fallback reply is counted apart, not as a failure.
    #[command(alias = "peak")]
    Burst {
        /// Baseline questions per second (of `--tenant`, the bursting tenant).
        #[arg(short = 'r', long, default_value_t = 40.0)]
        rate: f64,
        /// The peak's rate is factor × the baseline's.
        #[arg(long, default_value_t = 15.0)]
        factor: f64,
        /// Seconds of the baseline, and again of the recovery after the peak.
        #[arg(long, default_value_t = 5)]
        base_secs: u64,
        /// Seconds of the peak.
        #[arg(long, default_value_t = 5)]
        peak_secs: u64,
        /// Connections in the pool (default: one second of peak rate plus twice
        /// the paced reply time, at least 200).
        #[arg(long)]
        connections: Option<usize>,
        /// Questions per second of the steady tenant through every phase
        /// (0, the default: no steady tenant).
        #[arg(long, default_value_t = 0.0, value_name = "R")]
        steady_rate: f64,
        /// The steady tenant (one with answers in the built-in FAQ: demo, telco, shop).
        #[arg(long, default_value = "telco", value_name = "TENANT")]
        steady_tenant: String,
        /// The question the steady tenant asks.
        #[arg(long, default_value = "What mobile plans do you offer?")]
        steady_question: String,
    },
    /// A steady open loop of R questions/s for S seconds that samples, every
    /// N seconds, each hub node's VmRSS and its live-task and open-session
    /// gauges (from `/metrics`): start, end, max and growth, to see that they
    /// stay flat.
    Soak {
        #[arg(short = 'r', long, default_value_t = 100.0)]
        rate: f64,
        #[arg(short = 's', long, default_value_t = 600)]
        secs: u64,
        /// Seconds between two samples.
        #[arg(long, default_value_t = 30)]
        sample_secs: u64,
        /// Connections in the pool (default: one second of the rate plus twice
        /// the paced reply time, at least 200).
        #[arg(long)]
        connections: Option<usize>,
    },
    /// N customers with one answered question each lose their sockets at once
    /// (as when a node dies) and all reconnect at once with `conversation`,
    /// `after` (the seq before the reply, so the reply must be replayed) and
    /// `epoch`: reconnects/s, errors, and events lost from the replay.
    Storm {
        #[arg(short = 'n', long, default_value_t = 2000)]
        sockets: usize,
    },
    /// Open loop at a fixed R questions/s for S seconds; latency from the
    /// scheduled send time.
    Rate {
        #[arg(short = 'r', long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(short = 's', long, default_value_t = 10)]
        secs: u64,
        /// Connections in the pool (default: one second of the rate plus twice
        /// the paced reply time, at least 200).
        #[arg(long)]
        connections: Option<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads.max(1))
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let clean = runtime.block_on(run(cli))?;
    drop(runtime);
    if !clean {
        eprintln!("fengda-load: FAILED (errors, timeouts or mismatches; see the report)");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let nofile = raise_nofile_limit();
    let common = &cli.common;
    let pace = Pace { first_token_ms: common.pace_first_token_ms, tokens_per_s: common.pace_tokens_per_s };
    pace.validate()?;
    ensure!(
        common.idle_extra == 0 || !matches!(cli.scenario, Scenario::Idle { .. } | Scenario::Storm { .. }),
        "--idle-extra is for replies, rate, burst/peak and soak"
    );
    ensure!(
        !common.embedded || (common.hub_url.is_none() && common.bridge_max_streams.is_none()),
        "--embedded starts hubs without a bridge: not with --hub-url or --bridge-max-streams"
    );
    if !pace.is_zero() {
        ensure!(
            common.hub_url.is_none(),
            "--pace-* sets the pace of the bridge fengda-load starts; an attached hub has its own bridge"
        );
        ensure!(
            common.target == TargetKind::Hub && !common.compare,
            "--pace-* paces the hub's bridge; the bare server answers at once, so there is nothing to compare"
        );
    }
    ensure!(cli.common.rounds >= 1, "--rounds must be at least 1");
    ensure!(cli.common.rounds == 1 || cli.common.compare, "--rounds repeats the pair of --compare; add --compare");
    let (report, clean) = if cli.common.compare {
        ensure!(cli.common.hub_url.is_none(), "--compare starts both servers itself; drop --hub-url");
        let mut common = cli.common.clone();
        let (mut bares, mut hubs, mut rounds, mut clean) = (Vec::new(), Vec::new(), Vec::new(), true);
        for round in 1..=cli.common.rounds {
            // Bare first in odd rounds, hub first in even ones: a drift over the
            // invocation (the machine, TIME_WAIT sockets) does not favour one side.
            let order =
                if round % 2 == 1 { [TargetKind::Bare, TargetKind::Hub] } else { [TargetKind::Hub, TargetKind::Bare] };
            let (mut bare, mut hub) = (None, None);
            for (i, target) in order.into_iter().enumerate() {
                if round > 1 || i > 0 {
                    // Let the previous server's sockets leave TIME_WAIT accounting behind a little.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                common.target = target;
                let (report, run_clean) = run_one(&common, &cli.scenario, nofile).await?;
                if !common.json {
                    if cli.common.rounds > 1 {
                        println!("-- round {round} of {}, {}", cli.common.rounds, target.name());
                    }
                    print!("{}", text::render(&report));
                    println!();
                }
                clean &= run_clean;
                match target {
                    TargetKind::Bare => bare = Some(report),
                    TargetKind::Hub => hub = Some(report),
                }
            }
            let (bare, hub) = (bare.expect("bare ran"), hub.expect("hub ran"));
            rounds.push(report::ratios(&bare, &hub));
            bares.push(bare);
            hubs.push(hub);
        }
        let (bare, hub) = (report::median_of(&bares), report::median_of(&hubs));
        let ratios = report::median_of(&rounds);
        if !common.json {
            if rounds.len() > 1 {
                println!("medians of {} rounds (each figure and each ratio on its own)", rounds.len());
            }
            print!("{}", text::render_ratios(&ratios));
        }
        let mut report = json!({
            "scenario": "compare",
            "compared": hub["scenario"],
            "ratios_hub_over_bare": ratios,
            "bare": bare,
            "hub": hub,
        });
        if rounds.len() > 1 {
            report["rounds"] = json!(rounds);
        }
        (report, clean)
    } else {
        let (report, clean) = run_one(&cli.common, &cli.scenario, nofile).await?;
        if !cli.common.json {
            print!("{}", text::render(&report));
        }
        (report, clean)
    };
    // Always end with one JSON line holding every figure of the run.
    println!("{}", serde_json::to_string(&report)?);
    Ok(clean)
}

async fn run_one(common: &Common, scenario: &Scenario, nofile: u64) -> anyhow::Result<(Value, bool)> {
    let target = Target::start(common).await?;
    let (plan, sockets) = plan(common, &target, scenario)?;
    if !matches!(plan, Plan::Idle { .. }) {
        // (`idle` checks its own.)
        setup::check_nofile(common.idle_extra + sockets, nofile)?;
    }
    let idle_extra = match common.idle_extra {
        0 => None,
        n => Some(IdleExtra::open(common, &target, n).await),
    };
    let result = match plan {
        Plan::Replies { connections, questions, watchers } => {
            replies(common, &target, connections, questions, watchers).await
        }
        Plan::Idle { sockets, hold_secs } => idle(common, &target, sockets, hold_secs, nofile).await,
        Plan::Storm { sockets } => storm(common, &target, sockets).await,
        Plan::OpenLoop(plan) => {
            let OpenLoopPlan { scenario, main, steady, sample_every } = *plan;
            open_loop(common, &target, scenario, main, steady, sample_every).await
        }
    };
    let idle_extra = match idle_extra {
        Some(idle) => Some(idle.close().await),
        None => None,
    };
    let logs = target.stop().await;
    let (mut report, mut clean) = result?;
    if let Some((idle, held)) = idle_extra {
        report["idle_sockets"] = idle;
        clean &= held;
    }
    report["child_logs"] = logs;
    Ok((report, clean))
}

/// What a scenario will run, with the schedules, pools and timeouts of its
/// open loops worked out.
enum Plan {
    Replies { connections: usize, questions: usize, watchers: bool },
    Idle { sockets: usize, hold_secs: u64 },
    Storm { sockets: usize },
    OpenLoop(Box<OpenLoopPlan>),
}

/// An open loop: the main tenant's, a steady tenant's alongside (`burst
/// --steady-rate`), and resource samples every `sample_every` (`soak`).
struct OpenLoopPlan {
    scenario: &'static str,
    main: LoopSpec,
    steady: Option<LoopSpec>,
    sample_every: Option<Duration>,
}

/// The plan of `scenario` and the sockets it holds at once (besides `--idle-extra`).
fn plan(common: &Common, target: &Target, scenario: &Scenario) -> anyhow::Result<(Plan, usize)> {
    let reply_time = target.pace.unwrap_or_default().reply_time(setup::ANSWER_TOKENS);
    let id = run_id();
    let spec = |name: &'static str, phases: Vec<Phase>, pool: usize, policy, timeout| LoopSpec {
        tenant: common.tenant.clone(),
        question: common.question.clone(),
        phases,
        pool_size: pool,
        prefix: format!("{name}-{id}"),
        first_index: 0,
        id_prefix: "b",
        policy,
        timeout,
    };
    let open_loop = |scenario, main: LoopSpec, steady: Option<LoopSpec>, sample_every| {
        let sockets = main.pool_size + steady.as_ref().map_or(0, |s| s.pool_size);
        (Plan::OpenLoop(Box::new(OpenLoopPlan { scenario, main, steady, sample_every })), sockets)
    };
    Ok(match scenario.clone() {
        Scenario::Replies { connections, questions, watchers } => {
            (Plan::Replies { connections, questions, watchers }, connections * (1 + usize::from(watchers)))
        }
        Scenario::Idle { sockets, hold_secs } => (Plan::Idle { sockets, hold_secs }, sockets),
        Scenario::Storm { sockets } => (Plan::Storm { sockets }, sockets),
        Scenario::Rate { rate, secs, connections } => {
            let pool = connections.unwrap_or_else(|| schedule::pool_size(rate, reply_time));
            let phases = vec![Phase::new("rate", rate, secs)];
            let main = spec("rate", phases, pool, FallbackPolicy::Failure, target.reply_timeout(Duration::ZERO));
            open_loop("rate", main, None, None)
        }
        Scenario::Soak { rate, secs, sample_secs, connections } => {
            ensure!(sample_secs >= 1, "--sample-secs must be >= 1");
            let pool = connections.unwrap_or_else(|| schedule::pool_size(rate, reply_time));
            let phases = vec![Phase::new("soak", rate, secs)];
            let main = spec("soak", phases, pool, FallbackPolicy::Failure, target.reply_timeout(Duration::ZERO));
            open_loop("soak", main, None, Some(Duration::from_secs(sample_secs)))
        }
        Scenario::Burst {
            rate,
            factor,
            base_secs,
            peak_secs,
            connections,
            steady_rate,
            steady_tenant,
            steady_question,
        } => {
            ensure!(steady_rate >= 0.0, "--steady-rate must be >= 0");
            // A question may wait for an NLP slot up to the hub's longest
            // queue wait and then get the fallback: not a timeout.
            let queue_wait = match target.kind {
                TargetKind::Hub => setup::hub_max_queue_wait(
                    &common.hub_args,
                    std::env::var("FENGDA_NLP_MAX_QUEUE_WAIT_MS").ok().as_deref(),
                )?,
                TargetKind::Bare => Duration::ZERO,
            };
            let timeout = target.reply_timeout(queue_wait);
            let phases = schedule::burst(rate, factor, base_secs, peak_secs);
            let pool = connections.unwrap_or_else(|| schedule::pool_size(rate * factor, reply_time));
            let steady = (steady_rate > 0.0).then(|| LoopSpec {
                tenant: steady_tenant,
                question: steady_question,
                phases: schedule::constant_alongside(&phases, steady_rate),
                pool_size: schedule::pool_size(steady_rate, reply_time),
                prefix: format!("steady-{id}"),
                // After the bursting tenant's connections, so both spread over the nodes.
                first_index: pool,
                id_prefix: "s",
                policy: FallbackPolicy::Counted,
                timeout,
            });
            let main = spec("burst", phases, pool, FallbackPolicy::Counted, timeout);
            open_loop("burst", main, steady, None)
        }
    })
}

// ---------------------------------------------------------------- processes

/// A process we started, and its log.
struct Spawned {
    name: String,
    pid: u32,
    /// `http://ADDR` from its first stdout line (Redis: `redis://ADDR`).
    url: String,
    /// A hub's admin listener (`/metrics`), from its second stdout line.
    admin_url: Option<String>,
    log: Arc<ChildLog>,
    process: Process,
}

enum Process {
    Binary(Child),
    Redis(RedisServer),
}

impl Spawned {
    /// Starts `program args…` (its log in `log_dir/NAME.log`) and waits for its address line(s).
    async fn binary(
        program: &str,
        name: String,
        args: Vec<String>,
        log_dir: &Path,
        admin: bool,
    ) -> anyhow::Result<Spawned> {
        let log_to = LogTo::File(log_dir.join(format!("{name}.log")));
        let Started { child, pid, url, admin_url, log } = Launch { admin, ..Launch::new(program, args, log_to) }
            .start()
            .await
            .with_context(|| format!("start {name}"))?;
        Ok(Spawned { name, pid, url, admin_url, log, process: Process::Binary(child) })
    }

    /// Starts `redis-server` on a free loopback port, in memory only (its log in `log_dir/redis-server.log`).
    async fn redis(log_dir: &Path) -> anyhow::Result<Spawned> {
        let redis = RedisServer::launch(false, LogTo::File(log_dir.join("redis-server.log"))).await?;
        Ok(Spawned {
            name: "redis-server".into(),
            pid: redis.pid().context("redis-server pid")?,
            url: redis.url.clone(),
            admin_url: None,
            log: redis.log().clone(),
            process: Process::Redis(redis),
        })
    }

    /// Kills it unless it has exited already; returns how it exited early, if it did.
    async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        match &mut self.process {
            Process::Binary(child) => {
                let exited = child.try_wait().ok().flatten();
                if exited.is_none() {
                    let _ = child.kill().await;
                }
                exited
            }
            Process::Redis(redis) => {
                let exited = redis.try_wait();
                redis.kill().await;
                exited
            }
        }
    }
}

/// The hub node(s) under test: started by us, or attached.
struct Target {
    ips: Vec<String>,
    /// One port per hub node (nodes listen on 0.0.0.0).
    ports: Vec<u16>,
    /// The processes whose CPU and memory are measured.
    watched: Watched,
    backend: Backend,
    kind: TargetKind,
    children: Vec<Spawned>,
    /// Each node's admin listener (`HOST:PORT`, where its `/metrics` is),
    /// in node order; None where unknown (the bare server has none).
    metrics_addrs: Vec<Option<String>>,
    /// Sockets connect with `timing=1` (`--timing`, hub targets only).
    timing: bool,
    /// The pace of the bridge we started; None without one (bare, attached).
    pace: Option<Pace>,
    /// `--bridge-max-streams`; None: the bridge's default (or no bridge).
    bridge_max_streams: Option<usize>,
    /// `--timeout-secs`.
    base_timeout: Duration,
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    Ok(exe.parent().context("exe has a parent dir")?.to_path_buf())
}

/// `http://HOST:PORT[/]` → `HOST:PORT`.
fn host_port_text(url: &str) -> anyhow::Result<String> {
    let (host, port) = host_port(url)?;
    Ok(format!("{host}:{port}"))
}

/// `http://HOST:PORT[/]` → (HOST, PORT).
fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest).trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').with_context(|| format!("no port in {url}"))?;
    Ok((host.to_owned(), port.parse().with_context(|| format!("bad port in {url}"))?))
}

impl Target {
    async fn start(common: &Common) -> anyhow::Result<Target> {
        let base_timeout = Duration::from_secs(common.timeout_secs);
        ensure!((1..=16).contains(&common.nodes), "--nodes must be 1..=16");
        ensure!(
            common.nodes == 1 || common.backend == Backend::Redis,
            "--nodes {} needs --backend redis (the memory backend is single-node)",
            common.nodes
        );
        if let Some(url) = &common.hub_url {
            ensure!(
                common.nodes == 1 && common.backend == Backend::Memory,
                "--nodes and --backend apply to hubs fengda-load starts, not with --hub-url"
            );
            let (host, port) = host_port(url)?;
            let addrs = common.addrs.unwrap_or(1);
            let ips = if addrs <= 1 { vec![host.clone()] } else { loopback_ips(addrs) };
            return Ok(Target {
                ips,
                ports: vec![port],
                watched: Watched { hubs: common.hub_pid.into_iter().collect(), bridge: None, redis: None },
                backend: common.backend,
                kind: common.target,
                children: Vec::new(),
                metrics_addrs: vec![common.hub_admin_url.as_deref().map(host_port_text).transpose()?],
                timing: common.timing && common.target == TargetKind::Hub,
                pace: None,
                bridge_max_streams: None,
                base_timeout,
            });
        }
        let log_dir = match &common.log_dir {
            Some(dir) => dir.clone(),
            None => bin_dir()?.parent().context("target dir")?.join("fengda-load"),
        };
        std::fs::create_dir_all(&log_dir).with_context(|| format!("create {}", log_dir.display()))?;
        if common.target == TargetKind::Bare {
            ensure!(
                common.nodes == 1 && common.backend == Backend::Memory,
                "--nodes and --backend apply to the hub, not to --target bare"
            );
            let args = ["--listen", "0.0.0.0:0"].map(String::from);
            let bare = Spawned::binary("fengda-bare", "fengda-bare".into(), args.to_vec(), &log_dir, false).await?;
            return Ok(Target {
                ips: loopback_ips(common.addrs.unwrap_or(8)),
                ports: vec![host_port(&bare.url)?.1],
                watched: Watched { hubs: vec![bare.pid], bridge: None, redis: None },
                backend: common.backend,
                kind: TargetKind::Bare,
                children: vec![bare],
                metrics_addrs: vec![None],
                timing: false,
                pace: None,
                bridge_max_streams: None,
                base_timeout,
            });
        }
        let pace = Pace { first_token_ms: common.pace_first_token_ms, tokens_per_s: common.pace_tokens_per_s };
        let mut bridge_args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
        if let Some(max_streams) = common.bridge_max_streams {
            ensure!(max_streams >= 1, "--bridge-max-streams must be >= 1");
            let bridge_config = log_dir.join("fengda-nlp.toml");
            std::fs::write(&bridge_config, setup::bridge_config(max_streams))
                .with_context(|| format!("write {}", bridge_config.display()))?;
            bridge_args.extend(["--config".into(), bridge_config.display().to_string()]);
        }
        bridge_args.extend(pace.bridge_args());
        // Pushed as they start, so that an early error drops (and kills) them.
        let mut children = Vec::new();
        let redis = match common.backend {
            Backend::Memory => None,
            Backend::Redis => {
                let redis = Spawned::redis(&log_dir).await?;
                let url = redis.url.clone();
                let pid = redis.pid;
                children.push(redis);
                Some((url, pid))
            }
        };
        // Each node's metrics on an ephemeral loopback port (printed second).
        // 0.0.0.0 so that clients on 127.0.0.1–8 reach it; demo mode (tenant
        // and user from the query) must be told it may listen there.
        let mut hub_args: Vec<String> =
            ["serve", "--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0", "--insecure-demo"]
                .map(String::from)
                .to_vec();
        if common.timing {
            hub_args.push("--allow-timing".into());
        }
        let bridge_pid = if common.embedded {
            hub_args.extend(pace.hub_answerer_args());
            None
        } else {
            let bridge = Spawned::binary("fengda-nlp", "fengda-nlp".into(), bridge_args, &log_dir, false).await?;
            hub_args.extend(["--nlp-url".into(), bridge.url.clone()]);
            let pid = bridge.pid;
            children.push(bridge);
            Some(pid)
        };
        hub_args.extend(["--backend".into(), common.backend.name().into()]);
        if let Some((url, _)) = &redis {
            hub_args.extend(["--redis-url".into(), url.clone()]);
        }
        hub_args.extend(setup::HUB_LIMIT_ARGS.map(String::from));
        hub_args.extend(common.hub_args.iter().cloned());
        let (mut ports, mut hub_pids, mut metrics_addrs) = (Vec::new(), Vec::new(), Vec::new());
        for node in 1..=common.nodes {
            let name = if common.nodes == 1 { "fengda".to_owned() } else { format!("fengda-{node}") };
            let hub = Spawned::binary("fengda", name, hub_args.clone(), &log_dir, true).await?;
            ports.push(host_port(&hub.url)?.1);
            metrics_addrs.push(hub.admin_url.as_deref().map(host_port_text).transpose()?);
            hub_pids.push(hub.pid);
            children.push(hub);
        }
        let ips = loopback_ips(common.addrs.unwrap_or(8));
        Ok(Target {
            ips,
            ports,
            watched: Watched { hubs: hub_pids, bridge: bridge_pid, redis: redis.map(|(_, pid)| pid) },
            backend: common.backend,
            kind: TargetKind::Hub,
            children,
            metrics_addrs,
            timing: common.timing,
            pace: Some(pace),
            bridge_max_streams: common.bridge_max_streams,
            base_timeout,
        })
    }

    /// Connection `i` goes to node `i % nodes` (round-robin), from one of the loopback addresses.
    fn ws_url(&self, i: usize, tenant: &str, user: &str) -> String {
        let port = self.ports[i % self.ports.len()];
        setup::ws_url(&self.ips[i % self.ips.len()], port, tenant, user, self.timing)
    }

    /// How long a question may take to its `reply.done`: `--timeout-secs`,
    /// plus the paced answer's time, plus `queue_wait`.
    fn reply_timeout(&self, queue_wait: Duration) -> Duration {
        setup::reply_timeout(self.base_timeout, self.pace.unwrap_or_default(), queue_wait)
    }

    /// Sum over all hub nodes; None if any is unknown.
    fn hub_sum(&self, f: impl Fn(u32) -> Option<u64>) -> Option<u64> {
        if self.watched.hubs.is_empty() {
            return None;
        }
        self.watched.hubs.iter().map(|&pid| f(pid)).sum()
    }

    fn setup_json(&self) -> Value {
        json!({
            "target": self.kind.name(),
            "backend": self.backend.name(),
            "nodes": self.ports.len(),
            "hub_pids": self.watched.hubs,
            "redis_pid": self.watched.redis,
            "timing": self.timing,
            "nlp_pace": self.pace.map(|p| p.json()),
            "bridge_max_streams": self.bridge_max_streams,
            "embedded": self.kind == TargetKind::Hub && self.pace.is_some() && self.watched.bridge.is_none(),
        })
    }

    /// Kills what we started; returns a summary of their logs.
    async fn stop(mut self) -> Value {
        let mut logs = serde_json::Map::new();
        for child in self.children.iter_mut().rev() {
            let exited = child.stop().await;
            // Give the log copier a moment to finish the file.
            tokio::time::sleep(Duration::from_millis(50)).await;
            logs.insert(
                child.name.clone(),
                json!({
                    "pid": child.pid,
                    "log": child.log.path.as_ref().map(|path| path.display().to_string()),
                    "exited_early": exited.map(|s| s.to_string()),
                    "warn_lines": child.log.warn_lines(),
                    "error_lines": child.log.error_lines(),
                    "samples": child.log.samples(),
                }),
            );
        }
        Value::Object(logs)
    }
}

fn loopback_ips(n: u8) -> Vec<String> {
    (1..=n.max(1)).map(|i| format!("127.0.0.{i}")).collect()
}

fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
        limit.rlim_cur
    }
}

// ---------------------------------------------------------------- sockets

/// Connects and waits for `ready`; returns the socket with its `ready` frame.
async fn connect(url: &str, timeout: Duration) -> anyhow::Result<(Ws, Frame)> {
    let step = async {
        // TCP_NODELAY on our side, so any Nagle delay measured is the hub's.
        // 16 KiB read buffers: tungstenite's default 128 KiB per socket froze
        // the one runtime thread for about a second once 10,000 sockets were
        // open (page faults and zeroing), and 4 KiB cost a second read for
        // most 40-token replies.
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024).write_buffer_size(16 * 1024);
        let (mut ws, _) =
            connect_async_with_config(url, Some(config), true).await.with_context(|| format!("connect {url}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame = Frame::parse(text.as_str()).context("first frame is not JSON")?;
                    ensure!(frame.kind == "ready", "first frame should be ready, got {} {:?}", frame.kind, frame.code);
                    return Ok((ws, frame));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => bail!("unexpected first frame {other:?}"),
                Some(Err(e)) => return Err(e).context("socket failed before ready"),
                None => bail!("socket ended before ready"),
            }
        }
    };
    tokio::time::timeout(timeout, step).await.context("no ready within the timeout")?
}

/// Sends one question and feeds what comes back to a [`ReplyCheck`] until
/// it has the answer or fails. Times are measured from `t0`.
async fn ask(
    ws: &mut Ws,
    id: &str,
    text: &str,
    policy: FallbackPolicy,
    t0: Instant,
    deadline: Instant,
) -> Result<Answered, Failed> {
    let failed = |kind: Failure, what: String| Failed::new(kind, format!("{id}: {what}"));
    let sent = tokio::time::timeout_at(deadline.into(), ws.send(Message::text(frames::message_frame(id, text)))).await;
    match sent {
        Err(_) => return Err(failed(Failure::Timeout, "send".into())),
        Ok(Err(e)) => return Err(failed(Failure::Closed, format!("send failed: {e}"))),
        Ok(Ok(())) => {}
    }
    let mut check = ReplyCheck::new(id, policy);
    loop {
        let message = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Err(_) => return Err(failed(Failure::Timeout, format!("no reply.done in time ({})", check.state()))),
            Ok(None) => return Err(failed(Failure::Closed, "socket ended".into())),
            Ok(Some(Err(e))) => return Err(failed(Failure::Closed, format!("socket failed: {e}"))),
            Ok(Some(Ok(message))) => message,
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(frame) => return Err(failed(Failure::Closed, format!("close {frame:?}"))),
            other => return Err(failed(Failure::Mismatch, format!("unexpected {other:?}"))),
        };
        if let Progress::Answered(answer) = check.on_text(text.as_str(), t0.elapsed())? {
            return Ok(answer);
        }
    }
}

async fn close_quietly(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{:x}", nanos % 0xffff_ffff)
}

/// Opens `n` ready connections of `tenant`'s users `<prefix>-<i>`,
/// `parallel` handshakes at a time; connection i goes to node and address
/// `first_index + i`. Each comes with its `ready` frame.
async fn open_many(
    target: &Target,
    tenant: &str,
    n: usize,
    first_index: usize,
    parallel: usize,
    prefix: &str,
    timeout: Duration,
) -> (Vec<(usize, Ws, Frame)>, Failures, Duration) {
    let started = Instant::now();
    let urls: Vec<(usize, String)> =
        (0..n).map(|i| (i, target.ws_url(first_index + i, tenant, &format!("{prefix}-{i}")))).collect();
    let results: Vec<(usize, anyhow::Result<(Ws, Frame)>)> = futures::stream::iter(urls)
        .map(|(i, url)| async move { (i, connect(&url, timeout).await) })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut failures = Failures::default();
    let mut sockets = Vec::with_capacity(n);
    for (i, result) in results {
        match result {
            Ok((ws, ready)) => sockets.push((i, ws, ready)),
            Err(e) => failures.add(Failed::new(Failure::Connect, format!("#{i}: {e:#}"))),
        }
    }
    (sockets, failures, started.elapsed())
}

// ---------------------------------------------------------------- replies

async fn replies(
    common: &Common,
    target: &Target,
    connections: usize,
    questions: usize,
    watch: bool,
) -> anyhow::Result<(Value, bool)> {
    ensure!(!watch || target.ports.len() >= 2, "--watchers needs two hub nodes or more (--nodes)");
    let prefix = format!("lg-{}", run_id());
    let connect_timeout = Duration::from_secs(common.timeout_secs);
    let (sockets, connect_failures, connect_time) =
        open_many(target, &common.tenant, connections, 0, 100, &prefix, connect_timeout).await;
    let timeout = target.reply_timeout(Duration::ZERO);
    let before = CpuSnapshot::take(&target.watched);
    // One set of histograms for all clients: a set per client (eleven
    // 170 KiB histograms) made the load generator page-fault its way through
    // gigabytes, more against a faster server, which skewed the ratios.
    let shared = Arc::new(Mutex::new(ReplyStats { failures: connect_failures, ..ReplyStats::default() }));
    let watched = Arc::new(Mutex::new(ReplyStats::default()));
    let mut tasks = Vec::with_capacity(sockets.len());
    for (i, mut ws, ready) in sockets {
        let text = common.question.clone();
        let shared = shared.clone();
        // The watcher's socket, opened once the first question created the
        // conversation: the next node (and address), the same user.
        let watcher_url = watch.then(|| {
            let url = target.ws_url(i + 1, &common.tenant, &format!("{prefix}-{i}"));
            format!("{url}&conversation={}", ready.conversation.as_deref().unwrap_or_default())
        });
        let watched = watched.clone();
        tasks.push(tokio::spawn(async move {
            // When each question was sent, for the watcher's latencies.
            let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
            let asked = CancellationToken::new();
            let mut watcher = None;
            let tally = |outcome: Result<Answered, Failed>| {
                let mut stats = shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match outcome {
                    Ok(answer) => stats.answered(&answer),
                    Err(failed) => stats.failed(failed),
                }
            };
            let mut alive = true;
            for q in 0..questions {
                let id = format!("c{i}-q{q}");
                let t0 = Instant::now();
                lock(&sent).push(t0);
                let outcome = ask(&mut ws, &id, &text, FallbackPolicy::Failure, t0, t0 + timeout).await;
                // The socket's state is unknown after a failure: stop using it.
                alive = outcome.is_ok();
                tally(outcome);
                if !alive {
                    break;
                }
                if q == 0
                    && let Some(url) = &watcher_url
                {
                    match connect(url, connect_timeout).await {
                        Ok((socket, _)) => {
                            let (sent, asked, watched) = (sent.clone(), asked.clone(), watched.clone());
                            watcher = Some(tokio::spawn(async move {
                                let socket =
                                    watch_replies(socket, i, questions, &sent, &asked, timeout, &watched).await;
                                close_quietly(socket).await;
                                Instant::now()
                            }));
                        }
                        Err(e) => lock(&watched).failed(Failed::new(Failure::Connect, format!("watcher #{i}: {e:#}"))),
                    }
                }
            }
            let mut finished = Instant::now();
            asked.cancel();
            if alive {
                close_quietly(ws).await;
            }
            if let Some(watcher) = watcher {
                finished = finished.max(watcher.await.unwrap_or(finished));
            }
            finished
        }));
    }
    let mut last_done = before.at;
    for task in tasks {
        let finished = task.await.context("client task panicked")?;
        last_done = last_done.max(finished);
    }
    let unwrap_stats = |stats: Arc<Mutex<ReplyStats>>| {
        Arc::try_unwrap(stats)
            .map_err(|_| anyhow::anyhow!("client tasks still hold the stats"))
            .map(|stats| stats.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()))
    };
    let stats = unwrap_stats(shared)?;
    let watched = unwrap_stats(watched)?;
    // Clients close as they finish; the snapshot after all joined includes
    // those closes, a small share next to thousands of replies.
    let after = CpuSnapshot::take(&target.watched);
    let cpu = before.delta(&after);
    let wall = (last_done - before.at).as_secs_f64();
    let (ok, tokens, failures) = (stats.ok, stats.tokens, &stats.failures);
    let watched_expected = if watch { connections * questions.saturating_sub(1) } else { 0 };
    let watchers_clean = watched.failures.total() == 0 && watched.ok == watched_expected as u64;
    let clean = failures.total() == 0 && ok == (connections * questions) as u64 && watchers_clean;
    let report = json!({
        "scenario": "replies",
        "connections": connections,
        "questions_per_connection": questions,
        "question": common.question,
        "connect_s": round2(connect_time.as_secs_f64()),
        "replies_ok": ok,
        "replies_expected": connections * questions,
        "failures": failures.json(),
        "wall_s": round2(wall),
        "replies_per_s": round2(ok as f64 / wall),
        "tokens_per_s": round2(tokens as f64 / wall),
        "setup": target.setup_json(),
        "tokens_per_reply": if ok > 0 { round2(tokens as f64 / ok as f64) } else { 0.0 },
        "latency_ms": report::percentiles_ms(&stats.done),
        "first_delta_ms": report::percentiles_ms(&stats.first_delta),
        "ack_ms": report::percentiles_ms(&stats.ack),
        "queued": stats.queued,
        "reply_timeout_s": round2(timeout.as_secs_f64()),
        "timing": if target.timing { stats.timing.json() } else { Value::Null },
        "cpu": cpu.json(ok, tokens),
        "watchers": if watch {
            json!({
                "replies_ok": watched.ok,
                "replies_expected": watched_expected,
                "failures": watched.failures.json(),
                "tokens": watched.tokens,
                "latency_ms": report::percentiles_ms(&watched.done),
                "first_delta_ms": report::percentiles_ms(&watched.first_delta),
                "message_ms": report::percentiles_ms(&watched.ack),
            })
        } else {
            Value::Null
        },
    });
    Ok((report, clean))
}

/// A watcher's side of customer `i`'s questions after the first: each question (the
/// customer's `message`), then its reply's deltas and `reply.done`, checked
/// like the asker's and timed from the question's send (`sent`). Stops at
/// the first failure, or once the asker is done (`asked`) and every question
/// it sent was watched.
async fn watch_replies(
    mut ws: Ws,
    i: usize,
    questions: usize,
    sent: &Mutex<Vec<Instant>>,
    asked: &CancellationToken,
    timeout: Duration,
    stats: &Mutex<ReplyStats>,
) -> Ws {
    'questions: for q in 1..questions {
        let id = format!("c{i}-q{q}");
        let mut check = ReplyCheck::watching(&id, FallbackPolicy::Failure);
        let deadline = Instant::now() + timeout;
        let outcome = loop {
            // The asker is done and never sent this question: nothing more comes.
            if asked.is_cancelled() && lock(sent).len() <= q {
                break 'questions;
            }
            let next = tokio::select! {
                next = tokio::time::timeout_at(deadline.into(), ws.next()) => next,
                () = asked.cancelled(), if !asked.is_cancelled() => continue,
            };
            let text = match next {
                Err(_) => break Err(Failed::new(Failure::Timeout, format!("watcher {id}: {}", check.state()))),
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => break Err(Failed::new(Failure::Closed, format!("watcher {id}: {other:?}"))),
            };
            let Some(&t0) = lock(sent).get(q) else {
                break Err(Failed::new(Failure::Mismatch, format!("watcher {id}: a frame before the question")));
            };
            match check.on_text(text.as_str(), t0.elapsed()) {
                Ok(Progress::Answered(answer)) => break Ok(answer),
                Ok(Progress::Waiting) => {}
                Err(failed) => break Err(failed),
            }
        };
        let mut stats = lock(stats);
        match outcome {
            Ok(answer) => stats.answered(&answer),
            Err(failed) => {
                stats.failed(failed);
                break;
            }
        }
    }
    ws
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------- storm

/// One customer of the storm: its conversation, epoch and the seqs it saw.
struct Resume {
    i: usize,
    user: String,
    conversation: String,
    epoch: String,
    /// The seq of the customer's message (the `ack`): resume after it.
    after: u64,
    /// The seq of the reply, which the replay must bring back.
    last: u64,
}

/// Time to `ready` from the start of the storm, events replayed, events lost.
type Resumed = (Duration, u64, u64);

async fn storm(common: &Common, target: &Target, sockets: usize) -> anyhow::Result<(Value, bool)> {
    ensure!(sockets <= 10_000, "at most 10,000 storm sockets");
    let timeout = Duration::from_secs(common.timeout_secs);
    let reply_timeout = target.reply_timeout(Duration::ZERO);
    let prefix = format!("storm-{}", run_id());
    // 1. Seed: every customer connects and gets one question answered.
    let seeded: Vec<Result<Resume, Failed>> = futures::stream::iter(0..sockets)
        .map(|i| {
            let user = format!("{prefix}-{i}");
            let url = target.ws_url(i, &common.tenant, &user);
            let text = common.question.clone();
            async move {
                let (mut ws, ready) =
                    connect(&url, timeout).await.map_err(|e| Failed::new(Failure::Connect, format!("#{i}: {e:#}")))?;
                let t0 = Instant::now();
                let answer =
                    ask(&mut ws, &format!("s{i}"), &text, FallbackPolicy::Failure, t0, t0 + reply_timeout).await?;
                let last = answer.done_seq.unwrap_or(0);
                // 2. The node "dies": the socket goes away without a close handshake.
                drop(ws);
                Ok(Resume {
                    i,
                    user,
                    conversation: ready.conversation.unwrap_or_default(),
                    epoch: ready.epoch.unwrap_or_default(),
                    after: last.saturating_sub(1),
                    last,
                })
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let mut seed_failures = Failures::default();
    let mut resumes = Vec::with_capacity(sockets);
    for r in seeded {
        match r {
            Ok(r) => resumes.push(r),
            Err(failed) => seed_failures.add(failed),
        }
    }
    // Let the server notice every socket is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The bare server keeps no history, so it cannot replay anything.
    let expect_replay = target.kind == TargetKind::Hub;
    // 3. Everyone reconnects at once, resuming.
    let before = CpuSnapshot::take(&target.watched);
    let started = Instant::now();
    let n = resumes.len();
    let results: Vec<Result<Resumed, Failed>> = futures::stream::iter(resumes)
        .map(|r| {
            let url = format!(
                "{}&conversation={}&after={}&epoch={}",
                target.ws_url(r.i, &common.tenant, &r.user),
                r.conversation,
                r.after,
                r.epoch
            );
            async move {
                let (mut ws, ready) = connect(&url, timeout)
                    .await
                    .map_err(|e| Failed::new(Failure::Connect, format!("#{}: {e:#}", r.i)))?;
                let ready_at = started.elapsed();
                if ready.conversation.as_deref() != Some(r.conversation.as_str()) {
                    return Err(Failed::new(Failure::Mismatch, format!("#{}: ready for another conversation", r.i)));
                }
                let (mut replayed, mut lost) = (0u64, 0u64);
                if expect_replay {
                    let deadline = Instant::now() + timeout;
                    let mut seen = r.after;
                    while seen < r.last {
                        let message = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
                            Ok(Some(Ok(m))) => m,
                            _ => break,
                        };
                        let Message::Text(text) = message else { continue };
                        let Ok(frame) = Frame::parse(text.as_str()) else { continue };
                        match frame.kind.as_str() {
                            "message" => {
                                let seq = frame.seq.unwrap_or(0);
                                if seq != seen + 1 {
                                    let detail = format!("#{}: replay seq {seq} after {seen}", r.i);
                                    return Err(Failed::new(Failure::Mismatch, detail));
                                }
                                seen = seq;
                                replayed += 1;
                            }
                            "error" => {
                                let detail = format!("#{}: error {:?} {:?}", r.i, frame.code, frame.message);
                                return Err(Failed::new(Failure::ErrorFrame, detail));
                            }
                            _ => {}
                        }
                    }
                    lost = r.last - seen;
                }
                close_quietly(ws).await;
                Ok((ready_at, replayed, lost))
            }
        })
        .buffer_unordered(n.max(1))
        .collect()
        .await;
    let storm_time = started.elapsed();
    let after = CpuSnapshot::take(&target.watched);
    let mut failures = Failures::default();
    let mut ready_hist = report::new_histogram();
    let (mut ok, mut replayed, mut lost) = (0u64, 0u64, 0u64);
    for r in results {
        match r {
            Ok((ready_at, rep, l)) => {
                ok += 1;
                record(&mut ready_hist, ready_at);
                replayed += rep;
                lost += l;
            }
            Err(failed) => failures.add(failed),
        }
    }
    let cpu = before.delta(&after);
    let clean = seed_failures.total() == 0 && failures.total() == 0 && lost == 0 && ok == sockets as u64;
    let report = json!({
        "scenario": "storm",
        "sockets": sockets,
        "seeded": n,
        "seed_failures": seed_failures.json(),
        "reconnected": ok,
        "failures": failures.json(),
        "storm_s": round2(storm_time.as_secs_f64()),
        "reconnects_per_s": round2(ok as f64 / storm_time.as_secs_f64()),
        "ready_ms": report::percentiles_ms(&ready_hist),
        "replay_expected": expect_replay,
        "events_replayed": replayed,
        "events_lost": if expect_replay { json!(lost) } else { Value::Null },
        "hub_us_per_reconnect": cpu.hub_us.filter(|_| ok > 0).map(|us| round2(us as f64 / ok as f64)),
        "setup": target.setup_json(),
    });
    Ok((report, clean))
}

// ---------------------------------------------------------------- idle

async fn idle(
    common: &Common,
    target: &Target,
    sockets: usize,
    hold_secs: u64,
    nofile: u64,
) -> anyhow::Result<(Value, bool)> {
    ensure!(sockets <= 19_000, "at most 19,000 idle sockets (each process may open 20,000 files)");
    ensure!(
        (sockets as u64) + 200 <= nofile,
        "RLIMIT_NOFILE is {nofile}; {sockets} sockets need {} (raise the hard limit)",
        sockets + 200
    );
    // Let the freshly started hub settle before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = |t: &Target| t.hub_sum(procfs::rss_kib);
    let fds = |t: &Target| t.hub_sum(|p| procfs::open_fds(p).map(|n| n as u64));
    let rss_before = rss(target);
    let fds_before = fds(target);
    let cpu_before = CpuSnapshot::take(&target.watched);
    let prefix = format!("idle-{}", run_id());
    let timeout = Duration::from_secs(common.timeout_secs);
    let (opened, failures, connect_time) = open_many(target, &common.tenant, sockets, 0, 256, &prefix, timeout).await;
    let cpu_connected = CpuSnapshot::take(&target.watched);
    let ready = opened.len();

    // Hold: each socket gets a reader (answers pings) until we cancel.
    let stop = CancellationToken::new();
    let dropped = Arc::new(AtomicU64::new(0));
    let holders: Vec<_> = opened.into_iter().map(|(_, ws, _)| hold(ws, stop.clone(), dropped.clone())).collect();
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    let rss_open = rss(target);
    let fds_open = fds(target);
    let redis_rss = target.watched.redis.and_then(procfs::rss_kib);
    let self_rss = procfs::rss_kib(std::process::id());
    let hold_cpu = CpuSnapshot::take(&target.watched);
    stop.cancel();
    for holder in holders {
        let _ = holder.await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_closed = rss(target);
    let fds_closed = fds(target);

    let dropped = dropped.load(Ordering::Relaxed);
    let per_socket = match (rss_before, rss_open) {
        (Some(a), Some(b)) if ready > 0 => Some(round2(b.saturating_sub(a) as f64 / ready as f64)),
        _ => None,
    };
    let connect_cpu = cpu_before.delta(&cpu_connected);
    let hold = cpu_connected.delta(&hold_cpu);
    let clean = failures.total() == 0 && dropped == 0 && ready == sockets;
    let report = json!({
        "scenario": "idle",
        "sockets_requested": sockets,
        "sockets_ready": ready,
        "dropped_while_idle": dropped,
        "failures": failures.json(),
        "nofile_limit": nofile,
        "connect_s": round2(connect_time.as_secs_f64()),
        "connects_per_s": round2(ready as f64 / connect_time.as_secs_f64()),
        "hub_us_per_connect": connect_cpu.hub_us.filter(|_| ready > 0).map(|us| round2(us as f64 / ready as f64)),
        "hub_cpu_ms_while_idle": hold.hub_us.map(|us| us / 1000),
        "hold_s": round2(hold.wall.as_secs_f64()),
        "hub_rss_kib": { "before": rss_before, "all_open": rss_open, "after_close": rss_closed },
        "hub_open_fds": { "before": fds_before, "all_open": fds_open, "after_close": fds_closed },
        "hub_kib_per_idle_socket": per_socket,
        "loadgen_rss_kib": self_rss,
        "redis_rss_kib_all_open": redis_rss,
        "setup": target.setup_json(),
    });
    Ok((report, clean))
}

// ---------------------------------------------------------------- open loops

/// One tenant's open loop: who asks what, on which schedule, on how many
/// connections, and how an answer is judged.
struct LoopSpec {
    tenant: String,
    question: String,
    phases: Vec<Phase>,
    pool_size: usize,
    /// Users are `<prefix>-<i>`; connection i goes to node (first_index + i) mod N.
    prefix: String,
    first_index: usize,
    /// Question ids are `<id_prefix><seq>`.
    id_prefix: &'static str,
    policy: FallbackPolicy,
    /// From a question's scheduled send to its `reply.done`.
    timeout: Duration,
}

/// The connections of one open loop: each question takes a free one and
/// gives it back after its answer.
struct Pool {
    // Unbounded: it never holds more than the pool's connections.
    tx: tokio::sync::mpsc::UnboundedSender<Ws>,
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Ws>>>,
    ready: usize,
    failures: Failures,
    connect_time: Duration,
}

async fn open_pool(common: &Common, target: &Target, spec: &LoopSpec) -> Pool {
    let (sockets, failures, connect_time) = open_many(
        target,
        &spec.tenant,
        spec.pool_size,
        spec.first_index,
        100,
        &spec.prefix,
        Duration::from_secs(common.timeout_secs),
    )
    .await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Ws>();
    let ready = sockets.len();
    for (_, ws, _) in sockets {
        let _ = tx.send(ws);
    }
    Pool { tx, rx: Arc::new(tokio::sync::Mutex::new(rx)), ready, failures, connect_time }
}

async fn close_pool(pool: Pool) {
    drop(pool.tx);
    let mut rx = pool.rx.lock().await;
    rx.close();
    let mut idle = Vec::new();
    while let Some(ws) = rx.recv().await {
        idle.push(close_quietly(ws));
    }
    futures::future::join_all(idle).await;
}

/// One question of an open loop: its answer and how long it waited for a
/// free pool connection, or why it failed.
struct Outcome {
    phase: usize,
    result: Result<(Answered, Duration), Failed>,
}

/// What one open loop measured, per phase, with CPU snapshots at the phase
/// boundaries: phase i runs from `snapshots[i]` (the previous phase's last
/// send, or the start) to `snapshots[i + 1]` (its own last send).
struct Driven {
    stats: Vec<ReplyStats>,
    snapshots: Vec<CpuSnapshot>,
    /// After the last answer.
    drained: CpuSnapshot,
}

/// Runs `spec`'s schedule from `start` on `pool`: each send at its time on a
/// free connection, whatever the answers do; latency counts from the
/// scheduled send time (no coordinated omission).
async fn drive(spec: &LoopSpec, pool: &Pool, start: Instant, watched: &Watched) -> Driven {
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let mut snapshots = vec![CpuSnapshot::take(watched)];
    for send in schedule::sends(&spec.phases) {
        while snapshots.len() < send.phase + 1 {
            snapshots.push(CpuSnapshot::take(watched));
        }
        let t0 = start + send.at;
        tokio::time::sleep_until(t0.into()).await;
        let (pool_rx, pool_tx, out_tx) = (pool.rx.clone(), pool.tx.clone(), out_tx.clone());
        let text = spec.question.clone();
        let (phase, id, policy) = (send.phase, format!("{}{}", spec.id_prefix, send.seq), spec.policy);
        let deadline = t0 + spec.timeout;
        tokio::spawn(async move {
            let ws = tokio::time::timeout_at(deadline.into(), async { pool_rx.lock().await.recv().await }).await;
            let result = match ws {
                Err(_) => Err(Failed::new(Failure::Timeout, format!("{id}: no free connection in time"))),
                Ok(None) => Err(Failed::new(Failure::Closed, format!("{id}: connection pool is empty"))),
                Ok(Some(mut ws)) => {
                    let waited = t0.elapsed();
                    let result = ask(&mut ws, &id, &text, policy, t0, deadline).await;
                    // A question refused at its tenant's rate leaves its socket open and usable.
                    if result.as_ref().map_or_else(|failed| failed.kind == Failure::RateLimited, |_| true) {
                        let _ = pool_tx.send(ws);
                    }
                    result.map(|answer| (answer, waited))
                }
            };
            let _ = out_tx.send(Outcome { phase, result });
        });
    }
    while snapshots.len() < spec.phases.len() + 1 {
        snapshots.push(CpuSnapshot::take(watched));
    }
    drop(out_tx);
    let mut stats: Vec<ReplyStats> = spec.phases.iter().map(|_| ReplyStats::default()).collect();
    while let Some(outcome) = out_rx.recv().await {
        let phase = &mut stats[outcome.phase];
        match outcome.result {
            Ok((answer, waited)) => {
                phase.answered(&answer);
                record(&mut phase.wait_for_connection, waited);
            }
            Err(failed) => phase.failed(failed),
        }
    }
    Driven { stats, snapshots, drained: CpuSnapshot::take(watched) }
}

/// The report of each phase: its schedule, how its questions ended, and
/// (for the loop whose CPU the run reports) the cores the hub and the
/// bridge kept busy.
fn phase_reports(spec: &LoopSpec, driven: &Driven, with_cpu: bool, timing: bool) -> Vec<Value> {
    let scheduled = schedule::counts(&spec.phases);
    spec.phases
        .iter()
        .zip(&driven.stats)
        .enumerate()
        .map(|(i, (phase, stats))| {
            let mut report = stats.outcome_json(timing);
            report["phase"] = json!(phase.name);
            report["rate_per_s"] = json!(round2(phase.rate_per_s));
            report["secs"] = json!(phase.secs);
            report["scheduled"] = json!(scheduled[i]);
            if with_cpu {
                let cpu = driven.snapshots[i].delta(&driven.snapshots[i + 1]);
                report["hub_cores_busy"] = json!(cpu.cores(cpu.hub_us));
                report["bridge_cores_busy"] = json!(cpu.cores(cpu.bridge_us));
                // Near 1 core (one worker thread): the load generator limits the figures.
                report["loadgen_cores_busy"] = json!(cpu.cores(Some(cpu.loadgen_us)));
            }
            report
        })
        .collect()
}

/// Totals over the phases of one loop, its connect failures included.
struct Totals {
    scheduled: u64,
    ok: u64,
    fallbacks: u64,
    tokens: u64,
    failures: Failures,
}

fn totals(spec: &LoopSpec, pool: Failures, driven: Driven) -> Totals {
    let mut t = Totals {
        scheduled: schedule::counts(&spec.phases).iter().sum(),
        ok: 0,
        fallbacks: 0,
        tokens: 0,
        failures: pool,
    };
    for phase in driven.stats {
        t.ok += phase.ok;
        t.fallbacks += phase.fallbacks;
        t.tokens += phase.tokens;
        t.failures.merge(phase.failures);
    }
    t
}

/// Open loop of the main tenant, with a steady tenant's loop alongside
/// (`burst --steady-rate`) and resource samples every `sample_every`
/// (`soak`) if asked. Both loops open their pools first, then start their
/// schedules at the same instant.
async fn open_loop(
    common: &Common,
    target: &Target,
    scenario: &str,
    main: LoopSpec,
    steady: Option<LoopSpec>,
    sample_every: Option<Duration>,
) -> anyhow::Result<(Value, bool)> {
    schedule::validate(&main.phases)?;
    if let Some(steady) = &steady {
        schedule::validate(&steady.phases)?;
    }
    let before = match sample_every {
        Some(_) => Some(sample_nodes(target).await),
        None => None,
    };
    let mut pool = open_pool(common, target, &main).await;
    let steady_pool = match &steady {
        Some(spec) => Some(open_pool(common, target, spec).await),
        None => None,
    };
    let start = Instant::now();
    let stop = CancellationToken::new();
    let loops = async {
        let steady_run = async {
            match (&steady, &steady_pool) {
                (Some(spec), Some(pool)) => Some(drive(spec, pool, start, &target.watched).await),
                _ => None,
            }
        };
        let both = tokio::join!(drive(&main, &pool, start, &target.watched), steady_run);
        stop.cancel();
        both
    };
    let sampler = async {
        match sample_every {
            Some(every) => Some(sample_resources(target, every, start, stop.clone()).await),
            None => None,
        }
    };
    let ((driven, steady_driven), series) = tokio::join!(loops, sampler);
    let (pool_ready, connect_time) = (pool.ready, pool.connect_time);
    let pool_failures = std::mem::take(&mut pool.failures);
    close_pool(pool).await;
    let resources = match (series, before) {
        (Some(series), Some(before)) => {
            // Let the hub end the closed sessions' tasks before the last look.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after_close = sample_nodes(target).await;
            series.json(&before, &after_close)
        }
        _ => Value::Null,
    };

    let phase_reports_main = phase_reports(&main, &driven, true, target.timing);
    let whole = driven.snapshots[0].delta(&driven.drained);
    let main_totals = totals(&main, pool_failures, driven);
    // Questions refused at the tenant's message rate are the hub doing its job, like fallbacks.
    let limited = main_totals.failures.count(Failure::RateLimited);
    let mut clean = main_totals.failures.total() == limited
        && main_totals.ok + main_totals.fallbacks + limited == main_totals.scheduled;
    let (mut all_ok, mut all_tokens) = (main_totals.ok, main_totals.tokens);

    let steady_report = match (steady, steady_pool, steady_driven) {
        (Some(spec), Some(mut pool), Some(driven)) => {
            let phases = phase_reports(&spec, &driven, false, target.timing);
            let failures = std::mem::take(&mut pool.failures);
            let (ready, connect_time) = (pool.ready, pool.connect_time);
            close_pool(pool).await;
            let t = totals(&spec, failures, driven);
            clean &= t.failures.total() == 0 && t.ok + t.fallbacks == t.scheduled;
            all_ok += t.ok;
            all_tokens += t.tokens;
            json!({
                "tenant": spec.tenant,
                "question": spec.question,
                "rate_per_s": round2(spec.phases[0].rate_per_s),
                "pool_connections": ready,
                "connect_s": round2(connect_time.as_secs_f64()),
                "scheduled": t.scheduled,
                "ok": t.ok,
                "fallbacks": t.fallbacks,
                "timeouts": t.failures.count(Failure::Timeout),
                "failures": t.failures.json(),
                "phases": phases,
            })
        }
        _ => Value::Null,
    };
    let targets = if scenario == "burst" {
        report::peak_targets(&Value::Array(phase_reports_main.clone()), &steady_report)
    } else {
        Value::Null
    };
    let report = json!({
        "scenario": scenario,
        "tenant": main.tenant,
        "question": main.question,
        "pool_connections": pool_ready,
        "connect_s": round2(connect_time.as_secs_f64()),
        "reply_timeout_s": round2(main.timeout.as_secs_f64()),
        "fallback_policy": match main.policy {
            FallbackPolicy::Failure => "failure",
            FallbackPolicy::Counted => "counted",
        },
        "phases": phase_reports_main,
        "scheduled": main_totals.scheduled,
        "ok": main_totals.ok,
        "fallbacks": main_totals.fallbacks,
        "timeouts": main_totals.failures.count(Failure::Timeout),
        "failures": main_totals.failures.json(),
        // Every reply of the run, the steady tenant's too.
        "cpu": whole.json(all_ok, all_tokens),
        "steady_tenant": steady_report,
        "targets": targets,
        "resources": resources,
        "setup": target.setup_json(),
    });
    Ok((report, clean))
}

// ---------------------------------------------------------------- soak samples

/// Samples every hub node every `every` from `start` until `stop`, then once more.
async fn sample_resources(target: &Target, every: Duration, start: Instant, stop: CancellationToken) -> ResourceSeries {
    let mut series = ResourceSeries::new(target.ports.len(), every.as_secs());
    let mut next = start;
    loop {
        let at = start.elapsed();
        series.push(at, &sample_nodes(target).await);
        next += every;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
    // The last sample: after the last answer.
    series.push(start.elapsed(), &sample_nodes(target).await);
    series
}

/// VmRSS and the `/metrics` gauges of every hub node, in node order.
async fn sample_nodes(target: &Target) -> Vec<NodeSample> {
    let mut samples = Vec::with_capacity(target.ports.len());
    for i in 0..target.ports.len() {
        let metrics = match target.metrics_addrs.get(i).cloned().flatten() {
            Some(addr) => fetch_metrics(&addr).await.ok(),
            None => None,
        };
        let gauge = |name: &str| metrics.as_deref().and_then(|text| prometheus::gauge(text, name));
        samples.push(NodeSample {
            rss_kib: target.watched.hubs.get(i).copied().and_then(procfs::rss_kib),
            tasks_alive: gauge(prometheus::TASKS_ALIVE),
            sessions_open: gauge(prometheus::SESSIONS_OPEN),
        });
    }
    samples
}

/// `GET /metrics` of one node's admin listener `addr` (`HOST:PORT`;
/// HTTP/1.0: the body ends when the hub closes).
async fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.write_all(prometheus::request(addr).as_bytes()).await?;
        let mut response = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response).await?;
        let response = String::from_utf8_lossy(&response);
        Ok::<_, anyhow::Error>(prometheus::response_body(&response)?.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.context("/metrics took over 5 s")?
}

// ---------------------------------------------------------------- extra idle sockets

/// `--idle-extra`: sockets that only wait through the whole scenario.
struct IdleExtra {
    requested: usize,
    ready: usize,
    failures: Failures,
    connect_time: Duration,
    stop: CancellationToken,
    dropped: Arc<AtomicU64>,
    holders: Vec<tokio::task::JoinHandle<()>>,
}

impl IdleExtra {
    async fn open(common: &Common, target: &Target, n: usize) -> IdleExtra {
        let prefix = format!("idle-extra-{}", run_id());
        let timeout = Duration::from_secs(common.timeout_secs);
        // Index 0.. like the scenario's own connections: both spread evenly over nodes and addresses.
        let (opened, failures, connect_time) = open_many(target, &common.tenant, n, 0, 256, &prefix, timeout).await;
        let ready = opened.len();
        let (stop, dropped) = (CancellationToken::new(), Arc::new(AtomicU64::new(0)));
        let holders = opened.into_iter().map(|(_, ws, _)| hold(ws, stop.clone(), dropped.clone())).collect();
        IdleExtra { requested: n, ready, failures, connect_time, stop, dropped, holders }
    }

    /// Closes them; the report's `idle_sockets` and whether all held.
    async fn close(self) -> (Value, bool) {
        self.stop.cancel();
        for holder in self.holders {
            let _ = holder.await;
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        let clean = self.failures.total() == 0 && dropped == 0 && self.ready == self.requested;
        let report = json!({
            "requested": self.requested,
            "ready": self.ready,
            "connect_s": round2(self.connect_time.as_secs_f64()),
            "dropped": dropped,
            "failures": self.failures.json(),
        });
        (report, clean)
    }
}

/// Holds an idle socket, reading (and so answering pings) until `stop`;
/// counts it in `dropped` if the server ends it first.
fn hold(mut ws: Ws, stop: CancellationToken, dropped: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => close_quietly(ws).await,
            _ = async {
                while let Some(Ok(message)) = ws.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            } => { dropped.fetch_add(1, Ordering::Relaxed); }
        }
    })
}
