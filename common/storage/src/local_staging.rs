//! S3 for what is kept, a local directory for what is staged: the
//! single-machine server's storage when `[storage] staging-path` is set.
//!
//! A pushed NAR is staged whole (`staging/…`) between the door and the
//! pipeline, read back once by the chunker and once more, in pieces, by
//! the compressors, then deleted. In an S3 bucket that is every byte
//! uploaded twice and a multipart part every 8 MiB, about 130 requests per
//! GiB before a single pack is written; on the machine's own disk it costs
//! no request at all. Only one process can use it: the workers of the
//! distributed topology run elsewhere and must read what the door staged,
//! so the config refuses it with a shared queue.
//!
//! Keys under `staging/` go to the local directory, every other key to the
//! bucket; room (`available_bytes`) is the local directory's, since that
//! is what a push fills first.

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;

use super::{
    BlockingWriter, LocalStorage, ObjectKey, ObjectListing, ObjectReader, Storage, StorageError,
};

/// The first segment of every staged object's key.
pub const STAGING_PREFIX: &str = "staging";

/// A bucket, with staged objects in a local directory instead.
#[derive(Debug)]
pub struct LocalStaging<Kept> {
    kept: Kept,
    staging: LocalStorage,
}

impl<Kept: Storage> LocalStaging<Kept> {
    pub fn new(kept: Kept, staging: LocalStorage) -> Self {
        Self { kept, staging }
    }

    fn route(&self, key: &ObjectKey) -> &dyn Storage {
        if super::is_under(key.as_str(), STAGING_PREFIX) {
            &self.staging
        } else {
            &self.kept
        }
    }
}

#[async_trait]
impl<Kept: Storage> Storage for LocalStaging<Kept> {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError> {
        self.route(key).put(key, data).await
    }

    async fn put_file(
        &self,
        key: &ObjectKey,
        path: &Path,
        size: u64,
        crc32: u32,
    ) -> Result<(), StorageError> {
        self.route(key).put_file(key, path, size, crc32).await
    }

    async fn put_reader(
        &self,
        key: &ObjectKey,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError> {
        self.route(key).put_reader(key, reader).await
    }

    async fn blocking_writer(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<Box<dyn BlockingWriter>>, StorageError> {
        self.route(key).blocking_writer(key).await
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: Option<u64>,
    ) -> Result<ObjectReader, StorageError> {
        self.route(key).get_range(key, offset, length).await
    }

    async fn get_bytes(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StorageError> {
        self.route(key).get_bytes(key, offset, length).await
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StorageError> {
        self.route(key).size(key).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.route(key).delete(key).await
    }

    fn list(&self, prefix: &ObjectKey) -> ObjectListing {
        self.route(prefix).list(prefix)
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.staging.check().await?;
        self.kept.check().await
    }

    async fn available_bytes(&self) -> Result<Option<u64>, StorageError> {
        self.staging.available_bytes().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    /// With a local directory standing in for the bucket: staged keys land
    /// in the staging directory, all others in the bucket's, and each side
    /// lists and reads its own.
    #[tokio::test]
    async fn staged_keys_go_to_the_local_directory_and_the_rest_to_the_bucket() {
        let (bucket, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let storage = LocalStaging::new(
            LocalStorage::open(bucket.path()).await.unwrap(),
            LocalStorage::open(staging.path()).await.unwrap(),
        );
        let staged = ObjectKey::new("staging/upload.nar").unwrap();
        let pack = ObjectKey::new("packs/ab/one.pack").unwrap();
        storage
            .put(&staged, Bytes::from_static(b"nar"))
            .await
            .unwrap();
        storage
            .put(&pack, Bytes::from_static(b"frames"))
            .await
            .unwrap();
        assert!(staging.path().join("staging/upload.nar").is_file());
        assert!(bucket.path().join("packs/ab/one.pack").is_file());
        assert!(!bucket.path().join("staging").exists());
        assert_eq!(&storage.get_bytes(&staged, 0, 3).await.unwrap()[..], b"nar");
        let listed: Vec<_> = storage
            .list(&ObjectKey::new(STAGING_PREFIX).unwrap())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, staged);
        storage.delete(&staged).await.unwrap();
        assert_eq!(storage.size(&staged).await.unwrap(), None);
        assert_eq!(storage.size(&pack).await.unwrap(), Some(6));
        assert!(storage.blocking_writer(&staged).await.unwrap().is_some());
    }
}
