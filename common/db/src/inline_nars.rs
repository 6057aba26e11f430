//! Small NARs stored in one transaction: what the chunker does for a NAR
//! of a few chunks, which it compresses and stores itself, instead of
//! taking it through the steps of `nars`' protocol (upsert the chunks,
//! record the list, publish compress jobs, mark each chunk stored, mark the
//! NAR valid, finalise the upload), each a transaction of its own.
//!
//! The chunker looks up the NAR ([`Database::nar_by_hash`]) and, unless it
//! is valid, the chunks ([`Database::chunks_by_hash`]); writes the frames
//! of the chunks not stored yet into one pack object; then
//! [`Database::finish_inline_upload`] does the rest at once, under the
//! upload's cache lock: the pack row, the NAR row, its chunk rows (new ones created
//! `valid` at the caller's locations, pending ones made valid there, valid
//! ones kept as they are), its listing, its chunk list, the NAR made valid,
//! and the upload finalised (its object created, its bytes moved from the
//! cache's pending bytes to its path bytes, `done`). A NAR stored already
//! needs only the last step.
//!
//! Why GC stays safe (see `gc`): the upload is in flight until the commit
//! that creates its object, so its NAR is protected throughout; the chunk
//! rows this writes are listed by the NAR in the same commit, so no fresh
//! chunk is ever unlisted; a chunk GC claimed (`deleting`) is never made
//! valid again (the upsert skips such rows, and they are replaced by fresh
//! rows, as `upsert_chunks` does); and the pack written before the commit
//! has no row until it, like any pack, so the orphan sweep leaves it alone
//! for `orphan-grace`. A crash before the commit leaves the upload in
//! flight (its job is done again, writing a new pack) and a pack no row
//! names, which the sweep removes.

use std::collections::BTreeMap;

use super::error::{query_error, DbError, Result};
use super::listings::{set_nar_listing_on, EncodedListing};
use super::nars::{
    chunk_from_row, insert_chunk_list_on, nar_from_row, Chunk, CHUNK_COLUMNS, NAR, NAR_COLUMNS,
};
use super::objects::{upsert_counted_object_on, NewObject};
use super::packs::{insert_pack_on, ChunkLocation, NewPack};
use super::quota::{lock_cache_on, Charge};
use super::row::{to_i64, u64_col};
use super::types::{ChunkId, NarId, StoreState, Timestamp, IN_FLIGHT_PHASES_SQL};
use super::upload_events::announce_on;
use super::uploads::Upload;
use super::{placeholders, Database, MAX_IN_LIST};
use crate::chunking::max_chunk_entries;
use larder_nix::Sha256Hash;

/// One chunk of a small NAR, in NAR order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineChunk {
    pub chunk_hash: Sha256Hash,
    pub chunk_size: u64,
    /// Where the caller stored its frame; `None` when the chunk was valid
    /// when looked up, so that nothing was written for it.
    pub location: Option<ChunkLocation>,
}

/// What the chunker found in a small NAR it cut.
#[derive(Debug, Clone, Copy)]
pub struct InlineContent<'a> {
    pub chunks: &'a [InlineChunk],
    /// The pack holding the frames the caller wrote (the chunks given with
    /// a location); `None` when it wrote none.
    pub pack: Option<&'a NewPack>,
    /// Its `.ls` listing; `None` when it was over the chunker's budget.
    pub listing: Option<&'a EncodedListing>,
}

/// How [`Database::finish_inline_upload`] ended. Every variant but
/// `Finished` wrote nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InlineOutcome {
    /// The NAR is valid and the upload left the pipeline: `visible` when
    /// this call finalised it, `false` when it had left already (failed,
    /// or done by an earlier attempt) or is gone with its cache.
    Finished {
        visible: bool,
        /// A NAR other uploads may be waiting on (it had a chunk list
        /// recorded by the chunker's other path): finalise them too.
        others_waiting: Option<NarId>,
    },
    /// The NAR is not stored and no content was given: cut it and call
    /// again with it.
    NeedsContent,
    /// A chunk given without a location is not valid any more (GC claimed
    /// it since it was looked up): look the chunks up again.
    ChunksChanged,
    /// GC is deleting the NAR; try again once it is gone.
    NarDeleting,
}

