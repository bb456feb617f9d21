//! Open-loop schedules: phases of a constant question rate, turned into the
//! times at which questions are sent whatever the answers do (so slow
//! answers cannot slow the load down: no coordinated omission), and the
//! size of the connection pool such a schedule needs.

use std::time::Duration;

use anyhow::ensure;

/// Highest rate a phase may have: beyond it the test measures the load generator.
pub const MAX_RATE_PER_S: f64 = 20_000.0;

/// The smallest connection pool an open loop uses.
pub const MIN_POOL: usize = 200;

/// A stretch of time with one constant question rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub rate_per_s: f64,
    pub secs: u64,
}

impl Phase {
    pub fn new(name: &'static str, rate_per_s: f64, secs: u64) -> Phase {
        Phase { name, rate_per_s, secs }
    }

    /// Questions this phase sends: its rate × its seconds, rounded.
    pub fn count(&self) -> u64 {
        (self.rate_per_s * self.secs as f64).round() as u64
    }

    /// Time between two sends.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate_per_s)
    }
}

/// Rates must be positive and within what a loopback test can send.
pub fn validate(phases: &[Phase]) -> anyhow::Result<()> {
    ensure!(!phases.is_empty(), "a schedule needs at least one phase");
    for phase in phases {
        ensure!(phase.rate_per_s > 0.0, "phase {}: rates must be > 0", phase.name);
        ensure!(
            phase.rate_per_s <= MAX_RATE_PER_S,
            "phase {}: a rate above {MAX_RATE_PER_S}/s is not a loopback test",
            phase.name
        );
    }
    Ok(())
}

/// `burst`/`peak`: the baseline rate, then `factor` × baseline, then the baseline again.
pub fn burst(rate_per_s: f64, factor: f64, base_secs: u64, peak_secs: u64) -> Vec<Phase> {
    vec![
        Phase::new("baseline", rate_per_s, base_secs),
        Phase::new("peak", rate_per_s * factor, peak_secs),
        Phase::new("recovery", rate_per_s, base_secs),
    ]
}

/// The same phases (names and lengths) at one constant rate: the steady
/// tenant's schedule beside a burst, reported phase by phase like it.
pub fn constant_alongside(phases: &[Phase], rate_per_s: f64) -> Vec<Phase> {
    phases.iter().map(|p| Phase::new(p.name, rate_per_s, p.secs)).collect()
}

/// One scheduled question.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Send {
    /// Index of its phase.
    pub phase: usize,
    /// 1, 2, 3, … over the whole schedule.
    pub seq: u64,
    /// When to send it, from the start of the schedule.
    pub at: Duration,
}

/// Every send of the schedule in time order. Each phase starts where the
/// previous one's last interval ends, so phase boundaries fall at (close to)
/// the sum of the earlier phases' seconds.
pub fn sends(phases: &[Phase]) -> impl Iterator<Item = Send> + '_ {
    let mut next = Duration::ZERO;
    let mut seq = 0;
    phases
        .iter()
        .enumerate()
        .flat_map(move |(phase, p)| {
            let interval = p.interval();
            (0..p.count()).map(move |_| (phase, interval))
        })
        .map(move |(phase, interval)| {
            let at = next;
            next += interval;
            seq += 1;
            Send { phase, seq, at }
        })
}

/// Questions per phase.
pub fn counts(phases: &[Phase]) -> Vec<u64> {
    phases.iter().map(Phase::count).collect()
}

/// Connections an open loop needs so that a free one is there for each send:
/// the questions in flight at the highest rate when each takes `reply` (sent
/// at `peak_rate_per_s`, one second of sends plus twice the expected reply
/// time), at least [`MIN_POOL`].
pub fn pool_size(peak_rate_per_s: f64, reply: Duration) -> usize {
    let seconds = 1.0 + 2.0 * reply.as_secs_f64();
    ((peak_rate_per_s * seconds).ceil() as usize).max(MIN_POOL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_sends_rate_times_seconds() {
        assert_eq!(Phase::new("p", 40.0, 5).count(), 200);
        assert_eq!(Phase::new("p", 2.5, 3).count(), 8); // 7.5 rounds up
        assert_eq!(Phase::new("p", 600.0, 5).interval(), Duration::from_nanos(1_666_667));
    }

    #[test]
    fn burst_is_baseline_peak_recovery() {
        let phases = burst(20.0, 15.0, 5, 60);
        let names: Vec<_> = phases.iter().map(|p| p.name).collect();
        assert_eq!(names, ["baseline", "peak", "recovery"]);
        assert_eq!(counts(&phases), [100, 18_000, 100]);
        let steady = constant_alongside(&phases, 20.0);
        assert_eq!(counts(&steady), [100, 1_200, 100]);
        assert_eq!(steady.iter().map(|p| p.secs).collect::<Vec<_>>(), [5, 60, 5]);
    }

    #[test]
    fn sends_are_evenly_spaced_and_phases_follow_each_other() {
        let phases = [Phase::new("a", 10.0, 2), Phase::new("b", 100.0, 1)];
        let sends: Vec<Send> = sends(&phases).collect();
        assert_eq!(sends.len(), 120);
        assert_eq!(sends[0], Send { phase: 0, seq: 1, at: Duration::ZERO });
        assert_eq!(sends[1].at, Duration::from_millis(100));
        // The first send of phase b comes one interval of phase a after a's last.
        assert_eq!(sends[20].phase, 1);
        assert_eq!(sends[20].at, Duration::from_secs(2));
        assert_eq!(sends[21].at - sends[20].at, Duration::from_millis(10));
        assert_eq!(sends.last().unwrap().seq, 120);
        assert!(sends.windows(2).all(|w| w[0].at < w[1].at));
        assert!(sends.last().unwrap().at < Duration::from_secs(3));
    }

    #[test]
    fn a_phase_too_short_for_one_send_is_skipped() {
        let phases = [Phase::new("a", 2.0, 1), Phase::new("b", 0.1, 1), Phase::new("c", 4.0, 1)];
        assert_eq!(counts(&phases), [2, 0, 4]);
        let sends: Vec<Send> = sends(&phases).collect();
        assert_eq!(sends.iter().map(|s| s.phase).collect::<Vec<_>>(), [0, 0, 2, 2, 2, 2]);
        // Phase c starts where phase a's last interval ends.
        assert_eq!(sends[2].at, Duration::from_secs(1));
        assert_eq!(sends[5].seq, 6);
    }

    #[test]
    fn rates_are_checked() {
        assert!(validate(&[Phase::new("a", 10.0, 1)]).is_ok());
        assert!(validate(&[]).is_err());
        assert!(validate(&[Phase::new("a", 0.0, 1)]).is_err());
        assert!(validate(&[Phase::new("a", 30_000.0, 1)]).is_err());
    }

    #[test]
    fn the_pool_covers_the_replies_in_flight() {
        // Zero pace: one second of the rate, at least 200.
        assert_eq!(pool_size(40.0, Duration::ZERO), 200);
        assert_eq!(pool_size(600.0, Duration::ZERO), 600);
        // 1.75 s replies at 200/s: 350 in flight; one second plus twice that.
        assert_eq!(pool_size(200.0, Duration::from_millis(1750)), 900);
    }
}
