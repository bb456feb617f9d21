//! `fengda-nlp`: runs the NLP bridge as a standalone gRPC server.
//!
//! Configuration precedence: command line / `FENGDA_NLP_*` environment >
//! TOML file (`--config`) > built-in defaults. Backends (the built-in FAQ
//! answerer, OpenAI-compatible LLM servers), per-tenant routing and limits
//! are configured in the file only; see `nlp-bridge/fengda-nlp.example.toml`.
//! API keys are never in the file: a backend's `api_key_env` names the
//! environment variable holding its key. Once bound, the first line on
//! stdout is `listening on http://IP:PORT` (the real address, so port 0 works
//! for tests); logs go to stderr (`RUST_LOG`, default `info`). Ctrl-C or
//! SIGTERM shut down gracefully.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fengda_nlp::NlpService;
use fengda_nlp::config::BridgeConfig;

/// mimalloc, as in the hub: every token of every stream allocates (the
/// chunk, its frame), and glibc malloc was a fifth of the bridge's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Fengda NLP bridge: streams answers token by token over gRPC, from the
/// built-in FAQ answerer or an OpenAI-compatible LLM server (vLLM, Ollama,
/// llama.cpp, hosted APIs), chosen per tenant in the config file.
#[derive(Debug, Parser)]
#[command(name = "fengda-nlp", version)]
struct Cli {
    /// Address to listen on [default: 127.0.0.1:50051; port 0 picks a free port].
    #[arg(long, env = "FENGDA_NLP_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TOML config file: listen, default_backend, [answerer], [limits], [backends.NAME] (kind = "builtin" |
    /// "openai"), [tenants] (see nlp-bridge/fengda-nlp.example.toml).
    #[arg(long, env = "FENGDA_NLP_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Built-in answerer: delay before the first token, in ms; 0 disables it [default: 150].
    #[arg(long, env = "FENGDA_NLP_FIRST_TOKEN_DELAY_MS", value_name = "MS")]
    first_token_delay_ms: Option<u64>,
    /// Built-in answerer: token pace; 0 disables pacing [default: 25].
    #[arg(long, env = "FENGDA_NLP_TOKENS_PER_SECOND", value_name = "N")]
    tokens_per_second: Option<f64>,
    /// Built-in answerer: knowledge-base JSON file [default: the embedded nlp-bridge/data/faq.json].
    #[arg(long, env = "FENGDA_NLP_KNOWLEDGE_BASE", value_name = "FILE")]
    knowledge_base: Option<PathBuf>,
}

impl Cli {
    /// Loads the file (or defaults) and lays the command line on top.
    fn into_config(self) -> anyhow::Result<BridgeConfig> {
        let mut config = match &self.config {
            Some(path) => BridgeConfig::from_file(path)?,
            None => BridgeConfig::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        let answerer = &mut config.answerer;
        if let Some(ms) = self.first_token_delay_ms {
            answerer.first_token_delay_ms = ms;
        }
        if let Some(tps) = self.tokens_per_second {
            answerer.tokens_per_second = tps;
        }
        if let Some(path) = self.knowledge_base {
            answerer.knowledge_base = Some(path);
        }
        config.validate()?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();

    let config = cli.into_config()?;
    let service = NlpService::from_config(&config).context("building the answer backends")?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;

    // Install signal handlers before announcing readiness, so a SIGTERM sent
    // right after the ready line is a graceful shutdown, not a kill.
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;

    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on http://{addr}")?;
        stdout.flush()?;
    }
    tracing::info!(
        %addr,
        default_backend = %config.default_backend,
        backends = ?config.backends.keys().collect::<Vec<_>>(),
        tenants = config.tenants.len(),
        max_concurrent_streams = config.limits.max_concurrent_streams,
        "fengda-nlp started"
    );

    fengda_nlp::serve(listener, service, shutdown).await.context("gRPC server failed")?;
    tracing::info!("fengda-nlp stopped");
    Ok(())
}

/// Cancels `shutdown` on Ctrl-C or (on Unix) SIGTERM.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        #[cfg(unix)]
        let terminated = terminate.recv();
        #[cfg(not(unix))]
        let terminated = std::future::pending::<Option<()>>();
        tokio::select! {
            result = tokio::signal::ctrl_c() => {
                if let Err(error) = result {
                    tracing::error!(%error, "cannot listen for Ctrl-C");
                    // Keep serving; SIGTERM still works.
                    std::future::pending::<()>().await;
                }
                tracing::info!("Ctrl-C received");
            }
            _ = terminated => tracing::info!("SIGTERM received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_overrides_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("fengda-nlp-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nlp.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7000\"\n[answerer]\nfirst_token_delay_ms = 5\ntokens_per_second = 9\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from(["fengda-nlp", "--config", file.to_str().unwrap(), "--tokens-per-second", "0"])
            .unwrap();
        let config = cli.into_config().unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.answerer.first_token_delay_ms, 5);
        assert_eq!(config.answerer.tokens_per_second, 0.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
