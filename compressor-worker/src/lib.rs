//! Consumes compress jobs: the new chunks of a NAR compressed into one
//! pack object, and the finalisation that makes a NAR visible.
//!
//! For each [`CompressJob`] (up to `[pipeline] pack-size` of new chunks, as
//! the chunker cuts them) the [`Compressor`] skips the
//! chunks that are valid already (a redelivered job, or another NAR's job
//! stored them), reads the others' byte ranges from the staged NAR
//! (adjacent ranges in one read, a few MiB at a time), checks each against
//! its row's SHA-256 and size, compresses each into its own zstd frame at
//! `compression_level` on a blocking thread and appends it to a new pack
//! ([`PackWriter`]: written in place on local storage, one put on S3).
//! Once the pack is durable, one transaction records it and marks its
//! chunks stored at their ranges (`Database::set_chunks_stored`). Then it
//! tries to finalise the job's NAR and every other pending NAR that lists
//! one of the chunks it stored. Each chunk written counts in
//! `larder_chunks_stored_total` and its bytes.
//!
//! If the staged NAR has vanished, the chunks that became valid meanwhile
//! need nothing more; any other chunk makes the job fail for good, and the
//! uploads staged under that key are marked failed. Failures are settled by
//! [`larder_service::worker`]'s policy.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use larder_config::{PipelineConfig, ServerConfig};
use larder_db::{
    Chunk, ChunkId, ChunkLocation, Database, DbError, NarId, NewPack, StoreState, Timestamp,
    UploadId,
};
use larder_nix::Sha256Hash;
use larder_queue::{ChunkRange, CompressJob, QueueError};
use larder_service::metrics::{larder, PushStage};
use larder_service::service::{self, ServiceError, Services};
use larder_service::worker::{self, finalise_nar, staged_object_key, JobError, JobHandler};
use larder_storage::pack::{PackWriter, PackedRange};
use larder_storage::{adjacent_runs, ObjectKey, ObjectReader, Storage, StorageError};
use tokio::io::AsyncReadExt;

/// The most staged bytes held (with their frames) at once: a job's pack can
/// be eight times that, and is written as it grows. A run of adjacent
/// ranges is still one read (one request on S3), taken this much at a time.
const READ_PIECE_BYTES: u64 = 4 << 20;

/// The `compressor-worker` service: opens the database, storage and the shared
/// queue the config names, then consumes compress jobs until `shutdown` (see
/// [`run_with`]), serving `/metrics`, `/healthz` and `/readyz` on `listen`.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> Result<(), ServiceError> {
    service::run_worker(config, shutdown, "compressor-worker", run_with).await
}

/// Consumes compress jobs until `shutdown` (see [`worker::consume`]).
pub async fn run_with(
    services: Services,
    config: PipelineConfig,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    let compressor = Arc::new(Compressor {
        database: services.database,
        storage: services.storage,
        compression_level: config.compression_level,
    });
    worker::consume(
        services.queue,
        compressor,
        config.compress_concurrency,
        config.job_attempts,
        shutdown,
    )
    .await
}

/// The compress job handler.
#[derive(Debug, Clone)]
pub struct Compressor {
    pub database: Database,
    pub storage: Arc<dyn Storage>,
    pub compression_level: i32,
}

#[async_trait]
impl JobHandler for Compressor {
    type Job = CompressJob;

    async fn handle(&self, job: &CompressJob) -> Result<(), JobError> {
        let staged = staged_object_key(&job.staged_key)?;
        let ids: Vec<ChunkId> = job
            .chunks
            .iter()
            .map(|range| ChunkId(range.chunk_id))
            .collect();
        // A chunk row that no longer exists, or that GC has claimed
        // (`deleting`), is replaced by a fresh row, which whoever replaces
        // it stores: skip it.
        let rows: HashMap<ChunkId, Chunk> = larder()
            .timed(PushStage::Database, self.database.chunks_by_id(&ids))
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect();
        let pending: Vec<(ChunkRange, Chunk)> = job
            .chunks
            .iter()
            .filter_map(|range| {
                let row = rows.get(&ChunkId(range.chunk_id))?;
                (row.state == StoreState::Pending).then(|| (*range, row.clone()))
            })
            .collect();
        let stored = match self.store_pack(&staged, &pending).await {
            Ok(stored) => stored,
            Err(JobError::Storage(StorageError::NotFound(key))) if key == staged => {
                return self.staged_nar_missing(job, &staged, &ids).await;
            }
            Err(error) => return Err(error),
        };
        let mut nars: BTreeSet<NarId> = larder()
            .timed(
                PushStage::Database,
                self.database.pending_nars_of_chunks(&stored),
            )
            .await?
            .into_iter()
            .collect();
        nars.insert(NarId(job.nar_id));
        for nar in nars {
            larder()
                .timed(
                    PushStage::Finalise,
                    finalise_nar(&self.database, &*self.storage, nar),
                )
                .await?;
        }
        Ok(())
    }

