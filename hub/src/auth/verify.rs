//! Token verification: a token in, an [`Identity`] or a refusal out.
//!
//! The steps, in order: the token's shape and size; its header (an `alg`
//! the hub does not know, `none` in any letter case among them, fails
//! here); the key, chosen by the unverified `tid` claim and header `kid`
//! among the configured keys of that tenant and nothing else; the
//! signature with that key's one algorithm (a token whose `alg` is not the
//! key's fails before any cryptography, so an RSA public key can never be
//! used as an HMAC secret); `exp`, `nbf`, `aud`, `iss` with the leeway;
//! `iat` not in the future; then the claims the hub reads (`sub`, `tid`,
//! `role`), and `tid` against the key's tenant.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;

use super::identity::{Claims, Identity, now_secs};
use super::key::Key;
use super::keyring::Keyring;
use crate::ids::{TenantId, UserId};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused. Each maps to one stable code
/// ([`Refusal::code`]); the text is for logs and the HTTP body's `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("a token is required")]
    Missing,
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's header names an algorithm this hub does not accept")]
    BadAlgorithm,
    #[error("no key of the token's tenant has that kid")]
    UnknownKid,
    #[error("the token's tenant has several keys; the token must name one with `kid`")]
    KidRequired,
    #[error("no key is configured for the token's tenant")]
    UnknownTenant,
    #[error("the token is not valid: {0}")]
    Invalid(&'static str),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf or iat in the future)")]
    NotYetValid,
    #[error("the tenant's keys cannot be fetched right now")]
    KeysUnavailable,
}

impl Refusal {
    /// The stable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "token_missing",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::UnknownKid => "unknown_kid",
            Self::KeysUnavailable => "keys_unavailable",
            Self::Malformed(_) | Self::BadAlgorithm | Self::KidRequired | Self::UnknownTenant | Self::Invalid(_) => {
                "token_invalid"
            }
        }
    }
}

/// The claim read before verification, only to pick the tenant's keys.
#[derive(Deserialize)]
struct Unverified {
    tid: Option<String>,
}

/// Verifies a token against the keyring.
pub async fn verify(keyring: &Keyring, token: &str, leeway_secs: u64) -> Result<Identity, Refusal> {
    if token.is_empty() {
        return Err(Refusal::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::Malformed("longer than 8 KiB"));
    }
    if token.split('.').count() != 3 {
        return Err(Refusal::Malformed("a JWT has three dot-separated parts"));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|error| match error.kind() {
        // `alg` not one of the known algorithms: `none`, `None`, `HS257`…
        ErrorKind::Json(_) => Refusal::BadAlgorithm,
        _ => Refusal::Malformed("the header is not base64url JSON"),
    })?;
    let unverified = jsonwebtoken::dangerous::insecure_decode_claims::<Unverified>(token)
        .map_err(|_| Refusal::Malformed("the claims are not base64url JSON"))?;
    let tid = unverified.tid.ok_or(Refusal::Invalid("the `tid` claim is missing"))?;
    let tenant = TenantId::parse(&tid).map_err(|_| Refusal::Invalid("the `tid` claim is not a tenant id"))?;
    let keys = keyring.tenants.get(&tenant).ok_or(Refusal::UnknownTenant)?;
    let key: Arc<Key> = match header.kid.as_deref() {
        Some(kid) => match keys.fixed.iter().find(|k| k.kid.as_deref() == Some(kid)) {
            Some(key) => key.clone(),
            None => {
                let mut found = None;
                let mut unavailable = false;
                for source in &keys.jwks {
                    match source.key(kid).await {
                        Ok(Some(key)) => {
                            found = Some(key);
                            break;
                        }
                        Ok(None) => {}
                        Err(_) => unavailable = true,
                    }
                }
                match found {
                    Some(key) => key,
                    None if unavailable => return Err(Refusal::KeysUnavailable),
                    None => return Err(Refusal::UnknownKid),
                }
            }
        },
        // Without a kid: the tenant's one key, if it has only one.
        None => match (&keys.fixed[..], keys.jwks.len()) {
            ([only], 0) => only.clone(),
            _ => return Err(Refusal::KidRequired),
        },
    };
    if header.alg != key.alg {
        return Err(Refusal::BadAlgorithm);
    }
    let data =
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation).map_err(|error| match error.kind() {
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidAlgorithm => Refusal::BadAlgorithm,
            ErrorKind::InvalidSignature => Refusal::Invalid("the signature does not verify"),
            ErrorKind::InvalidAudience => Refusal::Invalid("wrong `aud`"),
            ErrorKind::InvalidIssuer => Refusal::Invalid("wrong `iss`"),
            ErrorKind::MissingRequiredClaim(_) => {
                Refusal::Invalid("a required claim (exp, sub, aud or iss) is missing")
            }
            ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                Refusal::Invalid("the claims must include sub, tid, role (customer or agent) and a numeric exp")
            }
            _ => Refusal::Invalid("the signature does not verify"),
        })?;
    let claims = data.claims;
    if claims.iat.is_some_and(|iat| iat > now_secs().saturating_add(leeway_secs)) {
        return Err(Refusal::NotYetValid);
    }
    // Selected by `tid`, so equal by construction; checked so it stays so.
    if claims.tid != key.tenant.as_str() {
        return Err(Refusal::Invalid("the token's tenant is not the tenant of its key"));
    }
    let user = UserId::parse(&claims.sub).map_err(|_| Refusal::Invalid("the `sub` claim is not a user id"))?;
    let name = claims.display_name().ok_or(Refusal::Invalid("the `name` claim must be 1 to 64 characters"))?;
    Ok(Identity {
        tenant: key.tenant.clone(),
        user,
        role: claims.role,
        kid: header.kid,
        exp: claims.exp,
        key: key.fingerprint,
        name,
        supervisor: claims.supervisor,
    })
}
