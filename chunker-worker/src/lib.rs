//! Consumes chunk jobs: FastCDC and SHA-256 over a spooled NAR, global
//! chunk deduplication, and compress jobs for the chunks that are new.
//!
//! For each [`ChunkJob`] the [`Chunker`] links the upload to its NAR row
//! (one per NAR hash, however many uploads race), then:
//!
//! - NAR already `valid` (stored for any cache): the upload is finalised
//!   at once (its object made visible, its staged NAR deleted), after
//!   passing through the same phases as any other upload.
//! - NAR `deleting` (GC is removing it): tried again later.
//! - chunk list already recorded (a redelivered or republished job, a
//!   second upload of a NAR being stored, or a push of a NAR withdrawn
//!   because a chunk of it was found damaged, see `larder_service::integrity`):
//!   compress jobs are published
//!   again for the chunks not yet valid, with their byte ranges computed
//!   from the recorded list; the staged NAR is not read.
//! - otherwise the staged NAR is streamed from storage (memory bounded by
//!   the largest chunk) and cut with FastCDC 16/64/256 KiB (NARs under
//!   64 KiB are one chunk; the sizes are `larder_db::chunking`'s), each chunk
//!   hashed with SHA-256, while the whole goes through the strict NAR
//!   reader, which builds its `.ls` listing within a budget, and a CRC-32
//!   checked against the one the API recorded as it wrote the staged copy
//!   (so that staging still holds what the API verified; uploads recorded
//!   before the CRC was kept are hashed whole instead, see [`StagedDigest`]).
//!   Chunks are looked up and created in batches of about
//!   [`LOOKUP_BATCH_BYTES`], and the new ones go out in [`CompressJob`]s of
//!   about one pack each (`[pipeline] pack-size` of chunk data: the
//!   compressor writes a job's frames into one pack object) as soon as
//!   there are that many, so compression overlaps cutting. Then the
//!   listing is stored (compressed) and the chunk list recorded, in that
//!   order, so a NAR that becomes valid already has its listing: the read
//!   path serves `.ls` from it and never reads the NAR for it.
//!
//! The upload then moves to `compressing` and the NAR is finalised if its
//! chunks are all stored already (the compressor finalises it otherwise).
//! Failures are settled by [`larder_service::worker`]'s policy.
//!
//! A NAR of at most [`INLINE_NAR_BYTES`] (a few chunks) takes none of
//! these steps: the chunker stores it itself, in one transaction (module
//! `inline`).
//!
//! Chunks cut that storage already holds (or that repeat earlier in the
//! same NAR), and every chunk of a NAR found valid already, count in
//! `larder_chunks_deduplicated_total` and its bytes; chunks republished
//! from a recorded list are not counted again.

use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fastcdc::v2020::StreamCDC;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use larder_config::{PipelineConfig, ServerConfig};
use larder_db::chunking::{AVG_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ONE_CHUNK_BELOW};
use larder_db::{
    ChunkId, Database, DbError, EncodedListing, NarId, NewChunk, StoreState, Timestamp, Upload,
    UploadId, UploadPhase,
};
use larder_nix::nar::{NarError, NarListing, NarReader, UnhashedNarReader};
use larder_nix::{NarHash, Sha256Hash};
use larder_queue::{publish_job, ChunkJob, ChunkRange, CompressJob, Queue, QueueError};
use larder_service::metrics::{larder, PushStage};
use larder_service::service::{self, ServiceError, Services};
use larder_service::worker::{self, finalise_nar, staged_object_key, JobError, JobHandler};
use larder_storage::{ObjectKey, Storage, StorageError};

mod inline;

pub use inline::INLINE_NAR_BYTES;

/// About how many bytes of cut chunks are looked up and created in the
/// database at once: few round trips, and compress jobs go out while the
/// chunker is still cutting.
const LOOKUP_BATCH_BYTES: u64 = 4 << 20;

