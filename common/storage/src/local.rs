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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

use super::{
    BlockingWriter, ListedObject, ObjectKey, ObjectListing, ObjectReader, Storage, StorageError,
};

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

    /// A writer of `key` through a fresh temporary file beside it, made
    /// on the calling thread (a blocking one).
    fn start_writer(&self, key: &ObjectKey) -> Result<LocalWriter, StorageError> {
        let path = self.path_of(key);
        let parent = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|source| StorageError::io(key, source))?;
        let temporary = temporary_sibling(&path);
        let file =
            std::fs::File::create(&temporary).map_err(|source| StorageError::io(key, source))?;
        Ok(LocalWriter {
            key: key.clone(),
            file,
            temporary,
            path,
            written: 0,
            unflushed: 0,
            flushing: None,
            hole_at_end: false,
            committed: false,
        })
    }

    /// A writer of `key`, started on a blocking thread.
    async fn writer(&self, key: &ObjectKey) -> Result<LocalWriter, StorageError> {
        let storage = self.clone();
        let owned_key = key.clone();
        on_blocking_thread(key, move || storage.start_writer(&owned_key)).await
    }
}

/// Runs blocking file work on tokio's blocking pool.
async fn on_blocking_thread<T: Send + 'static>(
    key: &ObjectKey,
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join_error| StorageError::io(key, io::Error::other(join_error)))?
}

/// The most bytes [`LocalStorage::put_reader`] reads before it writes them
/// in one blocking job: a thread hop per megabyte, not per small read.
const PUT_READER_STEP: usize = 1 << 20;

/// Bytes written after which a [`LocalWriter`] has the disk start on them
/// in the background (see [`LocalWriter::flush_in_background`]).
const BACKGROUND_SYNC_STEP: u64 = 16 << 20;

/// An object being written to a temporary file beside its path, renamed
/// into place by [`BlockingWriter::commit`] once flushed to disk; dropped
/// uncommitted, it removes the temporary file, so neither a failed nor an
/// abandoned write leaves anything behind.
#[derive(Debug)]
struct LocalWriter {
    key: ObjectKey,
    file: std::fs::File,
    temporary: PathBuf,
    path: PathBuf,
    written: u64,
    /// Bytes written since the last background flush began.
    unflushed: u64,
    /// The background flush in progress, if any: at most one per object.
    flushing: Option<tokio::task::JoinHandle<()>>,
    /// Whether the last bytes were skipped as a hole, so that the file's
    /// length must be set at the commit.
    hole_at_end: bool,
    committed: bool,
}

impl LocalWriter {
    /// Starts flushing what was written so far on another blocking thread,
    /// unless a flush is still running or there is no runtime to run it:
    /// the disk then writes a large object while the rest of it arrives,
    /// and the commit's own flush waits only for the tail, instead of for
    /// all of it at the end (about a second per 600 MB here). The flush
    /// goes through a descriptor of its own, so that a write-back error it
    /// meets is still reported to the commit's flush, which alone decides.
    fn flush_in_background(&mut self) {
        if self.unflushed < BACKGROUND_SYNC_STEP
            || self
                .flushing
                .as_ref()
                .is_some_and(|flush| !flush.is_finished())
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(file) = std::fs::File::open(&self.temporary) else {
            // Only an early start is lost; the commit flushes everything.
            return;
        };
        self.unflushed = 0;
        self.flushing = Some(runtime.spawn_blocking(move || {
            // The commit's own flush reports failures.
            let _ = file.sync_data();
        }));
    }
}

/// The unit of holes in written files: a whole block of zeros at a
/// multiple of this offset is skipped rather than written. The page size,
/// and the block size of common file systems.
const HOLE_BLOCK: u64 = 4096;

/// What a hole reads as.
static ZERO_BLOCK: [u8; HOLE_BLOCK as usize] = [0; HOLE_BLOCK as usize];

