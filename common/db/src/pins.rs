//! Pins (migration 0014): per cache, named roots whose closures retention
//! GC and quota eviction leave alone (the rules are `larder_api::pin`'s).
//!
//! # What a pin protects, and why a concurrent GC cannot miss it
//!
//! The protected set is never stored: [`pinned_closure_sql`] (module
//! `pinned_closure`) computes it inside the very statements that choose
//! what to delete
//! ([`Database::delete_expired_objects`] and eviction's choice of victims),
//! as a recursive query from the roots of the cache's pin revisions
//! through the `path_references` of the cache's objects. Both of those
//! statements run in a transaction that holds the cache's row lock
//! (PostgreSQL `FOR UPDATE`; SQLite's one writer), and so do
//! [`Database::pin_path`] and every transaction that adds or replaces an
//! object. So a pin committed before GC's statement is seen by it, and one
//! made after finds its root still there (or gets `None` and the caller a
//! 404 when GC took it first): there is no moment at which a pinned root is
//! in the cache but unprotected. Dropping revisions and deleting pins only
//! remove protection, so they need no lock; a GC that still sees them
//! keeps a little more than it had to, once.
//!
//! Pins do not stop explicit deletion (`delete-paths` by a holder of the
//! delete permission): a deliberate removal, such as a leaked secret in a
//! pinned closure, must not need the pin deleted first. The revision stays
//! and protects the path again if it is pushed again.
//!
//! [`pinned_closure_sql`]: super::pinned_closure::pinned_closure_sql

use std::num::NonZeroU32;

use sqlx::any::AnyRow;

use super::error::{query_error, Result};
use super::quota::lock_existing_cache_on;
use super::row::{
    bool_col, corrupt, i64_col, opt_string_col, store_path_hash_col, string_col, time_col, u64_col,
};
use super::types::{CacheId, Timestamp};
use super::Database;
use larder_api::pin::{KeepPolicy, PinName};
use larder_nix::StorePathHash;

/// A pin and its revisions, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub name: PinName,
    pub keep: KeepPolicy,
    pub created_at: Timestamp,
    pub revisions: Vec<PinRevision>,
}

/// One root pinned under a pin's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRevision {
    pub revision: u64,
    pub store_path_hash: StorePathHash,
    /// The full path, as the cache held it when pinned.
    pub store_path: String,
    pub created_at: Timestamp,
    /// The subject of the token that pinned it.
    pub created_by: Option<String>,
    /// Whether the cache still holds the root (an explicit deletion may
    /// have removed it).
    pub present: bool,
}

/// A policy as its two columns.
fn keep_columns(keep: KeepPolicy) -> (&'static str, Option<i64>) {
    match keep {
        KeepPolicy::Forever => ("forever", None),
        KeepPolicy::Revisions(n) => ("revisions", Some(i64::from(n.get()))),
        KeepPolicy::Days(n) => ("days", Some(i64::from(n.get()))),
    }
}

fn keep_from_row(row: &AnyRow) -> Result<KeepPolicy> {
    let kind = string_col(row, "keep_kind")?;
    let value = || -> Result<NonZeroU32> {
        let value = i64_col(row, "keep_value")?;
        u32::try_from(value)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(|| corrupt("keep_value", format!("{value} is not a count from 1")))
    };
    match kind.as_str() {
        "forever" => Ok(KeepPolicy::Forever),
        "revisions" => Ok(KeepPolicy::Revisions(value()?)),
        "days" => Ok(KeepPolicy::Days(value()?)),
        other => Err(corrupt("keep_kind", format!("unknown policy {other:?}"))),
    }
}

