//! The node's TCP front door: the accept loop and each connection's HTTP.
//!
//! One task per connection, served by hyper with the limits `axum::serve`
//! does not expose: a deadline for each request head
//! (`server.header_read_timeout_ms`, which also bounds how long a keep-alive
//! connection waits for its next request), a largest request head
//! (`server.max_header_bytes`, else `431`), and an idle timeout for
//! connections that have not become WebSockets
//! (`server.http_idle_timeout_ms`). [`limits`] decides who gets a
//! connection; refused ones are answered with a JSON `429`/`503` on a short
//! deadline, and still get `/healthz` and `/readyz`, so a full node stays
//! visibly alive. An `accept` that fails (out of descriptors) backs off
//! instead of spinning. Connections speak HTTP/1.1 only, unless
//! `server.http2_cleartext` adds HTTP/2 with prior knowledge (h2c): hyper's
//! automatic builder answers h2c to anyone once upgrades are on (its
//! `http1_only` does not apply to them), which widens what the public port
//! exposes for no gain to a browser or an app.
//!
//! Shutdown: the loop stops accepting when the node's token is cancelled,
//! and every connection still speaking HTTP finishes its request and closes
//! (WebSockets are closed by their sessions).

pub mod io;
pub mod limits;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use futures::future::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, warn};

use crate::config::ServerConfig;
use io::TrackedStream;
use limits::{ConnectionLimits, Refusal, Verdict};

/// How long a refused connection may take to send its request head: a
/// health probe sends it at once, and connections that idle in the refusal
/// lane must not keep probes out of it.
pub const REFUSAL_HEAD_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a refused connection may take in all, its answer included.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);
/// First and longest pause after a failed `accept`.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Idle checks per `http_idle_timeout_ms`: a quiet connection closes within 1¼ of it.
const IDLE_CHECKS: u32 = 4;

/// Serves the node's listener.
pub struct Server {
    limits: Arc<ConnectionLimits>,
    routes: axum::Router,
    http: Http,
    refusal_http: auto::Builder<TokioExecutor>,
    http_idle_timeout: Duration,
}

impl Server {
    pub fn new(config: &ServerConfig, limits: Arc<ConnectionLimits>, routes: axum::Router) -> Self {
        let header_read_timeout = Duration::from_millis(config.header_read_timeout_ms);
        let http = if config.http2_cleartext {
            let mut http = auto::Builder::new(TokioExecutor::new());
            http.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(config.max_header_bytes);
            http.http2().timer(TokioTimer::new()).max_header_list_size(config.max_header_bytes as u32);
            Http::WithH2c(http)
        } else {
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(config.max_header_bytes);
            Http::Http1(http)
        };
        // HTTP/1 only: its head timeout runs from the first byte awaited.
        let mut refusal_http = auto::Builder::new(TokioExecutor::new()).http1_only();
        refusal_http
            .http1()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(REFUSAL_HEAD_TIMEOUT.min(header_read_timeout))
            .max_buf_size(config.max_header_bytes);
        Self {
            limits,
            routes,
            http,
            refusal_http,
            http_idle_timeout: Duration::from_millis(config.http_idle_timeout_ms),
        }
    }

