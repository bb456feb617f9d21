//! JWT algorithms by their JOSE names, their families (a key of one family
//! never verifies another's tokens) and a key file's bytes as a key of one.

use jsonwebtoken::{Algorithm, DecodingKey};

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
