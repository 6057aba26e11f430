//! The metadata store: one schema over SQLite (single machine) and
//! PostgreSQL (production), behind a cloneable [`Database`] handle with
//! typed rows.
//!
//! # Modules
//!
//! - Here: [`Database`], connecting, migrating, and the shared row helpers.
//! - `writer` — write transactions, and SQLite's writer turn and group commit.
//! - `types`, `row`, `error` — ids, states, times; reading rows; [`DbError`].
//! - `caches`, `quota` — caches with their keys, and their quota usage.
//! - `objects`, `nars`, `packs`, `listings`, `inline_nars` — what is stored:
//!   per-cache objects, global NARs and chunks, pack objects, `.ls` listings,
//!   small NARs stored in one transaction.
//! - `uploads`, `upload_events`, `push` — the ingest pipeline's state, waking
//!   its waiters, and the staged files of Nix's upload protocol.
//! - `gc`, `damage`, `pins`, `pinned_closure` — what GC may delete, damaged
//!   chunks, pins, and the closure of pinned paths GC and eviction spare.
//! - `tokens`, `audit`, `stats`, `build_logs`, `realisations` — minted
//!   tokens, the audit log, statistics, build logs and realisations.
//! - [`migrations`], [`chunking`] — the embedded schema, and FastCDC's sizes
//!   with the longest chunk list a NAR can have.
//!
//! # Model
//!
//! A cache is a restricted view of one global, content-addressed store:
//!
//! - `caches`: a tenant's cache and its configuration and signing key.
//! - `objects`: per cache, a store path and its metadata (references,
//!   deriver, signatures, CA, who pushed it), pointing at a global NAR.
//! - `nars`: global, by NAR hash; the concatenation of its `nar_chunks` in
//!   `seq` order, with its `.ls` listing in `nar_listings`.
//! - `chunks`: global, by SHA-256 of the uncompressed bytes, each with the
//!   byte range of a storage object that holds its compressed frame.
//! - `packs`: the storage objects that hold many chunks' frames, with
//!   their sizes and whether compaction retired them (module `packs`).
//! - `uploads`: the ingest pipeline's state per pushed path.
//! - `tokens`: minted tokens, for listing and revocation.
//! - `pins` and `pin_revisions`: per cache, named roots whose closures GC
//!   and eviction keep (module `pins`).
//! - `realisations`: per cache, which output path a content-addressed
//!   derivation's output built to (module `realisations`); and
//!   `nar_file_names`, per cache, the names pushers gave NAR files.
//!
//! NARs and chunks carry a [`StoreState`]: `pending` while the pipeline
//! stores them, `valid` when complete, `deleting` once GC has claimed them.
//! A narinfo is served only for an object whose NAR is `valid`
//! ([`Database::find_object`]).
//!
//! # One SQL text for both backends
//!
//! Queries are checked at run time (sqlx's compile-time macros can only
//! target one database) and go through sqlx's `Any` driver, so every query
//! is written once with `$1, $2, …` placeholders, which sqlx's SQLite driver
//! also accepts. `Any` carries only integers, floats, text, blobs and
//! booleans, so the schema keeps to those: times are `i64` unix
//! milliseconds ([`Timestamp`]), lists are JSON text, hashes are their
//! canonical text. The few dialect differences (booleans, identity columns)
//! live in the two migration directories, not in the queries; the only
//! backend-specific code paths are how a write transaction begins and the
//! SQLite connection settings (both in this module), GC's row locks, and
//! the expansion of a JSON list in the closure of pinned paths
//! (`pinned_closure::pinned_closure_sql`). Reading a boolean is
//! the one column conversion that differs (SQLite returns 0/1).
//!
//! `Any` was kept over an enum of concrete pools: one query text per
//! operation, one code path to test, and nothing in the schema needs a type
//! `Any` lacks.
//!
//! # Time
//!
//! Every method that stamps a time takes it as an argument (`at`) rather
//! than reading the clock, so that GC, the reconciler and their tests can
//! use whatever clock they like.
//!
//! # Concurrency
//!
//! SQLite runs in WAL mode (readers never block the writer) with foreign
//! keys on and a busy timeout; write transactions start with
//! `BEGIN IMMEDIATE`, so two writers queue instead of failing to upgrade a
//! read lock. A process's write transactions take turns in memory and
//! commit in groups while others wait (module `writer`). PostgreSQL uses
//! an ordinary pool at READ
//! COMMITTED; the queries that must be race-free under it are single
//! statements (`INSERT … ON CONFLICT`, conditional `UPDATE`s).

