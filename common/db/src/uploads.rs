//! The `uploads` table: the ingest pipeline's state for each pushed path.
//! The database is the truth; queue messages only point at rows here.
//!
//! Phases move forward only (`spooled` → `chunking` → `compressing` →
//! `done`, or to `failed` from any phase before `done`), so a redelivered
//! message cannot move an upload back. `updated_at` changes with every
//! step; the reconciler finds uploads stuck in a phase by it.

use sqlx::any::AnyRow;

use super::error::{constraint_error, query_error, DbError, Result};
use super::objects::{bind_params, Param};
use super::objects::{upsert_counted_object_on, NewObject, Object, ObjectMetadata};
use super::quota::{
    adjust_usage_on, lock_cache_on, lock_existing_cache_on, make_room_on, Charge, LockedCache,
    QuotaDefaults,
};
use super::row::{
    i64_col, json_col, nar_hash_col, opt_i64_col, opt_string_col, opt_u32_col, parsed_col,
    store_path_hash_col, string_col, time_col, to_i64, to_json, u32_col, u64_col,
};
use super::types::{
    Actor, CacheId, NarId, StoreState, Timestamp, UploadId, UploadPhase, IN_FLIGHT_PHASES_SQL,
};
use super::upload_events::announce_on;
use super::{affected, Database};
use larder_api::cache_name::CacheName;
use larder_nix::{NarHash, StorePathHash};

/// An upload to record once its NAR is spooled and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUpload {
    pub cache_id: CacheId,
    pub store_path_hash: StorePathHash,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// The object to create when the NAR is finalised.
    pub metadata: ObjectMetadata,
    /// Where the spooled NAR sits in staging storage.
    pub staged_key: String,
    /// The CRC-32 of the staged bytes, as the API wrote them.
    pub staged_crc32: Option<u32>,
    pub trace_id: Option<String>,
    /// The pushing token.
    pub created_by: Actor,
}

/// An upload row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub id: UploadId,
    pub cache_id: CacheId,
    pub store_path_hash: StorePathHash,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub metadata: ObjectMetadata,
    pub phase: UploadPhase,
    pub staged_key: String,
    /// The CRC-32 of the staged bytes, as the API wrote them; `None` for
    /// uploads recorded before it was kept.
    pub staged_crc32: Option<u32>,
    /// Set once the upload is linked to its NAR row.
    pub nar_id: Option<NarId>,
    /// Why it failed, readable by the user.
    pub error: Option<String>,
    /// How often its job was (re)published.
    pub attempts: u32,
    pub trace_id: Option<String>,
    pub created_by: Actor,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

const UPLOAD_COLUMNS: &str = "id, cache_id, store_path_hash, nar_hash, nar_size, \
    object_metadata, phase, staged_key, staged_crc32, nar_id, error, attempts, trace_id, \
    created_by, created_by_jti, created_at, updated_at";

