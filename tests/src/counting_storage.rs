//! A storage wrapper that counts what is asked of it, for tests that bound
//! how much storage work a request may cost (a NAR download, a listing).
//! Everything is passed through to the real backend unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use larder_storage::{
    BlockingWriter, ObjectKey, ObjectListing, ObjectReader, Storage, StorageError,
};
use tokio::io::AsyncRead;

/// Counts reads (ranged or whole) and size lookups; writes, deletes and
/// listings are not counted.
#[derive(Debug)]
pub struct CountingStorage {
    inner: Arc<dyn Storage>,
    reads: AtomicU64,
    size_lookups: AtomicU64,
}

impl CountingStorage {
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self {
            inner,
            reads: AtomicU64::new(0),
            size_lookups: AtomicU64::new(0),
        }
    }

    /// `get_range` and `get_bytes` calls so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// `size` calls so far.
    pub fn size_lookups(&self) -> u64 {
        self.size_lookups.load(Ordering::SeqCst)
    }

    /// Everything counted so far: reads and size lookups.
    pub fn requests(&self) -> u64 {
        self.reads() + self.size_lookups()
    }
}

#[async_trait]
impl Storage for CountingStorage {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError> {
        self.inner.put(key, data).await
    }

    async fn put_reader(
        &self,
        key: &ObjectKey,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError> {
        self.inner.put_reader(key, reader).await
    }

    async fn blocking_writer(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<Box<dyn BlockingWriter>>, StorageError> {
        self.inner.blocking_writer(key).await
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: Option<u64>,
    ) -> Result<ObjectReader, StorageError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_range(key, offset, length).await
    }

    async fn get_bytes(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StorageError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_bytes(key, offset, length).await
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StorageError> {
        self.size_lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.size(key).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.inner.delete(key).await
    }

    fn list(&self, prefix: &ObjectKey) -> ObjectListing {
        self.inner.list(prefix)
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.inner.check().await
    }
}
