//! The web demo in a real headless Chromium against real hubs.
//!
//! Each test runs a script of `tests/browser/` (playwright-core driving
//! Debian's `/usr/bin/chromium`) and checks that it passed:
//!
//! - `chat.test.mjs`: four questions in one conversation across three
//!   reconnects (mid-reply and between replies, away until the reply is
//!   stored and back at once), checked against the stored log: every durable
//!   event exactly once and in order, every reply shown once and whole; then
//!   a reload that redraws the transcript and resumes after it.
//! - `agent-client.test.mjs`: `client.js`'s agent API (and the customer's
//!   hand-over additions, resends after refusals, the 4430 backoff, a
//!   reloaded widget's resume) against a scripted socket in the page.
//! - `console.test.mjs`: a customer's widget and two agents' consoles in one
//!   browser, each on its own node (three nodes sharing a Redis on the redis
//!   backend), with a paced answerer: the agent sees the reply grow, takes
//!   over mid-reply, types and answers; the customer sees the agent join,
//!   type and answer.
//!
//! Screenshots (`chat.png`, `console.png`, `console-customer.png`) are saved
//! under `$CARGO_TARGET_DIR/artifacts/` (`target/artifacts/` by default).
//!
//! `tests/run.sh` installs Chromium and playwright-core; when they are
//! missing these tests fail with the command that fixes it, never skip.

use std::path::{Path, PathBuf};

use fengda_tests::{Hub, RedisServer, test_backend};

fn browser_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser` (tests/run.sh does)"
    );
    dir
}

/// `$CARGO_TARGET_DIR/artifacts`, or `target/artifacts` of the workspace.
fn artifact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
    target.join("artifacts")
}

/// Runs `node <script>` in tests/browser with `env`; fails unless it exits 0
/// and prints `<name>: 1 passed`. Returns its stdout.
async fn run_script(script: &str, name: &str, env: &[(&str, &str)]) -> String {
    let output = tokio::process::Command::new("node")
        .arg(script)
        .current_dir(browser_dir())
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains(&format!("{name}: 1 passed")), "unexpected {script} output:\n{stdout}\n{stderr}");
    stdout
}

#[tokio::test]
async fn the_chat_widget_streams_and_resumes_a_conversation_in_chromium() {
    let artifacts = artifact_dir();
    // Real pacing, so the typing effect has steps a person (and the test) can see, and an answer
    // (about 40 tokens, 2 s) is still streaming when a page that dropped its socket at the first
    // tokens is back.
    let hub = Hub::start(&["--answerer-first-token-delay-ms", "100", "--answerer-tokens-per-second", "20"]).await;
    let artifacts_env = artifacts.to_str().expect("a UTF-8 path");
    run_script("chat.test.mjs", "browser", &[("FENGDA_URL", &hub.url), ("ARTIFACT_DIR", artifacts_env)]).await;
    assert!(artifacts.join("chat.png").exists(), "screenshot artifact missing");
}

#[tokio::test]
async fn the_agent_api_of_client_js_keeps_lists_transcripts_and_the_outbox() {
    let hub = Hub::start(&[]).await;
    run_script("agent-client.test.mjs", "agent-client", &[("FENGDA_URL", &hub.url)]).await;
}

#[tokio::test]
async fn the_console_watches_a_reply_grow_takes_over_and_the_customer_sees_the_agent() {
    // Paced so that a reply (about 40 tokens) streams for 4 s: long enough to watch it grow and
    // take over in the middle.
    let pacing = ["--answerer-first-token-delay-ms", "200", "--answerer-tokens-per-second", "10"];
    let (_redis, hubs) = if test_backend() == "redis" {
        let redis = RedisServer::start().await;
        let mut hubs = Vec::new();
        for _ in 0..3 {
            hubs.push(Hub::start_node(&redis, &pacing).await);
        }
        (Some(redis), hubs)
    } else {
        (None, vec![Hub::start(&pacing).await])
    };
    // The customer, Anna and Bob each on their own node (all on the one hub on the memory backend).
    let node = |i: usize| hubs[i % hubs.len()].url.as_str();
    let artifacts = artifact_dir();
    let artifacts_env = artifacts.to_str().expect("a UTF-8 path");
    run_script(
        "console.test.mjs",
        "console",
        &[
            ("CUSTOMER_URL", node(0)),
            ("CONSOLE_URL", node(1)),
            ("SECOND_CONSOLE_URL", node(2)),
            ("ARTIFACT_DIR", artifacts_env),
        ],
    )
    .await;
    for shot in ["console.png", "console-customer.png"] {
        let path = artifacts.join(shot);
        assert!(path.exists(), "screenshot artifact {} missing", path.display());
        println!("screenshot: {}", path.display());
    }
}