fn upload_from_row(row: &AnyRow) -> Result<Upload> {
    Ok(Upload {
        id: parsed_col(row, "id")?,
        cache_id: CacheId(i64_col(row, "cache_id")?),
        store_path_hash: store_path_hash_col(row, "store_path_hash")?,
        nar_hash: nar_hash_col(row, "nar_hash")?,
        nar_size: u64_col(row, "nar_size")?,
        metadata: json_col(row, "object_metadata")?,
        phase: parsed_col(row, "phase")?,
        staged_key: string_col(row, "staged_key")?,
        staged_crc32: opt_u32_col(row, "staged_crc32")?,
        nar_id: opt_i64_col(row, "nar_id")?.map(NarId),
        error: opt_string_col(row, "error")?,
        attempts: u32_col(row, "attempts")?,
        trace_id: opt_string_col(row, "trace_id")?,
        created_by: Actor {
            subject: opt_string_col(row, "created_by")?,
            jti: opt_string_col(row, "created_by_jti")?,
        },
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

/// Inserts a new upload in phase `spooled` with a fresh random id into its
/// locked cache, and counts its NarSize in the cache's pending bytes:
/// admitted only within the cache's quota (under eviction, after making
/// room; never by evicting the path being pushed),
/// [`DbError::QuotaExceeded`] otherwise.
async fn create_upload_on(
    connection: &mut sqlx::AnyConnection,
    cache: &mut LockedCache,
    quota: QuotaDefaults,
    new: &NewUpload,
    at: Timestamp,
) -> Result<Upload> {
    make_room_on(
        connection,
        cache,
        quota,
        new.nar_size,
        Some(&new.store_path_hash),
    )
    .await?;
    let id = UploadId::random();
    let sql = format!(
        "INSERT INTO uploads (id, cache_id, store_path_hash, nar_hash, nar_size, \
         object_metadata, phase, staged_key, staged_crc32, attempts, trace_id, created_by, \
         created_by_jti, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'spooled', $7, $8, 0, $9, $10, $11, $12, $12) \
         RETURNING {UPLOAD_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id.as_str())
        .bind(new.cache_id.0)
        .bind(new.store_path_hash.as_str())
        .bind(new.nar_hash.to_string())
        .bind(to_i64("NAR size", new.nar_size)?)
        .bind(to_json("object metadata", &new.metadata)?)
        .bind(new.staged_key.as_str())
        .bind(new.staged_crc32.map(i64::from))
        .bind(new.trace_id.as_deref())
        .bind(new.created_by.subject.as_deref())
        .bind(new.created_by.jti.as_deref())
        .bind(at.unix_millis())
        .fetch_one(&mut *connection)
        .await
        .map_err(constraint_error(
            "recording an upload",
            || format!("upload {id}"),
            || format!("cache {}", new.cache_id),
        ))?;
    let upload = upload_from_row(&row)?;
    adjust_usage_on(connection, cache, 0, to_i64("NAR size", new.nar_size)?).await?;
    Ok(upload)
}

fn upload_not_found(id: &UploadId) -> DbError {
    DbError::NotFound {
        what: format!("upload {id}"),
    }
}

impl Database {
    /// Records a new upload in phase `spooled`, with a fresh random id, and
    /// counts its NarSize in the cache's pending bytes: admitted only
    /// within the cache's quota (under eviction, after making room; never
    /// by evicting the path being pushed), [`DbError::QuotaExceeded`]
    /// otherwise, with nothing written. [`DbError::NotFound`] when the
    /// cache has gone.
    pub async fn create_upload(&self, new: &NewUpload, at: Timestamp) -> Result<Upload> {
        let mut tx = self.begin_groupable_write().await?;
        let mut cache = lock_existing_cache_on(&mut tx, self.backend, new.cache_id).await?;
        let upload = create_upload_on(&mut tx, &mut cache, self.quota, new, at).await?;
        tx.commit("committing an upload").await?;
        Ok(upload)
    }

    /// Records the upload of a staged file's NAR (Nix's narinfo naming a
    /// file it PUT before): in one transaction, deletes the cache's staged
    /// file `file_name` if it still names `new.staged_key`, handing its
    /// object over to the new upload, and creates the upload. `None`, with
    /// nothing written, when the staged file is no longer there (another
    /// narinfo claimed it, or the reaper took it). A transaction that does
    /// not commit leaves the staged file in place for a retry. Under the
    /// cache's lock, the file's NarSize leaves the cache's pending bytes and
    /// the upload's enters them, admitted like any upload's.
    pub async fn claim_staged_file(
        &self,
        new: &NewUpload,
        file_name: &str,
        at: Timestamp,
    ) -> Result<Option<Upload>> {
        let mut tx = self.begin_write().await?;
        let mut cache = lock_existing_cache_on(&mut tx, self.backend, new.cache_id).await?;
        let claimed = sqlx::query(
            "DELETE FROM staged_files WHERE cache_id = $1 AND file_name = $2 AND staged_key = $3 \
             RETURNING nar_size",
        )
        .bind(new.cache_id.0)
        .bind(file_name)
        .bind(new.staged_key.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("claiming a staged file"))?;
        let Some(claimed) = claimed else {
            return Ok(None);
        };
        let staged_size = to_i64("NAR size", u64_col(&claimed, "nar_size")?)?;
        adjust_usage_on(&mut tx, &mut cache, 0, -staged_size).await?;
        // The pusher's Nix keeps the narinfo it wrote, naming this file:
        // the file name stays served for the NAR (see migration 0009).
        sqlx::query(
            "INSERT INTO nar_file_names (cache_id, file_name, nar_hash, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (cache_id, file_name) \
             DO UPDATE SET nar_hash = excluded.nar_hash, created_at = excluded.created_at",
        )
        .bind(new.cache_id.0)
        .bind(file_name)
        .bind(new.nar_hash.to_string())
        .bind(at.unix_millis())
        .execute(&mut *tx)
        .await
        .map_err(query_error("recording a pushed NAR file's name"))?;
        let upload = create_upload_on(&mut tx, &mut cache, self.quota, new, at).await?;
        tx.commit("committing an upload of a staged file").await?;
        Ok(Some(upload))
    }

    /// The NAR a file name a pusher gave stands for in a cache (see
    /// migration 0009), if any; whether the cache still serves it is the
    /// caller's to check.
    pub async fn nar_of_pushed_file(
        &self,
        cache_id: CacheId,
        file_name: &str,
    ) -> Result<Option<NarHash>> {
        let row = sqlx::query(
            "SELECT nar_hash FROM nar_file_names WHERE cache_id = $1 AND file_name = $2",
        )
        .bind(cache_id.0)
        .bind(file_name)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("looking up a pushed NAR file's name"))?;
        row.map(|row| nar_hash_col(&row, "nar_hash")).transpose()
    }

    /// The latest upload in flight of this path and NAR in a cache, if
    /// any: what a narinfo PUT again (a retry, or a second `nix copy` of the
    /// same path) waits for when its staged file was already claimed.
    pub async fn in_flight_upload_of_path(
        &self,
        cache_id: CacheId,
        store_path_hash: &StorePathHash,
        nar_hash: &NarHash,
    ) -> Result<Option<Upload>> {
        let sql = format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE cache_id = $1 AND store_path_hash = $2 \
             AND nar_hash = $3 AND phase IN {IN_FLIGHT_PHASES_SQL} \
             ORDER BY created_at DESC, id LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id.0)
            .bind(store_path_hash.as_str())
            .bind(nar_hash.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up an upload in flight"))?;
        row.as_ref().map(upload_from_row).transpose()
    }

    pub async fn upload(&self, id: &UploadId) -> Result<Option<Upload>> {
        let sql = format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up an upload"))?;
        row.as_ref().map(upload_from_row).transpose()
    }

    /// An upload with the name of its cache, in one query: what the status
    /// endpoint needs to decide, from the name alone, whether the caller may
    /// see it. An upload that exists and one that does not then cost the
    /// same round trip.
    pub async fn upload_with_cache_name(
        &self,
        id: &UploadId,
    ) -> Result<Option<(Upload, CacheName)>> {
        let sql = format!(
            "SELECT {UPLOAD_COLUMNS}, \
             (SELECT c.name FROM caches c WHERE c.id = uploads.cache_id) AS cache_name \
             FROM uploads WHERE id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up an upload"))?;
        row.as_ref()
            .map(|row| Ok((upload_from_row(row)?, parsed_col(row, "cache_name")?)))
            .transpose()
    }

    /// Moves an upload forward to `phase`. Returns whether it moved: `false`
    /// when it is already there or past it (a redelivered message).
    /// [`DbError::NotFound`] when there is no such upload.
    pub async fn set_upload_phase(
        &self,
        id: &UploadId,
        phase: UploadPhase,
        at: Timestamp,
    ) -> Result<bool> {
        if phase == UploadPhase::Failed {
            return Err(DbError::InvalidInput {
                what: "upload phase",
                reason: "use fail_upload, which records the reason".to_owned(),
            });
        }
        if phase == UploadPhase::Spooled {
            // Nothing moves back to the first phase; spare the database
            // an `IN ()`, which SQLite accepts and PostgreSQL does not.
            return self.upload_exists_or_not_found(id).await.map(|()| false);
        }
        if phase == UploadPhase::Done {
            // Leaving the pipeline changes the cache's pending bytes.
            return self
                .leave_pipeline(
                    id,
                    "phase = 'done', updated_at = $2",
                    vec![Param::Int(at.unix_millis())],
                )
                .await;
        }
        let sql = format!(
            "UPDATE uploads SET phase = $2, updated_at = $3 \
             WHERE id = $1 AND phase IN {}",
            phase.predecessors()
        );
        let result = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(phase.as_str())
            .bind(at.unix_millis())
            .execute(&self.pool)
            .await
            .map_err(query_error("moving an upload to its next phase"))?;
        if affected(&result) {
            return Ok(true);
        }
        self.upload_exists_or_not_found(id).await.map(|()| false)
    }

    /// Marks an upload failed with a readable reason, unless it is already
    /// done or failed. Returns whether it changed.
    pub async fn fail_upload(&self, id: &UploadId, error: &str, at: Timestamp) -> Result<bool> {
        self.leave_pipeline(
            id,
            "phase = 'failed', error = $2, updated_at = $3",
            vec![Param::Text(error.to_owned()), Param::Int(at.unix_millis())],
        )
        .await
    }

    /// Takes an upload out of the pipeline with `UPDATE uploads SET
    /// {assignments}` (with `params` as `$2` on) if it is
    /// still in flight, and subtracts its NarSize from its cache's pending
    /// bytes in the same transaction. Returns whether it changed.
    async fn leave_pipeline(
        &self,
        id: &UploadId,
        assignments: &str,
        params: Vec<Param>,
    ) -> Result<bool> {
        let Some(cache_id) = self.upload_cache_id(id).await? else {
            return Err(upload_not_found(id));
        };
        let mut tx = self.begin_write().await?;
        // An upload goes with its cache: no cache, no upload.
        let Some(mut cache) = lock_cache_on(&mut tx, self.backend, cache_id).await? else {
            return Err(upload_not_found(id));
        };
        let sql = format!(
            "UPDATE uploads SET {assignments} \
             WHERE id = $1 AND phase IN {IN_FLIGHT_PHASES_SQL} RETURNING nar_size"
        );
        let row = bind_params(sqlx::query(&sql).bind(id.as_str()), params)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("taking an upload out of the pipeline"))?;
        let Some(row) = row else {
            drop(tx);
            return self.upload_exists_or_not_found(id).await.map(|()| false);
        };
        let nar_size = to_i64("NAR size", u64_col(&row, "nar_size")?)?;
        adjust_usage_on(&mut tx, &mut cache, 0, -nar_size).await?;
        announce_on(&mut tx, self.backend, id).await?;
        tx.commit("committing an upload's new phase").await?;
        self.events.wake(id);
        Ok(true)
    }

    /// The cache an upload belongs to (which never changes), if it exists.
    async fn upload_cache_id(&self, id: &UploadId) -> Result<Option<CacheId>> {
        let row = sqlx::query("SELECT cache_id FROM uploads WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up an upload"))?;
        row.map(|row| i64_col(&row, "cache_id").map(CacheId))
            .transpose()
    }

    /// Links an upload to its NAR row.
    pub async fn set_upload_nar(&self, id: &UploadId, nar_id: NarId, at: Timestamp) -> Result<()> {
        let result = sqlx::query("UPDATE uploads SET nar_id = $2, updated_at = $3 WHERE id = $1")
            .bind(id.as_str())
            .bind(nar_id.0)
            .bind(at.unix_millis())
            .execute(&self.pool)
            .await
            .map_err(constraint_error(
                "linking an upload to its NAR",
                || format!("upload {id}"),
                || format!("NAR {nar_id}"),
            ))?;
        if affected(&result) {
            Ok(())
        } else {
            Err(upload_not_found(id))
        }
    }

    /// Counts one more (re)publication of an upload's job and refreshes
    /// `updated_at`, so the reconciler waits a full period before trying
    /// again. Returns the new count.
    pub async fn record_upload_attempt(&self, id: &UploadId, at: Timestamp) -> Result<u32> {
        let row = sqlx::query(
            "UPDATE uploads SET attempts = attempts + 1, updated_at = $2 WHERE id = $1 \
             RETURNING attempts",
        )
        .bind(id.as_str())
        .bind(at.unix_millis())
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("counting an upload attempt"))?;
        match row {
            Some(row) => u32_col(&row, "attempts"),
            None => Err(upload_not_found(id)),
        }
    }

    /// Uploads in one of `phases` not updated since `updated_before`,
    /// oldest first, at most `limit`: the reconciler's and the reaper's
    /// work list.
    pub async fn stuck_uploads(
        &self,
        phases: &[UploadPhase],
        updated_before: Timestamp,
        limit: u32,
    ) -> Result<Vec<Upload>> {
        if phases.is_empty() {
            return Ok(Vec::new());
        }
        let list = super::placeholders(3, phases.len());
        let sql = format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads \
             WHERE updated_at < $1 AND phase IN ({list}) \
             ORDER BY updated_at, id LIMIT $2"
        );
        let mut query = sqlx::query(&sql)
            .bind(updated_before.unix_millis())
            .bind(i64::from(limit));
        for phase in phases {
            query = query.bind(phase.as_str());
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing stuck uploads"))?;
        rows.iter().map(upload_from_row).collect()
    }

    /// The in-flight uploads linked to a NAR: the ones to finalise once it
    /// is valid.
    pub async fn uploads_waiting_on_nar(&self, nar_id: NarId) -> Result<Vec<Upload>> {
        let sql = format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads \
             WHERE nar_id = $1 AND phase IN {IN_FLIGHT_PHASES_SQL} ORDER BY created_at, id"
        );
        let rows = sqlx::query(&sql)
            .bind(nar_id.0)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing the uploads of a NAR"))?;
        rows.iter().map(upload_from_row).collect()
    }

    /// Makes an upload's path visible in one transaction: creates (or
    /// replaces) its object from the recorded metadata and moves the upload
    /// to `done`. Requires the upload to be linked to a `valid` NAR
    /// ([`DbError::Conflict`] otherwise). Idempotent: finalising a `done`
    /// upload returns its object again.
    ///
    /// The upload's bytes move from its cache's pending bytes to its path
    /// bytes (less the NAR of the object it replaces), without a quota
    /// check: they were admitted when the upload was recorded.
    pub async fn finalise_upload(&self, id: &UploadId, at: Timestamp) -> Result<Object> {
        let Some(cache_id) = self.upload_cache_id(id).await? else {
            return Err(upload_not_found(id));
        };
        let mut tx = self.begin_write().await?;
        let Some(mut cache) = lock_cache_on(&mut tx, self.backend, cache_id).await? else {
            return Err(upload_not_found(id));
        };
        let sql = format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("looking up an upload"))?;
        let upload = match row {
            Some(row) => upload_from_row(&row)?,
            None => return Err(upload_not_found(id)),
        };
        let conflict = |why: &str| DbError::Conflict {
            what: format!("upload {id} {why}"),
        };
        if upload.phase == UploadPhase::Failed {
            return Err(conflict("that failed"));
        }
        let nar_id = upload.nar_id.ok_or_else(|| conflict("without a NAR"))?;
        let nar = sqlx::query("SELECT state, nar_size FROM nars WHERE id = $1")
            .bind(nar_id.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("reading a NAR's state"))?;
        let nar_size = match nar {
            Some(row) if parsed_col::<StoreState>(&row, "state")? == StoreState::Valid => {
                u64_col(&row, "nar_size")?
            }
            _ => return Err(conflict("whose NAR is not valid")),
        };
        let sql = format!(
            "UPDATE uploads SET phase = 'done', updated_at = $2 \
             WHERE id = $1 AND phase IN {IN_FLIGHT_PHASES_SQL}"
        );
        let left = affected(
            &sqlx::query(&sql)
                .bind(id.as_str())
                .bind(at.unix_millis())
                .execute(&mut *tx)
                .await
                .map_err(query_error("marking an upload done"))?,
        );
        let new = NewObject {
            store_path_hash: upload.store_path_hash,
            nar_id,
            metadata: upload.metadata.clone(),
            created_by: upload.created_by.clone(),
        };
        let pending = if left {
            -to_i64("NAR size", upload.nar_size)?
        } else {
            0
        };
        let object = upsert_counted_object_on(
            &mut tx,
            &mut cache,
            Charge::AlreadyAdmitted,
            &new,
            nar_size,
            pending,
            at,
        )
        .await?;
        if left {
            announce_on(&mut tx, self.backend, id).await?;
        }
        tx.commit("committing a finalised upload").await?;
        if left {
            self.events.wake(id);
        }
        Ok(object)
    }

    /// Deletes an upload row (the reaper, after removing its staged file);
    /// whether it existed. One still in flight leaves its cache's pending
    /// bytes.
    pub async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        let Some(cache_id) = self.upload_cache_id(id).await? else {
            return Ok(false);
        };
        let mut tx = self.begin_write().await?;
        let Some(mut cache) = lock_cache_on(&mut tx, self.backend, cache_id).await? else {
            return Ok(false);
        };
        let row = sqlx::query("DELETE FROM uploads WHERE id = $1 RETURNING phase, nar_size")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("deleting an upload"))?;
        let Some(row) = row else {
            return Ok(false);
        };
        let phase: UploadPhase = parsed_col(&row, "phase")?;
        if !phase.is_terminal() {
            let pending = to_i64("NAR size", u64_col(&row, "nar_size")?)?;
            adjust_usage_on(&mut tx, &mut cache, 0, -pending).await?;
            announce_on(&mut tx, self.backend, id).await?;
        }
        tx.commit("committing a deleted upload").await?;
        if !phase.is_terminal() {
            self.events.wake(id);
        }
        Ok(true)
    }

    async fn upload_exists_or_not_found(&self, id: &UploadId) -> Result<()> {
        let row = sqlx::query("SELECT id FROM uploads WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up an upload"))?;
        match row {
            Some(_) => Ok(()),
            None => Err(upload_not_found(id)),
        }
    }
}
