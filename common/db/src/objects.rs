//! The `objects` table: a cache's store paths, each pointing at a global NAR.
//!
//! Path metadata never leaves its cache: every query here is keyed by a
//! cache id, and a NAR is reachable only through an object of the cache
//! asking.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::audit::record_push_on;
use super::error::{constraint_error, query_error, DbError, Result};
use super::nars::{nar_from_row, JOINED_NAR, JOINED_NAR_SELECT};
use super::quota::{
    adjust_usage_on, lock_cache_on, lock_existing_cache_on, make_room_on, Charge, LockedCache,
};
use super::row::{
    i64_col, json_col, opt_string_col, store_path_hash_col, string_col, time_col, to_i64, to_json,
    u64_col,
};
use super::types::{Actor, CacheId, NarId, ObjectId, Timestamp, IN_FLIGHT_PHASES_SQL};
use super::{placeholders, Database, Nar, MAX_IN_LIST};
use larder_nix::StorePathHash;

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
    /// The token that pushed it.
    pub created_by: Actor,
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
    /// The token that pushed it last.
    pub created_by: Actor,
}

/// Whose pushes a purge finds: a token's subject, or one token by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushedBy {
    Subject(String),
    Token(String),
}

/// An object and the NAR it points at: everything a narinfo needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectWithNar {
    pub object: Object,
    pub nar: Nar,
}

const OBJECT_COLUMNS: &str = "id, cache_id, store_path_hash, store_path, nar_id, \
    path_references, deriver, system, sigs, ca, created_at, last_accessed_at, created_by, \
    created_by_jti";

/// [`OBJECT_COLUMNS`] qualified with the alias `o`, for joins.
const OBJECT_COLUMNS_O: &str = "o.id, o.cache_id, o.store_path_hash, o.store_path, o.nar_id, \
    o.path_references, o.deriver, o.system, o.sigs, o.ca, o.created_at, o.last_accessed_at, \
    o.created_by, o.created_by_jti";

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
        created_by: Actor {
            subject: opt_string_col(row, "created_by")?,
            jti: opt_string_col(row, "created_by_jti")?,
        },
    })
}

/// Creates or replaces an object of a locked cache whose NAR has
/// `nar_size` bytes, and counts the change in the cache's path bytes (the
/// new NAR's size, less the replaced one's). Growth is admitted as
/// `charge` says: checked against the quota (possibly evicting other
/// paths, never this one), or already admitted (an upload's bytes, counted
/// since it was recorded). `pending_delta` changes the cache's pending
/// bytes in the same statement (an upload's, leaving the pipeline). What
/// [`Database::upsert_object`], [`Database::link_valid_nar`] and upload
/// finalisation share.
pub(crate) async fn upsert_counted_object_on(
    connection: &mut sqlx::AnyConnection,
    cache: &mut LockedCache,
    charge: Charge,
    new: &NewObject,
    nar_size: u64,
    pending_delta: i64,
    at: Timestamp,
) -> Result<Object> {
    let replaced = object_nar_size_on(connection, cache.id, &new.store_path_hash)
        .await?
        .unwrap_or(0);
    let growth = to_i64("NAR size", nar_size)? - to_i64("NAR size", replaced)?;
    if let (Charge::Checked(defaults), Ok(growth)) = (charge, u64::try_from(growth)) {
        make_room_on(
            connection,
            cache,
            defaults,
            growth,
            Some(&new.store_path_hash),
        )
        .await?;
    }
    let object = upsert_object_on(connection, cache.id, new, at).await?;
    adjust_usage_on(connection, cache, growth, pending_delta).await?;
    let detail = serde_json::json!({
        "store_path": new.metadata.store_path,
        "nar_size": nar_size,
    });
    record_push_on(connection, cache.id, &new.created_by, &detail, at).await?;
    Ok(object)
}