/// Drops the revisions of pin `pin_id` that `keep` no longer keeps, given
/// its newest revision; returns how many went. Read-then-act, safely: a
/// revision added since `newest` was read only makes this keep one more,
/// and a policy changed since `keep` was read makes it drop nothing (the
/// statement checks that the pin still has `keep`).
async fn prune_on(
    connection: &mut sqlx::AnyConnection,
    pin_id: i64,
    keep: KeepPolicy,
    newest: u64,
    at: Timestamp,
) -> Result<u64> {
    let Some(prune) = keep.prune(newest) else {
        return Ok(0);
    };
    let made_before = prune
        .made_before
        .map_or(i64::MAX, |age| at.saturating_sub(age).unix_millis());
    let (kind, value) = keep_columns(keep);
    let result = sqlx::query(
        "DELETE FROM pin_revisions WHERE pin_id = $1 AND revision < $2 AND created_at < $3 \
         AND EXISTS (SELECT 1 FROM pins p WHERE p.id = $1 AND p.keep_kind = $4 \
                     AND p.keep_value = $5)",
    )
    .bind(pin_id)
    .bind(i64::try_from(prune.revisions_below).unwrap_or(i64::MAX))
    .bind(made_before)
    .bind(kind)
    .bind(value)
    .execute(&mut *connection)
    .await
    .map_err(query_error("dropping pin revisions"))?;
    Ok(result.rows_affected())
}

/// The pins of a cache (only `name`'s, if given) with their revisions.
async fn pins_on(
    connection: &mut sqlx::AnyConnection,
    cache_id: CacheId,
    name: Option<&PinName>,
) -> Result<Vec<Pin>> {
    let rows = sqlx::query(
        "SELECT p.id, p.name, p.keep_kind, p.keep_value, p.created_at AS pin_created_at, \
         r.revision, r.store_path_hash, r.store_path, r.created_at, r.created_by, \
         EXISTS (SELECT 1 FROM objects o WHERE o.cache_id = p.cache_id \
                 AND o.store_path_hash = r.store_path_hash) AS present \
         FROM pins p JOIN pin_revisions r ON r.pin_id = p.id \
         WHERE p.cache_id = $1 AND ($2 IS NULL OR p.name = $2) \
         ORDER BY p.name, r.revision DESC",
    )
    .bind(cache_id.0)
    .bind(name.map(PinName::as_str))
    .fetch_all(&mut *connection)
    .await
    .map_err(query_error("listing pins"))?;
    let mut pins: Vec<(i64, Pin)> = Vec::new();
    for row in &rows {
        let id = i64_col(row, "id")?;
        if pins.last().is_none_or(|(last, _)| *last != id) {
            pins.push((
                id,
                Pin {
                    name: string_col(row, "name")?.parse().map_err(
                        |error: larder_api::pin::PinNameError| corrupt("name", error.to_string()),
                    )?,
                    keep: keep_from_row(row)?,
                    created_at: time_col(row, "pin_created_at")?,
                    revisions: Vec::new(),
                },
            ));
        }
        let (_, pin) = pins.last_mut().expect("a pin was pushed for this row");
        pin.revisions.push(PinRevision {
            revision: u64_col(row, "revision")?,
            store_path_hash: store_path_hash_col(row, "store_path_hash")?,
            store_path: string_col(row, "store_path")?,
            created_at: time_col(row, "created_at")?,
            created_by: opt_string_col(row, "created_by")?,
            present: bool_col(row, "present")?,
        });
    }
    Ok(pins.into_iter().map(|(_, pin)| pin).collect())
}

