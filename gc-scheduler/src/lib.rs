//! Garbage collection on three levels (objects, NARs, chunks) with reaping
//! of stale uploads (module [`gc`]), scrubbing of stored chunks (module
//! [`scrub`]), and the reconciler that re-publishes stuck jobs.
//!
//! The reconciler: queues are not the truth (the embedded
//! queue forgets everything with its process; a broker may lose a message
//! or a worker may die holding one), the `uploads` table is: an upload
//! still in flight (`spooled`, `chunking`, `compressing`) that has not
//! moved for `PipelineConfig::stuck_after` gets its [`ChunkJob`] published
//! again, which the chunker handles from whatever point the upload reached.
//! Each publication is counted ([`Database::record_upload_attempt`], which
//! also restarts the wait); past `max_upload_attempts` the upload ends
//! `failed` with a reason, and can be pushed again.

pub mod gc;
pub mod scrub;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use larder_config::{PipelineConfig, ServerConfig};
use larder_db::{Database, DbError, Timestamp, UploadPhase};
use larder_queue::{publish_job, ChunkJob, Queue, QueueError};
use larder_service::metrics::{larder, FinalPhase};
use larder_service::service::{open_database, open_queue, ServiceError, Services};
use larder_storage::StorageError;

use crate::gc::{GcError, GcReport};
use crate::scrub::ScrubReport;

/// The name this service goes by in logs and broker connections.
const SERVICE: &str = "gc-scheduler";

/// Uploads handled per database round trip.
const PAGE: u32 = 500;

/// The phases of an upload still in the pipeline.
pub(crate) const IN_FLIGHT: [UploadPhase; 3] = [
    UploadPhase::Spooled,
    UploadPhase::Chunking,
    UploadPhase::Compressing,
];

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database")]
    Database(#[from] DbError),
    #[error("job queue")]
    Queue(#[from] QueueError),
}

/// Why the `gc-scheduler` service stopped or a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("reconciling stuck uploads")]
    Reconcile(#[from] ReconcileError),
    #[error("collecting garbage")]
    Gc(#[from] GcError),
}

/// The `gc-scheduler` service: opens the database, storage and queue the
/// config names, serves `/metrics`, `/healthz` and `/readyz` on `listen`,
/// and collects garbage every `gc.interval` (reaping alone every
/// `gc.reap-interval`) until `shutdown`. With a shared
/// queue it also reconciles: one pass at once, then one every
/// `pipeline.reconcile-interval`. An embedded queue belongs to the
/// single-machine server, which reconciles its own uploads.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> Result<(), Error> {
    let services = Services {
        database: open_database(&config).await.map_err(ServiceError::from)?,
        storage: larder_storage::open(&config.storage).await?,
        queue: open_queue(&config.queue, SERVICE)?,
    };
    let ops = services.serve_ops(config.listen, &shutdown).await?;
    let reconciler = async {
        if !config.queue.is_shared() {
            tracing::info!("the queue is embedded: collecting garbage only");
            return;
        }
        tracing::info!(
            every = %config.pipeline.reconcile_interval,
            "reconciling stuck uploads"
        );
        log_pass(
            reconcile(
                &services.database,
                &*services.queue,
                &config.pipeline,
                Timestamp::now(),
            )
            .await,
        );
        run_reconciler(
            services.database.clone(),
            services.queue.clone(),
            config.pipeline.clone(),
            shutdown.clone(),
        )
        .await;
    };
    tracing::info!(
        every = %config.gc.interval,
        reaping_every = %config.gc.reap_interval,
        "collecting garbage"
    );
    let collector = gc::run_gc_loop(
        services.database.clone(),
        services.storage.clone(),
        config.gc.clone(),
        shutdown.clone(),
    );
    let reaper = gc::run_reap_loop(
        services.database.clone(),
        services.storage.clone(),
        config.gc.clone(),
        shutdown.clone(),
    );
    let scrubber = scrub::run_scrub_loop(
        services.database.clone(),
        services.storage.clone(),
        config.gc.clone(),
        shutdown.clone(),
    );
    tokio::join!(reconciler, collector, reaper, scrubber);
    ops.stop().await?;
    Ok(())
}

/// What `gc-scheduler --once` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnceReport {
    /// The reconciling pass; none with an embedded queue.
    pub reconciled: Option<ReconcileReport>,
    /// The GC run; none when another process held the GC lock.
    pub collected: Option<GcReport>,
}