/// How `bytes`, written at `position` of a file, split into runs to write
/// and runs to skip: `(length, is_hole)` in order, alternating. A hole is
/// whole [`HOLE_BLOCK`]s of zeros at block boundaries; everything else is
/// written, so a file with no long runs of zeros is written as one run.
fn hole_runs(position: u64, bytes: &[u8]) -> Vec<(usize, bool)> {
    let mut runs: Vec<(usize, bool)> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let to_boundary = (HOLE_BLOCK - (position + at as u64) % HOLE_BLOCK) as usize;
        let piece = &bytes[at..(at + to_boundary).min(bytes.len())];
        // A slice comparison is a `memcmp`: fast in every build.
        let hole = piece == ZERO_BLOCK.as_slice();
        match runs.last_mut() {
            Some((length, was_hole)) if *was_hole == hole => *length += piece.len(),
            _ => runs.push((piece.len(), hole)),
        }
        at += piece.len();
    }
    runs
}

impl BlockingWriter for LocalWriter {
    /// Writes `bytes`, leaving whole blocks of zeros as holes (see
    /// [`hole_runs`]): a NAR of a disk image or a sparse file takes the
    /// room of its data in staging, not of its size.
    fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        use std::io::{Seek, SeekFrom, Write};
        let mut at = 0;
        for (length, hole) in hole_runs(self.written, bytes) {
            let done = if hole {
                // Bounded by the write's length, far below i64.
                self.file.seek(SeekFrom::Current(length as i64)).map(drop)
            } else {
                self.file.write_all(&bytes[at..at + length])
            };
            done.map_err(|source| StorageError::io(&self.key, source))?;
            at += length;
            self.written += length as u64;
            self.hole_at_end = hole;
        }
        self.unflushed += bytes.len() as u64;
        self.flush_in_background();
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<u64, StorageError> {
        if self.hole_at_end {
            // A hole at the end is not there until the file's length says so.
            self.file
                .set_len(self.written)
                .map_err(|source| StorageError::io(&self.key, source))?;
        }
        self.file
            .sync_data()
            .and_then(|()| std::fs::rename(&self.temporary, &self.path))
            .map_err(|source| StorageError::io(&self.key, source))?;
        self.committed = true;
        Ok(self.written)
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the temporary name is not one the reaper knows.
            let _ = std::fs::remove_file(&self.temporary);
        }
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
            // Best effort: a leftover temporary file is an orphan GC sweeps.
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
    /// One blocking job for the whole write.
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError> {
        let storage = self.clone();
        let owned_key = key.clone();
        on_blocking_thread(key, move || {
            let mut writer = Box::new(storage.start_writer(&owned_key)?);
            writer.write(&data)?;
            writer.commit()
        })
        .await?;
        Ok(())
    }

