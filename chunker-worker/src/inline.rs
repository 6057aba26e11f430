//! Small NARs, which the chunker stores itself: a NAR of at most
//! [`INLINE_NAR_BYTES`] (a few chunks) is read whole, cut and checked as
//! any other, its new chunks compressed and written here into one pack,
//! and the rest is one transaction ([`Database::finish_inline_upload`]):
//! the pack's row, chunk rows,
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

use larder_db::chunking::max_chunk_entries;
use larder_db::{
    ChunkId, ChunkLocation, DbError, InlineChunk, InlineContent, InlineOutcome, NewPack,
    StoreState, Timestamp, Upload,
};
use larder_nix::Sha256Hash;
use larder_service::metrics::larder;
use larder_service::worker::{finalise_nar, staged_object_key, upload_made_visible, JobError};
use larder_storage::pack::{PackWriter, PackedRange};
use larder_storage::StorageError;

use crate::{cut, Chunker, Cut, CutChunk, CutError, StagedDigest};

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
            let (chunks, pack) = self.store_new_chunks(&cut).await?;
            let content = InlineContent {
                chunks: &chunks,
                pack: pack.as_ref(),
                listing: cut.found.listing.as_ref(),
            };
            outcome = self.finish(upload, Some(content)).await?;
        }
        let (visible, others_waiting) = match outcome {
            InlineOutcome::Finished {
                visible,
                others_waiting,
            } => (visible, others_waiting),
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
        let expected = StagedDigest::of(upload);
        let data = bytes.clone();
        // Hashing, cutting and reading the NAR are CPU work.
        let (chunks, found) = tokio::task::spawn_blocking(move || {
            // Room for every chunk the NAR can have, so that no send waits.
            let capacity = usize::try_from(max_chunk_entries(nar_size)).unwrap_or(usize::MAX) + 1;
            let (sender, mut receiver) = mpsc::channel(capacity.min(1 << 16));
            let found = cut(&data[..], nar_size, expected, &sender)?;
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

    /// Compresses the chunks of `cut` that are not stored into one new
    /// pack, and returns the NAR's chunk list with their locations in it,
    /// and the pack (none when every chunk was stored).
    async fn store_new_chunks(
        &self,
        cut: &CutNar,
    ) -> Result<(Vec<InlineChunk>, Option<NewPack>), JobError> {
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
        let mut locations: HashMap<Sha256Hash, ChunkLocation> = HashMap::new();
        let mut pack = None;
        if !to_store.is_empty() {
            let writer = PackWriter::create(&*self.storage).await?;
            let level = self.compression_level;
            // Compressing and (on local storage) writing are blocking work.
            let (writer, placed) =
                tokio::task::spawn_blocking(move || pack_all(writer, to_store, level))
                    .await
                    .map_err(|error| {
                        JobError::Permanent(format!("the compressing thread failed: {error}"))
                    })??;
            let (key, size) = writer.finish(&*self.storage).await?;
            for (hash, chunk_size, range) in placed {
                larder().chunk_stored(chunk_size, range.length);
                locations.insert(
                    hash,
                    ChunkLocation {
                        object_key: key.to_string(),
                        offset: range.offset,
                        length: range.length,
                    },
                );
            }
            pack = Some(NewPack {
                object_key: key.to_string(),
                size,
            });
        }
        let chunks = cut
            .chunks
            .iter()
            .map(|chunk| InlineChunk {
                chunk_hash: chunk.hash,
                chunk_size: chunk.length,
                location: locations.get(&chunk.hash).cloned(),
            })
            .collect();
        Ok((chunks, pack))
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
}

fn another_size(upload: &Upload) -> JobError {
    JobError::Permanent(format!(
        "NAR {} is already stored with another size than {}",
        upload.nar_hash, upload.nar_size
    ))
}

/// Compresses each chunk into one zstd frame at `level`, with one context
/// for them all, appended to `pack`: `(hash, uncompressed size, where its
/// frame is)` for each.
#[allow(clippy::type_complexity)]
fn pack_all(
    mut pack: PackWriter,
    chunks: Vec<(Sha256Hash, Bytes)>,
    level: i32,
) -> Result<(PackWriter, Vec<(Sha256Hash, u64, PackedRange)>), JobError> {
    let mut compressor = zstd::bulk::Compressor::new(level)
        .map_err(|error| JobError::Permanent(format!("starting zstd: {error}")))?;
    let mut placed = Vec::with_capacity(chunks.len());
    for (hash, data) in chunks {
        let frame = compressor.compress(&data).map_err(|error| {
            JobError::Permanent(format!("compressing chunk {}: {error}", hash.to_hex()))
        })?;
        placed.push((hash, data.len() as u64, pack.append(&frame)?));
    }
    Ok((pack, placed))
}
