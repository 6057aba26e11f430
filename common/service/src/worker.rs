//! What the pipeline's workers (`chunker-worker`, `compressor-worker`)
//! share: the failure policy that settles every delivery, the loop that
//! consumes a queue with bounded concurrency, where a chunk is stored, and
//! how a complete NAR is finalised.
//!
//! # Failure policy
//!
//! A handler returns a [`JobError`]. A passing failure (the database,
//! storage or the queue unreachable or busy) is retried with
//! [`Delivery::retry`] after a delay that doubles from [`FIRST_RETRY_DELAY`]
//! up to [`MAX_RETRY_DELAY`], until the delivery's attempt reaches
//! `PipelineConfig::job_attempts`. A failure that cannot pass (the staged
//! NAR is gone or does not match its upload, a row is corrupt), or a passing
//! one out of attempts, marks every upload the job concerns `failed` with
//! the reason, and only then moves the message to the dead-letter queue:
//! the database is the truth, the dead-letter queue is for inspection. A
//! delivery is acked only after the handler's last database commit.
//!
//! # Metrics
//!
//! The consume loop counts each queue's jobs done, failed, retried and
//! dead-lettered and times each attempt; [`finalise_nar`] and the failure
//! policy count uploads reaching `done` (with the time since their
//! creation) or `failed` (see [`crate::metrics`]).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::{larder, FinalPhase, JobMetrics};
use larder_db::{ChunkId, Database, DbError, NarId, Timestamp, Upload, UploadId};
use larder_nix::Sha256Hash;
use larder_queue::{Delivery, Job, Queue, QueueError};
use larder_storage::{ObjectKey, Storage, StorageError};

/// The wait before the second delivery of a job that failed for a passing
/// reason; it doubles with each attempt.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between two deliveries of a failing job.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// How long a stopping worker lets its in-flight jobs finish before it
/// drops them (their deliveries then go back to the queue).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("database")]
    Database(#[from] DbError),
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("job queue")]
    Queue(#[from] QueueError),
    /// A state that passes by itself (GC is deleting the NAR the upload
    /// needs); try again later.
    #[error("{0}")]
    NotYet(String),
    /// Trying again cannot help; the text is shown to the user as the
    /// upload's failure reason.
    #[error("{0}")]
    Permanent(String),
}

impl JobError {
    /// Whether trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Permanent(_) => true,
            Self::NotYet(_) => false,
            Self::Database(error) => matches!(
                error,
                DbError::Corrupt { .. } | DbError::InvalidInput { .. }
            ),
            Self::Storage(error) => matches!(error, StorageError::InvalidKey { .. }),
            Self::Queue(error) => !error.is_retryable(),
        }
    }

    /// The error and its causes on one line, for logs and failure reasons.
    pub fn reason(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// The wait before delivery `attempt + 1` of a job whose delivery
/// `attempt` (1 for the first) failed for a passing reason.
pub fn retry_delay(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    FIRST_RETRY_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// One kind of job and what to do with it.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    type Job: Job + fmt::Debug + Send + Sync + 'static;

    /// Does the job; idempotent, since delivery is at least once.
    async fn handle(&self, job: &Self::Job) -> Result<(), JobError>;

    /// The uploads to mark failed when the job is given up.
    async fn uploads_concerned(&self, job: &Self::Job) -> Result<Vec<UploadId>, DbError>;

    fn database(&self) -> &Database;
}

/// Consumes `H::Job::QUEUE` until `shutdown`, running up to `concurrency`
/// jobs at once (none when it is 0: the jobs are left to other processes) (the consumer's prefetch, so no delivery waits in this
/// process while another worker could take it), and settles each by the
/// failure policy. On shutdown it stops taking jobs and gives running ones
/// [`SHUTDOWN_GRACE`] to finish; jobs still running are dropped, and their
/// unsettled deliveries go back to the queue.
pub async fn consume<H: JobHandler>(
    queue: Arc<dyn Queue>,
    handler: Arc<H>,
    concurrency: u32,
    job_attempts: u32,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    if concurrency == 0 {
        // This process runs none of these jobs: another process takes them.
        return Ok(());
    }
    let prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX);
    let mut consumer = queue.consume(H::Job::QUEUE, prefetch).await?;
    tracing::info!(queue = H::Job::QUEUE, concurrency, "taking jobs");
    let metrics = larder().jobs(H::Job::QUEUE);
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(finished) = running.join_next(), if !running.is_empty() => {
                log_panic(finished);
            }
            delivery = consumer.next() => {
                let Some(delivery) = delivery else { break };
                let span = tracing::info_span!(
                    "job",
                    queue = H::Job::QUEUE,
                    trace_id = %delivery.trace_id(),
                    attempt = delivery.attempt(),
                );
                let handler = handler.clone();
                let metrics = metrics.clone();
                running.spawn(
                    async move { process(&*handler, delivery, job_attempts, &metrics).await }
                        .instrument(span),
                );
            }
        }
    }
    drop(consumer);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(finished) = running.join_next().await {
            log_panic(finished);
        }
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            queue = H::Job::QUEUE,
            jobs = running.len(),
            "stopping with jobs still running; they will be delivered again"
        );
    }
    Ok(())
}

