//! Garbage collection on three levels (objects, NARs, chunks), reaping of
//! stale uploads, and the reconciler that re-publishes stuck jobs.
//!
//! Built so far: the reconciler. Queues are not the truth (the embedded
//! queue forgets everything with its process; a broker may lose a message
//! or a worker may die holding one), the `uploads` table is: an upload
//! still in flight (`spooled`, `chunking`, `compressing`) that has not
//! moved for `PipelineConfig::stuck_after` gets its [`ChunkJob`] published
//! again, which the chunker handles from whatever point the upload reached.
//! Each publication is counted ([`Database::record_upload_attempt`], which
//! also restarts the wait); past `max_upload_attempts` the upload ends
//! `failed` with a reason, and can be pushed again. GC and the reaper come
//! with issue #7.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use common::config::PipelineConfig;
use common::db::{Database, DbError, Timestamp, UploadPhase};
use common::metrics::{larder, FinalPhase};
use common::queue::{publish_job, ChunkJob, Queue, QueueError};

/// Uploads handled per database round trip.
const PAGE: u32 = 500;

/// The phases of an upload still in the pipeline.
const IN_FLIGHT: [UploadPhase; 3] = [
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

/// Runs [`reconcile`] every `config.reconcile_interval` until `shutdown`.
/// A failed pass is logged and the next one tries again.
pub async fn run_reconciler(
    database: Database,
    queue: std::sync::Arc<dyn Queue>,
    config: PipelineConfig,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(config.reconcile_interval.as_duration());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the caller decides what happens at start.
    interval.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        if let Err(error) = reconcile(&database, &*queue, &config, Timestamp::now()).await {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(error)),
                "reconciling stuck uploads failed; trying again next period"
            );
        }
    }
}
