//! The global store: `nars` by NAR hash, `chunks` by the SHA-256 of their
//! uncompressed bytes, and `nar_chunks`, the ordered chunk list of each NAR.
//!
//! The pipeline's protocol over these tables, each step idempotent under
//! at-least-once delivery:
//!
//! 1. chunker: [`Database::insert_nar_pending`] (one row per hash however
//!    many uploads race), [`Database::upsert_chunks`] for the NAR's chunks
//!    (new ones `pending`) as it cuts them, then
//!    [`Database::set_nar_chunks`] with their ids in order, then
//!    [`Database::mark_nar_valid_if_complete`].
//! 2. compressor: [`Database::set_chunks_stored`] per job's new chunks, then
//!    [`Database::mark_nar_valid_if_complete`] for its NAR and each NAR of
//!    [`Database::pending_nars_of_chunks`]: whichever step comes last
//!    finalises the NAR.
//!
//! A chunk's location is a byte range of a storage object (key, offset,
//! length), so that packing many chunks into one object can come later
//! without a schema change.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::any::AnyRow;

use super::error::{constraint_error, query_error, DbError, Result};
use super::packs::{insert_pack_on, ChunkLocation, NewPack};
use super::row::{
    chunk_hash_col, i64_col, nar_hash_col, opt_string_col, opt_u32_col, opt_u64_col, state_col,
    time_col, to_i64, u32_col, u64_col,
};
use super::types::{CacheId, ChunkId, NarId, StoreState, Timestamp};
use super::{placeholders, Backend, Database, MAX_IN_LIST};
use crate::chunking::{max_chunk_entries, MIN_CHUNK_SIZE};
use larder_nix::{NarHash, Sha256Hash};

/// A NAR row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nar {
    pub id: NarId,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub state: StoreState,
    /// 0 until the chunker has recorded the chunk list.
    pub n_chunks: u32,
    /// The size of the NAR as served: the sum of its compressed chunks.
    /// Set when the NAR becomes valid.
    pub file_size: Option<u64>,
    pub created_at: Timestamp,
}

/// A chunk row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub id: ChunkId,
    /// SHA-256 of the uncompressed bytes.
    pub chunk_hash: Sha256Hash,
    /// Uncompressed size in bytes.
    pub chunk_size: u64,
    pub state: StoreState,
    /// Set once the chunk is stored (always when `valid`).
    pub location: Option<ChunkLocation>,
    pub created_at: Timestamp,
}

/// One entry of a NAR's chunk list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarChunk {
    pub seq: u32,
    pub chunk: Chunk,
    /// The `seq` of the list's next entry with the same chunk, if any
    /// (`None` too for lists recorded before this was kept).
    pub next_use: Option<u32>,
}

/// A chunk the chunker found, to look up or create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewChunk {
    pub chunk_hash: Sha256Hash,
    pub chunk_size: u64,
}

/// A chunk already in storage, for [`Database::store_complete_nar`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    pub chunk_hash: Sha256Hash,
    pub chunk_size: u64,
    pub location: ChunkLocation,
}

/// Column names of a NAR in a result row: plain, or aliased in a join.
pub(crate) struct NarColumns {
    id: &'static str,
    nar_hash: &'static str,
    nar_size: &'static str,
    state: &'static str,
    n_chunks: &'static str,
    file_size: &'static str,
    created_at: &'static str,
}

pub(crate) const NAR: NarColumns = NarColumns {
    id: "id",
    nar_hash: "nar_hash",
    nar_size: "nar_size",
    state: "state",
    n_chunks: "n_chunks",
    file_size: "file_size",
    created_at: "created_at",
};

pub(crate) const NAR_COLUMNS: &str =
    "id, nar_hash, nar_size, state, n_chunks, file_size, created_at";

/// The names [`JOINED_NAR_SELECT`] gives the columns of `nars n`.
pub(crate) const JOINED_NAR: NarColumns = NarColumns {
    id: "n_id",
    nar_hash: "n_nar_hash",
    nar_size: "n_nar_size",
    state: "n_state",
    n_chunks: "n_n_chunks",
    file_size: "n_file_size",
    created_at: "n_created_at",
};

pub(crate) const JOINED_NAR_SELECT: &str = "n.id AS n_id, n.nar_hash AS n_nar_hash, \
    n.nar_size AS n_nar_size, n.state AS n_state, n.n_chunks AS n_n_chunks, \
    n.file_size AS n_file_size, n.created_at AS n_created_at";