fn log_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished {
        if error.is_panic() {
            tracing::error!(%error, "a job handler panicked; its delivery goes back to the queue");
        }
    }
}

/// Handles one delivery, settles it by the failure policy and counts the
/// outcome.
async fn process<H: JobHandler>(
    handler: &H,
    delivery: Delivery,
    job_attempts: u32,
    metrics: &JobMetrics,
) {
    let job: H::Job = match delivery.decode() {
        Ok(job) => job,
        Err(error) => {
            let reason = format!("not a valid job for queue {}: {error}", H::Job::QUEUE);
            tracing::error!(%reason, "dead-lettering a malformed message");
            metrics.failed.inc();
            metrics.dead_lettered.inc();
            settled(delivery.dead_letter(&reason).await);
            return;
        }
    };
    let started = Instant::now();
    let handled = handler.handle(&job).await;
    metrics.duration.observe(started.elapsed().as_secs_f64());
    let error = match handled {
        Ok(()) => {
            metrics.done.inc();
            settled(delivery.ack().await);
            return;
        }
        Err(error) => error,
    };
    metrics.failed.inc();
    let attempt = delivery.attempt();
    if !error.is_permanent() && attempt < job_attempts {
        let delay = retry_delay(attempt);
        tracing::warn!(
            error = error.reason(),
            retry_in = ?delay,
            "job failed; trying again later"
        );
        metrics.retried.inc();
        settled(delivery.retry(delay).await);
        return;
    }
    let reason = if error.is_permanent() {
        error.reason()
    } else {
        format!("gave up after {attempt} attempts: {}", error.reason())
    };
    tracing::error!(%reason, ?job, "job failed for good");
    if let Err(error) = fail_uploads(handler, &job, &reason).await {
        // The failure is not recorded yet: keep the job alive, so that a
        // later delivery records it.
        tracing::warn!(
            error = JobError::from(error).reason(),
            "could not mark the job's uploads failed; trying again later"
        );
        metrics.retried.inc();
        settled(delivery.retry(retry_delay(attempt)).await);
        return;
    }
    metrics.dead_lettered.inc();
    settled(delivery.dead_letter(&reason).await);
}

async fn fail_uploads<H: JobHandler>(
    handler: &H,
    job: &H::Job,
    reason: &str,
) -> Result<(), DbError> {
    for upload in handler.uploads_concerned(job).await? {
        let failed_now = handler
            .database()
            .fail_upload(&upload, reason, Timestamp::now())
            .await?;
        if failed_now {
            larder().upload_finished(FinalPhase::Failed, None);
        }
    }
    Ok(())
}

/// Logs a settlement that failed: the queue then redelivers the message
/// itself (a lost connection), so there is nothing more to do.
fn settled(result: Result<(), QueueError>) {
    if let Err(error) = result {
        tracing::warn!(%error, "could not settle a delivery; it will be delivered again");
    }
}

