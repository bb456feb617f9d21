//! `[auth]`: who may open a socket, and with which keys (`[[auth.keys]]`).
//!
//! Kept apart from the rest of the config because it is the part a running
//! hub reloads (SIGHUP): [`AuthConfig::check`] says everything wrong with it
//! before any key file is read, and the keyring ([`super::keyring`]) refuses
//! the files themselves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How `/ws` learns who is connecting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `tenant`/`user` query parameters are believed, and `/demo/token`
    /// mints tokens: for the demo page and development on loopback only.
    #[default]
    Demo,
    /// Every upgrade needs a token signed by one of `auth.keys`.
    Jwt,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `demo` (default) or `jwt`.
    pub mode: AuthMode,
    /// Let demo mode listen on a non-loopback address (logged loudly). Default false.
    pub insecure_demo: bool,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds. Default 30.
    pub leeway_secs: u64,
    /// `token.expiring` goes out this long before a socket's token expires, in seconds. Default 60.
    pub expiring_notice_secs: u64,
    /// A socket whose token expired without a refresh closes (4001) this long after `exp`, in seconds. Default 30.
    pub expiry_grace_secs: u64,
    /// Lifetime of tokens minted by `GET /demo/token`, in seconds. Default 900.
    pub demo_token_ttl_secs: u64,
    /// A JWKS is fetched again for an unknown `kid` at most this often, in seconds. Default 60.
    pub jwks_min_refresh_secs: u64,
    /// Deadline of one JWKS fetch, in milliseconds. Default 2000.
    pub jwks_timeout_ms: u64,
    /// A fetched JWKS is trusted this long; the first token of its tenant
    /// after that fetches it again (keys the provider withdrew stop
    /// verifying), keeping the old keys if the fetch fails. In seconds. Default 300.
    pub jwks_max_age_secs: u64,
    /// The keys that sign tokens, per tenant. Default none.
    pub keys: Vec<KeyConfig>,
    /// Where relative key file paths start: the config file's directory
    /// (the working directory without a file). Not a key.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Demo,
            insecure_demo: false,
            leeway_secs: 30,
            expiring_notice_secs: 60,
            expiry_grace_secs: 30,
            demo_token_ttl_secs: 900,
            jwks_min_refresh_secs: 60,
            jwks_timeout_ms: 2000,
            jwks_max_age_secs: 300,
            keys: Vec::new(),
            base_dir: None,
        }
    }
}

/// One `[[auth.keys]]` entry: a key (or a JWKS) trusted for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub tenant: String,
    /// Selects this key when a token's header names it; required when the
    /// tenant has several keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The one algorithm this key verifies: `HS256`, `HS384`, `HS512`,
    /// `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `ES256`,
    /// `ES384`, `EdDSA`. Required for files; for a JWKS, pins every key of
    /// it (otherwise each JWK's own `alg` is used, and a JWK without one is skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// HMAC secret (the file's bytes, one trailing newline dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// PEM public key (RSA, EC or Ed25519).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// A JWKS document of the tenant's identity provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Tokens must carry this `aud`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Tokens must carry this `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// What is wrong with `[auth]`.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "auth.mode = \"demo\" believes any tenant and user a client names; it may only listen on loopback \
         (listen = {0}). Use auth.mode = \"jwt\", or set auth.insecure_demo (--insecure-demo) to run the demo anyway"
    )]
    DemoNotLoopback(SocketAddr),
    #[error("auth.mode = \"jwt\" needs at least one [[auth.keys]] entry")]
    NoKeys,
    #[error("[[auth.keys]] entry {index} (tenant {tenant:?}): {reason}")]
    Key { index: usize, tenant: String, reason: String },
    #[error("auth.{0} must be non-zero")]
    Zero(&'static str),
}

