//! What the push endpoints need beyond the pipeline's tables: NAR files
//! staged through Nix's own upload protocol (`staged_files`), and linking
//! a path to a NAR that is already stored (without proof of possession,
//! or a path pushed again into the cache that holds it).
//!
//! A staged file is a verified NAR a cache received with `PUT nar/<name>`
//! that no narinfo has claimed yet; its row owns its staging object. The
//! narinfo that names it claims it in the same transaction that records its
//! upload ([`Database::claim_staged_file`]), which hands the object over to
//! the upload row. So a staged NAR is named by exactly one row at every
//! commit, a claim that fails (a 5xx, a crash) leaves the file for a retry,
//! and the reaper's claim on an expired file
//! ([`Database::take_expired_staged_file`]) and a narinfo's exclude each
//! other.

use sqlx::any::AnyRow;

use super::error::{constraint_error, query_error, Result};
use super::nars::{nar_from_row, JOINED_NAR, JOINED_NAR_SELECT};
use super::objects::{upsert_counted_object_on, NewObject, Object, ObjectMetadata};
use super::quota::{adjust_usage_on, lock_cache_on, lock_existing_cache_on, make_room_on, Charge};
use super::row::{i64_col, nar_hash_col, opt_u32_col, string_col, time_col, to_i64, u64_col};
use super::types::{Actor, CacheId, Timestamp};
use super::{Backend, Database, Nar};
use larder_nix::{NarHash, StorePathHash};

/// A verified NAR file a cache received with `PUT nar/<file name>`, waiting
/// for the narinfo that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    pub cache_id: CacheId,
    /// The name Nix gave it: `<FileHash>.nar[.zst|.xz]`.
    pub file_name: String,
    /// Where the uncompressed NAR sits in staging storage.
    pub staged_key: String,
    /// The CRC-32 of the staged bytes, as the API wrote them; `None` for
    /// files staged before it was kept.
    pub staged_crc32: Option<u32>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub created_at: Timestamp,
}

pub(crate) const STAGED_FILE_COLUMNS: &str =
    "cache_id, file_name, staged_key, staged_crc32, nar_hash, nar_size, created_at";

pub(crate) fn staged_file_from_row(row: &AnyRow) -> Result<StagedFile> {
    Ok(StagedFile {
        cache_id: CacheId(i64_col(row, "cache_id")?),
        file_name: string_col(row, "file_name")?,
        staged_key: string_col(row, "staged_key")?,
        staged_crc32: opt_u32_col(row, "staged_crc32")?,
        nar_hash: nar_hash_col(row, "nar_hash")?,
        nar_size: u64_col(row, "nar_size")?,
        created_at: time_col(row, "created_at")?,
    })
}

/// A path to link into a cache, pointing at a NAR found by its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedPath {
    pub store_path_hash: StorePathHash,
    pub metadata: ObjectMetadata,
    /// The pushing token.
    pub created_by: Actor,
}

impl Database {
    /// Records a staged file, unless the cache already has one of that
    /// name waiting: a name is a FileHash, so the waiting file holds the
    /// same bytes, and it is kept (its wait for a narinfo starts again). A
    /// new file's NarSize is counted in the cache's pending bytes, admitted
    /// only within the quota (under eviction, after making room),
    /// [`DbError::QuotaExceeded`] otherwise, with nothing written. One
    /// transaction under the cache's lock, so concurrent PUTs of one file
    /// keep exactly one copy, counted once. Returns the staged key recorded
    /// for the name: when it is not `file.staged_key`, the caller deletes
    /// its own object. [`DbError::NotFound`] when the cache has gone.
    pub async fn put_staged_file(&self, file: &StagedFile) -> Result<String> {
        let mut tx = self.begin_write().await?;
        let mut cache = lock_existing_cache_on(&mut tx, self.backend, file.cache_id).await?;
        let waiting = sqlx::query(
            "UPDATE staged_files SET created_at = $3 WHERE cache_id = $1 AND file_name = $2 \
             RETURNING staged_key",
        )
        .bind(file.cache_id.0)
        .bind(file.file_name.as_str())
        .bind(file.created_at.unix_millis())
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("refreshing a staged file"))?;
        let recorded = match waiting {
            Some(row) => string_col(&row, "staged_key")?,
            None => {
                make_room_on(&mut tx, &mut cache, self.quota, file.nar_size, None).await?;
                sqlx::query(
                    "INSERT INTO staged_files (cache_id, file_name, staged_key, staged_crc32, \
                     nar_hash, nar_size, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(file.cache_id.0)
                .bind(file.file_name.as_str())
                .bind(file.staged_key.as_str())
                .bind(file.staged_crc32.map(i64::from))
                .bind(file.nar_hash.to_string())
                .bind(to_i64("NAR size", file.nar_size)?)
                .bind(file.created_at.unix_millis())
                .execute(&mut *tx)
                .await
                .map_err(constraint_error(
                    "recording a staged file",
                    || format!("staged file {}", file.file_name),
                    || format!("cache {}", file.cache_id),
                ))?;
                adjust_usage_on(&mut tx, &mut cache, 0, to_i64("NAR size", file.nar_size)?).await?;
                file.staged_key.clone()
            }
        };
        tx.commit("committing a staged file").await?;
        Ok(recorded)
    }

