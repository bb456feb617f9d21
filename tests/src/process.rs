//! Spawning the real binaries and learning their bound address.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::process::Child;

use crate::spawn::{ChildLog, Launch, LogTo, Started};

/// Path of a workspace binary built next to the running test.
pub fn binary(name: &str) -> PathBuf {
    crate::spawn::binary_path(name).unwrap_or_else(|error| panic!("{error:#}"))
}

/// Starts a workspace binary with its log on our stderr (and kept for [`Hub::logs`]).
async fn start(
    program: &str,
    args: Vec<String>,
    admin: bool,
    nofile: Option<u64>,
    log_filter: Option<&str>,
) -> Started {
    let log_filter = log_filter.map(str::to_owned);
    let launch = Launch { admin, nofile, log_filter, ..Launch::new(program, args, LogTo::Stderr) };
    launch.start().await.unwrap_or_else(|error| panic!("start {program}: {error:#}"))
}

/// A running `fengda serve`.
pub struct Hub {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The admin listener (`/metrics`), `http://127.0.0.1:PORT`.
    pub admin_url: String,
    /// Its stderr so far.
    log: Arc<ChildLog>,
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
        Self::start_with_log(extra, None).await
    }

    /// [`Hub::start`], logging with `RUST_LOG=log_filter` (for tests that
    /// read what it logs at debug level).
    pub async fn start_logging(log_filter: &str, extra: &[&str]) -> Hub {
        Self::start_with_log(extra, Some(log_filter)).await
    }

    async fn start_with_log(extra: &[&str], log_filter: Option<&str>) -> Hub {
        let backend = test_backend();
        let hub = if backend == "redis" && !extra.contains(&"--backend") {
            let redis = crate::RedisServer::start().await;
            let mut args = vec!["--backend", "redis", "--redis-url", &redis.url];
            args.extend_from_slice(extra);
            let mut hub = Self::spawn_logging(&args, None, log_filter).await;
            hub.redis = Some(redis);
            hub
        } else {
            Self::spawn_logging(extra, None, log_filter).await
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
        Self::spawn_logging(extra, nofile, None).await
    }

    async fn spawn_logging(extra: &[&str], nofile: Option<u64>, log_filter: Option<&str>) -> Hub {
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
        let started = start("fengda", args, true, nofile, log_filter).await;
        let admin_url = started.admin_url.expect("the hub prints its admin address");
        Hub { child: started.child, url: started.url, admin_url, log: started.log, redis: None }
    }

    /// What the hub has logged so far (stderr).
    pub fn logs(&self) -> String {
        self.log.text()
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
        self.sigterm();
        let _redis = self.redis.take();
        self.wait_exit().await
    }

    /// Sends SIGTERM (the hub starts its drain) without waiting.
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("hub still running") as i32;
        // SAFETY: plain kill(2) on a child we started and still own.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }

    /// Waits for the exit status (after [`Hub::sigterm`]).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(std::time::Duration::from_secs(20), self.child.wait())
            .await
            .expect("hub did not exit within 20 s of SIGTERM")
            .expect("wait hub")
    }

    /// GET `path` on the admin listener: status code and body (None if it does not answer).
    pub async fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("{}{path}", self.admin_url)).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }
}

/// A running `fengda-nlp`.
pub struct NlpProcess {
    pub child: Child,
    pub url: String,
    /// Its config file, removed on drop.
    config: Option<PathBuf>,
    log: Arc<ChildLog>,
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
        let toml = max_streams.map(|streams| format!("[limits]\nmax_concurrent_streams = {streams}\n"));
        Self::start_configured(listen, toml.as_deref(), extra).await
    }

    /// Starts one with `toml` as its config file (backends, tenants, limits).
    pub async fn start_with_config(toml: &str) -> NlpProcess {
        Self::start_configured("127.0.0.1:0", Some(toml), &[]).await
    }

    /// Waits until its log has `count` lines containing `needle`.
    pub async fn wait_log_lines(&self, needle: &str, count: usize) {
        let deadline = tokio::time::Instant::now() + crate::STEP_TIMEOUT;
        while self.logs().lines().filter(|line| line.contains(needle)).count() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fengda-nlp did not log {count} lines with {needle:?} within {:?}:\n{}",
                crate::STEP_TIMEOUT,
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn start_configured(listen: &str, toml: Option<&str>, extra: &[&str]) -> NlpProcess {
        let mut args: Vec<String> = ["--listen", listen].map(String::from).to_vec();
        let config = toml.map(|toml| {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("fengda-nlp-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, toml).expect("write config");
            args.extend(["--config".to_owned(), path.display().to_string()]);
            path
        });
        args.extend(extra.iter().map(|a| a.to_string()));
        let started = start("fengda-nlp", args, false, None, None).await;
        NlpProcess { child: started.child, url: started.url, config, log: started.log }
    }

    /// What it has logged so far (stderr).
    pub fn logs(&self) -> String {
        self.log.text()
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
