//! The local-directory storage backend, for a single machine.
//!
//! Writes go to a temporary file beside the target and are renamed into
//! place once complete and flushed, so a crash mid-write never leaves a
//! truncated object under a real key.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::fs;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{ListedObject, ObjectKey, ObjectListing, ObjectReader, Storage, StorageError};

/// Objects as files under one root directory.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Opens (creating if needed) the storage directory.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        fs::create_dir_all(&root)
            .await
            .map_err(|source| StorageError::Io {
                key: root.display().to_string(),
                source,
            })?;
        Ok(Self { root })
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        // ObjectKey guarantees relative, `..`-free segments.
        self.root.join(key.as_str())
    }

    /// Writes through a unique temporary file and renames it into place.
    async fn write_atomically(
        &self,
        key: &ObjectKey,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError> {
        let path = self.path_of(key);
        let parent = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent)
            .await
            .map_err(|source| StorageError::io(key, source))?;
        let temporary = temporary_sibling(&path);
        let result = async {
            let mut file = fs::File::create(&temporary).await?;
            let written = tokio::io::copy(reader, &mut file).await?;
            file.flush().await?;
            file.sync_data().await?;
            fs::rename(&temporary, &path).await?;
            Ok::<_, io::Error>(written)
        }
        .await;
        if result.is_err() {
            // Best effort: the reaper would not find a file with this name.
            let _ = fs::remove_file(&temporary).await;
        }
        result.map_err(|source| StorageError::io(key, source))
    }
}

/// Where [`LocalStorage::list`] is: the directories still to read, and the
/// entries of the one being read.
struct Walk {
    root: PathBuf,
    directories: Vec<PathBuf>,
    current: Option<fs::ReadDir>,
}

impl Walk {
    /// The next file under the walk's directories, depth first.
    async fn next_object(&mut self) -> Result<Option<ListedObject>, StorageError> {
        loop {
            let Some(entries) = self.current.as_mut() else {
                let Some(directory) = self.directories.pop() else {
                    return Ok(None);
                };
                match fs::read_dir(&directory).await {
                    Ok(entries) => self.current = Some(entries),
                    // Deleted meanwhile, or never created: nothing in it.
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(self.io_error(&directory, source)),
                }
                continue;
            };
            let entry = match entries.next_entry().await {
                Ok(Some(entry)) => entry,
                Ok(None) => {
                    self.current = None;
                    continue;
                }
                Err(source) => return Err(self.io_error(&self.root.clone(), source)),
            };
            let path = entry.path();
            let metadata = match entry.metadata().await {
                Ok(metadata) => metadata,
                // Removed between the listing and the look.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(self.io_error(&path, source)),
            };
            if metadata.is_dir() {
                self.directories.push(path);
                continue;
            }
            // Names no key can have were not written through this trait.
            let Some(key) = path
                .strip_prefix(&self.root)
                .ok()
                .and_then(Path::to_str)
                .and_then(|relative| ObjectKey::new(relative).ok())
            else {
                continue;
            };
            let last_modified = metadata
                .modified()
                .map_err(|source| self.io_error(&path, source))?;
            return Ok(Some(ListedObject {
                key,
                size: metadata.len(),
                last_modified,
            }));
        }
    }

    fn io_error(&self, path: &Path, source: io::Error) -> StorageError {
        StorageError::Io {
            key: path
                .strip_prefix(&self.root)
                .unwrap_or(path)
                .display()
                .to_string(),
            source,
        }
    }
}

