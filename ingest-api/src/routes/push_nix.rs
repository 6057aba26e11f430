//! Nix's own upload protocol, so that `nix copy --to http://HOST/CACHE`
//! pushes with a push token in netrc: `PUT nix-cache-info`, `HEAD` and
//! `PUT nar/<file>`, `PUT <hash>.narinfo`, and the accepted-and-dropped
//! `PUT <hash>.ls` and `PUT log/<drv>`.
//!
//! Nix sends each NAR (compressed as `?compression=` says) before the
//! narinfo that names it. A NAR file is verified as it streams in (the
//! compressed bytes against the FileHash in its name, the NAR against the
//! strict reader), spooled, and remembered per cache by file name; the
//! narinfo then claims it, its NarHash and NarSize must match what was
//! computed, and the path goes the way of any other push.
//!
//! Every rejection is a 4xx: Nix 2.8 re-sends a PUT that got a 5xx without
//! its body. Success is 200 or 204, never 202 (which Nix counts as failure).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use common::api::UploadPathResult;
use common::auth::Permission;
use common::cache_name::CacheName;
use common::db::{Cache, StagedFile, Timestamp};
use common::nix::{base32, NarInfo, Sha256Hash, StorePath, StorePathHash};

use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::push::{self, check_text, PathFields};
use crate::routes::binary_cache;
use crate::spool::{self, Encoding, Expected};
use crate::state::AppState;

fn parse_cache_name(name: &str) -> Result<CacheName, ApiError> {
    name.parse().map_err(ApiError::bad_request)
}

/// A NAR file name as Nix gives it: the FileHash (Nix base-32 SHA-256 of
/// the file) and an extension that says how it is compressed.
#[derive(Debug, Clone, Copy)]
struct NarFileName {
    file_hash: Sha256Hash,
    encoding: Encoding,
}

impl NarFileName {
    fn parse(file: &str) -> Result<Self, ApiError> {
        let shown = || file.chars().take(80).collect::<String>();
        let digest_len = base32::encoded_len(32);
        let (digest, extension) = file.split_at_checked(digest_len).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid NAR file name {:?}: expected <nix-base32 SHA-256>.nar[.zst|.xz]",
                shown()
            ))
        })?;
        let encoding = match extension {
            ".nar" => Encoding::Plain,
            ".nar.zst" => Encoding::Zstd,
            ".nar.xz" => Encoding::Xz,
            ".nar.bz2" | ".nar.br" => {
                return Err(ApiError::bad_request(format!(
                    "NAR file {:?}: this server takes compression=zstd, xz or none",
                    shown()
                )))
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid NAR file name {:?}: expected <nix-base32 SHA-256>.nar[.zst|.xz]",
                    shown()
                )))
            }
        };
        let file_hash = Sha256Hash::from_base32(digest).map_err(|error| {
            ApiError::bad_request(format!("invalid NAR file name {:?}: {error}", shown()))
        })?;
        Ok(Self {
            file_hash,
            encoding,
        })
    }
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
        NarFileName::parse(&file)?;
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
    binary_cache::nar(State(state), caller, ApiPath((cache, file))).await
}

/// Whether the staged file is still usable: its NAR is in staging, or
/// already stored (the pipeline deletes staged NARs once stored).
async fn holds_staged_file(state: &AppState, cache: &Cache, file: &str) -> Result<bool, ApiError> {
    let Some(staged) = state
        .database
        .staged_file(cache.id, file)
        .await
        .map_err(ApiError::internal)?
    else {
        return Ok(false);
    };
    let key = common::storage::ObjectKey::new(staged.staged_key).map_err(ApiError::internal)?;
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
    let file_name = NarFileName::parse(&file)?;
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
        file_hash: Some(file_name.file_hash),
        ..Expected::default()
    };
    let spooled = spool::spool(
        &state.door,
        state.storage.clone(),
        spool::body_stream(body),
        file_name.encoding,
        expected,
    )
    .await?;
    let staged = StagedFile {
        cache_id: cache.id,
        file_name: file,
        staged_key: spooled.key.as_str().to_owned(),
        nar_hash: spooled.nar_hash,
        nar_size: spooled.nar_size,
        created_at: Timestamp::now(),
    };
    let replaced = match state.database.put_staged_file(&staged).await {
        Ok(replaced) => replaced,
        Err(error) => {
            spool::discard(state.storage.as_ref(), &spooled.key).await;
            return Err(ApiError::internal(error));
        }
    };
    if let Some(previous) = replaced {
        if let Ok(key) = common::storage::ObjectKey::new(previous) {
            spool::discard(state.storage.as_ref(), &key).await;
        }
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
        let result = put_narinfo(&state, &caller, &headers, &name, hash, body).await?;
        Ok(Json(result).into_response())
    } else if let Some(hash) = file.strip_suffix(".ls") {
        parse_hash(hash)?;
        state
            .cache_with_permission(&caller, &name, Permission::Push)
            .await?;
        spool::drain(body).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NoSuchEndpoint)
    }
}