/// The NarSize of the object of this path in the cache, if there is one.
async fn object_nar_size_on(
    connection: &mut sqlx::AnyConnection,
    cache_id: CacheId,
    store_path_hash: &StorePathHash,
) -> Result<Option<u64>> {
    let row = sqlx::query(
        "SELECT n.nar_size FROM objects o JOIN nars n ON n.id = o.nar_id \
         WHERE o.cache_id = $1 AND o.store_path_hash = $2",
    )
    .bind(cache_id.0)
    .bind(store_path_hash.as_str())
    .fetch_optional(&mut *connection)
    .await
    .map_err(query_error("reading the size of an object"))?;
    row.map(|row| u64_col(&row, "nar_size")).transpose()
}

/// Deletes objects of a locked cache chosen by `condition` (with `params`
/// as `$2` on) and subtracts their NarSizes from its path bytes; returns
/// the store path hashes deleted.
pub(crate) async fn delete_counted_objects_on(
    connection: &mut sqlx::AnyConnection,
    cache: &mut LockedCache,
    condition: &str,
    params: Vec<Param>,
) -> Result<Vec<StorePathHash>> {
    let sql = format!(
        "DELETE FROM objects WHERE cache_id = $1 AND {condition} RETURNING store_path_hash, \
         (SELECT n.nar_size FROM nars n WHERE n.id = objects.nar_id) AS nar_size"
    );
    let rows = bind_params(sqlx::query(&sql).bind(cache.id.0), params)
        .fetch_all(&mut *connection)
        .await
        .map_err(query_error("deleting objects"))?;
    let mut freed: u64 = 0;
    let mut deleted = Vec::with_capacity(rows.len());
    for row in &rows {
        deleted.push(store_path_hash_col(row, "store_path_hash")?);
        freed = freed.saturating_add(u64_col(row, "nar_size")?);
    }
    adjust_usage_on(connection, cache, -to_i64("freed bytes", freed)?, 0).await?;
    Ok(deleted)
}

/// A query over the `Any` driver.
pub(crate) type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// A value for a numbered parameter of a condition passed as text.
#[derive(Debug, Clone)]
pub(crate) enum Param {
    Int(i64),
    Text(String),
}

