//! Packs (issue #16): deleting the empty ones, and compaction.
//!
//! A pack's chunks die one by one as GC deletes their rows; the pack's
//! bytes are freed only when no chunk row names it any more
//! ([`delete_empty_packs`]). Between the two, compaction
//! ([`compact_packs`]) copies the live chunks of packs that are mostly dead
//! (below `compact-below-percent`), or small (under [`SMALL_PACK_BYTES`]:
//! a small NAR's pack, the tail of a big one), into new packs of about
//! [`PACK_TARGET_BYTES`], frame bytes unchanged, moves their rows there in
//! one transaction and retires the old packs. The per-chunk objects of a
//! store written before packs are sources like small packs, so the same
//! step repacks them (`gc-scheduler --repack` runs it to the end).
//!
//! Why this is safe beside uploads and downloads:
//! - a chunk moves only if it is still valid where compaction read it (the
//!   move is a conditional update), so a chunk that changed meanwhile stays
//!   where it is and its copy is dead bytes in the new pack;
//! - frames are copied byte for byte, so a NAR's served size and every
//!   byte offset in it stay the same;
//! - a retired pack is deleted only once it has been retired for
//!   `orphan-grace` (and at least [`PACK_GRACE`]): a download that read a chunk's old location just
//!   before the move still finds the bytes there;
//! - a pack is deleted only while no chunk row names it, checked again when
//!   its row is deleted; nothing ever points a chunk into an existing pack.

use std::time::Duration;

use larder_config::GcConfig;
use larder_db::{ChunkId, ChunkMove, Database, LocatedChunk, NewPack, Timestamp};
use larder_storage::pack::{PackWriter, PACK_TARGET_BYTES};
use larder_storage::{adjacent_runs, ObjectKey, Storage, StorageError};

use super::{delete_objects, GcError, GcReport};

/// Packs smaller than this are merged with others, however live: one
/// request per small NAR's pack would otherwise stay one request per path.
pub const SMALL_PACK_BYTES: u64 = 4 << 20;

/// The most bytes compaction reads from a source in one request.
const READ_PIECE_BYTES: u64 = 8 << 20;

/// How long a pack no chunk row names stays at least, retired or never
/// recorded, whatever `orphan-grace` says: a download reads a page of its
/// NAR's chunk locations, then their bytes as its client takes them, so a
/// location it holds can be minutes old; and a writer records its pack
/// only after writing all of it.
pub const PACK_GRACE: Duration = Duration::from_secs(15 * 60);

/// How long GC leaves a pack no chunk row names: `orphan-grace`, and at
/// least [`PACK_GRACE`].
pub fn pack_grace(config: &GcConfig) -> Duration {
    config.orphan_grace.as_duration().max(PACK_GRACE)
}

/// Deletes the objects of packs no chunk names (retired ones once retired
/// for [`pack_grace`]), then their
/// rows.
pub(super) async fn delete_empty_packs(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let retired_before = now.saturating_sub(pack_grace(config));
    let mut after = 0;
    loop {
        let page = database
            .empty_packs(after, retired_before, config.page_size)
            .await?;
        let Some(last) = page.last().map(|pack| pack.id) else {
            return Ok(());
        };
        let keys = page
            .iter()
            .map(|pack| ObjectKey::new(pack.object_key.as_str()))
            .collect::<Result<Vec<_>, _>>()?;
        delete_objects(storage, keys, config.delete_concurrency).await?;
        let ids: Vec<i64> = page.iter().map(|pack| pack.id).collect();
        report.packs_deleted += database.delete_empty_packs(&ids).await?;
        report.bytes_freed += page.iter().map(|pack| pack.size).sum::<u64>();
        after = last;
    }
}

/// An object compaction takes chunks out of, and retires.
#[derive(Debug, Clone)]
struct Source {
    key: String,
    size: u64,
    live_bytes: u64,
}

/// Sources gathered into one new pack.
#[derive(Debug, Default)]
struct Group {
    sources: Vec<Source>,
    live_bytes: u64,
}

impl Group {
    /// Whether rewriting what is left of the group at the end of a run
    /// gains anything: dead bytes to drop, or objects to merge into one
    /// that is not small itself (so that small packs are not rewritten
    /// run after run while they trickle in). A repack merges whatever is
    /// left.
    fn worth_rewriting(&self, budget: Budget) -> bool {
        let sparse = self
            .sources
            .iter()
            .any(|source| source.live_bytes < source.size);
        let merges = self.sources.len() > 1
            && (self.live_bytes >= SMALL_PACK_BYTES || matches!(budget, Budget::Unbounded));
        sparse || merges
    }
}

/// How much compaction may still copy in this run.
#[derive(Debug, Clone, Copy)]
pub(super) enum Budget {
    Bytes(u64),
    /// `gc-scheduler --repack`: until nothing is left.
    Unbounded,
}

impl Budget {
    fn exhausted(self, spent: u64) -> bool {
        matches!(self, Self::Bytes(most) if spent >= most)
    }
}

