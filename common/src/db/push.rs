//! What the push endpoints need beyond the pipeline's tables: NAR files
//! staged through Nix's own upload protocol (`staged_files`), and linking
//! a path to a NAR that is already stored without proof of possession.

use sqlx::any::AnyRow;

use super::error::{constraint_error, query_error, Result};
use super::nars::{nar_from_row, JOINED_NAR, JOINED_NAR_SELECT};
use super::objects::{upsert_object_on, NewObject, Object, ObjectMetadata};
use super::row::{i64_col, nar_hash_col, string_col, time_col, to_i64, u64_col};
use super::types::{CacheId, Timestamp};
use super::{Backend, Database, Nar};
use crate::nix::{NarHash, StorePathHash};

/// A verified NAR file a cache received with `PUT nar/<file name>`, waiting
/// for the narinfo that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    pub cache_id: CacheId,
    /// The name Nix gave it: `<FileHash>.nar[.zst|.xz]`.
    pub file_name: String,
    /// Where the uncompressed NAR sits in staging storage.
    pub staged_key: String,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub created_at: Timestamp,
}

pub(crate) const STAGED_FILE_COLUMNS: &str =
    "cache_id, file_name, staged_key, nar_hash, nar_size, created_at";

pub(crate) fn staged_file_from_row(row: &AnyRow) -> Result<StagedFile> {
    Ok(StagedFile {
        cache_id: CacheId(i64_col(row, "cache_id")?),
        file_name: string_col(row, "file_name")?,
        staged_key: string_col(row, "staged_key")?,
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
    /// The `sub` of the pushing token.
    pub created_by: Option<String>,
}

impl Database {
    /// Records a staged file, replacing an earlier one of the same name in
    /// that cache. Returns the staged key of the file it replaced, whose
    /// object the caller deletes.
    pub async fn put_staged_file(&self, file: &StagedFile) -> Result<Option<String>> {
        let mut tx = self.begin_write().await?;
        let previous = sqlx::query(
            "SELECT staged_key FROM staged_files WHERE cache_id = $1 AND file_name = $2",
        )
        .bind(file.cache_id.0)
        .bind(file.file_name.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("looking up a staged file"))?
        .map(|row| string_col(&row, "staged_key"))
        .transpose()?;
        sqlx::query(
            "INSERT INTO staged_files (cache_id, file_name, staged_key, nar_hash, nar_size, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (cache_id, file_name) DO UPDATE SET staged_key = excluded.staged_key, \
             nar_hash = excluded.nar_hash, nar_size = excluded.nar_size, \
             created_at = excluded.created_at",
        )
        .bind(file.cache_id.0)
        .bind(file.file_name.as_str())
        .bind(file.staged_key.as_str())
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
        tx.commit()
            .await
            .map_err(query_error("committing a staged file"))?;
        Ok(previous.filter(|key| *key != file.staged_key))
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

    /// Removes and returns the staged file of that name: a narinfo claims
    /// it once, so two requests never hand the same staged NAR on twice.
    pub async fn take_staged_file(
        &self,
        cache_id: CacheId,
        file_name: &str,
    ) -> Result<Option<StagedFile>> {
        let sql = format!(
            "DELETE FROM staged_files WHERE cache_id = $1 AND file_name = $2 \
             RETURNING {STAGED_FILE_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id.0)
            .bind(file_name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("claiming a staged file"))?;
        row.as_ref().map(staged_file_from_row).transpose()
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
    /// has that hash (any more); nothing is written then.
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
        let object = upsert_object_on(&mut tx, cache_id, &new, at).await?;
        tx.commit()
            .await
            .map_err(query_error("committing a linked path"))?;
        Ok(Some((object, nar)))
    }
}
