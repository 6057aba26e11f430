//! Per-cache storage quotas: what a cache's usage is, how every change to
//! it is counted, and how a push is admitted (or room is made for it by
//! evicting least recently accessed paths).
//!
//! # What counts
//!
//! A cache's usage is in **logical bytes**, as the tenant sees them,
//! whether or not their NARs are deduplicated with other caches:
//!
//! - `usage_path_bytes`: the NarSize of every object (path) of the cache;
//! - `usage_pending_bytes`: the NarSize of its uploads still in the
//!   pipeline (`spooled`, `chunking`, `compressing`) and of its staged
//!   files (NARs received with Nix's `PUT nar/…` that no narinfo claimed).
//!
//! Both are columns of the cache's row, changed in the same transaction as
//! the rows they count: creating an upload, a staged file or an object
//! adds; failing, finishing or deleting an upload, claiming or reaping a
//! staged file, and deleting or evicting objects subtracts (never below
//! zero); destroying the cache takes the counters with its row. Reading
//! the usage is one primary-key lookup, whatever the cache holds.
//! [`Database::recompute_usage`] (run by every GC pass) sums the rows
//! again and corrects any drift, so a counting bug or a hand edit heals.
//!
//! # Why concurrent pushes cannot overshoot
//!
//! Every transaction that changes a cache's usage first locks the cache's
//! row (PostgreSQL: `SELECT … FOR UPDATE`; SQLite: `BEGIN IMMEDIATE`
//! already holds the database's one write lock), and only then reads the
//! usage, checks the quota, writes its rows and the new usage. So the
//! check and the change are one atomic step per cache: two pushes that
//! each fit alone but not together are serialised, and the second sees the
//! first's bytes. Hence the invariant: **a push never takes a cache's
//! usage above its quota**; usage exceeds the quota only when an operator
//! lowers the quota below what the cache holds (further pushes are then
//! refused, or evict, until it is back under).
//!
//! What is not counted is a body still being received: those bytes are in
//! staging but in no row yet. The push endpoints bound each such body by
//! the room the cache had when it started (and by the server's free space),
//! and its bytes are counted, with the check above, the moment the
//! verified NAR is recorded (upload row or staged file). So storage beyond
//! the quota is at most the bodies of the cache's pushes in progress, each
//! at most the room left when it began, and it is freed when they end.
//!
//! Taking the cache row's lock first in every such transaction also fixes
//! one lock order (cache, then its objects, uploads and staged files), so
//! these transactions cannot deadlock one another. GC's NAR and chunk
//! locks come after it or without it.
//!
//! # Eviction
//!
//! Under [`QuotaPolicy::EvictLru`] a push that does not fit removes the
//! cache's least recently accessed objects (`last_accessed_at`, then id)
//! in the same transaction that records its verified NAR, exactly as many
//! as it needs and never the path being pushed; if even removing all of
//! them would not make room, nothing is removed and the push is refused.
//! In-flight uploads and staged files are never evicted: they are not
//! paths anyone fetched yet. Nor is a pinned closure (module `pins`): it
//! counts towards the quota, and a push that only fits by evicting it is
//! refused.

use sqlx::any::AnyRow;

use super::error::{query_error, DbError, Result};
use super::pinned_closure::pinned_closure_sql;
use super::row::{i64_col, opt_u64_col, parsed_col, string_col, to_i64, u64_col};
use super::types::{CacheId, IN_FLIGHT_PHASES_SQL};
use super::{placeholders, Backend, Database, MAX_IN_LIST};
use larder_api::v1::{CacheQuota, QuotaPolicy};
use larder_nix::StorePathHash;

/// Objects read per round trip while choosing what to evict.
const EVICTION_PAGE: i64 = 500;

/// The server-wide quota rules the store enforces for caches that set no
/// quota of their own (`[quota] default-cache-quota`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaDefaults {
    /// `None`: unlimited.
    pub default_quota: Option<u64>,
}

impl QuotaDefaults {
    /// The limit in bytes a cache's quota setting stands for; `None`:
    /// unlimited.
    pub fn resolve(&self, quota: CacheQuota) -> Option<u64> {
        match quota {
            CacheQuota::Global => self.default_quota,
            CacheQuota::Unlimited => None,
            CacheQuota::Bytes(bytes) => Some(bytes),
        }
    }
}

