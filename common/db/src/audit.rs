//! The audit log (`audit_events`, migration 0013): who did what to which
//! cache, and when, for the caches' owners and the operator.
//!
//! Who is a token's subject and id (`jti`), so that everything one token
//! did can be found even among several tokens of one subject. A push is
//! recorded by the transaction that creates its object (see
//! `objects::upsert_counted_object_on`), so a path is never visible
//! without its record; the other actions (cache changes, deletions, token
//! changes) are recorded by the server right after they commit, so a crash
//! in between loses that one record, never the action's effect.
//!
//! Rows keep their cache's id and name without a foreign key: a destroyed
//! cache's history stays until `[gc] audit-retention` removes it.

use std::fmt;
use std::str::FromStr;

use sqlx::any::AnyRow;

use super::error::{query_error, Result};
use super::row::{i64_col, json_col, opt_i64_col, opt_string_col, time_col, to_json};
use super::types::{Actor, CacheId, Timestamp};
use super::Database;
use larder_api::cache_name::CacheName;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// A path was pushed (its object created or replaced).
    Push,
    /// A path was deleted by a user (`delete-paths` or a purge).
    Delete,
    CacheCreate,
    CacheConfigure,
    CacheDestroy,
    TokenMint,
    TokenRevoke,
    /// A path pinned (a pin created, or a revision added).
    PinCreate,
    PinDelete,
}

impl AuditAction {
    pub const ALL: [AuditAction; 9] = [
        AuditAction::Push,
        AuditAction::Delete,
        AuditAction::CacheCreate,
        AuditAction::CacheConfigure,
        AuditAction::CacheDestroy,
        AuditAction::TokenMint,
        AuditAction::TokenRevoke,
        AuditAction::PinCreate,
        AuditAction::PinDelete,
    ];

    /// The name stored and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuditAction::Push => "push",
            AuditAction::Delete => "delete",
            AuditAction::CacheCreate => "cache-create",
            AuditAction::CacheConfigure => "cache-configure",
            AuditAction::CacheDestroy => "cache-destroy",
            AuditAction::TokenMint => "token-mint",
            AuditAction::TokenRevoke => "token-revoke",
            AuditAction::PinCreate => "pin-create",
            AuditAction::PinDelete => "pin-delete",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditAction {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        AuditAction::ALL
            .into_iter()
            .find(|action| action.as_str() == name)
            .ok_or_else(|| format!("unknown audit action {name:?}"))
    }
}

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEvent {
    /// The cache acted on; `None` for token changes.
    pub cache: Option<(CacheId, CacheName)>,
    pub actor: Actor,
    pub action: AuditAction,
    /// What it was about, as a JSON object.
    pub detail: serde_json::Value,
}

/// A recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// Increasing with time: the key pages are cut by.
    pub id: i64,
    pub at: Timestamp,
    pub cache_id: Option<CacheId>,
    pub cache_name: Option<String>,
    pub actor: Actor,
    pub action: AuditAction,
    pub detail: serde_json::Value,
}

const AUDIT_COLUMNS: &str = "id, at, cache_id, cache_name, subject, jti, action, detail";

fn event_from_row(row: &AnyRow) -> Result<AuditEvent> {
    Ok(AuditEvent {
        id: i64_col(row, "id")?,
        at: time_col(row, "at")?,
        cache_id: opt_i64_col(row, "cache_id")?.map(CacheId),
        cache_name: opt_string_col(row, "cache_name")?,
        actor: Actor {
            subject: opt_string_col(row, "subject")?,
            jti: opt_string_col(row, "jti")?,
        },
        action: super::row::parsed_col(row, "action")?,
        detail: json_col(row, "detail")?,
    })
}

/// Records a push inside the transaction that creates its object; the
/// cache's name is read in the same statement.
pub(crate) async fn record_push_on(
    connection: &mut sqlx::AnyConnection,
    cache_id: CacheId,
    actor: &Actor,
    detail: &serde_json::Value,
    at: Timestamp,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (cache_id, cache_name, at, subject, jti, action, detail) \
         SELECT id, name, $2, $3, $4, $5, $6 FROM caches WHERE id = $1",
    )
    .bind(cache_id.0)
    .bind(at.unix_millis())
    .bind(actor.subject.as_deref())
    .bind(actor.jti.as_deref())
    .bind(AuditAction::Push.as_str())
    .bind(to_json("audit detail", detail)?)
    .execute(&mut *connection)
    .await
    .map_err(query_error("recording a push in the audit log"))?;
    Ok(())
}

impl Database {
    /// Records events in one transaction.
    pub async fn record_audit_events(&self, events: &[NewAuditEvent], at: Timestamp) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for event in events {
            sqlx::query(
                "INSERT INTO audit_events (cache_id, cache_name, at, subject, jti, action, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(event.cache.as_ref().map(|(id, _)| id.0))
            .bind(event.cache.as_ref().map(|(_, name)| name.as_str()))
            .bind(at.unix_millis())
            .bind(event.actor.subject.as_deref())
            .bind(event.actor.jti.as_deref())
            .bind(event.action.as_str())
            .bind(to_json("audit detail", &event.detail)?)
            .execute(&mut *tx)
            .await
            .map_err(query_error("recording an audit event"))?;
        }
        tx.commit("committing audit events").await
    }

    /// Up to `limit` events, newest first, older than the event `before`
    /// if given: of one cache, or of every cache and none with `None`.
    pub async fn audit_events(
        &self,
        cache_id: Option<CacheId>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>> {
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events \
             WHERE ($1 IS NULL OR cache_id = $1) AND ($2 IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(cache_id.map(|id| id.0))
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading the audit log"))?;
        rows.iter().map(event_from_row).collect()
    }

    /// Deletes the events recorded before `before`; returns how many.
    pub async fn delete_expired_audit_events(&self, before: Timestamp) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM audit_events WHERE at < $1")
            .bind(before.unix_millis())
            .execute(&mut *tx)
            .await
            .map_err(query_error("deleting expired audit events"))?
            .rows_affected();
        tx.commit("committing deleted audit events").await?;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_round_trip() {
        for action in AuditAction::ALL {
            assert_eq!(action.as_str().parse::<AuditAction>(), Ok(action));
        }
        assert!("teleport".parse::<AuditAction>().is_err());
    }
}
