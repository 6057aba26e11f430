//! Larder's metrics: a process-wide registry of counters, gauges and
//! histograms with labels, rendered in Prometheus's text exposition format
//! (version 0.0.4), and every metric Larder records ([`larder`]).
//!
//! Beside the registry, what serves it: the `/metrics`, `/healthz` and `/readyz` routes
//! ([`ops_router`], which `ingest-api` merges into its router or, with
//! `[ops] listen`, serves on a second listener) and [`serve_ops`], which
//! serves them on a listener of their own for the processes without a
//! router (the workers and gc-scheduler).
//!
//! # Cardinality
//!
//! Label values come from small fixed sets: route templates (never raw
//! paths, which hold cache names and hashes), HTTP methods and statuses,
//! queue names, upload phases. Nothing here is labelled by cache, upload or
//! user.
//!
//! # Cost
//!
//! Updating a metric is one or two relaxed atomic operations on a child the
//! caller looked up once (`Family::with` takes a lock; hot paths keep the
//! `Arc` it returns).

mod registry;

mod ops;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

pub use registry::{Counter, Family, Gauge, Histogram, Metric, Registry};

pub use ops::{
    healthz_router, ops_router, serve_ops, Check, Readiness, ReadinessReport, OPS_PATHS,
};

/// The `Content-Type` of a rendered page.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds for request and job durations, in seconds: 1 ms to a
/// minute (a NAR download or a large push can take that long).
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket bounds for the time from an upload's creation to its path being
/// visible, in seconds: from a small path on an idle machine to a large
/// one behind a queue.
pub const PIPELINE_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// The process-wide registry. Every Larder metric is in it (see
/// [`larder`]); a process renders it whole with [`render`].
pub fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);
    &REGISTRY
}

/// Every Larder metric, registered in [`registry`] on first use.
pub fn larder() -> &'static LarderMetrics {
    static METRICS: LazyLock<LarderMetrics> = LazyLock::new(|| LarderMetrics::register(registry()));
    &METRICS
}

/// The process's metrics page: every Larder metric, including those this
/// process never touched (at zero or without children), so that a page
/// always lists the same families.
pub fn render() -> String {
    larder();
    registry().render()
}

/// What a finished upload ended as (label `phase` of
/// `larder_uploads_finished_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalPhase {
    /// Its path became visible.
    Done,
    /// The pipeline gave up on it.
    Failed,
}

impl FinalPhase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

/// A stage of a push, label `stage` of `larder_push_stage_seconds`: where
/// the time of a push goes, so that a slower push shows which stage
/// regressed. Stages of one push overlap (compressors run while the
/// chunker cuts), so their seconds add up to more than the push's wall
/// time; each is the time spent *in* that stage by whoever ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushStage {
    /// The door: reading the body, decoding and verifying it.
    ReceiveVerify,
    /// The door: what writing the verified NAR to staging takes after the
    /// verifier is done (the tail of the write, its sync and rename).
    Spool,
    /// The API: waiting for a recorded upload to become visible.
    Wait,
    /// The workers: reading staged NAR bytes back from storage.
    ReadStaged,
    /// The chunker: FastCDC, chunk hashes and the NAR check over the staged
    /// bytes.
    Chunk,
    /// The compressor: checking and compressing chunks.
    Compress,
    /// The compressor: writing chunk objects to storage.
    Store,
    /// The workers: database statements other than finalisation.
    Database,
    /// The workers: making a NAR valid and its waiting uploads visible.
    Finalise,
}

impl PushStage {
    pub const ALL: [PushStage; 9] = [
        Self::ReceiveVerify,
        Self::Spool,
        Self::Wait,
        Self::ReadStaged,
        Self::Chunk,
        Self::Compress,
        Self::Store,
        Self::Database,
        Self::Finalise,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReceiveVerify => "receive_verify",
            Self::Spool => "spool",
            Self::Wait => "wait",
            Self::ReadStaged => "read_staged",
            Self::Chunk => "chunk",
            Self::Compress => "compress",
            Self::Store => "store",
            Self::Database => "database",
            Self::Finalise => "finalise",
        }
    }
}

