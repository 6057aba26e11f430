//! The ingest pipeline inside the server, for the single-machine mode: the
//! chunker and compressor consume the server's queue (embedded, or a
//! broker when one is configured), the reconciler republishes stuck
//! uploads, and GC runs every `gc.interval`, its reaping step alone every
//! `gc.reap-interval` (on SQLite this process is the only collector; on
//! PostgreSQL advisory locks keep it from overlapping a `gc-scheduler`).
//!
//! The embedded queue keeps nothing across a restart, so at start every
//! upload still in flight gets its chunk job again: that is how a killed
//! server resumes its work (a broker keeps the jobs itself). On stop the workers take no new jobs and let
//! running ones finish for a grace period; a job dropped unsettled is
//! redone after the next start.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use larder_config::{GcConfig, PipelineConfig};
use larder_db::{Database, Timestamp};
use larder_queue::{Queue, QueueError};
use larder_service::service::Services;

use crate::state::AppState;

/// The running in-process workers.
pub(crate) struct InProcessPipeline {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl InProcessPipeline {
    /// Starts the workers, the reconciler, GC and the reaping pass on the
    /// server's database, storage and queue; `resume_in_flight` first
    /// republishes every upload in flight (for a queue that kept nothing).
    pub(crate) fn start(
        state: &AppState,
        config: &PipelineConfig,
        resume_in_flight: bool,
        gc: &GcConfig,
    ) -> Self {
        let stop = CancellationToken::new();
        let services = Services {
            database: state.database.clone(),
            storage: state.storage.clone(),
            queue: state.queue.clone(),
        };
        let chunker = spawn_worker(
            "chunker",
            chunker_worker::run_with(services.clone(), config.clone(), stop.clone()),
        );
        let compressor = spawn_worker(
            "compressor",
            compressor_worker::run_with(services, config.clone(), stop.clone()),
        );
        let reconciler = tokio::spawn({
            let (database, queue, config, stop) = (
                state.database.clone(),
                state.queue.clone(),
                config.clone(),
                stop.clone(),
            );
            async move {
                if resume_in_flight {
                    resume(&database, &*queue, &config).await;
                }
                gc_scheduler::run_reconciler(database, queue, config, stop).await;
            }
        });
        let collector = tokio::spawn(gc_scheduler::gc::run_gc_loop(
            state.database.clone(),
            state.storage.clone(),
            gc.clone(),
            stop.clone(),
        ));
        let reaper = tokio::spawn(gc_scheduler::gc::run_reap_loop(
            state.database.clone(),
            state.storage.clone(),
            gc.clone(),
            stop.clone(),
        ));
        let scrubber = tokio::spawn(gc_scheduler::scrub::run_scrub_loop(
            state.database.clone(),
            state.storage.clone(),
            gc.clone(),
            stop.clone(),
        ));
        Self {
            stop,
            tasks: vec![chunker, compressor, reconciler, collector, reaper, scrubber],
        }
    }

    /// Stops taking jobs and waits for the workers to wind down.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Runs a worker's consume loop in the background; it returns early only on
/// an error, which is logged.
fn spawn_worker(
    name: &'static str,
    work: impl std::future::Future<Output = Result<(), QueueError>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = work.await {
            tracing::error!(%error, "the {name} stopped");
        }
    })
}

/// Republishes every upload left in flight by the previous run.
async fn resume(database: &Database, queue: &dyn Queue, config: &PipelineConfig) {
    match gc_scheduler::republish_in_flight(database, queue, config, Timestamp::now()).await {
        Ok(report) if report.republished + report.failed > 0 => tracing::info!(
            republished = report.republished,
            failed = report.failed,
            "resumed the uploads left in flight"
        ),
        Ok(_) => {}
        // The periodic pass picks them up once they count as stuck.
        Err(error) => tracing::warn!(
            error = format!("{:#}", anyhow::Error::new(error)),
            "could not resume the uploads left in flight"
        ),
    }
}