impl std::fmt::Display for OnceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reconciled {
            Some(report) => writeln!(
                f,
                "reconciled: {} uploads published again, {} failed",
                report.republished, report.failed
            )?,
            None => writeln!(f, "reconciled: nothing (the queue is embedded)")?,
        }
        match self.collected {
            Some(report) => write!(
                f,
                "collected: {} objects, {} NARs, {} chunks, {} packs, {} bytes freed, {} packs \
                 compacted into {} bytes, {} uploads and {} staged files reaped, {} orphan \
                 objects removed, {} build logs and debug-info entries, {} pin revisions and {} \
                 audit events expired, in {} ms",
                report.objects,
                report.nars,
                report.chunks,
                report.packs_deleted,
                report.bytes_freed,
                report.packs_compacted,
                report.bytes_compacted,
                report.uploads_reaped,
                report.staged_files_reaped,
                report.orphans_removed,
                report.logs,
                report.pin_revisions,
                report.audit_events,
                report.duration.as_millis()
            ),
            None => write!(
                f,
                "collected: nothing (another gc-scheduler holds the GC lock)"
            ),
        }
    }
}

/// One pass now (`gc-scheduler --once`): a reconciling pass when the queue
/// is shared, then a GC run under the lock.
pub async fn run_once(config: &ServerConfig) -> Result<OnceReport, Error> {
    let database = open_database(config).await.map_err(ServiceError::from)?;
    let storage = larder_storage::open(&config.storage).await?;
    let reconciled = if config.queue.is_shared() {
        let queue = open_queue(&config.queue, SERVICE)?;
        Some(reconcile(&database, &*queue, &config.pipeline, Timestamp::now()).await?)
    } else {
        None
    };
    let collected =
        gc::collect_garbage_locked(&database, &*storage, &config.gc, Timestamp::now()).await;
    database.close().await;
    Ok(OnceReport {
        reconciled,
        collected: collected?,
    })
}

/// One scrub pass now (`gc-scheduler --scrub`), under the scrub lock:
/// `None` when another process was scrubbing.
pub async fn run_scrub(config: &ServerConfig) -> Result<Option<ScrubReport>, Error> {
    let database = open_database(config).await.map_err(ServiceError::from)?;
    let storage = larder_storage::open(&config.storage).await?;
    let scrubbed = scrub::scrub_locked(&database, &*storage, &config.gc).await;
    database.close().await;
    Ok(scrubbed?)
}

/// `gc-scheduler --repack`: every per-chunk object and every sparse or
/// small pack into new packs (see [`gc::repack_locked`]). Returns what it
/// printed.
pub async fn run_repack(config: &ServerConfig) -> Result<String, Error> {
    let database = open_database(config).await.map_err(ServiceError::from)?;
    let storage = larder_storage::open(&config.storage).await?;
    let repacked = gc::repack_locked(&database, &*storage, &config.gc, Timestamp::now()).await;
    database.close().await;
    Ok(match repacked? {
        Some(report) => format!(
            "repacked: {} objects into new packs of {} bytes, in {} ms; the old objects are \
             deleted by GC runs once retired for orphan-grace",
            report.packs_compacted,
            report.bytes_compacted,
            report.duration.as_millis()
        ),
        None => "repacked: nothing (another gc-scheduler holds the GC lock)".to_owned(),
    })
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Uploads whose chunk job was published again.
    pub republished: u32,
    /// Uploads marked failed, out of attempts.
    pub failed: u32,
}

/// One pass: every in-flight upload not updated for `config.stuck_after`
/// before `now` is republished or, out of attempts, failed.
pub async fn reconcile(
    database: &Database,
    queue: &dyn Queue,
    config: &PipelineConfig,
    now: Timestamp,
) -> Result<ReconcileReport, ReconcileError> {
    let updated_before = now.saturating_sub(config.stuck_after.as_duration());
    republish_uploads(database, queue, config, updated_before, now).await
}

