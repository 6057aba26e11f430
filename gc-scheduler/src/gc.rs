//! Garbage collection: one pass ([`collect_garbage`]) and the loop that
//! repeats it ([`run_gc_loop`]).
//!
//! A pass, in this order, so that what one step frees the next collects in
//! the same run:
//!
//! 1. **Reaping** (module [`reap`]): uploads that ended (`done`, `failed`)
//!    past `finished-upload-deadline`, and uploads still in flight but not
//!    updated for `stuck-upload-deadline` (failed first, so they stop
//!    protecting their NAR), go with their staged NARs; staged files of
//!    Nix's `PUT nar/…` that no narinfo claimed within `staged-file-deadline`
//!    go too. This step also runs alone, every `reap-interval`
//!    ([`reap`], [`run_reap_loop`]): it is a few indexed queries, and an
//!    unclaimed NAR file should not wait for the next full run.
//! 2. **Objects**: per cache, those not accessed for the cache's retention
//!    period (or `default-retention`; neither means keep forever); with the
//!    same period, build logs and debug-info entries not uploaded (again)
//!    for that long (they are rows only: nothing in storage). Then the
//!    names of NAR files and realisations whose paths are gone, and the
//!    audit log's events older than `audit-retention`.
//! 3. **NARs** no object points at and no upload in flight uses.
//! 4. **Chunks** no NAR lists and no chunker looked up for `orphan-grace`:
//!    claimed (`deleting`), then their rows deleted (a chunk in an object of
//!    its own, from a store written before packs, has that object deleted
//!    first; a missing object counts as deleted). Claimed chunks a crashed
//!    run left are finished first.
//! 5. **Packs** (module [`packs`]): those no chunk row names any more are
//!    deleted (retired ones once retired for `orphan-grace`, and at least
//!    [`PACK_GRACE`]), then
//!    compaction copies the live chunks of sparse and small packs (and of
//!    one-chunk objects) into new packs, at most `compact-bytes-per-run`,
//!    and retires the old ones.
//! 6. **Orphan objects** under `chunks/` that no chunk row names and that
//!    are older than `orphan-grace` (module [`orphans`]): written by a
//!    compressor that crashed, or that lost its chunk to GC, before its row
//!    pointed at them. The grace keeps a compressor's fresh object safe.
//!    Likewise packs under `packs/` that no pack row names, older than
//!    `orphan-grace` and at least [`PACK_GRACE`] (a writer records its pack
//!    after writing it; with no name to go by, only age protects it).
//!    Likewise staged NARs under `staging/` that no upload or staged file
//!    names, older than `stuck-upload-deadline` (a crashed spool's: a
//!    spooled object may be dated from when its upload began, and no
//!    upload takes longer than that without counting as stuck).
//! 7. **Quota usage**: every cache's counted usage is summed again from its
//!    objects, uploads in flight and staged files, and corrected where it
//!    drifted (`Database::recompute_usage`; each correction is logged).
//!
//! Every step pages through all of its work (`page-size` rows a round
//! trip), deletes from storage with at most `delete-concurrency` requests
//! in flight, and is idempotent: a run killed at any point leaves a state
//! the next run completes. Why GC cannot take what an upload is about to
//! use is written down in `larder_db`'s `gc` module; the short version:
//! in-flight uploads protect their NAR by hash, recorded chunk lists
//! protect their chunks, and recording a list refuses claimed chunks.
//!
//! One actor at a time ([`GcLock`]): on PostgreSQL an advisory lock held on
//! one dedicated connection for the whole run (a replica that cannot take
//! it skips its run and says so; a crashed holder's lock goes with its
//! connection). The reaping pass has a lock of its own, so that it runs
//! beside a long GC run (both reap with conditional, idempotent
//! statements) but not beside another replica's reaping pass. On SQLite the single-machine server is the only process
//! that collects, so there is nothing to lock; `gc-scheduler --once` beside
//! it is still safe, since SQLite runs one writer at a time and every step
//! is a conditional, idempotent statement: two collectors only repeat each
//! other's work.

mod orphans;
mod packs;
mod reap;

pub use packs::{PACK_GRACE, SMALL_PACK_BYTES};

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{Any, Row};
use tokio_util::sync::CancellationToken;

use larder_config::GcConfig;
use larder_db::{Backend, Chunk, ChunkId, Database, DbError, NarId, Timestamp};
use larder_service::integrity::IntegrityError;
use larder_service::metrics::larder;
use larder_service::worker::chunk_object_key;
use larder_storage::pack::is_pack_key;
use larder_storage::{ObjectKey, Storage, StorageError};