    async fn put_many(&self, objects: Vec<(ObjectKey, Bytes)>) -> Result<(), StorageError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || write_batch(&root, &objects))
            .await
            .map_err(|error| StorageError::io(self.root.display(), io::Error::other(error)))?
    }

    /// Reads up to [`PUT_READER_STEP`] at a time and writes each in one
    /// blocking job.
    async fn put_reader(
        &self,
        key: &ObjectKey,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError> {
        let mut writer = Box::new(self.writer(key).await?);
        let mut buffer = Vec::with_capacity(PUT_READER_STEP);
        loop {
            buffer.clear();
            let read = (&mut *reader)
                .take(PUT_READER_STEP as u64)
                .read_to_end(&mut buffer)
                .await
                .map_err(|source| StorageError::io(key, source))?;
            if read == 0 {
                return on_blocking_thread(key, move || writer.commit()).await;
            }
            (writer, buffer) = on_blocking_thread(key, move || {
                writer.write(&buffer)?;
                Ok((writer, buffer))
            })
            .await?;
        }
    }

    /// A file written by the caller's blocking thread.
    async fn blocking_writer(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<Box<dyn BlockingWriter>>, StorageError> {
        Ok(Some(Box::new(self.writer(key).await?)))
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

    /// The names in `dir`.
    fn names_in(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocking_writer_replaces_whole_on_commit_and_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::open(dir.path()).await.expect("open");
        let key = ObjectKey::new("staging/u1.nar").expect("key");
        storage
            .put(&key, Bytes::from_static(b"old contents"))
            .await
            .expect("put");
        // Past several background flushes, written a megabyte at a time.
        let data: Vec<u8> = (0..(3 * BACKGROUND_SYNC_STEP as usize + 12345))
            .map(|i| (i % 253) as u8)
            .collect();

        let mut writer = storage
            .blocking_writer(&key)
            .await
            .expect("a writer")
            .expect("local storage has one");
        let (writer, data) = tokio::task::spawn_blocking(move || {
            for piece in data.chunks(1 << 20) {
                writer.write(piece).expect("a write");
            }
            (writer, data)
        })
        .await
        .expect("the writing job");
        let read = storage.get_range(&key, 0, None).await.expect("get");
        assert_eq!(
            read_all(read).await,
            b"old contents",
            "not before the commit"
        );
        let written = tokio::task::spawn_blocking(move || writer.commit())
            .await
            .expect("the committing job")
            .expect("a commit");
        assert_eq!(written, data.len() as u64);
        let read = storage.get_range(&key, 0, None).await.expect("get");
        assert!(read_all(read).await == data, "the new object, whole");
        assert_eq!(names_in(&dir.path().join("staging")), vec!["u1.nar"]);

        // Dropped uncommitted, after writes and background flushes: the
        // object stays as it was and the temporary file is gone.
        let mut abandoned = storage
            .blocking_writer(&key)
            .await
            .expect("a writer")
            .expect("local storage has one");
        tokio::task::spawn_blocking(move || {
            for _ in 0..2 {
                abandoned
                    .write(&vec![9u8; BACKGROUND_SYNC_STEP as usize])
                    .expect("a write");
            }
        })
        .await
        .expect("the writing job");
        assert_eq!(names_in(&dir.path().join("staging")), vec!["u1.nar"]);
        let read = storage.get_range(&key, 0, None).await.expect("get");
        assert!(read_all(read).await == data, "the committed object");
    }

    #[test]
    fn holes_are_whole_blocks_of_zeros_at_block_boundaries() {
        let block = HOLE_BLOCK as usize;
        assert!(hole_runs(0, &[]).is_empty());
        assert_eq!(hole_runs(0, &vec![0; 3 * block]), [(3 * block, true)]);
        assert_eq!(hole_runs(0, &vec![7; 3 * block]), [(3 * block, false)]);
        // Zeros not covering a whole aligned block are written.
        assert_eq!(hole_runs(1, &vec![0; block]), [(block, false)]);
        assert_eq!(
            hole_runs(1, &vec![0; 2 * block]),
            [(block - 1, false), (block, true), (1, false)]
        );
        let mut mixed = vec![0; 4 * block];
        mixed[block + 5] = 1;
        assert_eq!(
            hole_runs(0, &mixed),
            [(block, true), (block, false), (2 * block, true)]
        );
    }

    #[tokio::test]
    async fn runs_of_zeros_are_holes_that_read_back_as_zeros() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::open(dir.path()).await.expect("open");
        let key = ObjectKey::new("staging/sparse.nar").expect("key");
        let mut data = vec![0u8; 64 << 20];
        data[..10].copy_from_slice(b"nix-archiv");
        data[(32 << 20) + 3] = 9;
        let mut writer = storage
            .blocking_writer(&key)
            .await
            .expect("a writer")
            .expect("local storage writes blocking");
        let expected = data.clone();
        let written = tokio::task::spawn_blocking(move || {
            // Pieces of odd lengths, ending in a hole.
            for piece in data.chunks(1_000_003) {
                writer.write(piece)?;
            }
            writer.commit()
        })
        .await
        .expect("the writing thread")
        .expect("writing");
        assert_eq!(written, 64 << 20);
        let path = dir.path().join("staging/sparse.nar");
        let metadata = std::fs::metadata(&path).expect("metadata");
        assert_eq!(metadata.len(), 64 << 20);
        assert!(
            metadata.blocks() * 512 < 1 << 20,
            "{} bytes allocated for 64 MiB of mostly zeros",
            metadata.blocks() * 512
        );
        assert!(std::fs::read(&path).expect("reading") == expected);
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
