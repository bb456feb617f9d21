//! The web demo (chat widget and JS client), embedded in the binary so one
//! file is the whole product.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

use crate::AppState;

macro_rules! asset {
    ($file:literal, $mime:literal) => {
        get(|| async {
            (
                [(header::CONTENT_TYPE, $mime), (header::CACHE_CONTROL, "no-cache")],
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
        .route("/style.css", asset!("style.css", "text/css; charset=utf-8"))
}
