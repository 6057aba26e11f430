//! Nix's binary-cache protocol, read side: `nix-cache-info`, narinfos
//! (signed on the fly with the cache's key), NARs streamed from their
//! chunks, and `.ls` listings.
//!
//! Every lookup goes through the asking cache: a narinfo comes from an
//! object of that cache, and a NAR is served under a cache only while an
//! object of that cache points at it.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};

use common::cache_name::CacheName;
use common::db::{Cache, NarChunk, ObjectWithNar, StoreState};
use common::nix::cache_info::NixCacheInfo;
use common::nix::nar::NarReader;
use common::nix::narinfo::{Compression, NarInfo};
use common::nix::{base32, NarHash, Sha256Hash, StorePath, StorePathHash};
use common::storage::{ObjectKey, StorageError};

use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::{AppState, ServedCache};

/// How many chunk objects are checked for presence at once before a NAR's
/// first byte is sent.
const CHUNK_CHECK_CONCURRENCY: usize = 16;

/// How many chunk frames of a NAR are read ahead of the one being sent.
const NAR_READ_AHEAD: usize = 4;

const NAR_EXTENSION: &str = ".nar.zst";

fn parse_cache_name(name: &str) -> Result<CacheName, ApiError> {
    name.parse().map_err(ApiError::bad_request)
}

fn text_response(content_type: &'static str, body: String) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// `GET /{cache}/nix-cache-info`
pub async fn cache_info(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
) -> Result<Response, ApiError> {
    let served = state
        .readable_cache(&caller, &parse_cache_name(&cache)?)
        .await?;
    let cache = &served.cache;
    let info = NixCacheInfo {
        store_dir: cache.store_dir.clone(),
        want_mass_query: true,
        priority: u32::try_from(cache.priority).unwrap_or(0),
    };
    Ok(text_response("text/x-nix-cache-info", info.render()))
}

/// What a file at the cache root names.
enum RootFile {
    NarInfo(StorePathHash),
    Listing(StorePathHash),
}

fn parse_root_file(file: &str) -> Result<RootFile, ApiError> {
    let parse_hash = |hash: &str| StorePathHash::parse(hash).map_err(ApiError::bad_request);
    if let Some(hash) = file.strip_suffix(".narinfo") {
        Ok(RootFile::NarInfo(parse_hash(hash)?))
    } else if let Some(hash) = file.strip_suffix(".ls") {
        Ok(RootFile::Listing(parse_hash(hash)?))
    } else {
        Err(ApiError::NoSuchEndpoint)
    }
}

/// `GET|HEAD /{cache}/{hash}.narinfo` and `GET /{cache}/{hash}.ls`
pub async fn root_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    let root_file = parse_root_file(&file)?;
    let served = state.readable_cache(&caller, &name).await?;
    let cache = &served.cache;
    match root_file {
        RootFile::NarInfo(hash) => {
            let cache_key = (cache.id, hash);
            let text = match state.narinfos.get(&cache_key) {
                Some(text) => text,
                None => {
                    let found = find_object(&state, cache, &hash).await?;
                    let narinfo = signed_narinfo(&served, &found)?;
                    let text = Bytes::from(narinfo.render(&cache.store_dir));
                    state.narinfos.insert(cache_key, text.clone());
                    text
                }
            };
            state.access_log.record_path(cache.id, hash);
            Ok((
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/x-nix-narinfo"),
                )],
                text,
            )
                .into_response())
        }
        RootFile::Listing(hash) => {
            let found = find_object(&state, cache, &hash).await?;
            state.access_log.record_path(cache.id, hash);
            let listing = nar_listing(&state, &found).await?;
            Ok((
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                listing,
            )
                .into_response())
        }
    }
}

async fn find_object(
    state: &AppState,
    cache: &Cache,
    hash: &StorePathHash,
) -> Result<ObjectWithNar, ApiError> {
    state
        .database
        .find_object(cache.id, hash)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchPath)
}

/// The URL of a NAR relative to the cache root: named by its NAR hash, so
/// that a client never receives another NAR than the narinfo it read.
fn nar_url(nar_hash: &NarHash) -> String {
    format!("nar/{}{NAR_EXTENSION}", nar_hash.sha256().to_base32())
}

/// The narinfo of an object, with the pusher's signatures and the cache's.
fn signed_narinfo(served: &ServedCache, found: &ObjectWithNar) -> Result<NarInfo, ApiError> {
    let cache = &served.cache;
    let object = &found.object;
    let metadata = &object.metadata;
    // Rows were validated when written; a row that no longer parses is a
    // server-side problem, not the client's.
    let corrupt = |what: &str, error: &dyn std::fmt::Display| {
        ApiError::internal(anyhow::anyhow!(
            "object {} in cache {} has an invalid {what}: {error}",
            object.store_path_hash,
            cache.name
        ))
    };
    let store_path = cache
        .store_dir
        .parse_path(&metadata.store_path)
        .map_err(|error| corrupt("store path", &error))?;
    let references = metadata
        .references
        .iter()
        .map(|reference| reference.parse::<StorePath>())
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|error| corrupt("reference", &error))?;
    let deriver = metadata
        .deriver
        .as_deref()
        .map(str::parse::<StorePath>)
        .transpose()
        .map_err(|error| corrupt("deriver", &error))?;
    let signatures = metadata
        .sigs
        .iter()
        .filter_map(|signature| signature.parse().ok())
        .collect();
    let mut narinfo = NarInfo {
        store_path,
        url: nar_url(&found.nar.nar_hash),
        compression: Compression::Zstd,
        file_hash: None,
        file_size: found.nar.file_size,
        nar_hash: found.nar.nar_hash,
        nar_size: found.nar.nar_size,
        references,
        deriver,
        system: metadata.system.clone(),
        signatures,
        ca: metadata.ca.clone(),
    };
    narinfo.sign(&served.key, &cache.store_dir);
    Ok(narinfo)
}