/// Writes each object through a temporary file renamed into place, then
/// makes the whole batch durable with one `syncfs`: one journal commit for
/// the batch, where a sync per file costs a commit each (the pipeline
/// writes one object per 64 KiB chunk). Until the sync returns, the caller
/// records none of them, so a crash before it leaves at worst files that no
/// row names, which GC's orphan sweep removes or a retry overwrites.
fn write_batch(root: &Path, objects: &[(ObjectKey, Bytes)]) -> Result<(), StorageError> {
    for (key, data) in objects {
        let path = root.join(key.as_str());
        let parent = path.parent().unwrap_or(root);
        std::fs::create_dir_all(parent).map_err(|source| StorageError::io(key, source))?;
        let temporary = temporary_sibling(&path);
        let written =
            std::fs::write(&temporary, data).and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(source) = written {
            // Best effort, as in `write_atomically`.
            let _ = std::fs::remove_file(&temporary);
            return Err(StorageError::io(key, source));
        }
    }
    let directory =
        std::fs::File::open(root).map_err(|source| StorageError::io(root.display(), source))?;
    rustix::fs::syncfs(&directory).map_err(|errno| StorageError::io(root.display(), errno.into()))
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
    path.with_file_name(name)
}

#[async_trait]
impl Storage for LocalStorage {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError> {
        self.write_atomically(key, &mut data.as_ref()).await?;
        Ok(())
    }

