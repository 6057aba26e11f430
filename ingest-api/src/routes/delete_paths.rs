//! `POST /_api/v1/delete-paths`: removes store paths from a cache for
//! holders of its delete permission. The paths answer 404 at once (on
//! this replica's read cache too; other replicas' expire within
//! `READ_CACHE_TIME_TO_LIVE`); their NARs and chunks are freed by the next
//! GC run once no other cache or upload holds them.

use std::collections::HashSet;

use axum::extract::State;
use axum::Json;

use larder_api::cache_name::CacheName;
use larder_api::v1::{DeletePathsRequest, DeletePathsResponse};
use larder_db::{AuditAction, Cache};
use larder_nix::StorePathHash;
use larder_token::Permission;

use crate::access::Caller;
use crate::audit;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;

/// Paths one request may name; a client deletes more in several requests.
pub const MAX_PATHS_PER_REQUEST: usize = 10_000;

/// Deletes these paths from `cache` for `caller`, forgets what the read
/// path cached and records each deletion, its detail made by `detail`;
/// returns the paths that were there.
pub(super) async fn delete_recorded(
    state: &AppState,
    caller: &Caller,
    cache: &Cache,
    hashes: &[StorePathHash],
    detail: impl Fn(&StorePathHash) -> serde_json::Value,
) -> Result<HashSet<StorePathHash>, ApiError> {
    let deleted: HashSet<StorePathHash> = state
        .database
        .delete_objects(cache.id, hashes)
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .collect();
    state.forget_cached_reads();
    let details = deleted.iter().map(detail);
    audit::record(state, caller, Some(cache), AuditAction::Delete, details).await;
    Ok(deleted)
}

pub async fn delete_paths(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<DeletePathsRequest>,
) -> Result<Json<DeletePathsResponse>, ApiError> {
    let name: CacheName = request.cache.parse().map_err(ApiError::bad_request)?;
    if request.store_path_hashes.len() > MAX_PATHS_PER_REQUEST {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_PATHS_PER_REQUEST} paths per request, not {}",
            request.store_path_hashes.len()
        )));
    }
    let hashes = request
        .store_path_hashes
        .iter()
        .map(|hash| StorePathHash::parse(hash).map_err(ApiError::bad_request))
        .collect::<Result<Vec<_>, _>>()?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Delete)
        .await?;
    let deleted = delete_recorded(
        &state,
        &caller,
        &cache,
        &hashes,
        |hash| serde_json::json!({ "store_path_hash": hash.to_string() }),
    )
    .await?;
    tracing::info!(
        cache = %name,
        by = caller.subject(),
        deleted = deleted.len(),
        "paths deleted"
    );
    let mut seen = HashSet::new();
    let (gone, absent): (Vec<StorePathHash>, Vec<StorePathHash>) = hashes
        .into_iter()
        .filter(|hash| seen.insert(*hash))
        .partition(|hash| deleted.contains(hash));
    Ok(Json(DeletePathsResponse {
        deleted: gone.iter().map(ToString::to_string).collect(),
        not_found: absent.iter().map(ToString::to_string).collect(),
    }))
}