pub(crate) fn nar_from_row(row: &AnyRow, columns: &NarColumns) -> Result<Nar> {
    Ok(Nar {
        id: NarId(i64_col(row, columns.id)?),
        nar_hash: nar_hash_col(row, columns.nar_hash)?,
        nar_size: u64_col(row, columns.nar_size)?,
        state: state_col(row, columns.state)?,
        n_chunks: u32_col(row, columns.n_chunks)?,
        file_size: opt_u64_col(row, columns.file_size)?,
        created_at: time_col(row, columns.created_at)?,
    })
}

pub(crate) const CHUNK_COLUMNS: &str =
    "id, chunk_hash, chunk_size, state, object_key, object_offset, object_length, created_at";

/// [`CHUNK_COLUMNS`] qualified with the alias `c`, for joins.
const CHUNK_COLUMNS_C: &str = "c.id, c.chunk_hash, c.chunk_size, c.state, c.object_key, \
    c.object_offset, c.object_length, c.created_at";

pub(crate) fn chunk_from_row(row: &AnyRow) -> Result<Chunk> {
    let location = match (
        opt_string_col(row, "object_key")?,
        opt_u64_col(row, "object_offset")?,
        opt_u64_col(row, "object_length")?,
    ) {
        (Some(object_key), Some(offset), Some(length)) => Some(ChunkLocation {
            object_key,
            offset,
            length,
        }),
        _ => None,
    };
    Ok(Chunk {
        id: ChunkId(i64_col(row, "id")?),
        chunk_hash: chunk_hash_col(row, "chunk_hash")?,
        chunk_size: u64_col(row, "chunk_size")?,
        state: state_col(row, "state")?,
        location,
        created_at: time_col(row, "created_at")?,
    })
}

type Tx = sqlx::AnyConnection;

async fn nar_by_hash_on(connection: &mut Tx, nar_hash: &NarHash) -> Result<Option<Nar>> {
    let sql = format!("SELECT {NAR_COLUMNS} FROM nars WHERE nar_hash = $1");
    let row = sqlx::query(&sql)
        .bind(nar_hash.to_string())
        .fetch_optional(&mut *connection)
        .await
        .map_err(query_error("looking up a NAR"))?;
    row.map(|row| nar_from_row(&row, &NAR)).transpose()
}

/// Inserts the NAR as `pending` unless its hash exists, then reads the row:
/// a single-statement insert, so racing callers end with one row.
async fn insert_nar_pending_on(
    connection: &mut Tx,
    nar_hash: &NarHash,
    nar_size: u64,
    at: Timestamp,
) -> Result<(Nar, bool)> {
    let inserted = sqlx::query(
        "INSERT INTO nars (nar_hash, nar_size, state, n_chunks, created_at) \
         VALUES ($1, $2, 'pending', 0, $3) ON CONFLICT (nar_hash) DO NOTHING",
    )
    .bind(nar_hash.to_string())
    .bind(to_i64("NAR size", nar_size)?)
    .bind(at.unix_millis())
    .execute(&mut *connection)
    .await
    .map_err(query_error("inserting a NAR"))?
    .rows_affected()
        > 0;
    let nar = nar_by_hash_on(connection, nar_hash)
        .await?
        .ok_or_else(|| DbError::NotFound {
            // Only GC deletes NARs, and only unreferenced ones: a NAR
            // deleted between the two statements is that race.
            what: format!("NAR {nar_hash} (deleted while being inserted)"),
        })?;
    if nar.nar_size != nar_size {
        return Err(DbError::Conflict {
            what: format!("NAR {nar_hash} with size {} (not {nar_size})", nar.nar_size),
        });
    }
    Ok((nar, inserted))
}