/// Chunks cut but not yet recorded, at most: the cutting thread waits for
/// the database beyond this.
const CUT_AHEAD: usize = 256;

/// The buffer the staged NAR is read through: 2 MiB, the most a local
/// file read hands to one blocking thread (tokio's limit).
const STAGED_READ_BUFFER: usize = 2 << 20;

/// What a NAR's `.ls` listing may cost in memory while it is built (see
/// `NarReader::with_listing_budget`): about 150,000 entries with short
/// names. A NAR with a larger listing is stored without one, and its
/// `.ls` answers 404, which Nix reads as "no listing"; the budget keeps a
/// NAR of millions of tiny files from making the chunker hold them all.
const LISTING_BUDGET: usize = 16 << 20;

/// The `chunker-worker` service: opens the database, storage and the shared
/// queue the config names, then consumes chunk jobs until `shutdown` (see
/// [`run_with`]), serving `/metrics`, `/healthz` and `/readyz` on `listen`.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> Result<(), ServiceError> {
    service::run_worker(config, shutdown, "chunker-worker", run_with).await
}

/// Consumes chunk jobs until `shutdown` (see [`worker::consume`]).
pub async fn run_with(
    services: Services,
    config: PipelineConfig,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    let chunker = Arc::new(Chunker {
        database: services.database,
        storage: services.storage,
        queue: services.queue.clone(),
        compression_level: config.compression_level,
        pack_size: config.pack_size.bytes(),
    });
    worker::consume(
        services.queue,
        chunker,
        config.chunk_concurrency,
        config.job_attempts,
        shutdown,
    )
    .await
}

/// The chunk job handler.
#[derive(Debug, Clone)]
pub struct Chunker {
    pub database: Database,
    pub storage: Arc<dyn Storage>,
    pub queue: Arc<dyn Queue>,
    /// The zstd level of the chunks of small NARs, which it stores itself.
    pub compression_level: i32,
    /// New chunk data per compress job (`[pipeline] pack-size`).
    pub pack_size: u64,
}

#[async_trait]
impl JobHandler for Chunker {
    type Job = ChunkJob;

    async fn handle(&self, job: &ChunkJob) -> Result<(), JobError> {
        let id = parse_upload_id(job)?;
        let Some(upload) = self.database.upload(&id).await? else {
            // Deleted with its cache, or reaped: nothing left to do.
            tracing::info!(upload = %id, "upload gone; dropping its chunk job");
            return Ok(());
        };
        if upload.phase.is_terminal() {
            return Ok(());
        }
        let outcome = if upload.nar_size <= INLINE_NAR_BYTES {
            self.store_inline(&upload).await
        } else {
            self.chunk_upload(&upload, &job.trace_id).await
        };
        match outcome {
            Err(JobError::Storage(StorageError::NotFound(key))) => {
                self.staged_nar_missing(&upload, &key).await
            }
            outcome => outcome,
        }
    }

    async fn uploads_concerned(&self, job: &ChunkJob) -> Result<Vec<UploadId>, DbError> {
        Ok(parse_upload_id(job).into_iter().collect())
    }

    fn database(&self) -> &Database {
        &self.database
    }
}

fn parse_upload_id(job: &ChunkJob) -> Result<UploadId, JobError> {
    job.upload_id
        .parse()
        .map_err(|error| JobError::Permanent(format!("invalid upload id in chunk job: {error}")))
}

/// One chunk as cut from the staged NAR.
#[derive(Debug, Clone, Copy)]
struct CutChunk {
    offset: u64,
    length: u64,
    hash: Sha256Hash,
    /// Of the same bytes, for the compressor's check (`ChunkRange::crc32`).
    crc32: u32,
}