/// The PostgreSQL advisory lock key of GC: any fixed number, the same in
/// every replica ("larder-gc" in ASCII).
const GC_LOCK_KEY: i64 = 0x6c61_7264_6572_6763;

/// The advisory lock key of the reaping pass ("larder-rp" in ASCII).
const REAP_LOCK_KEY: i64 = 0x6c61_7264_6572_7270;

/// The advisory lock key of scrubbing ("larder-sc" in ASCII).
const SCRUB_LOCK_KEY: i64 = 0x6c61_7264_6572_7363;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("database")]
    Database(#[from] DbError),
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("a checking thread failed")]
    Task(#[from] tokio::task::JoinError),
}

impl From<IntegrityError> for GcError {
    fn from(error: IntegrityError) -> Self {
        match error {
            IntegrityError::Database(error) => Self::Database(error),
            IntegrityError::Storage(error) => Self::Storage(error),
        }
    }
}

/// What one run did. Every count is of things removed by this run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Objects removed from their caches, their retention having passed
    /// and no pin keeping them.
    pub objects: u64,
    /// Pin revisions dropped, past their pin's `--keep-days`.
    pub pin_revisions: u64,
    /// Build logs and debug-info entries removed from their caches, their
    /// retention having passed since they were uploaded.
    pub logs: u64,
    /// NAR rows deleted.
    pub nars: u64,
    /// Chunks deleted from the database (and, for a chunk in an object of
    /// its own, from storage; a packed chunk's bytes go with its pack).
    pub chunks: u64,
    /// Packs deleted from storage and database: no chunk was left in them.
    pub packs_deleted: u64,
    /// Packs (and per-chunk objects of an older store) whose live chunks
    /// compaction moved into new packs; they are deleted once retired for
    /// `orphan-grace`.
    pub packs_compacted: u64,
    /// Bytes compaction wrote into new packs.
    pub bytes_compacted: u64,
    /// Bytes of storage freed: packs, per-chunk objects and orphans (their
    /// stored size); the staged NARs of reaped uploads and files are not
    /// counted.
    pub bytes_freed: u64,
    /// Names pushers gave NAR files (served for their own cached
    /// narinfos) whose NAR their cache no longer has, deleted.
    pub nar_file_names: u64,
    /// Realisations (content-addressed derivations' outputs) whose output
    /// path their cache no longer has, deleted.
    pub realisations: u64,
    /// Audit-log events older than `audit-retention`, deleted.
    pub audit_events: u64,
    /// Upload rows deleted (finished past the deadline, or stuck).
    pub uploads_reaped: u64,
    /// Staged files (Nix's `PUT nar/…`) no narinfo claimed, deleted.
    pub staged_files_reaped: u64,
    /// Storage objects under `chunks/` or `staging/` that no row named,
    /// deleted.
    pub orphans_removed: u64,
    /// Caches whose counted quota usage had drifted from their rows and
    /// was corrected (0 unless something bypassed the counting).
    pub usage_corrected: u64,
    /// How long the run took.
    pub duration: Duration,
}

impl GcReport {
    /// Adds what the run removed to the process's GC metrics.
    fn record(&self) {
        let metrics = larder();
        for (kind, count) in [
            ("objects", self.objects),
            ("pin_revisions", self.pin_revisions),
            ("logs", self.logs),
            ("nars", self.nars),
            ("chunks", self.chunks),
            ("packs", self.packs_deleted),
            ("uploads", self.uploads_reaped),
            ("staged_files", self.staged_files_reaped),
            ("nar_file_names", self.nar_file_names),
            ("realisations", self.realisations),
            ("audit_events", self.audit_events),
            ("orphans", self.orphans_removed),
        ] {
            metrics.gc_deleted(kind, count);
        }
        metrics.gc_freed_bytes(self.bytes_freed);
        metrics.gc_compacted(self.packs_compacted, self.bytes_compacted);
    }

    fn log(&self) {
        tracing::info!(
            objects = self.objects,
            nars = self.nars,
            chunks = self.chunks,
            packs_deleted = self.packs_deleted,
            packs_compacted = self.packs_compacted,
            bytes_compacted = self.bytes_compacted,
            bytes_freed = self.bytes_freed,
            uploads_reaped = self.uploads_reaped,
            staged_files_reaped = self.staged_files_reaped,
            nar_file_names = self.nar_file_names,
            realisations = self.realisations,
            audit_events = self.audit_events,
            orphans_removed = self.orphans_removed,
            usage_corrected = self.usage_corrected,
            logs = self.logs,
            pin_revisions = self.pin_revisions,
            duration_ms = self.duration.as_millis() as u64,
            "GC run finished"
        );
    }
}

