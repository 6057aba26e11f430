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
//! that and no more; its body walks the chunk list a page at a time and
//! reads each frame from storage, a few ahead, once per run of repeats.
//! The database's `valid` state is the truth: storage is not asked about
//! every chunk first, and a chunk found missing mid-stream aborts the
//! connection (an error in the body, never a complete 200 cut short), so
//! that Nix retries or tries another cache. A `.ls` listing is read from
//! the database, where the chunker stored it, never recomputed.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use futures::stream::{self, Stream, TryStreamExt};
use futures::FutureExt;

use common::cache_name::CacheName;
use common::db::{Cache, ChunkLocation, Database, DbError, Nar, NarId, ObjectWithNar, StoreState};
use common::nix::cache_info::NixCacheInfo;
use common::nix::narinfo::{Compression, NarInfo};
use common::nix::{base32, NarHash, Sha256Hash, StorePath, StorePathHash};
use common::storage::{ObjectKey, Storage, StorageError};

use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::{AppState, ServedCache};

/// How many chunk frames of a NAR are read ahead of the one being sent.
const NAR_READ_AHEAD: usize = 4;

/// Entries of a NAR's chunk list read per database round trip while it
/// streams: the list of a NAR of any length is read in bounded memory.
const CHUNK_LIST_PAGE: u32 = 1024;

/// How many distinct frames a NAR download remembers after reading them,
/// so that a chunk repeated nearby (a NAR of zeros is one chunk, listed
/// once per 16 KiB at most) is read from storage once, not once per entry.
const RECENT_FRAMES: usize = 4;

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
/// zstd frame, concatenated. The headers cost one database lookup; the
/// body is read as it is sent (see the module documentation), and a chunk
/// missing from storage aborts it.
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
    let content_length = nar.file_size.ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "NAR {nar_hash} is valid but has no file size"
        ))
    })?;
    let body = nar_body(state.database.clone(), state.storage.clone(), nar);
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

