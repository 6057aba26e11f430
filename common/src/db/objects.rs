//! The `objects` table: a cache's store paths, each pointing at a global NAR.
//!
//! Path metadata never leaves its cache: every query here is keyed by a
//! cache id, and a NAR is reachable only through an object of the cache
//! asking.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::error::{constraint_error, query_error, Result};
use super::nars::{nar_from_row, JOINED_NAR, JOINED_NAR_SELECT};
use super::row::{
    i64_col, json_col, opt_string_col, store_path_hash_col, string_col, time_col, to_json,
};
use super::types::{CacheId, NarId, ObjectId, Timestamp};
use super::uploads::IN_FLIGHT_PHASES_SQL;
use super::{affected, placeholders, Database, Nar, MAX_IN_LIST};
use crate::nix::StorePathHash;

/// What a pusher says about a store path: the narinfo fields that belong
/// to the path rather than to its NAR. Stored in `objects` and, until the
/// pipeline finalises an upload, as JSON in `uploads.object_metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMetadata {
    /// The full path, in the store directory it was pushed from.
    pub store_path: String,
    /// Base names (`<hash>-<name>`) of the paths it references.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub system: Option<String>,
    /// The pusher's signatures; the server adds its own when serving.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

/// An object to create or replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewObject {
    pub store_path_hash: StorePathHash,
    pub nar_id: NarId,
    pub metadata: ObjectMetadata,
    /// The `sub` of the token that pushed it.
    pub created_by: Option<String>,
}

/// An object row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub id: ObjectId,
    pub cache_id: CacheId,
    pub store_path_hash: StorePathHash,
    pub nar_id: NarId,
    pub metadata: ObjectMetadata,
    pub created_at: Timestamp,
    pub last_accessed_at: Timestamp,
    pub created_by: Option<String>,
}

/// An object and the NAR it points at: everything a narinfo needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectWithNar {
    pub object: Object,
    pub nar: Nar,
}

const OBJECT_COLUMNS: &str = "id, cache_id, store_path_hash, store_path, nar_id, \
    path_references, deriver, system, sigs, ca, created_at, last_accessed_at, created_by";

/// [`OBJECT_COLUMNS`] qualified with the alias `o`, for joins.
const OBJECT_COLUMNS_O: &str = "o.id, o.cache_id, o.store_path_hash, o.store_path, o.nar_id, \
    o.path_references, o.deriver, o.system, o.sigs, o.ca, o.created_at, o.last_accessed_at, \
    o.created_by";

fn object_from_row(row: &AnyRow) -> Result<Object> {
    Ok(Object {
        id: ObjectId(i64_col(row, "id")?),
        cache_id: CacheId(i64_col(row, "cache_id")?),
        store_path_hash: store_path_hash_col(row, "store_path_hash")?,
        nar_id: NarId(i64_col(row, "nar_id")?),
        metadata: ObjectMetadata {
            store_path: string_col(row, "store_path")?,
            references: json_col(row, "path_references")?,
            deriver: opt_string_col(row, "deriver")?,
            system: opt_string_col(row, "system")?,
            sigs: json_col(row, "sigs")?,
            ca: opt_string_col(row, "ca")?,
        },
        created_at: time_col(row, "created_at")?,
        last_accessed_at: time_col(row, "last_accessed_at")?,
        created_by: opt_string_col(row, "created_by")?,
    })
}

