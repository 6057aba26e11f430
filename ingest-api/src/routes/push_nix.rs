//! Nix's own upload protocol, so that `nix copy --to http://HOST/CACHE`
//! pushes with a push token in netrc: `PUT nix-cache-info`, `HEAD` and
//! `PUT nar/<file>`, `PUT <hash>.narinfo`, and the accepted-and-dropped
//! `PUT <hash>.ls` (build logs and debug info: module `logs`).
//!
//! Narinfos and `.ls` listings may come with a `Content-Encoding` (Nix ≥
//! 2.33's `narinfo-compression` and `ls-compression`): they are decoded
//! under the same kind of bounds as NARs (`spool::read_encoded_body`); an
//! encoding the server does not know is a 415, answered before any lookup.
//!
//! Nix sends each NAR (compressed as `?compression=` says) before the
//! narinfo that names it. A NAR file is verified as it streams in (the
//! compressed bytes against the FileHash in its name, the NAR against the
//! strict reader), spooled, and remembered per cache by file name (a file
//! already waiting under that name holds the same bytes and is kept; the
//! new copy goes). The narinfo then names it (`larder_nix::nar_file`
//! does that join), its NarHash and NarSize must match what was computed,
//! and the path goes the way of any other push: linked at once to a NAR
//! stored already, or recorded as an upload that claims the staged file in
//! the same transaction. A narinfo whose file is gone because an earlier
//! PUT of the same path claimed it (a retry, or a second `nix copy` of the
//! same closure) gets that push's answer: it waits for its upload, or
//! links to the path it made.
//!
//! Every rejection is a 4xx: Nix 2.8 re-sends a PUT that got a 5xx without
//! its body. Success is 200 or 204, never 202 (which Nix counts as failure).

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use larder_api::cache_name::CacheName;
use larder_api::upload_info::PathFields;
use larder_api::v1::UploadPathResult;
use larder_db::{Cache, StagedFile, Timestamp};
use larder_nix::nar_file::{NarFileCompression, NarFileName, PushedNarInfo};
use larder_nix::StorePathHash;
use larder_storage::ObjectKey;
use larder_token::Permission;
use larder_verify::encoded::ContentEncoding;

use super::parse_cache_name;
use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::push::{self, check_text, PushedPath};
use crate::quota::{self, Room};
use crate::routes::binary_cache;
use crate::spool::{self, Encoding, Expected, SmallBodyLimit};
use crate::state::AppState;

/// A NAR file name as Nix gives it, with the encoding its extension
/// names.
fn parse_nar_file_name(file: &str) -> Result<(NarFileName, Encoding), ApiError> {
    let name = NarFileName::parse(file).map_err(ApiError::bad_request)?;
    let encoding = match name.compression() {
        NarFileCompression::None => Encoding::Plain,
        NarFileCompression::Zstd => Encoding::Zstd,
        NarFileCompression::Xz => Encoding::Xz,
    };
    Ok((name, encoding))
}

