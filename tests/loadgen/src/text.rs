//! The human-readable report printed before the JSON line, rendered from
//! that same JSON, so the two cannot disagree.

use std::fmt::Write;

use serde_json::Value;

/// `p50 … / p95 … / p99 … / p99.9 … / max … ms`, or `n/a`.
fn percentiles(v: &Value) -> String {
    if v.is_null() {
        return "n/a".to_owned();
    }
    let p99_9 = if v["p99_9"].is_null() { String::new() } else { format!(" / p99.9 {}", v["p99_9"]) };
    format!("p50 {} / p95 {} / p99 {}{p99_9} / max {} ms", v["p50"], v["p95"], v["p99"], v["max"])
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// The whole report of one run.
pub fn render(r: &Value) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut out, r);
    out
}

fn write_report(out: &mut String, r: &Value) -> std::fmt::Result {
    write_setup(out, &r["setup"])?;
    if let Some(idle) = r["idle_sockets"].as_object() {
        writeln!(
            out,
            "extra idle sockets: {} of {} ready in {} s, held through the run, {} dropped, {} failures",
            idle["ready"], idle["requested"], idle["connect_s"], idle["dropped"], idle["failures"]["total"]
        )?;
    }
    match r["scenario"].as_str() {
        Some("replies") => write_replies(out, r)?,
        Some("idle") => write_idle(out, r)?,
        Some("burst" | "rate" | "soak") => write_open_loop(out, r)?,
        Some("storm") => write_storm(out, r)?,
        _ => writeln!(out, "{}", serde_json::to_string_pretty(r).unwrap_or_default())?,
    }
    write_failures(out, &r["failures"], "  ")?;
    write_child_logs(out, &r["child_logs"])
}

