//! `GET /ws`: checks who is connecting, then upgrades to a session.
//!
//! Everything that can be refused before the upgrade is refused with an
//! HTTP 4xx and a JSON body: a missing, invalid or expired token (401, see
//! [`crate::auth`]), missing or malformed ids, a bad `after`, a
//! foreign `Origin` (403: one no tenant allows before the token is read,
//! one the tenant does not allow after), `timing=1` where it is not
//! allowed, a node that is shutting down, a tenant at its connection cap
//! (429, see [`crate::tenant`]), a client address over its limits (for
//! upgrades through a trusted proxy; direct connections are limited when
//! accepted, see [`crate::server`]). Every message is the hub's own, never a library's text.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use serde::Deserialize;

use super::ApiError;
use crate::AppState;
use crate::auth::{self, AuthMode, Identity, Role};
use crate::ids::{ConversationId, Party, TenantId, UserId};
use crate::server::limits::{AddressGuard, Refusal};
use crate::session::{self, SessionParams};
use crate::tenant::{AtConnectionCap, CONNECTION_RETRY_AFTER_SECS, ConnectionLease};

/// Bytes the socket library gathers before writing, within one flush.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Read buffer per socket, and the most one read takes: client frames are
/// small (a longer one takes several reads). tungstenite zero-fills this
/// much before every read, and keeps it for the socket's life.
const READ_BUFFER_BYTES: usize = 1024;

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    tenant: Option<String>,
    user: Option<String>,
    conversation: Option<String>,
    after: Option<String>,
    epoch: Option<String>,
    timing: Option<String>,
    /// A token, for browsers (which cannot set `Authorization` on a WebSocket).
    token: Option<String>,
}

pub async fn upgrade(
    State(app): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(peer))| peer);
    match prepare(&app, peer, &headers, query, upgrade).await {
        Ok((upgrade, params, address, lease)) => {
            let ws = &app.config.websocket;
            upgrade
                // A small read buffer: idle sockets are the common case and the
                // library's 128 KiB default would stay resident per socket.
                .read_buffer_size(READ_BUFFER_BYTES)
                .max_message_size(ws.max_frame_bytes)
                .max_frame_size(ws.max_frame_bytes)
                // Our bounded queue is the real buffer: the library's only
                // coalesces one burst of small frames until the writer flushes.
                // Its cap stays the default (none): the sink writes out what it
                // holds past this size before it takes another frame, so it
                // holds one frame more at most, and a cap would refuse every
                // frame larger than it (a long reply, a replay of it, a full
                // agents' list) on every try, closing the socket each time.
                .write_buffer_size(WRITE_BUFFER_BYTES)
                .on_upgrade(move |socket| {
                    let agent = params.identity.as_ref().is_some_and(|identity| identity.role == Role::Agent);
                    // The session gets a task of its own, sized for its kind:
                    // axum's upgrade task keeps room for its own set-up and for
                    // this callback as long as the future returned here runs,
                    // which would be the socket's whole life. Tracked, so that
                    // shutdown waits for the session's own end (detach, the
                    // close handshake), and the forwarded client's place under
                    // its address's cap goes with it.
                    let tracker = app.tracker.clone();
                    let release = move |()| drop((address, lease));
                    match agent {
                        true => drop(tracker.spawn(crate::agent::run(socket, params, app).map(release))),
                        false => drop(tracker.spawn(session::run(socket, params, app).map(release))),
                    }
                    std::future::ready(())
                })
        }
        Err(refused) => refused.into_response(),
    }
}

