//! Larder's metrics: every metric Larder records ([`larder`]), held in one
//! process-wide `prometheus-client` registry, and the page `/metrics`
//! serves ([`render`]): Prometheus's text exposition format, version 0.0.4,
//! written by prometheus-client's `prometheus_text` encoder.
//!
//! Beside the registry, what serves it: the `/metrics`, `/healthz` and
//! `/readyz` routes ([`ops_router`], which `ingest-api` merges into its
//! router or, with `[ops] listen`, serves on a second listener) and
//! [`serve_ops`], which serves them on a listener of their own for the
//! processes without a router (the workers and gc-scheduler).
//!
//! # Names
//!
//! prometheus-client adds `_total` to a counter's name when it writes the
//! page, so counters are registered without it: `larder_chunks_stored` is
//! served as `larder_chunks_stored_total`, the name the README documents.
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
//! Counting is one relaxed atomic operation on a counter or gauge; a
//! histogram observation takes that child's own mutex (prometheus-client's
//! histogram is not atomic), contended only by observations of the same
//! child at the same moment. Looking a child up by its label values
//! ([`Family::with`]) takes the family's lock and allocates the values, so
//! hot paths look theirs up once and keep the handle, which shares the
//! child ([`JobMetrics`], the HTTP middleware's per-route children).

mod ops;

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::family::Family as Children;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;

pub use ops::{
    healthz_router, ops_router, serve_ops, Check, Readiness, ReadinessReport, OPS_PATHS,
};

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

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS.iter().copied())
}

fn pipeline_histogram() -> Histogram {
    Histogram::new(PIPELINE_BUCKETS.iter().copied())
}

/// The process's registry and, registered in it, every Larder metric.
static PROCESS: LazyLock<(Registry, LarderMetrics)> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let metrics = LarderMetrics::register(&mut registry);
    (registry, metrics)
});

/// Every Larder metric, registered in the process's registry on first use.
pub fn larder() -> &'static LarderMetrics {
    &PROCESS.1
}

/// The process's metrics page, in the text format [`CONTENT_TYPE`] names:
/// every Larder metric, including those this process never touched (at
/// zero, or a [`Family`] without children), so that a page always lists
/// the same families.
pub fn render() -> String {
    let mut page = String::new();
    prometheus_text::encode(&mut page, &PROCESS.0).expect("encoding into a String does not fail");
    page
}