/// `PUT /{cache}/nix-cache-info`: Nix writes it when it finds none. Accepted
/// when its store directory is the cache's.
pub async fn put_cache_info(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = parse_cache_name(&cache)?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Push)
        .await?;
    let text =
        spool::read_small_body(body, state.ingest.max_narinfo_size, "nix-cache-info").await?;
    let text = String::from_utf8_lossy(&text);
    let store_dir = text
        .lines()
        .find_map(|line| line.strip_prefix("StoreDir:"))
        .map(str::trim)
        .ok_or_else(|| ApiError::bad_request("nix-cache-info has no StoreDir line"))?;
    if store_dir != cache.store_dir.as_str() {
        return Err(ApiError::bad_request(format!(
            "cache {name} is for the store {}, not {store_dir:?}",
            cache.store_dir
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `HEAD /{cache}/nar/{file}`: Nix asks before sending a NAR file. 200 for
/// a pusher when this cache already holds the staged file (so Nix sends
/// only the narinfo); otherwise the read path's answer.
pub async fn head_nar(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    if caller.can(&name, Permission::Push) {
        parse_nar_file_name(&file)?;
        let cache = state
            .cache_with_permission(&caller, &name, Permission::Push)
            .await?;
        if holds_staged_file(&state, &cache, &file).await? {
            return Ok(StatusCode::OK.into_response());
        }
        // The names Nix pushes under are FileHashes; the read path serves
        // NARs by NAR hash, and only `.nar.zst`.
        if !file.ends_with(".nar.zst") {
            return Err(ApiError::NoSuchPath);
        }
    }
    binary_cache::nar_head(state, caller, cache, file).await
}

/// Whether the staged file is still usable: its NAR is in staging (a
/// staged file's row owns its object until a narinfo claims it), or
/// already stored.
async fn holds_staged_file(state: &AppState, cache: &Cache, file: &str) -> Result<bool, ApiError> {
    let Some(staged) = state
        .database
        .staged_file(cache.id, file)
        .await
        .map_err(ApiError::internal)?
    else {
        return Ok(false);
    };
    let key = ObjectKey::new(staged.staged_key).map_err(ApiError::internal)?;
    if state
        .storage
        .size(&key)
        .await
        .map_err(ApiError::internal)?
        .is_some()
    {
        return Ok(true);
    }
    Ok(state
        .database
        .valid_nar_by_hash(&staged.nar_hash)
        .await
        .map_err(ApiError::internal)?
        .is_some())
}

/// `PUT /{cache}/nar/{file}`: a NAR file, verified and spooled, waiting for
/// its narinfo.
pub async fn put_nar(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((cache, file)): ApiPath<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = parse_cache_name(&cache)?;
    let (file_name, encoding) = parse_nar_file_name(&file)?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Push)
        .await?;
    let limit = state.ingest.max_nar_size;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit.saturating_add(limit / 8)) {
        return Err(ApiError::PayloadTooLarge(format!(
            "the NAR file is larger than this server's limit of {limit} bytes"
        )));
    }
    let expected = Expected {
        file_hash: Some(*file_name.file_hash()),
        ..Expected::default()
    };
    // Its NarSize is known only once decoded: it may write no more than the
    // cache's room (and the disk's), and is counted once spooled.
    let room = Room::measure(&state, &cache, None).await?;
    let spooled = spool::spool(
        &state.door,
        state.storage.clone(),
        spool::body_stream(body),
        encoding,
        expected,
        room.write_bound(limit)?,
    )
    .await
    .map_err(|error| room.spool_error(limit, error))?;
    let staged = StagedFile {
        cache_id: cache.id,
        file_name: file,
        staged_key: spooled.key.as_str().to_owned(),
        staged_crc32: Some(spooled.crc32),
        nar_hash: spooled.nar_hash,
        nar_size: spooled.nar_size,
        created_at: Timestamp::now(),
    };
    let kept = match state.database.put_staged_file(&staged).await {
        Ok(kept) => kept,
        Err(error) => {
            spool::discard(state.storage.as_ref(), &spooled.key).await;
            return Err(quota::record_error(&name, error));
        }
    };
    if kept != staged.staged_key {
        // The same file was waiting already (a retried PUT, or another
        // `nix copy` of the same path): that copy stays, this one goes.
        spool::discard(state.storage.as_ref(), &spooled.key).await;
    }
    tracing::info!(
        cache = %name,
        file = %staged.file_name,
        nar_hash = %staged.nar_hash,
        nar_size = staged.nar_size,
        "NAR file staged"
    );
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /{cache}/{hash}.narinfo`, and the `.ls` listings Nix writes with
/// `?write-nar-listing=true` (accepted and dropped: Larder makes its own).
pub async fn put_root_file(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((cache, file)): ApiPath<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    let parse_hash = |hash: &str| StorePathHash::parse(hash).map_err(ApiError::bad_request);
    if let Some(hash) = file.strip_suffix(".narinfo") {
        let hash = parse_hash(hash)?;
        let encoding = spool::content_encoding(&headers)?;
        let result = put_narinfo(&state, &caller, &headers, &name, hash, encoding, body).await?;
        Ok(Json(result).into_response())
    } else if let Some(hash) = file.strip_suffix(".ls") {
        parse_hash(hash)?;
        let encoding = spool::content_encoding(&headers)?;
        state
            .cache_with_permission(&caller, &name, Permission::Push)
            .await?;
        if encoding == ContentEncoding::Identity {
            spool::drain(body).await?;
        } else {
            // Decoded only to be checked, as bounded as a log (a listing of
            // 64 MiB lists some 600,000 files); dropped all the same.
            let limit = SmallBodyLimit {
                bytes: state.ingest.max_log_size,
                setting: "[ingest] max-log-size",
            };
            spool::read_encoded_body(&state.door, encoding, body, limit, ".ls listing").await?;
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NoSuchEndpoint)
    }
}

async fn put_narinfo(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    name: &CacheName,
    hash: StorePathHash,
    encoding: ContentEncoding,
    body: Body,
) -> Result<UploadPathResult, ApiError> {
    let wait = push::requested_wait(state, headers)?;
    let cache = state
        .cache_with_permission(caller, name, Permission::Push)
        .await?;
    let limit = SmallBodyLimit {
        bytes: state.ingest.max_narinfo_size,
        setting: "[ingest] max-narinfo-size",
    };
    let text = spool::read_encoded_body(&state.door, encoding, body, limit, "narinfo").await?;
    let pushed =
        PushedNarInfo::parse(&text, &cache.store_dir, &hash).map_err(ApiError::bad_request)?;
    let narinfo = &pushed.narinfo;
    if let Some(system) = &narinfo.system {
        check_text("System", system)?;
    }
    let file = pushed.file.to_string();
    let fields = PathFields {
        references: narinfo.references.iter().cloned().collect(),
        deriver: narinfo.deriver.clone(),
        system: narinfo.system.clone(),
        signatures: narinfo.signatures.iter().cloned().collect(),
        ca: narinfo.ca.clone(),
        nar_hash: narinfo.nar_hash,
        nar_size: narinfo.nar_size,
    };
    let path = PushedPath::new(&narinfo.store_path, &cache.store_dir, fields);
    let staged = state
        .database
        .staged_file(cache.id, &file)
        .await
        .map_err(ApiError::internal)?;
    if let Some(staged) = staged {
        // A narinfo that does not fit its file leaves the file waiting: the
        // bytes were verified, the narinfo is what is wrong.
        pushed
            .check_staged(&staged.nar_hash, staged.nar_size)
            .map_err(ApiError::bad_request)?;
        // Also when some cache holds the NAR already: the pipeline links it
        // then, and the answer is the same either way (module `push`).
        let recorded =
            push::record_staged_file_upload(state, &cache, caller, path.clone(), &staged, wait)
                .await?;
        if let Some(result) = recorded {
            return Ok(result);
        }
        // A concurrent PUT of this narinfo claimed the file first.
    }
    already_pushed(state, &cache, caller, &path, wait)
        .await?
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "the narinfo names nar/{file}, which this cache has not received: PUT it first"
            ))
        })
}

/// The answer to a narinfo PUT whose staged file an earlier PUT of the
/// same path and NAR already claimed (this request retried, or a second
/// `nix copy` of the same closure raced the first): that push's upload,
/// waited for, or the path it made visible, linked again with this
/// narinfo's metadata as any re-push of a path is. `None` when this cache
/// has neither: the NAR file was never received (or was reaped).
///
/// Possession was proven by the earlier PUT of the same NAR into this same
/// cache, so nothing reaches a NAR the cache did not hold already.
async fn already_pushed(
    state: &AppState,
    cache: &Cache,
    caller: &Caller,
    path: &PushedPath,
    wait: Duration,
) -> Result<Option<UploadPathResult>, ApiError> {
    // Uploads first: one that finishes between the two looks has made its
    // object by then (in the same transaction that ended it).
    let in_flight = state
        .database
        .in_flight_upload_of_path(cache.id, &path.store_path_hash, &path.nar_hash)
        .await
        .map_err(ApiError::internal)?;
    if let Some(upload) = in_flight {
        return push::await_upload(state, upload, wait).await.map(Some);
    }
    let present = state
        .database
        .find_object(cache.id, &path.store_path_hash)
        .await
        .map_err(ApiError::internal)?
        .is_some_and(|found| found.nar.nar_hash == path.nar_hash);
    if !present {
        return Ok(None);
    }
    push::link_to_stored_nar(state, cache, caller, path).await
}
