//! `GET /demo/token?tenant=&user=&role=&name=`: a short-lived token for the
//! demo pages (the widget, and the agent console with `role=agent` and the
//! agent's display `name`), minted by this process's demo issuer ([`crate::auth::demo`]).
//! The route exists only in demo mode, which believes any tenant and user a
//! client names anyway: the token adds no trust, it lets the demo speak the
//! production protocol (token at the upgrade, `refresh`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::AppState;
use crate::auth::Role;
use crate::auth::identity::{MAX_NAME_CHARS, is_display_name};
use crate::ids::{TenantId, UserId};

#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    tenant: Option<String>,
    user: Option<String>,
    role: Option<String>,
    name: Option<String>,
}

pub async fn demo_token(
    State(app): State<Arc<AppState>>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(issuer) = app.auth.demo_issuer() else {
        return ApiError::not_found().into_response();
    };
    let Ok(Query(query)) = query else {
        return ApiError::bad_request("invalid_query", "a query parameter is given more than once").into_response();
    };
    let tenant = match TenantId::parse(query.tenant.as_deref().unwrap_or("")) {
        Ok(tenant) => tenant,
        Err(e) => return ApiError::bad_request("invalid_tenant", format!("`tenant` {e}")).into_response(),
    };
    let user = match UserId::parse(query.user.as_deref().unwrap_or("")) {
        Ok(user) => user,
        Err(e) => return ApiError::bad_request("invalid_user", format!("`user` {e}")).into_response(),
    };
    let Some(role) = Role::parse(query.role.as_deref().unwrap_or("customer")) else {
        return ApiError::bad_request("invalid_role", "`role` must be customer or agent").into_response();
    };
    let name = query.name.as_deref();
    if name.is_some_and(|name| !is_display_name(name)) {
        let message = format!("`name` must be 1 to {MAX_NAME_CHARS} characters, not blank, without control characters");
        return ApiError::bad_request("invalid_name", message).into_response();
    }
    let (token, exp) = issuer.mint(&tenant, &user, role, name, app.auth.current().config.demo_token_ttl_secs);
    let mut body =
        json!({ "token": token, "exp": exp, "tenant": tenant.as_str(), "user": user.as_str(), "role": role.as_str() });
    if let Some(name) = name {
        body["name"] = json!(name);
    }
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}
