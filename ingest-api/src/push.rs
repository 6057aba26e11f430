//! What both push protocols (Attic's `upload-path` and Nix's own PUTs)
//! share once a path's metadata is validated: linking it at once to a NAR
//! that is already stored, or recording an upload of a spooled NAR and
//! publishing its chunk job, and then waiting until the path is visible.

use std::time::Duration;

use axum::http::HeaderMap;
use tokio::time::Instant;
use tracing::Instrument;

use common::api::{UploadPathResult, UploadPathResultKind, WAIT_HEADER};
use common::db::{
    Cache, DbError, LinkedPath, NewUpload, ObjectMetadata, Timestamp, Upload, UploadId, UploadPhase,
};
use common::metrics::larder;
use common::nix::{NarHash, Signature, StoreDir, StorePath, StorePathHash};
use common::queue::{publish_job, ChunkJob};
use common::storage::ObjectKey;

use crate::access::Caller;
use crate::error::ApiError;
use crate::spool;
use crate::state::AppState;

/// The first delay between two looks at an upload's row; it doubles up to
/// [`MAX_POLL_INTERVAL`].
const FIRST_POLL_INTERVAL: Duration = Duration::from_millis(20);
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A pushed path whose metadata has been validated against its cache.
#[derive(Debug, Clone)]
pub struct PushedPath {
    pub store_path_hash: StorePathHash,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub metadata: ObjectMetadata,
}

/// The metadata of a push besides its store path, parsed: what can be
/// checked before the cache (and its store directory) is known.
#[derive(Debug, Clone)]
pub struct PathFields {
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub signatures: Vec<Signature>,
    pub ca: Option<String>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
}

/// Rejects free text that would break a narinfo line.
pub fn check_text(field: &str, value: &str) -> Result<(), ApiError> {
    if !common::upload_info::is_one_line_text(value) {
        return Err(ApiError::bad_request(format!(
            "{field} {:?} contains a control character or is too long",
            value.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

impl PathFields {
    /// The path as it will be stored, `store_path` being in `store_dir`.
    pub fn into_pushed(self, store_path: &StorePath, store_dir: &StoreDir) -> PushedPath {
        let base_names = |paths: &[StorePath]| paths.iter().map(StorePath::to_base_name).collect();
        PushedPath {
            store_path_hash: *store_path.hash(),
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            metadata: ObjectMetadata {
                store_path: store_path.to_full_path(store_dir),
                references: base_names(&self.references),
                deriver: self.deriver.as_ref().map(StorePath::to_base_name),
                system: self.system,
                sigs: self.signatures.iter().map(ToString::to_string).collect(),
                ca: self.ca,
            },
        }
    }
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
/// NAR is (still) valid.
pub async fn link_if_stored(
    state: &AppState,
    cache: &Cache,
    caller: &Caller,
    path: &PushedPath,
) -> Result<Option<UploadPathResult>, ApiError> {
    let linked = LinkedPath {
        store_path_hash: path.store_path_hash,
        metadata: path.metadata.clone(),
        created_by: caller.subject().map(str::to_owned),
    };
    let Some((_, nar)) = state
        .database
        .link_valid_nar(cache.id, &path.nar_hash, &linked, Timestamp::now())
        .await
        .map_err(ApiError::internal)?
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
        kind: UploadPathResultKind::Deduplicated,
        file_size: nar.file_size,
        frac_deduplicated: Some(1.0),
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
    staged_key: ObjectKey,
    wait: Duration,
) -> Result<UploadPathResult, ApiError> {
    let trace_id = UploadId::random().to_string();
    let span = tracing::info_span!("upload", trace_id = %trace_id, cache = %cache.name);
    async move {
        let new = NewUpload {
            cache_id: cache.id,
            store_path_hash: path.store_path_hash,
            nar_hash: path.nar_hash,
            nar_size: path.nar_size,
            metadata: path.metadata,
            staged_key: staged_key.as_str().to_owned(),
            trace_id: Some(trace_id.clone()),
            created_by: caller.subject().map(str::to_owned),
        };
        let upload = match state.database.create_upload(&new, Timestamp::now()).await {
            Ok(upload) => upload,
            Err(error) => {
                spool::discard(state.storage.as_ref(), &staged_key).await;
                return Err(match error {
                    // The cache was destroyed while the NAR streamed in.
                    DbError::NotFound { .. } => ApiError::NoSuchCache,
                    other => ApiError::internal(other),
                });
            }
        };
        tracing::info!(
            upload_id = %upload.id,
            store_path = %upload.metadata.store_path,
            nar_size = upload.nar_size,
            "upload spooled"
        );
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
        let upload = wait_until_visible(state, upload, wait).await?;
        upload_result(state, &upload).await
    }
    .instrument(span)
    .await
}

/// Polls the upload's row until it is done or failed, or `wait` is over.
/// A failed upload is an error carrying the pipeline's reason.
async fn wait_until_visible(
    state: &AppState,
    mut upload: Upload,
    wait: Duration,
) -> Result<Upload, ApiError> {
    let deadline = Instant::now() + wait;
    let mut interval = FIRST_POLL_INTERVAL;
    while !upload.phase.is_terminal() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
        upload = state
            .database
            .upload(&upload.id)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| {
                ApiError::UploadFailed("the upload was removed before it finished".to_owned())
            })?;
    }
    if upload.phase == UploadPhase::Failed {
        return Err(ApiError::UploadFailed(
            upload
                .error
                .unwrap_or_else(|| "no reason was recorded".to_owned()),
        ));
    }
    Ok(upload)
}

async fn upload_result(state: &AppState, upload: &Upload) -> Result<UploadPathResult, ApiError> {
    let file_size = match (upload.phase, upload.nar_id) {
        (UploadPhase::Done, Some(nar_id)) => state
            .database
            .nar_by_id(nar_id)
            .await
            .map_err(ApiError::internal)?
            .and_then(|nar| nar.file_size),
        _ => None,
    };
    Ok(UploadPathResult {
        kind: UploadPathResultKind::Uploaded,
        file_size,
        frac_deduplicated: None,
        upload_id: Some(upload.id.to_string()),
        phase: upload.phase.as_str().to_owned(),
    })
}