/// A cache's usage in logical bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// The NarSize of its objects.
    pub path_bytes: u64,
    /// The NarSize of its uploads in flight and its staged files.
    pub pending_bytes: u64,
}

impl CacheUsage {
    /// Everything that counts against the quota.
    pub fn used(&self) -> u64 {
        self.path_bytes.saturating_add(self.pending_bytes)
    }
}

/// Where a cache stands against its quota, for a push about to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaStatus {
    /// The quota that applies; `None`: unlimited.
    pub quota: Option<u64>,
    pub policy: QuotaPolicy,
    pub usage: CacheUsage,
    /// The NarSize of the path being pushed, if the cache holds it already
    /// (eviction never removes it).
    pub kept_bytes: u64,
}

impl QuotaStatus {
    /// How many bytes a push may add now; `None`: no limit. Under
    /// [`QuotaPolicy::EvictLru`] every path but the one being pushed may
    /// make way.
    pub fn room(&self) -> Option<u64> {
        let quota = self.quota?;
        let taken = match self.policy {
            QuotaPolicy::Refuse => self.usage.used(),
            QuotaPolicy::EvictLru => self.usage.pending_bytes.saturating_add(self.kept_bytes),
        };
        Some(quota.saturating_sub(taken))
    }
}

/// How bytes added to a cache's usage are admitted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Charge {
    /// Checked against the quota now, under these server-wide rules (and
    /// room made by eviction under [`QuotaPolicy::EvictLru`]).
    Checked(QuotaDefaults),
    /// Admitted earlier: an upload's bytes, counted since it was recorded.
    AlreadyAdmitted,
}

/// A cache whose counted usage [`Database::recompute_usage`] corrected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageCorrection {
    pub cache_id: CacheId,
    /// What the counters said.
    pub recorded: CacheUsage,
    /// What the rows add up to, now in the counters.
    pub actual: CacheUsage,
}

/// A cache row locked for a change of its usage, with what was read under
/// the lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LockedCache {
    pub(crate) id: CacheId,
    /// The database it was locked in, for queries written per dialect.
    backend: Backend,
    quota: CacheQuota,
    policy: QuotaPolicy,
    usage: CacheUsage,
}

/// The columns a cache's quota setting is stored in;
/// [`DbError::InvalidInput`] for a quota beyond `i64::MAX` bytes.
pub(crate) fn quota_columns(quota: CacheQuota) -> Result<(&'static str, Option<i64>)> {
    Ok(match quota {
        CacheQuota::Global => ("default", None),
        CacheQuota::Unlimited => ("unlimited", None),
        CacheQuota::Bytes(bytes) => ("bytes", Some(to_i64("storage quota", bytes)?)),
    })
}

/// A cache's quota setting from its `quota_kind` and `quota_bytes`.
pub(crate) fn quota_from_row(row: &AnyRow) -> Result<CacheQuota> {
    let kind = string_col(row, "quota_kind")?;
    match (kind.as_str(), opt_u64_col(row, "quota_bytes")?) {
        ("default", _) => Ok(CacheQuota::Global),
        ("unlimited", _) => Ok(CacheQuota::Unlimited),
        ("bytes", Some(bytes)) => Ok(CacheQuota::Bytes(bytes)),
        (other, bytes) => Err(DbError::Corrupt {
            column: "quota_kind",
            reason: format!("{other:?} with quota_bytes {bytes:?}"),
        }),
    }
}

fn usage_from_row(row: &AnyRow) -> Result<CacheUsage> {
    Ok(CacheUsage {
        path_bytes: u64_col(row, "usage_path_bytes")?,
        pending_bytes: u64_col(row, "usage_pending_bytes")?,
    })
}

/// Locks the cache's row for the rest of the transaction (see the module
/// documentation) and reads its quota and usage; `None` when the cache is
/// gone.
pub(crate) async fn lock_cache_on(
    connection: &mut sqlx::AnyConnection,
    backend: Backend,
    cache_id: CacheId,
) -> Result<Option<LockedCache>> {
    let lock = match backend {
        Backend::Postgres => " FOR UPDATE",
        // `BEGIN IMMEDIATE` already holds SQLite's one write lock.
        Backend::Sqlite => "",
    };
    let sql = format!(
        "SELECT quota_kind, quota_bytes, quota_policy, usage_path_bytes, usage_pending_bytes \
         FROM caches WHERE id = $1{lock}"
    );
    let row = sqlx::query(&sql)
        .bind(cache_id.0)
        .fetch_optional(&mut *connection)
        .await
        .map_err(query_error("locking a cache's usage"))?;
    row.map(|row| {
        Ok(LockedCache {
            id: cache_id,
            backend,
            quota: quota_from_row(&row)?,
            policy: parsed_col(&row, "quota_policy")?,
            usage: usage_from_row(&row)?,
        })
    })
    .transpose()
}

