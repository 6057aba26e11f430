//! Small NARs, which the chunker stores itself: a NAR of at most
//! [`INLINE_NAR_BYTES`] (a few chunks) is read whole, cut and checked as
//! any other, its new chunks compressed and written here, and the rest is
//! one transaction ([`Database::finish_inline_upload`]): chunk rows,
//! listing, chunk list, the NAR made valid and the upload's path made
//! visible. No compress job, and two transactions per path (the door's
//! and this one) instead of a dozen, which is what a push of many small
//! paths spends its time on.
//!
//! Such an upload goes from `spooled` to `done` in one step, whether its
//! NAR was stored already or not (the phases say nothing of other
//! tenants' data). A NAR stored already is not read at all.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use tokio::sync::mpsc;

use common::chunking::max_chunk_entries;
use common::db::{
    ChunkId, ChunkLocation, DbError, InlineChunk, InlineContent, InlineOutcome, StoreState,
    Timestamp, Upload,
};
use common::metrics::larder;
use common::nix::Sha256Hash;
use common::storage::{ObjectKey, StorageError};
use common::worker::{
    finalise_nar, inline_chunk_object_key, staged_object_key, upload_made_visible, JobError,
};

use crate::{cut, Chunker, Cut, CutChunk, CutError};

/// The largest NAR the chunker stores itself; larger ones are cut as
/// they stream and compressed by compress jobs. A few chunks: one
/// compressing thread takes a few milliseconds, and the chunker holds the
/// NAR and its frames in memory meanwhile.
pub const INLINE_NAR_BYTES: u64 = 1 << 20;

/// A small NAR as cut: its chunks, and what the strict reader found.
struct CutNar {
    bytes: Bytes,
    chunks: Vec<CutChunk>,
    found: Cut,
}

impl Chunker {
    /// Stores a NAR of at most [`INLINE_NAR_BYTES`] and finalises its
    /// upload (see the module documentation).
    pub(crate) async fn store_inline(&self, upload: &Upload) -> Result<(), JobError> {
        let database = &self.database;
        let stored = database.nar_by_hash(&upload.nar_hash).await?;
        if stored
            .as_ref()
            .is_some_and(|nar| nar.nar_size != upload.nar_size)
        {
            return Err(another_size(upload));
        }
        let mut outcome = match &stored {
            Some(nar) if nar.state == StoreState::Valid => {
                // Before the commit, which wakes the waiting push: every
                // chunk of the NAR was needed and none is stored again.
                larder().chunks_deduplicated(u64::from(nar.n_chunks), nar.nar_size);
                self.finish(upload, None).await?
            }
            Some(nar) if nar.state == StoreState::Deleting => InlineOutcome::NarDeleting,
            _ => InlineOutcome::NeedsContent,
        };
        if outcome == InlineOutcome::NeedsContent {
            let cut = self.cut_whole(upload).await?;
            let chunks = self.store_new_chunks(upload, &cut).await?;
            let content = InlineContent {
                chunks: &chunks,
                listing: cut.found.listing.as_ref(),
            };
            outcome = self.finish(upload, Some(content)).await?;
        }
        let (visible, others_waiting, unused) = match outcome {
            InlineOutcome::Finished {
                visible,
                others_waiting,
                unused,
            } => (visible, others_waiting, unused),
            InlineOutcome::NeedsContent | InlineOutcome::ChunksChanged => {
                return Err(JobError::NotYet(format!(
                    "the chunks of NAR {} changed while it was being stored",
                    upload.nar_hash
                )))
            }
            InlineOutcome::NarDeleting => {
                return Err(JobError::NotYet(format!(
                    "NAR {} is being deleted by GC; storing it again once it is gone",
                    upload.nar_hash
                )))
            }
        };
        for location in unused {
            // Another worker stored these chunks first; the sweep of
            // orphans would remove them too, an hour later.
            if let Err(error) = self.delete_object(&location.object_key).await {
                tracing::warn!(key = location.object_key, %error, "could not delete an unused chunk object");
            }
        }
        if visible {
            upload_made_visible(&*self.storage, upload, Timestamp::now()).await?;
        }
        if let Some(nar_id) = others_waiting {
            finalise_nar(database, &*self.storage, nar_id).await?;
            // A chunk list recorded before means the NAR was stored before
            // and withdrawn (a chunk of it found damaged): the chunks just
            // stored again may complete other withdrawn NARs too, as the
            // compressor's do. A few chunks, and a rare case.
            let chunks: Vec<ChunkId> = database
                .chunks_of_nar(nar_id)
                .await?
                .into_iter()
                .map(|entry| entry.chunk.id)
                .collect();
            for other in database.pending_nars_of_chunks(&chunks).await? {
                finalise_nar(database, &*self.storage, other).await?;
            }
        }
        Ok(())
    }