/// Why a NAR's body stopped before its end. Cloneable, so that a frame
/// read once can be handed to every repeat of its chunk.
#[derive(Debug, Clone, thiserror::Error)]
enum NarBodyError {
    #[error("reading the chunk list")]
    Database(#[source] Arc<DbError>),
    #[error("the chunk list does not match the NAR row: {0}")]
    ChunkList(String),
    #[error("reading chunk object {key}")]
    Storage {
        key: String,
        #[source]
        source: Arc<StorageError>,
    },
}

/// The body of a NAR: its chunks' frames in order, read as it is sent,
/// [`NAR_READ_AHEAD`] frames ahead (so that storage latency overlaps the
/// network) with memory bounded by those and [`RECENT_FRAMES`]. Nothing is
/// read until the body is polled, so a `HEAD` reads nothing. The first
/// error is logged and ends the body with an error, which makes hyper drop
/// the connection: the client sees a download cut short, never a
/// complete response.
fn nar_body(
    database: Database,
    storage: Arc<dyn Storage>,
    nar: Nar,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let nar_hash = nar.nar_hash;
    let mut recent = RecentFrames {
        storage: storage.clone(),
        frames: VecDeque::with_capacity(RECENT_FRAMES),
    };
    chunk_locations(database.clone(), nar)
        .map_ok(move |location| recent.frame(location))
        .try_buffered(NAR_READ_AHEAD)
        .map_err(move |error| {
            let missing = matches!(
                &error,
                NarBodyError::Storage { source, .. } if matches!(**source, StorageError::NotFound(_))
            );
            // A missing or short object withdraws the NARs of the chunks in
            // it (this one included), so that Nix's retry finds the path
            // gone and a push heals it.
            if let NarBodyError::Storage { source, .. } = &error {
                common::integrity::check_after_read_failure(&database, &storage, source);
            }
            let error = anyhow::Error::new(error);
            if missing {
                tracing::error!(
                    %nar_hash,
                    error = format!("{error:#}"),
                    "a chunk of a valid NAR is missing from storage; aborting its download"
                );
            } else {
                tracing::error!(
                    %nar_hash,
                    error = format!("{error:#}"),
                    "reading a NAR failed mid-stream; aborting its download"
                );
            }
            std::io::Error::other(error)
        })
}

/// Where each chunk of a NAR is, in order, read from the database a page
/// at a time. Checked against the NAR row as it goes: exactly `n_chunks`
/// entries, numbered in order, each chunk stored, their frames adding up
/// to `file_size` (the Content-Length already sent). A list that ends
/// early (GC deleted the NAR meanwhile) is an error, not a short body.
fn chunk_locations(
    database: Database,
    nar: Nar,
) -> impl Stream<Item = Result<ChunkLocation, NarBodyError>> + Send + 'static {
    struct Cursor {
        database: Database,
        nar_id: NarId,
        n_chunks: u32,
        file_size: Option<u64>,
        next_seq: u32,
        bytes: u64,
    }
    let cursor = Cursor {
        database,
        nar_id: nar.id,
        n_chunks: nar.n_chunks,
        file_size: nar.file_size,
        next_seq: 0,
        bytes: 0,
    };
    stream::try_unfold(cursor, |mut cursor| async move {
        if cursor.next_seq == cursor.n_chunks {
            if Some(cursor.bytes) != cursor.file_size {
                return Err(NarBodyError::ChunkList(format!(
                    "its frames add up to {} bytes, not {:?}",
                    cursor.bytes, cursor.file_size
                )));
            }
            return Ok(None);
        }
        let page = cursor
            .database
            .chunks_of_nar_from(cursor.nar_id, cursor.next_seq, CHUNK_LIST_PAGE)
            .await
            .map_err(|error| NarBodyError::Database(Arc::new(error)))?;
        if page.is_empty() {
            return Err(NarBodyError::ChunkList(format!(
                "it ends after {} of {} entries",
                cursor.next_seq, cursor.n_chunks
            )));
        }
        let mut locations = Vec::with_capacity(page.len());
        for entry in page {
            if entry.seq != cursor.next_seq || entry.seq >= cursor.n_chunks {
                return Err(NarBodyError::ChunkList(format!(
                    "entry {} where {} of {} was expected",
                    entry.seq, cursor.next_seq, cursor.n_chunks
                )));
            }
            let location = match (entry.chunk.state, entry.chunk.location) {
                (StoreState::Valid, Some(location)) => location,
                (state, _) => {
                    return Err(NarBodyError::ChunkList(format!(
                        "entry {} is a chunk in state {state}",
                        entry.seq
                    )))
                }
            };
            cursor.bytes += location.length;
            cursor.next_seq += 1;
            locations.push(location);
        }
        Ok(Some((locations, cursor)))
    })
    .map_ok(|page| stream::iter(page.into_iter().map(Ok)))
    .try_flatten()
}

/// A chunk frame being read, or read: shared by every entry that repeats
/// the chunk while it is remembered.
type Frame = Shared<BoxFuture<'static, Result<Bytes, NarBodyError>>>;

/// The frames a download read last, by location.
struct RecentFrames {
    storage: Arc<dyn Storage>,
    /// Oldest first, at most [`RECENT_FRAMES`].
    frames: VecDeque<(ChunkLocation, Frame)>,
}

impl RecentFrames {
    /// The frame at `location`: one remembered, or a new read (which is
    /// remembered in place of the oldest).
    fn frame(&mut self, location: ChunkLocation) -> Frame {
        if let Some((_, frame)) = self.frames.iter().find(|(seen, _)| *seen == location) {
            return frame.clone();
        }
        let storage = self.storage.clone();
        let read = location.clone();
        let frame = async move {
            let storage_error = |source| NarBodyError::Storage {
                key: read.object_key.clone(),
                source: Arc::new(source),
            };
            let key = ObjectKey::new(read.object_key.as_str()).map_err(storage_error)?;
            storage
                .get_bytes(&key, read.offset, read.length)
                .await
                .map_err(storage_error)
        }
        .boxed()
        .shared();
        if self.frames.len() == RECENT_FRAMES {
            self.frames.pop_front();
        }
        self.frames.push_back((location, frame.clone()));
        frame
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
