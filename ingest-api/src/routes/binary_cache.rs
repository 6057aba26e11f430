//! Nix's binary-cache protocol, read side: `nix-cache-info`, narinfos
//! (signed on the fly with the cache's key), NARs streamed from their
//! chunks, and `.ls` listings.
//!
//! Every lookup goes through the asking cache: a narinfo comes from an
//! object of that cache, and a NAR is served under a cache only while an
//! object of that cache points at it.
//!
//! What a read costs is bounded by what it returns. A NAR's headers need
//! one database lookup (its row holds its served size), so a `HEAD` costs
//! that and no more; its body (`nar_body`) walks the chunk list a page at
//! a time and reads frames from storage in a few long ranged reads. A
//! `Range` request is answered 206 with those bytes alone (Nix resumes an
//! interrupted download with one); reaching its start sums frame lengths
//! in the database, without reading storage. The database's `valid` state
//! is the truth: storage is not asked about every chunk first, and data
//! found missing mid-stream aborts the connection (an error in the body,
//! never a complete answer cut short), so that Nix retries or tries
//! another cache. A `.ls` listing is read from the database, where the
//! chunker stored it, never recomputed.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use larder_db::{Cache, NarId, ObjectWithNar};
use larder_nix::cache_info::NixCacheInfo;
use larder_nix::nar_file::{NarFileCompression, NarFileName};
use larder_nix::narinfo::{Compression, NarInfo};
use larder_nix::{NarHash, StorePath, StorePathHash};

use super::nar_body::{nar_body, ByteRange};
use super::nar_transcode::transcode;
use super::parse_cache_name;
use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::{AppState, ServedCache};

const NAR_EXTENSION: &str = ".nar.zst";

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
            let listing = nar_listing(&state, found.nar.id).await?;
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

/// The narinfo of an object, with the pusher's signatures and the cache's
/// (its current key's and, during a key rotation, its next key's).
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
    for key in served.keys.iter() {
        narinfo.sign(key, &cache.store_dir);
    }
    Ok(narinfo)
}

/// `GET /{cache}/nar/{nar hash}.nar.zst`: the NAR's chunks, each a zstd
/// frame, concatenated; or one byte range of that (`Range: bytes=…`,
/// answered 206). The headers cost one database lookup; the body is read
/// as it is sent (see [`nar_body`]), and data missing from storage aborts
/// it.
pub async fn nar(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // A range is only honoured unconditionally: `If-Range` names a
    // validator, and NAR answers carry none, so it never matches.
    let range = if headers.contains_key(header::IF_RANGE) {
        None
    } else {
        headers.get(header::RANGE)
    };
    serve_nar(state, caller, cache, file, range).await
}

/// The NAR answer without its body's bytes, for `HEAD` (whose `Range`
/// means nothing: a `HEAD` answers as the whole `GET` would).
pub async fn nar_head(
    state: AppState,
    caller: Caller,
    cache: String,
    file: String,
) -> Result<Response, ApiError> {
    serve_nar(state, caller, cache, file, None).await
}

async fn serve_nar(
    state: AppState,
    caller: Caller,
    cache: String,
    file: String,
    range: Option<&HeaderValue>,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    let file_name = NarFileName::parse(&file).map_err(ApiError::bad_request)?;
    let served = state.readable_cache(&caller, &name).await?;
    let valid_in_cache = |nar_hash: NarHash| {
        let database = state.database.clone();
        let cache_id = served.cache.id;
        async move {
            database
                .valid_nar_in_cache(cache_id, &nar_hash)
                .await
                .map_err(ApiError::internal)
        }
    };
    // Larder's own name (the NAR hash, `.nar.zst`), else a name a pusher
    // gave the NAR it uploaded to this cache (see `nar_transcode`).
    let own = match file_name.compression() {
        NarFileCompression::Zstd => valid_in_cache(NarHash::from(*file_name.file_hash())).await?,
        NarFileCompression::None | NarFileCompression::Xz => None,
    };
    let nar = match own {
        Some(nar) => nar,
        None => {
            let pushed = state
                .database
                .nar_of_pushed_file(served.cache.id, &file)
                .await
                .map_err(ApiError::internal)?
                .ok_or(ApiError::NoSuchPath)?;
            valid_in_cache(pushed).await?.ok_or(ApiError::NoSuchPath)?
        }
    };
    let nar_hash = nar.nar_hash;
    state.access_log.record_nar(served.cache.id, nar.id);
    if file_name.compression() != NarFileCompression::Zstd {
        // Decompressed (and for `.nar.xz` compressed again): no ranges,
        // and for xz no length known before the end.
        let whole = nar
            .file_size
            .and_then(|size| size.checked_sub(1))
            .map(|last| ByteRange { first: 0, last });
        let whole = whole.ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("NAR {nar_hash} is valid but has no bytes"))
        })?;
        let nar_size = nar.nar_size;
        let frames = nar_body(state.database.clone(), state.storage.clone(), nar, whole);
        let mut response = Response::new(Body::from_stream(transcode(
            Box::pin(frames),
            file_name.compression(),
        )));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-nix-nar"),
        );
        if file_name.compression() == NarFileCompression::None {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(nar_size));
        }
        return Ok(response);
    }
    let file_size = nar.file_size.ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "NAR {nar_hash} is valid but has no file size"
        ))
    })?;
    // A valid NAR has at least one frame, of at least one byte.
    let whole = file_size
        .checked_sub(1)
        .map(|last| ByteRange { first: 0, last })
        .ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("NAR {nar_hash} is valid but has no bytes"))
        })?;
    let range = match range.map(|value| parse_range(value.as_bytes(), file_size)) {
        None | Some(RangeRequest::Ignored) => None,
        Some(RangeRequest::Satisfiable(range)) => Some(range),
        Some(RangeRequest::Unsatisfiable) => {
            return Err(ApiError::RangeNotSatisfiable { size: file_size })
        }
    };
    let body = Body::from_stream(nar_body(
        state.database.clone(),
        state.storage.clone(),
        nar,
        range.unwrap_or(whole),
    ));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    match range {
        None => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file_size));
        }
        Some(range) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(range.len()));
            let content_range = format!("bytes {}-{}/{file_size}", range.first, range.last);
            // Digits, '-', '/' and a space: always a valid header value.
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::try_from(content_range).map_err(ApiError::internal)?,
            );
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
    }
    Ok(response)
}

