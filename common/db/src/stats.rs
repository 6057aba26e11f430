//! Statistics: how much a cache holds and what storing it costs after
//! global deduplication, per cache for its tenants and for the whole
//! server for its operator.
//!
//! A cache's own figures ([`Database::per_cache_stats`]) depend on its
//! paths alone: its stored bytes count each distinct chunk its NARs use
//! once, whether or not other caches use it too, so that they reveal
//! nothing of other tenants. How chunks are shared between caches is only
//! in [`Database::server_stats`].

use std::collections::HashMap;

use sqlx::any::AnyRow;

use super::error::{query_error, Result};
use super::row::{f64_col, i64_col, opt_time_col, parsed_col, u64_col};
use super::types::{CacheId, Timestamp};
use super::Database;
use larder_api::cache_name::CacheName;

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
    /// When its newest object was created.
    pub last_push: Option<Timestamp>,
    /// When an object of it was last fetched, as flushed so far.
    pub last_access: Option<Timestamp>,
}

impl CacheStats {
    /// Logical bytes per stored byte (compression and dedup together);
    /// `None` while nothing is stored.
    pub fn dedup_ratio(&self) -> Option<f64> {
        dedup_ratio(self.logical_bytes, self.stored_bytes)
    }
}

/// Logical bytes per stored byte; `None` while nothing is stored.
pub fn dedup_ratio(logical_bytes: u64, stored_bytes: u64) -> Option<f64> {
    // Precision loss past 2^53 bytes is irrelevant for a ratio.
    (stored_bytes > 0).then(|| logical_bytes as f64 / stored_bytes as f64)
}

/// One cache in [`ServerStats`].
#[derive(Debug, Clone, PartialEq)]
pub struct SharedCacheStats {
    pub name: CacheName,
    pub stats: CacheStats,
    /// Of `stats.stored_bytes`, the chunks no other cache's objects use.
    pub unique_bytes: u64,
    /// Each chunk it uses, divided evenly among the caches using it.
    pub attributed_bytes: f64,
}

/// The whole server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerStats {
    /// Every valid chunk's compressed size, each once.
    pub stored_bytes: u64,
    /// The valid chunks some object's NAR uses.
    pub referenced_bytes: u64,
    /// Every cache, by name.
    pub caches: Vec<SharedCacheStats>,
}

/// Each cache's objects: count, NAR bytes, newest and last fetched.
/// CAST: PostgreSQL's SUM of BIGINT is NUMERIC, which `Any` cannot read;
/// COALESCE: SUM over no rows is NULL.
const OBJECT_FIGURES: &str = "COUNT(o.id) AS object_count, \
    CAST(COALESCE(SUM(n.nar_size), 0) AS BIGINT) AS logical_bytes, \
    MAX(o.created_at) AS last_push, MAX(o.last_accessed_at) AS last_access";

fn object_figures(row: &AnyRow, stored_bytes: u64) -> Result<CacheStats> {
    Ok(CacheStats {
        object_count: u64_col(row, "object_count")?,
        logical_bytes: u64_col(row, "logical_bytes")?,
        stored_bytes,
        last_push: opt_time_col(row, "last_push")?,
        last_access: opt_time_col(row, "last_access")?,
    })
}

impl Database {
    pub async fn per_cache_stats(&self, cache_id: CacheId) -> Result<CacheStats> {
        let objects = sqlx::query(&format!(
            "SELECT {OBJECT_FIGURES} FROM objects o JOIN nars n ON n.id = o.nar_id \
             WHERE o.cache_id = $1"
        ))
        .bind(cache_id.0)
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("summing a cache's objects"))?;
        let stored = sqlx::query(
            "SELECT CAST(COALESCE(SUM(c.object_length), 0) AS BIGINT) AS stored_bytes \
             FROM chunks c WHERE c.state = 'valid' AND c.id IN ( \
                 SELECT nc.chunk_id FROM nar_chunks nc \
                 JOIN objects o ON o.nar_id = nc.nar_id WHERE o.cache_id = $1)",
        )
        .bind(cache_id.0)
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("summing a cache's chunks"))?;
        object_figures(&objects, u64_col(&stored, "stored_bytes")?)
    }

    /// Every cache's figures and how they share storage, and the server's
    /// totals. Reads every object and chunk-list row: an operator's query.
    pub async fn server_stats(&self) -> Result<ServerStats> {
        let objects = sqlx::query(&format!(
            "SELECT c.id, c.name, {OBJECT_FIGURES} FROM caches c \
             LEFT JOIN objects o ON o.cache_id = c.id LEFT JOIN nars n ON n.id = o.nar_id \
             GROUP BY c.id, c.name ORDER BY c.name"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("summing every cache's objects"))?;
        // The distinct chunks of each cache, and how many caches use each.
        let sharing = sqlx::query(
            "WITH cache_chunks AS ( \
                 SELECT DISTINCT o.cache_id, nc.chunk_id FROM objects o \
                 JOIN nar_chunks nc ON nc.nar_id = o.nar_id), \
             users AS (SELECT chunk_id, COUNT(*) AS caches FROM cache_chunks GROUP BY chunk_id) \
             SELECT cc.cache_id, \
                 CAST(COALESCE(SUM(c.object_length), 0) AS BIGINT) AS stored_bytes, \
                 CAST(COALESCE(SUM(CASE WHEN u.caches = 1 THEN c.object_length ELSE 0 END), 0) \
                     AS BIGINT) AS unique_bytes, \
                 COALESCE(SUM(CAST(c.object_length AS DOUBLE PRECISION) / u.caches), 0.0) \
                     AS attributed_bytes \
             FROM cache_chunks cc JOIN users u ON u.chunk_id = cc.chunk_id \
             JOIN chunks c ON c.id = cc.chunk_id AND c.state = 'valid' \
             GROUP BY cc.cache_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("summing how caches share chunks"))?;
        let totals = sqlx::query(
            "SELECT CAST(COALESCE(SUM(c.object_length), 0) AS BIGINT) AS stored_bytes, \
                 CAST(COALESCE(SUM(CASE WHEN c.id IN ( \
                     SELECT nc.chunk_id FROM nar_chunks nc JOIN objects o ON o.nar_id = nc.nar_id) \
                 THEN c.object_length ELSE 0 END), 0) AS BIGINT) AS referenced_bytes \
             FROM chunks c WHERE c.state = 'valid'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("summing the stored chunks"))?;

        let mut shares = HashMap::with_capacity(sharing.len());
        for row in &sharing {
            shares.insert(
                i64_col(row, "cache_id")?,
                (
                    u64_col(row, "stored_bytes")?,
                    u64_col(row, "unique_bytes")?,
                    f64_col(row, "attributed_bytes")?,
                ),
            );
        }
        let mut caches = Vec::with_capacity(objects.len());
        for row in &objects {
            let (stored_bytes, unique_bytes, attributed_bytes) = shares
                .get(&i64_col(row, "id")?)
                .copied()
                .unwrap_or((0, 0, 0.0));
            caches.push(SharedCacheStats {
                name: parsed_col(row, "name")?,
                stats: object_figures(row, stored_bytes)?,
                unique_bytes,
                attributed_bytes,
            });
        }
        Ok(ServerStats {
            stored_bytes: u64_col(&totals, "stored_bytes")?,
            referenced_bytes: u64_col(&totals, "referenced_bytes")?,
            caches,
        })
    }
}