/// Republishes every in-flight upload, however recent: what a process
/// whose queue kept nothing across a restart (the embedded queue) runs at
/// startup, before it takes new uploads.
pub async fn republish_in_flight(
    database: &Database,
    queue: &dyn Queue,
    config: &PipelineConfig,
    now: Timestamp,
) -> Result<ReconcileReport, ReconcileError> {
    // Stamping the attempts just past the cut-off takes each upload out of
    // the next page.
    let after_now = now.saturating_add(Duration::from_millis(1));
    republish_uploads(database, queue, config, after_now, after_now).await
}

/// Republishes or fails the in-flight uploads not updated since
/// `updated_before`, stamping them `at` (no earlier than `updated_before`,
/// so that each page moves on).
async fn republish_uploads(
    database: &Database,
    queue: &dyn Queue,
    config: &PipelineConfig,
    updated_before: Timestamp,
    at: Timestamp,
) -> Result<ReconcileReport, ReconcileError> {
    let mut report = ReconcileReport::default();
    loop {
        let page = database
            .stuck_uploads(&IN_FLIGHT, updated_before, PAGE)
            .await?;
        for upload in &page {
            if upload.attempts >= config.max_upload_attempts {
                let reason = format!(
                    "the pipeline did not finish this upload after {} attempts (last in phase \
                     {}); push the path again",
                    upload.attempts + 1,
                    upload.phase
                );
                if database.fail_upload(&upload.id, &reason, at).await? {
                    tracing::warn!(upload = %upload.id, %reason, "upload failed");
                    larder().upload_finished(FinalPhase::Failed, None);
                    report.failed += 1;
                }
                continue;
            }
            // Counted before publishing: a publish that fails is retried
            // a period later, and still counts.
            database.record_upload_attempt(&upload.id, at).await?;
            let job = ChunkJob {
                upload_id: upload.id.to_string(),
                trace_id: upload
                    .trace_id
                    .clone()
                    .unwrap_or_else(|| upload.id.to_string()),
            };
            publish_job(queue, &job).await?;
            tracing::info!(
                upload = %upload.id,
                trace_id = %job.trace_id,
                phase = %upload.phase,
                "chunk job published again"
            );
            report.republished += 1;
        }
        if page.len() < PAGE as usize {
            return Ok(report);
        }
    }
}

/// Runs [`reconcile`] every `config.reconcile_interval` (the first pass
/// one interval after the start: the caller decides what happens at start)
/// until `shutdown`. A failed pass is logged and the next one tries again.
pub async fn run_reconciler(
    database: Database,
    queue: std::sync::Arc<dyn Queue>,
    config: PipelineConfig,
    shutdown: CancellationToken,
) {
    repeat_every(
        config.reconcile_interval.as_duration(),
        &shutdown,
        || async {
            log_pass(reconcile(&database, &*queue, &config, Timestamp::now()).await);
        },
    )
    .await;
}

/// Runs `pass` every `period`, the first time one period after the start,
/// until `shutdown`. A pass in progress when `shutdown` fires is dropped:
/// every pass here is safe to stop at any point. A pass that overruns its
/// period delays the next rather than bunching them.
async fn repeat_every<Pass, Run>(period: Duration, shutdown: &CancellationToken, mut pass: Pass)
where
    Pass: FnMut() -> Run,
    Run: std::future::Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate.
    interval.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = pass() => {}
        }
    }
}

/// Logs what a periodic pass did; a failed pass is tried again next period.
fn log_pass(outcome: Result<ReconcileReport, ReconcileError>) {
    match outcome {
        Ok(report) if report.republished + report.failed > 0 => tracing::info!(
            republished = report.republished,
            failed = report.failed,
            "reconciled stuck uploads"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(
            error = format!("{:#}", anyhow::Error::new(error)),
            "reconciling stuck uploads failed; trying again next period"
        ),
    }
}