impl Chunker {
    async fn chunk_upload(&self, upload: &Upload, trace_id: &str) -> Result<(), JobError> {
        let database = &self.database;
        let staged = staged_object_key(&upload.staged_key)?;
        let (nar, _) = larder()
            .timed(
                PushStage::Database,
                database.insert_nar_pending(&upload.nar_hash, upload.nar_size, Timestamp::now()),
            )
            .await
            .map_err(|error| match error {
                DbError::Conflict { .. } => JobError::Permanent(format!(
                    "NAR {} is already stored with another size than {}",
                    upload.nar_hash, upload.nar_size
                )),
                error => error.into(),
            })?;
        if nar.state == StoreState::Deleting {
            return Err(JobError::NotYet(format!(
                "NAR {} is being deleted by GC; storing it again once it is gone",
                upload.nar_hash
            )));
        }
        if upload.nar_id != Some(nar.id) {
            larder()
                .timed(
                    PushStage::Database,
                    database.set_upload_nar(&upload.id, nar.id, Timestamp::now()),
                )
                .await?;
        }
        larder()
            .timed(
                PushStage::Database,
                database.set_upload_phase(&upload.id, UploadPhase::Chunking, Timestamp::now()),
            )
            .await?;
        match nar.state {
            // Stored already (by any cache): nothing to cut or compress. It
            // still moves through `compressing`, so that the phases an
            // upload shows do not say whether someone else had its bytes.
            StoreState::Valid => {}
            StoreState::Pending if nar.n_chunks > 0 => {
                self.publish_missing_chunks(upload, &staged, nar.id, trace_id)
                    .await?;
            }
            StoreState::Pending | StoreState::Deleting => {
                self.cut_staged_nar(upload, &staged, nar.id, trace_id)
                    .await?;
            }
        }
        larder()
            .timed(
                PushStage::Database,
                database.set_upload_phase(&upload.id, UploadPhase::Compressing, Timestamp::now()),
            )
            .await?;
        if nar.state == StoreState::Valid {
            // Before the finalisation, which wakes the waiting push: its
            // pusher then sees the count.
            larder().chunks_deduplicated(u64::from(nar.n_chunks), nar.nar_size);
        }
        larder()
            .timed(
                PushStage::Finalise,
                finalise_nar(database, &*self.storage, nar.id),
            )
            .await?;
        Ok(())
    }

    /// The staged NAR is gone: fine if the upload was finalised meanwhile
    /// (through another upload of the same NAR), which deleted it;
    /// otherwise nothing can bring it back.
    async fn staged_nar_missing(&self, upload: &Upload, key: &ObjectKey) -> Result<(), JobError> {
        let now = self.database.upload(&upload.id).await?;
        if now.is_none_or(|upload| upload.phase.is_terminal()) {
            return Ok(());
        }
        Err(JobError::Permanent(format!(
            "the staged NAR {key} has disappeared from storage; push the path again"
        )))
    }

    /// Publishes compress jobs for the chunks of a recorded chunk list that
    /// are not stored yet, with their ranges in `staged`.
    async fn publish_missing_chunks(
        &self,
        upload: &Upload,
        staged: &ObjectKey,
        nar_id: NarId,
        trace_id: &str,
    ) -> Result<(), JobError> {
        let chunks = self.database.chunks_of_nar(nar_id).await?;
        let mut offset = 0;
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        for entry in &chunks {
            let chunk = &entry.chunk;
            if chunk.state != StoreState::Valid && seen.insert(chunk.id) {
                missing.push(ChunkRange {
                    chunk_id: chunk.id.0,
                    offset,
                    length: chunk.chunk_size,
                    // Not read here: the compressor checks by SHA-256.
                    crc32: None,
                });
            }
            offset += chunk.chunk_size;
        }
        if offset != upload.nar_size {
            return Err(JobError::Permanent(format!(
                "the recorded chunks of NAR {} add up to {offset} bytes, not {}",
                upload.nar_hash, upload.nar_size
            )));
        }
        let mut job = PackJob::new(self.pack_size);
        for range in missing {
            if let Some(full) = job.add(range) {
                self.publish(nar_id, staged, full, trace_id).await?;
            }
        }
        self.publish(nar_id, staged, job.ranges, trace_id).await
    }

