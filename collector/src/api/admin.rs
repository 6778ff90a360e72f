//! Orgs and keys (admin role only).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, AppState, ErrorBody};
use crate::auth::{Caller, KeyRecord, NewKey, Role, ALL_ORGS};
use crate::db::OrgRecord;

/// A key to create.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// The org (`*` for admin or ingest keys spanning every org).
    pub org: String,
    /// `admin`, `reader` or `ingest`.
    pub role: Role,
    /// A label.
    #[serde(default)]
    pub name: Option<String>,
}

/// A created key: the only time its secret is shown.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CreatedKey {
    /// Public id.
    pub id: String,
    /// The secret, to send as `Authorization: Bearer <key>`. Not retrievable later.
    pub key: String,
    /// Org.
    pub org: String,
    /// Role.
    pub role: Role,
}

/// Optional org filter.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct OrgFilter {
    /// Only this org's keys.
    pub org: Option<String>,
}

fn valid_id(field: &str, id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= tollgate_core::event::MAX_ID_LEN
        && !id.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "`{field}` must be 1–{} printable characters",
            tollgate_core::event::MAX_ID_LEN
        )))
    }
}

/// Creates and stores a key (shared by the API and the CLI).
pub async fn create_key_record(
    storage: &crate::db::Storage,
    org: &str,
    role: Role,
    name: Option<String>,
) -> Result<(KeyRecord, NewKey), ApiError> {
    valid_id("org", org)?;
    if org == ALL_ORGS && role == Role::Reader {
        return Err(ApiError::BadRequest(
            "a reader key belongs to one org, not `*`".into(),
        ));
    }
    let new = NewKey::generate();
    let record = KeyRecord {
        id: new.id.clone(),
        org: org.to_owned(),
        role: role.as_str().to_owned(),
        name,
        created_at: chrono::Utc::now().timestamp(),
        revoked_at: None,
    };
    storage.insert_key(&record, &new.hash).await?;
    Ok((record, new))
}

/// Lists orgs.
#[utoipa::path(get, path = "/v1/orgs", tag = "admin",
    responses((status = 200, body = [OrgRecord]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn list_orgs(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<OrgRecord>>, ApiError> {
    caller.require(&[Role::Admin])?;
    Ok(Json(state.storage.list_orgs().await?))
}

/// Creates an org.
#[utoipa::path(post, path = "/v1/orgs", tag = "admin", request_body = OrgRecord,
    responses((status = 201, body = OrgRecord), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn create_org(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<OrgRecord>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<OrgRecord>), ApiError> {
    caller.require(&[Role::Admin])?;
    let Json(mut org) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    valid_id("id", &org.id)?;
    if org.id == ALL_ORGS {
        return Err(ApiError::BadRequest("`*` is reserved".into()));
    }
    if let (Some(plan), Some(policy)) = (&org.plan, &state.policy) {
        if !policy.policy.has_plan(plan) {
            return Err(ApiError::BadRequest(format!(
                "no plan named '{plan}' in the policy"
            )));
        }
    }
    org.created_at = chrono::Utc::now().timestamp();
    state.storage.create_org(&org).await?;
    Ok((StatusCode::CREATED, Json(org)))
}

/// Lists keys (never their secrets).
#[utoipa::path(get, path = "/v1/keys", tag = "admin", params(OrgFilter),
    responses((status = 200, body = [KeyRecord]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    Query(filter): Query<OrgFilter>,
) -> Result<Json<Vec<KeyRecord>>, ApiError> {
    caller.require(&[Role::Admin])?;
    Ok(Json(state.storage.list_keys(filter.org.as_deref()).await?))
}

/// Creates a key; the response is the only time the secret is shown.
#[utoipa::path(post, path = "/v1/keys", tag = "admin", request_body = CreateKey,
    responses((status = 201, body = CreatedKey), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateKey>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    caller.require(&[Role::Admin])?;
    let Json(req) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (record, new) = create_key_record(&state.storage, &req.org, req.role, req.name).await?;
    tracing::info!(key = %record.id, org = %record.org, role = %record.role, by = %caller.key_id, "key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: record.id,
            key: new.reveal().to_owned(),
            org: record.org,
            role: req.role,
        }),
    ))
}

/// Revokes a key at once.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "admin",
    params(("id" = String, Path, description = "The key's public id")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Admin])?;
    if state
        .storage
        .revoke_key(&id, chrono::Utc::now().timestamp())
        .await?
    {
        tracing::info!(key = %id, by = %caller.key_id, "key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}
