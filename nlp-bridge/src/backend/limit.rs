//! Concurrency limits of one backend: [`ConcurrencyLimit`] wraps an
//! [`AnswerBackend`] and lets at most `max_concurrent` of its answers run at
//! once, and at most `max_concurrent_per_tenant` of one tenant's, so one
//! tenant's long answers cannot take every slot of a model server.
//!
//! A permit is taken when the answer starts and held by its stream, so it
//! is freed when the answer ends, fails or is cancelled (the stream is
//! dropped). Over a limit the answer is refused at once with
//! [`BackendError::Busy`] (`RESOURCE_EXHAUSTED`, marked as an upstream limit
//! so hubs retry without taking the whole bridge for full); it never waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{AnswerBackend, BackendError, BackendRequest, TenantId, TokenStream};

/// Tenants' semaphores kept while idle before the map is swept of them.
const IDLE_TENANTS_KEPT: usize = 1024;

/// An [`AnswerBackend`] within concurrency limits.
pub struct ConcurrencyLimit {
    inner: Arc<dyn AnswerBackend>,
    /// The backend's name, for logs and errors.
    name: String,
    /// Answers of every tenant; `None`: no limit.
    total: Option<Arc<Semaphore>>,
    /// Answers of one tenant at most; `None`: no limit.
    per_tenant: Option<usize>,
    /// Each tenant's semaphore while it has answers in flight (and a while
    /// after). A std mutex: held only to look up or sweep, never across `.await`.
    tenants: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
}

impl ConcurrencyLimit {
    /// Limits `inner` to `total` answers at once, and `per_tenant` per tenant.
    pub fn new(inner: Arc<dyn AnswerBackend>, name: &str, total: Option<usize>, per_tenant: Option<usize>) -> Self {
        Self {
            inner,
            name: name.to_owned(),
            total: total.map(|n| Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)))),
            per_tenant: per_tenant.map(|n| n.clamp(1, Semaphore::MAX_PERMITS)),
            tenants: Mutex::default(),
        }
    }

    /// Takes the permits `request` needs, or says which limit is full.
    fn admit(&self, tenant: &TenantId) -> Result<Vec<OwnedSemaphorePermit>, BackendError> {
        let mut permits = Vec::with_capacity(2);
        if let Some(limit) = self.per_tenant {
            let semaphore = {
                let mut tenants = self.tenants.lock().expect("tenant limits lock");
                if tenants.len() >= IDLE_TENANTS_KEPT {
                    tenants.retain(|_, semaphore| semaphore.available_permits() < limit);
                }
                tenants.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(limit))).clone()
            };
            let permit = semaphore
                .try_acquire_owned()
                .map_err(|_| BackendError::Busy { backend: self.name.clone(), limit: "max_concurrent_per_tenant" })?;
            permits.push(permit);
        }
        if let Some(total) = &self.total {
            let permit = total
                .clone()
                .try_acquire_owned()
                .map_err(|_| BackendError::Busy { backend: self.name.clone(), limit: "max_concurrent" })?;
            permits.push(permit);
        }
        Ok(permits)
    }
}

impl AnswerBackend for ConcurrencyLimit {
    fn answer(&self, request: BackendRequest) -> TokenStream {
        match self.admit(&request.tenant) {
            Err(busy) => {
                tracing::info!(error = %busy, "answer refused at the backend's limit");
                stream::once(async move { Err(busy) }).boxed()
            }
            Ok(permits) => self
                .inner
                .answer(request)
                .map(move |item| {
                    // The permits live as long as the stream.
                    let _held = &permits;
                    item
                })
                .boxed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ConversationId, Token};

    /// Answers never end until dropped.
    struct Endless;

    impl AnswerBackend for Endless {
        fn answer(&self, _request: BackendRequest) -> TokenStream {
            stream::once(async { Ok(Token::Text("hi".into())) }).chain(stream::pending()).boxed()
        }
    }

    fn request(tenant: &str) -> BackendRequest {
        BackendRequest {
            tenant: TenantId::new(tenant),
            conversation: ConversationId::new("c"),
            request_id: String::new(),
            history: Vec::new(),
            question: "q".into(),
        }
    }

    async fn first(limited: &ConcurrencyLimit, tenant: &str) -> (TokenStream, Result<Token, BackendError>) {
        let mut answer = limited.answer(request(tenant));
        let item = answer.next().await.expect("an item");
        (answer, item)
    }

    #[tokio::test]
    async fn each_limit_refuses_the_answer_beyond_it_until_one_ends() {
        let limited = ConcurrencyLimit::new(Arc::new(Endless), "llm", Some(3), Some(2));
        let (a1, ok) = first(&limited, "a").await;
        assert!(ok.is_ok());
        let (_a2, ok) = first(&limited, "a").await;
        assert!(ok.is_ok());
        let (_, refused) = first(&limited, "a").await;
        assert!(matches!(refused, Err(BackendError::Busy { limit: "max_concurrent_per_tenant", .. })));
        // Another tenant still gets the backend's last slot, and then the backend is full.
        let (_b1, ok) = first(&limited, "b").await;
        assert!(ok.is_ok());
        let (_, refused) = first(&limited, "c").await;
        assert!(matches!(refused, Err(BackendError::Busy { limit: "max_concurrent", .. })));
        // An answer that ends (its stream dropped) frees both of its slots.
        drop(a1);
        let (_a3, ok) = first(&limited, "a").await;
        assert!(ok.is_ok());
    }
}