async fn prepare(
    app: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<(WebSocketUpgrade, SessionParams, Option<AddressGuard>, Option<ConnectionLease>), Refused> {
    let (upgrade, params) = check(app, headers, query, upgrade).await?;
    // The tenant is known now (from the token in jwt mode): its own origins, then its cap.
    let limits = app.tenants.limits(&params.party.tenant);
    check_origin(headers, &limits.allowed_origins)?;
    let lease = app.tenants.admit_connection(&params.party.tenant, &limits).await?;
    // Through a trusted proxy: the per-address limits apply to the client it forwards.
    let limits = &app.connections;
    let address = match peer.filter(|peer| limits.is_trusted_proxy(&peer.ip())) {
        Some(_) => match limits.forwarded_client(headers) {
            Some(client) => limits.admit_forwarded(client)?,
            None => None,
        },
        None => None,
    };
    Ok((upgrade, params, address, lease))
}

/// Why an upgrade request was refused.
enum Refused {
    Invalid(ApiError),
    Limited(Refusal),
    /// The tenant has all the sockets its `max_connections` allows.
    TenantFull,
    /// No acceptable token: 401 (503 while the tenant's keys cannot be fetched).
    Unauthenticated {
        code: &'static str,
        message: String,
    },
}

impl From<auth::Refusal> for Refused {
    fn from(refusal: auth::Refusal) -> Self {
        Self::Unauthenticated { code: refusal.code(), message: refusal.to_string() }
    }
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Self::Invalid(error)
    }
}

impl From<AtConnectionCap> for Refused {
    fn from(_: AtConnectionCap) -> Self {
        Self::TenantFull
    }
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Self::Limited(refusal)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Invalid(error) => error.into_response(),
            Self::Limited(refusal) => refusal.into_response(),
            Self::TenantFull => (
                [(header::RETRY_AFTER, CONNECTION_RETRY_AFTER_SECS.to_string())],
                ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    code: "tenant_connections",
                    message: "this service has all the connections it may hold; retry later".into(),
                },
            )
                .into_response(),
            Self::Unauthenticated { code: code @ "keys_unavailable", message } => {
                ([(header::RETRY_AFTER, "5")], ApiError { status: StatusCode::SERVICE_UNAVAILABLE, code, message })
                    .into_response()
            }
            // RFC 6750: a bearer-token challenge, without saying more than the body does.
            Self::Unauthenticated { code, message } => (
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"fengda\", error=\"invalid_token\"")],
                ApiError { status: StatusCode::UNAUTHORIZED, code, message },
            )
                .into_response(),
        }
    }
}

async fn check(
    app: &AppState,
    headers: &HeaderMap,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<(WebSocketUpgrade, SessionParams), Refused> {
    if !app.accepting.load(Ordering::Acquire) {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "shutting_down",
            message: "this node is shutting down; connect to another".into(),
        }
        .into());
    }
    let upgrade = upgrade.map_err(|rejection| ApiError {
        status: rejection.status(),
        code: "not_a_websocket_upgrade",
        message: upgrade_problem(&rejection).into(),
    })?;
    // Before the token is read: an origin no tenant allows gets no further.
    if let Err(refused) = check_origin(headers, &app.config.websocket.allowed_origins)
        && !app.tenants.any_origin_list(|list| check_origin(headers, list).is_ok())
    {
        return Err(refused.into());
    }
    // The only way the decoding of these optional strings can fail.
    let Query(query) =
        query.map_err(|_| ApiError::bad_request("invalid_query", "a query parameter is given more than once"))?;
    let (tenant, user, identity) = authenticate(app, headers, &query).await?;
    // An agent's socket is not bound to a conversation: it watches them.
    let given = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.is_empty());
    if identity.as_ref().is_some_and(|identity| identity.role == Role::Agent)
        && (given(&query.conversation) || given(&query.after) || given(&query.epoch))
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "an agent's socket takes no `conversation`, `after` or `epoch`; send `watch`",
        )
        .into());
    }
    let conversation = match query.conversation.as_deref().filter(|c| !c.is_empty()) {
        Some(raw) => Some(
            ConversationId::parse(raw)
                .map_err(|e| ApiError::bad_request("invalid_conversation", format!("`conversation` {e}")))?,
        ),
        None => None,
    };
    let after = match query.after.as_deref().filter(|a| !a.is_empty()) {
        Some(raw) => Some(
            raw.parse::<u64>()
                .map_err(|_| ApiError::bad_request("invalid_after", "`after` must be a non-negative integer seq"))?,
        ),
        None => None,
    };
    let epoch = query.epoch.filter(|e| !e.is_empty() && e.len() <= 64);
    let timing = matches!(query.timing.as_deref(), Some("1" | "true"));
    if timing && !app.config.websocket.allow_timing {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: "timing_not_allowed",
            message: "`timing` is not enabled on this hub".into(),
        }
        .into());
    }
    Ok((upgrade, SessionParams { party: Party { tenant, user }, conversation, after, epoch, timing, identity }))
}