impl AuthConfig {
    /// Everything wrong with the section that can be seen without reading a key file.
    pub fn check(&self, listen: SocketAddr) -> Result<(), AuthConfigError> {
        if self.mode == AuthMode::Demo && !listen.ip().is_loopback() && !self.insecure_demo {
            return Err(AuthConfigError::DemoNotLoopback(listen));
        }
        if self.mode == AuthMode::Jwt && self.keys.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        if self.demo_token_ttl_secs == 0 {
            return Err(AuthConfigError::Zero("demo_token_ttl_secs"));
        }
        if self.jwks_timeout_ms == 0 {
            return Err(AuthConfigError::Zero("jwks_timeout_ms"));
        }
        let mut kids = std::collections::HashSet::new();
        for (index, key) in self.keys.iter().enumerate() {
            let bad = |reason: &str| AuthConfigError::Key { index, tenant: key.tenant.clone(), reason: reason.into() };
            crate::ids::TenantId::parse(&key.tenant).map_err(|e| bad(&format!("`tenant` {e}")))?;
            let sources = [key.secret_file.is_some(), key.public_key_file.is_some(), key.jwks_url.is_some()]
                .iter()
                .filter(|s| **s)
                .count();
            if sources != 1 {
                return Err(bad("needs exactly one of secret_file, public_key_file, jwks_url"));
            }
            if key.kid.as_ref().is_some_and(|kid| kid.is_empty() || kid.len() > 256) {
                return Err(bad("`kid` must be 1 to 256 bytes"));
            }
            if let Some(alg) = &key.alg {
                let family = super::alg::family_of(alg).ok_or_else(|| bad(&format!("unknown alg {alg:?}")))?;
                let fits = match family {
                    super::alg::Family::Hmac => key.secret_file.is_some(),
                    _ => key.secret_file.is_none(),
                };
                if !fits {
                    return Err(bad(
                        "an HS* alg needs secret_file; RS*, PS*, ES* and EdDSA need public_key_file or jwks_url",
                    ));
                }
            } else if key.jwks_url.is_none() {
                return Err(bad("`alg` is required (one algorithm per key)"));
            }
            if let Some(url) = &key.jwks_url {
                if !(url.starts_with("https://") || is_loopback_http(url)) {
                    return Err(bad(
                        "`jwks_url` must be an https URL (http only on loopback): whoever can change the set can sign tokens",
                    ));
                }
                if key.kid.is_some() {
                    return Err(bad("a jwks_url entry takes its kids from the JWKS; drop `kid`"));
                }
            }
            if key.jwks_url.is_none() && !kids.insert((key.tenant.clone(), key.kid.clone())) {
                return Err(bad("another key of this tenant has the same kid (or neither has one)"));
            }
        }
        for tenant in self.keys.iter().map(|k| &k.tenant) {
            let of_tenant: Vec<_> = self.keys.iter().filter(|k| &k.tenant == tenant).collect();
            if of_tenant.len() > 1 && of_tenant.iter().any(|k| k.kid.is_none() && k.jwks_url.is_none()) {
                let index = self.keys.iter().position(|k| &k.tenant == tenant && k.kid.is_none()).unwrap_or(0);
                return Err(AuthConfigError::Key {
                    index,
                    tenant: tenant.clone(),
                    reason: "a tenant with several keys needs a `kid` on each".into(),
                });
            }
        }
        Ok(())
    }

    /// A key file's path as configured, made absolute against [`Self::base_dir`].
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match &self.base_dir {
            Some(base) if path.is_relative() => base.join(path),
            _ => path.to_owned(),
        }
    }
}

/// An `http://` URL whose host is a loopback address or `localhost` (an
/// identity provider on the same machine; anywhere else a JWKS needs TLS).
fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(host, _)| host),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_http;

    #[test]
    fn plain_http_is_only_for_a_provider_on_this_machine() {
        for url in ["http://127.0.0.1:8080/jwks", "http://localhost/jwks", "http://[::1]:9/x", "http://u:p@127.0.0.2/"]
        {
            assert!(is_loopback_http(url), "{url}");
        }
        for url in [
            "http://idp.example/jwks",
            "http://127.0.0.1.evil.example/jwks",
            "http://10.0.0.1/jwks",
            "http://localhost.evil/x",
            "https://127.0.0.1/jwks",
            "ftp://127.0.0.1/",
        ] {
            assert!(!is_loopback_http(url), "{url}");
        }
    }
}
