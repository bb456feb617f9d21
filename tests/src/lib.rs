//! Test support: start the real binaries, speak the real protocols.
//!
//! - [`Hub`]: a `fengda serve` process on an ephemeral port, killed on drop.
//! - [`NlpProcess`]: a `fengda-nlp` process, likewise.
//! - [`Client`]: a WebSocket client with JSON helpers that fail loudly on timeout.
//! - [`InProcessHub`]: a hub in the test's own runtime, for tests of
//!   durations under paused time.
//! - [`RecordingAnswerer`]: an in-test gRPC answerer that records every request.
//! - [`RedisServer`]: a real `redis-server` on an ephemeral port.
//! - [`LlamaServer`]: a real OpenAI-compatible model server (llama.cpp via
//!   llama-cpp-python, SmolLM2-135M), for the LLM tests.
//! - [`spawn`]: how those processes are started and their logs kept, shared
//!   with the load generator (`fengda-load` depends on this library).
//! - [`resume`]: the lost-reply scenario (drop the only socket mid-reply, come back).
//! - [`tokens`]: real keys (openssl), signed and forged tokens, for the identity tests.
//! - [`isolation`]: the colliding-ids attack (tenant `x` naming `y:<id>` of tenant `x:y`).
//!
//! `FENGDA_TEST_BACKEND` (`memory` or `redis`, required) is the backend of
//! every [`Hub::start`]: with `redis` each hub runs against its own fresh
//! Redis. tests/run.sh runs the suite once per backend, and every hub's
//! `fengda_hub_info` metric is checked to name the backend asked for.
//!
//! Binaries are taken from the cargo target dir next to the test executable
//! (`cargo build --workspace --bins` or `cargo nextest run --workspace`
//! builds them); a missing binary fails the test with instructions.

mod answerer;
mod client;
mod in_process;
pub mod isolation;
mod llama;
mod process;
mod redis;
pub mod resume;
pub mod spawn;
pub mod tokens;

pub use answerer::{RecordingAnswerer, Script};
pub use client::{Client, Reply};
pub use in_process::InProcessHub;
pub use llama::LlamaServer;
pub use process::{Hub, NlpProcess, binary, metric_value, test_backend};
pub use redis::RedisServer;

/// How long any single expected event may take before the test fails.
pub const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
