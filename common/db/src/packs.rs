//! Pack rows (`packs`, migration 0006): which storage objects hold chunk
//! frames, how big they are, and which are retired, for GC and compaction;
//! and where in such an object a chunk's frame is ([`ChunkLocation`]).
//!
//! The rules that keep packs safe (the migration states them too):
//! - A pack row is inserted in the transaction that points chunks into its
//!   object ([`Database::set_chunks_stored`], the small-NAR transaction,
//!   [`Database::relocate_chunks`]), after the object is durable; nothing
//!   ever points a chunk into a pack that exists already. So a pack that no
//!   chunk row names is empty for good, and GC may delete it.
//! - Compaction moves a pack's live chunks into a new pack and *retires* the
//!   old one; a retired pack is deleted only after the grace GC gives it,
//!   since a download may still hold a location it read before the move.
//! - A per-chunk object of a store written before packs (`chunks/…`) has no
//!   row until compaction moves its chunk out; it then gets a retired row of
//!   its own and goes the same way.

use super::error::{query_error, Result};
use super::row::{i64_col, opt_time_col, string_col, time_col, to_i64, u64_col};
use super::types::{ChunkId, Timestamp};
use super::{placeholders, Database, MAX_IN_LIST};

/// Where a chunk's compressed bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkLocation {
    pub object_key: String,
    pub offset: u64,
    /// Compressed length in bytes.
    pub length: u64,
}

/// A pack just written, to be recorded with the chunks pointed into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPack {
    pub object_key: String,
    /// Bytes in the object.
    pub size: u64,
}

/// A pack row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    pub id: i64,
    pub object_key: String,
    pub size: u64,
    pub created_at: Timestamp,
    pub retired_at: Option<Timestamp>,
}

/// A pack worth compacting, with the bytes its valid chunks still use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackUse {
    pub pack: Pack,
    pub live_bytes: u64,
}

/// A valid chunk where compaction finds it: in a pack, or in an object of
/// its own from before packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedChunk {
    pub id: ChunkId,
    pub location: ChunkLocation,
}

/// A chunk compaction copied into a new pack: where it was, and where its
/// frame now starts in the new pack (its length is unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMove {
    pub id: ChunkId,
    pub from: ChunkLocation,
    pub new_offset: u64,
}

const PACK_COLUMNS: &str = "p.id, p.object_key, p.size, p.created_at, p.retired_at";

fn pack_from_row(row: &sqlx::any::AnyRow) -> Result<Pack> {
    Ok(Pack {
        id: i64_col(row, "id")?,
        object_key: string_col(row, "object_key")?,
        size: u64_col(row, "size")?,
        created_at: time_col(row, "created_at")?,
        retired_at: opt_time_col(row, "retired_at")?,
    })
}

/// Records `pack`, once: a retried transaction, or a test recording one
/// object twice, keeps the first row.
pub(crate) async fn insert_pack_on(
    connection: &mut sqlx::AnyConnection,
    pack: &NewPack,
    at: Timestamp,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO packs (object_key, size, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (object_key) DO NOTHING",
    )
    .bind(pack.object_key.as_str())
    .bind(to_i64("pack size", pack.size)?)
    .bind(at.unix_millis())
    .execute(&mut *connection)
    .await
    .map_err(query_error("recording a pack"))?;
    Ok(())
}

impl Database {
    /// Packs no chunk row names, after `after` in id order, at most `limit`:
    /// every such pack never retired, and retired ones once retired before
    /// `retired_before` (the readers' grace). Their objects can be deleted,
    /// then [`delete_empty_packs`](Self::delete_empty_packs).
    pub async fn empty_packs(
        &self,
        after: i64,
        retired_before: Timestamp,
        limit: u32,
    ) -> Result<Vec<Pack>> {
        let rows = sqlx::query(&format!(
            "SELECT {PACK_COLUMNS} FROM packs p WHERE p.id > $1 \
             AND (p.retired_at IS NULL OR p.retired_at < $2) \
             AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.object_key = p.object_key) \
             ORDER BY p.id LIMIT $3"
        ))
        .bind(after)
        .bind(retired_before.unix_millis())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing empty packs"))?;
        rows.iter().map(pack_from_row).collect()
    }

    /// Deletes the rows of packs whose objects are gone, unless a chunk
    /// names one after all (then it stays, and so should its object).
    /// Returns how many rows went.
    pub async fn delete_empty_packs(&self, ids: &[i64]) -> Result<u64> {
        let mut deleted = 0;
        for batch in ids.chunks(MAX_IN_LIST) {
            let sql = format!(
                "DELETE FROM packs WHERE id IN ({}) AND NOT EXISTS \
                 (SELECT 1 FROM chunks c WHERE c.object_key = packs.object_key)",
                placeholders(1, batch.len())
            );
            let mut query = sqlx::query(&sql);
            for id in batch {
                query = query.bind(*id);
            }
            deleted += query
                .execute(&self.pool)
                .await
                .map_err(query_error("deleting empty packs"))?
                .rows_affected();
        }
        Ok(deleted)
    }