/// Where a compressor of a version before packs stored a chunk's zstd
/// frame, as an object of its own: by content and row id. GC still deletes
/// such objects of a chunk claimed while pending, and its orphan sweep
/// reads these names (and those of small NARs' chunks, `…-u<upload
/// id>.zst`).
pub fn chunk_object_key(chunk_hash: &Sha256Hash, chunk_id: ChunkId) -> ObjectKey {
    let hex = chunk_hash.to_hex();
    ObjectKey::new(format!("chunks/{}/{hex}-{chunk_id}.zst", &hex[..2]))
        .expect("hex digits and a decimal id make a valid key")
}

/// The staged NAR's key, as an upload row or a job names it.
pub fn staged_object_key(staged_key: &str) -> Result<ObjectKey, JobError> {
    ObjectKey::new(staged_key)
        .map_err(|error| JobError::Permanent(format!("invalid staged NAR key: {error}")))
}

/// Marks the NAR valid if every chunk is stored; if it is (now or already),
/// makes every in-flight upload of it visible and deletes their staged
/// NARs. Returns whether the NAR is valid. Safe to call from any number of
/// workers at once: each step is idempotent.
pub async fn finalise_nar(
    database: &Database,
    storage: &dyn Storage,
    nar_id: NarId,
) -> Result<bool, JobError> {
    if !database.mark_nar_valid_if_complete(nar_id).await? {
        return Ok(false);
    }
    for upload in database.uploads_waiting_on_nar(nar_id).await? {
        let now = Timestamp::now();
        match database.finalise_upload(&upload.id, now).await {
            // Two workers finalising the same NAR at once may both count
            // an upload; metrics tolerate that, the database does not.
            Ok(_) => upload_made_visible(storage, &upload, now).await?,
            // Failed meanwhile (the reconciler gave up on it): it stays so.
            Err(error) if error.is_conflict() => {
                tracing::warn!(upload = %upload.id, %error, "not finalising an upload");
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(true)
}

/// What follows the commit that made `upload`'s path visible at
/// `finished`: it counts as done, and its staged NAR is deleted (a crash
/// in between leaves a staged file of a done upload, which the reaper
/// removes).
pub async fn upload_made_visible(
    storage: &dyn Storage,
    upload: &Upload,
    finished: Timestamp,
) -> Result<(), JobError> {
    larder().upload_finished(
        FinalPhase::Done,
        Some(upload_latency(upload.created_at, finished)),
    );
    storage
        .delete(&staged_object_key(&upload.staged_key)?)
        .await?;
    tracing::info!(
        upload = %upload.id,
        trace_id = upload.trace_id.as_deref().unwrap_or(""),
        "upload visible"
    );
    Ok(())
}

/// The time from `created` to `finished`; zero if the clocks of the
/// machines that stamped them disagree the wrong way.
fn upload_latency(created: Timestamp, finished: Timestamp) -> Duration {
    let millis = finished.unix_millis().saturating_sub(created.unix_millis());
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(4), Duration::from_secs(8));
        assert_eq!(retry_delay(7), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }

    #[test]
    fn chunk_keys_carry_content_and_row() {
        let hash = Sha256Hash::digest(b"chunk");
        let hex = hash.to_hex();
        let key = chunk_object_key(&hash, ChunkId(42));
        assert_eq!(key.as_str(), format!("chunks/{}/{hex}-42.zst", &hex[..2]));
        assert_ne!(key, chunk_object_key(&hash, ChunkId(43)));
    }

    #[test]
    fn permanence_follows_the_kind_of_failure() {
        assert!(JobError::Permanent("gone".into()).is_permanent());
        assert!(!JobError::Database(DbError::NotFound { what: "x".into() }).is_permanent());
        assert!(JobError::Database(DbError::Corrupt {
            column: "c",
            reason: "r".into()
        })
        .is_permanent());
        let reason = JobError::Database(DbError::NotFound {
            what: "upload u".into(),
        })
        .reason();
        assert_eq!(reason, "database: upload u not found");
    }
}
