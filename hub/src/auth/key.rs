//! One verifying key: a tenant, an optional kid, one algorithm, the checks
//! its tokens get, and the fingerprint that tells it apart across reloads.

use std::hash::{Hash, Hasher};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::config::KeyConfig;
use crate::ids::TenantId;

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
