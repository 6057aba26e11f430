//! Pack objects: many frames (a chunk's compressed bytes each) written one
//! after another into one storage object, so that storing and serving cost
//! a few requests per pack rather than one per chunk.
//!
//! A [`PackWriter`] appends frames from a blocking thread and says where
//! each one landed; [`PackWriter::finish`] makes the whole object durable
//! under a fresh key (`packs/<2 hex>/<32 hex>.pack`). Nothing here knows what
//! a frame holds: the database records which chunk sits at which range,
//! and only after `finish` returned (see `common::db`'s `packs` table).

use std::fmt;

use super::{BlockingWriter, ObjectKey, Storage, StorageError};
use bytes::Bytes;

/// The first segment of every pack's key.
pub const PACK_PREFIX: &str = "packs";

/// How much uncompressed chunk data goes into one pack when there is that
/// much to store: about 28 MiB of frames at zstd level 3, so a GiB of new
/// NAR costs about 37 puts, and a pack buffered for S3 stays a bounded
/// part of a worker's memory. GC's compaction writes packs of this size;
/// the pipeline's `[pipeline] pack-size` defaults to it.
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
    /// Written in place as frames come (local files): no copy in memory.
    Blocking(Box<dyn BlockingWriter>),
    /// Collected, then put in one request (S3): one put per pack.
    Memory(Vec<u8>),
}

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
            None => Sink::Memory(Vec::new()),
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
            Sink::Memory(buffer) => buffer.extend_from_slice(frame),
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
    /// was never written (S3).
    pub async fn finish(self, storage: &dyn Storage) -> Result<(ObjectKey, u64), StorageError> {
        let Self { key, size, sink } = self;
        match sink {
            Sink::Blocking(writer) => {
                tokio::task::spawn_blocking(move || writer.commit())
                    .await
                    .map_err(|error| StorageError::Io {
                        key: key.to_string(),
                        source: std::io::Error::other(format!(
                            "the writing thread failed: {error}"
                        )),
                    })??;
            }
            Sink::Memory(buffer) => storage.put(&key, Bytes::from(buffer)).await?,
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
