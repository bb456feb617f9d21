//! A tenant's JWKS (`jwks_url`): fetched with the hub's HTTP client and
//! cached per (tenant, kid).
//!
//! Each source belongs to exactly one tenant, so a kid found in it can only
//! ever verify that tenant's tokens (a cache keyed by kid alone let one
//! tenant's key verify another's, centrifugo #1142). The URL is the
//! operator's; nothing from a token goes into it. A kid the cache does not
//! know triggers a fetch, at most once per `auth.jwks_min_refresh_secs` per
//! source, so a stream of made-up kids costs the identity provider one
//! request per interval; until the next fetch is due, a failed fetch keeps
//! answering "unavailable" (not "unknown kid"). Fetches of one source are
//! serialized by its own lock: a slow identity provider holds up only
//! upgrades of its tenant that name a kid not yet cached, never another
//! tenant's.
//!
//! Each JWK is read on its own: one the hub cannot use (another key type or
//! curve, published for encryption by `use` or `key_ops`, symmetric, of an
//! algorithm other than the pinned one) is skipped and logged, and the rest
//! of the set still verifies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tracing::{info, warn};

use super::alg::family;
use super::config::{AuthConfig, KeyConfig};
use super::key::{Key, KeyFingerprint};
use crate::ids::TenantId;

/// Largest JWKS document accepted, in bytes.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// One `jwks_url` of one tenant.
pub struct JwksSource {
    tenant: TenantId,
    url: String,
    /// The config's `alg`, pinning every key of the set.
    pinned: Option<Algorithm>,
    entry: KeyConfig,
    leeway_secs: u64,
    min_refresh: Duration,
    max_age: Duration,
    /// When the cached set was fetched (None: never).
    fetched_at: Mutex<Option<Instant>>,
    timeout: Duration,
    http: reqwest::Client,
    /// kid → key, as of the last good fetch.
    cache: RwLock<HashMap<String, Arc<Key>>>,
    /// When the last fetch started, and whether it failed.
    last_fetch: Mutex<Option<LastFetch>>,
    /// Held while fetching: one fetch per source at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("tenant", &self.tenant)
            .field("url", &crate::redact::display_url(&self.url))
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct LastFetch {
    at: Instant,
    failed: bool,
}

/// A JWKS document: its keys, each read on its own ([`JwksSource::key_of`]).
#[derive(serde::Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// Why a JWKS could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("fetching the JWKS failed: {0}")]
    Fetch(String),
    #[error("the last JWKS fetch failed; the next is not due yet")]
    LastFetchFailed,
}