    /// Accepts until `stop` is cancelled; each connection's task goes into
    /// `connections` (the caller waits for them) and ends on `stop` too.
    pub async fn run(self, listener: TcpListener, stop: CancellationToken, connections: TaskTracker) {
        let server = Arc::new(self);
        let mut backoff = Duration::ZERO;
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::ZERO;
                    accepted
                }
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // EMFILE / ENFILE / ENOBUFS: the connection waits in the backlog; try again later.
                    backoff = (backoff * 2).clamp(ACCEPT_BACKOFF.0, ACCEPT_BACKOFF.1);
                    metrics::counter!(crate::metric::ACCEPT_ERRORS).increment(1);
                    warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed; pausing");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => continue,
                    }
                }
            };
            // Small frames (acks, deltas) must leave at once, not wait for Nagle.
            if let Err(error) = tcp.set_nodelay(true) {
                debug!(%error, "cannot set TCP_NODELAY");
            }
            match server.limits.admit(peer.ip()) {
                Verdict::Admitted(slot) => {
                    connections.spawn(server.clone().serve(tcp, peer, Some(slot), stop.clone()));
                }
                Verdict::Refused(refusal, lane) => {
                    debug!(%peer, reason = refusal.reason(), "connection refused");
                    let server = server.clone();
                    connections.spawn(async move {
                        let _lane = lane;
                        server.refuse(tcp, peer, refusal).await;
                    });
                }
                Verdict::Dropped(refusal) => debug!(%peer, reason = refusal.reason(), "connection closed unanswered"),
            }
        }
    }

    /// Serves one admitted connection until it closes, goes idle before an
    /// upgrade, or (after `stop`) finishes its request.
    async fn serve(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        slot: Option<limits::Slot>,
        stop: CancellationToken,
    ) {
        let (stream, active) = TrackedStream::new(tcp, slot);
        let routes = self.routes.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            routes.clone().call(request)
        });
        let io = TokioIo::new(stream);
        let idle_timeout = self.http_idle_timeout;
        match &self.http {
            Http::Http1(http) => {
                let connection = http.serve_connection(io, service).with_upgrades();
                drive(connection, |c| c.graceful_shutdown(), peer, &active, idle_timeout, &stop).await
            }
            Http::WithH2c(http) => {
                let connection = http.serve_connection_with_upgrades(io, service);
                drive(connection, |c| c.graceful_shutdown(), peer, &active, idle_timeout, &stop).await
            }
        }
    }

    /// Answers a refused connection's request (health probes as usual,
    /// anything else with the refusal), then closes it: its head must come
    /// within [`REFUSAL_HEAD_TIMEOUT`], all within [`REFUSAL_DEADLINE`].
    async fn refuse(&self, tcp: TcpStream, peer: SocketAddr, refusal: Refusal) {
        let routes = self.routes.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            if matches!(request.uri().path(), "/healthz" | "/readyz") {
                request.extensions_mut().insert(ConnectInfo(peer));
                Either::Left(routes.clone().call(request))
            } else {
                Either::Right(std::future::ready(Ok(axum::response::IntoResponse::into_response(refusal))))
            }
        });
        let connection = self.refusal_http.serve_connection(TokioIo::new(tcp), service);
        let _ = tokio::time::timeout(REFUSAL_DEADLINE, connection).await;
    }
}

/// Runs one connection until it closes, goes idle before an upgrade (no
/// byte for `http_idle_timeout`, as `active` tells), or (after `stop`)
/// finishes its request.
async fn drive<C, E>(
    connection: C,
    graceful_shutdown: impl Fn(std::pin::Pin<&mut C>),
    peer: SocketAddr,
    active: &std::sync::atomic::AtomicBool,
    http_idle_timeout: Duration,
    stop: &CancellationToken,
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connection = std::pin::pin!(connection);
    let check_every = http_idle_timeout / IDLE_CHECKS;
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + check_every, check_every);
    let (mut quiet_checks, mut draining) = (0, false);
    loop {
        tokio::select! {
            // Ends after the response to an upgrade: the stream (and its slot) then belongs to the session.
            result = connection.as_mut() => {
                let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = result.map_err(Into::into);
                if let Err(error) = result {
                    let timed_out = error.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
                    if timed_out {
                        metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "header_timeout").increment(1);
                    }
                    debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !draining => {
                draining = true;
                graceful_shutdown(connection.as_mut());
            }
            _ = checks.tick() => {
                if active.swap(false, Ordering::Relaxed) {
                    quiet_checks = 0;
                } else {
                    quiet_checks += 1;
                    if quiet_checks >= IDLE_CHECKS {
                        metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "idle_timeout").increment(1);
                        debug!(%peer, "connection idle; closing");
                        return;
                    }
                }
            }
        }
    }
}

/// How admitted connections are served.
enum Http {
    /// HTTP/1.1 only (the default).
    Http1(http1::Builder),
    /// HTTP/1.1, or HTTP/2 when the client starts with its preface.
    WithH2c(auto::Builder<TokioExecutor>),
}

/// Errors of one connection that went away before `accept` returned it.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
