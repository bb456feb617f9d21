//! Demo tokens: `GET /demo/token` mints them, `/ws?token=` takes them, in
//! demo mode only.
//!
//! They let the demo page speak the same protocol as a production client
//! (token at the upgrade, `token.expiring`, `refresh`) without an identity
//! provider. HS256 with a secret drawn at start from the OS's random
//! generator and never written anywhere: a restart invalidates every demo
//! token, and no token minted by one process verifies on another. Demo mode
//! believes whatever tenant and user a client names anyway; these tokens
//! add no trust, only the production code path.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use super::identity::{Claims, Identity, Role, now_secs};
use super::key::KeyFingerprint;
use super::verify::{MAX_TOKEN_BYTES, Refusal};
use crate::ids::{TenantId, UserId};

/// The `kid` of demo tokens.
pub const DEMO_KID: &str = "demo";

/// Mints and verifies this process's demo tokens.
pub struct DemoIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Sessions authenticated by a demo token name this key.
    pub fingerprint: KeyFingerprint,
}

impl DemoIssuer {
    pub fn new(leeway_secs: u64) -> Self {
        // Four UUIDv4s: 488 bits from a cryptographically secure generator.
        let secret: Vec<u8> = (0..4).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).collect();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(&secret).expect("an HMAC key from bytes"),
            decoding: DecodingKey::from_secret(&secret).expect("an HMAC key from bytes"),
            validation,
            fingerprint: KeyFingerprint(u64::from_le_bytes(secret[..8].try_into().expect("8 bytes"))),
        }
    }

    /// A token for (tenant, user, role), with the display name `name` when
    /// given, valid for `ttl_secs`; returns it with its `exp`.
    pub fn mint(
        &self,
        tenant: &TenantId,
        user: &UserId,
        role: Role,
        name: Option<&str>,
        ttl_secs: u64,
    ) -> (String, u64) {
        let now = now_secs();
        let claims = Claims {
            sub: user.as_str().to_owned(),
            tid: tenant.as_str().to_owned(),
            role,
            exp: now + ttl_secs,
            iat: Some(now),
            name: name.map(str::to_owned),
            supervisor: false,
        };
        let header = Header { kid: Some(DEMO_KID.into()), ..Header::new(Algorithm::HS256) };
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding).expect("HS256 signing cannot fail");
        (token, claims.exp)
    }

    /// Verifies a token this process minted.
    pub fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        if token.is_empty() {
            return Err(Refusal::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Malformed("longer than 8 KiB"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::BadAlgorithm)?;
        if header.alg != Algorithm::HS256 {
            return Err(Refusal::BadAlgorithm);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|error| {
                match error.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => Refusal::Expired,
                    jsonwebtoken::errors::ErrorKind::ImmatureSignature => Refusal::NotYetValid,
                    _ => Refusal::Invalid("not a token of this hub's demo issuer"),
                }
            })?;
        let claims = data.claims;
        let name = claims.display_name().ok_or(Refusal::Invalid("the `name` claim must be 1 to 64 characters"))?;
        Ok(Identity {
            tenant: TenantId::parse(&claims.tid).map_err(|_| Refusal::Invalid("the `tid` claim is not a tenant id"))?,
            user: UserId::parse(&claims.sub).map_err(|_| Refusal::Invalid("the `sub` claim is not a user id"))?,
            role: claims.role,
            kid: header.kid,
            exp: claims.exp,
            key: self.fingerprint,
            name,
            supervisor: claims.supervisor,
        })
    }
}
