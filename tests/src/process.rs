//! Spawning the real binaries and learning their bound address.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary built next to the running test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("test exe lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {} not found; build it first with `cargo build --workspace --bins` (tests/run.sh does)",
        path.display()
    );
    path
}

/// What [`spawn_listening`] learned from a started process.
struct Listening {
    child: Child,
    /// From the first stdout line, `listening on http://ADDR`.
    url: String,
    /// From the second, `admin listening on http://ADDR` (the hub's).
    admin_url: Option<String>,
    /// Its stderr so far (also copied to ours), up to [`MAX_KEPT_LOG`].
    logs: Arc<Mutex<String>>,
}

/// The most of a process's log kept for [`Hub::logs`].
const MAX_KEPT_LOG: usize = 1 << 20;

/// Starts `program args…`, waits for its first stdout line
/// `listening on http://ADDR` (and with `admin`, the second,
/// `admin listening on http://ADDR`), optionally with a lower open-files
/// limit (`RLIMIT_NOFILE`).
async fn spawn_listening(
    program: &str,
    args: &[String],
    admin: bool,
    nofile: Option<u64>,
) -> anyhow::Result<Listening> {
    let mut command = Command::new(binary(program));
    if let Some(limit) = nofile {
        // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command
        .args(args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {program}"))?;
    let logs = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().context("stderr")?;
    let kept = logs.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            let mut kept = kept.lock().unwrap();
            if kept.len() + line.len() < MAX_KEPT_LOG {
                kept.push_str(&line);
                kept.push('\n');
            }
        }
    });
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = async |what: &str| -> anyhow::Result<String> {
        tokio::time::timeout(crate::STEP_TIMEOUT, lines.next_line())
            .await
            .with_context(|| format!("{program} printed no {what} within {:?}", crate::STEP_TIMEOUT))??
            .with_context(|| format!("{program} exited before printing its {what}"))
    };
    let line = next_line("address").await?;
    let Some(url) = line.strip_prefix("listening on ") else {
        bail!("{program}'s first line should be `listening on http://…`, got {line:?}");
    };
    let url = url.to_owned();
    let admin_url = match admin {
        false => None,
        true => {
            let line = next_line("admin address").await?;
            let Some(admin_url) = line.strip_prefix("admin listening on ") else {
                bail!("{program}'s second line should be `admin listening on http://…`, got {line:?}");
            };
            Some(admin_url.to_owned())
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Listening { child, url, admin_url, logs })
}

/// A running `fengda serve`.
pub struct Hub {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The admin listener (`/metrics`), `http://127.0.0.1:PORT`.
    pub admin_url: String,
    /// Its stderr so far.
    logs: Arc<Mutex<String>>,
    /// The hub's private Redis when the suite runs with `FENGDA_TEST_BACKEND=redis`.
    pub redis: Option<crate::RedisServer>,
}

/// The backend the suite runs against, `memory` or `redis`, from
/// `FENGDA_TEST_BACKEND`. Required: a suite meant for Redis must never pass
/// on the memory backend because the variable went missing.
pub fn test_backend() -> String {
    let backend = std::env::var("FENGDA_TEST_BACKEND").unwrap_or_default();
    assert!(
        matches!(backend.as_str(), "memory" | "redis"),
        "set FENGDA_TEST_BACKEND to memory or redis (tests/run.sh runs the suite once with each), not {backend:?}"
    );
    backend
}

impl Hub {
    /// Starts a hub with zero-delay built-in answerer pacing plus `extra`
    /// flags, on the suite's backend (a private Redis when it is `redis`),
    /// and checks from its metrics that it runs on that backend.
    pub async fn start(extra: &[&str]) -> Hub {
        let backend = test_backend();
        let hub = if backend == "redis" && !extra.contains(&"--backend") {
            let redis = crate::RedisServer::start().await;
            let mut args = vec!["--backend", "redis", "--redis-url", &redis.url];
            args.extend_from_slice(extra);
            let mut hub = Self::spawn(&args).await;
            hub.redis = Some(redis);
            hub
        } else {
            Self::spawn(extra).await
        };
        if !extra.contains(&"--backend") {
            hub.assert_backend(&backend).await;
        }
        hub
    }

    /// Fails unless the hub says (`fengda_hub_info{backend}`) it runs on `backend`.
    pub async fn assert_backend(&self, backend: &str) {
        let metrics = self.metrics().await;
        let info = metrics.lines().find(|line| line.starts_with("fengda_hub_info{"));
        let info = info.unwrap_or_else(|| panic!("no fengda_hub_info in the hub's metrics:\n{metrics}"));
        assert!(info.contains(&format!("backend=\"{backend}\"")), "expected the {backend} backend: {info}");
    }

    /// Starts a cluster node on a shared Redis.
    pub async fn start_node(redis: &crate::RedisServer, extra: &[&str]) -> Hub {
        let mut args = vec!["--backend", "redis", "--redis-url", &redis.url];
        args.extend_from_slice(extra);
        let hub = Self::spawn(&args).await;
        hub.assert_backend("redis").await;
        hub
    }

