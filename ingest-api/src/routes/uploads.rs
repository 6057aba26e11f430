//! `GET /_api/v1/uploads/{id}`: where an upload is in the pipeline, for
//! holders of push permission on its cache. Anyone else gets the answer of
//! a missing upload, whether it exists or not.

use axum::extract::State;
use axum::Json;

use common::api::UploadStatus;
use common::auth::Permission;
use common::db::{ChunkProgress, UploadId};

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
    let upload = state
        .database
        .upload(&id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| caller.hidden_upload())?;
    let cache = state
        .database
        .cache_by_id(upload.cache_id)
        .await
        .map_err(ApiError::internal)?
        .filter(|cache| caller.can(&cache.name, Permission::Push))
        .ok_or_else(|| caller.hidden_upload())?;
    let progress = match upload.nar_id {
        Some(nar_id) => state
            .database
            .chunk_progress(nar_id)
            .await
            .map_err(ApiError::internal)?,
        None => ChunkProgress::default(),
    };
    Ok(Json(UploadStatus {
        id: upload.id.to_string(),
        cache: cache.name.to_string(),
        store_path: upload.metadata.store_path,
        phase: upload.phase.as_str().to_owned(),
        error: upload.error,
        nar_size: upload.nar_size,
        chunks_total: progress.total,
        chunks_stored: progress.stored,
        created_at: upload.created_at.unix_millis(),
        updated_at: upload.updated_at.unix_millis(),
    }))
}
