//! Identity: who is on the other end of each socket, proven by a signed token.
//!
//! - [`config`]: `[auth]` and `[[auth.keys]]`, checked before any file is read.
//! - [`alg`]: algorithms by name, their families, a key file's bytes as a key.
//! - [`key`]: one verifying key, the checks its tokens get, its fingerprint.
//! - [`keyring`]: every configured key, pinned to one tenant and one algorithm.
//! - [`jwks`]: a tenant's JWKS, fetched and cached per (tenant, kid).
//! - [`verify`]: a token to an [`Identity`], or a [`Refusal`] with a stable code.
//! - [`demo`]: the demo mode's own tokens (`GET /demo/token`).
//! - [`identity`]: the claims and the verified identity a session carries.
//! - [`expiry`]: a connected socket's token: `token.expiring`, `refresh`, 4001.
//!
//! [`Auth`] is the node's one handle on all of it: the upgrade asks it to
//! verify, SIGHUP asks it to [`Auth::reload`], sessions watch its keyring
//! so a removed key closes their sockets at once.

pub mod alg;
pub mod config;
pub mod demo;
pub mod expiry;
pub mod identity;
pub mod jwks;
pub mod key;
pub mod keyring;
pub mod verify;

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

pub use config::{AuthConfig, AuthConfigError, AuthMode};
pub use identity::{Identity, Role};
pub use verify::Refusal;

use demo::DemoIssuer;
use keyring::{KeyError, Keyring};

/// A loaded `[auth]`: its settings and its keys, swapped whole on reload.
#[derive(Debug)]
pub struct Loaded {
    pub config: AuthConfig,
    pub keyring: Keyring,
}

/// Why a reload was refused (the old configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("auth.mode cannot change without a restart")]
    ModeChanged,
    #[error(transparent)]
    Config(#[from] AuthConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The node's identity checks.
pub struct Auth {
    mode: AuthMode,
    current: watch::Sender<Arc<Loaded>>,
    /// Demo mode only.
    demo: Option<DemoIssuer>,
    http: reqwest::Client,
}

impl Auth {
    /// Loads the keys (reading every key file); `config` was checked by `Config::validate`.
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fengda/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        let keyring = Keyring::load(config, &http, None)?;
        let demo = (config.mode == AuthMode::Demo).then(|| DemoIssuer::new(config.leeway_secs));
        let (current, _) = watch::channel(Arc::new(Loaded { config: config.clone(), keyring }));
        Ok(Self { mode: config.mode, current, demo, http })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The configuration and keys in force.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.borrow().clone()
    }

    /// Changes whenever a reload swaps the keys.
    pub fn changes(&self) -> watch::Receiver<Arc<Loaded>> {
        self.current.subscribe()
    }

    /// Verifies a token: against the demo issuer in demo mode, the keyring in jwt mode.
    pub async fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        let loaded = self.current();
        let result = match &self.demo {
            Some(demo) => demo.verify(token),
            None => verify::verify(&loaded.keyring, token, loaded.config.leeway_secs).await,
        };
        if let Err(refusal) = &result {
            metrics::counter!(crate::metric::AUTH_REFUSALS, "code" => refusal.code()).increment(1);
        }
        result
    }

    /// Whether the key that verified `identity` is still trusted.
    pub fn still_trusts(&self, loaded: &Loaded, identity: &Identity) -> bool {
        match &self.demo {
            Some(demo) => demo.fingerprint == identity.key,
            None => loaded.keyring.holds(&identity.tenant, identity.key),
        }
    }

    /// Mints a demo token (demo mode only).
    pub fn demo_issuer(&self) -> Option<&DemoIssuer> {
        self.demo.as_ref()
    }

    /// Swaps in a new `[auth]` (keys and settings) after checking all of it;
    /// on any error the old one stays.
    pub fn reload(&self, config: &AuthConfig, listen: std::net::SocketAddr) -> Result<(), ReloadError> {
        if config.mode != self.mode {
            return Err(ReloadError::ModeChanged);
        }
        config.check(listen)?;
        let keyring = Keyring::load(config, &self.http, Some(&self.current().keyring))?;
        let tenants = keyring.tenants.len();
        self.current.send_replace(Arc::new(Loaded { config: config.clone(), keyring }));
        info!(keys = config.keys.len(), tenants, "auth configuration reloaded");
        Ok(())
    }

    /// Logs what demo mode means when it listens beyond loopback.
    pub fn warn_if_exposed(&self, listen: std::net::SocketAddr) {
        if self.mode == AuthMode::Demo && !listen.ip().is_loopback() {
            warn!(
                %listen,
                "INSECURE: auth.mode = \"demo\" on a non-loopback address: anyone who can reach this port can \
                 read and write any tenant's conversations by naming a tenant and user. Never run this in production."
            );
        }
    }
}
