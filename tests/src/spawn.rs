//! Starting a workspace binary or `redis-server` and learning what it
//! printed: one implementation for the cross-process tests and the load
//! generator (`fengda-load`), which differ only in where a child's log goes
//! ([`LogTo`]) and in how they report a failure (the tests panic on the
//! `anyhow` errors returned here, the load generator prints them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// How long a child may take to print its address (or redis-server its
/// "Ready" line) before starting it fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The most of a child's log kept in memory for [`ChildLog::text`].
pub const MAX_KEPT_LOG: usize = 1 << 20;

/// Warning and error lines kept as samples by [`ChildLog::samples`].
pub const MAX_SAMPLES: usize = 5;

/// Path of a workspace binary built next to the running executable: a test
/// (`target/<profile>/deps/<test>`) or a binary such as `fengda-load`
/// (`target/<profile>/fengda-load`); both look in `target/<profile>/`.
pub fn binary_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("the executable has a parent dir")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has a parent dir")?;
    }
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} not found; build it first with `cargo build --workspace --bins` \
         (for release runs: `cargo build --release -p fengda -p fengda-nlp -p fengda-load --bins`)",
        path.display()
    );
    Ok(path)
}

/// Where a child's log (a workspace binary's stderr, redis-server's stdout
/// and stderr) is copied, besides the first [`MAX_KEPT_LOG`] bytes kept in memory.
#[derive(Debug, Clone)]
pub enum LogTo {
    /// To our stderr, line by line (a test shows it when it fails).
    Stderr,
    /// To this file, created (or truncated) at start.
    File(PathBuf),
}

/// How a log line is counted in [`ChildLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Warn,
    Error,
}

/// A `tracing` fmt line's level: ` WARN ` and ` ERROR ` count.
pub fn tracing_level(line: &str) -> Option<Level> {
    if line.contains(" ERROR ") {
        Some(Level::Error)
    } else if line.contains(" WARN ") {
        Some(Level::Warn)
    } else {
        None
    }
}

/// A child's log as copied so far: its text (up to [`MAX_KEPT_LOG`]), its
/// warning and error lines counted, and the first few of them.
#[derive(Debug, Default)]
pub struct ChildLog {
    /// The file it is copied to, if any.
    pub path: Option<PathBuf>,
    kept: Mutex<String>,
    warn: AtomicU64,
    error: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl ChildLog {
    fn new(to: &LogTo) -> Arc<ChildLog> {
        let path = match to {
            LogTo::Stderr => None,
            LogTo::File(path) => Some(path.clone()),
        };
        Arc::new(ChildLog { path, ..ChildLog::default() })
    }

    /// The log so far (its first [`MAX_KEPT_LOG`] bytes).
    pub fn text(&self) -> String {
        self.kept.lock().unwrap().clone()
    }

    pub fn warn_lines(&self) -> u64 {
        self.warn.load(Ordering::Relaxed)
    }

    pub fn error_lines(&self) -> u64 {
        self.error.load(Ordering::Relaxed)
    }

    /// The first [`MAX_SAMPLES`] warning or error lines.
    pub fn samples(&self) -> Vec<String> {
        self.samples.lock().unwrap().clone()
    }

    fn record(&self, line: &str, level: Option<Level>) {
        if let Some(level) = level {
            let counter = match level {
                Level::Warn => &self.warn,
                Level::Error => &self.error,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut samples = self.samples.lock().unwrap();
            if samples.len() < MAX_SAMPLES {
                samples.push(line.to_owned());
            }
        }
        let mut kept = self.kept.lock().unwrap();
        if kept.len() + line.len() < MAX_KEPT_LOG {
            kept.push_str(line);
            kept.push('\n');
        }
    }
}

/// A line a [`copy_log`] caller waits for, and who to tell when it is seen.
struct ReadyLine {
    contains: &'static str,
    seen: oneshot::Sender<()>,
}

/// Copies `reader`'s lines into `log` (and to its file, opened for
/// appending, or our stderr) until the child closes it. With `ready`, tells
/// it when a line containing its text goes by; dropping it unsent (the
/// child exited first) is the "never ready" signal.
async fn copy_log<R>(
    reader: R,
    to: &LogTo,
    log: Arc<ChildLog>,
    classify: fn(&str) -> Option<Level>,
    mut ready: Option<ReadyLine>,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let mut file = match to {
        LogTo::Stderr => None,
        LogTo::File(path) => Some(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .with_context(|| format!("open {}", path.display()))?,
        ),
    };
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.record(&line, classify(&line));
            match file.as_mut() {
                Some(file) => {
                    let _ = file.write_all(line.as_bytes()).await;
                    let _ = file.write_all(b"\n").await;
                }
                None => eprintln!("{line}"),
            }
            if ready.as_ref().is_some_and(|ready| line.contains(ready.contains)) {
                let _ = ready.take().expect("checked").seen.send(());
            }
        }
        if let Some(file) = file.as_mut() {
            let _ = file.flush().await;
        }
    });
    Ok(())
}

/// Truncates a log file so that [`copy_log`]'s appends start it afresh.
fn start_log_file(to: &LogTo) -> anyhow::Result<()> {
    if let LogTo::File(path) = to {
        std::fs::write(path, "").with_context(|| format!("create {}", path.display()))?;
    }
    Ok(())
}