    /// Streams the staged NAR through FastCDC, records its chunks and
    /// publishes compress jobs for the new ones as it goes, checks the
    /// whole against the upload's hash and size, then records the chunk
    /// list.
    async fn cut_staged_nar(
        &self,
        upload: &Upload,
        staged: &ObjectKey,
        nar_id: NarId,
        trace_id: &str,
    ) -> Result<(), JobError> {
        // Large reads: on local storage each read is a hop to a blocking
        // thread, and FastCDC asks for at most a chunk at a time.
        let reader = tokio::io::BufReader::with_capacity(
            STAGED_READ_BUFFER,
            self.storage.get_range(staged, 0, None).await?,
        );
        let (sender, mut receiver) = mpsc::channel(CUT_AHEAD);
        let nar_size = upload.nar_size;
        let expected = StagedDigest::of(upload);
        // Hashing and cutting are CPU work: a blocking thread reads the
        // stream through a bridge and hands chunks over.
        let cutter = tokio::task::spawn_blocking(move || {
            cut(SyncIoBridge::new(reader), nar_size, expected, &sender)
        });

        let mut listed = ListedSoFar::new(self.pack_size);
        let mut batch: Vec<CutChunk> = Vec::new();
        let mut batch_bytes = 0;
        while let Some(chunk) = receiver.recv().await {
            batch_bytes += chunk.length;
            batch.push(chunk);
            if batch_bytes >= LOOKUP_BATCH_BYTES {
                let batch = std::mem::take(&mut batch);
                batch_bytes = 0;
                self.record_batch(&batch, staged, nar_id, trace_id, &mut listed)
                    .await?;
            }
        }
        self.record_batch(&batch, staged, nar_id, trace_id, &mut listed)
            .await?;
        self.publish(nar_id, staged, listed.job.ranges, trace_id)
            .await?;
        let cut = cutter
            .await
            .map_err(|error| JobError::Permanent(format!("the chunking thread failed: {error}")))?
            .map_err(|error| cut_error(staged, error))?;
        check_cut(upload, staged, &cut)?;
        // Before the chunk list: a NAR can become valid only once its list
        // is recorded, so it never is without the listing it will have.
        if let Some(listing) = &cut.listing {
            larder()
                .timed(
                    PushStage::Database,
                    self.database.set_nar_listing(nar_id, listing),
                )
                .await?;
        }
        let recorded = larder()
            .timed(
                PushStage::Database,
                self.database.set_nar_chunks(nar_id, &listed.chunk_ids),
            )
            .await;
        match recorded {
            Ok(()) => Ok(()),
            // Another upload of the same NAR got it stored meanwhile.
            Err(DbError::Conflict { .. }) => match self.database.nar_by_id(nar_id).await? {
                Some(nar) if nar.state == StoreState::Valid => Ok(()),
                _ => Err(JobError::NotYet(format!(
                    "NAR {} changed state while being chunked",
                    upload.nar_hash
                ))),
            },
            Err(error) => Err(error.into()),
        }
    }

    /// Looks up or creates a batch of chunks, appends their ids to the
    /// NAR's list, and adds those not yet stored (each chunk once per NAR)
    /// to the compress job being gathered, publishing it whenever it is
    /// full.
    async fn record_batch(
        &self,
        batch: &[CutChunk],
        staged: &ObjectKey,
        nar_id: NarId,
        trace_id: &str,
        listed: &mut ListedSoFar,
    ) -> Result<(), JobError> {
        if batch.is_empty() {
            return Ok(());
        }
        let new: Vec<NewChunk> = batch
            .iter()
            .map(|chunk| NewChunk {
                chunk_hash: chunk.hash,
                chunk_size: chunk.length,
            })
            .collect();
        let rows = larder()
            .timed(
                PushStage::Database,
                self.database.upsert_chunks(&new, Timestamp::now()),
            )
            .await?;
        let mut full_jobs = Vec::new();
        let (mut deduplicated, mut deduplicated_bytes) = (0, 0);
        for (row, chunk) in rows.iter().zip(batch) {
            listed.chunk_ids.push(row.id);
            if row.state != StoreState::Valid && listed.published.insert(row.id) {
                full_jobs.extend(listed.job.add(ChunkRange {
                    chunk_id: row.id.0,
                    offset: chunk.offset,
                    length: chunk.length,
                    crc32: Some(chunk.crc32),
                }));
            } else {
                // Stored already, or earlier in this NAR.
                deduplicated += 1;
                deduplicated_bytes += chunk.length;
            }
        }
        larder().chunks_deduplicated(deduplicated, deduplicated_bytes);
        for ranges in full_jobs {
            self.publish(nar_id, staged, ranges, trace_id).await?;
        }
        Ok(())
    }