    /// The uploads of the job's NAR staged under the job's key: another
    /// upload of the same NAR has its own staged copy and carries on.
    async fn uploads_concerned(&self, job: &CompressJob) -> Result<Vec<UploadId>, DbError> {
        Ok(self
            .database
            .uploads_waiting_on_nar(NarId(job.nar_id))
            .await?
            .into_iter()
            .filter(|upload| upload.staged_key == job.staged_key)
            .map(|upload| upload.id)
            .collect())
    }

    fn database(&self) -> &Database {
        &self.database
    }
}

impl Compressor {
    /// Reads the chunks from the staged NAR a piece at a time (adjacent
    /// ranges together, at most [`READ_PIECE_BYTES`]), checks each and
    /// appends its frame to one new pack on a blocking thread, makes the
    /// pack durable, then records it with its chunks stored in one
    /// transaction. Returns the ids of the chunks stored.
    async fn store_pack(
        &self,
        staged: &ObjectKey,
        pending: &[(ChunkRange, Chunk)],
    ) -> Result<Vec<ChunkId>, JobError> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let mut pack = PackWriter::create(&*self.storage).await?;
        let mut packed: Vec<(Chunk, PackedRange)> = Vec::with_capacity(pending.len());
        let mut run: Option<(u64, ObjectReader)> = None;
        for piece in read_pieces(pending, READ_PIECE_BYTES) {
            let start = piece[0].0.offset;
            let (last, _) = piece[piece.len() - 1];
            let length = last.offset + last.length - start;
            // Adjacent pieces come from one ranged read of their whole run
            // (one request on S3), taken a piece at a time.
            let reader = match &mut run {
                Some((next, reader)) if *next == start => reader,
                _ => {
                    let run_length = run_length(pending, start);
                    let reader = larder()
                        .timed(
                            PushStage::ReadStaged,
                            self.storage.get_range(staged, start, Some(run_length)),
                        )
                        .await?;
                    &mut run.insert((start, reader)).1
                }
            };
            let mut bytes = vec![0; length as usize];
            larder()
                .timed(PushStage::ReadStaged, reader.read_exact(&mut bytes))
                .await
                .map_err(|error| StorageError::io(staged, error))?;
            if let Some((next, _)) = &mut run {
                *next = start + length;
            }
            let bytes = Bytes::from(bytes);
            let chunks: Vec<StagedChunk> = piece
                .iter()
                .map(|(range, chunk)| {
                    let from = (range.offset - start) as usize;
                    StagedChunk {
                        chunk: chunk.clone(),
                        crc32: range.crc32,
                        data: bytes.slice(from..from + range.length as usize),
                    }
                })
                .collect();
            let level = self.compression_level;
            // Hashing, compressing and (on local storage) writing are
            // blocking work, off the async threads.
            let (returned, placed) = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let frames = compress_checked(chunks, level)?;
                larder().push_stage(PushStage::Compress, started.elapsed());
                let started = std::time::Instant::now();
                let mut placed = Vec::with_capacity(frames.len());
                for (chunk, frame) in frames {
                    let range = pack.append(&frame)?;
                    placed.push((chunk, range));
                }
                larder().push_stage(PushStage::Store, started.elapsed());
                Ok::<_, JobError>((pack, placed))
            })
            .await
            .map_err(|error| {
                JobError::Permanent(format!("the compressing thread failed: {error}"))
            })??;
            pack = returned;
            packed.extend(placed);
        }
        // The rows say stored only once the pack is durable.
        let (key, size) = larder()
            .timed(PushStage::Store, pack.finish(&*self.storage))
            .await?;
        let new_pack = NewPack {
            object_key: key.to_string(),
            size,
        };
        let locations: Vec<(ChunkId, ChunkLocation)> = packed
            .iter()
            .map(|(chunk, range)| {
                (
                    chunk.id,
                    ChunkLocation {
                        object_key: new_pack.object_key.clone(),
                        offset: range.offset,
                        length: range.length,
                    },
                )
            })
            .collect();
        larder()
            .timed(
                PushStage::Database,
                self.database
                    .set_chunks_stored(&new_pack, &locations, Timestamp::now()),
            )
            .await?;
        for (chunk, range) in &packed {
            larder().chunk_stored(chunk.chunk_size, range.length);
        }
        Ok(locations.into_iter().map(|(id, _)| id).collect())
    }

    /// The staged NAR is gone (its upload finalised or reaped): fine if
    /// every chunk of the job is valid by now, otherwise final.
    async fn staged_nar_missing(
        &self,
        job: &CompressJob,
        key: &ObjectKey,
        ids: &[ChunkId],
    ) -> Result<(), JobError> {
        let rows = self.database.chunks_by_id(ids).await?;
        if rows.iter().all(|row| row.state == StoreState::Valid) {
            finalise_nar(&self.database, &*self.storage, NarId(job.nar_id)).await?;
            return Ok(());
        }
        Err(JobError::Permanent(format!(
            "the staged NAR {key} disappeared from storage before all its chunks were stored; \
             push the path again"
        )))
    }
}

