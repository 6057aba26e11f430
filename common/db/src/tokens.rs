//! The `tokens` table: every minted token, so that admins can list them and
//! revoke one by its `jti`.
//!
//! Tokens are stateless JWTs: verification never reads this table. Only
//! revocation does, through [`Database::revoked_jtis`], which an in-memory
//! cache reloads every few seconds.

use sqlx::any::AnyRow;

use super::error::{constraint_error, query_error, DbError, Result};
use super::row::{json_col, opt_time_col, string_col, time_col, to_json};
use super::types::Timestamp;
use super::Database;

/// A minted token as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub jti: String,
    pub sub: String,
    /// The claims as minted (the JWT payload, not the signed token, which
    /// is never stored).
    pub claims: serde_json::Value,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

const TOKEN_COLUMNS: &str = "jti, sub, claims, issued_at, expires_at, revoked_at";

fn token_from_row(row: &AnyRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        jti: string_col(row, "jti")?,
        sub: string_col(row, "sub")?,
        claims: json_col(row, "claims")?,
        issued_at: time_col(row, "issued_at")?,
        expires_at: time_col(row, "expires_at")?,
        revoked_at: opt_time_col(row, "revoked_at")?,
    })
}

impl Database {
    /// Records a minted token; [`DbError::Conflict`] when its `jti` is
    /// already recorded. `revoked_at` is stored as given.
    pub async fn record_token(&self, token: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (jti, sub, claims, issued_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(token.jti.as_str())
        .bind(token.sub.as_str())
        .bind(to_json("token claims", &token.claims)?)
        .bind(token.issued_at.unix_millis())
        .bind(token.expires_at.unix_millis())
        .bind(token.revoked_at.map(Timestamp::unix_millis))
        .execute(&self.pool)
        .await
        .map_err(constraint_error(
            "recording a token",
            || format!("token {:?}", token.jti),
            || "referenced row".to_owned(),
        ))?;
        Ok(())
    }

    pub async fn token(&self, jti: &str) -> Result<Option<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = $1");
        let row = sqlx::query(&sql)
            .bind(jti)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("looking up a token"))?;
        row.as_ref().map(token_from_row).transpose()
    }

    /// Every recorded token, or every one minted for `subject`, oldest
    /// first.
    pub async fn list_tokens(&self, subject: Option<&str>) -> Result<Vec<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE $1 IS NULL OR sub = $1 \
             ORDER BY issued_at, jti"
        );
        let rows = sqlx::query(&sql)
            .bind(subject)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing tokens"))?;
        rows.iter().map(token_from_row).collect()
    }

    /// Revokes a token and returns its record. Revoking it again keeps the
    /// first revocation time. [`DbError::NotFound`] for an unknown `jti`.
    pub async fn revoke_token(&self, jti: &str, at: Timestamp) -> Result<TokenRecord> {
        let sql = format!(
            "UPDATE tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE jti = $1 \
             RETURNING {TOKEN_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(jti)
            .bind(at.unix_millis())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("revoking a token"))?;
        match row {
            Some(row) => token_from_row(&row),
            None => Err(DbError::NotFound {
                what: format!("token {jti:?}"),
            }),
        }
    }

    /// The `jti` of every revoked token, for the in-memory revocation cache.
    pub async fn revoked_jtis(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT jti FROM tokens WHERE revoked_at IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing revoked tokens"))?;
        rows.iter().map(|row| string_col(row, "jti")).collect()
    }
}
