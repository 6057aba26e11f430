//! The storage conformance suite: every [`Storage`] backend must behave the
//! same way, byte for byte and error for error.
//!
//! Each test is written once as an `async fn(&dyn Storage)` and instantiated
//! by [`every_backend!`] three times: `storage::local::NAME` on a fresh
//! temporary directory, `storage::s3::NAME` on the harness's Garage bucket
//! under a prefix of its own (`LARDER_TEST_S3_*`, which must be set), and
//! `storage::s3_https::NAME` on the same bucket through the TLS terminator,
//! trusting the throwaway CA by `ca-file`. The tests named `s3_*` below are
//! about S3 alone: the prefix and multipart cleanup.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use larder_config::{S3Config, Secret};
use larder_storage::pack::PackWriter;
use larder_storage::{LocalStorage, ObjectKey, S3Storage, Storage, StorageError, PART_SIZE};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tests::services::{self, S3Settings};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// A backend under test, and what keeps it alive.
struct Backend {
    storage: Arc<dyn Storage>,
    /// The local backend's directory, deleted on drop.
    _dir: Option<TempDir>,
}

async fn local() -> Backend {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let storage = LocalStorage::open(dir.path().join("storage"))
        .await
        .expect("opening local storage");
    Backend {
        storage: Arc::new(storage),
        _dir: Some(dir),
    }
}

/// S3 storage on the harness's bucket, under `prefix`.
async fn s3_with_prefix(prefix: &str) -> S3Storage {
    open_s3(&S3Settings::from_env().storage_config(prefix)).await
}

async fn open_s3(config: &S3Config) -> S3Storage {
    S3Storage::new(config)
        .await
        .unwrap_or_else(|error| panic!("opening S3 storage: {error}"))
}

async fn s3() -> Backend {
    Backend {
        // Its own prefix: tests (and earlier runs) sharing the bucket never
        // see each other's objects.
        storage: Arc::new(s3_with_prefix(&services::unique_name("storage-test")).await),
        _dir: None,
    }
}

/// [`s3`] over HTTPS: every request goes through the TLS terminator, whose
/// certificate only the configured CA file makes trusted.
async fn s3_https() -> Backend {
    let config = S3Settings::from_env().tls_storage_config(&services::unique_name("storage-test"));
    Backend {
        storage: Arc::new(open_s3(&config).await),
        _dir: None,
    }
}

macro_rules! every_backend {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::local().await;
                    super::$name(backend.storage.clone()).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::s3().await;
                    super::$name(backend.storage.clone()).await;
                }
            )*
        }
        mod s3_https {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::s3_https().await;
                    super::$name(backend.storage.clone()).await;
                }
            )*
        }
    };
}

every_backend!(
    whole_and_ranged_reads_return_exactly_the_stored_bytes,
    size_reports_the_length_or_absence,
    missing_objects_are_not_found,
    deleting_is_idempotent,
    an_overwrite_is_seen_whole_or_not_at_all,
    nested_keys_are_independent_objects,
    listing_streams_every_object_under_a_prefix_across_pages,
    heavy_a_streamed_40_mib_body_reads_back_identical,
    check_passes_and_leaves_nothing_behind,
    a_batch_put_stores_every_object,
    a_finished_pack_reads_back_at_its_ranges_and_a_dropped_one_is_not_stored,
    a_file_is_put_whole,
);

