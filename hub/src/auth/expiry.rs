//! A connected socket's token over time.
//!
//! Each socket opened with a token gets a small task that watches the
//! token's `exp` and the keyring: `token.expiring` goes out
//! `auth.expiring_notice_secs` before `exp`; a `refresh` frame with a new
//! token of the same party (tenant, user, role) moves `exp` and is answered
//! `refreshed`; without one, the socket closes with 4001 once
//! `auth.expiry_grace_secs` have passed after `exp`. Inside the grace the
//! socket stays open and replies keep streaming, but new messages are
//! refused (`token_expired`). A reload that removes the token's key closes
//! the socket with 4001 at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::{Instrument, debug, info};

use super::{Auth, Identity};
use crate::fanout::{Outbound, SessionHandle};
use crate::protocol::{ErrorCode, ServerFrame, close};

/// A session's token: the identity in force, shared by the reader (which
/// refreshes it) and the watcher (which acts on its `exp`).
pub struct SessionToken {
    identity: watch::Sender<Identity>,
    /// `auth.leeway_secs` when the socket opened: the clock skew the upgrade allowed.
    leeway_secs: u64,
}

impl SessionToken {
    /// Starts watching a token-authenticated session.
    pub fn start(
        auth: Arc<Auth>,
        identity: Identity,
        session: SessionHandle,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let leeway_secs = auth.current().config.leeway_secs;
        let (tx, rx) = watch::channel(identity);
        tracker.spawn(run_token_watch(auth, rx, session).in_current_span());
        Self { identity: tx, leeway_secs }
    }

    /// Whether the token has expired, leeway included (new messages are then refused).
    pub fn expired(&self) -> bool {
        self.identity.borrow().exp.saturating_add(self.leeway_secs) <= super::identity::now_secs()
    }

    /// Handles a `refresh` frame: verifies the new token, checks it names
    /// the same party, and moves the session onto it.
    pub async fn refresh(&self, auth: &Auth, session: &SessionHandle, token: &str) {
        let frame = match auth.verify(token).await {
            Ok(fresh) if self.identity.borrow().same_party(&fresh) => {
                let exp = fresh.exp;
                self.identity.send_replace(fresh);
                debug!(exp, "token refreshed");
                ServerFrame::Refreshed { exp }.encode()
            }
            Ok(_) => {
                let message = "a refresh must be for the same tenant, user and role";
                ServerFrame::Error {
                    code: ErrorCode::IdentityMismatch.as_str(),
                    message,
                    id: None,
                    retry_after_ms: None,
                }
                .encode()
            }
            Err(refusal) => {
                let message = refusal.to_string();
                ServerFrame::Error { code: refusal.code(), message: &message, id: None, retry_after_ms: None }.encode()
            }
        };
        session.push(Outbound::ephemeral(frame));
    }
}

/// The watcher: notice, close on expiry, close when the key is removed.
async fn run_token_watch(auth: Arc<Auth>, mut identity: watch::Receiver<Identity>, session: SessionHandle) {
    let mut keys = auth.changes();
    // The `exp` a notice was sent for.
    let mut noticed = None;
    loop {
        let current = identity.borrow_and_update().clone();
        let loaded = keys.borrow_and_update().clone();
        if !auth.still_trusts(&loaded, &current) {
            info!(kid = current.kid.as_deref().unwrap_or(""), "the key of this socket's token was removed; closing");
            session.closer.close(close::TOKEN_REVOKED);
            return;
        }
        let notice_at = current.exp.saturating_sub(loaded.config.expiring_notice_secs);
        let close_at = current.exp.saturating_add(loaded.config.expiry_grace_secs);
        let notice = async {
            if noticed == Some(current.exp) {
                return std::future::pending().await;
            }
            tokio::time::sleep(until(notice_at)).await
        };
        tokio::select! {
            _ = session.closer.token().cancelled() => return,
            changed = identity.changed() => if changed.is_err() { return },
            changed = keys.changed() => if changed.is_err() { return },
            () = notice => {
                noticed = Some(current.exp);
                session.push(Outbound::ephemeral(ServerFrame::TokenExpiring { exp: current.exp }.encode()));
            }
            () = tokio::time::sleep(until(close_at)) => {
                debug!("token expired and was not refreshed within the grace; closing");
                session.closer.close(close::TOKEN_EXPIRED);
                return;
            }
        }
    }
}

/// How long until a Unix time, in whole seconds (zero when past).
fn until(unix_secs: u64) -> Duration {
    // An `exp` past what the clock can hold is as good as never.
    let Some(target) = UNIX_EPOCH.checked_add(Duration::from_secs(unix_secs)) else {
        return Duration::MAX;
    };
    target.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exp_past_what_the_clock_holds_is_never_and_a_past_one_is_now() {
        assert_eq!(until(u64::MAX), Duration::MAX);
        assert_eq!(until(1), Duration::ZERO);
    }
}
