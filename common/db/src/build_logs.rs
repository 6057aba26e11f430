//! `build_logs` and `debug_infos`: the small files Nix uploads beside its
//! paths, kept per cache in the database (migration 0008).
//!
//! A build log (`PUT log/<drv>`) is one zstd frame of the log, keyed by the
//! derivation's base name; the debug-info index (`PUT debuginfo/<build
//! id>`) is a small JSON document kept as sent. Both live in the database
//! rather than in storage for the reasons `.ls` listings do: they go with
//! their cache by `ON DELETE CASCADE`, GC deletes rows and never storage
//! objects for them, and there is no orphan to sweep. Logs are KBs to a few
//! MBs, a tenth of that compressed, and at most `[ingest] max-log-size`
//! before compression. Both are replaced by a PUT again and age from their
//! last upload (`uploaded_at`), which is what retention measures.

use std::io;

use super::error::{constraint_error, query_error, Result};
use super::row::{blob_col, string_col, u64_col};
use super::types::{CacheId, Timestamp};
use super::Database;

/// The zstd level logs are compressed with: text compresses well at a low
/// level, and the request's blocking job pays for it.
const LOG_ZSTD_LEVEL: i32 = 3;

/// A build log as stored: one zstd frame, and its size decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedLog {
    frame: Vec<u8>,
    size: u64,
}

impl std::fmt::Debug for EncodedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EncodedLog({} bytes, {} compressed)",
            self.size,
            self.frame.len()
        )
    }
}

impl EncodedLog {
    /// Compresses a log. CPU work: call it where blocking is fine.
    pub fn encode(log: &[u8]) -> io::Result<Self> {
        Ok(Self {
            frame: zstd::bulk::compress(log, LOG_ZSTD_LEVEL)?,
            size: log.len() as u64,
        })
    }

    /// The log's text. CPU work in proportion to the log.
    pub fn decode(&self) -> io::Result<Vec<u8>> {
        zstd::stream::decode_all(self.frame.as_slice())
    }

    /// The log's size, decoded.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Database {
    /// Stores the build log of a derivation in a cache, replacing an
    /// earlier one. [`super::DbError::NotFound`] when the cache has gone.
    pub async fn put_build_log(
        &self,
        cache_id: CacheId,
        drv_name: &str,
        log: &EncodedLog,
        now: Timestamp,
    ) -> Result<()> {
        let size = i64::try_from(log.size).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO build_logs (cache_id, drv_name, log, log_size, uploaded_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cache_id, drv_name) DO UPDATE \
             SET log = excluded.log, log_size = excluded.log_size, \
             uploaded_at = excluded.uploaded_at",
        )
        .bind(cache_id.0)
        .bind(drv_name)
        .bind(log.frame.as_slice())
        .bind(size)
        .bind(now.unix_millis())
        .execute(&self.pool)
        .await
        .map_err(constraint_error(
            "storing a build log",
            || format!("build log {drv_name}"),
            || format!("cache {cache_id}"),
        ))?;
        Ok(())
    }

    /// The build log of a derivation in a cache, if it has one.
    pub async fn build_log(&self, cache_id: CacheId, drv_name: &str) -> Result<Option<EncodedLog>> {
        let row = sqlx::query(
            "SELECT log, log_size FROM build_logs WHERE cache_id = $1 AND drv_name = $2",
        )
        .bind(cache_id.0)
        .bind(drv_name)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading a build log"))?;
        row.map(|row| {
            Ok(EncodedLog {
                frame: blob_col(&row, "log")?,
                size: u64_col(&row, "log_size")?,
            })
        })
        .transpose()
    }

    /// Stores a debug-info entry (checked JSON) in a cache, replacing an
    /// earlier one. [`super::DbError::NotFound`] when the cache has gone.
    pub async fn put_debug_info(
        &self,
        cache_id: CacheId,
        build_id: &str,
        info: &str,
        now: Timestamp,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO debug_infos (cache_id, build_id, info, uploaded_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (cache_id, build_id) DO UPDATE \
             SET info = excluded.info, uploaded_at = excluded.uploaded_at",
        )
        .bind(cache_id.0)
        .bind(build_id)
        .bind(info)
        .bind(now.unix_millis())
        .execute(&self.pool)
        .await
        .map_err(constraint_error(
            "storing a debug-info entry",
            || format!("debug info {build_id}"),
            || format!("cache {cache_id}"),
        ))?;
        Ok(())
    }

    /// The debug-info entry of a build id in a cache, if it has one.
    pub async fn debug_info(&self, cache_id: CacheId, build_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT info FROM debug_infos WHERE cache_id = $1 AND build_id = $2")
            .bind(cache_id.0)
            .bind(build_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a debug-info entry"))?;
        row.map(|row| string_col(&row, "info")).transpose()
    }

    /// Deletes at most `limit` build logs and at most `limit` debug-info
    /// entries of a cache uploaded before `uploaded_before`; returns how
    /// many went. A PUT again committed meanwhile keeps its row: the
    /// condition is on the deleted row itself.
    pub async fn delete_expired_logs(
        &self,
        cache_id: CacheId,
        uploaded_before: Timestamp,
        limit: u32,
    ) -> Result<u64> {
        let mut deleted = 0;
        for (table, key) in [("build_logs", "drv_name"), ("debug_infos", "build_id")] {
            let sql = format!(
                "DELETE FROM {table} WHERE cache_id = $1 AND uploaded_at < $2 AND {key} IN \
                 (SELECT {key} FROM {table} WHERE cache_id = $1 AND uploaded_at < $2 \
                  ORDER BY uploaded_at LIMIT $3)"
            );
            let result = sqlx::query(&sql)
                .bind(cache_id.0)
                .bind(uploaded_before.unix_millis())
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await
                .map_err(query_error("deleting expired build logs"))?;
            deleted += result.rows_affected();
        }
        Ok(deleted)
    }
}