impl Database {
    /// The chunks with these hashes that exist, in any state, in no
    /// particular order.
    pub async fn chunks_by_hash(&self, hashes: &[Sha256Hash]) -> Result<Vec<Chunk>> {
        let mut out = Vec::with_capacity(hashes.len());
        for batch in hashes.chunks(MAX_IN_LIST) {
            let sql = format!(
                "SELECT {CHUNK_COLUMNS} FROM chunks WHERE chunk_hash IN ({})",
                placeholders(1, batch.len())
            );
            let mut query = sqlx::query(&sql);
            for hash in batch {
                query = query.bind(hash.to_hex());
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

    /// Stores a small NAR and finalises `upload` in one transaction (see
    /// the module documentation): with `content`, the NAR as the caller cut
    /// and stored it; without, only if it is stored already. Idempotent: a
    /// second call finds the NAR valid and the upload done.
    ///
    /// [`DbError::Conflict`] when the NAR's hash is stored with another
    /// size, or a chunk's with another size; [`DbError::InvalidInput`] for a
    /// chunk list longer than the NAR's size allows.
    pub async fn finish_inline_upload(
        &self,
        upload: &Upload,
        content: Option<InlineContent<'_>>,
        at: Timestamp,
    ) -> Result<InlineOutcome> {
        let mut tx = self.begin_groupable_write().await?;
        // The cache first: the one lock order (see `quota`).
        let Some(mut cache) = lock_cache_on(&mut tx, self.backend, upload.cache_id).await? else {
            // The cache is gone, and its uploads with it.
            return Ok(InlineOutcome::Finished {
                visible: false,
                others_waiting: None,
            });
        };
        // One statement that creates the row or returns (and, on
        // PostgreSQL, locks) the existing one, so that GC cannot delete it
        // before the commit, nor can its state change meanwhile.
        let sql = format!(
            "INSERT INTO nars (nar_hash, nar_size, state, n_chunks, created_at) \
             VALUES ($1, $2, 'pending', 0, $3) \
             ON CONFLICT (nar_hash) DO UPDATE SET nar_size = nars.nar_size \
             RETURNING {NAR_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(upload.nar_hash.to_string())
            .bind(to_i64("NAR size", upload.nar_size)?)
            .bind(at.unix_millis())
            .fetch_one(&mut *tx)
            .await
            .map_err(query_error("inserting a NAR"))?;
        let nar = nar_from_row(&row, &NAR)?;
        if nar.nar_size != upload.nar_size {
            return Err(DbError::Conflict {
                what: format!(
                    "NAR {} with size {} (not {})",
                    nar.nar_hash, nar.nar_size, upload.nar_size
                ),
            });
        }
        match nar.state {
            StoreState::Deleting => return Ok(InlineOutcome::NarDeleting),
            StoreState::Valid => {}
            StoreState::Pending => {
                let Some(content) = content else {
                    return Ok(InlineOutcome::NeedsContent);
                };
                if !store_content_on(&mut tx, nar.id, nar.nar_size, nar.n_chunks, content, at)
                    .await?
                {
                    return Ok(InlineOutcome::ChunksChanged);
                }
            }
        }
        let sql = format!(
            "UPDATE uploads SET nar_id = $2, phase = 'done', updated_at = $3 \
             WHERE id = $1 AND phase IN {IN_FLIGHT_PHASES_SQL} RETURNING nar_size"
        );
        let left = sqlx::query(&sql)
            .bind(upload.id.as_str())
            .bind(nar.id.0)
            .bind(at.unix_millis())
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("marking an upload done"))?;
        let visible = match left {
            // Failed (the reconciler gave up on it) or done already: the
            // NAR is kept all the same, and GC removes it if nothing
            // else points at it.
            None => false,
            Some(row) => {
                let pending = to_i64("NAR size", u64_col(&row, "nar_size")?)?;
                let new = NewObject {
                    store_path_hash: upload.store_path_hash,
                    nar_id: nar.id,
                    metadata: upload.metadata.clone(),
                    created_by: upload.created_by.clone(),
                };
                upsert_counted_object_on(
                    &mut tx,
                    &mut cache,
                    Charge::AlreadyAdmitted,
                    &new,
                    nar.nar_size,
                    -pending,
                    at,
                )
                .await?;
                announce_on(&mut tx, self.backend, &upload.id).await?;
                true
            }
        };
        tx.commit("committing a small NAR").await?;
        if visible {
            self.events.wake(&upload.id);
        }
        Ok(InlineOutcome::Finished {
            visible,
            others_waiting: (nar.n_chunks > 0).then_some(nar.id),
        })
    }
}

/// Records the caller's pack and writes a pending NAR's chunks, listing
/// and chunk list and makes it valid. Returns `false` (to be rolled back)
/// when a chunk given without a location is not valid. A frame the caller
/// wrote for a chunk another worker stored first stays dead bytes in its
/// pack, for compaction.
async fn store_content_on(
    connection: &mut sqlx::AnyConnection,
    nar_id: NarId,
    nar_size: u64,
    earlier_list: u32,
    content: InlineContent<'_>,
    at: Timestamp,
) -> Result<bool> {
    let entries = content.chunks;
    let most = max_chunk_entries(nar_size);
    if entries.is_empty() || entries.len() as u64 > most {
        return Err(DbError::InvalidInput {
            what: "chunk list",
            reason: format!(
                "{} chunk entries for a NAR of {nar_size} bytes, which has 1 to {most}",
                entries.len()
            ),
        });
    }
    // Distinct hashes in sorted order, as in `upsert_chunks`: the same
    // lock order in every transaction, and one row per hash in a
    // statement (PostgreSQL refuses to update a row twice in one).
    let mut distinct: BTreeMap<String, &InlineChunk> = BTreeMap::new();
    for chunk in entries {
        let hash = chunk.chunk_hash.to_hex();
        match distinct.get(&hash) {
            Some(seen) if seen.chunk_size != chunk.chunk_size => {
                return Err(DbError::InvalidInput {
                    what: "chunk list",
                    reason: format!(
                        "chunk {hash} given with sizes {} and {}",
                        seen.chunk_size, chunk.chunk_size
                    ),
                })
            }
            // The first occurrence carries the location, if any.
            Some(seen) if seen.location.is_some() || chunk.location.is_none() => {}
            _ => {
                distinct.insert(hash, chunk);
            }
        }
    }
    let distinct: Vec<(String, &InlineChunk)> = distinct.into_iter().collect();
    if let Some(pack) = content.pack {
        insert_pack_on(connection, pack, at).await?;
    }
    let mut rows = upsert_inline_chunks_on(connection, &distinct, at).await?;
    if rows.len() < distinct.len() {
        // Some are claimed by GC (`deleting`): replace them with fresh
        // rows, as `upsert_chunks` does, then try those again.
        let claimed: Vec<(String, &InlineChunk)> = distinct
            .iter()
            .filter(|(hash, _)| !rows.contains_key(hash))
            .cloned()
            .collect();
        let sql = format!(
            "DELETE FROM chunks WHERE state = 'deleting' AND chunk_hash IN ({})",
            placeholders(1, claimed.len())
        );
        let mut query = sqlx::query(&sql);
        for (hash, _) in &claimed {
            query = query.bind(hash.as_str());
        }
        query
            .execute(&mut *connection)
            .await
            .map_err(query_error("replacing chunks claimed by GC"))?;
        rows.extend(upsert_inline_chunks_on(connection, &claimed, at).await?);
    }
    for (hash, given) in &distinct {
        let Some(row) = rows.get(hash) else {
            return Ok(false);
        };
        if row.chunk_size != given.chunk_size {
            return Err(DbError::Conflict {
                what: format!(
                    "chunk {hash} with size {} (not {})",
                    row.chunk_size, given.chunk_size
                ),
            });
        }
        if row.state != StoreState::Valid || row.location.is_none() {
            return Ok(false);
        }
    }
    let mut file_size: u64 = 0;
    let mut ids: Vec<ChunkId> = Vec::with_capacity(entries.len());
    for entry in entries {
        let row = &rows[&entry.chunk_hash.to_hex()];
        // Every row was checked valid, with a location, above.
        file_size += row.location.as_ref().map_or(0, |location| location.length);
        ids.push(row.id);
    }

    if let Some(listing) = content.listing {
        set_nar_listing_on(connection, nar_id, listing).await?;
    }
    if earlier_list > 0 {
        sqlx::query("DELETE FROM nar_chunks WHERE nar_id = $1")
            .bind(nar_id.0)
            .execute(&mut *connection)
            .await
            .map_err(query_error("clearing a NAR's chunk list"))?;
    }
    insert_chunk_list_on(connection, nar_id, &ids).await?;
    // The row is locked by this transaction (its upsert above), so it is
    // still pending.
    let made_valid = sqlx::query(
        "UPDATE nars SET state = 'valid', n_chunks = $2, file_size = $3 \
         WHERE id = $1 AND state = 'pending'",
    )
    .bind(nar_id.0)
    .bind(ids.len() as i64)
    .bind(to_i64("file size", file_size)?)
    .execute(&mut *connection)
    .await
    .map_err(query_error("finalising a NAR"))?;
    if made_valid.rows_affected() == 0 {
        return Err(DbError::Conflict {
            what: format!("NAR {nar_id} changed state while being stored"),
        });
    }
    Ok(true)
}

/// Inserts or updates chunk rows by hash, in one statement per batch: a
/// new chunk is created `valid` at its given location (or `pending`
/// without one); a pending one takes the given location and becomes
/// valid; a valid one stays as it is. Rows GC claimed are left alone and
/// not returned. Returns the rows by hex hash.
async fn upsert_inline_chunks_on(
    connection: &mut sqlx::AnyConnection,
    chunks: &[(String, &InlineChunk)],
    at: Timestamp,
) -> Result<BTreeMap<String, Chunk>> {
    let mut out = BTreeMap::new();
    // Six bind parameters per row, plus the time.
    for batch in chunks.chunks(MAX_IN_LIST / 6) {
        let values = (0..batch.len())
            .map(|i| {
                let p = 6 * i + 2;
                format!(
                    "(${p}, ${}, ${}, ${}, ${}, ${}, $1, $1)",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        // `chunks.*` in the SET list is the row before the update.
        let take = "chunks.state = 'pending' AND excluded.state = 'valid'";
        let sql = format!(
            "INSERT INTO chunks (chunk_hash, chunk_size, state, object_key, object_offset, \
             object_length, created_at, linked_at) VALUES {values} \
             ON CONFLICT (chunk_hash) DO UPDATE SET linked_at = excluded.linked_at, \
             object_key = CASE WHEN {take} THEN excluded.object_key ELSE chunks.object_key END, \
             object_offset = CASE WHEN {take} THEN excluded.object_offset \
                             ELSE chunks.object_offset END, \
             object_length = CASE WHEN {take} THEN excluded.object_length \
                             ELSE chunks.object_length END, \
             state = CASE WHEN {take} THEN 'valid' ELSE chunks.state END \
             WHERE chunks.state <> 'deleting' \
             RETURNING {CHUNK_COLUMNS}"
        );
        let mut query = sqlx::query(&sql).bind(at.unix_millis());
        for (hash, chunk) in batch {
            let location = chunk.location.as_ref();
            let state = if location.is_some() {
                StoreState::Valid
            } else {
                StoreState::Pending
            };
            query = query
                .bind(hash.as_str())
                .bind(to_i64("chunk size", chunk.chunk_size)?)
                .bind(state.as_str())
                .bind(location.map(|location| location.object_key.clone()))
                .bind(
                    location
                        .map(|location| to_i64("object offset", location.offset))
                        .transpose()?,
                )
                .bind(
                    location
                        .map(|location| to_i64("object length", location.length))
                        .transpose()?,
                );
        }
        let rows = query
            .fetch_all(&mut *connection)
            .await
            .map_err(query_error("storing chunks"))?;
        for row in &rows {
            let chunk = chunk_from_row(row)?;
            out.insert(chunk.chunk_hash.to_hex(), chunk);
        }
    }
    Ok(out)
}
