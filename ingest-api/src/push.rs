//! What both push protocols (Attic's `upload-path` and Nix's own PUTs)
//! share once a path's metadata is validated: recording an upload of a
//! spooled NAR, publishing its chunk job, and waiting until the path is
//! visible.
//!
//! A waiting push does not poll: it registers for its upload's wake-up
//! ([`larder_db::Database::watch_upload`]) before the chunk job is
//! published, and reads the row again when woken (by the pipeline in this
//! process, or through PostgreSQL from another) or, as a safety net, every
//! `[ingest] wait-recheck-interval`. The row is the truth.
//!
//! **A push is answered the same way whether or not another cache holds
//! the NAR.** Every push is read whole, verified and spooled, and every one
//! goes through the pipeline, whose chunker links a NAR that is already
//! stored instead of cutting it; the answer (`Uploaded`, the upload id, its
//! phase) carries nothing taken from stored data, no dedup fraction and no
//! stored size. What still differs is how soon a path is visible: a stored
//! NAR needs no compression (see ARCHITECTURE.md, "No cross-tenant
//! disclosure"). The one exception is [`link_without_proof`], for servers
//! that turned proof of possession off.

use std::time::Duration;

use axum::http::HeaderMap;
use tokio::time::Instant;
use tracing::Instrument;

use larder_api::upload_info::PathFields;
use larder_api::v1::{UploadPathResult, UploadPathResultKind, WAIT_HEADER};
use larder_db::{
    Cache, LinkedPath, NewUpload, ObjectMetadata, StagedFile, Timestamp, Upload, UploadId,
    UploadPhase, UploadWatch,
};
use larder_nix::{NarHash, StoreDir, StorePath, StorePathHash};
use larder_queue::{publish_job, ChunkJob};
use larder_service::metrics::{larder, PushStage};

use crate::access::Caller;
use crate::error::ApiError;
use crate::quota;
use crate::spool::{self, Spooled};
use crate::state::AppState;

/// A pushed path whose metadata has been validated against its cache.
#[derive(Debug, Clone)]
pub struct PushedPath {
    pub store_path_hash: StorePathHash,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub metadata: ObjectMetadata,
}

impl PushedPath {
    /// The path as it will be stored, `store_path` being in `store_dir`.
    pub fn new(store_path: &StorePath, store_dir: &StoreDir, fields: PathFields) -> Self {
        let base_names = |paths: &[StorePath]| paths.iter().map(StorePath::to_base_name).collect();
        PushedPath {
            store_path_hash: *store_path.hash(),
            nar_hash: fields.nar_hash,
            nar_size: fields.nar_size,
            metadata: ObjectMetadata {
                store_path: store_path.to_full_path(store_dir),
                references: base_names(&fields.references),
                deriver: fields.deriver.as_ref().map(StorePath::to_base_name),
                system: fields.system,
                sigs: fields.signatures.iter().map(ToString::to_string).collect(),
                ca: fields.ca,
            },
        }
    }
}