fn write_setup(out: &mut String, setup: &Value) -> std::fmt::Result {
    if setup["target"] == "bare" {
        writeln!(out, "setup: fengda-bare (the ceiling; figures labelled \"hub\" are the bare server's)")?;
    } else if !setup.is_null() {
        write!(out, "setup: {} hub node(s), {} backend", setup["nodes"], str_of(&setup["backend"]))?;
        let pace = &setup["nlp_pace"];
        if !pace.is_null() {
            let answerer = if setup["embedded"] == true { "in-process answerer" } else { "bridge" };
            write!(
                out,
                ", {answerer} pace {} ms to the first token, {} tokens/s",
                pace["first_token_delay_ms"], pace["tokens_per_second"]
            )?;
        }
        if setup["timing"] == true {
            write!(out, ", timing=1")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Per-node hub CPU and redis-server CPU, when there is more than one node or a Redis.
fn write_cluster_cpu(out: &mut String, c: &Value) -> std::fmt::Result {
    let nodes = c["hub_nodes"].as_array().map(Vec::as_slice).unwrap_or_default();
    if nodes.len() > 1 {
        let each: Vec<String> = nodes
            .iter()
            .map(|n| format!("node {}: {} ms ({} cores)", n["node"], n["cpu_ms"], n["cores_busy"]))
            .collect();
        writeln!(out, "  hub CPU by node: {}", each.join(", "))?;
    }
    if !c["redis_cpu_ms"].is_null() {
        writeln!(
            out,
            "  redis CPU  {} µs/reply  {} µs/token  ({} cores busy, {} ms)",
            c["redis_us_per_reply"], c["redis_us_per_token"], c["redis_cores_busy"], c["redis_cpu_ms"]
        )?;
    }
    Ok(())
}

/// The hub's share of the time to first token apart from the NLP's (`--timing`).
fn write_timing(out: &mut String, t: &Value, indent: &str) -> std::fmt::Result {
    if t.is_null() {
        return Ok(());
    }
    writeln!(
        out,
        "{indent}timing (from reply.done, {} replies{}):",
        t["replies_with_timing"],
        match t["replies_without_timing"].as_u64() {
            Some(0) | None => String::new(),
            Some(n) => format!(", {n} WITHOUT a timing object"),
        }
    )?;
    writeln!(out, "{indent}  hub share (before NLP + relay) {}", percentiles(&t["hub_share_ms"]))?;
    writeln!(out, "{indent}    of which before NLP          {}", percentiles(&t["hub_before_nlp_ms"]))?;
    writeln!(out, "{indent}    of which relay, worst token  {}", percentiles(&t["relay_max_ms"]))?;
    writeln!(out, "{indent}  NLP first token                {}", percentiles(&t["nlp_first_token_ms"]))?;
    writeln!(out, "{indent}  queue (waiting for a slot)     {}", percentiles(&t["queue_ms"]))?;
    writeln!(out, "{indent}  1st delta outside these        {}", percentiles(&t["first_delta_untimed_ms"]))?;
    writeln!(out, "{indent}    (socket read, first token's write, both ends' runtimes, the load generator)")?;
    Ok(())
}

fn write_replies(out: &mut String, r: &Value) -> std::fmt::Result {
    writeln!(
        out,
        "replies: {} connections × {} questions ({}), connected in {} s",
        r["connections"], r["questions_per_connection"], r["question"], r["connect_s"]
    )?;
    writeln!(
        out,
        "  ok {} / {}   failures {}   wall {} s",
        r["replies_ok"], r["replies_expected"], r["failures"]["total"], r["wall_s"]
    )?;
    writeln!(
        out,
        "  {} replies/s   {} deltas/s   {} deltas/reply",
        r["replies_per_s"], r["tokens_per_s"], r["tokens_per_reply"]
    )?;
    writeln!(out, "  send→reply.done  {}", percentiles(&r["latency_ms"]))?;
    writeln!(out, "  send→1st delta   {}  (time to first token)", percentiles(&r["first_delta_ms"]))?;
    writeln!(out, "  send→ack         {}", percentiles(&r["ack_ms"]))?;
    let w = &r["watchers"];
    if !w.is_null() {
        writeln!(out, "  watchers on the next node: ok {}   failures {}", w["replies_ok"], w["failures"]["total"])?;
        writeln!(out, "    send→message     {}", percentiles(&w["message_ms"]))?;
        writeln!(out, "    send→1st delta   {}", percentiles(&w["first_delta_ms"]))?;
        writeln!(out, "    send→reply.done  {}", percentiles(&w["latency_ms"]))?;
    }
    if r["queued"].as_u64().unwrap_or(0) > 0 {
        writeln!(out, "  {} replies waited in line (queued frames) first", r["queued"])?;
    }
    write_timing(out, &r["timing"], "  ")?;
    let c = &r["cpu"];
    writeln!(
        out,
        "  hub CPU    {} µs/reply  {} µs/token  ({} cores busy, all nodes)",
        c["hub_us_per_reply"], c["hub_us_per_token"], c["hub_cores_busy"]
    )?;
    write_cluster_cpu(out, c)?;
    writeln!(
        out,
        "  bridge CPU {} µs/reply  {} µs/token  ({} cores busy)",
        c["bridge_us_per_reply"], c["bridge_us_per_token"], c["bridge_cores_busy"]
    )?;
    writeln!(out, "  loadgen CPU {} µs/reply ({} cores busy)", c["loadgen_us_per_reply"], c["loadgen_cores_busy"])
}

fn write_idle(out: &mut String, r: &Value) -> std::fmt::Result {
    writeln!(
        out,
        "idle: {} of {} sockets ready in {} s ({} /s), {} dropped while idle",
        r["sockets_ready"], r["sockets_requested"], r["connect_s"], r["connects_per_s"], r["dropped_while_idle"]
    )?;
    let rss = &r["hub_rss_kib"];
    writeln!(
        out,
        "  hub VmRSS  before {} KiB   all open {} KiB   after close {} KiB",
        rss["before"], rss["all_open"], rss["after_close"]
    )?;
    writeln!(out, "  hub KiB per idle socket: {}", r["hub_kib_per_idle_socket"])?;
    let fds = &r["hub_open_fds"];
    writeln!(
        out,
        "  hub open fds: before {} all open {} after close {}",
        fds["before"], fds["all_open"], fds["after_close"]
    )?;
    writeln!(
        out,
        "  hub CPU: {} µs per connect (upgrade + ready), {} ms while holding {} s",
        r["hub_us_per_connect"], r["hub_cpu_ms_while_idle"], r["hold_s"]
    )?;
    writeln!(out, "  loadgen VmRSS {} KiB", r["loadgen_rss_kib"])?;
    if !r["redis_rss_kib_all_open"].is_null() {
        writeln!(out, "  redis-server VmRSS with all open {} KiB", r["redis_rss_kib_all_open"])?;
    }
    Ok(())
}

/// One line per phase, plus the outcome, ack, waits and timing lines where they say something.
fn write_phases(out: &mut String, phases: &Value) -> std::fmt::Result {
    for p in phases.as_array().into_iter().flatten() {
        let cores = &p["hub_cores_busy"];
        writeln!(
            out,
            "  {:<9} {:>7}/s × {} s: ok {}/{} failures {}  latency {}{}",
            str_of(&p["phase"]),
            p["rate_per_s"],
            p["secs"],
            p["ok"],
            p["scheduled"],
            p["failures"]["total"],
            percentiles(&p["latency_ms"]),
            if cores.is_null() { String::new() } else { format!("  (hub {cores} cores)") }
        )?;
        if let Some(loadgen) = p["loadgen_cores_busy"].as_f64().filter(|&c| c >= 0.9) {
            writeln!(out, "            load generator {loadgen} cores busy: it may be what limits this phase")?;
        }
        if p["fallbacks"].is_u64() {
            writeln!(
                out,
                "            fallbacks {}  queued {} ({} queued frames)  timeouts {}",
                p["fallbacks"], p["queued"], p["queued_frames"], p["timeouts"]
            )?;
        }
        if !p["ack_ms"].is_null() {
            writeln!(out, "            ack       {}", percentiles(&p["ack_ms"]))?;
            writeln!(out, "            1st delta {}", percentiles(&p["first_delta_ms"]))?;
        }
        if p["wait_for_connection_ms"]["p99"].as_f64().unwrap_or(0.0) > 1.0 {
            writeln!(
                out,
                "            waited for a free pool connection: {}",
                percentiles(&p["wait_for_connection_ms"])
            )?;
        }
        write_timing(out, &p["timing"], "            ")?;
    }
    Ok(())
}

/// `burst`, `rate` and `soak`: latencies count from the scheduled send time.
fn write_open_loop(out: &mut String, r: &Value) -> std::fmt::Result {
    writeln!(
        out,
        "{}: pool of {} connections (connected in {} s)",
        str_of(&r["scenario"]),
        r["pool_connections"],
        r["connect_s"]
    )?;
    if r["fallback_policy"] == "counted" {
        writeln!(out, "  (a fallback reply, e.g. after the hub's longest queue wait, is counted, not a failure)")?;
    }
    let steady = &r["steady_tenant"];
    if !steady.is_null() {
        writeln!(out, "bursting tenant {} ({}):", str_of(&r["tenant"]), r["question"])?;
    }
    write_phases(out, &r["phases"])?;
    if !steady.is_null() {
        writeln!(
            out,
            "steady tenant {} ({}), {}/s through every phase, pool of {}: ok {}/{} fallbacks {} timeouts {}",
            str_of(&steady["tenant"]),
            steady["question"],
            steady["rate_per_s"],
            steady["pool_connections"],
            steady["ok"],
            steady["scheduled"],
            steady["fallbacks"],
            steady["timeouts"]
        )?;
        write_phases(out, &steady["phases"])?;
        write_failures(out, &steady["failures"], "  steady tenant ")?;
    }
    write_targets(out, &r["targets"])?;
    writeln!(out, "  hub CPU {} µs/reply over the run", r["cpu"]["hub_us_per_reply"])?;
    write_cluster_cpu(out, &r["cpu"])?;
    write_resources(out, &r["resources"])
}

/// The peak's targets (issue #7), one line each.
fn write_targets(out: &mut String, t: &Value) -> std::fmt::Result {
    if t.is_null() {
        return Ok(());
    }
    let met = |v: &Value| match v.as_bool() {
        Some(true) => "met",
        Some(false) => "NOT MET",
        None => "not judged",
    };
    writeln!(out, "peak targets:")?;
    writeln!(out, "  timeouts {} (target 0): {}", t["timeouts"]["value"], met(&t["timeouts"]["met"]))?;
    let ack = &t["ack_p99_ms_worst_phase"];
    writeln!(
        out,
        "  ack p99, worst phase {} ms (target < {} ms): {}",
        ack["value"],
        ack["target_below"],
        met(&ack["met"])
    )?;
    let s = &t["steady_first_delta_p95_ms"];
    writeln!(
        out,
        "  steady tenant 1st delta p95: baseline {} ms, peak {} ms ({}×; target {}): {}",
        s["baseline"],
        s["peak"],
        s["peak_over_baseline"],
        str_of(&s["target"]),
        met(&s["met"])
    )?;
    let d = &t["steady_done_p95_ms"];
    writeln!(
        out,
        "  steady tenant reply.done p95: baseline {} ms, peak {} ms ({}×)",
        d["baseline"], d["peak"], d["peak_over_baseline"]
    )
}

/// The soak's samples of each node: resident memory, live tasks, open sessions.
fn write_resources(out: &mut String, res: &Value) -> std::fmt::Result {
    if res.is_null() {
        return Ok(());
    }
    writeln!(out, "  samples every {} s ({} in all), start → end (max):", res["interval_s"], res["samples_taken"])?;
    for node in res["nodes"].as_array().into_iter().flatten() {
        let line = |v: &Value| format!("{} → {} (max {})", v["start"], v["end"], v["max"]);
        writeln!(
            out,
            "    node {}: VmRSS KiB {}   tasks alive {}   sessions open {}",
            node["node"],
            line(&node["rss_kib"]),
            line(&node["tasks_alive"]),
            line(&node["sessions_open"])
        )?;
        let sample = |v: &Value| {
            format!(
                "VmRSS KiB {}, tasks alive {}, sessions open {}",
                v["rss_kib"], v["tasks_alive"], v["sessions_open"]
            )
        };
        if !node["before"].is_null() {
            writeln!(out, "      before the load's sockets: {}", sample(&node["before"]))?;
        }
        if !node["after_close"].is_null() {
            writeln!(out, "      after they closed:         {}", sample(&node["after_close"]))?;
        }
    }
    if let Some(note) = res["note"].as_str() {
        writeln!(out, "  NOTE: {note}")?;
    }
    Ok(())
}

fn write_storm(out: &mut String, r: &Value) -> std::fmt::Result {
    writeln!(
        out,
        "storm: {} customers seeded ({} failures), {} reconnected at once in {} s ({} /s)",
        r["seeded"], r["seed_failures"]["total"], r["reconnected"], r["storm_s"], r["reconnects_per_s"]
    )?;
    writeln!(out, "  connect→ready    {}", percentiles(&r["ready_ms"]))?;
    writeln!(
        out,
        "  replayed events {}, lost events {}, failures {}",
        r["events_replayed"], r["events_lost"], r["failures"]["total"]
    )?;
    writeln!(out, "  hub CPU {} µs per reconnect (with replay)", r["hub_us_per_reconnect"])?;
    write_failures(out, &r["seed_failures"], "  seeding ")
}

fn write_failures(out: &mut String, failures: &Value, prefix: &str) -> std::fmt::Result {
    if failures["total"].as_u64().unwrap_or(0) == 0 {
        return Ok(());
    }
    writeln!(out, "{prefix}failures by kind: {}", failures["by_kind"])?;
    for sample in failures["samples"].as_array().into_iter().flatten() {
        writeln!(out, "    {}", str_of(sample))?;
    }
    Ok(())
}

fn write_child_logs(out: &mut String, logs: &Value) -> std::fmt::Result {
    for (name, log) in logs.as_object().into_iter().flatten() {
        writeln!(
            out,
            "  {name} log: {} WARN, {} ERROR lines ({}){}",
            log["warn_lines"],
            log["error_lines"],
            str_of(&log["log"]),
            log["exited_early"].as_str().map(|s| format!(" EXITED EARLY: {s}")).unwrap_or_default()
        )?;
        for sample in log["samples"].as_array().into_iter().flatten() {
            writeln!(out, "    {}", str_of(sample))?;
        }
    }
    Ok(())
}

/// The hub ÷ bare ratios of `--compare`.
pub fn render_ratios(ratios: &Value) -> String {
    let mut out = String::from("hub ÷ bare (ceiling), same run:\n");
    for (k, v) in ratios.as_object().into_iter().flatten() {
        let unit = if v.is_object() || v.is_array() { "" } else { "×" };
        out.push_str(&format!("  {k}: {v}{unit}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn replies_report_shows_latency_timing_and_cpu() {
        let r = json!({
            "scenario": "replies", "connections": 2, "questions_per_connection": 3, "question": "Q",
            "connect_s": 0.1, "replies_ok": 6, "replies_expected": 6, "failures": {"total": 0},
            "wall_s": 1.0, "replies_per_s": 6.0, "tokens_per_s": 240.0, "tokens_per_reply": 40.0,
            "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0}, "first_delta_ms": null, "ack_ms": null,
            "queued": 0,
            "timing": {"replies_with_timing": 6, "replies_without_timing": 0,
                "hub_share_ms": {"p50": 0.2, "p95": 0.3, "p99": 0.4, "max": 0.5}},
            "cpu": {"hub_us_per_reply": 100.0, "hub_nodes": [{"node": 1}]},
            "setup": {"target": "hub", "nodes": 1, "backend": "memory", "timing": true,
                "nlp_pace": {"first_token_delay_ms": 150, "tokens_per_second": 25.0}},
        });
        let text = render(&r);
        assert!(text.contains("setup: 1 hub node(s), memory backend, bridge pace 150 ms"), "{text}");
        assert!(text.contains("send→reply.done  p50 1.0 / p95 2.0 / p99 3.0 / max 4.0 ms"), "{text}");
        assert_eq!(
            percentiles(&serde_json::json!({"p50": 1.0, "p95": 2.0, "p99": 3.0, "p99_9": 3.5, "max": 4.0})),
            "p50 1.0 / p95 2.0 / p99 3.0 / p99.9 3.5 / max 4.0 ms"
        );
        assert!(text.contains("send→1st delta   n/a"), "{text}");
        assert!(text.contains("hub share (before NLP + relay) p50 0.2 / p95 0.3"), "{text}");
        assert!(!text.contains("WITHOUT"), "{text}");
        assert!(!text.contains("failures by kind"), "{text}");
    }

    #[test]
    fn setup_line_names_who_answers() {
        let setup = |embedded| {
            json!({"target": "hub", "nodes": 1, "backend": "memory", "embedded": embedded,
                   "nlp_pace": {"first_token_delay_ms": 0, "tokens_per_second": 0.0}})
        };
        let mut text = String::new();
        write_setup(&mut text, &setup(true)).unwrap();
        assert!(text.starts_with("setup: 1 hub node(s), memory backend, in-process answerer pace 0 ms"), "{text}");
        text.clear();
        write_setup(&mut text, &setup(false)).unwrap();
        assert!(text.contains(", bridge pace 0 ms"), "{text}");
    }

    #[test]
    fn soak_report_says_when_gauges_are_missing() {
        let r = json!({
            "scenario": "soak", "tenant": "demo", "pool_connections": 200, "connect_s": 0.5,
            "phases": [{"phase": "soak", "rate_per_s": 100.0, "secs": 600, "ok": 60000, "scheduled": 60000,
                "fallbacks": 0, "queued": 0, "timeouts": 0, "failures": {"total": 0}}],
            "failures": {"total": 1, "by_kind": {"timeout": 1}, "samples": ["timeout: b7"]},
            "cpu": {}, "steady_tenant": null,
            "resources": {"interval_s": 30, "samples_taken": 22, "note": "no fengda_hub_runtime_tasks_alive",
                "nodes": [{"node": 1, "rss_kib": {"start": 1, "end": 2, "max": 3},
                    "tasks_alive": {"start": null, "end": null, "max": null}, "sessions_open": {}}]},
        });
        let text = render(&r);
        assert!(text.starts_with("soak: pool of 200 connections (connected in 0.5 s)\n"), "{text}");
        assert!(text.contains("node 1: VmRSS KiB 1 → 2 (max 3)   tasks alive null → null"), "{text}");
        assert!(text.contains("NOTE: no fengda_hub_runtime_tasks_alive"), "{text}");
        assert!(text.contains("failures by kind: {\"timeout\":1}\n    timeout: b7"), "{text}");
    }

    #[test]
    fn open_loop_report_has_a_line_per_phase() {
        let percentiles = json!({"p50": 1.5, "p95": 2.0, "p99": 3.0, "max": 4.0});
        let phase = |name: &str, wait_p99: f64| {
            json!({"phase": name, "rate_per_s": 40.0, "secs": 5, "scheduled": 200, "ok": 199,
                "failures": {"total": 1}, "latency_ms": percentiles,
                "wait_for_connection_ms": {"p50": 0.0, "p95": 0.0, "p99": wait_p99, "max": 9.0},
                "hub_cores_busy": 0.25, "bridge_cores_busy": 0.1})
        };
        let r = json!({
            "scenario": "burst", "pool_connections": 600, "connect_s": 0.2,
            "phases": [phase("baseline", 0.5), phase("peak", 7.0)],
            "failures": {"total": 1, "by_kind": {"timeout": 1}, "samples": ["timeout: b17: no reply.done in time"]},
            "cpu": {"hub_us_per_reply": 120.0, "hub_nodes": [{"node": 1}]},
            "setup": {"target": "hub", "nodes": 1, "backend": "memory"},
        });
        let expected = "setup: 1 hub node(s), memory backend\n\
            burst: pool of 600 connections (connected in 0.2 s)\n\
            \x20 baseline  40.0/s × 5 s: ok 199/200 failures 1  latency p50 1.5 / p95 2.0 / p99 3.0 / max 4.0 ms  (hub 0.25 cores)\n\
            \x20 peak      40.0/s × 5 s: ok 199/200 failures 1  latency p50 1.5 / p95 2.0 / p99 3.0 / max 4.0 ms  (hub 0.25 cores)\n\
            \x20           waited for a free pool connection: p50 0.0 / p95 0.0 / p99 7.0 / max 9.0 ms\n\
            \x20 hub CPU 120.0 µs/reply over the run\n\
            \x20 failures by kind: {\"timeout\":1}\n\
            \x20   timeout: b17: no reply.done in time\n";
        assert_eq!(render(&r), expected);
    }

    #[test]
    fn peak_report_shows_both_tenants_per_phase_and_the_targets() {
        let pct = |p50: f64| json!({"p50": p50, "p95": p50 * 2.0, "p99": p50 * 3.0, "max": p50 * 4.0});
        let phase = |name: &str, cores: Value| {
            json!({"phase": name, "rate_per_s": 10.0, "secs": 3, "scheduled": 30, "ok": 28,
                "fallbacks": 2, "queued": 5, "queued_frames": 9, "timeouts": 0, "failures": {"total": 0},
                "ack_ms": pct(1.0), "first_delta_ms": pct(300.0), "latency_ms": pct(1600.0),
                "wait_for_connection_ms": null, "hub_cores_busy": cores, "timing": null})
        };
        let mut r = json!({
            "scenario": "burst", "tenant": "demo", "question": "Q", "pool_connections": 200, "connect_s": 0.1,
            "fallback_policy": "counted",
            "phases": [phase("baseline", json!(0.1))],
            "steady_tenant": {"tenant": "telco", "question": "S", "rate_per_s": 5.0, "pool_connections": 200,
                "ok": 15, "scheduled": 15, "fallbacks": 0, "timeouts": 0, "failures": {"total": 0},
                "phases": [phase("baseline", Value::Null)]},
            "targets": {
                "timeouts": {"value": 0, "target": 0, "met": true},
                "ack_p99_ms_worst_phase": {"value": 3.0, "target_below": 100.0, "met": true},
                "steady_first_delta_p95_ms": {"baseline": 600.0, "peak": 900.0, "peak_over_baseline": 1.5,
                    "target": "peak <= 1.2 × baseline + 20 ms", "met": false},
                "steady_done_p95_ms": {"baseline": 3200.0, "peak": null, "peak_over_baseline": null}},
            "failures": {"total": 0}, "cpu": {"hub_us_per_reply": 50.0},
        });
        r["phases"][0]["loadgen_cores_busy"] = json!(0.95);
        let text = render(&r);
        assert!(text.contains("(hub 0.1 cores)\n            load generator 0.95 cores busy: it may be what limits"));
        assert_eq!(text.matches("load generator").count(), 1, "{text}");
        assert!(
            text.starts_with(
                "burst: pool of 200 connections (connected in 0.1 s)\n  (a fallback reply, e.g. after the hub's \
                 longest queue wait, is counted, not a failure)\nbursting tenant demo (\"Q\"):\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("latency p50 1600.0 / p95 3200.0 / p99 4800.0 / max 6400.0 ms  (hub 0.1 cores)\n"),
            "{text}"
        );
        assert!(text.contains("fallbacks 2  queued 5 (9 queued frames)  timeouts 0\n"), "{text}");
        assert!(text.contains("            ack       p50 1.0 / p95 2.0 / p99 3.0 / max 4.0 ms\n"), "{text}");
        assert!(text.contains("            1st delta p50 300.0 /"), "{text}");
        assert!(
            text.contains("steady tenant telco (\"S\"), 5.0/s through every phase, pool of 200: ok 15/15 fallbacks 0")
        );
        // The steady tenant's phases have no CPU of their own.
        assert!(text.contains("max 6400.0 ms\n            fallbacks"), "{text}");
        assert!(text.contains("  timeouts 0 (target 0): met\n"), "{text}");
        assert!(text.contains("  ack p99, worst phase 3.0 ms (target < 100.0 ms): met\n"), "{text}");
        assert!(
            text.contains("baseline 600.0 ms, peak 900.0 ms (1.5×; target peak <= 1.2 × baseline + 20 ms): NOT MET"),
            "{text}"
        );
        assert!(text.contains("reply.done p95: baseline 3200.0 ms, peak null ms (null×)"), "{text}");
    }

    #[test]
    fn soak_report_shows_the_hub_before_and_after_the_load() {
        let sample = json!({"rss_kib": 7000, "tasks_alive": 12.0, "sessions_open": 0.0});
        let summary = json!({"start": 1, "end": 1, "max": 1});
        let r = json!({
            "scenario": "soak", "pool_connections": 200, "connect_s": 0.5, "phases": [], "cpu": {},
            "resources": {"interval_s": 3, "samples_taken": 6, "note": null,
                "nodes": [{"node": 1, "rss_kib": summary, "tasks_alive": summary, "sessions_open": summary,
                    "before": sample, "after_close": sample}]},
        });
        let text = render(&r);
        assert!(text.contains("  samples every 3 s (6 in all), start → end (max):\n"), "{text}");
        assert!(
            text.contains("      before the load's sockets: VmRSS KiB 7000, tasks alive 12.0, sessions open 0.0\n"),
            "{text}"
        );
        assert!(text.contains("      after they closed:         VmRSS KiB 7000"), "{text}");
        assert!(!text.contains("NOTE"), "{text}");
    }

    #[test]
    fn idle_report_shows_memory_per_socket() {
        let r = json!({
            "scenario": "idle", "sockets_requested": 500, "sockets_ready": 500, "connect_s": 0.3,
            "connects_per_s": 1666.67, "dropped_while_idle": 0, "failures": {"total": 0},
            "hub_rss_kib": {"before": 9000, "all_open": 19000, "after_close": 12000},
            "hub_kib_per_idle_socket": 20.0, "hub_open_fds": {"before": 20, "all_open": 520, "after_close": 20},
            "hub_us_per_connect": 150.0, "hub_cpu_ms_while_idle": 1, "hold_s": 3.0, "loadgen_rss_kib": 8000,
            "redis_rss_kib_all_open": null, "setup": {"target": "bare"},
        });
        let text = render(&r);
        assert!(text.starts_with("setup: fengda-bare (the ceiling"), "{text}");
        assert!(
            text.contains("idle: 500 of 500 sockets ready in 0.3 s (1666.67 /s), 0 dropped while idle\n"),
            "{text}"
        );
        assert!(text.contains("  hub KiB per idle socket: 20.0\n"), "{text}");
        assert!(!text.contains("redis-server"), "{text}");
    }

    #[test]
    fn storm_report_names_seeding_failures_and_child_logs() {
        let r = json!({
            "scenario": "storm", "seeded": 199, "reconnected": 199, "storm_s": 0.5, "reconnects_per_s": 398.0,
            "ready_ms": null, "events_replayed": 199, "events_lost": 0, "hub_us_per_reconnect": 300.0,
            "failures": {"total": 0},
            "seed_failures": {"total": 1, "by_kind": {"connect_failed": 1}, "samples": ["connect_failed: #7: refused"]},
            "child_logs": {"fengda": {"warn_lines": 2, "error_lines": 0, "log": "/tmp/fengda.log",
                "exited_early": null, "samples": ["2025 WARN slow"]}},
        });
        let text = render(&r);
        assert!(text.contains("storm: 199 customers seeded (1 failures), 199 reconnected at once in 0.5 s (398.0 /s)"));
        assert!(text.contains("  connect→ready    n/a\n"), "{text}");
        assert!(text.contains("  seeding failures by kind: {\"connect_failed\":1}\n    connect_failed: #7: refused\n"));
        assert!(
            text.ends_with("  fengda log: 2 WARN, 0 ERROR lines (/tmp/fengda.log)\n    2025 WARN slow\n"),
            "{text}"
        );
    }

    #[test]
    fn ratios_get_a_times_sign() {
        let text = render_ratios(&json!({"cpu_us_per_reply": 4.2, "bare": {"x": 1}}));
        assert_eq!(text, "hub ÷ bare (ceiling), same run:\n  bare: {\"x\":1}\n  cpu_us_per_reply: 4.2×\n");
    }
}