/// The upsert behind [`Database::upsert_object`], also run inside the
/// finalising transaction of an upload.
pub(crate) async fn upsert_object_on(
    connection: &mut sqlx::AnyConnection,
    cache_id: CacheId,
    new: &NewObject,
    at: Timestamp,
) -> Result<Object> {
    // A re-push replaces the metadata and counts as an access, but keeps
    // the original creation time.
    let sql = format!(
        "INSERT INTO objects (cache_id, store_path_hash, store_path, nar_id, path_references, \
         deriver, system, sigs, ca, created_at, last_accessed_at, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11) \
         ON CONFLICT (cache_id, store_path_hash) DO UPDATE SET \
         store_path = excluded.store_path, nar_id = excluded.nar_id, \
         path_references = excluded.path_references, deriver = excluded.deriver, \
         system = excluded.system, sigs = excluded.sigs, ca = excluded.ca, \
         last_accessed_at = excluded.last_accessed_at, created_by = excluded.created_by \
         RETURNING {OBJECT_COLUMNS}"
    );
    let metadata = &new.metadata;
    let row = sqlx::query(&sql)
        .bind(cache_id.0)
        .bind(new.store_path_hash.as_str())
        .bind(metadata.store_path.as_str())
        .bind(new.nar_id.0)
        .bind(to_json("references", &metadata.references)?)
        .bind(metadata.deriver.as_deref())
        .bind(metadata.system.as_deref())
        .bind(to_json("signatures", &metadata.sigs)?)
        .bind(metadata.ca.as_deref())
        .bind(at.unix_millis())
        .bind(new.created_by.as_deref())
        .fetch_one(&mut *connection)
        .await
        .map_err(constraint_error(
            "storing an object",
            || format!("object {}", new.store_path_hash),
            || format!("cache {cache_id} or NAR {}", new.nar_id),
        ))?;
    object_from_row(&row)
}