/// Rejects free text that would break a narinfo line.
pub fn check_text(field: &str, value: &str) -> Result<(), ApiError> {
    if !larder_api::upload_info::is_one_line_text(value) {
        return Err(ApiError::bad_request(format!(
            "{field} {:?} contains a control character or is too long",
            value.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// How long this request waits for its path to become visible: the
/// configured `wait-for-visible`, shortened by an `X-Larder-Wait: <seconds>`
/// header (`0`: answer once the upload is acknowledged).
pub fn requested_wait(state: &AppState, headers: &HeaderMap) -> Result<Duration, ApiError> {
    let configured = state.ingest.wait_for_visible.as_duration();
    let Some(value) = headers.get(WAIT_HEADER) else {
        return Ok(configured);
    };
    let seconds: u64 = value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!("{WAIT_HEADER} must be a number of seconds"))
        })?;
    Ok(configured.min(Duration::from_secs(seconds)))
}

/// Links `path` to the stored NAR of its hash in one transaction, if that
/// NAR is (still) valid, without reading the client's NAR: what a server
/// with `require-proof-of-possession = false` does, and what a narinfo PUT
/// again does for a path its cache already holds with that NAR (possession
/// was proven by the PUT that made it). Its answer has no upload id, so it
/// tells the pusher that the NAR was stored; a server without proof of
/// possession trusts its tenants with each other's data anyway (knowing a
/// NAR's hash is enough to link it).
pub async fn link_to_stored_nar(
    state: &AppState,
    cache: &Cache,
    caller: &Caller,
    path: &PushedPath,
) -> Result<Option<UploadPathResult>, ApiError> {
    let linked = LinkedPath {
        store_path_hash: path.store_path_hash,
        metadata: path.metadata.clone(),
        created_by: caller.actor(),
    };
    let Some((_, nar)) = state
        .database
        .link_valid_nar(cache.id, &path.nar_hash, &linked, Timestamp::now())
        .await
        .map_err(|error| quota::record_error(&cache.name, error))?
    else {
        return Ok(None);
    };
    // Every chunk of the NAR was needed and none was stored again.
    larder().chunks_deduplicated(u64::from(nar.n_chunks), nar.nar_size);
    tracing::info!(
        cache = %cache.name,
        store_path = %path.metadata.store_path,
        nar_hash = %path.nar_hash,
        "linked a pushed path to a stored NAR"
    );
    Ok(Some(UploadPathResult {
        kind: UploadPathResultKind::Uploaded,
        upload_id: None,
        phase: UploadPhase::Done.as_str().to_owned(),
    }))
}

/// Records the upload of a spooled NAR, publishes its chunk job and waits
/// up to `wait` for the path to become visible. The staged object is
/// deleted when the upload cannot be recorded.
pub async fn record_upload(
    state: &AppState,
    cache: &Cache,
    caller: &Caller,
    path: PushedPath,
    spooled: Spooled,
    wait: Duration,
) -> Result<UploadPathResult, ApiError> {
    let new = new_upload(
        cache,
        caller,
        path,
        spooled.key.as_str(),
        Some(spooled.crc32),
    );
    let upload = match state.database.create_upload(&new, Timestamp::now()).await {
        Ok(upload) => upload,
        Err(error) => {
            spool::discard(state.storage.as_ref(), &spooled.key).await;
            return Err(quota::record_error(&cache.name, error));
        }
    };
    follow_new_upload(state, cache, upload, wait).await
}

/// Records the upload of a staged file's NAR (Nix's narinfo naming a NAR
/// file it PUT before), claiming the file in the same transaction, then
/// goes on as [`record_upload`]. `None` when the file was claimed or
/// reaped meanwhile. When the upload cannot be recorded, the staged file
/// stays, still waiting for a narinfo: a retry claims it.
pub async fn record_staged_file_upload(
    state: &AppState,
    cache: &Cache,
    caller: &Caller,
    path: PushedPath,
    file: &StagedFile,
    wait: Duration,
) -> Result<Option<UploadPathResult>, ApiError> {
    let new = new_upload(cache, caller, path, &file.staged_key, file.staged_crc32);
    let claimed = state
        .database
        .claim_staged_file(&new, &file.file_name, Timestamp::now())
        .await
        .map_err(|error| quota::record_error(&cache.name, error))?;
    match claimed {
        Some(upload) => follow_new_upload(state, cache, upload, wait)
            .await
            .map(Some),
        None => Ok(None),
    }
}

/// Waits up to `wait` for an upload recorded earlier (by this request's
/// first attempt, or by a concurrent push of the same path) and answers as
/// the request that recorded it did.
pub async fn await_upload(
    state: &AppState,
    upload: Upload,
    wait: Duration,
) -> Result<UploadPathResult, ApiError> {
    let watch = state.database.watch_upload(&upload.id);
    // It may have left the pipeline before the watch began.
    let upload = if wait.is_zero() {
        upload
    } else {
        current(state, &upload.id).await?
    };
    answer(wait_until_visible(state, upload, &watch, wait).await?)
}

fn answer(upload: Upload) -> Result<UploadPathResult, ApiError> {
    Ok(UploadPathResult {
        kind: UploadPathResultKind::Uploaded,
        upload_id: Some(upload.id.to_string()),
        phase: upload.phase.as_str().to_owned(),
    })
}

/// The upload row for `path`, its NAR staged at `staged_key` with that
/// CRC-32, with a fresh trace id.
fn new_upload(
    cache: &Cache,
    caller: &Caller,
    path: PushedPath,
    staged_key: &str,
    staged_crc32: Option<u32>,
) -> NewUpload {
    NewUpload {
        cache_id: cache.id,
        store_path_hash: path.store_path_hash,
        nar_hash: path.nar_hash,
        nar_size: path.nar_size,
        metadata: path.metadata,
        staged_key: staged_key.to_owned(),
        staged_crc32,
        trace_id: Some(UploadId::random().to_string()),
        created_by: caller.actor(),
    }
}

/// Publishes a just recorded upload's chunk job and waits up to `wait` for
/// its path to become visible.
async fn follow_new_upload(
    state: &AppState,
    cache: &Cache,
    upload: Upload,
    wait: Duration,
) -> Result<UploadPathResult, ApiError> {
    let trace_id = upload
        .trace_id
        .clone()
        .unwrap_or_else(|| upload.id.to_string());
    let span = tracing::info_span!("upload", trace_id = %trace_id, cache = %cache.name);
    async move {
        tracing::info!(
            upload_id = %upload.id,
            store_path = %upload.metadata.store_path,
            nar_size = upload.nar_size,
            "upload spooled"
        );
        // Before the job exists, so that no wake-up can come before it.
        let watch = state.database.watch_upload(&upload.id);
        let job = ChunkJob {
            upload_id: upload.id.to_string(),
            trace_id,
        };
        if let Err(error) = publish_job(state.queue.as_ref(), &job).await {
            // The row stays `spooled`; the reconciler publishes it again.
            tracing::warn!(
                upload_id = %upload.id,
                error = format!("{:#}", anyhow::Error::new(error)),
                "could not publish a chunk job; the reconciler will retry"
            );
        }
        answer(wait_until_visible(state, upload, &watch, wait).await?)
    }
    .instrument(span)
    .await
}

/// Waits until the upload is done or failed, or `wait` is over: reads its
/// row each time `watch` is woken, and at least every
/// `wait-recheck-interval`. A failed upload is an error carrying the
/// pipeline's reason.
async fn wait_until_visible(
    state: &AppState,
    mut upload: Upload,
    watch: &UploadWatch,
    wait: Duration,
) -> Result<Upload, ApiError> {
    let started = Instant::now();
    let deadline = started + wait;
    let recheck = state.ingest.wait_recheck_interval.as_duration();
    while !upload.phase.is_terminal() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        watch.woken_within(recheck.min(deadline - now)).await;
        upload = current(state, &upload.id).await?;
    }
    larder().push_stage(PushStage::Wait, started.elapsed());
    if upload.phase == UploadPhase::Failed {
        return Err(ApiError::UploadFailed(
            upload
                .error
                .unwrap_or_else(|| "no reason was recorded".to_owned()),
        ));
    }
    Ok(upload)
}

/// The upload's row as it is now.
async fn current(state: &AppState, id: &UploadId) -> Result<Upload, ApiError> {
    state
        .database
        .upload(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::UploadFailed("the upload was removed before it finished".to_owned())
        })
}