/// Every metric Larder records. Names and meanings are listed in the
/// README's "Observability" section; keep the two in step.
#[derive(Debug)]
pub struct LarderMetrics {
    /// `larder_http_requests_total{route,method,status}`.
    pub http_requests: Arc<Family<Counter>>,
    /// `larder_http_request_duration_seconds{route,method}`: from the
    /// request's arrival to the last byte of its response body.
    pub http_request_duration: Arc<Family<Histogram>>,
    /// `larder_http_request_body_bytes_total{route,method}`.
    pub http_request_bytes: Arc<Family<Counter>>,
    /// `larder_http_response_body_bytes_total{route,method}`.
    pub http_response_bytes: Arc<Family<Counter>>,
    /// `larder_http_open_connections`.
    pub http_open_connections: Arc<Gauge>,
    /// `larder_http_timeouts_total{kind}`: `header` (a request head not
    /// sent in time, or an idle keep-alive connection), `body_idle`, and
    /// `shutdown` (a body cut off when the shutdown grace ran out).
    pub http_timeouts: Arc<Family<Counter>>,
    /// `larder_upload_slots_held`: NAR uploads receiving now.
    pub upload_slots_held: Arc<Gauge>,
    /// `larder_upload_slots_waiting`: Nix uploads waiting for a slot now.
    pub upload_slots_waiting: Arc<Gauge>,
    jobs_done: Arc<Family<Counter>>,
    jobs_failed: Arc<Family<Counter>>,
    jobs_retried: Arc<Family<Counter>>,
    jobs_dead_lettered: Arc<Family<Counter>>,
    job_duration: Arc<Family<Histogram>>,
    chunks_stored: Arc<Counter>,
    chunk_bytes_stored: Arc<Counter>,
    chunk_compressed_bytes_stored: Arc<Counter>,
    chunks_deduplicated: Arc<Counter>,
    chunk_bytes_deduplicated: Arc<Counter>,
    upload_visible_latency: Arc<Histogram>,
    uploads_finished: Arc<Family<Counter>>,
    queue_depth: Arc<Family<Gauge>>,
    gc_passes: Arc<Family<Counter>>,
    gc_duration: Arc<Histogram>,
    gc_deleted: Arc<Family<Counter>>,
    gc_freed_bytes: Arc<Counter>,
    damaged_chunks: Arc<Family<Counter>>,
    withdrawn_nars: Arc<Counter>,
    scrub_passes: Arc<Family<Counter>>,
    scrub_chunks_checked: Arc<Counter>,
    scrub_bytes_read: Arc<Counter>,
    scrub_chunks_unreadable: Arc<Counter>,
    gc_packs_compacted: Arc<Counter>,
    gc_compacted_bytes: Arc<Counter>,
    /// One child per [`PushStage`], in the order of [`PushStage::ALL`].
    push_stages: Vec<Arc<Histogram>>,
}

