//! What the processes under test cost, read from `/proc`: CPU time, resident
//! memory, open files, and CPU snapshots of the hub node(s), the bridge,
//! redis-server and the load generator itself, taken around a measured
//! window.
//!
//! CPU time is the sum over the process's threads of
//! `/proc/<pid>/task/<tid>/schedstat` (nanosecond clock; threads that exited
//! are not counted, which for the long-lived runtime threads of the hub and
//! the bridge does not matter), so that a bare server's few tens of
//! milliseconds are measured precisely; where schedstat is unavailable,
//! utime+stime from `/proc/<pid>/stat` (10 ms ticks).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::report::round2;

/// CPU time of a process in µs, or None if it is gone.
pub fn cpu_us(pid: u32) -> Option<u64> {
    schedstat_us(pid).or_else(|| stat_cpu_us(pid))
}

fn schedstat_us(pid: u32) -> Option<u64> {
    let mut ns = 0u64;
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(line) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        ns += line.split_whitespace().next()?.parse::<u64>().ok()?;
        threads += 1;
    }
    (threads > 0).then_some(ns / 1000)
}

/// utime+stime of a process, in µs (10 ms ticks).
fn stat_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    stat_ticks(&stat).map(|ticks| ticks * 1_000_000 / ticks_per_s)
}

/// utime+stime in clock ticks from the text of `/proc/<pid>/stat`.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: the
    // fields after the last `)` start with the state (field 3).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of the load generator itself, in µs.
pub fn self_cpu_us() -> u64 {
    // SAFETY: getrusage fills the struct we own.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }
}

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmRSS:`.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&status, field)
}

fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The processes whose CPU a run measures.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    /// One per hub node; empty when attached without `--hub-pid`.
    pub hubs: Vec<u32>,
    pub bridge: Option<u32>,
    pub redis: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    /// One per hub node.
    hubs: Vec<Option<u64>>,
    bridge: Option<u64>,
    redis: Option<u64>,
    loadgen: u64,
    pub at: Instant,
}

impl CpuSnapshot {
    pub fn take(watched: &Watched) -> CpuSnapshot {
        CpuSnapshot {
            hubs: watched.hubs.iter().map(|&pid| cpu_us(pid)).collect(),
            bridge: watched.bridge.and_then(cpu_us),
            redis: watched.redis.and_then(cpu_us),
            loadgen: self_cpu_us(),
            at: Instant::now(),
        }
    }

    /// CPU µs spent by each process between `self` and `later`, and the wall time.
    pub fn delta(&self, later: &CpuSnapshot) -> CpuDelta {
        let sub = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        let nodes: Vec<Option<u64>> = self.hubs.iter().zip(&later.hubs).map(|(&a, &b)| sub(a, b)).collect();
        let hub_us = if nodes.is_empty() { None } else { nodes.iter().copied().sum() };
        CpuDelta {
            hub_us,
            node_us: nodes,
            bridge_us: sub(self.bridge, later.bridge),
            redis_us: sub(self.redis, later.redis),
            loadgen_us: later.loadgen.saturating_sub(self.loadgen),
            wall: later.at - self.at,
        }
    }
}

/// CPU spent in a window.
#[derive(Debug)]
pub struct CpuDelta {
    /// Summed over all hub nodes; None if any is unknown.
    pub hub_us: Option<u64>,
    pub node_us: Vec<Option<u64>>,
    pub bridge_us: Option<u64>,
    pub redis_us: Option<u64>,
    pub loadgen_us: u64,
    pub wall: Duration,
}

impl CpuDelta {
    /// Cores a process kept busy on average over the window.
    pub fn cores(&self, us: Option<u64>) -> Option<f64> {
        us.map(|us| round2(us as f64 / 1e6 / self.wall.as_secs_f64()))
    }

    /// The `cpu` object of a report: totals, per reply and per token, per node.
    pub fn json(&self, replies: u64, tokens: u64) -> Value {
        let per = |us: Option<u64>, n: u64| us.filter(|_| n > 0).map(|us| round2(us as f64 / n as f64));
        let nodes: Vec<Value> = self
            .node_us
            .iter()
            .enumerate()
            .map(|(i, &us)| {
                json!({
                    "node": i + 1,
                    "cpu_ms": us.map(|us| us / 1000),
                    "cores_busy": self.cores(us),
                    // Per reply of the whole run (each node serves 1/N of the connections).
                    "us_per_reply_of_all": per(us, replies),
                })
            })
            .collect();
        json!({
            "window_s": round2(self.wall.as_secs_f64()),
            "hub_nodes": nodes,
            "redis_cpu_ms": self.redis_us.map(|us| us / 1000),
            "redis_us_per_reply": per(self.redis_us, replies),
            "redis_us_per_token": per(self.redis_us, tokens),
            "redis_cores_busy": self.cores(self.redis_us),
            "hub_cpu_ms": self.hub_us.map(|us| us / 1000),
            "hub_us_per_reply": per(self.hub_us, replies),
            "hub_us_per_token": per(self.hub_us, tokens),
            "hub_cores_busy": self.cores(self.hub_us),
            "bridge_cpu_ms": self.bridge_us.map(|us| us / 1000),
            "bridge_us_per_reply": per(self.bridge_us, replies),
            "bridge_us_per_token": per(self.bridge_us, tokens),
            "bridge_cores_busy": self.cores(self.bridge_us),
            "loadgen_us_per_reply": per(Some(self.loadgen_us), replies),
            "loadgen_cores_busy": self.cores(Some(self.loadgen_us)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_command_name_with_spaces() {
        let stat = "1234 (tokio (worker) 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100";
        assert_eq!(stat_ticks(stat), Some(300));
        assert_eq!(stat_ticks("1234 (short) S 1"), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let status = "Name:\tfengda\nVmPeak:\t  20000 kB\nVmRSS:\t    6376 kB\nThreads:\t3\n";
        assert_eq!(status_field_kib(status, "VmRSS:"), Some(6376));
        assert_eq!(status_field_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(open_fds(me).unwrap() > 0);
        assert!(cpu_us(me).is_some());
        assert_eq!(cpu_us(u32::MAX), None);
    }

    #[test]
    fn a_delta_sums_the_nodes_and_divides_per_reply() {
        let start = Instant::now();
        let before =
            CpuSnapshot { hubs: vec![Some(0), Some(1_000)], bridge: Some(0), redis: None, loadgen: 0, at: start };
        let after = CpuSnapshot {
            hubs: vec![Some(500_000), Some(1_001_000)],
            bridge: Some(250_000),
            redis: None,
            loadgen: 100_000,
            at: start + Duration::from_secs(1),
        };
        let delta = before.delta(&after);
        assert_eq!(delta.hub_us, Some(1_500_000));
        let json = delta.json(1000, 40_000);
        assert_eq!(json["hub_us_per_reply"], 1500.0);
        assert_eq!(json["hub_us_per_token"], 37.5);
        assert_eq!(json["hub_cores_busy"], 1.5);
        assert_eq!(json["bridge_us_per_reply"], 250.0);
        assert_eq!(json["redis_cpu_ms"], Value::Null);
        assert_eq!(json["hub_nodes"][1]["cpu_ms"], 1000);
        // A node that is gone makes the sum unknown.
        let gone = CpuSnapshot { hubs: vec![Some(1), None], ..after };
        assert_eq!(before.delta(&gone).hub_us, None);
    }
}