/// Looks up or creates chunks, replacing `deleting` ones; see
/// [`Database::upsert_chunks`].
async fn upsert_chunks_on(
    connection: &mut Tx,
    chunks: &[NewChunk],
    at: Timestamp,
) -> Result<Vec<Chunk>> {
    // Distinct hashes in sorted order: every transaction then takes the
    // unique-index locks of shared chunks in the same order, so two
    // chunkers on NARs that share chunks cannot deadlock on PostgreSQL.
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for new in chunks {
        let hash = new.chunk_hash.to_hex();
        if let Some(&size) = sizes.get(&hash) {
            if size != new.chunk_size {
                return Err(DbError::InvalidInput {
                    what: "chunk list",
                    reason: format!(
                        "chunk {hash} given with sizes {size} and {}",
                        new.chunk_size
                    ),
                });
            }
        }
        sizes.insert(hash, new.chunk_size);
    }
    let sizes: Vec<(String, u64)> = sizes.into_iter().collect();
    let mut rows: HashMap<String, Chunk> = HashMap::with_capacity(sizes.len());
    // Three bind parameters per row in the INSERT.
    for batch in sizes.chunks(MAX_IN_LIST / 3) {
        let list = placeholders(1, batch.len());
        // A chunk GC has claimed may already be gone from storage, or be
        // going at any moment: its row is dropped and a fresh one inserted
        // below, so the chunk comes back with a new id, hence a new object
        // key that GC's pending delete of the old key cannot touch. GC
        // claims only chunks no NAR lists, so nothing refers to the row.
        let sql = format!("DELETE FROM chunks WHERE state = 'deleting' AND chunk_hash IN ({list})");
        let mut drop_claimed = sqlx::query(&sql);
        for (hash, _) in batch {
            drop_claimed = drop_claimed.bind(hash.as_str());
        }
        drop_claimed
            .execute(&mut *connection)
            .await
            .map_err(query_error("replacing chunks claimed by GC"))?;

        let values = (0..batch.len())
            .map(|i| format!("(${}, ${}, 'pending', $1, $1)", 2 * i + 2, 2 * i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        // An existing chunk is stamped as just linked, so that GC leaves it
        // alone while this chunker is still cutting the rest of its NAR.
        let sql = format!(
            "INSERT INTO chunks (chunk_hash, chunk_size, state, created_at, linked_at) \
             VALUES {values} \
             ON CONFLICT (chunk_hash) DO UPDATE SET linked_at = excluded.linked_at"
        );
        let mut insert = sqlx::query(&sql).bind(at.unix_millis());
        for (hash, size) in batch {
            insert = insert
                .bind(hash.as_str())
                .bind(to_i64("chunk size", *size)?);
        }
        insert
            .execute(&mut *connection)
            .await
            .map_err(query_error("inserting chunks"))?;

        let sql = format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE chunk_hash IN ({list})");
        let mut select = sqlx::query(&sql);
        for (hash, _) in batch {
            select = select.bind(hash.as_str());
        }
        let found = select
            .fetch_all(&mut *connection)
            .await
            .map_err(query_error("reading chunks"))?;
        for row in &found {
            let chunk = chunk_from_row(row)?;
            rows.insert(chunk.chunk_hash.to_hex(), chunk);
        }
    }
    chunks
        .iter()
        .map(|new| {
            let hash = new.chunk_hash.to_hex();
            let chunk = rows.get(&hash).ok_or_else(|| DbError::NotFound {
                // Only GC deletes chunks, and only `deleting` ones, which
                // the statements above replaced: this is that race.
                what: format!("chunk {hash} (deleted while being inserted)"),
            })?;
            if chunk.chunk_size != new.chunk_size {
                return Err(DbError::Conflict {
                    what: format!(
                        "chunk {hash} with size {} (not {})",
                        chunk.chunk_size, new.chunk_size
                    ),
                });
            }
            Ok(chunk.clone())
        })
        .collect()
}

async fn set_nar_chunks_on(
    connection: &mut Tx,
    backend: Backend,
    nar_id: NarId,
    chunk_ids: &[ChunkId],
) -> Result<()> {
    let n_chunks = u32::try_from(chunk_ids.len()).map_err(|_| DbError::InvalidInput {
        what: "chunk list",
        reason: format!("{} chunks", chunk_ids.len()),
    })?;
    // Only a pending NAR's list may change: a valid NAR's bytes are
    // being served, and a redelivered job must not touch them. The list's
    // length is bounded by the NAR's size (`chunking::max_chunk_entries`,
    // written out in SQL: both dialects divide integers by truncation),
    // so serving a NAR never walks more entries than its bytes allow.
    let updated = sqlx::query(
        "UPDATE nars SET n_chunks = $2 WHERE id = $1 AND state = 'pending' \
         AND $2 <= nar_size / $3 + 1",
    )
    .bind(nar_id.0)
    .bind(i64::from(n_chunks))
    .bind(i64::from(MIN_CHUNK_SIZE))
    .execute(&mut *connection)
    .await
    .map_err(query_error("recording a NAR's chunk count"))?
    .rows_affected();
    if updated == 0 {
        let sql = format!("SELECT {NAR_COLUMNS} FROM nars WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(nar_id.0)
            .fetch_optional(&mut *connection)
            .await
            .map_err(query_error("looking up a NAR"))?;
        return match row {
            None => Err(DbError::NotFound {
                what: format!("NAR {nar_id}"),
            }),
            Some(row) => {
                let nar = nar_from_row(&row, &NAR)?;
                let most = max_chunk_entries(nar.nar_size);
                if nar.state == StoreState::Pending && u64::from(n_chunks) > most {
                    Err(DbError::InvalidInput {
                        what: "chunk list",
                        reason: format!(
                            "{n_chunks} chunk entries for NAR {} of {} bytes, which can have \
                             at most {most}",
                            nar.nar_hash, nar.nar_size
                        ),
                    })
                } else {
                    Err(DbError::Conflict {
                        what: format!("NAR {} in state {}", nar.nar_hash, nar.state),
                    })
                }
            }
        };
    }
    check_chunks_not_claimed(connection, backend, nar_id, chunk_ids).await?;
    sqlx::query("DELETE FROM nar_chunks WHERE nar_id = $1")
        .bind(nar_id.0)
        .execute(&mut *connection)
        .await
        .map_err(query_error("clearing a NAR's chunk list"))?;
    insert_chunk_list_on(connection, nar_id, chunk_ids).await
}

/// Inserts `chunk_ids` as the chunk list of a NAR that has none (any
/// earlier list deleted by the caller), in batches within the bind
/// parameter limit. The caller has bounded the list's length by the NAR's
/// size.
pub(super) async fn insert_chunk_list_on(
    connection: &mut Tx,
    nar_id: NarId,
    chunk_ids: &[ChunkId],
) -> Result<()> {
    let next_uses = next_uses(chunk_ids);
    // Three bind parameters per row, plus the NAR id.
    let entries: Vec<(usize, (&ChunkId, Option<usize>))> =
        chunk_ids.iter().zip(next_uses).enumerate().collect();
    for batch in entries.chunks(MAX_IN_LIST / 3) {
        let values = (0..batch.len())
            .map(|i| format!("($1, ${}, ${}, ${})", 3 * i + 2, 3 * i + 3, 3 * i + 4))
            .collect::<Vec<_>>()
            .join(", ");
        let sql =
            format!("INSERT INTO nar_chunks (nar_id, seq, chunk_id, next_use) VALUES {values}");
        let mut insert = sqlx::query(&sql).bind(nar_id.0);
        for (seq, (chunk_id, next_use)) in batch {
            // Bounded by `max_chunk_entries` of the NAR's size, far below i64.
            insert = insert
                .bind(*seq as i64)
                .bind(chunk_id.0)
                .bind(next_use.map(|seq| seq as i64));
        }
        insert
            .execute(&mut *connection)
            .await
            .map_err(constraint_error(
                "recording a NAR's chunk list",
                || format!("chunk list of NAR {nar_id}"),
                || format!("a chunk of NAR {nar_id}"),
            ))?;
    }
    Ok(())
}

/// For each entry of a chunk list, the index of the next entry with the
/// same chunk, if any.
fn next_uses(chunk_ids: &[ChunkId]) -> Vec<Option<usize>> {
    let mut next_uses = vec![None; chunk_ids.len()];
    let mut later: HashMap<ChunkId, usize> = HashMap::new();
    for (seq, chunk_id) in chunk_ids.iter().enumerate().rev() {
        next_uses[seq] = later.insert(*chunk_id, seq);
    }
    next_uses
}

/// Fails with [`DbError::Conflict`] unless every chunk of the list exists
/// and is not claimed by GC (`deleting`). GC claims only chunks no NAR
/// lists, so once the list is recorded its chunks are safe; this check
/// closes the window between a chunker finding a chunk and recording the
/// list. On PostgreSQL the rows are share-locked until the commit: GC's
/// claim locks them `FOR UPDATE` first and re-checks `nar_chunks` in a
/// later statement, so it sees this list once it gets the lock; a claim
/// that committed first makes the locked read skip the row. SQLite runs
/// one writer at a time.
async fn check_chunks_not_claimed(
    connection: &mut Tx,
    backend: Backend,
    nar_id: NarId,
    chunk_ids: &[ChunkId],
) -> Result<()> {
    let lock = match backend {
        Backend::Postgres => " FOR SHARE",
        Backend::Sqlite => "",
    };
    let distinct: Vec<i64> = chunk_ids
        .iter()
        .map(|id| id.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut usable = 0;
    for batch in distinct.chunks(MAX_IN_LIST) {
        let sql = format!(
            "SELECT id FROM chunks WHERE id IN ({}) AND state <> 'deleting' ORDER BY id{lock}",
            placeholders(1, batch.len())
        );
        let mut query = sqlx::query(&sql);
        for id in batch {
            query = query.bind(*id);
        }
        usable += query
            .fetch_all(&mut *connection)
            .await
            .map_err(query_error("checking a NAR's chunks"))?
            .len();
    }
    if usable == distinct.len() {
        Ok(())
    } else {
        Err(DbError::Conflict {
            what: format!(
                "chunk list of NAR {nar_id} ({} of its chunks claimed by GC)",
                distinct.len() - usable
            ),
        })
    }
}

async fn mark_nar_valid_if_complete_on(connection: &mut Tx, nar_id: NarId) -> Result<bool> {
    // Every compress job of a NAR ends here, so reading its whole chunk
    // list each time would cost the square of its length. Compressors store
    // a NAR's chunks about in list order, so a chunk still pending is
    // usually among the last: read backwards, the list shows one after a
    // few rows. Only when none shows does the complete check below run.
    let unfinished = sqlx::query(
        "SELECT nc.seq FROM nar_chunks nc JOIN chunks c ON c.id = nc.chunk_id \
         WHERE nc.nar_id = $1 AND c.state <> 'valid' ORDER BY nc.seq DESC LIMIT 1",
    )
    .bind(nar_id.0)
    .fetch_optional(&mut *connection)
    .await
    .map_err(query_error("looking for a NAR's unstored chunks"))?;
    if unfinished.is_some() {
        return Ok(false);
    }
    // One statement, so two compressors finishing at once cannot both miss
    // the moment the last chunk became valid: each sees the other's commit
    // or waits for it.
    sqlx::query(
        "UPDATE nars SET state = 'valid', \
         file_size = (SELECT CAST(SUM(c.object_length) AS BIGINT) FROM nar_chunks nc \
                      JOIN chunks c ON c.id = nc.chunk_id WHERE nc.nar_id = $1) \
         WHERE id = $1 AND state = 'pending' AND n_chunks > 0 \
         AND n_chunks = (SELECT COUNT(*) FROM nar_chunks nc JOIN chunks c ON c.id = nc.chunk_id \
                         WHERE nc.nar_id = $1 AND c.state = 'valid')",
    )
    .bind(nar_id.0)
    .execute(&mut *connection)
    .await
    .map_err(query_error("finalising a NAR"))?;
    let state = sqlx::query("SELECT state FROM nars WHERE id = $1")
        .bind(nar_id.0)
        .fetch_optional(&mut *connection)
        .await
        .map_err(query_error("reading a NAR's state"))?;
    match state {
        None => Err(DbError::NotFound {
            what: format!("NAR {nar_id}"),
        }),
        Some(row) => Ok(state_col(&row, "state")? == StoreState::Valid),
    }
}

impl Database {
    /// The NAR with this hash, if it is `valid` and an object of the cache
    /// points at it: the only way a NAR is reachable for serving, so that
    /// knowing a hash never grants access to another tenant's data.
    pub async fn valid_nar_in_cache(
        &self,
        cache_id: CacheId,
        nar_hash: &NarHash,
    ) -> Result<Option<Nar>> {
        let sql = format!(
            "SELECT {NAR_COLUMNS} FROM nars n WHERE n.nar_hash = $1 AND n.state = 'valid' \
             AND EXISTS (SELECT 1 FROM objects o WHERE o.nar_id = n.id AND o.cache_id = $2)"
        );
        let row = sqlx::query(&sql)
            .bind(nar_hash.to_string())
            .bind(cache_id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a NAR of a cache"))?;
        row.map(|row| nar_from_row(&row, &NAR)).transpose()
    }

    pub async fn nar_by_hash(&self, nar_hash: &NarHash) -> Result<Option<Nar>> {
        let mut connection = self.acquire().await?;
        nar_by_hash_on(&mut connection, nar_hash).await
    }

    pub async fn nar_by_id(&self, nar_id: NarId) -> Result<Option<Nar>> {
        let sql = format!("SELECT {NAR_COLUMNS} FROM nars WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(nar_id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a NAR"))?;
        row.map(|row| nar_from_row(&row, &NAR)).transpose()
    }

    /// The NAR with this hash, created as `pending` if there is none; the
    /// flag says whether this call created it. Concurrent calls for one
    /// hash yield one row. An existing row is returned in whatever state it
    /// is: a `deleting` NAR is GC's and the caller must not link to it.
    /// [`DbError::Conflict`] when the hash exists with another size.
    pub async fn insert_nar_pending(
        &self,
        nar_hash: &NarHash,
        nar_size: u64,
        at: Timestamp,
    ) -> Result<(Nar, bool)> {
        let mut connection = self.acquire().await?;
        insert_nar_pending_on(&mut connection, nar_hash, nar_size, at).await
    }

    /// The chunks of a NAR in `seq` order, with their state and location.
    pub async fn chunks_of_nar(&self, nar_id: NarId) -> Result<Vec<NarChunk>> {
        self.chunks_of_nar_from(nar_id, 0, u32::MAX).await
    }

    /// At most `limit` entries of a NAR's chunk list from `from_seq` on, in
    /// `seq` order: a page, so that a NAR of any length is read in bounded
    /// memory and with a bounded query.
    pub async fn chunks_of_nar_from(
        &self,
        nar_id: NarId,
        from_seq: u32,
        limit: u32,
    ) -> Result<Vec<NarChunk>> {
        let sql = format!(
            "SELECT nc.seq, nc.next_use, {CHUNK_COLUMNS_C} FROM nar_chunks nc \
             JOIN chunks c ON c.id = nc.chunk_id WHERE nc.nar_id = $1 AND nc.seq >= $2 \
             ORDER BY nc.seq LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(nar_id.0)
            .bind(i64::from(from_seq))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing a NAR's chunks"))?;
        rows.iter()
            .map(|row| {
                Ok(NarChunk {
                    seq: u32_col(row, "seq")?,
                    chunk: chunk_from_row(row)?,
                    next_use: opt_u32_col(row, "next_use")?,
                })
            })
            .collect()
    }

    /// Where the served byte `offset` of a NAR falls in its chunk list:
    /// the `seq` of an entry at or before the one holding it, and the
    /// served offset at which that entry starts. A reader seeking there
    /// then skips at most `page` entries by their lengths.
    ///
    /// The list is summed by the database, `page` entries per statement
    /// (only the count and the sum come back), so seeking costs about
    /// `offset / (page × average frame)` round trips of bounded work and no
    /// storage read; at most `n_chunks / page + 1` of them. An entry whose
    /// chunk has no location (no longer stored) is an error: its length is
    /// unknown, so no byte past it can be placed.
    pub async fn seek_nar_chunks(
        &self,
        nar_id: NarId,
        offset: u64,
        page: u32,
    ) -> Result<(u32, u64)> {
        let sql = "SELECT COUNT(*) AS entries, COUNT(len) AS located, \
                   CAST(COALESCE(SUM(len), 0) AS BIGINT) AS bytes FROM (\
                   SELECT c.object_length AS len FROM nar_chunks nc \
                   JOIN chunks c ON c.id = nc.chunk_id WHERE nc.nar_id = $1 AND nc.seq >= $2 \
                   ORDER BY nc.seq LIMIT $3) page";
        let (mut seq, mut start) = (0_u32, 0_u64);
        loop {
            let row = sqlx::query(sql)
                .bind(nar_id.0)
                .bind(i64::from(seq))
                .bind(i64::from(page))
                .fetch_one(&self.pool)
                .await
                .map_err(query_error("summing a page of a NAR's chunk list"))?;
            let entries = u32_col(&row, "entries")?;
            if u32_col(&row, "located")? != entries {
                return Err(DbError::NotFound {
                    what: format!(
                        "the location of a chunk listed by NAR {nar_id} from entry {seq} on"
                    ),
                });
            }
            let bytes = u64_col(&row, "bytes")?;
            // Past this page only if the whole page ends at or before the
            // offset and more entries may follow.
            if entries < page || start + bytes > offset {
                return Ok((seq, start));
            }
            seq += entries;
            start += bytes;
        }
    }

    pub async fn chunk_by_hash(&self, chunk_hash: &Sha256Hash) -> Result<Option<Chunk>> {
        let sql = format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE chunk_hash = $1");
        let row = sqlx::query(&sql)
            .bind(chunk_hash.to_hex())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a chunk"))?;
        row.as_ref().map(chunk_from_row).transpose()
    }

    /// The chunk rows for `chunks`, in input order: existing ones as they
    /// are (the global dedup), new ones created `pending`. A chunk GC had
    /// claimed (`deleting`) comes back as a fresh `pending` row with a new
    /// id, so the caller stores it anew under a new object key while GC
    /// may still be deleting the old one. [`DbError::Conflict`] when a hash
    /// exists with another size.
    pub async fn upsert_chunks(&self, chunks: &[NewChunk], at: Timestamp) -> Result<Vec<Chunk>> {
        let mut tx = self.begin_write().await?;
        let out = upsert_chunks_on(&mut tx, chunks, at).await?;
        tx.commit("committing chunks").await?;
        Ok(out)
    }

    /// Records a pending NAR's chunk list, replacing any earlier one (a
    /// redelivered chunk job), and its chunk count. [`DbError::Conflict`]
    /// when the NAR is no longer pending.
    pub async fn set_nar_chunks(&self, nar_id: NarId, chunk_ids: &[ChunkId]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        set_nar_chunks_on(&mut tx, self.backend, nar_id, chunk_ids).await?;
        tx.commit("committing a NAR's chunk list").await
    }

    /// Records `pack`, an object just made durable, and marks chunks
    /// stored at their locations in it, in one transaction (a compress
    /// job's chunks are one commit, not one each), and returns their rows
    /// in the same order. Every location must be in `pack`. Idempotent: a
    /// chunk that is already valid keeps its first location (the caller's
    /// copy is then dead bytes in its pack, which compaction drops).
    /// [`DbError::Conflict`] when GC has claimed one of them meanwhile, and
    /// then nothing is recorded.
    pub async fn set_chunks_stored(
        &self,
        pack: &NewPack,
        stored: &[(ChunkId, ChunkLocation)],
        at: Timestamp,
    ) -> Result<Vec<Chunk>> {
        debug_assert!(stored
            .iter()
            .all(|(_, location)| location.object_key == pack.object_key));
        // Rows are locked in id order, so that two jobs sharing chunks
        // cannot deadlock on PostgreSQL.
        let mut order: Vec<usize> = (0..stored.len()).collect();
        order.sort_by_key(|&i| stored[i].0);
        let mut tx = self.begin_write().await?;
        insert_pack_on(&mut tx, pack, at).await?;
        let mut chunks: Vec<Option<Chunk>> = vec![None; stored.len()];
        let update = format!(
            "UPDATE chunks SET state = 'valid', object_key = $2, object_offset = $3, \
             object_length = $4 WHERE id = $1 AND state = 'pending' RETURNING {CHUNK_COLUMNS}"
        );
        let select = format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE id = $1");
        for i in order {
            let (chunk_id, location) = &stored[i];
            let updated = sqlx::query(&update)
                .bind(chunk_id.0)
                .bind(location.object_key.as_str())
                .bind(to_i64("object offset", location.offset)?)
                .bind(to_i64("object length", location.length)?)
                .fetch_optional(&mut *tx)
                .await
                .map_err(query_error("marking a chunk stored"))?;
            if let Some(row) = updated {
                chunks[i] = Some(chunk_from_row(&row)?);
                continue;
            }
            let row = sqlx::query(&select)
                .bind(chunk_id.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(query_error("looking up a chunk"))?
                .ok_or_else(|| DbError::NotFound {
                    what: format!("chunk {chunk_id}"),
                })?;
            let chunk = chunk_from_row(&row)?;
            if chunk.state != StoreState::Valid {
                return Err(DbError::Conflict {
                    what: format!(
                        "chunk {} in state {}",
                        chunk.chunk_hash.to_hex(),
                        chunk.state
                    ),
                });
            }
            chunks[i] = Some(chunk);
        }
        tx.commit("committing stored chunks").await?;
        // Every index was visited once.
        Ok(chunks.into_iter().flatten().collect())
    }

    /// The pending NARs that list this chunk: the ones a compressor should
    /// try to finalise after storing it.
    pub async fn pending_nars_of_chunk(&self, chunk_id: ChunkId) -> Result<Vec<NarId>> {
        let rows = sqlx::query(
            "SELECT DISTINCT n.id FROM nar_chunks nc JOIN nars n ON n.id = nc.nar_id \
             WHERE nc.chunk_id = $1 AND n.state = 'pending' ORDER BY n.id",
        )
        .bind(chunk_id.0)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("finding the NARs of a chunk"))?;
        rows.iter()
            .map(|row| Ok(NarId(i64_col(row, "id")?)))
            .collect()
    }

    /// The pending NARs that list any of these chunks, in id order: one
    /// query for a whole compress job's chunks.
    pub async fn pending_nars_of_chunks(&self, chunk_ids: &[ChunkId]) -> Result<Vec<NarId>> {
        let mut out = std::collections::BTreeSet::new();
        for batch in chunk_ids.chunks(MAX_IN_LIST) {
            let sql = format!(
                "SELECT DISTINCT n.id FROM nar_chunks nc JOIN nars n ON n.id = nc.nar_id \
                 WHERE nc.chunk_id IN ({}) AND n.state = 'pending'",
                placeholders(1, batch.len())
            );
            let mut query = sqlx::query(&sql);
            for id in batch {
                query = query.bind(id.0);
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("finding the NARs of chunks"))?;
            for row in &rows {
                out.insert(i64_col(row, "id")?);
            }
        }
        Ok(out.into_iter().map(NarId).collect())
    }

    /// Marks a pending NAR valid if its chunk list is recorded and every
    /// chunk on it is valid. Returns whether the NAR is valid now (also
    /// when it already was).
    pub async fn mark_nar_valid_if_complete(&self, nar_id: NarId) -> Result<bool> {
        let mut connection = self.acquire().await?;
        mark_nar_valid_if_complete_on(&mut connection, nar_id).await
    }

    /// Writes one complete NAR in one transaction: the NAR row, its chunks
    /// (valid, at the given locations; chunks that are already valid keep
    /// theirs), its chunk list, and the NAR made valid. For tests and for
    /// the single-machine server's direct path. An existing valid NAR of
    /// the same hash is returned unchanged.
    pub async fn store_complete_nar(
        &self,
        nar_hash: &NarHash,
        nar_size: u64,
        chunks: &[StoredChunk],
        at: Timestamp,
    ) -> Result<Nar> {
        if chunks.is_empty() {
            return Err(DbError::InvalidInput {
                what: "chunk list",
                reason: "a NAR has at least one chunk".to_owned(),
            });
        }
        let mut tx = self.begin_write().await?;
        let (nar, _) = insert_nar_pending_on(&mut tx, nar_hash, nar_size, at).await?;
        match nar.state {
            StoreState::Valid => return Ok(nar),
            StoreState::Deleting => {
                return Err(DbError::Conflict {
                    what: format!("NAR {nar_hash} being deleted"),
                })
            }
            StoreState::Pending => {}
        }
        let new_chunks: Vec<NewChunk> = chunks
            .iter()
            .map(|chunk| NewChunk {
                chunk_hash: chunk.chunk_hash,
                chunk_size: chunk.chunk_size,
            })
            .collect();
        let rows = upsert_chunks_on(&mut tx, &new_chunks, at).await?;
        // A chunk listed many times (a NAR of zeros) is stored once.
        let mut marked = std::collections::HashSet::new();
        for (row, stored) in rows.iter().zip(chunks) {
            if !marked.insert(row.id) {
                continue;
            }
            sqlx::query(
                "UPDATE chunks SET state = 'valid', object_key = $2, object_offset = $3, \
                 object_length = $4 WHERE id = $1 AND state = 'pending'",
            )
            .bind(row.id.0)
            .bind(stored.location.object_key.as_str())
            .bind(to_i64("object offset", stored.location.offset)?)
            .bind(to_i64("object length", stored.location.length)?)
            .execute(&mut *tx)
            .await
            .map_err(query_error("marking a chunk stored"))?;
        }
        let ids: Vec<ChunkId> = rows.iter().map(|row| row.id).collect();
        set_nar_chunks_on(&mut tx, self.backend, nar.id, &ids).await?;
        if !mark_nar_valid_if_complete_on(&mut tx, nar.id).await? {
            // Every chunk was just made valid inside this transaction.
            return Err(DbError::Conflict {
                what: format!("NAR {nar_hash} left incomplete"),
            });
        }
        let nar = nar_by_hash_on(&mut tx, nar_hash)
            .await?
            .ok_or_else(|| DbError::NotFound {
                what: format!("NAR {nar_hash}"),
            })?;
        tx.commit("committing a complete NAR").await?;
        Ok(nar)
    }

    /// Chunk rows by id, for callers holding ids from a queue message.
    pub async fn chunks_by_id(&self, ids: &[ChunkId]) -> Result<Vec<Chunk>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(MAX_IN_LIST) {
            let sql = format!(
                "SELECT {CHUNK_COLUMNS} FROM chunks WHERE id IN ({}) ORDER BY id",
                placeholders(1, batch.len())
            );
            let mut query = sqlx::query(&sql);
            for id in batch {
                query = query.bind(id.0);
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("looking up chunks"))?;
            for row in &rows {
                out.push(chunk_from_row(row)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_columns_match_the_plain_list() {
        let plain: Vec<&str> = CHUNK_COLUMNS.split(", ").collect();
        let qualified: Vec<&str> = CHUNK_COLUMNS_C
            .split(", ")
            .map(|column| {
                column
                    .strip_prefix("c.")
                    .expect("every column is qualified")
            })
            .collect();
        assert_eq!(plain, qualified);
    }
}