    async fn publish(
        &self,
        nar_id: NarId,
        staged: &ObjectKey,
        chunks: Vec<ChunkRange>,
        trace_id: &str,
    ) -> Result<(), JobError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let job = CompressJob {
            nar_id: nar_id.0,
            staged_key: staged.to_string(),
            chunks,
            trace_id: trace_id.to_owned(),
        };
        publish_job(&*self.queue, &job).await?;
        Ok(())
    }
}

/// What cutting a NAR has recorded so far: its chunk list, the chunks sent
/// to compressors, and the compress job being gathered.
#[derive(Debug)]
struct ListedSoFar {
    chunk_ids: Vec<ChunkId>,
    published: HashSet<ChunkId>,
    job: PackJob,
}

impl ListedSoFar {
    fn new(pack_size: u64) -> Self {
        Self {
            chunk_ids: Vec::new(),
            published: HashSet::new(),
            job: PackJob::new(pack_size),
        }
    }
}

/// The new chunks of a NAR being gathered into one compress job, whose
/// frames become one pack.
#[derive(Debug)]
struct PackJob {
    ranges: Vec<ChunkRange>,
    bytes: u64,
    pack_size: u64,
}

impl PackJob {
    fn new(pack_size: u64) -> Self {
        Self {
            ranges: Vec::new(),
            bytes: 0,
            pack_size,
        }
    }

    /// Adds a chunk; once the job holds `pack_size` bytes, returns its
    /// chunks and starts over.
    fn add(&mut self, range: ChunkRange) -> Option<Vec<ChunkRange>> {
        self.bytes += range.length;
        self.ranges.push(range);
        (self.bytes >= self.pack_size).then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.ranges)
        })
    }
}

/// What a staged NAR read back is checked against, so that a NAR is never
/// stored from a staged copy that is not the one the API verified: the
/// CRC-32 the API recorded as it wrote the copy, or, for an upload recorded
/// before the CRC was kept, the NAR hash (a second SHA-256 of the whole,
/// which costs as much CPU as cutting it). A CRC is enough here: it guards
/// against storage losing or damaging bytes, not against a sender, whose
/// bytes the API's SHA-256 verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StagedDigest {
    Crc32(u32),
    NarHash(NarHash),
}

impl StagedDigest {
    /// What `upload`'s staged copy must read back as.
    fn of(upload: &Upload) -> Self {
        match upload.staged_crc32 {
            Some(crc32) => Self::Crc32(crc32),
            None => Self::NarHash(upload.nar_hash),
        }
    }
}

impl std::fmt::Display for StagedDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Crc32(crc32) => write!(f, "CRC-32 {crc32:08x}"),
            Self::NarHash(hash) => write!(f, "hash {hash}"),
        }
    }
}

/// The strict NAR reader over a staged copy, computing the kind of
/// [`StagedDigest`] it will be checked against. Fed a chunk at a time with
/// the chunk's CRC-32, which the whole NAR's is combined from (no second
/// pass over the bytes).
enum StagedReader {
    Crc32(UnhashedNarReader, crc32fast::Hasher),
    NarHash(NarReader),
}

