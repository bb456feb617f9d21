//! A real `redis-server` per test, on an ephemeral port.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    /// Holds the append-only file when started with persistence.
    dir: PathBuf,
    persistent: bool,
}

impl RedisServer {
    /// Starts an in-memory Redis (nothing survives a restart).
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// Starts a Redis that writes every change to an append-only file, so a
    /// killed and restarted server comes back with its data.
    pub async fn start_persistent() -> RedisServer {
        Self::start_with(true).await
    }

    async fn start_with(persistent: bool) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("fengda-redis-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                child: None,
                port,
                url: format!("redis://127.0.0.1:{port}"),
                dir: dir.clone(),
                persistent,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("could not start redis-server on a free port after 5 tries");
    }

    /// Starts the server process on `self.port`; false if it exited (port taken).
    async fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir);
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let mut child =
            command.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true).spawn().expect(
                "redis-server not found: install it with `apt-get install -y redis-server` (tests/run.sh does)",
            );
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(crate::STEP_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await
        .expect("redis-server did not become ready in time");
        if !ready {
            return false;
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        true
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
            if self.spawn().await {
                return;
            }
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
