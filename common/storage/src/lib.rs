//! Object storage for chunks and staged uploads: one small trait, a local
//! directory backend for a single machine, and S3 for
//! the distributed topology.
//!
//! # Modules
//!
//! - `local` — the local-directory backend.
//! - `s3` — the S3 backend.
//! - `local_staging` — S3 for what is kept, a local directory for staging.
//! - [`pack`] — pack objects: many chunks' frames in one object.
//!
//! Keys are validated relative paths (`chunks/ab/abcd….zst`,
//! `staging/<upload id>.nar`), so no backend ever has to defend itself
//! against `..` or absolute paths. Deleting a missing object succeeds: every
//! caller (GC, reaper, retrying worker) must be idempotent.

mod local;
mod local_staging;
pub mod pack;
mod s3;

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::AsyncRead;

pub use local::LocalStorage;
pub use local_staging::{LocalStaging, STAGING_PREFIX};
pub use s3::{S3Storage, PARTS_IN_FLIGHT, PART_SIZE};

/// A byte stream read from storage.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// An object found by [`Storage::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: ObjectKey,
    pub size: u64,
    /// When it was written.
    pub last_modified: SystemTime,
}

/// The objects under a prefix, fetched page by page as the stream is read.
pub type ObjectListing = Pin<Box<dyn Stream<Item = Result<ListedObject, StorageError>> + Send>>;

/// Longest key accepted; well under every backend's limit.
const MAX_KEY_LEN: usize = 512;

/// Failures of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {0} not found in storage")]
    NotFound(ObjectKey),
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("storage i/o on {key}")]
    Io {
        key: String,
        #[source]
        source: io::Error,
    },
    /// The backend has no room for the write: a full (or quota-limited)
    /// file system, or an S3 server answering 507.
    #[error("no space left in storage for {key}: {message}")]
    OutOfSpace { key: String, message: String },
    /// A remote backend refused or failed a request; `message` holds what it
    /// answered, or the chain of causes when no answer came.
    #[error("{operation} of {key} failed: {message}")]
    Backend {
        operation: &'static str,
        key: String,
        message: String,
    },
}

impl StorageError {
    /// An I/O failure on `key`: [`StorageError::OutOfSpace`] when the file
    /// system is full (`ENOSPC`) or the writer's disk quota is used up
    /// (`EDQUOT`), [`StorageError::Io`] otherwise.
    pub fn io(key: impl fmt::Display, source: io::Error) -> Self {
        let out_of_space = matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        );
        if out_of_space {
            Self::OutOfSpace {
                key: key.to_string(),
                message: source.to_string(),
            }
        } else {
            Self::Io {
                key: key.to_string(),
                source,
            }
        }
    }
}

