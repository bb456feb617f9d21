//! The keyring: every configured key, loaded and pinned to one tenant and
//! one algorithm.
//!
//! A key is looked up by (tenant, kid) and nothing else: the tenant comes
//! from the token's `tid` and the kid from its header, both unverified, so
//! each only *selects* among keys the operator configured; neither ever
//! becomes part of a path or URL. A keyring is immutable; a reload builds a
//! new one and swaps it in ([`super::Auth::reload`]).

use std::collections::HashMap;

use std::sync::Arc;

use super::alg::{algorithm, decoding_key};
use super::config::AuthConfig;
use super::jwks::JwksSource;
use super::key::{Key, KeyFingerprint};
use crate::ids::TenantId;

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("[[auth.keys]] entry {index} (tenant {tenant}): {reason}")]
pub struct KeyError {
    pub index: usize,
    pub tenant: String,
    pub reason: String,
}

/// One tenant's keys.
#[derive(Debug, Default)]
pub struct TenantKeys {
    /// Keys from files, each with its kid (or the tenant's only key, without one).
    pub fixed: Vec<Arc<Key>>,
    /// JWKS documents, fetched and cached per (tenant, kid) by their source.
    pub jwks: Vec<Arc<JwksSource>>,
}

/// Every configured key, by tenant.
#[derive(Debug, Default)]
pub struct Keyring {
    pub tenants: HashMap<TenantId, TenantKeys>,
}

impl Keyring {
    /// Reads every key file; JWKS sources are created empty (fetched on first use).
    /// A reload passes the keyring in force as `previous`: each JWKS source
    /// that reads the same set the same way is kept, with its cache, so a
    /// reload neither refetches every set nor drops the sockets they verified.
    pub fn load(config: &AuthConfig, http: &reqwest::Client, previous: Option<&Keyring>) -> Result<Self, KeyError> {
        let mut tenants: HashMap<TenantId, TenantKeys> = HashMap::new();
        for (index, entry) in config.keys.iter().enumerate() {
            let fail = |reason: String| KeyError { index, tenant: entry.tenant.clone(), reason };
            let tenant = TenantId::parse(&entry.tenant).map_err(|e| fail(format!("`tenant` {e}")))?;
            let pinned = match &entry.alg {
                Some(name) => Some(algorithm(name).ok_or_else(|| fail(format!("unknown alg {name:?}")))?),
                None => None,
            };
            let keys = tenants.entry(tenant.clone()).or_default();
            if let Some(url) = &entry.jwks_url {
                let kept = previous
                    .and_then(|keyring| keyring.tenants.get(&tenant))
                    .and_then(|old| old.jwks.iter().find(|source| source.same_as(&tenant, entry, config)).cloned());
                let source = kept.unwrap_or_else(|| {
                    Arc::new(JwksSource::new(tenant, url.clone(), pinned, entry.clone(), config, http.clone()))
                });
                keys.jwks.push(source);
                continue;
            }
            let alg = pinned.ok_or_else(|| fail("`alg` is required".into()))?;
            let (path, what) = match (&entry.secret_file, &entry.public_key_file) {
                (Some(path), None) => (path, "secret_file"),
                (None, Some(path)) => (path, "public_key_file"),
                _ => return Err(fail("needs exactly one of secret_file, public_key_file, jwks_url".into())),
            };
            let path = config.resolve(path);
            let material =
                std::fs::read(&path).map_err(|e| fail(format!("cannot read {what} {}: {e}", path.display())))?;
            let decoding =
                decoding_key(alg, &material).map_err(|reason| fail(format!("{what} {}: {reason}", path.display())))?;
            keys.fixed.push(Arc::new(Key {
                tenant,
                kid: entry.kid.clone(),
                alg,
                decoding,
                validation: Key::validation(alg, entry, config.leeway_secs),
                fingerprint: Key::fingerprint(entry, &material, entry.kid.as_deref()),
            }));
        }
        Ok(Self { tenants })
    }

    /// Whether a key with this fingerprint is still configured (for JWKS
    /// keys: whether the JWKS still holds it, as last fetched).
    pub fn holds(&self, tenant: &TenantId, fingerprint: KeyFingerprint) -> bool {
        self.tenants.get(tenant).is_some_and(|keys| {
            keys.fixed.iter().any(|k| k.fingerprint == fingerprint) || keys.jwks.iter().any(|s| s.holds(fingerprint))
        })
    }
}