/// Binds `params` in order after the parameters bound already.
pub(crate) fn bind_params(mut query: AnyQuery<'_>, params: Vec<Param>) -> AnyQuery<'_> {
    for param in params {
        query = match param {
            Param::Int(value) => query.bind(value),
            Param::Text(value) => query.bind(value),
        };
    }
    query
}

/// The upsert itself, in a transaction that counts it.
async fn upsert_object_on(
    connection: &mut sqlx::AnyConnection,
    cache_id: CacheId,
    new: &NewObject,
    at: Timestamp,
) -> Result<Object> {
    // A re-push replaces the metadata and counts as an access, but keeps
    // the original creation time.
    let sql = format!(
        "INSERT INTO objects (cache_id, store_path_hash, store_path, nar_id, path_references, \
         deriver, system, sigs, ca, created_at, last_accessed_at, created_by, created_by_jti) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12) \
         ON CONFLICT (cache_id, store_path_hash) DO UPDATE SET \
         store_path = excluded.store_path, nar_id = excluded.nar_id, \
         path_references = excluded.path_references, deriver = excluded.deriver, \
         system = excluded.system, sigs = excluded.sigs, ca = excluded.ca, \
         last_accessed_at = excluded.last_accessed_at, created_by = excluded.created_by, \
         created_by_jti = excluded.created_by_jti \
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
        .bind(new.created_by.subject.as_deref())
        .bind(new.created_by.jti.as_deref())
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
    /// (for a new object) and its last access. Counted against the cache's
    /// quota like any push ([`DbError::QuotaExceeded`] when it does not
    /// fit); [`DbError::NotFound`] when the cache or the NAR is missing.
    pub async fn upsert_object(
        &self,
        cache_id: CacheId,
        new: &NewObject,
        at: Timestamp,
    ) -> Result<Object> {
        let mut tx = self.begin_write().await?;
        let mut cache = lock_existing_cache_on(&mut tx, self.backend, cache_id).await?;
        let nar_size = sqlx::query("SELECT nar_size FROM nars WHERE id = $1")
            .bind(new.nar_id.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("reading a NAR's size"))?
            .map(|row| u64_col(&row, "nar_size"))
            .transpose()?
            .ok_or_else(|| DbError::NotFound {
                what: format!("NAR {}", new.nar_id),
            })?;
        let object = upsert_counted_object_on(
            &mut tx,
            &mut cache,
            Charge::Checked(self.quota),
            new,
            nar_size,
            0,
            at,
        )
        .await?;
        tx.commit("committing an object").await?;
        Ok(object)
    }

    /// The paths of a cache whose last push was `by`'s, and which entered
    /// the cache at or after `since` (its first push: a push again keeps
    /// the creation time), as hashes and store paths, oldest first.
    pub async fn objects_pushed_by(
        &self,
        cache_id: CacheId,
        by: &PushedBy,
        since: Option<Timestamp>,
    ) -> Result<Vec<(StorePathHash, String)>> {
        let (column, value) = match by {
            PushedBy::Subject(subject) => ("created_by", subject),
            PushedBy::Token(jti) => ("created_by_jti", jti),
        };
        let sql = format!(
            "SELECT store_path_hash, store_path FROM objects \
             WHERE cache_id = $1 AND {column} = $2 AND created_at >= $3 \
             ORDER BY created_at, id"
        );
        let rows = sqlx::query(&sql)
            .bind(cache_id.0)
            .bind(value.as_str())
            .bind(since.map_or(i64::MIN, Timestamp::unix_millis))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("finding the paths a token pushed"))?;
        rows.iter()
            .map(|row| {
                Ok((
                    store_path_hash_col(row, "store_path_hash")?,
                    string_col(row, "store_path")?,
                ))
            })
            .collect()
    }

    /// Deletes a path from a cache; whether it was there. Its NAR stays
    /// until GC finds no object pointing at it.
    pub async fn delete_object(
        &self,
        cache_id: CacheId,
        store_path_hash: &StorePathHash,
    ) -> Result<bool> {
        let deleted = self
            .delete_objects_where(
                cache_id,
                "store_path_hash = $2",
                vec![Param::Text(store_path_hash.as_str().to_owned())],
            )
            .await?;
        Ok(!deleted.is_empty())
    }

    /// Deletes objects of a cache chosen by `condition` (with `params` as
    /// `$2` on) in one counted transaction; see
    /// [`delete_counted_objects_on`]. Nothing when the cache is gone.
    pub(crate) async fn delete_objects_where(
        &self,
        cache_id: CacheId,
        condition: &str,
        params: Vec<Param>,
    ) -> Result<Vec<StorePathHash>> {
        let mut tx = self.begin_write().await?;
        let Some(mut cache) = lock_cache_on(&mut tx, self.backend, cache_id).await? else {
            return Ok(Vec::new());
        };
        let deleted = delete_counted_objects_on(&mut tx, &mut cache, condition, params).await?;
        tx.commit("committing deleted objects").await?;
        Ok(deleted)
    }

    /// The hashes among `hashes` that a client should push to this cache:
    /// neither present as objects nor in flight as uploads that are still in
    /// the pipeline. In input order, without duplicates.
    ///
    /// An upload that is `done` does not count: its object exists, unless
    /// the path was deleted since, and then it is missing again. A `failed`
    /// upload does not count either, so the client retries. Nor does an
    /// object whose NAR is not `valid`: its path was withdrawn (a chunk of
    /// it was found damaged, see `damage`) and a push heals it.
    pub async fn missing_store_path_hashes(
        &self,
        cache_id: CacheId,
        hashes: &[StorePathHash],
    ) -> Result<Vec<StorePathHash>> {
        let mut present: HashSet<String> = HashSet::new();
        for batch in hashes.chunks(MAX_IN_LIST) {
            let list = placeholders(2, batch.len());
            let sql = format!(
                "SELECT o.store_path_hash FROM objects o JOIN nars n ON n.id = o.nar_id \
                 WHERE o.cache_id = $1 AND o.store_path_hash IN ({list}) AND n.state = 'valid' \
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