/// A validated storage key: `/`-separated segments of `[A-Za-z0-9._-]`,
/// none empty, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub fn new(key: impl Into<String>) -> Result<Self, StorageError> {
        let key = key.into();
        let invalid = |reason| {
            Err(StorageError::InvalidKey {
                key: key.clone(),
                reason,
            })
        };
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return invalid("must be 1 to 512 bytes long");
        }
        for segment in key.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return invalid("has an empty, '.' or '..' segment");
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return invalid("may only contain letters, digits, '.', '_', '-' and '/'");
            }
        }
        Ok(Self(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The most puts [`Storage::put_many`] has in flight by default.
pub const PUTS_IN_FLIGHT: usize = 4;

/// A place that keeps immutable objects by key.
///
/// Objects are written whole and never modified; a `put` over an existing
/// key replaces it atomically (readers see the old or the new object, never
/// a mixture), which makes retried writes of content-addressed objects
/// harmless.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Stores `data` under `key`.
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError>;

    /// Stores several objects; when it returns `Ok`, every one is stored
    /// as durably as by [`put`](Self::put). On an error some may be stored
    /// and others not. The default puts [`PUTS_IN_FLIGHT`] at a time (on S3
    /// each put is a round trip that mostly waits); local storage writes
    /// them all and syncs once for the batch instead of once per object.
    async fn put_many(&self, objects: Vec<(ObjectKey, Bytes)>) -> Result<(), StorageError> {
        futures::stream::iter(objects)
            .map(|(key, data)| async move { self.put(&key, data).await })
            .buffer_unordered(PUTS_IN_FLIGHT)
            .try_collect()
            .await
    }

    /// Stores the file at `path`, `size` bytes with CRC-32 `crc32` (as its
    /// writer computed them), under `key`, streamed from disk in one request
    /// where the backend can (S3, which sends the CRC for the service to
    /// check): how a pack spilled to a temporary file is stored
    /// (`pack::PackWriter`), so that it is never held in memory whole. The
    /// default reads the file into memory, checks its size and CRC, and
    /// [`put`](Self::put)s it.
    async fn put_file(
        &self,
        key: &ObjectKey,
        path: &Path,
        size: u64,
        crc32: u32,
    ) -> Result<(), StorageError> {
        let data = tokio::fs::read(path)
            .await
            .map_err(|error| StorageError::io(key, error))?;
        if data.len() as u64 != size || crc32fast::hash(&data) != crc32 {
            return Err(StorageError::io(
                key,
                io::Error::other(format!(
                    "{} is not the {size} bytes with CRC-32 {crc32:08x} written to it",
                    path.display()
                )),
            ));
        }
        self.put(key, Bytes::from(data)).await
    }

    /// Stores everything `reader` yields under `key`, streaming, and returns
    /// the number of bytes written.
    async fn put_reader(
        &self,
        key: &ObjectKey,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError>;

    /// A writer of `key` driven by blocking calls, where the backend writes
    /// with blocking calls anyway (local files): a caller that produces the
    /// bytes on a blocking thread (the door's verification jobs) then writes
    /// them there too, with no thread hop per write. `None` where the
    /// backend's writes are asynchronous (S3): use
    /// [`put_reader`](Self::put_reader) then.
    async fn blocking_writer(
        &self,
        _key: &ObjectKey,
    ) -> Result<Option<Box<dyn BlockingWriter>>, StorageError> {
        Ok(None)
    }

    /// Reads `length` bytes from `offset` (the whole object from `offset`
    /// when `length` is `None`).
    async fn get_range(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: Option<u64>,
    ) -> Result<ObjectReader, StorageError>;

    /// Reads exactly `length` bytes from `offset` into memory: for small
    /// ranges such as one chunk, where a whole read in one go beats a
    /// stream. An object too short for the range is an error.
    async fn get_bytes(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StorageError> {
        let mut reader = self.get_range(key, offset, Some(length)).await?;
        let mut buffer = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut buffer)
            .await
            .map_err(|source| StorageError::Io {
                key: key.to_string(),
                source,
            })?;
        if buffer.len() as u64 != length {
            return Err(short_object(key, offset, length));
        }
        Ok(buffer.into())
    }

    /// Whether the object exists, and its size.
    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StorageError>;

    /// Deletes the object; a missing object counts as deleted.
    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError>;

    /// Every object whose key starts with `prefix` and a `/` (the objects
    /// "in the directory" `prefix`, at any depth), in no particular order,
    /// streamed a page at a time so that memory does not grow with the
    /// number of objects. Objects written or deleted while the listing is
    /// read may or may not appear. GC uses it to find objects no row
    /// references.
    fn list(&self, prefix: &ObjectKey) -> ObjectListing;

    /// Whether the storage is reachable and writable, cheaply, for a
    /// readiness probe: it writes or lists nothing that lasts.
    async fn check(&self) -> Result<(), StorageError>;

    /// How many more bytes can be written, where the backend can tell (a
    /// local file system's space available to unprivileged writers);
    /// `None` where room is the provider's business (S3).
    async fn available_bytes(&self) -> Result<Option<u64>, StorageError> {
        Ok(None)
    }
}

/// An object being written with blocking calls (from
/// [`Storage::blocking_writer`]), on a thread that may block: a blocking
/// pool's, never an async worker's. It appears under its key, whole, only
/// once [`commit`](Self::commit) succeeds; dropped before that, it removes
/// what it wrote.
pub trait BlockingWriter: Send + fmt::Debug {
    /// Appends `bytes` to the object.
    fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError>;

    /// Makes the object durable and puts it under its key, replacing any
    /// object there, and returns its size.
    fn commit(self: Box<Self>) -> Result<u64, StorageError>;
}

/// Opens the storage a server config names: what every service process
/// does at start.
pub async fn open(
    config: &larder_config::StorageConfig,
) -> Result<std::sync::Arc<dyn Storage>, StorageError> {
    use larder_config::StorageConfig;
    Ok(match config {
        StorageConfig::Local { path } => std::sync::Arc::new(LocalStorage::open(path).await?),
        StorageConfig::S3(s3) => match &s3.staging_path {
            Some(path) => std::sync::Arc::new(LocalStaging::new(
                S3Storage::new(s3).await?,
                LocalStorage::open(path).await?,
            )),
            None => std::sync::Arc::new(S3Storage::new(s3).await?),
        },
    })
}

/// Whether `key` lies in the "directory" `prefix`: its first segment, or
/// segments, are `prefix`.
pub fn is_under(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Splits `items`, ranges of one object in offset order, into runs of
/// adjacent ranges to be read with one request each: a run ends where the
/// next range does not start at its end, or would take it past
/// `max_bytes` (a range longer than that is a run of its own). `range`
/// gives an item's `(offset, length)`; an item without one is a run of its
/// own.
pub fn adjacent_runs<T>(
    items: &[T],
    max_bytes: u64,
    range: impl Fn(&T) -> Option<(u64, u64)>,
) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let mut first = 0;
    // Where the run being built starts and ends; `None` after an item
    // without a range.
    let mut span: Option<(u64, u64)> = None;
    for (i, item) in items.iter().enumerate() {
        let next = range(item);
        let joins = match (span, next) {
            (Some((start, end)), Some((offset, length))) => {
                offset == end && end - start + length <= max_bytes
            }
            _ => false,
        };
        if i > first && !joins {
            runs.push(&items[first..i]);
            first = i;
        }
        span = next.map(|(offset, length)| match span {
            Some((start, _)) if joins => (start, offset + length),
            _ => (offset, offset + length),
        });
    }
    if first < items.len() {
        runs.push(&items[first..]);
    }
    runs
}

/// The error for a ranged read past the end of an object.
fn short_object(key: &ObjectKey, offset: u64, length: u64) -> StorageError {
    StorageError::Io {
        key: key.to_string(),
        source: io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "object is shorter than the range {offset}..{}",
                offset + length
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_ranges_make_runs_up_to_a_bound() {
        let ranges = [
            Some((0, 10)),
            Some((10, 5)),
            Some((30, 5)),
            Some((35, 1)),
            None,
            Some((36, 20)),
            Some((56, 4)),
        ];
        let runs = |max_bytes| -> Vec<usize> {
            adjacent_runs(&ranges, max_bytes, |range| *range)
                .iter()
                .map(|run| run.len())
                .collect()
        };
        assert_eq!(runs(1000), [2, 2, 1, 2]);
        assert_eq!(runs(15), [2, 2, 1, 1, 1]);
        assert!(adjacent_runs(&[] as &[Option<(u64, u64)>], 15, |range| *range).is_empty());
        assert!(is_under("staging/a.nar", "staging") && is_under("staging", "staging"));
        assert!(!is_under("stagingx/a", "staging") && !is_under("packs/a", "staging"));
    }

    #[test]
    fn keys_are_plain_relative_paths() {
        for ok in ["chunks/ab/abcdef.zst", "staging/x.nar", "a"] {
            assert_eq!(ObjectKey::new(ok).expect(ok).as_str(), ok);
        }
        for bad in [
            "", "/abs", "a//b", "a/../b", "..", "./a", "a/", "a b", "a\\b", "ü",
        ] {
            assert!(ObjectKey::new(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(ObjectKey::new("a".repeat(MAX_KEY_LEN + 1)).is_err());
    }
}