mod audit;
mod build_logs;
mod caches;
pub mod chunking;
mod damage;
mod error;
mod gc;
mod inline_nars;
mod listings;
pub mod migrations;
mod nars;
mod objects;
mod packs;
mod pinned_closure;
mod pins;
mod push;
mod quota;
mod realisations;
mod row;
mod stats;
mod tokens;
mod types;
mod upload_events;
mod uploads;
mod writer;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyQueryResult};
use sqlx::{Any, AnyPool};

pub use audit::{AuditAction, AuditEvent, NewAuditEvent};
pub use build_logs::EncodedLog;
pub use caches::{
    Cache, CacheScope, CacheUpdate, NewCache, DEFAULT_PRIORITY, DEFAULT_UPSTREAM_CACHE_KEY_NAMES,
};
pub use damage::{DamagedChunk, Withdrawal};
pub use error::{DbError, Result};
pub use gc::CacheRetention;
pub use inline_nars::{InlineChunk, InlineContent, InlineOutcome};
pub use listings::EncodedListing;
pub use nars::{Chunk, Nar, NarChunk, NewChunk, StoredChunk};
pub use objects::{NewObject, Object, ObjectMetadata, ObjectWithNar, PushedBy};
pub use packs::{ChunkLocation, ChunkMove, LocatedChunk, NewPack, Pack, PackUse};
pub use pins::{Pin, PinRevision};
pub use push::{LinkedPath, StagedFile};
pub use quota::{CacheUsage, QuotaDefaults, QuotaStatus, UsageCorrection};
pub use stats::{dedup_ratio, CacheStats, ServerStats, SharedCacheStats};
pub use tokens::TokenRecord;
pub use types::{
    Actor, CacheId, CacheKeypair, ChunkId, NarId, ObjectId, StoreState, Timestamp, UploadId,
    UploadPhase,
};
pub use upload_events::UploadWatch;
pub use uploads::{NewUpload, Upload};
pub use writer::WRITE_TRANSACTION_TARGET;

use error::query_error;
use upload_events::UploadEvents;
use writer::SqliteWriter;

/// How long a SQLite connection waits for the write lock before failing
/// with "database is locked" (the `busy_timeout` of every connection, and
/// the longest wait for a writer turn in [`Database::begin_write`]):
/// writes are short, so a 10 s wait means a stuck writer, and the error is
/// then better than hanging.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Run on every new SQLite connection. Foreign keys must be on for the
/// cascades and the restrictions of the schema; the busy timeout is
/// [`SQLITE_BUSY_TIMEOUT`]. (Both happen to be sqlx's defaults too; set
/// here so the guarantee does not rest on them.)
fn sqlite_connection_pragmas() -> String {
    format!(
        "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {};",
        SQLITE_BUSY_TIMEOUT.as_millis()
    )
}

/// How long a caller waits for a free pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections per pool. SQLite serialises writers anyway, and readers are
/// cheap; PostgreSQL servers default to 100 connections shared by every
/// Larder process.
const MAX_CONNECTIONS: u32 = 10;

/// At most this many values go into one `IN (…)` list; longer inputs are
/// split into batches. Well under SQLite's 32766 and PostgreSQL's 65535
/// bind parameters.
const MAX_IN_LIST: usize = 500;

/// Which database a [`Database`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL names by its scheme: `sqlite:` or
    /// `postgres:`/`postgresql:`.
    pub fn from_url(url: &str) -> Result<Self> {
        let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
        match scheme {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            // Only the scheme reaches the error: a URL may hold a password.
            other => Err(DbError::UnsupportedUrl {
                scheme: other.chars().take(20).collect(),
            }),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        })
    }
}