/// The bytes from `start` to the end of the run of adjacent ranges of
/// `chunks` (in job order) that begins there.
fn run_length(chunks: &[(ChunkRange, Chunk)], start: u64) -> u64 {
    let mut end = start;
    for (range, _) in chunks.iter().skip_while(|(range, _)| range.offset != start) {
        if range.offset != end {
            break;
        }
        end += range.length;
    }
    end - start
}

/// Splits `chunks` (in job order) into pieces whose byte ranges follow each
/// other, each read from storage in one request: at most `max_bytes`, or
/// one chunk if that is bigger.
fn read_pieces(chunks: &[(ChunkRange, Chunk)], max_bytes: u64) -> Vec<&[(ChunkRange, Chunk)]> {
    adjacent_runs(chunks, max_bytes, |(range, _)| {
        Some((range.offset, range.length))
    })
}

/// A chunk's bytes as read back from its staged NAR.
struct StagedChunk {
    chunk: Chunk,
    /// What the chunker's CRC-32 of them was, if the job says.
    crc32: Option<u32>,
    data: Bytes,
}

impl StagedChunk {
    /// Fails for good unless the bytes are the chunk's. A chunk stored
    /// under the wrong hash would corrupt every NAR that shares it, so the
    /// bytes are checked: against the CRC-32 the chunker took of the bytes
    /// it computed the chunk's SHA-256 of, when the job carries it (a tenth
    /// of the CPU of a SHA-256), else against the SHA-256 itself.
    fn check(&self) -> Result<(), JobError> {
        let Self { chunk, crc32, data } = self;
        let size_matches = data.len() as u64 == chunk.chunk_size;
        // What was found and expected, worded only for a mismatch.
        let mismatch = match crc32 {
            Some(expected) => {
                let found = crc32fast::hash(data);
                (!size_matches || found != *expected).then(|| {
                    (
                        format!("CRC-32 {found:08x}"),
                        format!("CRC-32 {expected:08x}"),
                    )
                })
            }
            None => {
                let found = Sha256Hash::digest(data);
                (!size_matches || found != chunk.chunk_hash).then(|| {
                    (
                        format!("hash {}", found.to_hex()),
                        format!("hash {}", chunk.chunk_hash.to_hex()),
                    )
                })
            }
        };
        let Some((found, expected)) = mismatch else {
            return Ok(());
        };
        Err(JobError::Permanent(format!(
            "the staged bytes of chunk {} do not match it ({} bytes with {found}, expected {} \
             bytes with {expected}): staging storage corrupted them; push the path again",
            chunk.id,
            data.len(),
            chunk.chunk_size,
        )))
    }
}

