//! The `caches` table: each tenant's cache, its configuration and its
//! signing key.
//!
//! Destroying a cache deletes its objects and uploads with it (foreign keys
//! with `ON DELETE CASCADE`); the global NARs and chunks stay until GC finds
//! nothing pointing at them.

use std::time::Duration;

use sqlx::any::AnyRow;

use super::error::{constraint_error, query_error, DbError, Result};
use super::quota::{quota_columns, quota_from_row};
use super::row::{
    bool_col, i32_col, i64_col, json_col, opt_string_col, opt_u64_col, parsed_col, string_col,
    time_col, to_i64, to_json,
};
use super::types::{CacheId, CacheKeypair, Timestamp};
use super::{affected, Database};
use larder_api::cache_name::CacheName;
use larder_api::v1::{CacheQuota, QuotaPolicy};
use larder_nix::StoreDir;

/// The priority a new cache advertises in `nix-cache-info`: just below
/// cache.nixos.org (40), so Nix asks the official cache first.
pub const DEFAULT_PRIORITY: i32 = 41;

/// The upstream keys a new cache trusts by default: paths signed by these
/// are assumed to be in the upstream cache, so clients need not push them.
pub const DEFAULT_UPSTREAM_CACHE_KEY_NAMES: &[&str] = &["cache.nixos.org-1"];

/// Which caches a lookup by name may find.
///
/// The server picks the scope from the caller's token *before* looking
/// anything up: a caller whose token says nothing about a name may only
/// find a public cache of that name. For that caller a private cache and a
/// missing one then run the same query and both find no row, so neither
/// the answer nor the work behind it tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheScope {
    /// Any cache of that name.
    Any,
    /// Only a public cache of that name.
    Public,
}

/// A cache row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    pub id: CacheId,
    pub name: CacheName,
    pub is_public: bool,
    pub store_dir: StoreDir,
    pub priority: i32,
    pub upstream_cache_key_names: Vec<String>,
    /// `None`: the global default retention applies.
    pub retention_period: Option<Duration>,
    /// Its storage quota (usage is kept apart: see
    /// [`Database::cache_usage`]).
    pub quota: CacheQuota,
    pub quota_policy: QuotaPolicy,
    /// The key that signs what the cache serves.
    pub keypair: CacheKeypair,
    /// The key a rotation in progress moves to: while set, it signs
    /// beside `keypair`, so that clients may trust either public key.
    pub next_keypair: Option<CacheKeypair>,
    pub created_at: Timestamp,
}

/// The fields of a cache to create; [`NewCache::new`] fills in defaults.
#[derive(Debug, Clone)]
pub struct NewCache {
    pub name: CacheName,
    pub is_public: bool,
    pub store_dir: StoreDir,
    pub priority: i32,
    pub upstream_cache_key_names: Vec<String>,
    pub retention_period: Option<Duration>,
    pub quota: CacheQuota,
    pub quota_policy: QuotaPolicy,
    pub keypair: CacheKeypair,
}

impl NewCache {
    /// A private cache with the default store directory, priority, upstream
    /// keys, retention and quota.
    pub fn new(name: CacheName, keypair: CacheKeypair) -> Self {
        Self {
            name,
            is_public: false,
            store_dir: StoreDir::default(),
            priority: DEFAULT_PRIORITY,
            upstream_cache_key_names: DEFAULT_UPSTREAM_CACHE_KEY_NAMES
                .iter()
                .map(|&name| name.to_owned())
                .collect(),
            retention_period: None,
            quota: CacheQuota::Global,
            quota_policy: QuotaPolicy::Refuse,
            keypair,
        }
    }
}

/// A change to a cache's configuration: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CacheUpdate {
    pub is_public: Option<bool>,
    pub store_dir: Option<StoreDir>,
    pub priority: Option<i32>,
    pub upstream_cache_key_names: Option<Vec<String>>,
    /// `Some(None)` resets the retention period to the global default.
    pub retention_period: Option<Option<Duration>>,
    pub quota: Option<CacheQuota>,
    pub quota_policy: Option<QuotaPolicy>,
    /// A new current key pair (regenerated, imported, or the next key
    /// when a rotation finishes).
    pub keypair: Option<CacheKeypair>,
    /// `Some(Some(key))` starts a rotation to `key`; `Some(None)` clears
    /// the next key (a rotation finished).
    pub next_keypair: Option<Option<CacheKeypair>>,
    /// The update applies only if the cache's keys are still these
    /// (current, next), else [`DbError::Changed`]: a key change decided
    /// from an earlier read (start or finish a rotation, replace the key)
    /// must not silently undo one that another request made in between.
    pub if_keys_are: Option<(CacheKeypair, Option<CacheKeypair>)>,
}