/// Who is connecting: the verified token's tenant and user when a token
/// is presented (required in jwt mode), else (demo mode) the query's.
async fn authenticate(
    app: &AppState,
    headers: &HeaderMap,
    query: &WsQuery,
) -> Result<(TenantId, UserId, Option<Identity>), Refused> {
    let refuse = |code: &'static str, message: &str| {
        metrics::counter!(crate::metric::AUTH_REFUSALS, "code" => code).increment(1);
        Refused::Unauthenticated { code, message: message.into() }
    };
    let identity = match presented_token(headers, query.token.as_deref()).map_err(|(c, m)| refuse(c, m))? {
        Some(token) => app.auth.verify(token).await?,
        None if app.auth.mode() == AuthMode::Jwt => return Err(refuse("token_missing", "a token is required")),
        None => {
            let tenant = required_id(query.tenant.as_deref(), "tenant", TenantId::parse)?;
            let user = required_id(query.user.as_deref(), "user", UserId::parse)?;
            return Ok((tenant, user, None));
        }
    };
    // The tenant comes only from the token; a query naming another is refused, not ignored.
    let disagrees = |given: Option<&str>, verified: &str| given.is_some_and(|g| !g.is_empty() && g != verified);
    if disagrees(query.tenant.as_deref(), identity.tenant.as_str())
        || disagrees(query.user.as_deref(), identity.user.as_str())
    {
        return Err(refuse("identity_mismatch", "`tenant` and `user`, when given, must be the token's"));
    }
    Ok((identity.tenant.clone(), identity.user.clone(), Some(identity)))
}

/// The token from `Authorization: Bearer` or `?token=`; both present and
/// different is refused (`token_conflict`): which one a proxy or log saw
/// would be anyone's guess.
fn presented_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Option<&'a str>, (&'static str, &'static str)> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let bearer = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => return Err(("token_invalid", "a request may carry one `Authorization` header")),
        (Some(value), None) => {
            let value = value.to_str().map_err(|_| ("token_invalid", "`Authorization` is not text"))?;
            match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                    Some(token.trim())
                }
                _ => return Err(("token_invalid", "`Authorization` must be `Bearer <token>`")),
            }
        }
    };
    match (bearer, query.filter(|q| !q.is_empty())) {
        (Some(bearer), Some(query)) if bearer != query => {
            Err(("token_conflict", "`Authorization` and `token` carry different tokens"))
        }
        (bearer, query) => Ok(bearer.or(query)),
    }
}

fn required_id<T>(
    raw: Option<&str>,
    name: &'static str,
    parse: fn(&str) -> Result<T, crate::ids::IdError>,
) -> Result<T, ApiError> {
    let code = match name {
        "tenant" => "invalid_tenant",
        _ => "invalid_user",
    };
    let raw = raw.ok_or_else(|| ApiError::bad_request(code, format!("query parameter `{name}` is required")))?;
    parse(raw).map_err(|e| ApiError::bad_request(code, format!("`{name}` {e}")))
}

