//! A real `redis-server` per test (or per load-generator run), on an ephemeral port.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use tokio::process::{Child, Command};

use crate::spawn::{self, ChildLog, LogTo};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    /// Its working directory (the append-only file when started with
    /// persistence), removed on drop.
    dir: PathBuf,
    persistent: bool,
    log_to: LogTo,
    log: Arc<ChildLog>,
}

impl RedisServer {
    /// Starts an in-memory Redis (nothing survives a restart), its log on our stderr.
    pub async fn start() -> RedisServer {
        Self::launch(false, LogTo::Stderr).await.expect("start redis-server")
    }

    /// Starts a Redis that writes every change to an append-only file, so a
    /// killed and restarted server comes back with its data.
    pub async fn start_persistent() -> RedisServer {
        Self::launch(true, LogTo::Stderr).await.expect("start redis-server")
    }

    /// Starts a Redis (append-only with `persistent`, else in memory only)
    /// on a free loopback port, its log copied as `log_to` says.
    pub async fn launch(persistent: bool, log_to: LogTo) -> anyhow::Result<RedisServer> {
        let dir = std::env::temp_dir().join(format!("fengda-redis-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir)?;
        let log = spawn::redis_log(&log_to)?;
        let mut server = RedisServer { child: None, port: 0, url: String::new(), dir, persistent, log_to, log };
        for _ in 0..5 {
            server.port = free_port()?;
            server.url = format!("redis://127.0.0.1:{}", server.port);
            if server.spawn().await? {
                return Ok(server);
            }
        }
        bail!("could not start redis-server on a free port after 5 tries")
    }

    /// Starts the server process on `self.port`; false if it exited (port taken).
    async fn spawn(&mut self) -> anyhow::Result<bool> {
        let child = spawn::start_redis(self.port, &self.dir, self.persistent, &self.log_to, &self.log).await?;
        let started = child.is_some();
        self.child = child;
        Ok(started)
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// How it exited, if it has (None while it runs, or after [`RedisServer::kill`]).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Its log so far.
    pub fn log(&self) -> &Arc<ChildLog> {
        &self.log
    }

    /// Kills the server (SIGKILL, no goodbye to clients).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        for _ in 0..50 {
            if self.spawn().await.expect("restart redis-server") {
                return;
            }
            // The port may linger for a moment after the kill: waiting is the point here.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("redis-server could not restart on port {}", self.port);
    }

    /// Runs a command with `redis-cli` and returns its output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli not found (package redis-tools, installed with redis-server)");
        assert!(output.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback TCP port (free when we looked; the caller retries if taken).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
