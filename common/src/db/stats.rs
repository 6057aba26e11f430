//! Per-cache statistics: how much a cache holds, and how much storage that
//! costs after global deduplication.

use super::error::{query_error, Result};
use super::row::u64_col;
use super::types::CacheId;
use super::Database;

/// What a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub object_count: u64,
    /// The sum of the NAR sizes of its objects: what clients download.
    pub logical_bytes: u64,
    /// The compressed size of the distinct chunks its objects' NARs use.
    /// Chunks are global, so a chunk shared with other caches counts in
    /// each of them.
    pub stored_bytes: u64,
}

impl CacheStats {
    /// Logical bytes per stored byte (compression and dedup together);
    /// `None` while nothing is stored.
    pub fn dedup_ratio(&self) -> Option<f64> {
        // Precision loss past 2^53 bytes is irrelevant for a ratio.
        (self.stored_bytes > 0).then(|| self.logical_bytes as f64 / self.stored_bytes as f64)
    }
}

impl Database {
    pub async fn per_cache_stats(&self, cache_id: CacheId) -> Result<CacheStats> {
        // CAST: PostgreSQL's SUM of BIGINT is NUMERIC, which `Any` cannot
        // read; COALESCE: SUM over no rows is NULL.
        let logical = sqlx::query(
            "SELECT COUNT(*) AS object_count, \
             CAST(COALESCE(SUM(n.nar_size), 0) AS BIGINT) AS logical_bytes \
             FROM objects o JOIN nars n ON n.id = o.nar_id WHERE o.cache_id = $1",
        )
        .bind(cache_id.0)
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("summing a cache's objects"))?;
        let stored = sqlx::query(
            "SELECT CAST(COALESCE(SUM(c.object_length), 0) AS BIGINT) AS stored_bytes \
             FROM chunks c WHERE c.id IN ( \
                 SELECT nc.chunk_id FROM nar_chunks nc \
                 JOIN objects o ON o.nar_id = nc.nar_id WHERE o.cache_id = $1)",
        )
        .bind(cache_id.0)
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("summing a cache's chunks"))?;
        Ok(CacheStats {
            object_count: u64_col(&logical, "object_count")?,
            logical_bytes: u64_col(&logical, "logical_bytes")?,
            stored_bytes: u64_col(&stored, "stored_bytes")?,
        })
    }
}