const CACHE_COLUMNS: &str = "id, name, is_public, store_dir, priority, \
    upstream_cache_key_names, retention_period_secs, quota_kind, quota_bytes, quota_policy, \
    keypair, next_keypair, created_at";

fn cache_from_row(row: &AnyRow) -> Result<Cache> {
    Ok(Cache {
        id: CacheId(i64_col(row, "id")?),
        name: parsed_col(row, "name")?,
        is_public: bool_col(row, "is_public")?,
        store_dir: parsed_col(row, "store_dir")?,
        priority: i32_col(row, "priority")?,
        upstream_cache_key_names: json_col(row, "upstream_cache_key_names")?,
        retention_period: opt_u64_col(row, "retention_period_secs")?.map(Duration::from_secs),
        quota: quota_from_row(row)?,
        quota_policy: parsed_col(row, "quota_policy")?,
        keypair: CacheKeypair::new(string_col(row, "keypair")?),
        next_keypair: opt_string_col(row, "next_keypair")?.map(CacheKeypair::new),
        created_at: time_col(row, "created_at")?,
    })
}

fn retention_secs(retention: Option<Duration>) -> Result<Option<i64>> {
    retention
        .map(|period| to_i64("retention period", period.as_secs()))
        .transpose()
}

impl Database {
    /// Creates a cache; [`DbError::Conflict`] when the name is taken.
    pub async fn create_cache(&self, new: &NewCache, at: Timestamp) -> Result<Cache> {
        let sql = format!(
            "INSERT INTO caches (name, is_public, store_dir, priority, upstream_cache_key_names, \
             retention_period_secs, keypair, created_at, quota_kind, quota_bytes, quota_policy) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {CACHE_COLUMNS}"
        );
        let (quota_kind, quota_bytes) = quota_columns(new.quota)?;
        let row = sqlx::query(&sql)
            .bind(new.name.as_str())
            .bind(new.is_public)
            .bind(new.store_dir.as_str())
            .bind(i64::from(new.priority))
            .bind(to_json(
                "upstream cache key names",
                &new.upstream_cache_key_names,
            )?)
            .bind(retention_secs(new.retention_period)?)
            .bind(new.keypair.expose_secret())
            .bind(at.unix_millis())
            .bind(quota_kind)
            .bind(quota_bytes)
            .bind(new.quota_policy.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(constraint_error(
                "creating a cache",
                || format!("cache {:?}", new.name.as_str()),
                || "referenced row".to_owned(),
            ))?;
        cache_from_row(&row)
    }

    pub async fn cache_by_name(&self, name: &CacheName) -> Result<Option<Cache>> {
        self.cache_by_name_in(name, CacheScope::Any).await
    }

    /// The cache of that name, if it is in `scope`.
    pub async fn cache_by_name_in(
        &self,
        name: &CacheName,
        scope: CacheScope,
    ) -> Result<Option<Cache>> {
        // Both scopes bind the same parameters: `$2` is true for public
        // caches only, and NULL (matching every row) for any.
        let sql = format!(
            "SELECT {CACHE_COLUMNS} FROM caches WHERE name = $1 \
             AND ($2 IS NULL OR is_public = $2)"
        );
        let public_only = match scope {
            CacheScope::Any => None,
            CacheScope::Public => Some(true),
        };
        let row = sqlx::query(&sql)
            .bind(name.as_str())
            .bind(public_only)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a cache by name"))?;
        row.as_ref().map(cache_from_row).transpose()
    }

    pub async fn cache_by_id(&self, id: CacheId) -> Result<Option<Cache>> {
        let sql = format!("SELECT {CACHE_COLUMNS} FROM caches WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a cache by id"))?;
        row.as_ref().map(cache_from_row).transpose()
    }