    async fn put_many(&self, objects: Vec<(ObjectKey, Bytes)>) -> Result<(), StorageError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || write_batch(&root, &objects))
            .await
            .map_err(|error| StorageError::io(self.root.display(), io::Error::other(error)))?
    }

    async fn put_reader(
        &self,
        key: &ObjectKey,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError> {
        self.write_atomically(key, reader).await
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: Option<u64>,
    ) -> Result<ObjectReader, StorageError> {
        let mut file = match fs::File::open(self.path_of(key)).await {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound(key.clone()))
            }
            Err(source) => {
                return Err(StorageError::Io {
                    key: key.to_string(),
                    source,
                })
            }
        };
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|source| StorageError::Io {
                key: key.to_string(),
                source,
            })?;
        Ok(match length {
            Some(length) => Box::pin(file.take(length)),
            None => Box::pin(file),
        })
    }

    /// One blocking-pool hop for the whole range, rather than one per read
    /// of a streamed file: serving a NAR reads thousands of chunks.
    async fn get_bytes(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StorageError> {
        let path = self.path_of(key);
        let owned_key = key.clone();
        let read = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(path)?;
            let mut buffer = vec![0; usize::try_from(length).map_err(io::Error::other)?];
            file.read_exact_at(&mut buffer, offset)?;
            Ok::<_, io::Error>(buffer)
        })
        .await
        .map_err(|join_error| StorageError::Io {
            key: key.to_string(),
            source: io::Error::other(join_error),
        })?;
        match read {
            Ok(buffer) => Ok(buffer.into()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Err(StorageError::NotFound(owned_key))
            }
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                Err(super::short_object(key, offset, length))
            }
            Err(source) => Err(StorageError::Io {
                key: key.to_string(),
                source,
            }),
        }
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StorageError> {
        match fs::metadata(self.path_of(key)).await {
            Ok(metadata) => Ok(Some(metadata.len())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StorageError::Io {
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Creates and removes a probe file in the root directory itself,
    /// without creating the root again: a storage directory that vanished
    /// (an unmounted volume) is not ready, even though the next `put` would
    /// recreate it empty.
    async fn check(&self) -> Result<(), StorageError> {
        let probe = self
            .root
            .join(format!(".ready-probe-{:016x}", rand::random::<u64>()));
        let io_error = |source| StorageError::Io {
            key: self.root.display().to_string(),
            source,
        };
        fs::write(&probe, b"").await.map_err(io_error)?;
        fs::remove_file(&probe).await.map_err(io_error)
    }

    /// The file system's space available to unprivileged writers
    /// (`statvfs`: free blocks for users times the fragment size), on a
    /// blocking thread (a network file system may take its time).
    async fn available_bytes(&self) -> Result<Option<u64>, StorageError> {
        let root = self.root.clone();
        let io_error = |source| StorageError::Io {
            key: self.root.display().to_string(),
            source,
        };
        let stats = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&root))
            .await
            .map_err(|join_error| io_error(io::Error::other(join_error)))?
            .map_err(|errno| io_error(io::Error::from(errno)))?;
        Ok(Some(stats.f_bavail.saturating_mul(stats.f_frsize)))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        match fs::remove_file(self.path_of(key)).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StorageError::Io {
                key: key.to_string(),
                source,
            }),
        }
    }
    /// Walks the directory tree one entry at a time. Temporary files of
    /// writes in progress (or of a crashed writer) are listed too: they
    /// are real files under the prefix.
    fn list(&self, prefix: &ObjectKey) -> ObjectListing {
        let walk = Walk {
            root: self.root.clone(),
            directories: vec![self.path_of(prefix)],
            current: None,
        };
        Box::pin(futures::stream::try_unfold(walk, |mut walk| async move {
            Ok(walk.next_object().await?.map(|object| (object, walk)))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(mut reader: ObjectReader) -> Vec<u8> {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.expect("read object");
        out
    }

    #[tokio::test]
    async fn put_get_range_size_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::open(dir.path()).await.expect("open");
        let key = ObjectKey::new("chunks/ab/abc.zst").expect("key");

        assert_eq!(storage.size(&key).await.expect("size"), None);
        assert!(matches!(
            storage.get_range(&key, 0, None).await,
            Err(StorageError::NotFound(_))
        ));

        storage
            .put(&key, Bytes::from_static(b"0123456789"))
            .await
            .expect("put");
        assert_eq!(storage.size(&key).await.expect("size"), Some(10));
        let whole = storage.get_range(&key, 0, None).await.expect("get");
        assert_eq!(read_all(whole).await, b"0123456789");
        let middle = storage.get_range(&key, 3, Some(4)).await.expect("get");
        assert_eq!(read_all(middle).await, b"3456");

        storage.delete(&key).await.expect("delete");
        storage.delete(&key).await.expect("deleting twice is fine");
        assert_eq!(storage.size(&key).await.expect("size"), None);
    }

    #[tokio::test]
    async fn lists_every_object_under_a_prefix_at_any_depth() {
        use futures::TryStreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::open(dir.path()).await.expect("open");
        for key in [
            "chunks/ab/1.zst",
            "chunks/cd/2.zst",
            "chunksx/3",
            "staging/4.nar",
        ] {
            let key = ObjectKey::new(key).expect("key");
            storage
                .put(&key, Bytes::from_static(b"xyz"))
                .await
                .expect("put");
        }
        let prefix = ObjectKey::new("chunks").expect("key");
        let mut listed: Vec<ListedObject> =
            storage.list(&prefix).try_collect().await.expect("list");
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = listed.iter().map(|object| object.key.as_str()).collect();
        assert_eq!(keys, ["chunks/ab/1.zst", "chunks/cd/2.zst"]);
        assert!(listed.iter().all(|object| object.size == 3));
        let missing = ObjectKey::new("nothing").expect("key");
        let none: Vec<ListedObject> = storage.list(&missing).try_collect().await.expect("list");
        assert!(none.is_empty());
    }

    #[test]
    fn full_and_over_quota_file_systems_are_out_of_space() {
        for errno in [28, 122] {
            let error = StorageError::io("staging/x", io::Error::from_raw_os_error(errno));
            assert!(
                matches!(error, StorageError::OutOfSpace { .. }),
                "{errno}: {error:?}"
            );
        }
        let error = StorageError::io("staging/x", io::Error::from_raw_os_error(13));
        assert!(matches!(error, StorageError::Io { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn available_bytes_are_those_of_the_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::open(dir.path()).await.expect("open");
        let available = storage
            .available_bytes()
            .await
            .expect("statvfs")
            .expect("local storage knows its room");
        assert!(available > 0, "the temporary directory has room");
    }

    #[tokio::test]
    async fn streamed_put_replaces_whole_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::open(dir.path()).await.expect("open");
        let key = ObjectKey::new("staging/u1.nar").expect("key");
        storage
            .put(&key, Bytes::from_static(b"old contents"))
            .await
            .expect("put");
        let mut body: &[u8] = b"new";
        let written = storage.put_reader(&key, &mut body).await.expect("put");
        assert_eq!(written, 3);
        let read = storage.get_range(&key, 0, None).await.expect("get");
        assert_eq!(read_all(read).await, b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("staging"))
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec!["u1.nar"]);
    }
}
