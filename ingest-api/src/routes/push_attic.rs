//! Attic's push API: `POST /_api/v1/get-missing-paths` and
//! `PUT /_api/v1/upload-path`, wire-compatible with an unmodified Attic
//! client (field names, hash formats, the preamble form, the answer shape).
//! Both need push permission on the cache, as in Attic.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;

use larder_api::upload_info::{CheckedUploadInfo, UploadInfoError};
use larder_api::v1::{
    GetMissingPathsRequest, GetMissingPathsResponse, UploadPathResult, NAR_INFO_HEADER,
    NAR_INFO_PREAMBLE_SIZE_HEADER,
};
use larder_db::Cache;
use larder_nix::StorePathHash;
use larder_token::Permission;

use super::parse_cache_name;
use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::push::{self, PushedPath};
use crate::quota::Room;
use crate::spool::{self, BodyStream, Encoding, Expected};
use crate::state::AppState;

fn parse_hash(hash: &str) -> Result<StorePathHash, ApiError> {
    StorePathHash::parse(hash).map_err(ApiError::bad_request)
}

/// `POST /_api/v1/get-missing-paths`: the hashes to push; uploads still in
/// the pipeline count as present.
pub async fn get_missing_paths(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<GetMissingPathsRequest>,
) -> Result<Json<GetMissingPathsResponse>, ApiError> {
    let name = parse_cache_name(&request.cache)?;
    let hashes = request
        .store_path_hashes
        .iter()
        .map(|hash| parse_hash(hash))
        .collect::<Result<Vec<_>, _>>()?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Push)
        .await?;
    let missing = state
        .database
        .missing_store_path_hashes(cache.id, &hashes)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(GetMissingPathsResponse {
        missing_paths: missing.iter().map(ToString::to_string).collect(),
    }))
}

/// `PUT /_api/v1/upload-path`: the NAR as the body, its metadata in
/// `X-Attic-Nar-Info` or in a JSON preamble of
/// `X-Attic-Nar-Info-Preamble-Size` bytes.
pub async fn upload_path(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<UploadPathResult>, ApiError> {
    let wait = push::requested_wait(&state, &headers)?;
    let (info, nar_body) = upload_info(&state, &headers, spool::body_stream(body)).await?;
    if let Some(length) = content_length(&headers) {
        if length
            > state
                .ingest
                .max_nar_size
                .saturating_add(state.ingest.max_preamble_size)
        {
            return Err(too_large(&state));
        }
    }
    let cache = state
        .cache_with_permission(&caller, &info.cache, Permission::Push)
        .await?;
    let path = in_cache(&cache, info)?;
    let expected = Expected {
        file_hash: None,
        nar_hash: Some(path.nar_hash),
        nar_size: Some(path.nar_size),
    };

    // Refused before the body is read when it cannot fit; its bytes are
    // checked again, atomically, when they are recorded.
    let room = Room::measure(&state, &cache, Some(&path.store_path_hash)).await?;
    // Without proof of possession a stored NAR is linked unread. Otherwise
    // every NAR is read, verified and spooled, whether or not some cache
    // holds it already: the pipeline links a stored one, and the answer is
    // the same either way (module `push`).
    if !state.ingest.require_proof_of_possession {
        // A link adds no more than an upload would: a cache too full for
        // this one is too full for the upload below too.
        room.admit_link(path.nar_size)?;
        if let Some(result) = push::link_to_stored_nar(&state, &cache, &caller, &path).await? {
            return Ok(Json(result));
        }
    }
    room.admit_upload(path.nar_size)?;
    let limit = state.ingest.max_nar_size;
    let spooled = spool::spool(
        &state.door,
        state.storage.clone(),
        nar_body,
        Encoding::Plain,
        expected,
        room.write_bound(limit)?,
    )
    .await
    .map_err(|error| room.spool_error(limit, error))?;
    let result = push::record_upload(&state, &cache, &caller, path, spooled, wait).await?;
    Ok(Json(result))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn too_large(state: &AppState) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the NAR is larger than this server's limit of {} bytes",
        state.ingest.max_nar_size
    ))
}

/// The upload's metadata, from the header or the preamble, checked, and
/// the rest of the body: the NAR.
async fn upload_info(
    state: &AppState,
    headers: &HeaderMap,
    body: BodyStream,
) -> Result<(CheckedUploadInfo, BodyStream), ApiError> {
    let parse = |json: &[u8], source: &str| {
        CheckedUploadInfo::parse(json, state.ingest.max_nar_size).map_err(|error| match error {
            UploadInfoError::Json(error) => {
                ApiError::bad_request(format!("invalid {source}: {error}"))
            }
            UploadInfoError::TooLarge { .. } => too_large(state),
            error => ApiError::bad_request(error),
        })
    };
    if let Some(header) = headers.get(NAR_INFO_HEADER) {
        return Ok((parse(header.as_bytes(), "X-Attic-Nar-Info header")?, body));
    }
    let Some(size) = headers.get(NAR_INFO_PREAMBLE_SIZE_HEADER) else {
        return Err(ApiError::bad_request(
            "the upload's metadata is missing: send X-Attic-Nar-Info or \
             X-Attic-Nar-Info-Preamble-Size",
        ));
    };
    let size: u64 = size
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            ApiError::bad_request("X-Attic-Nar-Info-Preamble-Size must be a number of bytes")
        })?;
    let limit = state.ingest.max_preamble_size;
    if size > limit {
        return Err(ApiError::PayloadTooLarge(format!(
            "the preamble of {size} bytes is larger than this server's limit of {limit} bytes"
        )));
    }
    let size = usize::try_from(size).map_err(ApiError::bad_request)?;
    let (preamble, nar) = spool::split_preamble(body, size).await?;
    Ok((parse(&preamble, "preamble")?, nar))
}

/// Checks the store path against the cache's store directory and its hash.
fn in_cache(cache: &Cache, info: CheckedUploadInfo) -> Result<PushedPath, ApiError> {
    let store_path = cache
        .store_dir
        .parse_path(&info.store_path)
        .map_err(|error| {
            ApiError::bad_request(format!(
                "store path {:?} is not a path in this cache's store {}: {error}",
                info.store_path.chars().take(200).collect::<String>(),
                cache.store_dir
            ))
        })?;
    if *store_path.hash() != info.store_path_hash {
        return Err(ApiError::bad_request(format!(
            "store path {} does not match store_path_hash {}",
            info.store_path, info.store_path_hash
        )));
    }
    Ok(PushedPath::new(&store_path, &cache.store_dir, info.fields))
}