/// How long a pushed NAR file's name or a realisation is kept before GC
/// may find its NAR or path gone: each may be recorded before the pipeline
/// has made the path's object.
const NAR_FILE_NAME_GRACE: Duration = Duration::from_secs(24 * 3600);

/// One full pass; see the module documentation. `now` is the clock every
/// deadline and retention period is measured from.
pub async fn collect_garbage(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let mut report = reap(database, storage, config, now).await?;
    // Before expiry, so that what an aged-out revision kept goes this run.
    report.pin_revisions = database.prune_pin_revisions(now).await?;
    expire_objects(database, config, now, &mut report).await?;
    delete_unreferenced_nars(database, config, &mut report).await?;
    let named_before =
        now.saturating_sub(NAR_FILE_NAME_GRACE.max(config.orphan_grace.as_duration()));
    report.nar_file_names = database.delete_stale_nar_file_names(named_before).await?;
    report.realisations = database.delete_stale_realisations(named_before).await?;
    report.audit_events = database
        .delete_expired_audit_events(now.saturating_sub(config.audit_retention.as_duration()))
        .await?;
    let linked_before = now.saturating_sub(config.orphan_grace.as_duration());
    claim_unreferenced_chunks(database, config, linked_before).await?;
    delete_claimed_chunks(database, storage, config, &mut report).await?;
    packs::delete_empty_packs(database, storage, config, now, &mut report).await?;
    let budget = packs::Budget::Bytes(config.compact_bytes_per_run.bytes());
    packs::compact_packs(database, storage, config, budget, now, &mut report).await?;
    for sweep in [
        orphans::Sweep::Chunks,
        orphans::Sweep::Packs,
        orphans::Sweep::Staging,
    ] {
        orphans::remove_orphans(sweep, database, storage, config, now, &mut report).await?;
    }
    for correction in database.recompute_usage().await? {
        tracing::warn!(
            cache_id = %correction.cache_id,
            recorded_path_bytes = correction.recorded.path_bytes,
            recorded_pending_bytes = correction.recorded.pending_bytes,
            path_bytes = correction.actual.path_bytes,
            pending_bytes = correction.actual.pending_bytes,
            "corrected a cache's counted quota usage"
        );
        report.usage_corrected += 1;
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// The reaping step alone (step 1 of [`collect_garbage`]): uploads and
/// staged files past their deadlines, with their staged NARs. Only the
/// report's `uploads_reaped` and `staged_files_reaped` count.
pub async fn reap(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let mut report = GcReport::default();
    reap::reap_uploads(database, storage, config, now, &mut report).await?;
    reap::reap_staged_files(database, storage, config, now, &mut report).await?;
    report.duration = started.elapsed();
    Ok(report)
}

/// One reaping pass under the reaping lock: `None` when another process
/// was reaping. What it reaped is logged (when anything) and added to the
/// GC metrics' counts of deleted things.
pub async fn reap_locked(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
) -> Result<Option<GcReport>, GcError> {
    let Some(lock) = GcLock::try_acquire_reaping(database).await? else {
        return Ok(None);
    };
    let result = reap(database, storage, config, now).await;
    lock.release().await;
    let report = result?;
    if report.uploads_reaped + report.staged_files_reaped > 0 {
        tracing::info!(
            uploads_reaped = report.uploads_reaped,
            staged_files_reaped = report.staged_files_reaped,
            duration_ms = report.duration.as_millis() as u64,
            "reaping pass finished"
        );
    }
    report.record();
    Ok(Some(report))
}

/// Runs the reaping pass every `config.reap_interval` (the first one
/// interval after the start) until `shutdown`; a failed pass is logged and
/// the next one tries again.
pub async fn run_reap_loop(
    database: Database,
    storage: std::sync::Arc<dyn Storage>,
    config: GcConfig,
    shutdown: CancellationToken,
) {
    repeat_logging_failures(
        config.reap_interval.as_duration(),
        &shutdown,
        "reaping pass",
        || reap_locked(&database, &*storage, &config, Timestamp::now()),
    )
    .await;
}

/// Runs `pass` every `period` (see [`crate::repeat_every`]) until
/// `shutdown`; a pass that fails is logged, naming it `what`, and the next
/// one tries again.
async fn repeat_logging_failures<Pass, Run>(
    period: Duration,
    shutdown: &CancellationToken,
    what: &str,
    pass: Pass,
) where
    Pass: Fn() -> Run,
    Run: std::future::Future<Output = Result<Option<GcReport>, GcError>>,
{
    crate::repeat_every(period, shutdown, || async {
        if let Err(error) = pass().await {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(error)),
                "{what} failed; trying again next period"
            );
        }
    })
    .await;
}

