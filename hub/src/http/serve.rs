//! The accept loop of both listeners: one task per connection, speaking
//! HTTP/1.1 with WebSocket upgrades, and cleartext HTTP/2 with prior
//! knowledge (h2c) only when `http2_cleartext` says so. hyper's automatic
//! builder (what `axum::serve` uses) answers h2c to anyone, whatever it is
//! told, once upgrades are on; that widens what the public port exposes
//! for no gain to a browser or an app, so by default connections go to
//! hyper's HTTP/1 server alone.

use std::future::Future;
use std::pin::{Pin, pin};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::Config;

/// How connections are served.
#[derive(Clone, Debug)]
pub enum ConnectionBuilder {
    /// HTTP/1.1 only (the default).
    Http1(http1::Builder),
    /// HTTP/1.1, or HTTP/2 when the client starts with its preface (`http2_cleartext`).
    WithH2c(auto::Builder<TokioExecutor>),
}

/// The builder `config` asks for.
pub fn connection_builder(config: &Config) -> ConnectionBuilder {
    if config.http2_cleartext {
        ConnectionBuilder::WithH2c(auto::Builder::new(TokioExecutor::new()))
    } else {
        ConnectionBuilder::Http1(http1::Builder::new())
    }
}

/// Serves `routes` on `listener` until `stop` resolves; then stops
/// accepting, lets each connection finish its request in flight (upgraded
/// WebSockets are the sessions' business, not this loop's) and returns.
pub async fn serve(
    listener: TcpListener,
    routes: axum::Router,
    builder: ConnectionBuilder,
    stop: impl Future<Output = ()>,
) {
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    let mut stop = pin!(stop);
    loop {
        let tcp = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // As `axum::serve` does: most likely out of file
                    // descriptors; give the running sessions a moment.
                    warn!(%error, "accept error");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Small frames (acks, deltas) must leave at once, not wait for Nagle.
        if let Err(error) = tcp.set_nodelay(true) {
            warn!(%error, "cannot set TCP_NODELAY");
        }
        let io = TokioIo::new(tcp);
        // A `Router` clone is one reference count: its route table is shared.
        let service = TowerToHyperService::new(routes.clone());
        let closing = closing.clone();
        match &builder {
            ConnectionBuilder::Http1(http1) => {
                let connection = http1.serve_connection(io, service).with_upgrades();
                connections.spawn(drive(connection, closing, |c| c.graceful_shutdown()));
            }
            ConnectionBuilder::WithH2c(auto) => {
                let connection = auto.serve_connection_with_upgrades(io, service).into_owned();
                connections.spawn(drive(connection, closing, |c| c.graceful_shutdown()));
            }
        }
    }
    drop(listener);
    closing.cancel();
    connections.close();
    connections.wait().await;
}

/// Runs one connection to its end; once `closing`, it finishes the request
/// in flight and closes.
async fn drive<C: Future>(connection: C, closing: CancellationToken, graceful_shutdown: impl FnOnce(Pin<&mut C>)) {
    let mut connection = pin!(connection);
    tokio::select! {
        // Errors are the peer's (reset, bad request, h2c refused): nothing to do.
        _ = connection.as_mut() => return,
        () = closing.cancelled() => graceful_shutdown(connection.as_mut()),
    }
    let _ = connection.await;
}

fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