/// Compacts sparse packs, merges small ones and repacks per-chunk objects
/// (see the module documentation), copying at most `budget` live bytes.
pub(super) async fn compact_packs(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    budget: Budget,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let mut group = Group::default();
    let mut after = 0;
    'packs: loop {
        let page = database
            .packs_to_compact(
                after,
                config.compact_below_percent * 10,
                SMALL_PACK_BYTES,
                config.page_size,
            )
            .await?;
        let Some(last) = page.last().map(|candidate| candidate.pack.id) else {
            break;
        };
        for candidate in page {
            let source = Source {
                key: candidate.pack.object_key,
                size: candidate.pack.size,
                live_bytes: candidate.live_bytes,
            };
            if add_to_group(database, storage, &mut group, source, now, report).await?
                && budget.exhausted(report.bytes_compacted)
            {
                break 'packs;
            }
        }
        after = last;
    }
    let mut after = ChunkId(0);
    'unpacked: while !budget.exhausted(report.bytes_compacted) {
        let page = database.unpacked_chunks(after, config.page_size).await?;
        let Some(last) = page.last().map(|chunk| chunk.id) else {
            break;
        };
        for LocatedChunk { location, .. } in page {
            // The whole object is the chunk's frame.
            let source = Source {
                key: location.object_key,
                size: location.length,
                live_bytes: location.length,
            };
            if add_to_group(database, storage, &mut group, source, now, report).await?
                && budget.exhausted(report.bytes_compacted)
            {
                break 'unpacked;
            }
        }
        after = last;
    }
    if group.worth_rewriting(budget) {
        rewrite(database, storage, std::mem::take(&mut group), now, report).await?;
    }
    Ok(())
}

/// Adds `source` to the group, rewriting the group once it holds a pack's
/// worth. Returns whether it rewrote.
async fn add_to_group(
    database: &Database,
    storage: &dyn Storage,
    group: &mut Group,
    source: Source,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<bool, GcError> {
    group.live_bytes += source.live_bytes;
    group.sources.push(source);
    if group.live_bytes < PACK_TARGET_BYTES {
        return Ok(false);
    }
    rewrite(database, storage, std::mem::take(group), now, report).await?;
    Ok(true)
}

/// Copies the live chunks of the group's sources into one new pack, moves
/// their rows there and retires the sources. A source that cannot be read
/// (gone from storage) is left as it is, for scrub to find.
async fn rewrite(
    database: &Database,
    storage: &dyn Storage,
    group: Group,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let keys: Vec<&str> = group
        .sources
        .iter()
        .map(|source| source.key.as_str())
        .collect();
    let chunks = database.valid_chunks_in_objects(&keys).await?;
    let mut slot = Some(PackWriter::create(storage).await?);
    let mut moves: Vec<ChunkMove> = Vec::with_capacity(chunks.len());
    let mut retire: Vec<(String, u64)> = Vec::with_capacity(group.sources.len());
    for source in &group.sources {
        let first = chunks.partition_point(|chunk| chunk.location.object_key < source.key);
        let last = chunks.partition_point(|chunk| chunk.location.object_key <= source.key);
        match copy_source(storage, &mut slot, &chunks[first..last]).await {
            Ok(copied) => {
                moves.extend(copied);
                retire.push((source.key.clone(), source.size));
            }
            Err(StorageError::NotFound(key)) => {
                tracing::error!(%key, "an object to compact is missing from storage; leaving its chunks where they are");
            }
            Err(error) => return Err(error.into()),
        }
    }
    let Some(pack) = slot.filter(|_| !retire.is_empty()) else {
        return Ok(());
    };
    let (key, size) = pack.finish(storage).await?;
    let new_pack = NewPack {
        object_key: key.to_string(),
        size,
    };
    database
        .relocate_chunks(&new_pack, &moves, &retire, now)
        .await?;
    report.packs_compacted += retire.len() as u64;
    report.bytes_compacted += size;
    Ok(())
}

/// Reads `chunks` (the valid chunks of one source, by offset; adjacent
/// frames in one request) and appends their frames to the pack in `slot`,
/// which stays there unless appending failed.
async fn copy_source(
    storage: &dyn Storage,
    slot: &mut Option<PackWriter>,
    chunks: &[LocatedChunk],
) -> Result<Vec<ChunkMove>, StorageError> {
    let mut moves = Vec::with_capacity(chunks.len());
    for piece in adjacent_pieces(chunks) {
        let from = &piece[0].location;
        let end = piece[piece.len() - 1].location.offset + piece[piece.len() - 1].location.length;
        let key = ObjectKey::new(from.object_key.as_str())?;
        let bytes = storage
            .get_bytes(&key, from.offset, end - from.offset)
            .await?;
        let piece: Vec<LocatedChunk> = piece.to_vec();
        let start = from.offset;
        let Some(mut pack) = slot.take() else {
            unreachable!("the slot is refilled after every successful append");
        };
        // Appending writes to a file on local storage: a blocking call.
        let (pack, placed) = tokio::task::spawn_blocking(move || {
            let mut placed = Vec::with_capacity(piece.len());
            for chunk in piece {
                let at = (chunk.location.offset - start) as usize;
                let range = pack.append(&bytes[at..at + chunk.location.length as usize])?;
                placed.push(ChunkMove {
                    id: chunk.id,
                    from: chunk.location,
                    new_offset: range.offset,
                });
            }
            Ok::<_, StorageError>((pack, placed))
        })
        .await
        .map_err(|error| StorageError::Io {
            key: key.to_string(),
            source: std::io::Error::other(format!("the copying thread failed: {error}")),
        })??;
        *slot = Some(pack);
        moves.extend(placed);
    }
    Ok(moves)
}

/// Splits chunks of one object, by offset, into pieces of adjacent frames
/// of at most [`READ_PIECE_BYTES`] (or one frame, if bigger).
fn adjacent_pieces(chunks: &[LocatedChunk]) -> Vec<&[LocatedChunk]> {
    adjacent_runs(chunks, READ_PIECE_BYTES, |chunk| {
        Some((chunk.location.offset, chunk.location.length))
    })
}