/// Level 1: objects whose cache's retention (or the default) has passed
/// since their last access and that no pin keeps, and build logs and debug-info entries whose
/// retention has passed since their upload. A log's age counts from its
/// upload, not from reads: reads of logs are rare and not recorded, and a
/// path rebuilt and pushed again brings its log again.
async fn expire_objects(
    database: &Database,
    config: &GcConfig,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let default = config.default_retention.map(|period| period.as_duration());
    for cache in database.cache_retentions().await? {
        let Some(retention) = cache.retention_period.or(default) else {
            continue;
        };
        let accessed_before = now.saturating_sub(retention);
        loop {
            let deleted = database
                .delete_expired_objects(cache.cache_id, accessed_before, config.page_size)
                .await?;
            report.objects += deleted;
            if deleted < u64::from(config.page_size) {
                break;
            }
        }
        loop {
            let deleted = database
                .delete_expired_logs(cache.cache_id, accessed_before, config.page_size)
                .await?;
            report.logs += deleted;
            if deleted < u64::from(config.page_size) {
                break;
            }
        }
    }
    Ok(())
}

/// Level 2: NARs nothing holds.
async fn delete_unreferenced_nars(
    database: &Database,
    config: &GcConfig,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let mut after = NarId(0);
    loop {
        let page = database.unreferenced_nars(after, config.page_size).await?;
        let Some(&last) = page.last() else {
            return Ok(());
        };
        report.nars += database.delete_unreferenced_nars(&page).await?.len() as u64;
        after = last;
    }
}

/// Level 3, first half: claims the chunks nothing holds.
async fn claim_unreferenced_chunks(
    database: &Database,
    config: &GcConfig,
    linked_before: Timestamp,
) -> Result<(), GcError> {
    let mut after = ChunkId(0);
    loop {
        let page = database
            .unreferenced_chunks(after, linked_before, config.page_size)
            .await?;
        let Some(&last) = page.last() else {
            return Ok(());
        };
        database
            .claim_unreferenced_chunks(&page, linked_before)
            .await?;
        after = last;
    }
}

/// Level 3, second half: deletes claimed chunks from storage, then their
/// rows, including chunks a crashed run claimed.
async fn delete_claimed_chunks(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let mut after = ChunkId(0);
    loop {
        let page = database.claimed_chunks(after, config.page_size).await?;
        let Some(last) = page.last().map(|chunk| chunk.id) else {
            return Ok(());
        };
        // A packed chunk's bytes go with its pack, once it is empty.
        let unpacked: Vec<&Chunk> = page
            .iter()
            .filter(|chunk| {
                !chunk
                    .location
                    .as_ref()
                    .is_some_and(|location| is_pack_key(&location.object_key))
            })
            .collect();
        let keys: Vec<ObjectKey> = unpacked
            .iter()
            .map(|chunk| claimed_chunk_key(chunk))
            .collect::<Result<_, _>>()?;
        delete_objects(storage, keys, config.delete_concurrency).await?;
        let ids: Vec<ChunkId> = page.iter().map(|chunk| chunk.id).collect();
        report.chunks += database.delete_claimed_chunks(&ids).await?;
        report.bytes_freed += unpacked
            .iter()
            .filter_map(|chunk| chunk.location.as_ref())
            .map(|location| location.length)
            .sum::<u64>();
        after = last;
    }
}

/// Where a claimed chunk's own object is: its recorded location, or, for a
/// chunk claimed while pending, where a compressor of a version before
/// packs would have put it.
fn claimed_chunk_key(chunk: &Chunk) -> Result<ObjectKey, StorageError> {
    match &chunk.location {
        Some(location) => ObjectKey::new(location.object_key.as_str()),
        None => Ok(chunk_object_key(&chunk.chunk_hash, chunk.id)),
    }
}

/// Deletes `keys` from storage, at most `concurrency` at once; stops at
/// the first failure (what was deleted stays deleted, and the next run
/// repeats the rest).
async fn delete_objects(
    storage: &dyn Storage,
    keys: Vec<ObjectKey>,
    concurrency: u32,
) -> Result<(), StorageError> {
    futures::stream::iter(keys)
        .map(|key| async move { storage.delete(&key).await })
        .buffer_unordered(concurrency.max(1) as usize)
        .try_collect::<()>()
        .await
}