/// `GET|HEAD /{cache}/nar/{nar hash}.nar.zst`: the NAR's chunks, each a
/// zstd frame, concatenated. Every chunk is checked before the 200, so a
/// missing chunk is a 503 with no body rather than a truncated download.
pub async fn nar(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    let nar_hash = parse_nar_file_name(&file)?;
    let served = state.readable_cache(&caller, &name).await?;
    let nar = state
        .database
        .valid_nar_in_cache(served.cache.id, &nar_hash)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchPath)?;
    state.access_log.record_nar(served.cache.id, nar.id);
    let chunks = state
        .database
        .chunks_of_nar(nar.id)
        .await
        .map_err(ApiError::internal)?;
    let parts = check_chunks_available(&state, &nar_hash, &chunks).await?;
    let content_length: u64 = parts.iter().map(|part| part.length).sum();

    // Whole chunk frames, read a few ahead of the one being sent, so that
    // storage latency overlaps with the network; memory stays bounded by
    // `NAR_READ_AHEAD` frames.
    let storage = state.storage.clone();
    let body = stream::iter(parts)
        .map(move |part| {
            let storage = storage.clone();
            async move {
                storage
                    .get_bytes(&part.key, part.offset, part.length)
                    .await
                    .map_err(std::io::Error::other)
            }
        })
        .buffered(NAR_READ_AHEAD);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-nix-nar"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(content_length)),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// `<52 base-32 characters>.nar.zst`, anything else is a 400: names are
/// checked before any lookup, so the answer never depends on what exists.
fn parse_nar_file_name(file: &str) -> Result<NarHash, ApiError> {
    let invalid = || {
        ApiError::bad_request(format!(
            "invalid NAR file name {:?}: expected <nix-base32 NAR hash>{NAR_EXTENSION}",
            file.chars().take(80).collect::<String>()
        ))
    };
    let digest = file.strip_suffix(NAR_EXTENSION).ok_or_else(invalid)?;
    if digest.len() != base32::encoded_len(32) {
        return Err(invalid());
    }
    Sha256Hash::from_base32(digest)
        .map(NarHash::from)
        .map_err(|_| invalid())
}

/// One chunk's compressed bytes in storage.
struct ChunkPart {
    key: ObjectKey,
    offset: u64,
    length: u64,
}

/// Checks in the database and in storage that every chunk is there, and
/// returns where to read each from.
async fn check_chunks_available(
    state: &AppState,
    nar_hash: &NarHash,
    chunks: &[NarChunk],
) -> Result<Vec<ChunkPart>, ApiError> {
    let unavailable = || {
        ApiError::Unavailable(format!(
            "part of NAR {nar_hash} is missing from storage; try again later"
        ))
    };
    let mut parts = Vec::with_capacity(chunks.len());
    for NarChunk { chunk, .. } in chunks {
        let location = match (&chunk.state, &chunk.location) {
            (StoreState::Valid, Some(location)) => location,
            _ => return Err(unavailable()),
        };
        let key = ObjectKey::new(location.object_key.clone()).map_err(ApiError::internal)?;
        parts.push(ChunkPart {
            key,
            offset: location.offset,
            length: location.length,
        });
    }
    // Owned inputs: the checks run concurrently, detached from `parts`.
    let checks: Vec<(ObjectKey, u64)> = parts
        .iter()
        .map(|part| (part.key.clone(), part.offset + part.length))
        .collect();
    let storage = state.storage.clone();
    let present: Vec<bool> = stream::iter(checks)
        .map(move |(key, needed)| {
            let storage = storage.clone();
            async move {
                let size = storage.size(&key).await?;
                Ok::<_, StorageError>(size.is_some_and(|size| size >= needed))
            }
        })
        .buffer_unordered(CHUNK_CHECK_CONCURRENCY)
        .try_collect()
        .await
        .map_err(ApiError::internal)?;
    if !present.into_iter().all(|present| present) {
        tracing::error!(%nar_hash, "a chunk of a valid NAR is missing from storage");
        return Err(unavailable());
    }
    Ok(parts)
}

/// The `.ls` listing of an object's NAR, computed by reading the NAR
/// through the strict reader chunk by chunk (bounded memory: one chunk at a
/// time, plus the listing itself).
async fn nar_listing(state: &AppState, found: &ObjectWithNar) -> Result<Vec<u8>, ApiError> {
    let chunks = state
        .database
        .chunks_of_nar(found.nar.id)
        .await
        .map_err(ApiError::internal)?;
    let parts = check_chunks_available(state, &found.nar.nar_hash, &chunks).await?;
    let mut reader = NarReader::with_listing();
    for (part, NarChunk { chunk, .. }) in parts.iter().zip(&chunks) {
        let compressed = state
            .storage
            .get_bytes(&part.key, part.offset, part.length)
            .await
            .map_err(ApiError::internal)?;
        let capacity = usize::try_from(chunk.chunk_size).map_err(ApiError::internal)?;
        let bytes = zstd::bulk::decompress(&compressed, capacity).map_err(ApiError::internal)?;
        reader.update(&bytes).map_err(ApiError::internal)?;
    }
    let summary = reader.finish().map_err(ApiError::internal)?;
    let listing = summary
        .listing
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("the NAR reader made no listing")))?;
    Ok(listing.to_json())
}
