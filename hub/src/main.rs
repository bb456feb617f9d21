//! `fengda`: the hub's command line.

use std::io::{IsTerminal, Write};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fengda::App;
use fengda::config::ServeArgs;

/// mimalloc: the hub allocates and frees small buffers per frame on every
/// worker thread; glibc malloc showed up at ~12 % of the hub's profile, and
/// mimalloc runs a reply in ~20 % fewer instructions. Built without
/// transparent huge pages (`no_thp`): with them, an idle socket held ~2.5 KiB
/// more resident memory (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fengda", version, about = "Realtime hub for AI customer service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub node (prints `listening on http://ADDR`, then `admin listening on http://ADDR`, on stdout).
    Serve(ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let Command::Serve(args) = Cli::parse().command;
    let config = args.into_config().context("invalid configuration")?;
    let app = App::build(config).await.context("cannot start the hub")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", app.local_addr())?;
    writeln!(stdout, "admin listening on http://{}", app.admin_addr())?;
    stdout.flush()?;
    drop(stdout);
    app.run(shutdown_signal()).await.context("hub failed")?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
