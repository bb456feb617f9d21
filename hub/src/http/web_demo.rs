//! The web demo (chat widget, agent console and JS client), embedded in
//! the binary so one file is the whole product.
//!
//! Every asset goes out with headers that keep the page to itself: a
//! Content-Security-Policy allowing only its own scripts, styles and
//! socket (no inline script, no other origin), `nosniff`, and no framing
//! by other sites (`frame-ancestors 'none'`, and `X-Frame-Options: DENY`
//! for browsers that predate it).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

use crate::AppState;

/// The demo's policy: its own files only; `connect-src 'self'` covers the
/// same-origin `ws:`/`wss:` socket; `data:` images for the empty favicon.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

macro_rules! asset {
    ($file:literal, $mime:literal) => {
        get(|| async {
            (
                [
                    (header::CONTENT_TYPE, $mime),
                    (header::CACHE_CONTROL, "no-cache"),
                    (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                    (header::X_FRAME_OPTIONS, "DENY"),
                    (header::REFERRER_POLICY, "no-referrer"),
                ],
                include_str!(concat!("../../../web-demo/", $file)),
            )
                .into_response()
        })
    };
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", asset!("index.html", "text/html; charset=utf-8"))
        .route("/client.js", asset!("client.js", "text/javascript; charset=utf-8"))
        .route("/chat.js", asset!("chat.js", "text/javascript; charset=utf-8"))
        .route("/console", asset!("console.html", "text/html; charset=utf-8"))
        .route("/console.js", asset!("console.js", "text/javascript; charset=utf-8"))
        .route("/style.css", asset!("style.css", "text/css; charset=utf-8"))
}