impl StagedReader {
    fn new(expected: StagedDigest) -> Self {
        match expected {
            StagedDigest::Crc32(_) => Self::Crc32(
                UnhashedNarReader::with_listing_budget(LISTING_BUDGET),
                crc32fast::Hasher::new(),
            ),
            StagedDigest::NarHash(_) => {
                Self::NarHash(NarReader::with_listing_budget(LISTING_BUDGET))
            }
        }
    }

    fn update(&mut self, chunk: &[u8], chunk_crc32: &crc32fast::Hasher) -> Result<(), NarError> {
        match self {
            Self::Crc32(reader, crc32) => {
                crc32.combine(chunk_crc32);
                reader.update(chunk)
            }
            Self::NarHash(reader) => reader.update(chunk),
        }
    }

    /// The NAR's digest, size and listing.
    fn finish(self) -> Result<(StagedDigest, u64, Option<NarListing>), NarError> {
        Ok(match self {
            Self::Crc32(reader, crc32) => {
                let shape = reader.finish()?;
                (
                    StagedDigest::Crc32(crc32.finalize()),
                    shape.nar_size,
                    shape.listing,
                )
            }
            Self::NarHash(reader) => {
                let summary = reader.finish()?;
                (
                    StagedDigest::NarHash(summary.nar_hash),
                    summary.nar_size,
                    summary.listing,
                )
            }
        })
    }
}

/// What cutting a staged NAR found besides its chunks.
struct Cut {
    digest: StagedDigest,
    size: u64,
    /// Its `.ls` listing, compressed; none when it was over
    /// [`LISTING_BUDGET`].
    listing: Option<EncodedListing>,
}

/// Why cutting stopped.
#[derive(Debug)]
enum CutError {
    /// Reading the staged NAR failed, or the job failed and the chunks
    /// have no receiver any more.
    Read(io::Error),
    /// The staged bytes are not a valid NAR.
    NotANar(NarError),
}

impl From<io::Error> for CutError {
    fn from(error: io::Error) -> Self {
        Self::Read(error)
    }
}

/// The job's failure for a cut that stopped.
fn cut_error(staged: &ObjectKey, error: CutError) -> JobError {
    match error {
        CutError::Read(source) => JobError::Storage(StorageError::Io {
            key: staged.to_string(),
            source,
        }),
        CutError::NotANar(error) => JobError::Permanent(format!(
            "the staged NAR {staged} is no longer a valid NAR ({error}): staging storage \
             corrupted it; push the path again"
        )),
    }
}

/// Fails for good unless the staged NAR cut is the one the upload verified.
fn check_cut(upload: &Upload, staged: &ObjectKey, cut: &Cut) -> Result<(), JobError> {
    let expected = StagedDigest::of(upload);
    if cut.size != upload.nar_size || cut.digest != expected {
        return Err(JobError::Permanent(format!(
            "the staged NAR {staged} no longer matches its upload ({} bytes with {}, \
             expected {} bytes with {expected}): staging storage corrupted it; push the path \
             again",
            cut.size, cut.digest, upload.nar_size,
        )));
    }
    Ok(())
}

/// Cuts `reader` into chunks, sending each (offset, length, SHA-256) to
/// `chunks`, while the strict NAR reader builds its listing and the whole
/// is digested the way `expected` was. A NAR declared smaller than
/// [`ONE_CHUNK_BELOW`] is one chunk. Stops early, with an error, when the
/// receiver has gone (the job failed) or the bytes are not a NAR.
fn cut(
    reader: impl Read,
    nar_size: u64,
    expected: StagedDigest,
    chunks: &mpsc::Sender<CutChunk>,
) -> Result<Cut, CutError> {
    let started = Instant::now();
    let mut reader = TimedReader {
        inner: reader,
        reading: Duration::ZERO,
    };
    let mut waiting = Duration::ZERO;
    let cut = cut_timed(&mut reader, nar_size, expected, chunks, &mut waiting);
    // The stage is the cutting itself: reads and waits for the database
    // (a full channel) count elsewhere.
    let metrics = larder();
    metrics.push_stage(PushStage::ReadStaged, reader.reading);
    metrics.push_stage(
        PushStage::Chunk,
        started
            .elapsed()
            .saturating_sub(reader.reading)
            .saturating_sub(waiting),
    );
    cut
}