/// [`lock_cache_on`] for a cache that must exist.
pub(crate) async fn lock_existing_cache_on(
    connection: &mut sqlx::AnyConnection,
    backend: Backend,
    cache_id: CacheId,
) -> Result<LockedCache> {
    lock_cache_on(connection, backend, cache_id)
        .await?
        .ok_or_else(|| DbError::NotFound {
            what: format!("cache {cache_id}"),
        })
}

/// Adds the signed changes to a locked cache's usage, never below zero
/// (a drift that [`Database::recompute_usage`] heals).
pub(crate) async fn adjust_usage_on(
    connection: &mut sqlx::AnyConnection,
    cache: &mut LockedCache,
    path_delta: i64,
    pending_delta: i64,
) -> Result<()> {
    if path_delta == 0 && pending_delta == 0 {
        return Ok(());
    }
    sqlx::query(
        "UPDATE caches SET \
         usage_path_bytes = CASE WHEN usage_path_bytes + $2 < 0 THEN 0 \
                            ELSE usage_path_bytes + $2 END, \
         usage_pending_bytes = CASE WHEN usage_pending_bytes + $3 < 0 THEN 0 \
                               ELSE usage_pending_bytes + $3 END \
         WHERE id = $1",
    )
    .bind(cache.id.0)
    .bind(path_delta)
    .bind(pending_delta)
    .execute(&mut *connection)
    .await
    .map_err(query_error("counting a cache's usage"))?;
    let apply =
        |value: u64, delta: i64| u64::try_from(i128::from(value) + i128::from(delta)).unwrap_or(0);
    cache.usage.path_bytes = apply(cache.usage.path_bytes, path_delta);
    cache.usage.pending_bytes = apply(cache.usage.pending_bytes, pending_delta);
    Ok(())
}

/// Admits `bytes` more into a locked cache, or fails with
/// [`DbError::QuotaExceeded`] and changes nothing. Under
/// [`QuotaPolicy::EvictLru`] it first evicts the least recently accessed
/// objects, never `keep`, just enough for the bytes to fit; their bytes
/// leave the usage at once. The caller then writes its rows and adds the
/// bytes with [`adjust_usage_on`], in the same transaction.
pub(crate) async fn make_room_on(
    connection: &mut sqlx::AnyConnection,
    cache: &mut LockedCache,
    defaults: QuotaDefaults,
    bytes: u64,
    keep: Option<&StorePathHash>,
) -> Result<()> {
    let Some(quota) = defaults.resolve(cache.quota) else {
        return Ok(());
    };
    let used = cache.usage.used();
    if used.saturating_add(bytes) <= quota {
        return Ok(());
    }
    let exceeded = DbError::QuotaExceeded {
        quota,
        used,
        requested: bytes,
    };
    if cache.policy == QuotaPolicy::Refuse {
        return Err(exceeded);
    }
    let needed = used.saturating_add(bytes) - quota;
    let (victims, freed) = choose_victims(connection, cache, needed, keep).await?;
    if freed < needed {
        return Err(exceeded);
    }
    for batch in victims.chunks(MAX_IN_LIST) {
        let sql = format!(
            "DELETE FROM objects WHERE cache_id = $1 AND id IN ({})",
            placeholders(2, batch.len())
        );
        let mut query = sqlx::query(&sql).bind(cache.id.0);
        for id in batch {
            query = query.bind(*id);
        }
        query
            .execute(&mut *connection)
            .await
            .map_err(query_error("evicting paths"))?;
    }
    adjust_usage_on(connection, cache, -to_i64("evicted bytes", freed)?, 0).await?;
    // Evictions remove a tenant's data without a request of theirs naming
    // it: each is logged.
    tracing::info!(
        cache_id = cache.id.0,
        paths = victims.len(),
        freed_bytes = freed,
        requested_bytes = bytes,
        "evicted least recently accessed paths to make room within the quota"
    );
    Ok(())
}