    /// Starts a hub (on the suite's backend) whose open-files limit is `nofile`.
    pub async fn start_with_open_files(nofile: u64, extra: &[&str]) -> Hub {
        let redis = match test_backend().as_str() {
            "redis" => Some(crate::RedisServer::start().await),
            _ => None,
        };
        let mut args: Vec<&str> = Vec::new();
        if let Some(redis) = &redis {
            args.extend(["--backend", "redis", "--redis-url", &redis.url]);
        }
        args.extend_from_slice(extra);
        let mut hub = Self::spawn_with(&args, Some(nofile)).await;
        hub.redis = redis;
        hub
    }

    async fn spawn(extra: &[&str]) -> Hub {
        Self::spawn_with(extra, None).await
    }

    async fn spawn_with(extra: &[&str], nofile: Option<u64>) -> Hub {
        let mut args: Vec<String> = ["serve", "--listen", "127.0.0.1:0"].map(String::from).to_vec();
        if !extra.iter().any(|a| a.starts_with("--admin-listen")) {
            args.extend(["--admin-listen", "127.0.0.1:0"].map(String::from));
        }
        if !extra.iter().any(|a| a.starts_with("--answerer-")) {
            args.extend(
                ["--answerer-first-token-delay-ms", "0", "--answerer-tokens-per-second", "0"].map(String::from),
            );
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let started = spawn_listening("fengda", &args, true, nofile).await.expect("start fengda");
        let admin_url = started.admin_url.expect("the hub prints its admin address");
        Hub { child: started.child, url: started.url, admin_url, logs: started.logs, redis: None }
    }

    /// What the hub has logged so far (stderr).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// `ws://127.0.0.1:PORT/ws?<query>`
    pub fn ws_url(&self, query: &str) -> String {
        format!("{}/ws?{query}", self.url.replacen("http://", "ws://", 1))
    }

    /// GET /readyz status code.
    pub async fn readyz(&self) -> u16 {
        reqwest::get(format!("{}/readyz", self.url)).await.map(|r| r.status().as_u16()).unwrap_or(0)
    }

    /// GET /metrics on the admin listener (Prometheus text).
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url)).await.unwrap().text().await.unwrap()
    }

    /// One unlabelled value from GET /metrics (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics().await, name)
    }

    /// Waits until /readyz answers 200 (e.g. after Redis came back).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + crate::STEP_TIMEOUT;
        while self.readyz().await != 200 {
            assert!(tokio::time::Instant::now() < deadline, "hub {} did not become ready", self.url);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("hub still running") as i32;
        let _redis = self.redis.take();
        // SAFETY: plain kill(2) on a child we started and still own.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(std::time::Duration::from_secs(20), self.child.wait())
            .await
            .expect("hub did not exit within 20 s of SIGTERM")
            .expect("wait hub")
    }
}

/// A running `fengda-nlp`.
pub struct NlpProcess {
    pub child: Child,
    pub url: String,
    /// Its config file, removed on drop.
    config: Option<PathBuf>,
}

impl NlpProcess {
    pub async fn start(extra: &[&str]) -> NlpProcess {
        Self::start_on("127.0.0.1:0", None, extra).await
    }

    /// Starts one that takes at most `streams` answers at once (its
    /// `limits.max_concurrent_streams`, set in a config file).
    pub async fn start_with_max_streams(streams: usize, extra: &[&str]) -> NlpProcess {
        Self::start_on("127.0.0.1:0", Some(streams), extra).await
    }

    /// Starts one on `listen` (e.g. the address of one that just stopped).
    pub async fn start_on(listen: &str, max_streams: Option<usize>, extra: &[&str]) -> NlpProcess {
        let mut args: Vec<String> = ["--listen", listen].map(String::from).to_vec();
        let config = max_streams.map(|streams| {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("fengda-nlp-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, format!("[limits]\nmax_concurrent_streams = {streams}\n")).expect("write config");
            args.extend(["--config".to_owned(), path.display().to_string()]);
            path
        });
        args.extend(extra.iter().map(|a| a.to_string()));
        let started = spawn_listening("fengda-nlp", &args, false, None).await.expect("start fengda-nlp");
        NlpProcess { child: started.child, url: started.url, config }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Sends SIGTERM (a graceful drain) and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("fengda-nlp still running") as i32;
        // SAFETY: plain kill(2) on a child we started and still own.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(std::time::Duration::from_secs(20), self.child.wait())
            .await
            .expect("fengda-nlp did not exit within 20 s of SIGTERM")
            .expect("wait fengda-nlp")
    }
}

impl Drop for NlpProcess {
    fn drop(&mut self) {
        if let Some(config) = &self.config {
            let _ = std::fs::remove_file(config);
        }
    }
}

/// The value of the first sample of `name` in Prometheus text (0 when absent).
/// `name` is a whole metric name (`…_count` does not match `…_count_extra`),
/// optionally with its labels (`name{label="v"}`); without labels, the first
/// labelled sample of that name counts too.
pub fn metric_value(metrics: &str, name: &str) -> f64 {
    let labelled = name.contains('{');
    metrics
        .lines()
        .find(|line| {
            line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || (!labelled && rest.starts_with('{')))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