/// A labelled metric: one name, label names fixed when it is registered,
/// and one child per combination of label values, made on first use.
///
/// A layer over prometheus-client's family for two properties of Larder's
/// page. The label names are given once, at registration, so a caller
/// passes only the values, in order, and the wrong number of them does not
/// compile. And a family is on the page before its first child, as its
/// `# HELP` and `# TYPE` (prometheus-client leaves out families without
/// children): every process's page lists every Larder metric, so an
/// unused metric is told from a missing one, and a dashboard's query from
/// a typo.
#[derive(Debug, Clone)]
pub struct Family<M, const N: usize> {
    label_names: [&'static str; N],
    children: Children<Labels<N>, M, fn() -> M>,
}

/// A child's labels: each label name with its value, in order.
type Labels<const N: usize> = [(&'static str, String); N];

impl<M: Clone, const N: usize> Family<M, N> {
    fn new(label_names: [&'static str; N], make: fn() -> M) -> Self {
        Self {
            label_names,
            children: Children::new_with_constructor(make),
        }
    }

    /// The child for `values`, one per label name in order, made on first
    /// use. The handle shares the child: keep it where the same child is
    /// used often.
    pub fn with(&self, values: &[&str; N]) -> M {
        let labels =
            std::array::from_fn(|index| (self.label_names[index], values[index].to_owned()));
        self.children.get_or_create_owned(&labels)
    }
}

impl<M: EncodeMetric + TypedMetric, const N: usize> EncodeMetric for Family<M, N> {
    fn encode(&self, encoder: MetricEncoder) -> std::fmt::Result {
        self.children.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    // `is_empty` keeps its default, false: a family without children is
    // listed all the same (see above).
}

/// Registers `metric` in `registry` and returns it: the registry keeps one
/// handle to read it by, the caller another to count with.
fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
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
    pub http_requests: Family<Counter, 3>,
    /// `larder_http_request_duration_seconds{route,method}`: from the
    /// request's arrival to the last byte of its response body.
    pub http_request_duration: Family<Histogram, 2>,
    /// `larder_http_request_body_bytes_total{route,method}`.
    pub http_request_bytes: Family<Counter, 2>,
    /// `larder_http_response_body_bytes_total{route,method}`.
    pub http_response_bytes: Family<Counter, 2>,
    /// `larder_http_open_connections`.
    pub http_open_connections: Gauge,
    /// `larder_http_timeouts_total{kind}`: `header` (a request head not
    /// sent in time, or an idle keep-alive connection), `body_idle`, and
    /// `shutdown` (a body cut off when the shutdown grace ran out).
    pub http_timeouts: Family<Counter, 1>,
    /// `larder_upload_slots_held`: NAR uploads receiving now.
    pub upload_slots_held: Gauge,
    /// `larder_upload_slots_waiting`: Nix uploads waiting for a slot now.
    pub upload_slots_waiting: Gauge,
    jobs_done: Family<Counter, 1>,
    jobs_failed: Family<Counter, 1>,
    jobs_retried: Family<Counter, 1>,
    jobs_dead_lettered: Family<Counter, 1>,
    job_duration: Family<Histogram, 1>,
    chunks_stored: Counter,
    chunk_bytes_stored: Counter,
    chunk_compressed_bytes_stored: Counter,
    chunks_deduplicated: Counter,
    chunk_bytes_deduplicated: Counter,
    upload_visible_latency: Histogram,
    uploads_finished: Family<Counter, 1>,
    queue_depth: Family<Gauge, 1>,
    gc_passes: Family<Counter, 1>,
    gc_duration: Histogram,
    gc_deleted: Family<Counter, 1>,
    gc_freed_bytes: Counter,
    damaged_chunks: Family<Counter, 1>,
    withdrawn_nars: Counter,
    scrub_passes: Family<Counter, 1>,
    scrub_chunks_checked: Counter,
    scrub_bytes_read: Counter,
    scrub_chunks_unreadable: Counter,
    gc_packs_compacted: Counter,
    gc_compacted_bytes: Counter,
    /// One child per [`PushStage`], in the order of [`PushStage::ALL`].
    push_stages: Vec<Histogram>,
}

impl LarderMetrics {
    /// Registers every metric in `registry`, in the order the page lists
    /// them. Counters' names are without their `_total` (see the module's
    /// doc), and help texts without their final full stop, which
    /// prometheus-client adds.
    fn register(registry: &mut Registry) -> Self {
        let queue = ["queue"];
        let route_method = ["route", "method"];
        Self {
            http_requests: registered(
                registry,
                "larder_http_requests",
                "HTTP requests answered, by route template, method and status",
                Family::new(["route", "method", "status"], Counter::default),
            ),
            http_request_duration: registered(
                registry,
                "larder_http_request_duration_seconds",
                "Time from a request's arrival to the last byte of its response body",
                Family::new(route_method, duration_histogram),
            ),
            http_request_bytes: registered(
                registry,
                "larder_http_request_body_bytes",
                "Bytes of request bodies read",
                Family::new(route_method, Counter::default),
            ),
            http_response_bytes: registered(
                registry,
                "larder_http_response_body_bytes",
                "Bytes of response bodies sent",
                Family::new(route_method, Counter::default),
            ),
            http_open_connections: registered(
                registry,
                "larder_http_open_connections",
                "HTTP connections open now",
                Gauge::default(),
            ),
            http_timeouts: registered(
                registry,
                "larder_http_timeouts",
                "Connections and request bodies ended by a timeout, by kind (header, body_idle, \
                 shutdown)",
                Family::new(["kind"], Counter::default),
            ),
            upload_slots_held: registered(
                registry,
                "larder_upload_slots_held",
                "NAR uploads receiving now, each holding an upload slot",
                Gauge::default(),
            ),
            upload_slots_waiting: registered(
                registry,
                "larder_upload_slots_waiting",
                "NAR uploads from Nix waiting for an upload slot now",
                Gauge::default(),
            ),
            jobs_done: registered(
                registry,
                "larder_jobs_done",
                "Pipeline jobs that succeeded and were acknowledged",
                Family::new(queue, Counter::default),
            ),
            jobs_failed: registered(
                registry,
                "larder_jobs_failed",
                "Pipeline job attempts that failed (each is then retried or dead-lettered)",
                Family::new(queue, Counter::default),
            ),
            jobs_retried: registered(
                registry,
                "larder_jobs_retried",
                "Pipeline jobs handed back to their queue for a later attempt",
                Family::new(queue, Counter::default),
            ),
            jobs_dead_lettered: registered(
                registry,
                "larder_jobs_dead_lettered",
                "Pipeline jobs given up and moved to their dead-letter queue",
                Family::new(queue, Counter::default),
            ),
            job_duration: registered(
                registry,
                "larder_job_duration_seconds",
                "Time a worker spent on one job attempt",
                Family::new(queue, duration_histogram),
            ),
            chunks_stored: registered(
                registry,
                "larder_chunks_stored",
                "Chunks compressed and written to storage",
                Counter::default(),
            ),
            chunk_bytes_stored: registered(
                registry,
                "larder_chunk_bytes_stored",
                "Uncompressed bytes of the chunks written to storage",
                Counter::default(),
            ),
            chunk_compressed_bytes_stored: registered(
                registry,
                "larder_chunk_compressed_bytes_stored",
                "Compressed bytes written to storage for chunks",
                Counter::default(),
            ),
            chunks_deduplicated: registered(
                registry,
                "larder_chunks_deduplicated",
                "Chunks of pushed NARs that were stored already and not written again",
                Counter::default(),
            ),
            chunk_bytes_deduplicated: registered(
                registry,
                "larder_chunk_bytes_deduplicated",
                "Uncompressed bytes of the deduplicated chunks",
                Counter::default(),
            ),
            upload_visible_latency: registered(
                registry,
                "larder_upload_visible_seconds",
                "Time from an upload's creation (its NAR spooled) to its path being visible",
                pipeline_histogram(),
            ),
            uploads_finished: registered(
                registry,
                "larder_uploads_finished",
                "Uploads that reached a final phase, by phase (done or failed)",
                Family::new(["phase"], Counter::default),
            ),
            queue_depth: registered(
                registry,
                "larder_queue_depth",
                "Messages waiting in a queue, read when the page is rendered",
                Family::new(queue, Gauge::default),
            ),
            gc_passes: registered(
                registry,
                "larder_gc_passes",
                "Garbage-collection passes, by outcome (ok or error)",
                Family::new(["outcome"], Counter::default),
            ),
            gc_duration: registered(
                registry,
                "larder_gc_pass_duration_seconds",
                "Time one garbage-collection pass took",
                pipeline_histogram(),
            ),
            gc_deleted: registered(
                registry,
                "larder_gc_deleted",
                "What garbage collection deleted, by kind (objects, nars, chunks, uploads, \
                 staged_files...)",
                Family::new(["kind"], Counter::default),
            ),
            gc_freed_bytes: registered(
                registry,
                "larder_gc_freed_bytes",
                "Bytes of storage garbage collection freed",
                Counter::default(),
            ),
            damaged_chunks: registered(
                registry,
                "larder_damaged_chunks",
                "Chunks found missing or corrupt in storage and withdrawn, by what found them \
                 (scrub or read)",
                Family::new(["found_by"], Counter::default),
            ),
            withdrawn_nars: registered(
                registry,
                "larder_withdrawn_nars",
                "NARs withdrawn (no longer served) because a chunk of theirs was damaged",
                Counter::default(),
            ),
            scrub_passes: registered(
                registry,
                "larder_scrub_passes",
                "Scrub passes, by outcome (ok or error)",
                Family::new(["outcome"], Counter::default),
            ),
            scrub_chunks_checked: registered(
                registry,
                "larder_scrub_chunks_checked",
                "Chunks a scrub read, decompressed and checked against their hash",
                Counter::default(),
            ),
            scrub_bytes_read: registered(
                registry,
                "larder_scrub_bytes_read",
                "Stored (compressed) bytes a scrub read",
                Counter::default(),
            ),
            scrub_chunks_unreadable: registered(
                registry,
                "larder_scrub_chunks_unreadable",
                "Chunks a scrub could not check because storage failed to answer (not \
                 counted as damage; the next pass tries again)",
                Counter::default(),
            ),
            gc_packs_compacted: registered(
                registry,
                "larder_gc_packs_compacted",
                "Packs (and per-chunk objects of an older store) whose live chunks \
                 garbage collection moved into new packs",
                Counter::default(),
            ),
            gc_compacted_bytes: registered(
                registry,
                "larder_gc_compacted_bytes",
                "Bytes garbage collection wrote into new packs while compacting",
                Counter::default(),
            ),
            push_stages: {
                let family = registered(
                    registry,
                    "larder_push_stage_seconds",
                    "Time spent in one stage of pushing (receive_verify, spool, wait, \
                     read_staged, chunk, compress, store, database, finalise)",
                    Family::new(["stage"], duration_histogram),
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
    pub done: Counter,
    pub failed: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub duration: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_larder_metric_shows_on_a_fresh_page() {
        let page = render();
        let names = [
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
            "larder_gc_packs_compacted_total",
            "larder_gc_compacted_bytes_total",
            "larder_damaged_chunks_total",
            "larder_withdrawn_nars_total",
            "larder_scrub_passes_total",
            "larder_scrub_chunks_checked_total",
            "larder_scrub_bytes_read_total",
            "larder_scrub_chunks_unreadable_total",
            "larder_push_stage_seconds",
        ];
        for name in names {
            assert!(page.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert_eq!(page.matches("# TYPE ").count(), names.len(), "{page}");
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

    /// The value of `series` (a name and its labels, as written) on `page`.
    fn sample(page: &str, series: &str) -> Option<f64> {
        page.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("a sample's value"))
        })
    }

    #[test]
    fn each_push_stage_has_its_own_child() {
        for stage in PushStage::ALL {
            let sum = format!(
                "larder_push_stage_seconds_sum{{stage=\"{}\"}}",
                stage.as_str()
            );
            let before = sample(&render(), &sum).unwrap_or(0.0);
            larder().push_stage(stage, Duration::from_millis(250));
            let after = sample(&render(), &sum).unwrap_or_else(|| panic!("{sum} missing"));
            assert!(
                (after - before - 0.25).abs() < 1e-9,
                "{sum}: {before} -> {after}"
            );
        }
    }

    #[test]
    fn a_histogram_child_has_its_buckets_sum_and_count() {
        let page = {
            larder().gc_pass(Duration::from_millis(700), true);
            render()
        };
        // 0.7 s is above the 0.5 bound and within the 1 s one; buckets are
        // cumulative, and `le` is written as Prometheus's Go clients write it.
        let bucket = |le: &str| {
            sample(
                &page,
                &format!("larder_gc_pass_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
            .unwrap_or_else(|| panic!("bucket {le} missing:\n{page}"))
        };
        let count = sample(&page, "larder_gc_pass_duration_seconds_count").expect("a count");
        assert!(count >= 1.0);
        assert!(bucket("0.5") < bucket("1"));
        assert_eq!(bucket("1800"), count);
        assert_eq!(bucket("+Inf"), count);
        assert!(sample(&page, "larder_gc_pass_duration_seconds_sum").expect("a sum") >= 0.7);
        assert!(page.contains("# TYPE larder_gc_pass_duration_seconds histogram\n"));
    }

    #[test]
    fn a_familys_children_are_shared_and_labelled_in_order() {
        let family: Family<Counter, 2> = Family::new(["a", "b"], Counter::default);
        let child = family.with(&["1", "2"]);
        child.inc_by(3);
        assert_eq!(family.with(&["1", "2"]).get(), 3);
        assert_eq!(family.with(&["2", "1"]).get(), 0);
        let mut registry = Registry::default();
        registry.register("test_things", "Things", family);
        registry.register(
            "test_unused",
            "Never used",
            Family::<Gauge, 1>::new(["kind"], Gauge::default),
        );
        let mut page = String::new();
        prometheus_text::encode(&mut page, &registry).expect("a page");
        assert!(
            page.contains("test_things_total{a=\"1\",b=\"2\"} 3\n"),
            "{page}"
        );
        assert!(
            page.contains("test_things_total{a=\"2\",b=\"1\"} 0\n"),
            "{page}"
        );
        assert!(
            page.ends_with("# HELP test_unused Never used.\n# TYPE test_unused gauge\n"),
            "{page}"
        );
    }
}
