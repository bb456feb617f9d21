//! Per-tenant backend selection: [`TenantRouter`] is itself an
//! [`AnswerBackend`] that hands each request to its tenant's backend, so the
//! service stays unaware of routing.
//!
//! Built from [`BridgeConfig`]: the `[answerer]` section is the backend named
//! `builtin`, `[backends.NAME]` adds more, `[tenants]` maps tenant ids to
//! names and `default_backend` serves everyone else. Backends are built once
//! at startup and shared by name, so two tenants on one LLM share its
//! connection pool.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::limit::ConcurrencyLimit;
use super::{AnswerBackend, BackendRequest, BuiltinBackend, OpenAiBackend, TenantId, TokenStream};
use crate::config::{BUILTIN_BACKEND, BackendConfig, BridgeConfig};
use crate::error::BridgeError;

/// Routes each request to the backend configured for its tenant.
#[derive(Clone)]
pub struct TenantRouter {
    by_tenant: HashMap<TenantId, Arc<dyn AnswerBackend>>,
    default: Arc<dyn AnswerBackend>,
}

impl std::fmt::Debug for TenantRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRouter").field("tenants", &self.by_tenant.len()).finish_non_exhaustive()
    }
}

impl TenantRouter {
    /// Every tenant goes to `default` unless routed with [`Self::with_tenant`].
    pub fn new(default: Arc<dyn AnswerBackend>) -> Self {
        Self { by_tenant: HashMap::new(), default }
    }

    /// Routes `tenant` to `backend`.
    pub fn with_tenant(mut self, tenant: TenantId, backend: Arc<dyn AnswerBackend>) -> Self {
        self.by_tenant.insert(tenant, backend);
        self
    }

    /// Builds every configured backend and the routing table. API keys are
    /// looked up with `env` (the binary passes the process environment).
    pub fn from_config(config: &BridgeConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, BridgeError> {
        config.validate()?;
        let mut named: BTreeMap<&str, Arc<dyn AnswerBackend>> = BTreeMap::new();
        let used = std::iter::once(config.default_backend.as_str()).chain(config.tenants.values().map(String::as_str));
        for name in used {
            if named.contains_key(name) {
                continue;
            }
            let backend: Arc<dyn AnswerBackend> = match config.backends.get(name) {
                None if name == BUILTIN_BACKEND => Arc::new(BuiltinBackend::new(&config.answerer)?),
                None => return Err(BridgeError::InvalidConfig(format!("backend {name:?} is not defined"))),
                Some(BackendConfig::Builtin(answerer)) => Arc::new(BuiltinBackend::new(answerer)?),
                Some(BackendConfig::Openai(openai)) => {
                    let backend: Arc<dyn AnswerBackend> = Arc::new(
                        OpenAiBackend::with_env(openai, env)
                            .map_err(|e| BridgeError::InvalidConfig(format!("backends.{name}: {e}")))?,
                    );
                    match (openai.max_concurrent, openai.max_concurrent_per_tenant) {
                        (None, None) => backend,
                        (total, per_tenant) => Arc::new(ConcurrencyLimit::new(backend, name, total, per_tenant)),
                    }
                }
            };
            tracing::debug!(backend = name, "backend ready");
            named.insert(name, backend);
        }
        let mut router = Self::new(named[config.default_backend.as_str()].clone());
        for (tenant, name) in &config.tenants {
            router = router.with_tenant(TenantId::new(tenant.as_str()), named[name.as_str()].clone());
        }
        Ok(router)
    }
}

impl AnswerBackend for TenantRouter {
    fn answer(&self, request: BackendRequest) -> TokenStream {
        self.by_tenant.get(&request.tenant).unwrap_or(&self.default).answer(request)
    }
}
