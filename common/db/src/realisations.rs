//! Realisations of content-addressed derivations, per cache (migration
//! 0010): stored as their pusher sent them, served while the cache holds
//! the output path, and deleted by GC once it does not.

use std::collections::BTreeMap;

use super::error::{query_error, Result};
use super::row::{json_col, string_col, to_json};
use super::types::{CacheId, Timestamp};
use super::Database;
use larder_nix::realisation::{Realisation, RealisationKey};
use larder_nix::StorePath;

impl Database {
    /// Records `realisation` in a cache, replacing one of the same id.
    pub async fn put_realisation(
        &self,
        cache_id: CacheId,
        realisation: &Realisation,
        at: Timestamp,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO realisations \
             (cache_id, drv_output, store_path_hash, out_path, dependent, sigs, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (cache_id, drv_output) DO UPDATE \
             SET store_path_hash = excluded.store_path_hash, out_path = excluded.out_path, \
             dependent = excluded.dependent, sigs = excluded.sigs, created_at = excluded.created_at",
        )
        .bind(cache_id.0)
        .bind(realisation.key.stored())
        .bind(realisation.out_path.hash().as_str())
        .bind(realisation.out_path.to_string())
        .bind(to_json("dependent realisations", &realisation.dependent)?)
        .bind(to_json("signatures", &realisation.signatures)?)
        .bind(at.unix_millis())
        .execute(&self.pool)
        .await
        .map_err(query_error("recording a realisation"))?;
        Ok(())
    }

    /// A cache's realisation of `key`, if it has one and holds its output
    /// path.
    pub async fn realisation(
        &self,
        cache_id: CacheId,
        key: &RealisationKey,
    ) -> Result<Option<Realisation>> {
        let row = sqlx::query(
            "SELECT r.out_path, r.dependent, r.sigs FROM realisations r \
             JOIN objects o ON o.cache_id = r.cache_id AND o.store_path_hash = r.store_path_hash \
             WHERE r.cache_id = $1 AND r.drv_output = $2",
        )
        .bind(cache_id.0)
        .bind(key.stored())
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("looking up a realisation"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let out_path: StorePath = string_col(&row, "out_path")?.parse().map_err(
            |error: larder_nix::StorePathError| {
                super::row::corrupt("realisations.out_path", error.to_string())
            },
        )?;
        let dependent: BTreeMap<String, String> = json_col(&row, "dependent")?;
        Ok(Some(Realisation {
            key: key.clone(),
            out_path,
            dependent,
            signatures: json_col(&row, "sigs")?,
        }))
    }

    /// Deletes the realisations recorded before `recorded_before` whose
    /// output path their cache no longer holds; returns how many went.
    pub async fn delete_stale_realisations(&self, recorded_before: Timestamp) -> Result<u64> {
        let deleted = sqlx::query(
            "DELETE FROM realisations WHERE created_at < $1 AND NOT EXISTS (\
             SELECT 1 FROM objects o WHERE o.cache_id = realisations.cache_id \
             AND o.store_path_hash = realisations.store_path_hash)",
        )
        .bind(recorded_before.unix_millis())
        .execute(&self.pool)
        .await
        .map_err(query_error("deleting stale realisations"))?
        .rows_affected();
        Ok(deleted)
    }
}