/// The right to collect (or to reap): held for one run. On PostgreSQL it
/// owns the connection that holds the advisory lock.
pub struct GcLock {
    connection: Option<PoolConnection<Any>>,
    key: i64,
}

impl GcLock {
    /// Takes the GC lock, or `None` when another process holds it.
    pub async fn try_acquire(database: &Database) -> Result<Option<Self>, GcError> {
        Self::try_acquire_key(database, GC_LOCK_KEY).await
    }

    /// Takes the reaping pass's lock, or `None` when another process holds
    /// it.
    pub async fn try_acquire_reaping(database: &Database) -> Result<Option<Self>, GcError> {
        Self::try_acquire_key(database, REAP_LOCK_KEY).await
    }

    /// Takes the scrub's lock, or `None` when another process holds it.
    pub async fn try_acquire_scrubbing(database: &Database) -> Result<Option<Self>, GcError> {
        Self::try_acquire_key(database, SCRUB_LOCK_KEY).await
    }

    async fn try_acquire_key(database: &Database, key: i64) -> Result<Option<Self>, GcError> {
        if database.backend() == Backend::Sqlite {
            return Ok(Some(Self {
                connection: None,
                key,
            }));
        }
        let query_error = |error: sqlx::Error| {
            GcError::Database(DbError::Query {
                context: "taking GC's advisory lock",
                source: error,
            })
        };
        let mut connection = database.pool().acquire().await.map_err(query_error)?;
        let row = sqlx::query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind(key)
            .fetch_one(&mut *connection)
            .await
            .map_err(query_error)?;
        let locked: bool = row.try_get("locked").map_err(query_error)?;
        Ok(locked.then_some(Self {
            connection: Some(connection),
            key,
        }))
    }

    /// Gives the lock back. Should that fail, the connection is closed
    /// instead of going back to the pool, which releases the lock too.
    pub async fn release(mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .execute(&mut *connection)
            .await;
        if let Err(error) = unlocked {
            tracing::warn!(%error, "could not release GC's advisory lock; closing its connection");
            drop(connection.detach());
        }
    }
}

/// One run under the lock: `None` when another process was collecting.
/// The report is logged and added to the GC metrics.
pub async fn collect_garbage_locked(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
) -> Result<Option<GcReport>, GcError> {
    run_locked(database, collect_garbage(database, storage, config, now)).await
}

/// Compaction alone and to the end, under the GC lock (`gc-scheduler
/// --repack`): the one-chunk objects of a store written before packs, and
/// every sparse or small pack, go into new packs, whatever
/// `compact-bytes-per-run` says. What it retires is deleted by the GC runs
/// after `orphan-grace`. `None` when another process was collecting.
pub async fn repack_locked(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
) -> Result<Option<GcReport>, GcError> {
    let repack = async {
        let started = Instant::now();
        let mut report = GcReport::default();
        let budget = packs::Budget::Unbounded;
        packs::compact_packs(database, storage, config, budget, now, &mut report).await?;
        report.duration = started.elapsed();
        Ok(report)
    };
    run_locked(database, repack).await
}

/// Runs `pass` under the GC lock, then logs its report and adds it to the
/// GC metrics; `None` when another process holds the lock.
async fn run_locked(
    database: &Database,
    pass: impl std::future::Future<Output = Result<GcReport, GcError>>,
) -> Result<Option<GcReport>, GcError> {
    let Some(lock) = GcLock::try_acquire(database).await? else {
        tracing::info!("another gc-scheduler holds the GC lock; skipping this run");
        return Ok(None);
    };
    let started = Instant::now();
    let result = pass.await;
    lock.release().await;
    larder().gc_pass(started.elapsed(), result.is_ok());
    let report = result?;
    report.log();
    report.record();
    Ok(Some(report))
}

/// Runs GC every `config.interval` (the first run one interval after the
/// start) until `shutdown`. A failed run is logged and the next one tries
/// again; a run in progress when `shutdown` fires is abandoned, which is
/// safe at any point.
pub async fn run_gc_loop(
    database: Database,
    storage: std::sync::Arc<dyn Storage>,
    config: GcConfig,
    shutdown: CancellationToken,
) {
    repeat_logging_failures(config.interval.as_duration(), &shutdown, "GC run", || {
        collect_garbage_locked(&database, &*storage, &config, Timestamp::now())
    })
    .await;
}
