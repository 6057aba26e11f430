//! The store layer's one error type, shaped for the callers' decisions: the
//! HTTP layer maps [`DbError::NotFound`] and [`DbError::Conflict`] to 404 and
//! 409, and workers ask [`DbError::is_transient`] whether to retry.

use std::sync::Arc;

use sqlx::error::ErrorKind;

/// What went wrong in a store-layer call.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The row the call targets does not exist (or a row it refers to, such
    /// as the cache of a new upload, has gone).
    #[error("{what} not found")]
    NotFound { what: String },
    /// A row with the same unique key already exists.
    #[error("{what} already exists")]
    Conflict { what: String },
    /// A conditional update found the row changed since its caller read
    /// it (another request got there first); nothing was written.
    #[error("{what} changed since it was read")]
    Changed { what: String },
    /// Adding `requested` bytes to a cache that uses `used` would exceed its
    /// quota of `quota` bytes (and, under eviction, removing every other
    /// path would not make room). Nothing was written.
    #[error(
        "storage quota of {quota} bytes exceeded: {used} bytes in use, {requested} more requested"
    )]
    QuotaExceeded {
        quota: u64,
        used: u64,
        requested: u64,
    },
    /// The URL names neither SQLite nor PostgreSQL. Only the scheme is kept:
    /// the rest of a URL may hold a password.
    #[error("unsupported database url scheme {scheme:?}: expected sqlite: or postgres:")]
    UnsupportedUrl { scheme: String },
    /// A value from the caller cannot be stored (for example a size beyond
    /// `i64::MAX`).
    #[error("invalid value for {what}: {reason}")]
    InvalidInput { what: &'static str, reason: String },
    /// A column holds a value this version cannot read: the schema and the
    /// code disagree, or someone edited the rows by hand.
    #[error("column {column} holds an invalid value: {reason}")]
    Corrupt {
        column: &'static str,
        reason: String,
    },
    #[error("running database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database error while {context}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The SQLite group commit that held this transaction's writes failed
    /// (see `writer`), so none of them were written: `source` is the error
    /// the group met, shared by its members.
    #[error("database error while {context} (in a group commit)")]
    GroupCommit {
        context: &'static str,
        #[source]
        source: Arc<sqlx::Error>,
    },
}

impl DbError {
    /// Whether retrying the same call later may succeed: a lost connection,
    /// an exhausted pool, a busy SQLite file, a PostgreSQL serialisation
    /// failure or deadlock, or a failed group commit.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            Self::Query { source, .. } => source,
            Self::Migrate(sqlx::migrate::MigrateError::Execute(source)) => source,
            // The call's own work was done; what failed is the commit it
            // shared, which a retry does not share again.
            Self::GroupCommit { .. } => return true,
            _ => return false,
        };
        match source {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
            sqlx::Error::Database(error) => {
                let code = error.code();
                if error
                    .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                    .is_some()
                {
                    // SQLite reports extended result codes; the low byte is
                    // the primary code: SQLITE_BUSY (5) or SQLITE_LOCKED (6).
                    code.and_then(|code| code.parse::<i32>().ok())
                        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
                } else {
                    // PostgreSQL: serialization_failure, deadlock_detected.
                    matches!(code.as_deref(), Some("40001" | "40P01"))
                }
            }
            _ => false,
        }
    }

    /// Whether this is [`DbError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// Whether the database's own disk is full: SQLite's `SQLITE_FULL`,
    /// PostgreSQL's `disk_full` (53100).
    pub fn is_disk_full(&self) -> bool {
        let source = match self {
            Self::Query { source, .. } => source,
            Self::GroupCommit { source, .. } => &**source,
            _ => return false,
        };
        let sqlx::Error::Database(error) = source else {
            return false;
        };
        let code = error.code();
        if error
            .try_downcast_ref::<sqlx::sqlite::SqliteError>()
            .is_some()
        {
            // The primary result code is the low byte: SQLITE_FULL is 13.
            code.and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| code & 0xff == 13)
        } else {
            code.as_deref() == Some("53100")
        }
    }

    /// Whether this is [`DbError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

/// Wraps a sqlx error from a query with what the query was for.
pub(crate) fn query_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { context, source }
}

/// Like [`query_error`], but a unique violation becomes
/// [`DbError::Conflict`] and a foreign-key violation [`DbError::NotFound`],
/// described by `what` and `referenced`.
pub(crate) fn constraint_error(
    context: &'static str,
    what: impl FnOnce() -> String,
    referenced: impl FnOnce() -> String,
) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| match constraint_kind(&source) {
        Some(ErrorKind::UniqueViolation) => DbError::Conflict { what: what() },
        Some(ErrorKind::ForeignKeyViolation) => DbError::NotFound { what: referenced() },
        _ => DbError::Query { context, source },
    }
}

fn constraint_kind(error: &sqlx::Error) -> Option<ErrorKind> {
    match error {
        sqlx::Error::Database(error) => Some(error.kind()),
        _ => None,
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;
