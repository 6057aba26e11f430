//! Consumes compress jobs: one zstd frame per chunk written to storage by
//! content, and the finalisation that makes a NAR visible.
//!
//! For each [`CompressJob`] the [`Compressor`] skips the chunks that are
//! valid already (a redelivered job, or another NAR's job stored them),
//! reads the others' byte ranges from the staged NAR (adjacent ranges in
//! one read), checks each against its row's SHA-256 and size, compresses
//! each into its own zstd frame at `compression_level` on a blocking
//! thread, puts it under its content-and-id key
//! ([`common::worker::chunk_object_key`]) and marks the chunk stored. Then
//! it tries to finalise the job's NAR and every other pending NAR that
//! lists one of the chunks it stored. Each chunk written counts in
//! `larder_chunks_stored_total` and its bytes.
//!
//! If the staged NAR has vanished, the chunks that became valid meanwhile
//! need nothing more; any other chunk makes the job fail for good, and the
//! uploads staged under that key are marked failed. Failures are settled by
//! [`common::worker`]'s policy.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use common::config::{PipelineConfig, ServerConfig};
use common::db::{Chunk, ChunkId, ChunkLocation, Database, DbError, NarId, StoreState, UploadId};
use common::metrics::{larder, PushStage};
use common::nix::Sha256Hash;
use common::queue::{ChunkRange, CompressJob, QueueError};
use common::service::{self, ServiceError, Services};
use common::storage::{ObjectKey, Storage, StorageError};
use common::worker::{
    self, chunk_object_key, finalise_nar, staged_object_key, JobError, JobHandler,
};

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
        let rows = larder()
            .timed(PushStage::Database, self.database.chunks_by_id(&ids))
            .await?;
        let pending: Vec<(ChunkRange, Chunk)> = job
            .chunks
            .iter()
            .filter_map(|range| {
                let row = rows.iter().find(|row| row.id.0 == range.chunk_id)?;
                (row.state == StoreState::Pending).then(|| (*range, row.clone()))
            })
            .collect();
        let mut stored = Vec::with_capacity(pending.len());
        for run in adjacent_runs(&pending) {
            match self.store_run(&staged, run).await {
                Ok(ids) => stored.extend(ids),
                Err(JobError::Storage(StorageError::NotFound(key))) => {
                    return self.staged_nar_missing(job, &key, &ids).await;
                }
                Err(error) => return Err(error),
            }
        }
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
    /// Reads one run of adjacent ranges, then checks, compresses and stores
    /// each chunk of it. Returns the ids of the chunks stored.
    async fn store_run(
        &self,
        staged: &ObjectKey,
        run: &[(ChunkRange, Chunk)],
    ) -> Result<Vec<ChunkId>, JobError> {
        let (Some((first, _)), Some((last, _))) = (run.first(), run.last()) else {
            return Ok(Vec::new());
        };
        let start = first.offset;
        let length = last.offset + last.length - start;
        let bytes = larder()
            .timed(
                PushStage::ReadStaged,
                self.storage.get_bytes(staged, start, length),
            )
            .await?;
        let chunks: Vec<(Chunk, Bytes)> = run
            .iter()
            .map(|(range, chunk)| {
                let from = (range.offset - start) as usize;
                (
                    chunk.clone(),
                    bytes.slice(from..from + range.length as usize),
                )
            })
            .collect();
        let level = self.compression_level;
        // Hashing and compressing are CPU work, off the async threads.
        let frames = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let frames = compress_checked(chunks, level);
            larder().push_stage(PushStage::Compress, started.elapsed());
            frames
        })
        .await
        .map_err(|error| {
            JobError::Permanent(format!("the compressing thread failed: {error}"))
        })??;
        let mut objects = Vec::with_capacity(frames.len());
        let mut locations = Vec::with_capacity(frames.len());
        let mut sizes = Vec::with_capacity(frames.len());
        for (chunk, frame) in frames {
            sizes.push((chunk.chunk_size, frame.len() as u64));
            let key = chunk_object_key(&chunk.chunk_hash, chunk.id);
            locations.push((
                chunk.id,
                ChunkLocation {
                    object_key: key.to_string(),
                    offset: 0,
                    length: frame.len() as u64,
                },
            ));
            objects.push((key, frame));
        }
        // The rows say stored only once every object is.
        larder()
            .timed(PushStage::Store, self.storage.put_many(objects))
            .await?;
        larder()
            .timed(
                PushStage::Database,
                self.database.set_chunks_stored(&locations),
            )
            .await?;
        for (size, compressed) in sizes {
            larder().chunk_stored(size, compressed);
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

/// Splits `chunks` (in job order) into runs whose byte ranges follow each
/// other, each read from storage in one request.
fn adjacent_runs(chunks: &[(ChunkRange, Chunk)]) -> Vec<&[(ChunkRange, Chunk)]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=chunks.len() {
        let breaks = i == chunks.len()
            || chunks[i].0.offset != chunks[i - 1].0.offset + chunks[i - 1].0.length;
        if breaks {
            runs.push(&chunks[start..i]);
            start = i;
        }
    }
    runs
}

/// Checks each chunk's bytes against its row and compresses them into one
/// zstd frame each.
fn compress_checked(
    chunks: Vec<(Chunk, Bytes)>,
    level: i32,
) -> Result<Vec<(Chunk, Bytes)>, JobError> {
    chunks
        .into_iter()
        .map(|(chunk, data)| {
            let hash = Sha256Hash::digest(&data);
            if hash != chunk.chunk_hash || data.len() as u64 != chunk.chunk_size {
                return Err(JobError::Permanent(format!(
                    "the staged bytes of chunk {} do not match it ({} bytes with hash {}, \
                     expected {} bytes with hash {}): staging storage corrupted them; push the \
                     path again",
                    chunk.id,
                    data.len(),
                    hash.to_hex(),
                    chunk.chunk_size,
                    chunk.chunk_hash.to_hex(),
                )));
            }
            let frame = compress_frame(&data, level).map_err(|error| {
                JobError::Permanent(format!("compressing chunk {}: {error}", chunk.id))
            })?;
            Ok((chunk, Bytes::from(frame)))
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
    use common::db::Timestamp;

    fn entry(id: i64, offset: u64, length: u64) -> (ChunkRange, Chunk) {
        let data = vec![id as u8; length as usize];
        (
            ChunkRange {
                chunk_id: id,
                offset,
                length,
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
    fn adjacent_ranges_form_one_run() {
        let chunks = [
            entry(1, 0, 10),
            entry(2, 10, 5),
            entry(3, 30, 5),
            entry(4, 35, 1),
        ];
        let runs: Vec<Vec<i64>> = adjacent_runs(&chunks)
            .iter()
            .map(|run| run.iter().map(|(range, _)| range.chunk_id).collect())
            .collect();
        assert_eq!(runs, [vec![1, 2], vec![3, 4]]);
        assert!(adjacent_runs(&[]).is_empty());
    }

    #[test]
    fn frames_decompress_to_checked_bytes_and_mismatches_are_permanent() {
        let (_, chunk) = entry(7, 0, 1000);
        let data = Bytes::from(vec![7u8; 1000]);
        let frames = compress_checked(vec![(chunk.clone(), data.clone())], 3).expect("compressing");
        let restored = zstd::bulk::decompress(&frames[0].1, 1000).expect("decompressing");
        assert_eq!(restored, data);

        let error = compress_checked(vec![(chunk, Bytes::from(vec![8u8; 1000]))], 3)
            .expect_err("corrupted bytes");
        assert!(error.is_permanent(), "{error:?}");
    }
}