impl LarderMetrics {
    fn register(registry: &Registry) -> Self {
        let queue = &["queue"];
        Self {
            http_requests: registry.counter(
                "larder_http_requests_total",
                "HTTP requests answered, by route template, method and status.",
                &["route", "method", "status"],
            ),
            http_request_duration: registry.histogram(
                "larder_http_request_duration_seconds",
                "Time from a request's arrival to the last byte of its response body.",
                &["route", "method"],
                DURATION_BUCKETS,
            ),
            http_request_bytes: registry.counter(
                "larder_http_request_body_bytes_total",
                "Bytes of request bodies read.",
                &["route", "method"],
            ),
            http_response_bytes: registry.counter(
                "larder_http_response_body_bytes_total",
                "Bytes of response bodies sent.",
                &["route", "method"],
            ),
            http_open_connections: registry
                .gauge(
                    "larder_http_open_connections",
                    "HTTP connections open now.",
                    &[],
                )
                .with(&[]),
            http_timeouts: registry.counter(
                "larder_http_timeouts_total",
                "Connections and request bodies ended by a timeout, by kind (header, body_idle, \
                 shutdown).",
                &["kind"],
            ),
            upload_slots_held: registry
                .gauge(
                    "larder_upload_slots_held",
                    "NAR uploads receiving now, each holding an upload slot.",
                    &[],
                )
                .with(&[]),
            upload_slots_waiting: registry
                .gauge(
                    "larder_upload_slots_waiting",
                    "NAR uploads from Nix waiting for an upload slot now.",
                    &[],
                )
                .with(&[]),
            jobs_done: registry.counter(
                "larder_jobs_done_total",
                "Pipeline jobs that succeeded and were acknowledged.",
                queue,
            ),
            jobs_failed: registry.counter(
                "larder_jobs_failed_total",
                "Pipeline job attempts that failed (each is then retried or dead-lettered).",
                queue,
            ),
            jobs_retried: registry.counter(
                "larder_jobs_retried_total",
                "Pipeline jobs handed back to their queue for a later attempt.",
                queue,
            ),
            jobs_dead_lettered: registry.counter(
                "larder_jobs_dead_lettered_total",
                "Pipeline jobs given up and moved to their dead-letter queue.",
                queue,
            ),
            job_duration: registry.histogram(
                "larder_job_duration_seconds",
                "Time a worker spent on one job attempt.",
                queue,
                DURATION_BUCKETS,
            ),
            chunks_stored: registry
                .counter(
                    "larder_chunks_stored_total",
                    "Chunks compressed and written to storage.",
                    &[],
                )
                .with(&[]),
            chunk_bytes_stored: registry
                .counter(
                    "larder_chunk_bytes_stored_total",
                    "Uncompressed bytes of the chunks written to storage.",
                    &[],
                )
                .with(&[]),
            chunk_compressed_bytes_stored: registry
                .counter(
                    "larder_chunk_compressed_bytes_stored_total",
                    "Compressed bytes written to storage for chunks.",
                    &[],
                )
                .with(&[]),
            chunks_deduplicated: registry
                .counter(
                    "larder_chunks_deduplicated_total",
                    "Chunks of pushed NARs that were stored already and not written again.",
                    &[],
                )
                .with(&[]),
            chunk_bytes_deduplicated: registry
                .counter(
                    "larder_chunk_bytes_deduplicated_total",
                    "Uncompressed bytes of the deduplicated chunks.",
                    &[],
                )
                .with(&[]),
            upload_visible_latency: registry
                .histogram(
                    "larder_upload_visible_seconds",
                    "Time from an upload's creation (its NAR spooled) to its path being visible.",
                    &[],
                    PIPELINE_BUCKETS,
                )
                .with(&[]),
            uploads_finished: registry.counter(
                "larder_uploads_finished_total",
                "Uploads that reached a final phase, by phase (done or failed).",
                &["phase"],
            ),
            queue_depth: registry.gauge(
                "larder_queue_depth",
                "Messages waiting in a queue, read when the page is rendered.",
                queue,
            ),
            gc_passes: registry.counter(
                "larder_gc_passes_total",
                "Garbage-collection passes, by outcome (ok or error).",
                &["outcome"],
            ),
            gc_duration: registry
                .histogram(
                    "larder_gc_pass_duration_seconds",
                    "Time one garbage-collection pass took.",
                    &[],
                    PIPELINE_BUCKETS,
                )
                .with(&[]),
            gc_deleted: registry.counter(
                "larder_gc_deleted_total",
                "What garbage collection deleted, by kind (objects, nars, chunks, uploads, \
                 staged_files...).",
                &["kind"],
            ),
            gc_freed_bytes: registry
                .counter(
                    "larder_gc_freed_bytes_total",
                    "Bytes of storage garbage collection freed.",
                    &[],
                )
                .with(&[]),
            damaged_chunks: registry.counter(
                "larder_damaged_chunks_total",
                "Chunks found missing or corrupt in storage and withdrawn, by what found them \
                 (scrub or read).",
                &["found_by"],
            ),
            withdrawn_nars: registry
                .counter(
                    "larder_withdrawn_nars_total",
                    "NARs withdrawn (no longer served) because a chunk of theirs was damaged.",
                    &[],
                )
                .with(&[]),
            scrub_passes: registry.counter(
                "larder_scrub_passes_total",
                "Scrub passes, by outcome (ok or error).",
                &["outcome"],
            ),
            scrub_chunks_checked: registry
                .counter(
                    "larder_scrub_chunks_checked_total",
                    "Chunks a scrub read, decompressed and checked against their hash.",
                    &[],
                )
                .with(&[]),
            scrub_bytes_read: registry
                .counter(
                    "larder_scrub_bytes_read_total",
                    "Stored (compressed) bytes a scrub read.",
                    &[],
                )
                .with(&[]),
            scrub_chunks_unreadable: registry
                .counter(
                    "larder_scrub_chunks_unreadable_total",
                    "Chunks a scrub could not check because storage failed to answer (not \
                     counted as damage; the next pass tries again).",
                    &[],
                )
                .with(&[]),
            gc_packs_compacted: registry
                .counter(
                    "larder_gc_packs_compacted_total",
                    "Packs (and per-chunk objects of an older store) whose live chunks \
                     garbage collection moved into new packs.",
                    &[],
                )
                .with(&[]),
            gc_compacted_bytes: registry
                .counter(
                    "larder_gc_compacted_bytes_total",
                    "Bytes garbage collection wrote into new packs while compacting.",
                    &[],
                )
                .with(&[]),
            push_stages: {
                let family = registry.histogram(
                    "larder_push_stage_seconds",
                    "Time spent in one stage of pushing (receive_verify, spool, wait, \
                     read_staged, chunk, compress, store, database, finalise).",
                    &["stage"],
                    DURATION_BUCKETS,
                );
                PushStage::ALL
                    .iter()
                    .map(|stage| family.with(&[stage.as_str()]))
                    .collect()
            },
        }
    }