/// What a `Range` header asks of a NAR of a given size.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Not a single byte range in a form this server reads (another unit,
    /// several ranges, bad syntax): the whole NAR is sent, as RFC 9110
    /// allows.
    Ignored,
    /// One range, cut to the NAR's end.
    Satisfiable(ByteRange),
    /// One range that selects no byte of the NAR: a 416.
    Unsatisfiable,
}

/// Reads `bytes=FIRST-LAST`, `bytes=FIRST-` or `bytes=-SUFFIX` (RFC 9110
/// §14.1.2) against a NAR of `size` bytes (never 0: a NAR has at least one
/// frame).
fn parse_range(value: &[u8], size: u64) -> RangeRequest {
    let Ok(value) = std::str::from_utf8(value) else {
        return RangeRequest::Ignored;
    };
    let Some((unit, spec)) = value.split_once('=') else {
        return RangeRequest::Ignored;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignored;
    };
    // Digits only; a number too long for u64 is past any NAR's end.
    let number = |text: &str| {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse::<u64>().unwrap_or(u64::MAX))
    };
    match (number(first), last.is_empty(), number(last)) {
        (Some(first), true, _) => {
            if first >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Satisfiable(ByteRange {
                    first,
                    last: size - 1,
                })
            }
        }
        (Some(first), false, Some(last)) => {
            if last < first || first >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Satisfiable(ByteRange {
                    first,
                    last: last.min(size - 1),
                })
            }
        }
        (None, false, Some(suffix)) if first.is_empty() => {
            if suffix == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Satisfiable(ByteRange {
                    first: size - suffix.min(size),
                    last: size - 1,
                })
            }
        }
        _ => RangeRequest::Ignored,
    }
}

/// The `.ls` listing of a NAR, as the chunker stored it. A NAR without one
/// (stored before listings were kept, or with a listing over the chunker's
/// budget) is a 404, as for a path that is not there: Nix reads that as
/// "no listing".
async fn nar_listing(state: &AppState, nar_id: NarId) -> Result<Vec<u8>, ApiError> {
    let listing = state
        .database
        .nar_listing(nar_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchPath)?;
    // Decompressing is CPU work in proportion to the listing.
    tokio::task::spawn_blocking(move || listing.decode())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u64, last: u64) -> RangeRequest {
        RangeRequest::Satisfiable(ByteRange { first, last })
    }

    #[test]
    fn single_byte_ranges_are_read_and_cut_to_the_end() {
        let size = 1000;
        for (header, expected) in [
            ("bytes=0-0", range(0, 0)),
            ("bytes=0-999", range(0, 999)),
            ("bytes=10-19", range(10, 19)),
            ("bytes=500-", range(500, 999)),
            ("bytes=500-5000", range(500, 999)),
            ("bytes=-1", range(999, 999)),
            ("bytes=-1000", range(0, 999)),
            ("bytes=-5000", range(0, 999)),
            ("Bytes = 1-2", range(1, 2)),
            ("bytes=1-99999999999999999999999", range(1, 999)),
        ] {
            assert_eq!(parse_range(header.as_bytes(), size), expected, "{header}");
        }
    }

    #[test]
    fn ranges_selecting_nothing_are_unsatisfiable() {
        for header in [
            "bytes=1000-",
            "bytes=1000-1000",
            "bytes=5-4",
            "bytes=-0",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(
                parse_range(header.as_bytes(), 1000),
                RangeRequest::Unsatisfiable,
                "{header}"
            );
        }
    }

    #[test]
    fn other_forms_are_ignored_and_the_whole_nar_is_sent() {
        for header in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=1",
            "bytes=+1-2",
            "bytes=--1",
            "0-1",
        ] {
            assert_eq!(
                parse_range(header.as_bytes(), 1000),
                RangeRequest::Ignored,
                "{header}"
            );
        }
        assert_eq!(parse_range(b"bytes=\xff-1", 1000), RangeRequest::Ignored);
    }
}