/// What is wrong with a request that is not a WebSocket handshake.
fn upgrade_problem(rejection: &WebSocketUpgradeRejection) -> &'static str {
    match rejection {
        WebSocketUpgradeRejection::MethodNotGet(_) => "a WebSocket handshake is a GET",
        WebSocketUpgradeRejection::InvalidConnectionHeader(_) => "`Connection` must include `upgrade`",
        WebSocketUpgradeRejection::InvalidUpgradeHeader(_) => "`Upgrade` must be `websocket`",
        WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_) => "`Sec-WebSocket-Version` must be 13",
        WebSocketUpgradeRejection::WebSocketKeyHeaderMissing(_) => "`Sec-WebSocket-Key` is missing",
        WebSocketUpgradeRejection::ConnectionNotUpgradable(_) => "this connection cannot be upgraded",
        _ => "not a WebSocket handshake",
    }
}

/// Browsers always send `Origin`; refusing foreign ones stops cross-site
/// WebSocket hijacking. Non-browser clients (no `Origin`) pass. With no
/// allow-list, an origin naming the request's own `Host` passes (the demo
/// page); with one, only its origins do: a `Host` chosen by the page's own
/// DNS (rebinding) proves nothing. A request with several `Origin`
/// headers, or one that is not text, is refused whatever the list says.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let refuse = |message: String| Err(ApiError { status: StatusCode::FORBIDDEN, code: "origin_not_allowed", message });
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let Some(origin) = origins.next() else {
        return Ok(());
    };
    if origins.next().is_some() {
        return refuse("a request may carry one `Origin` header".into());
    }
    let Ok(origin) = origin.to_str() else {
        return refuse("`Origin` is not a valid origin".into());
    };
    let allowed_here = match allowed {
        [] => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            let origin_host = origin.split_once("://").map(|(_, rest)| rest);
            origin_host.is_some_and(|origin_host| !host.is_empty() && origin_host.eq_ignore_ascii_case(host))
        }
        [star] if star == "*" => true,
        list => list.iter().any(|a| a.eq_ignore_ascii_case(origin)),
    };
    if allowed_here {
        return Ok(());
    }
    let shown: String = origin.chars().take(100).collect();
    refuse(format!("origin {shown} is not allowed to open sockets here"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: &str, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, origin.parse().unwrap());
        headers.insert(header::HOST, host.parse().unwrap());
        headers
    }

    #[test]
    fn origin_policy() {
        assert!(check_origin(&HeaderMap::new(), &[]).is_ok());
        assert!(check_origin(&headers("http://127.0.0.1:8080", "127.0.0.1:8080"), &[]).is_ok());
        assert!(check_origin(&headers("https://evil.example", "127.0.0.1:8080"), &[]).is_err());
        assert!(check_origin(&headers("null", "null"), &[]).is_err());
        let allowed = ["https://shop.example".to_string()];
        assert!(check_origin(&headers("https://shop.example", "hub.example"), &allowed).is_ok());
        assert!(check_origin(&headers("HTTPS://SHOP.example", "hub.example"), &allowed).is_ok());
        assert!(check_origin(&headers("https://evil.example", "hub.example"), &["*".into()]).is_ok());
        assert!(check_origin(&HeaderMap::new(), &allowed).is_ok(), "no Origin: not a browser");
    }

    #[test]
    fn an_allow_list_ignores_host_so_dns_rebinding_is_not_same_origin() {
        let allowed = ["https://shop.example".to_string()];
        let rebound = headers("http://rebind.example:8080", "rebind.example:8080");
        assert!(check_origin(&rebound, &[]).is_ok(), "without a list, Host decides");
        assert!(check_origin(&rebound, &allowed).is_err());
    }

    #[test]
    fn several_or_unreadable_origins_are_refused() {
        let mut two = headers("https://shop.example", "hub.example");
        two.append(header::ORIGIN, "https://shop.example".parse().unwrap());
        assert!(check_origin(&two, &["*".into()]).is_err());
        let mut opaque = HeaderMap::new();
        opaque.insert(header::ORIGIN, axum::http::HeaderValue::from_bytes(b"https://\xff.example").unwrap());
        assert!(check_origin(&opaque, &["*".into()]).is_err());
    }
}