    /// Applies `update` in one statement and returns the updated cache;
    /// [`DbError::NotFound`] when there is no such cache,
    /// [`DbError::Changed`] when its keys are no longer `if_keys_are`.
    pub async fn update_cache(&self, name: &CacheName, update: &CacheUpdate) -> Result<Cache> {
        // COALESCE keeps a column when its parameter is NULL; the retention
        // period and the quota's bytes need a separate flag because NULL is
        // also a value they can be set to, and so does the next key pair.
        // NULL keys compare equal through COALESCE (a key is never empty).
        let sql = format!(
            "UPDATE caches SET \
             is_public = COALESCE($2, is_public), \
             store_dir = COALESCE($3, store_dir), \
             priority = COALESCE($4, priority), \
             upstream_cache_key_names = COALESCE($5, upstream_cache_key_names), \
             retention_period_secs = CASE WHEN $6 = 1 THEN $7 ELSE retention_period_secs END, \
             keypair = COALESCE($8, keypair), \
             quota_kind = COALESCE($9, quota_kind), \
             quota_bytes = CASE WHEN $10 = 1 THEN $11 ELSE quota_bytes END, \
             quota_policy = COALESCE($12, quota_policy), \
             next_keypair = CASE WHEN $13 = 1 THEN $14 ELSE next_keypair END \
             WHERE name = $1 AND ($15 = 0 \
             OR (keypair = $16 AND COALESCE(next_keypair, '') = COALESCE($17, ''))) \
             RETURNING {CACHE_COLUMNS}"
        );
        let upstream = update
            .upstream_cache_key_names
            .as_ref()
            .map(|names| to_json("upstream cache key names", names))
            .transpose()?;
        let (set_retention, retention) = match update.retention_period {
            Some(period) => (1_i64, retention_secs(period)?),
            None => (0, None),
        };
        let (quota_kind, set_quota, quota_bytes) = match update.quota.map(quota_columns) {
            Some(columns) => {
                let (kind, bytes) = columns?;
                (Some(kind), 1_i64, bytes)
            }
            None => (None, 0, None),
        };
        let (set_next, next) = match &update.next_keypair {
            Some(next) => (1_i64, next.as_ref().map(CacheKeypair::expose_secret)),
            None => (0, None),
        };
        let (guarded, (guard_current, guard_next)) = match &update.if_keys_are {
            Some((current, next)) => (
                1_i64,
                (
                    Some(current.expose_secret()),
                    next.as_ref().map(CacheKeypair::expose_secret),
                ),
            ),
            None => (0, (None, None)),
        };
        let row = sqlx::query(&sql)
            .bind(name.as_str())
            .bind(update.is_public)
            .bind(update.store_dir.as_ref().map(StoreDir::as_str))
            .bind(update.priority.map(i64::from))
            .bind(upstream)
            .bind(set_retention)
            .bind(retention)
            .bind(update.keypair.as_ref().map(CacheKeypair::expose_secret))
            .bind(quota_kind)
            .bind(set_quota)
            .bind(quota_bytes)
            .bind(update.quota_policy.map(QuotaPolicy::as_str))
            .bind(set_next)
            .bind(next)
            .bind(guarded)
            .bind(guard_current)
            .bind(guard_next)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("updating a cache"))?;
        match row {
            Some(row) => cache_from_row(&row),
            // No row: either no such cache or, under a guard, keys that
            // changed; a second look tells which.
            None if update.if_keys_are.is_some() && self.cache_by_name(name).await?.is_some() => {
                Err(DbError::Changed {
                    what: format!("the signing keys of cache {:?}", name.as_str()),
                })
            }
            None => Err(DbError::NotFound {
                what: format!("cache {:?}", name.as_str()),
            }),
        }
    }

    /// Destroys a cache with its objects and uploads; whether it existed.
    pub async fn delete_cache(&self, name: &CacheName) -> Result<bool> {
        let result = sqlx::query("DELETE FROM caches WHERE name = $1")
            .bind(name.as_str())
            .execute(&self.pool)
            .await
            .map_err(query_error("deleting a cache"))?;
        Ok(affected(&result))
    }

    /// Every cache's name, sorted bytewise.
    pub async fn list_cache_names(&self) -> Result<Vec<CacheName>> {
        let rows = sqlx::query("SELECT name FROM caches")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing caches"))?;
        let mut names = rows
            .iter()
            .map(|row| parsed_col(row, "name"))
            .collect::<Result<Vec<CacheName>>>()?;
        // Sorted here, not by ORDER BY: PostgreSQL would sort by the
        // server's collation, SQLite bytewise.
        names.sort();
        Ok(names)
    }
}
