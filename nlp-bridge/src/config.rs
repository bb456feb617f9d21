//! Typed configuration for the bridge: [`BridgeConfig`] for the `fengda-nlp`
//! binary and its [`AnswererConfig`] section, which the hub also builds in
//! code when it embeds the bridge in-process.
//!
//! Both deny unknown keys so that a typo in a TOML file fails at startup
//! instead of silently falling back to a default. Every default is documented
//! at its field. Precedence (CLI/env > file > defaults) is applied by the
//! binary; this module only parses and validates.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::BridgeError;

/// The whole `fengda-nlp` configuration file.
///
/// ```toml
/// listen = "127.0.0.1:50051"
///
/// [answerer]
/// first_token_delay_ms = 150
/// tokens_per_second = 25.0
/// # knowledge_base = "nlp-bridge/data/faq.json"
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Address the gRPC server binds. Default `127.0.0.1:50051`; port 0 picks
    /// a free port (the bound address is printed on stdout).
    pub listen: SocketAddr,
    /// The built-in answerer. Default: see [`AnswererConfig`].
    pub answerer: AnswererConfig,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50051)),
            answerer: AnswererConfig::default(),
        }
    }
}

impl BridgeConfig {
    /// Reads and parses a TOML configuration file. Missing keys keep their
    /// defaults; unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, BridgeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| BridgeError::ReadConfig { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|source| BridgeError::ParseConfig { path: path.to_owned(), source })
    }

    /// Parses TOML text (no validation beyond the schema).
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the invariants serde cannot express.
    pub fn validate(&self) -> Result<(), BridgeError> {
        self.answerer.validate()
    }
}

/// Settings of the built-in, deterministic FAQ answerer.
///
/// Pacing imitates an LLM: `first_token_delay_ms` before the first token, then
/// one token every `1 / tokens_per_second` seconds. `tokens_per_second = 0`
/// disables the per-token pace, `first_token_delay_ms = 0` disables the first
/// delay; with both at 0 the answerer never sleeps and creates no timers (the
/// zero-delay pace used by benchmarks and tests).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnswererConfig {
    /// Path of a knowledge-base JSON file (same schema as
    /// `nlp-bridge/data/faq.json`), relative to the working directory.
    /// Default `None`: the file shipped in the repository, embedded in the
    /// binary at compile time.
    pub knowledge_base: Option<PathBuf>,
    /// Delay before the first token, in milliseconds ("time to first token").
    /// Default 150; 0 disables it.
    pub first_token_delay_ms: u64,
    /// Pace of the following tokens. Default 25.0; 0 disables the per-token
    /// pace. Must be finite and not negative.
    pub tokens_per_second: f64,
}

impl Default for AnswererConfig {
    fn default() -> Self {
        Self { knowledge_base: None, first_token_delay_ms: 150, tokens_per_second: 25.0 }
    }
}

impl AnswererConfig {
    /// A configuration that never sleeps: both delays at 0, embedded knowledge base.
    pub fn unpaced() -> Self {
        Self { knowledge_base: None, first_token_delay_ms: 0, tokens_per_second: 0.0 }
    }

    /// Checks that `tokens_per_second` is a usable number.
    pub fn validate(&self) -> Result<(), BridgeError> {
        let tps = self.tokens_per_second;
        if !tps.is_finite() || tps < 0.0 {
            return Err(BridgeError::InvalidConfig(format!(
                "answerer.tokens_per_second must be a finite number >= 0, got {tps}"
            )));
        }
        Ok(())
    }

    /// The delay before the first token, or `None` when disabled.
    pub fn first_token_delay(&self) -> Option<Duration> {
        (self.first_token_delay_ms > 0).then(|| Duration::from_millis(self.first_token_delay_ms))
    }

    /// The delay between two tokens, or `None` when disabled (0 or invalid).
    pub fn token_interval(&self) -> Option<Duration> {
        let tps = self.tokens_per_second;
        (tps.is_finite() && tps > 0.0).then(|| Duration::try_from_secs_f64(1.0 / tps).ok()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_file_overrides() {
        let config = BridgeConfig::from_toml("[answerer]\ntokens_per_second = 0\n").unwrap();
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(config.answerer.first_token_delay_ms, 150);
        assert_eq!(config.answerer.token_interval(), None);
        assert_eq!(AnswererConfig::default().token_interval(), Some(Duration::from_millis(40)));
        assert_eq!(AnswererConfig::unpaced().first_token_delay(), None);
    }

    #[test]
    fn unknown_keys_and_bad_pace_are_rejected() {
        assert!(BridgeConfig::from_toml("lisen = \"127.0.0.1:1\"").is_err());
        assert!(BridgeConfig::from_toml("[answerer]\nspeed = 1").is_err());
        let bad = AnswererConfig { tokens_per_second: -1.0, ..AnswererConfig::default() };
        assert!(bad.validate().is_err());
    }
}