/// A reader that adds up the time its reads take.
struct TimedReader<R> {
    inner: R,
    reading: Duration,
}

impl<R: Read> Read for TimedReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        let read = self.inner.read(buffer);
        self.reading += started.elapsed();
        read
    }
}

/// [`cut`], adding the time spent waiting for the receiver to `waiting`.
fn cut_timed(
    mut reader: impl Read,
    nar_size: u64,
    expected: StagedDigest,
    chunks: &mpsc::Sender<CutChunk>,
    waiting: &mut Duration,
) -> Result<Cut, CutError> {
    let mut nar = StagedReader::new(expected);
    let mut send = |offset: u64, data: &[u8]| -> Result<(), CutError> {
        let mut crc32 = crc32fast::Hasher::new();
        crc32.update(data);
        nar.update(data, &crc32).map_err(CutError::NotANar)?;
        let chunk = CutChunk {
            offset,
            length: data.len() as u64,
            hash: Sha256Hash::digest(data),
            crc32: crc32.finalize(),
        };
        let started = Instant::now();
        let sent = chunks.blocking_send(chunk);
        *waiting += started.elapsed();
        sent.map_err(|_| io::Error::other("chunking stopped: the job failed").into())
    };
    if nar_size < ONE_CHUNK_BELOW {
        // Read one byte past the limit, so that a staged file longer than
        // declared shows as a size mismatch rather than being cut short.
        let mut data = Vec::new();
        reader
            .by_ref()
            .take(ONE_CHUNK_BELOW + 1)
            .read_to_end(&mut data)?;
        if !data.is_empty() {
            send(0, &data)?;
        }
    } else {
        for chunk in StreamCDC::new(reader, MIN_CHUNK_SIZE, AVG_CHUNK_SIZE, MAX_CHUNK_SIZE) {
            let chunk = chunk.map_err(io::Error::from)?;
            send(chunk.offset, &chunk.data)?;
        }
    }
    let (digest, size, listing) = nar.finish().map_err(CutError::NotANar)?;
    let listing = listing.and_then(|listing| {
        EncodedListing::encode(&listing)
            .inspect_err(
                |error| tracing::warn!(%error, "could not compress a NAR listing; storing none"),
            )
            .ok()
    });
    Ok(Cut {
        digest,
        size,
        listing,
    })
}

#[cfg(test)]
mod tests {
    use larder_nix::nar::{read_nar, NarEncoder};

    use super::*;

    /// Cuts `data` as an upload recorded without a CRC is cut.
    fn cut_all(data: &[u8], declared: u64) -> Result<(Vec<CutChunk>, Cut), CutError> {
        let unchecked = StagedDigest::NarHash(NarHash::new(Sha256Hash::digest(b"")));
        cut_expecting(data, declared, unchecked)
    }