/// Checks each chunk's bytes and compresses them into one zstd frame each.
fn compress_checked(chunks: Vec<StagedChunk>, level: i32) -> Result<Vec<(Chunk, Bytes)>, JobError> {
    chunks
        .into_iter()
        .map(|staged| {
            staged.check()?;
            let frame = compress_frame(&staged.data, level).map_err(|error| {
                JobError::Permanent(format!("compressing chunk {}: {error}", staged.chunk.id))
            })?;
            Ok((staged.chunk, Bytes::from(frame)))
        })
        .collect()
}

/// Compresses `data` into one zstd frame at `level` with this thread's
/// compression context: a context is hundreds of KiB that zstd would
/// otherwise allocate and clear for every 64 KiB chunk.
fn compress_frame(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static CONTEXT: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { RefCell::new(None) };
    }
    CONTEXT.with_borrow_mut(|context| {
        let compressor = match context {
            Some((context_level, compressor)) if *context_level == level => compressor,
            _ => {
                &mut context
                    .insert((level, zstd::bulk::Compressor::new(level)?))
                    .1
            }
        };
        compressor.compress(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64, offset: u64, length: u64) -> (ChunkRange, Chunk) {
        let data = vec![id as u8; length as usize];
        (
            ChunkRange {
                chunk_id: id,
                offset,
                length,
                crc32: Some(crc32fast::hash(&data)),
            },
            Chunk {
                id: ChunkId(id),
                chunk_hash: Sha256Hash::digest(&data),
                chunk_size: length,
                state: StoreState::Pending,
                location: None,
                created_at: Timestamp::from_unix_millis(0),
            },
        )
    }

    #[test]
    fn adjacent_ranges_are_read_together_up_to_a_bound() {
        let chunks = [
            entry(1, 0, 10),
            entry(2, 10, 5),
            entry(3, 30, 5),
            entry(4, 35, 1),
            entry(5, 36, 20),
            entry(6, 56, 4),
        ];
        let pieces = |max_bytes| -> Vec<Vec<i64>> {
            read_pieces(&chunks, max_bytes)
                .iter()
                .map(|piece| piece.iter().map(|(range, _)| range.chunk_id).collect())
                .collect()
        };
        assert_eq!(pieces(1000), [vec![1, 2], vec![3, 4, 5, 6]]);
        // A chunk bigger than the bound is a piece of its own.
        assert_eq!(pieces(15), [vec![1, 2], vec![3, 4], vec![5], vec![6]]);
        assert!(read_pieces(&[], 15).is_empty());
        // Each piece's run is read whole, once.
        assert_eq!(run_length(&chunks, 0), 15);
        assert_eq!(run_length(&chunks, 30), 30);
        assert_eq!(run_length(&chunks, 36), 24);
    }

    #[test]
    fn frames_decompress_to_checked_bytes_and_mismatches_are_permanent() {
        let (_, chunk) = entry(7, 0, 1000);
        let data = Bytes::from(vec![7u8; 1000]);
        let staged = |crc32, data: &Bytes| StagedChunk {
            chunk: chunk.clone(),
            crc32,
            data: data.clone(),
        };
        let good_crc32 = Some(crc32fast::hash(&data));
        for crc32 in [None, good_crc32] {
            let frames = compress_checked(vec![staged(crc32, &data)], 3).expect("compressing");
            let restored = zstd::bulk::decompress(&frames[0].1, 1000).expect("decompressing");
            assert_eq!(restored, data);
        }

        let corrupted = Bytes::from(vec![8u8; 1000]);
        let cut_short = data.slice(..999);
        for (crc32, data) in [
            (None, &corrupted),
            (good_crc32, &corrupted),
            (None, &cut_short),
            (Some(crc32fast::hash(&cut_short)), &cut_short),
        ] {
            let error = compress_checked(vec![staged(crc32, data)], 3).expect_err("bad bytes");
            assert!(error.is_permanent(), "{error:?}");
        }
    }
}