    /// The staged file of that name in a cache, if any.
    pub async fn staged_file(
        &self,
        cache_id: CacheId,
        file_name: &str,
    ) -> Result<Option<StagedFile>> {
        let sql = format!(
            "SELECT {STAGED_FILE_COLUMNS} FROM staged_files WHERE cache_id = $1 AND file_name = $2"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id.0)
            .bind(file_name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a staged file"))?;
        row.as_ref().map(staged_file_from_row).transpose()
    }

    /// The reaper's claim: deletes and returns the staged file of that name
    /// if it is still older than `created_before` (a narinfo claiming it at
    /// the same moment gets it or does not, and a fresh file of the same
    /// name stays), and subtracts its NarSize from the cache's pending bytes
    /// in the same transaction, under the cache's lock.
    pub async fn take_expired_staged_file(
        &self,
        cache_id: CacheId,
        file_name: &str,
        created_before: Timestamp,
    ) -> Result<Option<StagedFile>> {
        let mut tx = self.begin_write().await?;
        // A staged file goes with its cache: no cache, no file.
        let Some(mut cache) = lock_cache_on(&mut tx, self.backend, cache_id).await? else {
            return Ok(None);
        };
        let sql = format!(
            "DELETE FROM staged_files WHERE cache_id = $1 AND file_name = $2 AND created_at < $3 \
             RETURNING {STAGED_FILE_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id.0)
            .bind(file_name)
            .bind(created_before.unix_millis())
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("taking a staged file"))?;
        let taken = row.as_ref().map(staged_file_from_row).transpose()?;
        if let Some(file) = &taken {
            adjust_usage_on(&mut tx, &mut cache, 0, -to_i64("NAR size", file.nar_size)?).await?;
        }
        tx.commit("committing a taken staged file").await?;
        Ok(taken)
    }

    /// The NAR with this hash, if it is `valid`.
    pub async fn valid_nar_by_hash(&self, nar_hash: &NarHash) -> Result<Option<Nar>> {
        let sql = format!(
            "SELECT {JOINED_NAR_SELECT} FROM nars n WHERE n.nar_hash = $1 AND n.state = 'valid'"
        );
        let row = sqlx::query(&sql)
            .bind(nar_hash.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a valid NAR"))?;
        row.map(|row| nar_from_row(&row, &JOINED_NAR)).transpose()
    }

    /// Creates (or replaces) the object of `path` in a cache, pointing at
    /// the NAR with `nar_hash`, in one transaction that finds the NAR still
    /// `valid`. On PostgreSQL the NAR row is share-locked until the commit,
    /// so GC cannot start deleting it in between. `None` when no valid NAR
    /// has that hash (any more); nothing is written then. The path's
    /// NarSize (less that of the object it replaces) is admitted within the
    /// cache's quota like an upload's ([`DbError::QuotaExceeded`]);
    /// [`DbError::NotFound`] when the cache has gone.
    pub async fn link_valid_nar(
        &self,
        cache_id: CacheId,
        nar_hash: &NarHash,
        path: &LinkedPath,
        at: Timestamp,
    ) -> Result<Option<(Object, Nar)>> {
        let lock = match self.backend {
            Backend::Postgres => " FOR SHARE",
            // `BEGIN IMMEDIATE` already holds SQLite's one write lock.
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT {JOINED_NAR_SELECT} FROM nars n \
             WHERE n.nar_hash = $1 AND n.state = 'valid'{lock}"
        );
        let mut tx = self.begin_write().await?;
        // The cache's lock first, as in every transaction that changes its
        // usage (see `quota`), then the NAR's share lock.
        let mut cache = lock_existing_cache_on(&mut tx, self.backend, cache_id).await?;
        let row = sqlx::query(&sql)
            .bind(nar_hash.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("looking up a valid NAR"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let nar = nar_from_row(&row, &JOINED_NAR)?;
        let new = NewObject {
            store_path_hash: path.store_path_hash,
            nar_id: nar.id,
            metadata: path.metadata.clone(),
            created_by: path.created_by.clone(),
        };
        let object = upsert_counted_object_on(
            &mut tx,
            &mut cache,
            Charge::Checked(self.quota),
            &new,
            nar.nar_size,
            0,
            at,
        )
        .await?;
        tx.commit("committing a linked path").await?;
        Ok(Some((object, nar)))
    }
}
