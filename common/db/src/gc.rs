//! The queries of garbage collection (`gc-scheduler`), each safe against
//! the pipeline and the push endpoints running at the same time.
//!
//! # What protects what
//!
//! - An **object** is removed when its cache's retention has passed since
//!   its last access and no pin of its cache keeps it (it is not in the
//!   closure of a pin revision's root; [`Database::delete_expired_objects`],
//!   see `pins` for why a pin made during a GC run is never missed) or
//!   when a holder of the delete permission removes it
//!   ([`Database::delete_objects`]), pinned or not.
//! - A **NAR** is kept while an object points at it *or* an upload of its
//!   hash is in flight (`spooled`, `chunking`, `compressing`), linked to the
//!   row yet or not. An upload creates its object and leaves the pipeline
//!   in one transaction ([`Database::finalise_upload`]), so one snapshot
//!   always sees one of the two. Deleting a NAR deletes its chunk list.
//! - A **chunk** is kept while a NAR lists it, or for a grace period after a
//!   chunker last looked it up (`linked_at`, stamped by
//!   [`Database::upsert_chunks`]): a chunker records a NAR's chunk list only
//!   once it has cut the whole NAR. Unlisted chunks past the grace are
//!   claimed (`deleting`), their storage objects deleted, then their rows.
//!   A small NAR's chunk rows are created listed, in the transaction that
//!   finalises its upload ([`Database::finish_inline_upload`]); their
//!   objects, written just before, belong to the upload while it is in
//!   flight ([`Database::uploads_in_flight`]).
//!
//! # Races, and why they are safe
//!
//! SQLite has one writer at a time (`BEGIN IMMEDIATE`), so each statement
//! below sees everything committed before it and nothing interleaves.
//!
//! PostgreSQL runs READ COMMITTED: a statement that waited for a row lock
//! re-checks only the locked row's own columns, not its subqueries, so a
//! `DELETE … WHERE NOT EXISTS (…)` that waited for a concurrent linker
//! would still act on its old snapshot. Every GC claim therefore takes the
//! row locks first (`SELECT … FOR UPDATE`, in id order), and checks the
//! references in a *later* statement of the same transaction, which gets a
//! fresh snapshot:
//!
//! - [`Database::link_valid_nar`] share-locks the NAR row. Linker first:
//!   GC waits for its commit, then sees the new object and keeps the NAR.
//!   GC first: the linker's locked read finds the row gone and links
//!   nothing (the push falls back to a full upload).
//! - Recording a chunk list ([`Database::set_nar_chunks`]) share-locks its
//!   chunk rows and refuses `deleting` ones. Chunker first: GC sees the list
//!   and keeps the chunks. GC first: the chunker gets a conflict and its
//!   job is retried, and [`Database::upsert_chunks`] then revives the chunk
//!   as a fresh row (a new id, so a new object key that GC's pending
//!   storage delete cannot touch).
//! - [`Database::mark_nar_valid_if_complete`] and
//!   [`Database::finalise_upload`] run only for NARs with an upload in
//!   flight, which GC does not touch.
//! - A chunk is deleted from storage before its row: a crash in between
//!   leaves a `deleting` row, which the next run finishes (a missing object
//!   counts as deleted).

use std::collections::{HashMap, HashSet};

use super::error::{query_error, Result};
use super::nars::{chunk_from_row, CHUNK_COLUMNS};
use super::objects::Param;
use super::pinned_closure::pinned_closure_sql;
use super::push::{staged_file_from_row, StagedFile, STAGED_FILE_COLUMNS};
use super::row::{chunk_hash_col, i64_col, opt_u64_col, parsed_col, string_col};
use super::types::{CacheId, ChunkId, NarId, Timestamp, UploadId, IN_FLIGHT_PHASES_SQL};
use super::{placeholders, Backend, Chunk, Database, MAX_IN_LIST};
use larder_nix::{Sha256Hash, StorePathHash};

/// A cache's id and its own retention period, for level 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheRetention {
    pub cache_id: CacheId,
    /// `None`: the global default applies.
    pub retention_period: Option<std::time::Duration>,
}

/// `WHERE` condition: no object points at NAR `n` and no upload of its
/// hash is in flight.
fn nar_unreferenced() -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM objects o WHERE o.nar_id = n.id) \
         AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.nar_hash = n.nar_hash \
         AND u.phase IN {IN_FLIGHT_PHASES_SQL})"
    )
}

/// `WHERE` condition: chunk `c` is neither listed by a NAR nor claimed,
/// and no chunker looked it up since `$linked_before`.
fn chunk_unreferenced(linked_before: usize) -> String {
    format!(
        "c.state IN ('pending', 'valid') AND c.linked_at < ${linked_before} \
         AND NOT EXISTS (SELECT 1 FROM nar_chunks nc WHERE nc.chunk_id = c.id)"
    )
}

