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
    /// SIGHUP reloads `[auth]` (keys and their settings) and `[tenants]` from the config file.
    Serve(Box<ServeArgs>),
    /// Check a config file, key files included, without starting anything; exits 0 when it is valid.
    CheckConfig {
        /// The TOML file `serve --config` would read.
        file: std::path::PathBuf,
    },
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
    let args = match Cli::parse().command {
        Command::Serve(args) => *args,
        Command::CheckConfig { file } => return check_config(&file),
    };
    let config = args.clone().into_config().context("invalid configuration")?;
    let app = App::build(config).await.context("cannot start the hub")?;
    tokio::spawn(reload_on_hangup(args, app.reloader()));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", app.local_addr())?;
    writeln!(stdout, "admin listening on http://{}", app.admin_addr())?;
    stdout.flush()?;
    drop(stdout);
    app.run(shutdown_signal()).await.context("hub failed")?;
    Ok(())
}

/// `fengda check-config FILE`: everything `serve` would refuse, without serving.
fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = fengda::Config::from_file(file)?;
    config.validate()?;
    fengda::auth::Auth::new(&config.auth)?;
    println!("{}: valid ({} auth keys)", file.display(), config.auth.keys.len());
    Ok(())
}

/// On each SIGHUP, reads the configuration again (file, then the same
/// flags) and swaps in its `[auth]` and `[tenants]`; a configuration with
/// any error is refused whole, logged, and the one in force stays.
async fn reload_on_hangup(args: ServeArgs, reloader: fengda::Reloader) {
    #[cfg(unix)]
    {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; the configuration will not be reloaded");
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the auth and tenant configuration");
            let reloaded = args
                .clone()
                .into_config()
                .map_err(anyhow::Error::from)
                .and_then(|config| reloader.reload(&config).map_err(anyhow::Error::from));
            match reloaded {
                Ok(()) => tracing::info!("configuration reloaded"),
                Err(error) => tracing::error!(
                    error = format!("{error:#}"),
                    "configuration NOT reloaded; the previous one stays in force"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (args, reloader);
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
