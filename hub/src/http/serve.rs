//! The accept loop of both listeners: one task per connection, speaking
//! HTTP/1.1 with WebSocket upgrades, and cleartext HTTP/2 with prior
//! knowledge (h2c) only when `http2_cleartext` says so. hyper's automatic
//! builder (what `axum::serve` uses) answers h2c to anyone by default, which
//! widens what the public port exposes for no gain to a browser or an app.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::warn;

use crate::Config;

/// How connections are served: HTTP/1.1 only, or HTTP/1.1 and h2c.
pub fn connection_builder(config: &Config) -> Builder<TokioExecutor> {
    let builder = Builder::new(TokioExecutor::new());
    if config.http2_cleartext { builder } else { builder.http1_only() }
}

/// Serves `routes` on `listener` until `stop` resolves; then stops
/// accepting, lets each connection finish its request in flight (upgraded
/// WebSockets are the sessions' business, not this loop's) and returns.
pub async fn serve(
    listener: TcpListener,
    routes: axum::Router,
    builder: Builder<TokioExecutor>,
    stop: impl Future<Output = ()>,
) {
    let connections = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
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
        // A `Router` clone is one reference count: its route table is shared.
        let service = TowerToHyperService::new(routes.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service).into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            // Errors are the peer's (reset, bad request, h2c refused): nothing to do.
            let _ = connection.await;
        });
    }
    drop(listener);
    connections.shutdown().await;
}

fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
