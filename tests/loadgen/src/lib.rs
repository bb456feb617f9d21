//! The logic of `fengda-load` that needs no socket, so that it has tests.
//!
//! The binary (`src/bin/fengda-load.rs`) starts the processes, opens the
//! sockets and runs the scenarios; what it decides and computes lives here:
//!
//! - [`schedule`]: open-loop schedules: phases of a constant question rate
//!   turned into send times, and how many connections a schedule needs.
//! - [`frames`]: the hub's frames as the load generator reads them, and
//!   [`frames::ReplyCheck`], the state machine that verifies one reply
//!   (ack, delta indexes, concatenated text, `queued`, fallback, timing).
//! - [`report`]: failure classification, latency histograms and their
//!   percentiles, per-run reply statistics, hub ÷ bare ratios, the peak's
//!   targets, the soak's resource series and their summaries.
//! - [`setup`]: what the processes are told and what bounds a reply: the
//!   bridge's pace and stream limit, hub flags, socket URLs (`timing=1`),
//!   reply timeouts, the open-files budget.
//! - [`prometheus`]: reading gauges from the hub's `/metrics` text (the
//!   soak samples live tasks and open sessions).
//! - [`procfs`]: CPU time, resident memory and open files of processes, from `/proc`.
//! - [`text`]: the human-readable report printed before the JSON line.
//!
//! `anyhow` is the error type throughout: a load generator reports, it does
//! not recover.

pub mod frames;
pub mod procfs;
pub mod prometheus;
pub mod report;
pub mod schedule;
pub mod setup;
pub mod text;