impl Database {
    /// Pins the path `hash` of a cache under `name`: creates the pin, or
    /// adds a revision to it (none when its newest revision already roots
    /// at `hash`, so that a retried CI job does not push older revisions
    /// out), makes `keep` its policy if given (a new pin without one gets
    /// [`KeepPolicy::DEFAULT`]; an existing one keeps its own, so that a
    /// pin without flags never silently drops what `--forever` kept) and
    /// drops the revisions its policy no longer keeps. `None` when the cache does not hold
    /// the path. The cache's row lock makes this and GC's deletions take
    /// turns (see the module documentation).
    pub async fn pin_path(
        &self,
        cache_id: CacheId,
        name: &PinName,
        hash: &StorePathHash,
        keep: Option<KeepPolicy>,
        created_by: Option<&str>,
        at: Timestamp,
    ) -> Result<Option<Pin>> {
        let mut tx = self.begin_write().await?;
        lock_existing_cache_on(&mut tx, self.backend, cache_id).await?;
        let Some(object) = sqlx::query(
            "SELECT store_path FROM objects WHERE cache_id = $1 AND store_path_hash = $2",
        )
        .bind(cache_id.0)
        .bind(hash.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("finding the path to pin"))?
        else {
            return Ok(None);
        };
        let store_path = string_col(&object, "store_path")?;
        let (kind, value) = keep_columns(keep.unwrap_or_default());
        let pin = sqlx::query(
            "INSERT INTO pins (cache_id, name, keep_kind, keep_value, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cache_id, name) DO UPDATE SET \
             keep_kind = CASE WHEN $6 = 1 THEN excluded.keep_kind ELSE pins.keep_kind END, \
             keep_value = CASE WHEN $6 = 1 THEN excluded.keep_value ELSE pins.keep_value END \
             RETURNING id, keep_kind, keep_value",
        )
        .bind(cache_id.0)
        .bind(name.as_str())
        .bind(kind)
        .bind(value)
        .bind(at.unix_millis())
        .bind(i64::from(keep.is_some()))
        .fetch_one(&mut *tx)
        .await
        .map_err(query_error("recording a pin"))?;
        let pin_id = i64_col(&pin, "id")?;
        let keep = keep_from_row(&pin)?;
        let newest = sqlx::query(
            "SELECT revision, store_path_hash FROM pin_revisions WHERE pin_id = $1 \
             ORDER BY revision DESC LIMIT 1",
        )
        .bind(pin_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("reading a pin's newest revision"))?;
        let newest = match newest {
            Some(row) if string_col(&row, "store_path_hash")? == hash.as_str() => {
                u64_col(&row, "revision")?
            }
            newest => {
                let revision = match newest {
                    Some(row) => u64_col(&row, "revision")? + 1,
                    None => 1,
                };
                sqlx::query(
                    "INSERT INTO pin_revisions \
                     (pin_id, revision, store_path_hash, store_path, created_at, created_by) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(pin_id)
                .bind(i64::try_from(revision).unwrap_or(i64::MAX))
                .bind(hash.as_str())
                .bind(store_path.as_str())
                .bind(at.unix_millis())
                .bind(created_by)
                .execute(&mut *tx)
                .await
                .map_err(query_error("recording a pin revision"))?;
                revision
            }
        };
        prune_on(&mut tx, pin_id, keep, newest, at).await?;
        let pin = pins_on(&mut tx, cache_id, Some(name)).await?.pop();
        tx.commit("committing a pin").await?;
        Ok(pin)
    }

    /// The pins of a cache with their revisions, by name.
    pub async fn pins(&self, cache_id: CacheId) -> Result<Vec<Pin>> {
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(query_error("acquiring a connection to list pins"))?;
        pins_on(&mut connection, cache_id, None).await
    }

    /// Deletes a pin and all its revisions; whether it existed. What it
    /// protected is GC's again from the next run.
    pub async fn delete_pin(&self, cache_id: CacheId, name: &PinName) -> Result<bool> {
        let result = sqlx::query("DELETE FROM pins WHERE cache_id = $1 AND name = $2")
            .bind(cache_id.0)
            .bind(name.as_str())
            .execute(&self.pool)
            .await
            .map_err(query_error("deleting a pin"))?;
        Ok(result.rows_affected() > 0)
    }

    /// Drops, in every cache, the pin revisions their policies no longer
    /// keep at `now` (those `--keep-days` aged out; the other policies are
    /// applied when pinning already); returns how many went. GC runs it
    /// before expiring objects, so what they protected goes in the same
    /// run.
    pub async fn prune_pin_revisions(&self, now: Timestamp) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT p.id, p.keep_kind, p.keep_value, MAX(r.revision) AS newest \
             FROM pins p JOIN pin_revisions r ON r.pin_id = p.id \
             WHERE p.keep_kind <> 'forever' \
             GROUP BY p.id, p.keep_kind, p.keep_value ORDER BY p.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing pins to prune"))?;
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(query_error("acquiring a connection to prune pins"))?;
        let mut dropped = 0;
        for row in &rows {
            dropped += prune_on(
                &mut connection,
                i64_col(row, "id")?,
                keep_from_row(row)?,
                u64_col(row, "newest")?,
                now,
            )
            .await?;
        }
        Ok(dropped)
    }
}
