//! The web demo in a real headless Chromium against a real hub.
//!
//! Runs `tests/browser/chat.test.mjs` (playwright-core driving Debian's
//! `/usr/bin/chromium`): four questions in one conversation across three
//! reconnects (mid-reply and between replies, away until the reply is stored
//! and back at once), checked against the stored log: every durable event
//! exactly once and in order, every reply shown once and whole. `tests/run.sh` installs both; when they are missing
//! this test fails with the command that fixes it, never skips.

use std::path::Path;

use fengda_tests::Hub;

#[tokio::test]
async fn the_chat_widget_streams_and_resumes_a_conversation_in_chromium() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser` (tests/run.sh does)"
    );
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/artifacts");
    // Real pacing, so the typing effect has steps a person (and the test) can see, and an answer
    // (about 40 tokens, 2 s) is still streaming when a page that dropped its socket at the first
    // tokens is back.
    let hub = Hub::start(&["--answerer-first-token-delay-ms", "100", "--answerer-tokens-per-second", "20"]).await;
    let output = tokio::process::Command::new("node")
        .arg("chat.test.mjs")
        .current_dir(&browser_dir)
        .env("FENGDA_URL", &hub.url)
        .env("ARTIFACT_DIR", &artifacts)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser test failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("browser: 1 passed"), "unexpected browser test output:\n{stdout}\n{stderr}");
    assert!(artifacts.join("chat.png").exists(), "screenshot artifact missing");
}