    fn cut_expecting(
        data: &[u8],
        declared: u64,
        expected: StagedDigest,
    ) -> Result<(Vec<CutChunk>, Cut), CutError> {
        let (sender, mut receiver) = mpsc::channel(1 << 16);
        let cut = cut(data, declared, expected, &sender)?;
        drop(sender);
        let mut out = Vec::new();
        while let Ok(chunk) = receiver.try_recv() {
            out.push(chunk);
        }
        Ok((out, cut))
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// A NAR of a directory holding `contents` as `data` and a symlink.
    fn nar_of(contents: &[u8]) -> Vec<u8> {
        let mut nar = NarEncoder::new(Vec::new()).expect("encoder");
        nar.begin_directory().expect("directory");
        nar.entry(b"data").expect("entry");
        nar.regular(false, contents).expect("file");
        nar.entry(b"link").expect("entry");
        nar.symlink(b"data").expect("symlink");
        nar.end_directory().expect("end");
        nar.finish().expect("finishing")
    }

    /// The hash, size and listing JSON the reference reader finds.
    fn expected(nar: &[u8]) -> (StagedDigest, u64, Vec<u8>) {
        let summary = read_nar(nar, true).expect("a valid NAR");
        let listing = summary.listing.expect("a listing").to_json();
        (
            StagedDigest::NarHash(summary.nar_hash),
            summary.nar_size,
            listing,
        )
    }

    fn found(cut: &Cut) -> (StagedDigest, u64, Vec<u8>) {
        let listing = cut
            .listing
            .as_ref()
            .expect("a listing within the budget")
            .decode()
            .expect("decoding the listing");
        (cut.digest, cut.size, listing)
    }

    #[test]
    fn small_nars_are_one_chunk() {
        let nar = nar_of(&noise(60 * 1024));
        let (chunks, cut) = cut_all(&nar, nar.len() as u64).expect("cutting");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].length, nar.len() as u64);
        assert_eq!(chunks[0].hash, Sha256Hash::digest(&nar));
        assert_eq!(found(&cut), expected(&nar));
    }

    #[test]
    fn chunks_tile_the_nar_within_the_size_bounds() {
        let nar = nar_of(&noise(3 << 20));
        let (chunks, cut) = cut_all(&nar, nar.len() as u64).expect("cutting");
        assert_eq!(found(&cut), expected(&nar));
        let mut offset = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(chunk.offset, offset);
            assert!(chunk.length <= u64::from(MAX_CHUNK_SIZE));
            if i + 1 < chunks.len() {
                assert!(chunk.length >= u64::from(MIN_CHUNK_SIZE));
            }
            let range = offset as usize..(offset + chunk.length) as usize;
            assert_eq!(chunk.hash, Sha256Hash::digest(&nar[range]));
            offset += chunk.length;
        }
        assert_eq!(offset, nar.len() as u64);
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        assert!(chunks.len() as u64 <= larder_db::chunking::max_chunk_entries(offset));
    }

    #[test]
    fn a_staged_copy_with_a_crc_is_checked_by_its_crc_and_cut_the_same() {
        let nar = nar_of(&noise(3 << 20));
        let recorded = StagedDigest::Crc32(crc32fast::hash(&nar));
        let (by_crc, cut) = cut_expecting(&nar, nar.len() as u64, recorded).expect("cutting");
        let (by_hash, _) = cut_all(&nar, nar.len() as u64).expect("cutting");
        assert_eq!(cut.digest, recorded);
        let (_, size, listing) = expected(&nar);
        assert_eq!((cut.size, found(&cut).2), (size, listing));
        let ranges = |chunks: &[CutChunk]| -> Vec<_> {
            chunks
                .iter()
                .map(|c| (c.offset, c.length, c.hash))
                .collect()
        };
        assert_eq!(ranges(&by_crc), ranges(&by_hash));

        // One byte changed in the staged copy: its CRC differs.
        let mut damaged = nar.clone();
        damaged[1 << 20] ^= 1;
        let (_, cut) = cut_expecting(&damaged, nar.len() as u64, recorded).expect("cutting");
        assert_ne!(cut.digest, recorded);
    }

    #[test]
    fn a_small_declared_size_with_more_bytes_is_not_taken() {
        let nar = nar_of(&noise(200 * 1024));
        // Read as one chunk of at most 64 KiB + 1 bytes: a truncated NAR,
        // not a NAR of 1000 bytes.
        assert!(matches!(cut_all(&nar, 1000), Err(CutError::NotANar(_))));
    }

    #[test]
    fn bytes_that_are_not_a_nar_are_refused() {
        let data = noise(300 * 1024);
        assert!(matches!(
            cut_all(&data, data.len() as u64),
            Err(CutError::NotANar(_))
        ));
    }
}
