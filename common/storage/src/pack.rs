//! Pack objects: many frames (a chunk's compressed bytes each) written one
//! after another into one storage object, so that storing and serving cost
//! a few requests per pack rather than one per chunk.
//!
//! A [`PackWriter`] appends frames from a blocking thread and says where
//! each one landed; [`PackWriter::finish`] makes the whole object durable
//! under a fresh key (`packs/<2 hex>/<32 hex>.pack`). Where storage has no
//! blocking writer (S3), the frames go to a temporary file first
//! (`std::env::temp_dir()`, so `TMPDIR`), put in one request when the pack
//! is finished: a pack never sits in memory, so a worker's memory does not
//! grow with `[pipeline] pack-size` times the jobs it runs at once.
//!
//! Nothing here knows what a frame holds: the database records which chunk
//! sits at which range, and only after `finish` returned (see
//! `larder_db`'s `packs` table).

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};

use bytes::Bytes;
use tempfile::TempPath;

use super::{BlockingWriter, ObjectKey, Storage, StorageError};

/// The first segment of every pack's key.
pub const PACK_PREFIX: &str = "packs";

/// How much uncompressed chunk data goes into one pack when there is that
/// much to store: about 28 MiB of frames at zstd level 3, so a GiB of new
/// NAR costs about 37 puts. GC's compaction writes packs of this size; the
/// pipeline's `[pipeline] pack-size` defaults to it.
pub const PACK_TARGET_BYTES: u64 = 32 << 20;

/// A fresh, unique pack key: random, so that two writers never share one
/// and a retried job never overwrites a pack a committed row points into.
pub fn new_pack_key() -> ObjectKey {
    let id = hex::encode(rand::random::<[u8; 16]>());
    ObjectKey::new(format!("{PACK_PREFIX}/{}/{id}.pack", &id[..2]))
        .expect("a fixed prefix and hex digits make a valid key")
}

/// Whether `key` names a pack (as opposed to the one-chunk objects of a
/// store written before packs existed).
pub fn is_pack_key(key: &str) -> bool {
    super::is_under(key, PACK_PREFIX)
}

/// A pack being written. Its appends are blocking calls: call them from a
/// blocking thread (a compressing job's), never an async worker.
pub struct PackWriter {
    key: ObjectKey,
    size: u64,
    sink: Sink,
}

enum Sink {
    /// Written in place as frames come (local files).
    Blocking(Box<dyn BlockingWriter>),
    /// Written to a temporary file, made at the first append (on the
    /// appending blocking thread), then put in one request (S3): one put
    /// per pack. Dropping it deletes the file.
    Spilled(Option<Spill>),
}

/// A pack's temporary file, and the CRC-32 of what was written to it (the
/// put sends it, so the file is read once, by the put).
struct Spill {
    file: BufWriter<File>,
    path: TempPath,
    crc32: crc32fast::Hasher,
}

/// The buffer between appended frames and a spilled pack's file.
const SPILL_BUFFER: usize = 1 << 20;

impl fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackWriter")
            .field("key", &self.key)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Where a frame landed in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedRange {
    pub offset: u64,
    pub length: u64,
}

impl PackWriter {
    /// Starts a pack under a fresh key.
    pub async fn create(storage: &dyn Storage) -> Result<Self, StorageError> {
        let key = new_pack_key();
        let sink = match storage.blocking_writer(&key).await? {
            Some(writer) => Sink::Blocking(writer),
            None => Sink::Spilled(None),
        };
        Ok(Self { key, size: 0, sink })
    }

    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    /// Bytes appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends one frame (blocking: see the type's documentation).
    pub fn append(&mut self, frame: &[u8]) -> Result<PackedRange, StorageError> {
        match &mut self.sink {
            Sink::Blocking(writer) => writer.write(frame)?,
            Sink::Spilled(spill) => {
                let spill = match spill {
                    Some(spill) => spill,
                    None => {
                        let (file, path) = tempfile::NamedTempFile::with_prefix("larder-pack-")
                            .map_err(|error| StorageError::io(&self.key, error))?
                            .into_parts();
                        spill.insert(Spill {
                            file: BufWriter::with_capacity(SPILL_BUFFER, file),
                            path,
                            crc32: crc32fast::Hasher::new(),
                        })
                    }
                };
                spill
                    .file
                    .write_all(frame)
                    .map_err(|error| StorageError::io(&self.key, error))?;
                spill.crc32.update(frame);
            }
        }
        let range = PackedRange {
            offset: self.size,
            length: frame.len() as u64,
        };
        self.size += range.length;
        Ok(range)
    }

    /// Makes the pack durable under its key and returns the key and size.
    /// Dropped without this, a pack leaves nothing behind (local files) or
    /// was never written (S3; its temporary file is deleted).
    pub async fn finish(self, storage: &dyn Storage) -> Result<(ObjectKey, u64), StorageError> {
        let Self { key, size, sink } = self;
        let blocking = |key: &ObjectKey, error: tokio::task::JoinError| StorageError::Io {
            key: key.to_string(),
            source: std::io::Error::other(format!("the writing thread failed: {error}")),
        };
        match sink {
            Sink::Blocking(writer) => {
                tokio::task::spawn_blocking(move || writer.commit())
                    .await
                    .map_err(|error| blocking(&key, error))??;
            }
            Sink::Spilled(None) => storage.put(&key, Bytes::new()).await?,
            Sink::Spilled(Some(Spill { file, path, crc32 })) => {
                let flushing_key = key.clone();
                let path = tokio::task::spawn_blocking(move || {
                    file.into_inner()
                        .map_err(|error| StorageError::io(&flushing_key, error.into_error()))?;
                    Ok::<_, StorageError>(path)
                })
                .await
                .map_err(|error| blocking(&key, error))??;
                let put = storage.put_file(&key, &path, size, crc32.finalize()).await;
                // Deleting the file is a blocking call.
                tokio::task::spawn_blocking(move || drop(path));
                put?;
            }
        }
        Ok((key, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_keys_are_fresh_and_recognised() {
        let (a, b) = (new_pack_key(), new_pack_key());
        assert_ne!(a, b);
        assert!(is_pack_key(a.as_str()), "{a}");
        assert!(!is_pack_key("chunks/ab/abcdef-1.zst"));
        assert!(!is_pack_key("packsx/ab/c.pack"));
    }
}