impl JwksSource {
    pub fn new(
        tenant: TenantId,
        url: String,
        pinned: Option<Algorithm>,
        entry: KeyConfig,
        config: &AuthConfig,
        http: reqwest::Client,
    ) -> Self {
        Self {
            tenant,
            url,
            pinned,
            entry,
            leeway_secs: config.leeway_secs,
            min_refresh: Duration::from_secs(config.jwks_min_refresh_secs),
            max_age: Duration::from_secs(config.jwks_max_age_secs),
            fetched_at: Mutex::default(),
            timeout: Duration::from_millis(config.jwks_timeout_ms),
            http,
            cache: RwLock::default(),
            last_fetch: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The key with this kid: from the cache, or from a fetch when the
    /// cache does not have it and the last fetch is old enough.
    pub async fn key(&self, kid: &str) -> Result<Option<Arc<Key>>, JwksError> {
        if !self.stale()
            && let Some(key) = self.cached(kid)
        {
            return Ok(Some(key));
        }
        let _fetching = self.fetching.lock().await;
        // Someone may have fetched while we waited.
        if !self.stale() {
            if let Some(key) = self.cached(kid) {
                return Ok(Some(key));
            }
        } else if self.refetch_stale().await.is_ok() {
            return Ok(self.cached(kid));
        } else if let Some(key) = self.cached(kid) {
            // The provider cannot be reached: the keys it last published
            // still verify (an outage there must not lock every customer out).
            return Ok(Some(key));
        }
        let last = *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
        match last {
            Some(last) if last.at.elapsed() < self.min_refresh => {
                return if last.failed { Err(JwksError::LastFetchFailed) } else { Ok(None) };
            }
            _ => {}
        }
        self.fetch_counted().await?;
        Ok(self.cached(kid))
    }

    /// Whether the cached set is older than `jwks_max_age_secs` (a set
    /// never fetched is not stale: it is empty).
    fn stale(&self) -> bool {
        self.fetched_at.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|at| at.elapsed() >= self.max_age)
    }

    /// Fetches a stale set again, at most once per `min_refresh`.
    async fn refetch_stale(&self) -> Result<(), JwksError> {
        let last = *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
        match last {
            Some(last) if last.at.elapsed() < self.min_refresh => {
                if last.failed {
                    Err(JwksError::LastFetchFailed)
                } else {
                    Ok(())
                }
            }
            _ => self.fetch_counted().await,
        }
    }

    /// One fetch, counted against the interval. Recorded as failed before
    /// it starts: a fetch abandoned half-way (its upgrade's client left)
    /// counts against the interval, and the tokens that wait for it get the
    /// retryable `keys_unavailable`, not `unknown_kid`.
    async fn fetch_counted(&self) -> Result<(), JwksError> {
        let at = Instant::now();
        *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastFetch { at, failed: true });
        self.fetch().await?;
        *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastFetch { at, failed: false });
        *self.fetched_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
        Ok(())
    }

    /// Whether this source reads the same set the same way as a new entry
    /// would: a reload then keeps it, with its cache.
    pub fn same_as(&self, tenant: &TenantId, entry: &KeyConfig, config: &AuthConfig) -> bool {
        self.tenant == *tenant
            && self.entry == *entry
            && self.leeway_secs == config.leeway_secs
            && self.min_refresh == Duration::from_secs(config.jwks_min_refresh_secs)
            && self.max_age == Duration::from_secs(config.jwks_max_age_secs)
            && self.timeout == Duration::from_millis(config.jwks_timeout_ms)
    }

    fn cached(&self, kid: &str) -> Option<Arc<Key>> {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).get(kid).cloned()
    }

    /// Whether the set, as last fetched, still holds the key with this fingerprint.
    pub fn holds(&self, fingerprint: KeyFingerprint) -> bool {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).values().any(|k| k.fingerprint == fingerprint)
    }

    async fn fetch(&self) -> Result<(), JwksError> {
        let shown = crate::redact::display_url(&self.url);
        let set = async {
            let mut response = self.http.get(&self.url).timeout(self.timeout).send().await?.error_for_status()?;
            if response.content_length().is_some_and(|len| len as usize > MAX_JWKS_BYTES) {
                return Err(JwksError::Fetch("the JWKS is too large".into()));
            }
            // Read chunk by chunk: a body without a length stops at the limit too.
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_JWKS_BYTES {
                    return Err(JwksError::Fetch("the JWKS is too large".into()));
                }
                body.extend_from_slice(&chunk);
            }
            serde_json::from_slice::<RawSet>(&body).map_err(|e| JwksError::Fetch(format!("not a JWKS: {e}")))
        }
        .await
        .inspect_err(
            |error| warn!(tenant_id = %self.tenant, url = %shown, %error, "JWKS fetch failed; keeping the keys cached"),
        )?;
        let mut keys = HashMap::new();
        for raw in set.keys {
            let Some(kid) = raw.get("kid").and_then(|kid| kid.as_str()).filter(|kid| !kid.is_empty()) else {
                continue;
            };
            let kid = kid.to_owned();
            let jwk = match serde_json::from_value::<Jwk>(raw) {
                Ok(jwk) => jwk,
                Err(error) => {
                    warn!(tenant_id = %self.tenant, url = %shown, kid, %error, "JWKS key skipped: not a key this hub reads");
                    continue;
                }
            };
            match self.key_of(&jwk, &kid) {
                Ok(key) => {
                    keys.insert(kid, Arc::new(key));
                }
                Err(reason) => warn!(tenant_id = %self.tenant, url = %shown, kid, reason, "JWKS key skipped"),
            }
        }
        info!(tenant_id = %self.tenant, url = %shown, keys = keys.len(), "JWKS fetched");
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }

    /// One JWK as a key pinned to one algorithm; symmetric keys are never
    /// taken from a JWKS (a published secret is no secret), nor keys
    /// published for anything but verifying signatures (`use`, `key_ops`).
    fn key_of(&self, jwk: &Jwk, kid: &str) -> Result<Key, String> {
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            return Err("symmetric keys are not taken from a JWKS".into());
        }
        if jwk.common.public_key_use.as_ref().is_some_and(|used| *used != PublicKeyUse::Signature) {
            return Err("its `use` is not `sig`".into());
        }
        if jwk.common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
            return Err("its `key_ops` do not include `verify`".into());
        }
        let own = jwk.common.key_algorithm.map(Algorithm::try_from).transpose().map_err(|e| e.to_string())?;
        let alg = match (self.pinned, own) {
            (Some(pinned), Some(own)) if pinned != own => {
                return Err(format!("its alg {own:?} is not the pinned {pinned:?}"));
            }
            (Some(alg), _) | (None, Some(alg)) => alg,
            (None, None) => return Err("it names no alg and the config pins none".into()),
        };
        let decoding = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        if decoding.family() != family(alg) {
            return Err(format!("a {:?} key cannot verify {alg:?}", decoding.family()));
        }
        let material = serde_json::to_vec(jwk).unwrap_or_default();
        Ok(Key {
            tenant: self.tenant.clone(),
            kid: Some(kid.to_owned()),
            alg,
            decoding,
            validation: Key::validation(alg, &self.entry, self.leeway_secs),
            fingerprint: Key::fingerprint(&self.entry, &material, Some(kid)),
        })
    }
}

impl From<reqwest::Error> for JwksError {
    fn from(error: reqwest::Error) -> Self {
        Self::Fetch(error.without_url().to_string())
    }
}