async fn check_passes_and_leaves_nothing_behind(storage: Arc<dyn Storage>) {
    storage
        .check()
        .await
        .expect("a reachable storage passes its check");
    storage.check().await.expect("and again");
    let key = key("after-check");
    storage.put(&key, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(storage.size(&key).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_check_fails_once_the_directory_is_gone() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let root = dir.path().join("storage");
    let storage = LocalStorage::open(&root)
        .await
        .expect("opening local storage");
    storage.check().await.expect("a fresh directory passes");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "no probe left behind"
    );
    std::fs::remove_dir(&root).unwrap();
    storage
        .check()
        .await
        .expect_err("a vanished directory fails");
    assert!(
        !root.exists(),
        "the check must not create the directory again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_check_fails_for_a_missing_bucket() {
    let storage = open_s3(&S3Config {
        bucket: services::unique_name("no-such-bucket"),
        ..S3Settings::from_env().storage_config("")
    })
    .await;
    let error = storage.check().await.expect_err("a missing bucket fails");
    assert!(error.to_string().contains("HeadBucket"), "{error}");
}

fn key(text: &str) -> ObjectKey {
    ObjectKey::new(text).expect("valid key")
}

/// `n` bytes that differ at every offset modulo 251, so a misplaced range
/// shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

async fn read(storage: &dyn Storage, key: &ObjectKey, offset: u64, length: Option<u64>) -> Vec<u8> {
    let mut reader = storage
        .get_range(key, offset, length)
        .await
        .unwrap_or_else(|error| panic!("get_range({key}, {offset}, {length:?}): {error}"));
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .await
        .unwrap_or_else(|error| panic!("reading {key} from {offset}: {error}"));
    out
}

async fn whole_and_ranged_reads_return_exactly_the_stored_bytes(storage: Arc<dyn Storage>) {
    let storage = storage.as_ref();
    let data = pattern(1000);
    let k = key("chunks/ab/abcdef.zst");
    storage
        .put(&k, Bytes::from(data.clone()))
        .await
        .expect("put");

    assert_eq!(read(storage, &k, 0, None).await, data, "whole");
    assert_eq!(read(storage, &k, 0, Some(10)).await, data[..10], "start");
    assert_eq!(
        read(storage, &k, 400, Some(123)).await,
        data[400..523],
        "middle"
    );
    assert_eq!(read(storage, &k, 990, None).await, data[990..], "tail");
    assert_eq!(
        read(storage, &k, 999, Some(1)).await,
        data[999..],
        "last byte"
    );
    assert_eq!(
        read(storage, &k, 990, Some(100)).await,
        data[990..],
        "a range running past the end stops at the end"
    );
    assert_eq!(read(storage, &k, 1000, None).await, b"", "from the end");
    assert_eq!(read(storage, &k, 5000, Some(10)).await, b"", "past the end");
    assert_eq!(read(storage, &k, 10, Some(0)).await, b"", "empty range");

    let empty = key("chunks/00/empty");
    storage.put(&empty, Bytes::new()).await.expect("put empty");
    assert_eq!(read(storage, &empty, 0, None).await, b"", "empty object");
    assert_eq!(
        read(storage, &empty, 0, Some(4)).await,
        b"",
        "empty object, range"
    );
    assert_eq!(storage.size(&empty).await.expect("size"), Some(0));
}

/// A pack's frames read back at the ranges its appends answered once it is
/// finished (on S3, from a temporary file put in one request, past the
/// file's 1 MiB write buffer here); a pack dropped unfinished was never
/// stored.
async fn a_finished_pack_reads_back_at_its_ranges_and_a_dropped_one_is_not_stored(
    storage: Arc<dyn Storage>,
) {
    let frames: Vec<Vec<u8>> = (0..40).map(|n| pattern(50_000 + n * 1013)).collect();
    let total: u64 = frames.iter().map(|frame| frame.len() as u64).sum();
    let pack = PackWriter::create(&*storage)
        .await
        .expect("starting a pack");
    let key = pack.key().clone();
    let appended = frames.clone();
    let (pack, ranges) = tokio::task::spawn_blocking(move || {
        let mut pack = pack;
        let ranges: Vec<_> = appended
            .iter()
            .map(|frame| pack.append(frame).expect("appending"))
            .collect();
        (pack, ranges)
    })
    .await
    .expect("the appending thread");
    assert_eq!(
        pack.finish(&*storage).await.expect("finishing"),
        (key.clone(), total)
    );
    for (frame, range) in frames.iter().zip(&ranges) {
        assert_eq!(
            read(&*storage, &key, range.offset, Some(range.length)).await,
            *frame
        );
    }
    assert_eq!(storage.size(&key).await.expect("size"), Some(total));

    let dropped = PackWriter::create(&*storage)
        .await
        .expect("starting a pack");
    let dropped_key = dropped.key().clone();
    tokio::task::spawn_blocking(move || {
        let mut dropped = dropped;
        dropped.append(b"a frame").expect("appending");
    })
    .await
    .expect("the appending thread");
    assert_eq!(storage.size(&dropped_key).await.expect("size"), None);
}

/// `put_file` stores a file's bytes whole (S3: streamed from disk), and
/// only if they have the CRC-32 given.
async fn a_file_is_put_whole(storage: Arc<dyn Storage>) {
    let data = pattern(3 << 20);
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(file.path(), &data).expect("writing it");
    let key = key("packs/ab/put-file.pack");
    storage
        .put_file(&key, file.path(), data.len() as u64, crc32fast::hash(&data))
        .await
        .expect("putting the file");
    assert_eq!(read(&*storage, &key, 0, None).await, data);

    // A file that is not what its writer's CRC says is refused, and the
    // object keeps what it held.
    let wrong = crc32fast::hash(&data) ^ 1;
    storage
        .put_file(&key, file.path(), data.len() as u64, wrong)
        .await
        .expect_err("a file whose CRC-32 does not match");
    assert_eq!(read(&*storage, &key, 0, None).await, data);
}

/// `put_many` (one sync for the batch on local storage) stores every
/// object of the batch, in directories of its own or shared, and an empty
/// batch is no error.
async fn a_batch_put_stores_every_object(storage: Arc<dyn Storage>) {
    let objects: Vec<(ObjectKey, Bytes)> = (0..12)
        .map(|n| {
            let data = Bytes::from(pattern(1000 + n * 37));
            (key(&format!("chunks/{:02x}/batch-{n}.zst", n % 3)), data)
        })
        .collect();
    storage
        .put_many(objects.clone())
        .await
        .expect("a batch put");
    for (key, data) in &objects {
        assert_eq!(read(&*storage, key, 0, None).await, data.as_ref(), "{key}");
    }
    storage.put_many(Vec::new()).await.expect("an empty batch");
}

async fn size_reports_the_length_or_absence(storage: Arc<dyn Storage>) {
    let k = key("staging/u1.nar");
    assert_eq!(storage.size(&k).await.expect("size"), None);
    storage
        .put(&k, Bytes::from(pattern(4321)))
        .await
        .expect("put");
    assert_eq!(storage.size(&k).await.expect("size"), Some(4321));
    let mut body: &[u8] = b"streamed";
    let written = storage.put_reader(&k, &mut body).await.expect("put_reader");
    assert_eq!(written, 8);
    assert_eq!(storage.size(&k).await.expect("size"), Some(8));
}

async fn missing_objects_are_not_found(storage: Arc<dyn Storage>) {
    let k = key("chunks/ff/missing.zst");
    for (offset, length) in [(0, None), (0, Some(10)), (5, None), (3, Some(0))] {
        match storage.get_range(&k, offset, length).await {
            Err(StorageError::NotFound(missing)) => assert_eq!(missing, k),
            Err(other) => panic!("({offset}, {length:?}): expected NotFound, got {other}"),
            Ok(_) => panic!("({offset}, {length:?}): a missing object was read"),
        }
    }
    assert_eq!(storage.size(&k).await.expect("size"), None);
    // The message names the key, the same on every backend.
    let error = storage.get_range(&k, 0, None).await.err().expect("missing");
    assert_eq!(
        error.to_string(),
        format!("object {k} not found in storage")
    );
}

async fn deleting_is_idempotent(storage: Arc<dyn Storage>) {
    let k = key("chunks/12/delete-me.zst");
    storage
        .delete(&k)
        .await
        .expect("deleting what never existed");
    storage
        .put(&k, Bytes::from_static(b"x"))
        .await
        .expect("put");
    storage.delete(&k).await.expect("delete");
    assert_eq!(storage.size(&k).await.expect("size"), None);
    assert!(matches!(
        storage.get_range(&k, 0, None).await,
        Err(StorageError::NotFound(_))
    ));
    storage.delete(&k).await.expect("deleting twice");
}

async fn an_overwrite_is_seen_whole_or_not_at_all(storage: Arc<dyn Storage>) {
    let k = key("chunks/aa/overwritten.zst");
    let long = Bytes::from(vec![b'a'; 300_000]);
    let short = Bytes::from(vec![b'b'; 100_000]);
    storage.put(&k, long.clone()).await.expect("put");

    // Writers flip the object between two bodies while a reader reads it:
    // every read must be one body whole, never a mixture or a truncation.
    let writer = {
        let storage = storage.clone();
        let (long, short) = (long.clone(), short.clone());
        let k = k.clone();
        tokio::spawn(async move {
            for round in 0..10 {
                let body = if round % 2 == 0 {
                    short.clone()
                } else {
                    long.clone()
                };
                if round % 3 == 0 {
                    let mut reader: &[u8] = &body;
                    storage
                        .put_reader(&k, &mut reader)
                        .await
                        .expect("put_reader");
                } else {
                    storage.put(&k, body).await.expect("put");
                }
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads < 10 {
        let seen = read(storage.as_ref(), &k, 0, None).await;
        assert!(
            seen == long || seen == short,
            "read a mixed or truncated object of {} bytes",
            seen.len()
        );
        reads += 1;
    }
    writer.await.expect("writer task");
    assert_eq!(
        read(storage.as_ref(), &k, 0, None).await,
        long,
        "the last write wins"
    );
}

async fn nested_keys_are_independent_objects(storage: Arc<dyn Storage>) {
    let keys = [
        key("n/x/y.zst"),
        key("n/x/y/z.zst"),
        key("n/x/y/z/deeper/still.zst"),
        key("n/x2/y/z.zst"),
        key("n.zst"),
    ];
    for (i, k) in keys.iter().enumerate() {
        storage
            .put(k, Bytes::from(format!("object {i}")))
            .await
            .expect("put");
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            read(storage.as_ref(), k, 0, None).await,
            format!("object {i}").as_bytes()
        );
    }
    storage.delete(&keys[1]).await.expect("delete");
    assert_eq!(storage.size(&keys[1]).await.expect("size"), None);
    for k in [&keys[0], &keys[2], &keys[3], &keys[4]] {
        assert!(
            storage.size(k).await.expect("size").is_some(),
            "deleting {} removed {k}",
            keys[1]
        );
    }
}

/// Yields `data` a few odd-sized pieces at a time, like a network body;
/// once `fail_at` bytes are out, if set, fails with an I/O error, and once
/// `stall_at` bytes are out, if set, never yields again (a client that went
/// quiet).
struct Trickle {
    data: Bytes,
    position: usize,
    fail_at: Option<usize>,
    stall_at: Option<usize>,
}

impl Trickle {
    fn new(data: Bytes) -> Self {
        Self {
            data,
            position: 0,
            fail_at: None,
            stall_at: None,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.fail_at.is_some_and(|limit| self.position >= limit) {
            return Poll::Ready(Err(io::Error::other("the client went away")));
        }
        if self.stall_at.is_some_and(|limit| self.position >= limit) {
            // Never woken: the test drops the future reading it.
            return Poll::Pending;
        }
        let end = [self.fail_at, self.stall_at]
            .into_iter()
            .flatten()
            .fold(self.data.len(), usize::min);
        let n = buf.remaining().min(100_003).min(end - self.position);
        let start = self.position;
        buf.put_slice(&self.data[start..start + n]);
        self.position += n;
        Poll::Ready(Ok(()))
    }
}

fn random_bytes(n: usize, seed: u64) -> Bytes {
    let mut data = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    Bytes::from(data)
}

async fn heavy_a_streamed_40_mib_body_reads_back_identical(storage: Arc<dyn Storage>) {
    const SIZE: usize = 40 * 1024 * 1024;
    let data = random_bytes(SIZE, 40);
    let expected = Sha256::digest(&data);
    let k = key("staging/big-upload.nar");

    let written = storage
        .put_reader(&k, &mut Trickle::new(data.clone()))
        .await
        .expect("put_reader");
    assert_eq!(written, SIZE as u64);
    assert_eq!(storage.size(&k).await.expect("size"), Some(SIZE as u64));

    // Hashed as it streams: the read side must not need the whole body.
    let mut reader = storage.get_range(&k, 0, None).await.expect("get");
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut read_back = 0usize;
    loop {
        let n = reader.read(&mut buffer).await.expect("reading back");
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        read_back += n;
    }
    assert_eq!(read_back, SIZE);
    assert_eq!(hasher.finalize(), expected, "SHA-256 of the body read back");

    // A range across the first part boundary of a multipart upload.
    let boundary = PART_SIZE;
    assert_eq!(
        read(storage.as_ref(), &k, (boundary - 10) as u64, Some(20)).await,
        data[boundary - 10..boundary + 10]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_prefixes_keep_storages_apart() {
    let prefix = services::unique_name("storage-test");
    let staging = s3_with_prefix(&format!("{prefix}/staging")).await;
    let chunks = s3_with_prefix(&format!("{prefix}/chunks/")).await;
    let k = key("same/key");
    staging
        .put(&k, Bytes::from_static(b"staged"))
        .await
        .expect("put");
    assert_eq!(chunks.size(&k).await.expect("size"), None);
    chunks
        .put(&k, Bytes::from_static(b"chunk"))
        .await
        .expect("put");
    assert_eq!(read(&staging, &k, 0, None).await, b"staged");
    assert_eq!(read(&chunks, &k, 0, None).await, b"chunk");
    assert_eq!(
        staging.object_name(&k),
        format!("{prefix}/staging/same/key")
    );

    // The objects really sit under the prefixes in the bucket.
    let settings = S3Settings::from_env();
    let listed = settings
        .client()
        .list_objects_v2()
        .bucket(&settings.bucket)
        .prefix(format!("{prefix}/"))
        .send()
        .await
        .expect("listing the bucket");
    let mut names: Vec<_> = listed
        .contents()
        .iter()
        .filter_map(|object| object.key())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            format!("{prefix}/chunks/same/key"),
            format!("{prefix}/staging/same/key")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_s3_a_failed_multipart_upload_leaves_no_object_and_no_upload() {
    let storage = s3_with_prefix(&services::unique_name("storage-test")).await;
    let k = key("staging/aborted.nar");
    let mut reader = Trickle::new(random_bytes(3 * PART_SIZE, 7));
    // Two whole parts are sent, then the body fails inside the third.
    reader.fail_at = Some(2 * PART_SIZE + PART_SIZE / 2);

    let error = storage
        .put_reader(&k, &mut reader)
        .await
        .expect_err("a failing body must fail the upload");
    assert!(matches!(error, StorageError::Io { .. }), "{error:?}");
    assert_eq!(storage.size(&k).await.expect("size"), None);

    let settings = S3Settings::from_env();
    let uploads = settings
        .client()
        .list_multipart_uploads()
        .bucket(&settings.bucket)
        .prefix(storage.object_name(&k))
        .send()
        .await
        .expect("listing multipart uploads");
    assert!(
        uploads.uploads().is_empty(),
        "uploads left behind: {:?}",
        uploads.uploads()
    );

    // The listing above is not vacuous: an upload left pending under the
    // same name does show in it.
    let client = settings.client();
    let pending = client
        .create_multipart_upload()
        .bucket(&settings.bucket)
        .key(storage.object_name(&k))
        .send()
        .await
        .expect("creating a multipart upload");
    let listed = client
        .list_multipart_uploads()
        .bucket(&settings.bucket)
        .prefix(storage.object_name(&k))
        .send()
        .await
        .expect("listing multipart uploads");
    assert_eq!(listed.uploads().len(), 1, "{:?}", listed.uploads());
    client
        .abort_multipart_upload()
        .bucket(&settings.bucket)
        .key(storage.object_name(&k))
        .upload_id(pending.upload_id().expect("an upload id"))
        .send()
        .await
        .expect("aborting the control upload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_s3_bodies_larger_than_a_part_go_up_in_parts() {
    let storage = s3_with_prefix(&services::unique_name("storage-test")).await;
    let settings = S3Settings::from_env();
    let client = settings.client();
    let etag = |k: ObjectKey| {
        let (client, bucket, name) = (
            client.clone(),
            settings.bucket.clone(),
            storage.object_name(&k),
        );
        async move {
            let head = client
                .head_object()
                .bucket(bucket)
                .key(name)
                .send()
                .await
                .expect("HeadObject");
            head.e_tag().expect("an ETag").trim_matches('"').to_owned()
        }
    };

    // A multipart object's ETag ends with `-{number of parts}`.
    let big = key("staging/three-parts.nar");
    let data = random_bytes(2 * PART_SIZE + 1, 3);
    let written = storage
        .put_reader(&big, &mut Trickle::new(data.clone()))
        .await
        .expect("put_reader");
    assert_eq!(written, data.len() as u64);
    assert!(
        etag(big.clone()).await.ends_with("-3"),
        "{}",
        etag(big.clone()).await
    );
    assert_eq!(read(&storage, &big, 0, None).await, data);

    // Anything up to one part is one PutObject.
    let small = key("staging/one-request.nar");
    let data = random_bytes(PART_SIZE, 4);
    storage
        .put_reader(&small, &mut Trickle::new(data.clone()))
        .await
        .expect("put_reader");
    assert!(!etag(small.clone()).await.contains('-'));
    assert_eq!(read(&storage, &small, 0, None).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_say_what_the_service_answered() {
    let storage = open_s3(&S3Config {
        bucket: services::unique_name("no-such-bucket"),
        ..S3Settings::from_env().storage_config("")
    })
    .await;
    let k = key("chunks/ab/c.zst");
    let error = storage
        .put(&k, Bytes::from_static(b"x"))
        .await
        .expect_err("no such bucket");
    let message = error.to_string();
    assert!(matches!(error, StorageError::Backend { .. }), "{error:?}");
    assert!(
        message.starts_with(&format!("S3 PutObject of {k} failed: NoSuchBucket")),
        "{message}"
    );
    // The whole story is in the message; nothing repeats it as a source.
    assert!(std::error::Error::source(&error).is_none());

    // No service at all (a port held with nothing listening): the cause
    // chain, once.
    let closed = tests::ports::HeldPort::new();
    let unreachable = open_s3(&S3Config {
        endpoint: Some(format!("http://{}", closed.address())),
        region: Some("garage".to_owned()),
        bucket: "b".to_owned(),
        access_key_id: Some("GK0".to_owned()),
        secret_access_key: Some(Secret::new("s")),
        ..S3Config::default()
    })
    .await;
    let message = unreachable
        .size(&k)
        .await
        .expect_err("unreachable")
        .to_string();
    assert!(message.starts_with("S3 HeadObject of "), "{message}");
}

/// `tests/src/bin/s3_proxy` in front of the harness's Garage, stopped when
/// dropped: its S3 address and its control address.
struct StallingProxy {
    _child: tokio::process::Child,
    s3: std::net::SocketAddr,
    control: std::net::SocketAddr,
    _ports: [tests::ports::HeldPort; 2],
}

impl StallingProxy {
    async fn start() -> Self {
        let ports = [tests::ports::HeldPort::new(), tests::ports::HeldPort::new()];
        let (s3, control) = (ports[0].address(), ports[1].address());
        let child = tokio::process::Command::new(tests::server::binary("s3_proxy"))
            .args([
                "--listen",
                &s3.to_string(),
                "--control",
                &control.to_string(),
            ])
            .args(["--upstream", &S3Settings::from_env().endpoint])
            .kill_on_drop(true)
            .spawn()
            .expect("starting s3_proxy");
        let proxy = Self {
            _child: child,
            s3,
            control,
            _ports: ports,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while proxy.control("GET", "/counts").await.is_none() {
            assert!(Instant::now() < deadline, "s3_proxy did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy
    }

    /// Sends a control request; its answer, or none if the proxy is not up.
    async fn control(&self, method: &str, path: &str) -> Option<String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let response = reqwest::Client::new()
            .request(method, format!("http://{}{path}", self.control))
            .send()
            .await
            .ok()?;
        assert!(response.status().is_success(), "{path}: {response:?}");
        response.text().await.ok()
    }

    /// How many requests of `kind` the proxy has seen.
    async fn count(&self, kind: &str) -> u64 {
        let counts = self.control("GET", "/counts").await.expect("the counts");
        counts
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{kind}=")))
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("no {kind} in {counts}"))
    }
}

/// A request the service never answers (a hung connection, an overloaded
/// gateway) fails after `request-timeout` and is sent again, so that the
/// operation completes instead of holding its push forever: for a part of
/// a multipart upload, a whole-object put, a size query and a ranged read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_request_left_unanswered_is_sent_again_after_the_request_timeout() {
    let proxy = StallingProxy::start().await;
    let storage = open_s3(&S3Config {
        endpoint: Some(format!("http://{}", proxy.s3)),
        request_timeout: Some(larder_api::duration::HumanDuration::from_secs(1)),
        ..S3Settings::from_env().storage_config(&services::unique_name("storage-test"))
    })
    .await;
    // A hang guard far above the timeouts, so a regression fails here
    // rather than at the test runner's limit.
    let guard = Duration::from_secs(120);

    let big = key("staging/stalled-part.nar");
    let data = random_bytes(2 * PART_SIZE + 1, 21);
    proxy.control("PUT", "/stall/PUT_PART/1").await;
    let written = tokio::time::timeout(
        guard,
        storage.put_reader(&big, &mut Trickle::new(data.clone())),
    )
    .await
    .expect("the multipart upload hung")
    .expect("put_reader despite an unanswered part");
    assert_eq!(written, data.len() as u64);
    assert_eq!(
        proxy.count("PUT_PART").await,
        4,
        "three parts, one sent twice"
    );

    let small = key("packs/00/stalled-put.pack");
    proxy.control("PUT", "/stall/PUT/1").await;
    tokio::time::timeout(guard, storage.put(&small, Bytes::from_static(b"pack")))
        .await
        .expect("the put hung")
        .expect("put despite an unanswered request");
    assert_eq!(proxy.count("PUT").await, 2, "one put, sent twice");

    proxy.control("PUT", "/stall/HEAD/1").await;
    let size = tokio::time::timeout(guard, storage.size(&big))
        .await
        .expect("the size query hung")
        .expect("size despite an unanswered request");
    assert_eq!(size, Some(data.len() as u64));
    assert_eq!(proxy.count("HEAD").await, 2);

    proxy.control("PUT", "/stall/GET_RANGE/1").await;
    let bytes = tokio::time::timeout(guard, read(&storage, &big, PART_SIZE as u64, Some(1000)))
        .await
        .expect("the ranged read hung");
    assert_eq!(bytes, data[PART_SIZE..PART_SIZE + 1000]);
    assert_eq!(proxy.count("GET_RANGE").await, 2);
    assert_eq!(read(&storage, &big, 0, None).await, data);
}

/// The multipart uploads pending under `name`.
async fn pending_uploads(settings: &S3Settings, name: &str) -> usize {
    settings
        .client()
        .list_multipart_uploads()
        .bucket(&settings.bucket)
        .prefix(name)
        .send()
        .await
        .expect("listing multipart uploads")
        .uploads()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_s3_an_abandoned_multipart_upload_is_aborted() {
    let storage = Arc::new(s3_with_prefix(&services::unique_name("storage-test")).await);
    let settings = S3Settings::from_env();
    let k = key("staging/abandoned.nar");
    let name = storage.object_name(&k);
    let mut reader = Trickle::new(random_bytes(3 * PART_SIZE, 9));
    reader.stall_at = Some(2 * PART_SIZE + 1000);
    let upload = {
        let (storage, k) = (storage.clone(), k.clone());
        tokio::spawn(async move { storage.put_reader(&k, &mut reader).await })
    };

    // Dropped (as when the caller's request is cancelled) once the upload
    // exists and the body has gone quiet.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pending_uploads(&settings, &name).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the multipart upload never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    upload.abort();
    assert!(upload.await.expect_err("aborted").is_cancelled());

    while pending_uploads(&settings, &name).await != 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned upload was not aborted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(storage.size(&k).await.expect("size"), None);
}

/// `list` finds every object under the prefix at any depth, across S3's
/// 1000-key pages, with its size and a recent modification time, and
/// nothing outside it (not even a sibling that shares the prefix's text).
async fn listing_streams_every_object_under_a_prefix_across_pages(storage: Arc<dyn Storage>) {
    use futures::{StreamExt, TryStreamExt};
    let before = std::time::SystemTime::now() - Duration::from_secs(60);
    let keys: Vec<ObjectKey> = (0..1003)
        .map(|n| key(&format!("listed/{:02x}/object-{n}", n % 7)))
        .collect();
    futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let storage = storage.clone();
            async move { storage.put(&k, Bytes::from_static(b"abc")).await }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
        .expect("putting objects");
    for outside in ["listedx/a", "other/listed/b"] {
        storage
            .put(&key(outside), Bytes::from_static(b"x"))
            .await
            .expect("put");
    }
    let listed: Vec<_> = storage
        .list(&key("listed"))
        .try_collect()
        .await
        .expect("listing");
    let mut found: Vec<ObjectKey> = listed.iter().map(|object| object.key.clone()).collect();
    found.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(found, expected);
    assert!(listed
        .iter()
        .all(|object| object.size == 3 && object.last_modified > before));
    let empty: Vec<_> = storage
        .list(&key("nothing-here"))
        .try_collect()
        .await
        .expect("listing");
    assert!(empty.is_empty());
}