/// The least recently accessed objects of the cache other than `keep` and
/// those its pins keep, in that order, until their NarSizes add up to
/// `needed` (fewer when the cache holds less): their ids and that sum. A
/// pinned closure counts towards the quota but is never evicted: a push
/// that only fits by evicting it is refused. The closure is read under the
/// cache's row lock, which pinning takes too.
async fn choose_victims(
    connection: &mut sqlx::AnyConnection,
    cache: &LockedCache,
    needed: u64,
    keep: Option<&StorePathHash>,
) -> Result<(Vec<i64>, u64)> {
    let keep_condition = if keep.is_some() {
        " AND o.store_path_hash <> $5"
    } else {
        ""
    };
    let pinned = pinned_closure_sql(cache.backend, 1);
    let sql = format!(
        "SELECT o.id, o.last_accessed_at, n.nar_size FROM objects o \
         JOIN nars n ON n.id = o.nar_id \
         WHERE o.cache_id = $1{keep_condition} \
         AND o.store_path_hash NOT IN ({pinned}) \
         AND (o.last_accessed_at > $2 OR (o.last_accessed_at = $2 AND o.id > $3)) \
         ORDER BY o.last_accessed_at, o.id LIMIT $4"
    );
    let mut victims = Vec::new();
    let mut freed: u64 = 0;
    let mut after = (i64::MIN, i64::MIN);
    while freed < needed {
        let mut query = sqlx::query(&sql)
            .bind(cache.id.0)
            .bind(after.0)
            .bind(after.1)
            .bind(EVICTION_PAGE);
        if let Some(keep) = keep {
            query = query.bind(keep.as_str());
        }
        let rows = query
            .fetch_all(&mut *connection)
            .await
            .map_err(query_error("choosing paths to evict"))?;
        for row in &rows {
            let id = i64_col(row, "id")?;
            after = (i64_col(row, "last_accessed_at")?, id);
            victims.push(id);
            freed = freed.saturating_add(u64_col(row, "nar_size")?);
            if freed >= needed {
                break;
            }
        }
        if rows.len() < EVICTION_PAGE as usize {
            break;
        }
    }
    Ok((victims, freed))
}

impl Database {
    /// The server-wide rules this handle enforces; see
    /// [`Database::with_quota_defaults`].
    pub fn quota_defaults(&self) -> QuotaDefaults {
        self.quota
    }

    /// This handle, enforcing `defaults` for caches without a quota of
    /// their own. A handle from [`Database::connect`] has none (unlimited).
    #[must_use]
    pub fn with_quota_defaults(mut self, defaults: QuotaDefaults) -> Self {
        self.quota = defaults;
        self
    }

    /// The counted usage of a cache; `None` when there is no such cache.
    pub async fn cache_usage(&self, cache_id: CacheId) -> Result<Option<CacheUsage>> {
        let row =
            sqlx::query("SELECT usage_path_bytes, usage_pending_bytes FROM caches WHERE id = $1")
                .bind(cache_id.0)
                .fetch_optional(&self.pool)
                .await
                .map_err(query_error("reading a cache's usage"))?;
        row.as_ref().map(usage_from_row).transpose()
    }

    /// Where a cache stands against its quota before a push of the path
    /// `keep` (if known) starts: one lookup, no lock. The push's bytes are
    /// checked again, atomically, when they are recorded.
    pub async fn quota_status(
        &self,
        cache_id: CacheId,
        keep: Option<&StorePathHash>,
    ) -> Result<Option<QuotaStatus>> {
        let row = sqlx::query(
            "SELECT c.quota_kind, c.quota_bytes, c.quota_policy, c.usage_path_bytes, \
             c.usage_pending_bytes, \
             (SELECT n.nar_size FROM objects o JOIN nars n ON n.id = o.nar_id \
              WHERE o.cache_id = c.id AND o.store_path_hash = $2) AS kept_bytes \
             FROM caches c WHERE c.id = $1",
        )
        .bind(cache_id.0)
        .bind(keep.map(StorePathHash::as_str).unwrap_or(""))
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading a cache's quota"))?;
        row.map(|row| {
            Ok(QuotaStatus {
                quota: self.quota.resolve(quota_from_row(&row)?),
                policy: parsed_col(&row, "quota_policy")?,
                usage: usage_from_row(&row)?,
                kept_bytes: opt_u64_col(&row, "kept_bytes")?.unwrap_or(0),
            })
        })
        .transpose()
    }