    /// `elapsed` spent in `stage` of a push.
    pub fn push_stage(&self, stage: PushStage, elapsed: Duration) {
        // ALL lists every variant in declaration order.
        self.push_stages[stage as usize].observe(elapsed.as_secs_f64());
    }

    /// Runs `work`, counting the time until it completes as `stage`.
    pub async fn timed<T>(
        &self,
        stage: PushStage,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let started = std::time::Instant::now();
        let output = work.await;
        self.push_stage(stage, started.elapsed());
        output
    }

    /// The job counters of one queue, looked up once for a consume loop.
    pub fn jobs(&self, queue: &str) -> JobMetrics {
        JobMetrics {
            done: self.jobs_done.with(&[queue]),
            failed: self.jobs_failed.with(&[queue]),
            retried: self.jobs_retried.with(&[queue]),
            dead_lettered: self.jobs_dead_lettered.with(&[queue]),
            duration: self.job_duration.with(&[queue]),
        }
    }

    /// A chunk written to storage: `size` bytes, `compressed` once compressed.
    pub fn chunk_stored(&self, size: u64, compressed: u64) {
        self.chunks_stored.inc();
        self.chunk_bytes_stored.inc_by(size);
        self.chunk_compressed_bytes_stored.inc_by(compressed);
    }

    /// `chunks` chunks of `bytes` uncompressed bytes in all that a push
    /// needed and storage already had.
    pub fn chunks_deduplicated(&self, chunks: u64, bytes: u64) {
        self.chunks_deduplicated.inc_by(chunks);
        self.chunk_bytes_deduplicated.inc_by(bytes);
    }

    /// An upload reached `phase`; `latency` is the time since its creation
    /// for a path that became visible.
    pub fn upload_finished(&self, phase: FinalPhase, latency: Option<Duration>) {
        self.uploads_finished.with(&[phase.as_str()]).inc();
        if let Some(latency) = latency {
            self.upload_visible_latency.observe(latency.as_secs_f64());
        }
    }