impl Database {
    /// The object for `store_path_hash` in a cache, with its NAR, but only
    /// when that NAR is `valid`: a narinfo must never be served for a NAR
    /// whose chunks are not all stored.
    pub async fn find_object(
        &self,
        cache_id: CacheId,
        store_path_hash: &StorePathHash,
    ) -> Result<Option<ObjectWithNar>> {
        let sql = format!(
            "SELECT {OBJECT_COLUMNS_O}, {JOINED_NAR_SELECT} \
             FROM objects o JOIN nars n ON n.id = o.nar_id \
             WHERE o.cache_id = $1 AND o.store_path_hash = $2 AND n.state = 'valid'"
        );
        let row = sqlx::query(&sql)
            .bind(cache_id.0)
            .bind(store_path_hash.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up an object"))?;
        row.map(|row| {
            Ok(ObjectWithNar {
                object: object_from_row(&row)?,
                nar: nar_from_row(&row, &JOINED_NAR)?,
            })
        })
        .transpose()
    }

    /// Creates the object, or replaces the metadata and NAR of the existing
    /// object of the same path in that cache. `at` is both its creation
    /// (for a new object) and its last access.
    pub async fn upsert_object(
        &self,
        cache_id: CacheId,
        new: &NewObject,
        at: Timestamp,
    ) -> Result<Object> {
        let mut connection = self.acquire().await?;
        upsert_object_on(&mut connection, cache_id, new, at).await
    }

    /// Deletes a path from a cache; whether it was there. Its NAR stays
    /// until GC finds no object pointing at it.
    pub async fn delete_object(
        &self,
        cache_id: CacheId,
        store_path_hash: &StorePathHash,
    ) -> Result<bool> {
        let result =
            sqlx::query("DELETE FROM objects WHERE cache_id = $1 AND store_path_hash = $2")
                .bind(cache_id.0)
                .bind(store_path_hash.as_str())
                .execute(&self.pool)
                .await
                .map_err(query_error("deleting an object"))?;
        Ok(affected(&result))
    }

    /// The hashes among `hashes` that a client should push to this cache:
    /// neither present as objects nor in flight as uploads that are still in
    /// the pipeline. In input order, without duplicates.
    ///
    /// An upload that is `done` does not count: its object exists, unless
    /// the path was deleted since, and then it is missing again. A `failed`
    /// upload does not count either, so the client retries.
    pub async fn missing_store_path_hashes(
        &self,
        cache_id: CacheId,
        hashes: &[StorePathHash],
    ) -> Result<Vec<StorePathHash>> {
        let mut present: HashSet<String> = HashSet::new();
        for batch in hashes.chunks(MAX_IN_LIST) {
            let list = placeholders(2, batch.len());
            let sql = format!(
                "SELECT store_path_hash FROM objects \
                 WHERE cache_id = $1 AND store_path_hash IN ({list}) \
                 UNION \
                 SELECT store_path_hash FROM uploads \
                 WHERE cache_id = $1 AND phase IN {IN_FLIGHT_PHASES_SQL} \
                 AND store_path_hash IN ({list})"
            );
            let mut query = sqlx::query(&sql).bind(cache_id.0);
            for hash in batch {
                query = query.bind(hash.as_str());
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("finding missing paths"))?;
            for row in &rows {
                present.insert(string_col(row, "store_path_hash")?);
            }
        }
        let mut seen = HashSet::new();
        Ok(hashes
            .iter()
            .filter(|hash| !present.contains(hash.as_str()) && seen.insert(**hash))
            .copied()
            .collect())
    }

    /// Records that these paths' narinfos were fetched at `at`, per cache:
    /// the batched flush of narinfo fetches; never moves an access time
    /// backwards. Returns how many rows changed.
    pub async fn touch_objects_by_path(
        &self,
        accesses: &BTreeMap<CacheId, Vec<StorePathHash>>,
        at: Timestamp,
    ) -> Result<u64> {
        let accesses = accesses.iter().map(|(cache_id, hashes)| {
            let hashes = hashes.iter().map(|hash| hash.as_str().to_owned());
            (*cache_id, hashes.collect())
        });
        self.touch_objects_where("store_path_hash", accesses.collect(), at)
            .await
    }

    /// Records that these NARs were fetched from these caches at `at`:
    /// every object of the cache pointing at the NAR counts as accessed.
    /// The batched flush of NAR fetches; never moves an access time
    /// backwards. Returns how many rows changed.
    pub async fn touch_objects_by_nar(
        &self,
        accesses: &BTreeMap<CacheId, Vec<NarId>>,
        at: Timestamp,
    ) -> Result<u64> {
        let accesses = accesses
            .iter()
            .map(|(cache_id, nar_ids)| (*cache_id, nar_ids.iter().map(|id| id.0).collect()));
        self.touch_objects_where("nar_id", accesses.collect(), at)
            .await
    }

    /// Sets `last_accessed_at` to `at`, where it is earlier, on each cache's
    /// objects whose `column` holds one of its values, a batch at a time.
    async fn touch_objects_where<Value>(
        &self,
        column: &str,
        accesses: Vec<(CacheId, Vec<Value>)>,
        at: Timestamp,
    ) -> Result<u64>
    where
        Value: for<'q> sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any> + Clone + Send,
    {
        let mut touched = 0;
        for (cache_id, values) in &accesses {
            for batch in values.chunks(MAX_IN_LIST) {
                let sql = format!(
                    "UPDATE objects SET last_accessed_at = $1 \
                     WHERE last_accessed_at < $1 AND cache_id = $2 AND {column} IN ({})",
                    placeholders(3, batch.len())
                );
                let mut query = sqlx::query(&sql).bind(at.unix_millis()).bind(cache_id.0);
                for value in batch {
                    query = query.bind(value.clone());
                }
                let result = query
                    .execute(&self.pool)
                    .await
                    .map_err(query_error("updating access times"))?;
                touched += result.rows_affected();
            }
        }
        Ok(touched)
    }

    /// Every object of a cache, for tests and small listings; ordered by id.
    pub async fn objects_of_cache(&self, cache_id: CacheId) -> Result<Vec<Object>> {
        let sql = format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE cache_id = $1 ORDER BY id");
        let rows = sqlx::query(&sql)
            .bind(cache_id.0)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing objects"))?;
        rows.iter().map(object_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_columns_match_the_plain_list() {
        let plain: Vec<&str> = OBJECT_COLUMNS.split(", ").collect();
        let qualified: Vec<&str> = OBJECT_COLUMNS_O
            .split(", ")
            .map(|column| {
                column
                    .strip_prefix("o.")
                    .expect("every column is qualified")
            })
            .collect();
        assert_eq!(plain, qualified);
    }
}