/// A workspace binary to start and wait for, with [`Launch::start`].
#[derive(Debug, Clone)]
pub struct Launch {
    /// The binary's name in the target dir (`fengda`, `fengda-nlp`, `fengda-bare`).
    pub program: String,
    pub args: Vec<String>,
    /// It prints a second line, `admin listening on http://ADDR` (the hub).
    pub admin: bool,
    /// A lower open-files limit (`RLIMIT_NOFILE`) for the child.
    pub nofile: Option<u64>,
    /// Its `RUST_LOG`; default the test's own, or `info`.
    pub log_filter: Option<String>,
    pub log_to: LogTo,
}

/// A started child that printed where it listens.
pub struct Started {
    pub child: Child,
    pub pid: u32,
    /// From its first stdout line, `listening on http://ADDR`.
    pub url: String,
    /// From its second, `admin listening on http://ADDR` (with [`Launch::admin`]).
    pub admin_url: Option<String>,
    /// Its stderr, copied as [`Launch::log_to`] says.
    pub log: Arc<ChildLog>,
}

impl Launch {
    pub fn new(program: &str, args: Vec<String>, log_to: LogTo) -> Launch {
        Launch { program: program.to_owned(), args, admin: false, nofile: None, log_filter: None, log_to }
    }

    /// Starts the binary, waits for its first stdout line `listening on
    /// http://ADDR` (and with [`Launch::admin`], the second), then keeps
    /// draining its stdout so it never blocks on a full pipe. The child is
    /// killed when [`Started::child`] is dropped.
    pub async fn start(&self) -> anyhow::Result<Started> {
        let program = &self.program;
        let mut command = Command::new(binary_path(program)?);
        if let Some(limit) = self.nofile {
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
            .args(&self.args)
            .env(
                "RUST_LOG",
                self.log_filter.clone().or(std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {program}"))?;
        let pid = child.id().context("child pid")?;
        let log = ChildLog::new(&self.log_to);
        start_log_file(&self.log_to)?;
        copy_log(child.stderr.take().context("stderr")?, &self.log_to, log.clone(), tracing_level, None).await?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut next_line = async |what: &str| -> anyhow::Result<String> {
            tokio::time::timeout(START_TIMEOUT, lines.next_line())
                .await
                .with_context(|| format!("{program} printed no {what} within {START_TIMEOUT:?}"))??
                .with_context(|| format!("{program} exited before printing its {what} ({})", self.log_hint()))
        };
        let line = next_line("address").await?;
        let Some(url) = line.strip_prefix("listening on ") else {
            bail!("{program}'s first line should be `listening on http://…`, got {line:?}");
        };
        let url = url.to_owned();
        let admin_url = match self.admin {
            false => None,
            true => {
                let line = next_line("admin address").await?;
                let Some(admin_url) = line.strip_prefix("admin listening on ") else {
                    bail!("{program}'s second line should be `admin listening on http://…`, got {line:?}");
                };
                Some(admin_url.to_owned())
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Started { child, pid, url, admin_url, log })
    }

    fn log_hint(&self) -> String {
        match &self.log_to {
            LogTo::Stderr => "its log is above".to_owned(),
            LogTo::File(path) => format!("see {}", path.display()),
        }
    }
}

/// redis-server prints its start-up banner at warning level (`#`) too, so
/// only lines that say WARNING count.
fn redis_level(line: &str) -> Option<Level> {
    line.contains(" # WARNING").then_some(Level::Warn)
}

/// Starts `redis-server` on `port` of 127.0.0.1 with its working files in
/// `dir` (append-only with `persistent`, else nothing on disk) and waits for
/// "Ready to accept connections". `Ok(None)`: it exited first (most likely
/// the port was taken meanwhile; the caller tries another).
pub(crate) async fn start_redis(
    port: u16,
    dir: &Path,
    persistent: bool,
    log_to: &LogTo,
    log: &Arc<ChildLog>,
) -> anyhow::Result<Option<Child>> {
    let mut command = Command::new("redis-server");
    command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]).arg("--dir").arg(dir);
    if persistent {
        command.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        command.args(["--appendonly", "no"]);
    }
    let mut child =
        match command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("redis-server not found on PATH: install it (Debian: `apt-get install -y redis-server`)")
            }
            Err(e) => return Err(e).context("spawn redis-server"),
        };
    let (seen, ready) = oneshot::channel();
    let ready_line = ReadyLine { contains: "Ready to accept connections", seen };
    copy_log(child.stdout.take().context("stdout")?, log_to, log.clone(), redis_level, Some(ready_line)).await?;
    // Anything on its stderr is an error (it logs to stdout).
    copy_log(child.stderr.take().context("stderr")?, log_to, log.clone(), |_| Some(Level::Error), None).await?;
    match tokio::time::timeout(START_TIMEOUT, ready).await {
        Ok(Ok(())) => Ok(Some(child)),
        Ok(Err(_)) => {
            let _ = child.kill().await;
            Ok(None)
        }
        Err(_) => bail!("redis-server on port {port} was not ready within {START_TIMEOUT:?}"),
    }
}

/// A redis-server log, started afresh: see [`ChildLog`].
pub(crate) fn redis_log(log_to: &LogTo) -> anyhow::Result<Arc<ChildLog>> {
    start_log_file(log_to)?;
    Ok(ChildLog::new(log_to))
}