    /// Reads the staged NAR whole and cuts it, checking it against the
    /// upload's hash and size.
    async fn cut_whole(&self, upload: &Upload) -> Result<CutNar, JobError> {
        let staged = staged_object_key(&upload.staged_key)?;
        // In one read (one blocking-pool hop for local storage, one request
        // for S3). Bytes past the upload's size are not the NAR's: the
        // hash below proves that these are.
        let bytes = match self.storage.get_bytes(&staged, 0, upload.nar_size).await {
            Err(StorageError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                return Err(JobError::Permanent(format!(
                    "the staged NAR {staged} is shorter than its upload ({} bytes): staging \
                     storage corrupted it; push the path again",
                    upload.nar_size
                )))
            }
            read => read?,
        };
        let nar_size = upload.nar_size;
        let data = bytes.clone();
        // Hashing, cutting and reading the NAR are CPU work.
        let (chunks, found) = tokio::task::spawn_blocking(move || {
            // Room for every chunk the NAR can have, so that no send waits.
            let capacity = usize::try_from(max_chunk_entries(nar_size)).unwrap_or(usize::MAX) + 1;
            let (sender, mut receiver) = mpsc::channel(capacity.min(1 << 16));
            let found = cut(&data[..], nar_size, &sender)?;
            drop(sender);
            let mut chunks = Vec::new();
            while let Ok(chunk) = receiver.try_recv() {
                chunks.push(chunk);
            }
            Ok::<_, CutError>((chunks, found))
        })
        .await
        .map_err(|error| JobError::Permanent(format!("the chunking thread failed: {error}")))?
        .map_err(|error| crate::cut_error(&staged, error))?;
        crate::check_cut(upload, &staged, &found)?;
        Ok(CutNar {
            bytes,
            chunks,
            found,
        })
    }

    /// Compresses and writes the chunks of `cut` that are not stored, each
    /// under its content and the upload's id, and returns the NAR's chunk
    /// list with their locations.
    async fn store_new_chunks(
        &self,
        upload: &Upload,
        cut: &CutNar,
    ) -> Result<Vec<InlineChunk>, JobError> {
        let hashes: Vec<Sha256Hash> = cut
            .chunks
            .iter()
            .map(|chunk| chunk.hash)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let valid: HashSet<Sha256Hash> = self
            .database
            .chunks_by_hash(&hashes)
            .await?
            .into_iter()
            .filter(|chunk| chunk.state == StoreState::Valid)
            .map(|chunk| chunk.chunk_hash)
            .collect();
        let mut seen = HashSet::new();
        let mut to_store: Vec<(Sha256Hash, Bytes)> = Vec::new();
        let (mut deduplicated, mut deduplicated_bytes) = (0, 0);
        for chunk in &cut.chunks {
            if !valid.contains(&chunk.hash) && seen.insert(chunk.hash) {
                let start = chunk.offset as usize;
                let data = cut.bytes.slice(start..start + chunk.length as usize);
                to_store.push((chunk.hash, data));
            } else {
                // Stored already, or earlier in this NAR.
                deduplicated += 1;
                deduplicated_bytes += chunk.length;
            }
        }
        larder().chunks_deduplicated(deduplicated, deduplicated_bytes);
        let level = self.compression_level;
        let frames = tokio::task::spawn_blocking(move || compress_all(to_store, level))
            .await
            .map_err(|error| {
                JobError::Permanent(format!("the compressing thread failed: {error}"))
            })??;
        let mut locations: HashMap<Sha256Hash, ChunkLocation> = HashMap::new();
        let puts = frames.into_iter().map(|(hash, size, frame)| {
            let key = inline_chunk_object_key(&hash, &upload.id);
            async move {
                let location = ChunkLocation {
                    object_key: key.to_string(),
                    offset: 0,
                    length: frame.len() as u64,
                };
                self.storage.put(&key, frame).await?;
                Ok::<_, JobError>((hash, size, location))
            }
        });
        for (hash, size, location) in futures::future::try_join_all(puts).await? {
            larder().chunk_stored(size, location.length);
            locations.insert(hash, location);
        }
        Ok(cut
            .chunks
            .iter()
            .map(|chunk| InlineChunk {
                chunk_hash: chunk.hash,
                chunk_size: chunk.length,
                location: locations.get(&chunk.hash).cloned(),
            })
            .collect())
    }

    /// [`Database::finish_inline_upload`], a conflict being final: the
    /// NAR or a chunk of it is stored with another size.
    async fn finish(
        &self,
        upload: &Upload,
        content: Option<InlineContent<'_>>,
    ) -> Result<InlineOutcome, JobError> {
        match self
            .database
            .finish_inline_upload(upload, content, Timestamp::now())
            .await
        {
            Err(DbError::Conflict { what }) => Err(JobError::Permanent(format!(
                "NAR {} of {} bytes cannot be stored: {what} is stored already",
                upload.nar_hash, upload.nar_size
            ))),
            outcome => Ok(outcome?),
        }
    }

    async fn delete_object(&self, key: &str) -> Result<(), JobError> {
        let key = ObjectKey::new(key).map_err(|error| {
            JobError::Permanent(format!("invalid chunk object key {key:?}: {error}"))
        })?;
        self.storage.delete(&key).await?;
        Ok(())
    }
}

fn another_size(upload: &Upload) -> JobError {
    JobError::Permanent(format!(
        "NAR {} is already stored with another size than {}",
        upload.nar_hash, upload.nar_size
    ))
}

/// Compresses each chunk into one zstd frame at `level`, with one context
/// for them all: `(hash, uncompressed size, frame)`.
fn compress_all(
    chunks: Vec<(Sha256Hash, Bytes)>,
    level: i32,
) -> Result<Vec<(Sha256Hash, u64, Bytes)>, JobError> {
    let mut compressor = zstd::bulk::Compressor::new(level)
        .map_err(|error| JobError::Permanent(format!("starting zstd: {error}")))?;
    chunks
        .into_iter()
        .map(|(hash, data)| {
            let frame = compressor.compress(&data).map_err(|error| {
                JobError::Permanent(format!("compressing chunk {}: {error}", hash.to_hex()))
            })?;
            Ok((hash, data.len() as u64, Bytes::from(frame)))
        })
        .collect()
}