/// A handle to the metadata store: a connection pool and the queries over
/// it. Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    /// What caches without a quota of their own are held to.
    quota: QuotaDefaults,
    /// This process's waiters for uploads leaving the pipeline, shared by
    /// every clone.
    events: Arc<UploadEvents>,
    /// SQLite's writer turn and group commit (module `writer`). Shared by
    /// every clone.
    sqlite_writer: Arc<SqliteWriter>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("Database")
            .field("backend", &self.backend)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Opens a pool on `url`: `sqlite:PATH` (the file is created when
    /// missing, unless the URL sets `mode=` itself) or
    /// `postgres://user@host:port/db`. Does not migrate; see
    /// [`Database::migrate`].
    pub async fn connect(url: &str) -> Result<Self> {
        let backend = Backend::from_url(url)?;
        let events = Arc::new(UploadEvents::new(backend, url));
        sqlx::any::install_default_drivers();
        let mut options = AnyPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT);
        let url: Cow<'_, str> = match backend {
            Backend::Postgres => Cow::Borrowed(url),
            Backend::Sqlite => {
                if url.contains(":memory:") || url.contains("mode=memory") {
                    // Every connection to an in-memory database opens a
                    // different database: keep exactly one.
                    options = options.max_connections(1);
                }
                options = options.after_connect(|connection, _| {
                    Box::pin(async move {
                        sqlx::Executor::execute(connection, sqlite_connection_pragmas().as_str())
                            .await?;
                        Ok(())
                    })
                });
                with_sqlite_create_mode(url)
            }
        };
        let pool = options
            .connect(&url)
            .await
            .map_err(query_error("connecting to the database"))?;
        if backend == Backend::Sqlite {
            // WAL is a property of the file, so setting it once is enough;
            // it lets readers proceed while a writer commits.
            sqlx::raw_sql("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(query_error("switching SQLite to WAL mode"))?;
        }
        Ok(Self {
            pool,
            backend,
            quota: QuotaDefaults::default(),
            events,
            sqlite_writer: Arc::default(),
        })
    }

    /// Brings the schema up to date. Safe to run on every start and from
    /// several processes at once (sqlx takes an advisory lock on
    /// PostgreSQL; SQLite serialises writers).
    pub async fn migrate(&self) -> Result<()> {
        let migrator = migrations::migrator(self.backend)
            .await
            .map_err(DbError::Migrate)?;
        migrator.run(&self.pool).await.map_err(DbError::Migrate)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The underlying pool, for the rare query that belongs to another
    /// layer (for example GC's PostgreSQL advisory lock).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Runs `SELECT 1`: whether the database answers, for a readiness
    /// probe. Waits for a pooled connection like any query, so callers
    /// bound it with a timeout of their own.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(query_error("checking the database"))?;
        Ok(())
    }

    /// Registers for the wake-ups of upload `id` leaving the pipeline (done,
    /// failed or removed), from this process or, on PostgreSQL, any other
    /// (see `upload_events`). Register before the upload can leave, or read
    /// its row once after registering. Must be called within a tokio
    /// runtime (on PostgreSQL the first call starts a listening task).
    pub fn watch_upload(&self, id: &UploadId) -> UploadWatch {
        self.events.watch(id)
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A pooled connection, for a statement sequence that needs no
    /// transaction but shares helpers with transactional code.
    pub(crate) async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<Any>> {
        self.pool
            .acquire()
            .await
            .map_err(query_error("acquiring a connection"))
    }
}

/// Adds `mode=rwc` to a SQLite URL without a `mode`, so that the
/// single-machine server creates its database on first start.
fn with_sqlite_create_mode(url: &str) -> Cow<'_, str> {
    if url.contains("mode=") || url.contains(":memory:") {
        Cow::Borrowed(url)
    } else if url.contains('?') {
        Cow::Owned(format!("{url}&mode=rwc"))
    } else {
        Cow::Owned(format!("{url}?mode=rwc"))
    }
}

/// `$first, $first+1, …` for `count` parameters.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an `UPDATE`/`DELETE` touched any row.
fn affected(result: &AnyQueryResult) -> bool {
    result.rows_affected() > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_comes_from_the_scheme_and_hides_the_rest() {
        assert_eq!(
            Backend::from_url("sqlite:/tmp/x.db").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::from_url("sqlite::memory:").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::from_url("postgres://u:p@h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").ok(),
            Some(Backend::Postgres)
        );
        let error = Backend::from_url("mysql://user:hunter2@h/db").expect_err("mysql");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn sqlite_urls_get_create_mode_once() {
        assert_eq!(
            with_sqlite_create_mode("sqlite:/a.db"),
            "sqlite:/a.db?mode=rwc"
        );
        assert_eq!(
            with_sqlite_create_mode("sqlite:/a.db?cache=shared"),
            "sqlite:/a.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            with_sqlite_create_mode("sqlite:/a.db?mode=ro"),
            "sqlite:/a.db?mode=ro"
        );
        assert_eq!(
            with_sqlite_create_mode("sqlite::memory:"),
            "sqlite::memory:"
        );
    }

    #[test]
    fn placeholders_are_numbered_from_first() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(placeholders(1, 0), "");
    }
}