    /// Sums every cache's objects, uploads in flight and staged files
    /// again and corrects the counters where they drifted; returns the
    /// corrections. Each cache is recomputed under its row's lock, so no
    /// push or deletion of that cache interleaves (see the module
    /// documentation): one indexed sum per cache, for GC's periodic pass.
    pub async fn recompute_usage(&self) -> Result<Vec<UsageCorrection>> {
        let ids = sqlx::query("SELECT id FROM caches ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing caches"))?
            .iter()
            .map(|row| i64_col(row, "id").map(CacheId))
            .collect::<Result<Vec<_>>>()?;
        let mut corrections = Vec::new();
        for cache_id in ids {
            let mut tx = self.begin_write().await?;
            let Some(mut cache) = lock_cache_on(&mut tx, self.backend, cache_id).await? else {
                continue;
            };
            let sql = format!(
                "SELECT \
                 (SELECT CAST(COALESCE(SUM(n.nar_size), 0) AS BIGINT) FROM objects o \
                  JOIN nars n ON n.id = o.nar_id WHERE o.cache_id = $1) AS path_bytes, \
                 (SELECT CAST(COALESCE(SUM(u.nar_size), 0) AS BIGINT) FROM uploads u \
                  WHERE u.cache_id = $1 AND u.phase IN {IN_FLIGHT_PHASES_SQL}) AS upload_bytes, \
                 (SELECT CAST(COALESCE(SUM(s.nar_size), 0) AS BIGINT) FROM staged_files s \
                  WHERE s.cache_id = $1) AS staged_bytes"
            );
            let row = sqlx::query(&sql)
                .bind(cache_id.0)
                .fetch_one(&mut *tx)
                .await
                .map_err(query_error("summing a cache's usage"))?;
            let actual = CacheUsage {
                path_bytes: u64_col(&row, "path_bytes")?,
                pending_bytes: u64_col(&row, "upload_bytes")?
                    .saturating_add(u64_col(&row, "staged_bytes")?),
            };
            let recorded = cache.usage;
            if actual != recorded {
                let delta = |actual: u64, recorded: u64| -> Result<i64> {
                    Ok(to_i64("usage", actual)? - to_i64("usage", recorded)?)
                };
                adjust_usage_on(
                    &mut tx,
                    &mut cache,
                    delta(actual.path_bytes, recorded.path_bytes)?,
                    delta(actual.pending_bytes, recorded.pending_bytes)?,
                )
                .await?;
                corrections.push(UsageCorrection {
                    cache_id,
                    recorded,
                    actual,
                });
            }
            tx.commit("committing a cache's usage").await?;
        }
        Ok(corrections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_depends_on_the_policy() {
        let status = QuotaStatus {
            quota: Some(100),
            policy: QuotaPolicy::Refuse,
            usage: CacheUsage {
                path_bytes: 60,
                pending_bytes: 10,
            },
            kept_bytes: 5,
        };
        assert_eq!(status.room(), Some(30));
        let evicting = QuotaStatus {
            policy: QuotaPolicy::EvictLru,
            ..status
        };
        // Every path but the kept one may go; pending bytes stay.
        assert_eq!(evicting.room(), Some(85));
        let over = QuotaStatus {
            quota: Some(50),
            ..status
        };
        assert_eq!(over.room(), Some(0));
        let unlimited = QuotaStatus {
            quota: None,
            ..status
        };
        assert_eq!(unlimited.room(), None);
    }

    #[test]
    fn quota_settings_resolve_against_the_server_default() {
        let defaults = QuotaDefaults {
            default_quota: Some(7),
        };
        assert_eq!(defaults.resolve(CacheQuota::Global), Some(7));
        assert_eq!(defaults.resolve(CacheQuota::Unlimited), None);
        assert_eq!(defaults.resolve(CacheQuota::Bytes(3)), Some(3));
        assert_eq!(QuotaDefaults::default().resolve(CacheQuota::Global), None);
        for quota in [
            CacheQuota::Global,
            CacheQuota::Unlimited,
            CacheQuota::Bytes(9),
        ] {
            let (kind, bytes) = quota_columns(quota).expect("a storable quota");
            assert_eq!(kind == "bytes", bytes.is_some(), "{quota:?}");
        }
        assert!(quota_columns(CacheQuota::Bytes(u64::MAX)).is_err());
    }
}
