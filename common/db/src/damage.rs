//! The damage model: what happens to the rows when a chunk's stored bytes
//! are found missing or corrupt (by `gc-scheduler --scrub`, or by a NAR
//! download that could not read them).
//!
//! A damaged chunk goes back to `pending` with its location cleared, and
//! every NAR listing it goes from `valid` back to `pending`, in one
//! transaction ([`Database::mark_chunks_damaged`]). A pending NAR is served
//! nowhere: its narinfo answers 404 in every cache (`find_object`), its NAR
//! too (`valid_nar_in_cache`), and `get-missing-paths` reports its paths
//! missing, so that clients push them again. Objects, chunk lists and
//! listings stay, so a later push of the same path heals it through the
//! pipeline's ordinary path: the chunker finds the NAR pending with its
//! chunk list recorded and publishes compress jobs for the chunks that are
//! not valid (a small NAR is cut and stored again whole), the compressor
//! stores them, and the NAR, with every other NAR that lists them, becomes
//! valid again. NARs and chunks keep their rows and ids throughout, so GC
//! sees nothing unusual: objects still hold their NARs, which still hold
//! their chunks.
//!
//! A chunk is marked only while it is still `valid` *at the location that
//! was found damaged*: a chunk GC claimed meanwhile is GC's, and a chunk
//! moved meanwhile (compaction copies it to another object) is fine where
//! it is now. So a report made from a stale read never withdraws good data.
//!
//! One race is not closed by the transaction: on PostgreSQL a compressor
//! finalising a NAR ([`Database::mark_nar_valid_if_complete`], one
//! statement over a snapshot) at the very moment one of the NAR's other
//! chunks is marked may still make it valid. Such a NAR cannot be served
//! (the read path refuses a chunk that is not valid, aborting the
//! download), and [`Database::withdraw_incomplete_nars`], which every scrub
//! pass runs, withdraws it.

use super::error::{query_error, Result};
use super::nars::{chunk_from_row, Chunk, CHUNK_COLUMNS};
use super::packs::ChunkLocation;
use super::row::{nar_hash_col, string_col, to_i64};
use super::types::ChunkId;
use super::{placeholders, Database, MAX_IN_LIST};
use larder_nix::NarHash;

/// A chunk whose bytes were found missing or corrupt at `location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedChunk {
    pub id: ChunkId,
    /// Where the bad bytes were read from: the chunk is marked only if its
    /// row still points there.
    pub location: ChunkLocation,
}

/// What marking damage changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Withdrawal {
    /// Chunks that went from `valid` back to `pending`.
    pub chunks: u64,
    /// NARs that went from `valid` back to `pending`: their paths are no
    /// longer served in any cache until pushed again.
    pub nars: Vec<NarHash>,
}

impl Withdrawal {
    pub fn is_empty(&self) -> bool {
        self.chunks == 0 && self.nars.is_empty()
    }

    /// Adds what another batch withdrew.
    pub fn add(&mut self, other: Withdrawal) {
        self.chunks += other.chunks;
        self.nars.extend(other.nars);
    }
}

/// Withdraws the valid NARs among those listing a chunk of `chunk_ids`
/// (bound from `$1` on), returning their hashes.
fn withdraw_nars_listing(count: usize) -> String {
    format!(
        "UPDATE nars SET state = 'pending', file_size = NULL WHERE state = 'valid' AND id IN \
         (SELECT nc.nar_id FROM nar_chunks nc WHERE nc.chunk_id IN ({})) RETURNING nar_hash",
        placeholders(1, count)
    )
}

