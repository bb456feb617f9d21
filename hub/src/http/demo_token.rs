//! `GET /demo/token?tenant=&user=&role=`: a short-lived token for the demo
//! page, minted by this process's demo issuer ([`crate::auth::demo`]).
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
use crate::ids::{TenantId, UserId};

#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    tenant: Option<String>,
    user: Option<String>,
    role: Option<String>,
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
    let (token, exp) = issuer.mint(&tenant, &user, role, app.auth.current().config.demo_token_ttl_secs);
    let body =
        json!({ "token": token, "exp": exp, "tenant": tenant.as_str(), "user": user.as_str(), "role": role.as_str() });
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}
