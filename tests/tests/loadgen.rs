//! The load generator end to end: `fengda-load` starts the real servers
//! (bare ceiling, hub, bridge, Redis), speaks the wire contract to them and
//! reports clean runs. Small counts: these prove the generator and the hub
//! agree on the contract, not any figure (figures live in docs/benchmarks.md).

use std::process::Stdio;

use fengda_tests::binary;
use serde_json::Value;

/// Runs `fengda-load --json ARGS…`, requires a zero exit status, returns its JSON line.
async fn fengda_load(args: &[&str]) -> Value {
    let program = binary("fengda-load");
    // The children's logs go beside the binaries (target/<profile>/loadgen-test-logs/…), one folder per run.
    let logs = program.with_file_name("loadgen-test-logs").join(args.join("_"));
    let output = tokio::process::Command::new(&program)
        .arg("--json")
        .arg("--log-dir")
        .arg(&logs)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run fengda-load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fengda-load {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|error| panic!("last line is not JSON ({error}): {last:?}"))
}

fn assert_all_answered(report: &Value) {
    assert_eq!(report["scenario"], "replies", "{report}");
    assert_eq!(report["failures"]["total"], 0, "{report}");
    assert_eq!(report["replies_ok"], report["replies_expected"], "{report}");
    assert!(report["replies_per_s"].as_f64().unwrap() > 0.0, "{report}");
}

#[tokio::test]
async fn compare_runs_bare_and_hub_in_rounds_and_reports_medians() {
    let report = fengda_load(&["--embedded", "--compare", "--rounds", "2", "replies", "-c", "20", "-q", "3"]).await;
    assert_eq!(report["compared"], "replies");
    assert_all_answered(&report["bare"]);
    assert_all_answered(&report["hub"]);
    assert_eq!(report["bare"]["setup"]["target"], "bare");
    assert_eq!(report["hub"]["setup"]["embedded"], true);
    let rounds = report["rounds"].as_array().expect("per-round ratios");
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        assert!(round["replies_per_s"].as_f64().unwrap() > 0.0, "{round}");
    }
    // The reported ratio is the median of the rounds' (the mean of two).
    let median = (rounds[0]["replies_per_s"].as_f64().unwrap() + rounds[1]["replies_per_s"].as_f64().unwrap()) / 2.0;
    let reported = report["ratios_hub_over_bare"]["replies_per_s"].as_f64().unwrap();
    assert!((reported - median).abs() < 0.011, "median {median}, reported {reported}");
}

#[tokio::test]
async fn replies_through_the_bridge_report_the_hubs_share_and_the_bridges_cpu() {
    let report = fengda_load(&["--timing", "replies", "-c", "10", "-q", "3"]).await;
    assert_all_answered(&report);
    assert_eq!(report["timing"]["replies_with_timing"], 30, "{report}");
    assert!(report["timing"]["hub_share_ms"]["p99"].as_f64().is_some(), "{report}");
    assert!(report["cpu"]["bridge_us_per_reply"].as_f64().is_some(), "{report}");
}

#[tokio::test]
async fn three_redis_nodes_answer_every_question_and_watchers_on_the_next_node_see_every_reply() {
    let args = ["--nodes", "3", "--backend", "redis", "replies", "-c", "12", "-q", "3", "--watchers"];
    let report = fengda_load(&args).await;
    assert_all_answered(&report);
    assert_eq!(report["setup"]["nodes"], 3);
    assert_eq!(report["cpu"]["hub_nodes"].as_array().map(Vec::len), Some(3), "{report}");
    // Every question after the first, delivered across nodes.
    let watchers = &report["watchers"];
    assert_eq!(watchers["replies_ok"], 24, "{report}");
    assert_eq!(watchers["replies_expected"], 24, "{report}");
    assert_eq!(watchers["failures"]["total"], 0, "{report}");
    assert!(watchers["tokens"].as_u64() >= Some(24), "{report}");
}

#[tokio::test]
async fn a_reconnect_storm_replays_every_reply() {
    let report = fengda_load(&["storm", "-n", "100"]).await;
    assert_eq!(report["scenario"], "storm", "{report}");
    assert_eq!(report["failures"]["total"], 0, "{report}");
    assert_eq!(report["events_lost"], 0, "{report}");
    assert_eq!(report["events_replayed"], 100, "{report}");
    assert_eq!(report["reconnected"], 100, "{report}");
}