    /// Sets the depth of `queue`, as read when a page is rendered.
    pub fn set_queue_depth(&self, queue: &str, depth: u64) {
        self.queue_depth
            .with(&[queue])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// A garbage-collection pass ended after `duration`; `succeeded` is
    /// false when it stopped on an error. Record what it deleted with
    /// [`gc_deleted`](Self::gc_deleted) and
    /// [`gc_freed_bytes`](Self::gc_freed_bytes).
    pub fn gc_pass(&self, duration: Duration, succeeded: bool) {
        let outcome = if succeeded { "ok" } else { "error" };
        self.gc_passes.with(&[outcome]).inc();
        self.gc_duration.observe(duration.as_secs_f64());
    }

    /// Garbage collection deleted `count` items of `kind` (`objects`, `nars`,
    /// `chunks`, `uploads`, `staged_files`, or another short, fixed word).
    pub fn gc_deleted(&self, kind: &'static str, count: u64) {
        self.gc_deleted.with(&[kind]).inc_by(count);
    }

    /// Garbage collection freed `bytes` bytes of storage.
    pub fn gc_freed_bytes(&self, bytes: u64) {
        self.gc_freed_bytes.inc_by(bytes);
    }

    /// `chunks` chunks found damaged by `found_by` (`scrub` or `read`)
    /// were withdrawn, and with them `nars` NARs.
    pub fn damage_withdrawn(&self, found_by: &'static str, chunks: u64, nars: u64) {
        self.damaged_chunks.with(&[found_by]).inc_by(chunks);
        self.withdrawn_nars.inc_by(nars);
    }

    /// A scrub pass ended; `succeeded` is false when it stopped on an
    /// error.
    pub fn scrub_pass(&self, succeeded: bool) {
        let outcome = if succeeded { "ok" } else { "error" };
        self.scrub_passes.with(&[outcome]).inc();
    }

    /// A scrub read `bytes` stored bytes and checked `chunks` chunks in
    /// them; `unreadable` more could not be read.
    pub fn scrub_progress(&self, chunks: u64, bytes: u64, unreadable: u64) {
        self.scrub_chunks_checked.inc_by(chunks);
        self.scrub_bytes_read.inc_by(bytes);
        self.scrub_chunks_unreadable.inc_by(unreadable);
    }

    /// Garbage collection compacted `packs` packs into new ones of `bytes`
    /// bytes in all.
    pub fn gc_compacted(&self, packs: u64, bytes: u64) {
        self.gc_packs_compacted.inc_by(packs);
        self.gc_compacted_bytes.inc_by(bytes);
    }
}

/// One queue's job counters, resolved once per consume loop.
#[derive(Debug, Clone)]
pub struct JobMetrics {
    pub done: Arc<Counter>,
    pub failed: Arc<Counter>,
    pub retried: Arc<Counter>,
    pub dead_lettered: Arc<Counter>,
    pub duration: Arc<Histogram>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_larder_metric_shows_on_a_fresh_page() {
        let page = render();
        for name in [
            "larder_http_requests_total",
            "larder_http_request_duration_seconds",
            "larder_http_request_body_bytes_total",
            "larder_http_response_body_bytes_total",
            "larder_http_open_connections",
            "larder_http_timeouts_total",
            "larder_upload_slots_held",
            "larder_upload_slots_waiting",
            "larder_jobs_done_total",
            "larder_jobs_failed_total",
            "larder_jobs_retried_total",
            "larder_jobs_dead_lettered_total",
            "larder_job_duration_seconds",
            "larder_chunks_stored_total",
            "larder_chunk_bytes_stored_total",
            "larder_chunk_compressed_bytes_stored_total",
            "larder_chunks_deduplicated_total",
            "larder_chunk_bytes_deduplicated_total",
            "larder_upload_visible_seconds",
            "larder_uploads_finished_total",
            "larder_queue_depth",
            "larder_gc_passes_total",
            "larder_gc_pass_duration_seconds",
            "larder_gc_deleted_total",
            "larder_gc_freed_bytes_total",
            "larder_damaged_chunks_total",
            "larder_withdrawn_nars_total",
            "larder_scrub_passes_total",
            "larder_scrub_chunks_checked_total",
            "larder_scrub_bytes_read_total",
            "larder_scrub_chunks_unreadable_total",
            "larder_push_stage_seconds",
        ] {
            assert!(page.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
    }

    #[test]
    fn recording_helpers_move_their_metrics() {
        let metrics = larder();
        let before = metrics.chunk_bytes_deduplicated.get();
        metrics.chunks_deduplicated(3, 300);
        assert_eq!(metrics.chunk_bytes_deduplicated.get(), before + 300);
        metrics.upload_finished(FinalPhase::Done, Some(Duration::from_millis(1500)));
        assert!(render().contains("larder_uploads_finished_total{phase=\"done\"}"));
        metrics.gc_deleted("chunks", 5);
        assert!(render().contains("larder_gc_deleted_total{kind=\"chunks\"} 5"));
    }

    #[test]
    fn each_push_stage_has_its_own_child() {
        for stage in PushStage::ALL {
            let child = &larder().push_stages[stage as usize];
            let before = child.sum();
            larder().push_stage(stage, Duration::from_millis(250));
            assert!(
                (child.sum() - before - 0.25).abs() < 1e-9,
                "{}",
                stage.as_str()
            );
            let line = format!(
                "larder_push_stage_seconds_count{{stage=\"{}\"}}",
                stage.as_str()
            );
            assert!(render().contains(&line), "{line} missing");
        }
    }
}
