//! `GET /_api/v1/uploads/{id}`: where an upload is in the pipeline, for
//! holders of push permission on its cache. Anyone else gets the answer of
//! a missing upload, whether it exists or not.
//!
//! The status says only what the upload itself determines: its phase, its
//! own size and its times. Chunk counts would describe the stored NAR, and
//! chunks other tenants stored count as stored at once, so they are not
//! shown (see `larder_api::v1::UploadStatus`).

use axum::extract::State;
use axum::Json;

use larder_api::v1::UploadStatus;
use larder_db::UploadId;
use larder_token::Permission;

use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<UploadStatus>, ApiError> {
    let id: UploadId = id.parse().map_err(ApiError::bad_request)?;
    // An anonymous caller can follow no upload: answered before anything
    // is looked up, so an existing upload and a missing one take the same
    // path. A token's answer needs the upload's cache, fetched in the same
    // query as the upload itself.
    if caller.claims().is_none() {
        return Err(caller.hidden_upload());
    }
    let (upload, cache) = state
        .database
        .upload_with_cache_name(&id)
        .await
        .map_err(ApiError::internal)?
        .filter(|(_, cache)| caller.can(cache, Permission::Push))
        .ok_or_else(|| caller.hidden_upload())?;
    Ok(Json(UploadStatus {
        id: upload.id.to_string(),
        cache: cache.to_string(),
        store_path: upload.metadata.store_path,
        phase: upload.phase.as_str().to_owned(),
        error: upload.error,
        nar_size: upload.nar_size,
        created_at: upload.created_at.unix_millis(),
        updated_at: upload.updated_at.unix_millis(),
    }))
}