impl Database {
    /// Deletes the pushed NAR file names (migration 0009) recorded before
    /// `recorded_before` whose NAR their cache no longer serves; returns
    /// how many went. A name recorded later may belong to an upload still
    /// in the pipeline, whose object does not exist yet.
    pub async fn delete_stale_nar_file_names(&self, recorded_before: Timestamp) -> Result<u64> {
        let deleted = sqlx::query(
            "DELETE FROM nar_file_names WHERE created_at < $1 AND NOT EXISTS (\
             SELECT 1 FROM objects o JOIN nars n ON n.id = o.nar_id \
             WHERE o.cache_id = nar_file_names.cache_id AND n.nar_hash = nar_file_names.nar_hash)",
        )
        .bind(recorded_before.unix_millis())
        .execute(&self.pool)
        .await
        .map_err(query_error("deleting stale pushed NAR file names"))?
        .rows_affected();
        Ok(deleted)
    }

    /// Every cache with its retention period.
    pub async fn cache_retentions(&self) -> Result<Vec<CacheRetention>> {
        let rows = sqlx::query("SELECT id, retention_period_secs FROM caches ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing cache retention periods"))?;
        rows.iter()
            .map(|row| {
                Ok(CacheRetention {
                    cache_id: CacheId(i64_col(row, "id")?),
                    retention_period: opt_u64_col(row, "retention_period_secs")?
                        .map(std::time::Duration::from_secs),
                })
            })
            .collect()
    }

    /// Deletes at most `limit` objects of a cache not accessed since
    /// `accessed_before` and not kept by a pin; returns how many went. An
    /// access flushed or a re-push committed meanwhile keeps the object:
    /// the condition is on the deleted row itself, which PostgreSQL
    /// re-checks after waiting. The pinned closure is computed by this
    /// same statement, under the cache's row lock that pinning takes too
    /// (see `pins`), so a pin is either seen here or made after the
    /// deletion commits (and then finds its root gone). Their NarSizes
    /// leave the cache's usage in the same transaction.
    pub async fn delete_expired_objects(
        &self,
        cache_id: CacheId,
        accessed_before: Timestamp,
        limit: u32,
    ) -> Result<u64> {
        let condition = format!(
            "last_accessed_at < $2 AND id IN \
             (SELECT id FROM objects WHERE cache_id = $1 AND last_accessed_at < $2 \
              AND store_path_hash NOT IN ({}) \
              ORDER BY last_accessed_at, id LIMIT $3)",
            pinned_closure_sql(self.backend, 1)
        );
        let deleted = self
            .delete_objects_where(
                cache_id,
                &condition,
                vec![
                    Param::Int(accessed_before.unix_millis()),
                    Param::Int(i64::from(limit)),
                ],
            )
            .await?;
        Ok(deleted.len() as u64)
    }

    /// Deletes these paths from a cache at once (path deletion); returns
    /// the ones that were there. Their NARs and chunks stay until GC finds
    /// nothing else holding them; their NarSizes leave the cache's usage at
    /// once.
    pub async fn delete_objects(
        &self,
        cache_id: CacheId,
        hashes: &[StorePathHash],
    ) -> Result<Vec<StorePathHash>> {
        let mut deleted = Vec::new();
        for batch in hashes.chunks(MAX_IN_LIST) {
            let condition = format!("store_path_hash IN ({})", placeholders(2, batch.len()));
            let params = batch
                .iter()
                .map(|hash| Param::Text(hash.as_str().to_owned()))
                .collect();
            deleted.extend(
                self.delete_objects_where(cache_id, &condition, params)
                    .await?,
            );
        }
        Ok(deleted)
    }

    /// NARs after `after` (by id) that nothing holds, at most `limit`, in
    /// id order: candidates for [`Database::delete_unreferenced_nars`].
    pub async fn unreferenced_nars(&self, after: NarId, limit: u32) -> Result<Vec<NarId>> {
        let sql = format!(
            "SELECT n.id FROM nars n WHERE n.id > $1 AND {} ORDER BY n.id LIMIT $2",
            nar_unreferenced()
        );
        let rows = sqlx::query(&sql)
            .bind(after.0)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("finding unreferenced NARs"))?;
        rows.iter()
            .map(|row| Ok(NarId(i64_col(row, "id")?)))
            .collect()
    }

    /// Deletes those of `ids` that nothing holds now, with their chunk
    /// lists (NARs have no storage object of their own). Returns the ids
    /// deleted.
    pub async fn delete_unreferenced_nars(&self, ids: &[NarId]) -> Result<Vec<NarId>> {
        let mut deleted = Vec::new();
        for batch in ids.chunks(MAX_IN_LIST) {
            let ids: Vec<i64> = batch.iter().map(|id| id.0).collect();
            let mut tx = self.begin_write().await?;
            lock_rows(&mut tx, self.backend, "nars", &ids).await?;
            let sql = format!(
                "DELETE FROM nars WHERE id IN ({}) AND id IN \
                 (SELECT n.id FROM nars n WHERE {}) RETURNING id",
                placeholders(1, ids.len()),
                nar_unreferenced()
            );
            let rows = bind_ids(sqlx::query(&sql), &ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(query_error("deleting unreferenced NARs"))?;
            tx.commit("committing deleted NARs").await?;
            for row in &rows {
                deleted.push(NarId(i64_col(row, "id")?));
            }
        }
        Ok(deleted)
    }

    /// Chunks after `after` (by id) that no NAR lists and no chunker looked
    /// up since `linked_before`, at most `limit`, in id order: candidates
    /// for [`Database::claim_unreferenced_chunks`].
    pub async fn unreferenced_chunks(
        &self,
        after: ChunkId,
        linked_before: Timestamp,
        limit: u32,
    ) -> Result<Vec<ChunkId>> {
        let sql = format!(
            "SELECT c.id FROM chunks c WHERE c.id > $1 AND {} ORDER BY c.id LIMIT $3",
            chunk_unreferenced(2)
        );
        let rows = sqlx::query(&sql)
            .bind(after.0)
            .bind(linked_before.unix_millis())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("finding unreferenced chunks"))?;
        rows.iter()
            .map(|row| Ok(ChunkId(i64_col(row, "id")?)))
            .collect()
    }

    /// Marks those of `ids` that are still unreferenced `deleting`: from
    /// then on no NAR can list them, and a chunker that needs the bytes
    /// again gets a fresh row. Returns how many were claimed.
    pub async fn claim_unreferenced_chunks(
        &self,
        ids: &[ChunkId],
        linked_before: Timestamp,
    ) -> Result<u64> {
        let mut claimed = 0;
        for batch in ids.chunks(MAX_IN_LIST) {
            let ids: Vec<i64> = batch.iter().map(|id| id.0).collect();
            let mut tx = self.begin_write().await?;
            lock_rows(&mut tx, self.backend, "chunks", &ids).await?;
            let sql = format!(
                "UPDATE chunks SET state = 'deleting' WHERE id IN ({}) AND id IN \
                 (SELECT c.id FROM chunks c WHERE {})",
                placeholders(2, ids.len()),
                chunk_unreferenced(1)
            );
            let query = sqlx::query(&sql).bind(linked_before.unix_millis());
            let result = bind_ids(query, &ids)
                .execute(&mut *tx)
                .await
                .map_err(query_error("claiming unreferenced chunks"))?;
            tx.commit("committing claimed chunks").await?;
            claimed += result.rows_affected();
        }
        Ok(claimed)
    }

    /// Claimed chunks after `after` (by id), at most `limit`, in id order:
    /// the ones whose storage objects GC deletes next, including those a
    /// crashed run left.
    pub async fn claimed_chunks(&self, after: ChunkId, limit: u32) -> Result<Vec<Chunk>> {
        let sql = format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks WHERE state = 'deleting' AND id > $1 \
             ORDER BY id LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(after.0)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing claimed chunks"))?;
        rows.iter().map(chunk_from_row).collect()
    }

    /// Deletes the rows of claimed chunks whose storage objects are gone;
    /// returns how many. A chunk revived meanwhile has a new row and is
    /// not among them.
    pub async fn delete_claimed_chunks(&self, ids: &[ChunkId]) -> Result<u64> {
        let mut deleted = 0;
        for batch in ids.chunks(MAX_IN_LIST) {
            let ids: Vec<i64> = batch.iter().map(|id| id.0).collect();
            let sql = format!(
                "DELETE FROM chunks WHERE state = 'deleting' AND id IN ({})",
                placeholders(1, ids.len())
            );
            let result = bind_ids(sqlx::query(&sql), &ids)
                .execute(&self.pool)
                .await
                .map_err(query_error("deleting claimed chunks"))?;
            deleted += result.rows_affected();
        }
        Ok(deleted)
    }

    /// The content hash of each of `ids` that has a chunk row (in any
    /// state): what decides whether a chunk object found in storage is
    /// referenced.
    pub async fn chunk_hashes(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Sha256Hash>> {
        let mut out = HashMap::with_capacity(ids.len());
        for batch in ids.chunks(MAX_IN_LIST) {
            let ids: Vec<i64> = batch.iter().map(|id| id.0).collect();
            let sql = format!(
                "SELECT id, chunk_hash FROM chunks WHERE id IN ({})",
                placeholders(1, ids.len())
            );
            let rows = bind_ids(sqlx::query(&sql), &ids)
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("looking up chunk hashes"))?;
            for row in &rows {
                out.insert(
                    ChunkId(i64_col(row, "id")?),
                    chunk_hash_col(row, "chunk_hash")?,
                );
            }
        }
        Ok(out)
    }

    /// Those of `ids` that are uploads still in the pipeline: the chunk
    /// objects a chunker wrote for a small NAR before their rows exist
    /// (named by the upload, `worker::inline_chunk_object_key`) are theirs
    /// until the upload leaves the pipeline, in the transaction that
    /// records their locations.
    pub async fn uploads_in_flight(&self, ids: &[UploadId]) -> Result<HashSet<UploadId>> {
        let mut out = HashSet::new();
        for batch in ids.chunks(MAX_IN_LIST) {
            let sql = format!(
                "SELECT id FROM uploads WHERE id IN ({}) AND phase IN {IN_FLIGHT_PHASES_SQL}",
                placeholders(1, batch.len())
            );
            let mut query = sqlx::query(&sql);
            for id in batch {
                query = query.bind(id.as_str());
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("looking up uploads in flight"))?;
            for row in &rows {
                out.insert(parsed_col(row, "id")?);
            }
        }
        Ok(out)
    }

    /// The keys among `keys` that some chunk row records as its location,
    /// or that a pack row names (a per-chunk object compaction retired,
    /// which waits out its grace as a pack).
    pub async fn chunk_object_keys_in_use(&self, keys: &[&str]) -> Result<HashSet<String>> {
        self.keys_named(keys, "looking up chunk object keys", |list| {
            format!(
                "SELECT object_key FROM chunks WHERE object_key IN ({list}) \
                 UNION SELECT object_key FROM packs WHERE object_key IN ({list})"
            )
        })
        .await
    }

    /// The keys among `keys` that a pack row names.
    pub async fn pack_keys_recorded(&self, keys: &[&str]) -> Result<HashSet<String>> {
        self.keys_named(keys, "looking up pack keys", |list| {
            format!("SELECT object_key FROM packs WHERE object_key IN ({list})")
        })
        .await
    }

    /// The keys among `keys` that an upload or a staged file names as its
    /// staged NAR.
    pub async fn staged_keys_in_use(&self, keys: &[&str]) -> Result<HashSet<String>> {
        self.keys_named(keys, "looking up staged keys", |list| {
            format!(
                "SELECT staged_key AS object_key FROM uploads WHERE staged_key IN ({list}) \
                 UNION SELECT staged_key FROM staged_files WHERE staged_key IN ({list})"
            )
        })
        .await
    }

    /// The keys among `keys` that the query `select` builds finds, a batch
    /// at a time: `select` gets the batch's placeholder list and returns an
    /// `object_key` column.
    async fn keys_named(
        &self,
        keys: &[&str],
        what: &'static str,
        select: impl Fn(&str) -> String,
    ) -> Result<HashSet<String>> {
        let mut out = HashSet::with_capacity(keys.len());
        for batch in keys.chunks(MAX_IN_LIST) {
            let sql = select(&placeholders(1, batch.len()));
            let mut query = sqlx::query(&sql);
            for key in batch {
                query = query.bind(*key);
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error(what))?;
            for row in &rows {
                out.insert(string_col(row, "object_key")?);
            }
        }
        Ok(out)
    }

    /// Staged files (Nix's `PUT nar/…`) no narinfo claimed since before
    /// `created_before`, oldest first, at most `limit`.
    pub async fn expired_staged_files(
        &self,
        created_before: Timestamp,
        limit: u32,
    ) -> Result<Vec<StagedFile>> {
        let sql = format!(
            "SELECT {STAGED_FILE_COLUMNS} FROM staged_files WHERE created_at < $1 \
             ORDER BY created_at, cache_id, file_name LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(created_before.unix_millis())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing expired staged files"))?;
        rows.iter().map(staged_file_from_row).collect()
    }
}

/// Binds each id in turn.
fn bind_ids<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ids: &'q [i64],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for id in ids {
        query = query.bind(*id);
    }
    query
}

/// On PostgreSQL, locks the rows `ids` of `table` for update, in id order
/// (so two lockers cannot deadlock), making the statements after it in the
/// transaction see every linker that held a share lock on them. SQLite's
/// `BEGIN IMMEDIATE` already holds the one write lock.
async fn lock_rows(
    connection: &mut sqlx::AnyConnection,
    backend: Backend,
    table: &'static str,
    ids: &[i64],
) -> Result<()> {
    if backend == Backend::Sqlite || ids.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "SELECT id FROM {table} WHERE id IN ({}) ORDER BY id FOR UPDATE",
        placeholders(1, ids.len())
    );
    bind_ids(sqlx::query(&sql), ids)
        .fetch_all(&mut *connection)
        .await
        .map_err(query_error("locking rows for GC"))?;
    Ok(())
}