impl Database {
    /// The valid chunks whose frames are in the object `object_key`, in
    /// offset order: what a missing or truncated object takes with it.
    pub async fn chunks_in_object(&self, object_key: &str) -> Result<Vec<Chunk>> {
        let sql = format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks WHERE object_key = $1 AND state = 'valid' \
             ORDER BY object_offset, id"
        );
        let rows = sqlx::query(&sql)
            .bind(object_key)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing the chunks of an object"))?;
        rows.iter().map(chunk_from_row).collect()
    }

    /// The objects holding valid chunks whose keys sort after `after`, at
    /// most `limit`, in key order: the scrub's walk, a page at a time,
    /// along the index of chunks by object key.
    pub async fn stored_object_keys(&self, after: &str, limit: u32) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT object_key FROM chunks WHERE object_key > $1 AND state = 'valid' \
             ORDER BY object_key LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing stored objects"))?;
        rows.iter()
            .map(|row| string_col(row, "object_key"))
            .collect()
    }

    /// Marks chunks damaged (see the module documentation): each chunk
    /// still `valid` at the given location goes back to `pending` with its
    /// location cleared, and every valid NAR listing one of them back to
    /// `pending`. Each batch of chunks is one transaction with the NARs it
    /// withdraws. Idempotent: chunks marked already, claimed by GC or moved
    /// elsewhere are left alone.
    pub async fn mark_chunks_damaged(&self, damaged: &[DamagedChunk]) -> Result<Withdrawal> {
        // Rows are changed in id order, as `set_chunks_stored` and GC's
        // claims lock them, so that none of them can deadlock with this on
        // PostgreSQL.
        let mut sorted: Vec<&DamagedChunk> = damaged.iter().collect();
        sorted.sort_by_key(|chunk| chunk.id);
        sorted.dedup_by_key(|chunk| chunk.id);
        let update = "UPDATE chunks SET state = 'pending', object_key = NULL, \
                      object_offset = NULL, object_length = NULL \
                      WHERE id = $1 AND state = 'valid' AND object_key = $2 \
                      AND object_offset = $3 AND object_length = $4";
        let mut withdrawal = Withdrawal::default();
        for batch in sorted.chunks(MAX_IN_LIST) {
            let mut tx = self.begin_write().await?;
            let mut marked: Vec<i64> = Vec::with_capacity(batch.len());
            for chunk in batch {
                let location = &chunk.location;
                let changed = sqlx::query(update)
                    .bind(chunk.id.0)
                    .bind(location.object_key.as_str())
                    .bind(to_i64("object offset", location.offset)?)
                    .bind(to_i64("object length", location.length)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("marking a chunk damaged"))?
                    .rows_affected();
                if changed > 0 {
                    marked.push(chunk.id.0);
                }
            }
            if !marked.is_empty() {
                let sql = withdraw_nars_listing(marked.len());
                let mut query = sqlx::query(&sql);
                for id in &marked {
                    query = query.bind(*id);
                }
                let rows = query
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(query_error("withdrawing the NARs of damaged chunks"))?;
                for row in &rows {
                    withdrawal.nars.push(nar_hash_col(row, "nar_hash")?);
                }
            }
            tx.commit("committing damaged chunks").await?;
            withdrawal.chunks += marked.len() as u64;
        }
        Ok(withdrawal)
    }

    /// Withdraws every valid NAR that lists a chunk that is not valid,
    /// returning their hashes: what closes the race described in the module
    /// documentation. One statement: a scan of the chunks table for those
    /// that are not valid (few: those of uploads in flight, and damaged
    /// ones), then the index of chunk lists by chunk; cheap beside a scrub
    /// pass, which reads every stored byte.
    pub async fn withdraw_incomplete_nars(&self) -> Result<Vec<NarHash>> {
        let rows = sqlx::query(
            "UPDATE nars SET state = 'pending', file_size = NULL WHERE state = 'valid' AND id IN \
             (SELECT nc.nar_id FROM chunks c JOIN nar_chunks nc ON nc.chunk_id = c.id \
              WHERE c.state <> 'valid') RETURNING nar_hash",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("withdrawing NARs with unstored chunks"))?;
        rows.iter()
            .map(|row| nar_hash_col(row, "nar_hash"))
            .collect()
    }
}