    /// Packs not retired, after `after` in id order, at most `limit`, that
    /// are worth rewriting: their valid chunks use less than
    /// `live_per_mille` thousandths of them, or they are smaller than
    /// `small_bytes` (to be merged with others).
    pub async fn packs_to_compact(
        &self,
        after: i64,
        live_per_mille: u32,
        small_bytes: u64,
        limit: u32,
    ) -> Result<Vec<PackUse>> {
        let rows = sqlx::query(&format!(
            "SELECT {PACK_COLUMNS}, \
             CAST(COALESCE(SUM(c.object_length), 0) AS BIGINT) AS live_bytes \
             FROM packs p LEFT JOIN chunks c ON c.object_key = p.object_key AND c.state = 'valid' \
             WHERE p.id > $1 AND p.retired_at IS NULL \
             GROUP BY p.id, p.object_key, p.size, p.created_at, p.retired_at \
             HAVING COALESCE(SUM(c.object_length), 0) * 1000 < p.size * $2 OR p.size < $3 \
             ORDER BY p.id LIMIT $4"
        ))
        .bind(after)
        .bind(i64::from(live_per_mille))
        .bind(to_i64("small pack size", small_bytes)?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing packs to compact"))?;
        rows.iter()
            .map(|row| {
                Ok(PackUse {
                    pack: pack_from_row(row)?,
                    live_bytes: u64_col(row, "live_bytes")?,
                })
            })
            .collect()
    }

    /// The valid chunks located in these objects, ordered by object and
    /// offset (so that adjacent frames can be read together).
    pub async fn valid_chunks_in_objects(&self, keys: &[&str]) -> Result<Vec<LocatedChunk>> {
        let mut out = Vec::new();
        for batch in keys.chunks(MAX_IN_LIST) {
            let sql = format!(
                "SELECT id, object_key, object_offset, object_length FROM chunks \
                 WHERE state = 'valid' AND object_key IN ({})",
                placeholders(1, batch.len())
            );
            let mut query = sqlx::query(&sql);
            for key in batch {
                query = query.bind(*key);
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("listing the chunks of packs"))?;
            for row in &rows {
                out.push(located_chunk_from_row(row)?);
            }
        }
        out.sort_by(|a, b| {
            (&a.location.object_key, a.location.offset)
                .cmp(&(&b.location.object_key, b.location.offset))
        });
        Ok(out)
    }

    /// Valid chunks stored in objects of their own (a store written before
    /// packs: keys under `chunks/`), after chunk `after` in id order, at
    /// most `limit`.
    pub async fn unpacked_chunks(&self, after: ChunkId, limit: u32) -> Result<Vec<LocatedChunk>> {
        let rows = sqlx::query(
            "SELECT id, object_key, object_offset, object_length FROM chunks \
             WHERE state = 'valid' AND object_key LIKE 'chunks/%' AND id > $1 \
             ORDER BY id LIMIT $2",
        )
        .bind(after.0)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing unpacked chunks"))?;
        rows.iter().map(located_chunk_from_row).collect()
    }

    /// Records the pack compaction wrote and moves each chunk of `moves`
    /// into it, if the chunk is still valid where compaction read it, then
    /// retires every object in `retire` (a pack's row, or a new retired row
    /// for a per-chunk object of `size` bytes), in one transaction. Returns
    /// how many chunks moved. A chunk that changed meanwhile stays where it
    /// is; its copy in the new pack is dead bytes.
    pub async fn relocate_chunks(
        &self,
        pack: &NewPack,
        moves: &[ChunkMove],
        retire: &[(String, u64)],
        at: Timestamp,
    ) -> Result<u64> {
        let mut order: Vec<&ChunkMove> = moves.iter().collect();
        // The lock order of every chunk writer: by id.
        order.sort_by_key(|chunk| chunk.id);
        let mut tx = self.begin_write().await?;
        insert_pack_on(&mut tx, pack, at).await?;
        let mut moved = 0;
        for chunk in order {
            moved += sqlx::query(
                "UPDATE chunks SET object_key = $2, object_offset = $3 \
                 WHERE id = $1 AND state = 'valid' AND object_key = $4 \
                 AND object_offset = $5 AND object_length = $6",
            )
            .bind(chunk.id.0)
            .bind(pack.object_key.as_str())
            .bind(to_i64("object offset", chunk.new_offset)?)
            .bind(chunk.from.object_key.as_str())
            .bind(to_i64("object offset", chunk.from.offset)?)
            .bind(to_i64("object length", chunk.from.length)?)
            .execute(&mut *tx)
            .await
            .map_err(query_error("moving a chunk into a new pack"))?
            .rows_affected();
        }
        for (key, size) in retire {
            sqlx::query(
                "INSERT INTO packs (object_key, size, created_at, retired_at) \
                 VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (object_key) DO UPDATE SET retired_at = $3",
            )
            .bind(key.as_str())
            .bind(to_i64("pack size", *size)?)
            .bind(at.unix_millis())
            .execute(&mut *tx)
            .await
            .map_err(query_error("retiring a pack"))?;
        }
        tx.commit("committing a compaction").await?;
        Ok(moved)
    }

    /// Every pack row, oldest first: for tests and reports of small stores.
    pub async fn packs(&self) -> Result<Vec<Pack>> {
        let rows = sqlx::query(&format!("SELECT {PACK_COLUMNS} FROM packs p ORDER BY p.id"))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing packs"))?;
        rows.iter().map(pack_from_row).collect()
    }
}

fn located_chunk_from_row(row: &sqlx::any::AnyRow) -> Result<LocatedChunk> {
    Ok(LocatedChunk {
        id: ChunkId(i64_col(row, "id")?),
        location: ChunkLocation {
            object_key: string_col(row, "object_key")?,
            offset: u64_col(row, "object_offset")?,
            length: u64_col(row, "object_length")?,
        },
    })
}
