//! The pin API (issue #18): `POST`/`GET /_api/v1/pins/{cache}` and
//! `DELETE /_api/v1/pins/{cache}/{name}`.
//!
//! Pinning and unpinning need push permission on the cache: pinning is
//! what a CI job does after pushing a release (`larder push --pin`), and
//! neither removes anything a reader sees (unpinning only lets GC decide
//! again). Listing needs any permission on the cache (`tenant_cache`), as
//! its statistics do: a public cache's readers do not learn its releases
//! this way. What a pin keeps, and why GC never misses one, is documented
//! in `larder_db`'s `pins` module.

use std::time::SystemTime;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use larder_api::pin::PinName;
use larder_api::time::unix_seconds;
use larder_api::v1::{CreatePinRequest, PinInfo, PinList, PinRevisionInfo};
use larder_db::{AuditAction, Pin, Timestamp};
use larder_nix::StorePathHash;
use larder_token::Permission;

use super::parse_cache_name;
use crate::access::Caller;
use crate::audit;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};
use crate::state::AppState;

/// `POST /_api/v1/pins/{cache}`: pins a path the cache holds (404
/// `NoSuchPath` otherwise) and answers the pin as it now is.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
    ApiJson(request): ApiJson<CreatePinRequest>,
) -> Result<Json<PinInfo>, ApiError> {
    let cache_name = parse_cache_name(&cache)?;
    let name: PinName = request.name.parse().map_err(ApiError::bad_request)?;
    let hash = StorePathHash::parse(&request.store_path_hash).map_err(ApiError::bad_request)?;
    let cache = state
        .cache_with_permission(&caller, &cache_name, Permission::Push)
        .await?;
    let pin = state
        .database
        .pin_path(
            cache.id,
            &name,
            &hash,
            request.keep,
            caller.subject(),
            SystemTime::now().into(),
        )
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchPath)?;
    let newest = pin
        .revisions
        .first()
        .map_or(0, |revision| revision.revision);
    tracing::info!(
        cache = %cache_name,
        pin = %name,
        revision = newest,
        path = %hash,
        keep = %pin.keep,
        by = caller.subject(),
        "path pinned"
    );
    let info = pin_info(&pin);
    let detail = serde_json::json!({
        "pin": name.to_string(),
        "revision": newest,
        "store_path": info.revisions.first().map(|revision| revision.store_path.clone()),
        "keep": info.keep,
    });
    audit::record(
        &state,
        &caller,
        Some(&cache),
        AuditAction::PinCreate,
        [detail],
    )
    .await;
    Ok(Json(info))
}

/// `GET /_api/v1/pins/{cache}`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
) -> Result<Json<PinList>, ApiError> {
    let name = parse_cache_name(&cache)?;
    let cache = state.tenant_cache(&caller, &name).await?;
    let pins = state
        .database
        .pins(cache.id)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(PinList {
        pins: pins.iter().map(pin_info).collect(),
    }))
}

/// `DELETE /_api/v1/pins/{cache}/{name}`: the pin and all its revisions;
/// what they kept is GC's again from its next run.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, name)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let cache_name = parse_cache_name(&cache)?;
    let name: PinName = name.parse().map_err(ApiError::bad_request)?;
    let cache = state
        .cache_with_permission(&caller, &cache_name, Permission::Push)
        .await?;
    if !state
        .database
        .delete_pin(cache.id, &name)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::NoSuchPin);
    }
    tracing::info!(cache = %cache_name, pin = %name, by = caller.subject(), "pin deleted");
    let detail = serde_json::json!({ "pin": name.to_string() });
    audit::record(
        &state,
        &caller,
        Some(&cache),
        AuditAction::PinDelete,
        [detail],
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn seconds(at: Timestamp) -> u64 {
    unix_seconds(at.into())
}

fn pin_info(pin: &Pin) -> PinInfo {
    PinInfo {
        name: pin.name.to_string(),
        keep: pin.keep,
        created_at: seconds(pin.created_at),
        revisions: pin
            .revisions
            .iter()
            .map(|revision| PinRevisionInfo {
                revision: revision.revision,
                store_path: revision.store_path.clone(),
                created_at: seconds(revision.created_at),
                created_by: revision.created_by.clone(),
                present: revision.present,
            })
            .collect(),
    }
}
