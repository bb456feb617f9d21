//! The keyring: every configured key, loaded and pinned to one tenant and
//! one algorithm.
//!
//! A key is looked up by (tenant, kid) and nothing else: the tenant comes
//! from the token's `tid` and the kid from its header, both unverified, so
//! each only *selects* among keys the operator configured; neither ever
//! becomes part of a path or URL. A keyring is immutable; a reload builds a
//! new one and swaps it in ([`super::Auth::reload`]).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::config::{AuthConfig, KeyConfig};
use super::jwks::JwksSource;
use crate::ids::TenantId;

/// Algorithm families: a key of one family never verifies another's tokens.
pub use jsonwebtoken::AlgorithmFamily as Family;

/// The algorithm a config names, by its exact JOSE name.
pub fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

pub fn family_of(name: &str) -> Option<Family> {
    algorithm(name).map(family)
}

pub fn family(alg: Algorithm) -> Family {
    alg.family()
}

/// Which key verified a token, stable across reloads while the key is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub u64);

/// One verifying key: a tenant, an optional kid, one algorithm.
pub struct Key {
    pub tenant: TenantId,
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub decoding: DecodingKey,
    /// The checks every token of this key gets (alg, exp, nbf, aud, iss, leeway).
    pub validation: Validation,
    pub fingerprint: KeyFingerprint,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("tenant", &self.tenant).field("kid", &self.kid).field("alg", &self.alg).finish()
    }
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("[[auth.keys]] entry {index} (tenant {tenant}): {reason}")]
pub struct KeyError {
    pub index: usize,
    pub tenant: String,
    pub reason: String,
}

impl Key {
    /// The validation for one key: its algorithm alone, `exp` required,
    /// `nbf` checked, `aud`/`iss` when configured, the configured leeway.
    pub fn validation(alg: Algorithm, entry: &KeyConfig, leeway_secs: u64) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &entry.aud {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // A token's own `aud` means nothing to a key that names none.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &entry.iss {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// Makes the fingerprint of a key: what it is and what it checks.
    pub fn fingerprint(entry: &KeyConfig, material: &[u8], kid: Option<&str>) -> KeyFingerprint {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (entry, material, kid).hash(&mut hasher);
        KeyFingerprint(hasher.finish())
    }
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

/// A key file's bytes as the algorithm's key. An HMAC secret is the file's
/// bytes (one trailing newline dropped); a public key must be PEM of the
/// algorithm's family. A PEM public key named as an HMAC secret is refused:
/// that is the algorithm-confusion attack's favourite key.
pub fn decoding_key(alg: Algorithm, material: &[u8]) -> Result<DecodingKey, String> {
    let key = match family(alg) {
        Family::Hmac => {
            let secret = material.strip_suffix(b"\n").unwrap_or(material);
            let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
            if secret.starts_with(b"-----BEGIN") {
                return Err("an HMAC secret must not be a PEM key".into());
            }
            if secret.len() < 32 {
                return Err("an HMAC secret must be at least 32 bytes".into());
            }
            DecodingKey::from_secret(secret)
        }
        Family::Rsa => DecodingKey::from_rsa_pem(material),
        Family::Ec => DecodingKey::from_ec_pem(material),
        Family::Ed => DecodingKey::from_ed_pem(material),
    };
    key.map_err(|e| format!("not a {:?} public key in PEM: {e}", family(alg)))
}