/// `PUT /{cache}/log/{drv}`: build logs are accepted and dropped.
pub async fn put_log(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, drv)): ApiPath<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = parse_cache_name(&cache)?;
    StorePath::from_base_name(&drv).map_err(ApiError::bad_request)?;
    state
        .cache_with_permission(&caller, &name, Permission::Push)
        .await?;
    spool::drain(body).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_narinfo(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    name: &CacheName,
    hash: StorePathHash,
    body: Body,
) -> Result<UploadPathResult, ApiError> {
    let wait = push::requested_wait(state, headers)?;
    let cache = state
        .cache_with_permission(caller, name, Permission::Push)
        .await?;
    let text = spool::read_small_body(body, state.ingest.max_narinfo_size, "narinfo").await?;
    let text = std::str::from_utf8(&text)
        .map_err(|_| ApiError::bad_request("the narinfo is not UTF-8 text"))?;
    let narinfo = NarInfo::parse(text, &cache.store_dir)
        .map_err(|error| ApiError::bad_request(format!("invalid narinfo: {error}")))?;
    if *narinfo.store_path.hash() != hash {
        return Err(ApiError::bad_request(format!(
            "the narinfo is for {}, not for {hash}",
            cache.store_dir.display_path(&narinfo.store_path)
        )));
    }
    if let Some(system) = &narinfo.system {
        check_text("System", system)?;
    }
    let file = narinfo
        .url
        .strip_prefix("nar/")
        .filter(|file| NarFileName::parse(file).is_ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "the narinfo's URL {:?} does not name a NAR file pushed to this cache \
                 (nar/<FileHash>.nar[.zst|.xz])",
                narinfo.url.chars().take(200).collect::<String>()
            ))
        })?;
    let staged = state
        .database
        .take_staged_file(cache.id, file)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "the narinfo names nar/{file}, which this cache has not received: PUT it first"
            ))
        })?;
    let staged_key =
        common::storage::ObjectKey::new(staged.staged_key.clone()).map_err(ApiError::internal)?;
    if staged.nar_hash != narinfo.nar_hash || staged.nar_size != narinfo.nar_size {
        spool::discard(state.storage.as_ref(), &staged_key).await;
        return Err(ApiError::bad_request(format!(
            "the narinfo says NarHash {} and NarSize {}, but nar/{file} is a NAR of {} \
             with {} bytes",
            narinfo.nar_hash, narinfo.nar_size, staged.nar_hash, staged.nar_size
        )));
    }
    let path = PathFields {
        references: narinfo.references.iter().cloned().collect(),
        deriver: narinfo.deriver.clone(),
        system: narinfo.system.clone(),
        signatures: narinfo.signatures.iter().cloned().collect(),
        ca: narinfo.ca.clone(),
        nar_hash: narinfo.nar_hash,
        nar_size: narinfo.nar_size,
    }
    .into_pushed(&narinfo.store_path, &cache.store_dir);
    // The client streamed the NAR and it was verified: that is the proof
    // of possession, so an already stored NAR is linked at once.
    if let Some(result) = push::link_if_stored(state, &cache, caller, &path).await? {
        spool::discard(state.storage.as_ref(), &staged_key).await;
        return Ok(result);
    }
    push::record_upload(state, &cache, caller, path, staged_key, wait).await
}
