//! The ingest pipeline (`chunker-worker`, `compressor-worker`, the
//! reconciler in `gc-scheduler`) driven through its libraries: a NAR staged
//! in real storage, its upload row in a real database, its chunk job on a
//! real queue, and the workers consuming it as the server runs them.
//!
//! Each scenario is an `async fn(Rig)`, instantiated by [`rigs!`] over
//! SQLite with local storage, PostgreSQL with local storage, and PostgreSQL
//! with Garage (S3), all on the embedded queue; and once over RabbitMQ.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chunker_worker::Chunker;
use compressor_worker::Compressor;
use larder_api::cache_name::CacheName;
use larder_config::PipelineConfig;
use larder_db::{
    Actor, Cache, CacheKeypair, ChunkId, Database, NewCache, NewUpload, ObjectMetadata, StoreState,
    Timestamp, Upload, UploadId, UploadPhase,
};
use larder_nix::nar::NarEncoder;
use larder_nix::{NarHash, Sha256Hash, StorePathHash};
use larder_queue::{
    publish_job, AmqpQueue, ChunkJob, ChunkRange, CompressJob, EmbeddedQueue, Queue,
    CHUNK_DEAD_LETTER_QUEUE, CHUNK_QUEUE,
};
use larder_service::worker::JobHandler;
use larder_storage::{LocalStorage, ObjectKey, S3Storage, Storage};
use tempfile::TempDir;
use tests::server::pseudo_random;
use tests::services::{self, S3Settings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long an ordinary upload may take to become visible.
const VISIBLE_WITHIN: Duration = Duration::from_secs(60);

enum Objects {
    Local(PathBuf),
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
    },
}

/// A database, storage and queue with the chunker and compressor running
/// on them.
struct Rig {
    db: Database,
    storage: Arc<dyn Storage>,
    queue: Arc<dyn Queue>,
    objects: Objects,
    stop: CancellationToken,
    workers: Vec<JoinHandle<()>>,
    _dirs: Vec<TempDir>,
}

#[derive(Clone, Copy)]
enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy)]
enum StorageKind {
    Local,
    S3,
}

#[derive(Clone, Copy)]
enum QueueKind {
    Embedded,
    Amqp,
}

fn config() -> PipelineConfig {
    PipelineConfig {
        chunk_concurrency: 2,
        compress_concurrency: 2,
        ..PipelineConfig::default()
    }
}

impl Rig {
    async fn start(db: DbKind, storage: StorageKind, queue: QueueKind) -> Self {
        let mut dirs = Vec::new();
        let url = match db {
            DbKind::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite:{}", dir.path().join("larder.sqlite").display());
                dirs.push(dir);
                url
            }
            DbKind::Postgres => services::fresh_postgres_database().await,
        };
        let database = Database::connect(&url).await.expect("connecting");
        database.migrate().await.expect("migrating");
        let (storage, objects): (Arc<dyn Storage>, Objects) = match storage {
            StorageKind::Local => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let root = dir.path().join("storage");
                let storage = LocalStorage::open(&root).await.expect("local storage");
                dirs.push(dir);
                (Arc::new(storage), Objects::Local(root))
            }
            StorageKind::S3 => {
                let settings = S3Settings::from_env();
                let prefix = format!("{}/", services::unique_name("pipeline-test"));
                let storage = S3Storage::new(&settings.storage_config(&prefix))
                    .await
                    .expect("S3 storage");
                let name = storage.object_name(&ObjectKey::new("x").expect("key"));
                let prefix = name.strip_suffix('x').expect("prefix").to_owned();
                let objects = Objects::S3 {
                    client: settings.client(),
                    bucket: settings.bucket,
                    prefix,
                };
                (Arc::new(storage), objects)
            }
        };
        let queue: Arc<dyn Queue> = match queue {
            QueueKind::Embedded => Arc::new(EmbeddedQueue::new()),
            // The pipeline's queue names are fixed: each rig gets a
            // virtual host of its own, so that rigs running at once never
            // take each other's jobs or dead letters.
            QueueKind::Amqp => {
                let vhost = services::unique_name("pipeline-test");
                services::add_rabbitmq_vhost(&services::services_dir(), &vhost).await;
                Arc::new(AmqpQueue::new(
                    &tests::cluster::with_vhost(&services::amqp_url(), &vhost),
                    None,
                    &vhost,
                ))
            }
        };
        let stop = CancellationToken::new();
        let services = larder_service::service::Services {
            database: database.clone(),
            storage: storage.clone(),
            queue: queue.clone(),
        };
        let chunker = tokio::spawn({
            let run = chunker_worker::run_with(services.clone(), config(), stop.clone());
            async move { run.await.expect("the chunker runs") }
        });
        let compressor = tokio::spawn({
            let run = compressor_worker::run_with(services, config(), stop.clone());
            async move { run.await.expect("the compressor runs") }
        });
        Rig {
            db: database,
            storage,
            queue,
            objects,
            stop,
            workers: vec![chunker, compressor],
            _dirs: dirs,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        for worker in self.workers {
            worker.await.expect("a worker stops cleanly");
        }
    }

    async fn create_cache(&self, name: &str) -> Cache {
        let name: CacheName = name.parse().expect("cache name");
        let keypair = CacheKeypair::new(format!("{name}-1:c2VjcmV0"));
        self.db
            .create_cache(&NewCache::new(name, keypair), Timestamp::now())
            .await
            .expect("creating a cache")
    }

    /// Stages `nar` and records its upload, as the push endpoints do,
    /// without publishing its job.
    async fn stage(&self, cache: &Cache, path_hash: StorePathHash, nar: &[u8]) -> Upload {
        let staged_key = format!("staging/{}.nar", hex_id());
        self.storage
            .put(
                &ObjectKey::new(staged_key.clone()).expect("key"),
                Bytes::copy_from_slice(nar),
            )
            .await
            .expect("staging");
        let new = NewUpload {
            cache_id: cache.id,
            store_path_hash: path_hash,
            nar_hash: NarHash::new(Sha256Hash::digest(nar)),
            nar_size: nar.len() as u64,
            metadata: ObjectMetadata {
                store_path: format!("/nix/store/{path_hash}-test"),
                references: Vec::new(),
                deriver: None,
                system: None,
                sigs: Vec::new(),
                ca: None,
            },
            staged_key,
            staged_crc32: Some(crc32fast::hash(nar)),
            trace_id: Some(hex_id()),
            created_by: Actor {
                subject: Some("tests".to_owned()),
                jti: None,
            },
        };
        self.db
            .create_upload(&new, Timestamp::now())
            .await
            .expect("recording the upload")
    }

    async fn publish(&self, upload: &Upload) {
        publish_job(&*self.queue, &chunk_job(upload))
            .await
            .expect("publishing the chunk job");
    }

    /// Stages, records and publishes: a push as the API makes it.
    async fn push(&self, cache: &Cache, path_hash: StorePathHash, nar: &[u8]) -> Upload {
        let upload = self.stage(cache, path_hash, nar).await;
        self.publish(&upload).await;
        upload
    }

    /// Waits until the upload leaves the pipeline; returns its last row.
    async fn settled(&self, id: &UploadId, within: Duration) -> Upload {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let upload = self.db.upload(id).await.expect("reading").expect("exists");
            if upload.phase.is_terminal() {
                return upload;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "upload {id} still {} after {within:?}",
                upload.phase
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn visible(&self, id: &UploadId, within: Duration) -> Upload {
        let upload = self.settled(id, within).await;
        assert_eq!(
            upload.phase,
            UploadPhase::Done,
            "upload failed: {:?}",
            upload.error
        );
        upload
    }

    /// The NAR as it would be served: its stored frames, decompressed in
    /// order.
    async fn reassemble(&self, upload: &Upload) -> Vec<u8> {
        let nar_id = upload.nar_id.expect("linked to its NAR");
        let mut out = Vec::new();
        for entry in self.db.chunks_of_nar(nar_id).await.expect("chunks") {
            let location = entry.chunk.location.expect("stored");
            let key = ObjectKey::new(location.object_key).expect("key");
            let frame = self
                .storage
                .get_bytes(&key, location.offset, location.length)
                .await
                .expect("reading a chunk");
            let capacity = entry.chunk.chunk_size as usize;
            out.extend(zstd::bulk::decompress(&frame, capacity).expect("one zstd frame"));
        }
        out
    }

    /// Chunk objects in storage.
    /// Objects under `packs/`: where chunks are stored.
    async fn pack_objects(&self) -> usize {
        match &self.objects {
            Objects::Local(root) => tests::server::count_files(&root.join("packs")),
            Objects::S3 {
                client,
                bucket,
                prefix,
            } => {
                let mut count = 0;
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(format!("{prefix}packs/"))
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    count += page.expect("listing").contents().len();
                }
                count
            }
        }
    }

    /// Distinct objects the chunk rows point into.
    async fn chunk_keys(&self) -> i64 {
        let row: (i64,) = sqlx::query_as("SELECT COUNT(DISTINCT object_key) FROM chunks")
            .fetch_one(self.db.pool())
            .await
            .expect("counting chunk objects");
        row.0
    }

    async fn pack_rows(&self) -> i64 {
        let row: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM packs")
            .fetch_one(self.db.pool())
            .await
            .expect("counting packs");
        row.0
    }

    async fn chunk_rows(&self) -> i64 {
        let row: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM chunks")
            .fetch_one(self.db.pool())
            .await
            .expect("counting chunks");
        row.0
    }

    async fn staged_exists(&self, upload: &Upload) -> bool {
        let key = ObjectKey::new(upload.staged_key.clone()).expect("key");
        self.storage.size(&key).await.expect("size").is_some()
    }
}

fn hex_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn chunk_job(upload: &Upload) -> ChunkJob {
    ChunkJob {
        upload_id: upload.id.to_string(),
        trace_id: upload.trace_id.clone().expect("trace id"),
    }
}

fn path_hash(n: u8) -> StorePathHash {
    StorePathHash::from_bytes(&[n; 20])
}

/// A real NAR: a directory with a large pseudo-random file (`seed`), a
/// small text file and a symlink.
fn nar_of(large: &[u8]) -> Vec<u8> {
    let mut nar = NarEncoder::new(Vec::new()).expect("encoder");
    nar.begin_directory().expect("directory");
    nar.entry(b"bin").expect("entry");
    nar.symlink(b"lib/tool").expect("symlink");
    nar.entry(b"lib").expect("entry");
    nar.regular(true, large).expect("file");
    nar.entry(b"readme").expect("entry");
    nar.regular(false, b"a test path\n").expect("file");
    nar.end_directory().expect("end");
    nar.finish().expect("finishing")
}

macro_rules! rigs {
    ($($name:ident),* $(,)?) => {
        mod sqlite_local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let rig = super::Rig::start(
                        super::DbKind::Sqlite,
                        super::StorageKind::Local,
                        super::QueueKind::Embedded,
                    )
                    .await;
                    super::$name(&rig).await;
                    rig.stop().await;
                }
            )*
        }
        mod postgres_local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let rig = super::Rig::start(
                        super::DbKind::Postgres,
                        super::StorageKind::Local,
                        super::QueueKind::Embedded,
                    )
                    .await;
                    super::$name(&rig).await;
                    rig.stop().await;
                }
            )*
        }
        mod postgres_s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let rig = super::Rig::start(
                        super::DbKind::Postgres,
                        super::StorageKind::S3,
                        super::QueueKind::Embedded,
                    )
                    .await;
                    super::$name(&rig).await;
                    rig.stop().await;
                }
            )*
        }
    };
}

rigs!(
    a_pushed_nar_becomes_visible_and_is_stored_once_across_caches,
    a_small_nar_is_one_chunk,
    concurrent_uploads_of_one_nar_store_each_chunk_once,
    redelivered_jobs_change_nothing,
    a_vanished_staged_nar_fails_its_upload_and_no_other,
    the_reconciler_resumes_lost_jobs_and_gives_up_in_the_end,
);

async fn a_pushed_nar_becomes_visible_and_is_stored_once_across_caches(rig: &Rig) {
    let first = rig.create_cache("first").await;
    let second = rig.create_cache("second").await;
    let nar = nar_of(&pseudo_random(3 << 20, 1));

    let upload = rig.push(&first, path_hash(1), &nar).await;
    let upload = rig.visible(&upload.id, VISIBLE_WITHIN).await;
    let object = rig
        .db
        .find_object(first.id, &path_hash(1))
        .await
        .expect("lookup")
        .expect("the object is visible");
    assert_eq!(object.nar.state, StoreState::Valid);
    assert_eq!(object.nar.nar_size, nar.len() as u64);
    assert!(object.nar.n_chunks > 10, "{} chunks", object.nar.n_chunks);
    assert_eq!(rig.reassemble(&upload).await, nar, "byte for byte");
    assert!(
        !rig.staged_exists(&upload).await,
        "the staged NAR is removed"
    );

    // A NAR of this size is one compress job: all its chunks in one pack.
    let objects = rig.pack_objects().await;
    assert_eq!(objects, 1, "one pack for the NAR's chunks");
    assert_eq!(rig.chunk_keys().await, 1, "every chunk in that pack");
    let rows = rig.chunk_rows().await;

    // The same NAR pushed to another cache: linked, nothing new stored.
    let again = rig.push(&second, path_hash(2), &nar).await;
    let again = rig.visible(&again.id, VISIBLE_WITHIN).await;
    assert_eq!(again.nar_id, upload.nar_id);
    assert!(rig
        .db
        .find_object(second.id, &path_hash(2))
        .await
        .expect("lookup")
        .is_some());
    assert_eq!(rig.pack_objects().await, objects, "no new chunk objects");
    assert_eq!(rig.chunk_rows().await, rows, "no new chunk rows");
    assert!(!rig.staged_exists(&again).await);
}

async fn a_small_nar_is_one_chunk(rig: &Rig) {
    let cache = rig.create_cache("small").await;
    let nar = nar_of(&pseudo_random(50 * 1024, 2));
    assert!(nar.len() < 64 * 1024);
    let upload = rig.push(&cache, path_hash(1), &nar).await;
    let upload = rig.visible(&upload.id, VISIBLE_WITHIN).await;
    let chunks = rig
        .db
        .chunks_of_nar(upload.nar_id.expect("NAR"))
        .await
        .expect("chunks");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].chunk.chunk_size, nar.len() as u64);
    assert_eq!(rig.reassemble(&upload).await, nar);
}

async fn concurrent_uploads_of_one_nar_store_each_chunk_once(rig: &Rig) {
    let caches = [
        rig.create_cache("one").await,
        rig.create_cache("two").await,
        rig.create_cache("three").await,
    ];
    let nar = nar_of(&pseudo_random(2 << 20, 3));
    // All staged and recorded before any job is published, so the
    // chunkers race on the same NAR.
    let mut uploads = Vec::new();
    for (n, cache) in caches.iter().enumerate() {
        uploads.push(rig.stage(cache, path_hash(n as u8 + 1), &nar).await);
    }
    for upload in &uploads {
        rig.publish(upload).await;
    }
    let mut nar_ids = HashSet::new();
    for upload in &uploads {
        let done = rig.visible(&upload.id, VISIBLE_WITHIN).await;
        nar_ids.insert(done.nar_id.expect("NAR"));
        assert_eq!(rig.reassemble(&done).await, nar);
    }
    assert_eq!(nar_ids.len(), 1, "one NAR row");
    let listed: HashSet<ChunkId> = rig
        .db
        .chunks_of_nar(*nar_ids.iter().next().expect("NAR"))
        .await
        .expect("chunks")
        .into_iter()
        .map(|entry| entry.chunk.id)
        .collect();
    assert_eq!(rig.chunk_rows().await, listed.len() as i64);
    assert_eq!(
        rig.pack_objects().await as i64,
        rig.pack_rows().await,
        "every pack written is recorded (however the uploads raced)"
    );
}

async fn redelivered_jobs_change_nothing(rig: &Rig) {
    let cache = rig.create_cache("again").await;
    let nar = nar_of(&pseudo_random(1 << 20, 4));
    let upload = rig.push(&cache, path_hash(1), &nar).await;
    let upload = rig.visible(&upload.id, VISIBLE_WITHIN).await;
    let nar_id = upload.nar_id.expect("NAR");
    let chunks_before = rig.db.chunks_of_nar(nar_id).await.expect("chunks");
    let objects = rig.pack_objects().await;

    // The handlers themselves, so that each job has certainly run.
    let chunker = Chunker {
        database: rig.db.clone(),
        storage: rig.storage.clone(),
        queue: rig.queue.clone(),
        compression_level: 3,
        pack_size: 32 << 20,
    };
    chunker
        .handle(&chunk_job(&upload))
        .await
        .expect("a chunk job delivered again");
    let mut offset = 0;
    let ranges = chunks_before
        .iter()
        .map(|entry| {
            let range = ChunkRange {
                chunk_id: entry.chunk.id.0,
                offset,
                length: entry.chunk.chunk_size,
                crc32: None,
            };
            offset += entry.chunk.chunk_size;
            range
        })
        .collect();
    let compressor = Compressor {
        database: rig.db.clone(),
        storage: rig.storage.clone(),
        compression_level: 3,
    };
    compressor
        .handle(&CompressJob {
            nar_id: nar_id.0,
            staged_key: upload.staged_key.clone(),
            chunks: ranges,
            trace_id: "again".to_owned(),
        })
        .await
        .expect("a compress job delivered again, its staged NAR gone");

    let after = rig
        .db
        .upload(&upload.id)
        .await
        .expect("reading")
        .expect("row");
    assert_eq!(after.phase, UploadPhase::Done);
    assert_eq!(
        rig.db.chunks_of_nar(nar_id).await.expect("chunks"),
        chunks_before
    );
    assert_eq!(rig.pack_objects().await, objects);
    assert_eq!(rig.reassemble(&upload).await, nar);
}

async fn a_vanished_staged_nar_fails_its_upload_and_no_other(rig: &Rig) {
    let cache = rig.create_cache("vanish").await;
    // Exact deltas: this test's process records only this test's metrics.
    tests::prometheus::assert_metrics_are_this_tests_own();
    let metrics_before = metrics_page();
    let mut dead_letters = rig
        .queue
        .consume(CHUNK_DEAD_LETTER_QUEUE, 1)
        .await
        .expect("consuming the dead-letter queue");

    let doomed = rig
        .stage(&cache, path_hash(1), &nar_of(&pseudo_random(1 << 20, 5)))
        .await;
    rig.storage
        .delete(&ObjectKey::new(doomed.staged_key.clone()).expect("key"))
        .await
        .expect("deleting the staged NAR");
    let nar = nar_of(&pseudo_random(1 << 20, 6));
    let healthy = rig.stage(&cache, path_hash(2), &nar).await;
    rig.publish(&doomed).await;
    rig.publish(&healthy).await;

    let failed = rig.settled(&doomed.id, VISIBLE_WITHIN).await;
    assert_eq!(failed.phase, UploadPhase::Failed);
    let reason = failed.error.expect("a reason");
    assert!(reason.contains("disappeared"), "{reason}");
    assert!(rig
        .db
        .find_object(cache.id, &path_hash(1))
        .await
        .expect("lookup")
        .is_none());

    let dead = tokio::time::timeout(VISIBLE_WITHIN, dead_letters.next())
        .await
        .expect("a dead letter in time")
        .expect("a dead letter");
    let job: ChunkJob = dead.decode().expect("a chunk job");
    assert_eq!(job.upload_id, doomed.id.to_string());
    assert!(
        dead.dead_letter_reason()
            .is_some_and(|why| why.contains("disappeared")),
        "{:?}",
        dead.dead_letter_reason()
    );
    dead.ack().await.expect("ack");
    // Counted before the message was moved.
    let metrics_after = metrics_page();
    let moved = |name: &str, labels: &[(&str, &str)]| {
        metrics_after.value(name, labels) - metrics_before.value(name, labels)
    };
    let chunk_queue = [("queue", CHUNK_QUEUE)];
    assert_eq!(moved("larder_jobs_dead_lettered_total", &chunk_queue), 1.0);
    assert_eq!(moved("larder_jobs_failed_total", &chunk_queue), 1.0);
    assert_eq!(moved("larder_jobs_retried_total", &chunk_queue), 0.0);
    assert_eq!(
        moved("larder_uploads_finished_total", &[("phase", "failed")]),
        1.0
    );

    let done = rig.visible(&healthy.id, VISIBLE_WITHIN).await;
    assert_eq!(rig.reassemble(&done).await, nar);
}

/// This process's metrics, parsed.
fn metrics_page() -> tests::prometheus::Page {
    tests::prometheus::parse(&larder_service::metrics::render()).expect("a valid metrics page")
}

async fn the_reconciler_resumes_lost_jobs_and_gives_up_in_the_end(rig: &Rig) {
    let cache = rig.create_cache("lost").await;
    let config = config();
    // Recorded, but its job never published (lost with a restart).
    let nar = nar_of(&pseudo_random(512 * 1024, 9));
    let lost = rig.stage(&cache, path_hash(1), &nar).await;
    let now = Timestamp::now();
    let report = gc_scheduler::reconcile(&rig.db, &*rig.queue, &config, now)
        .await
        .expect("reconciling");
    assert_eq!(report.republished, 0, "not stuck yet");
    let later = now.saturating_add(config.stuck_after.as_duration() + Duration::from_secs(1));
    let report = gc_scheduler::reconcile(&rig.db, &*rig.queue, &config, later)
        .await
        .expect("reconciling");
    assert_eq!(report.republished, 1);
    let done = rig.visible(&lost.id, VISIBLE_WITHIN).await;
    assert_eq!(done.attempts, 1);
    assert_eq!(rig.reassemble(&done).await, nar);

    // One that never gets anywhere: out of attempts, it fails with a reason.
    let hopeless = rig
        .stage(&cache, path_hash(2), &nar_of(&pseudo_random(1024, 10)))
        .await;
    for _ in 0..config.max_upload_attempts {
        rig.db
            .record_upload_attempt(&hopeless.id, now)
            .await
            .expect("counting");
    }
    let report = gc_scheduler::republish_in_flight(&rig.db, &*rig.queue, &config, later)
        .await
        .expect("reconciling");
    assert_eq!(
        report,
        gc_scheduler::ReconcileReport {
            republished: 0,
            failed: 1
        }
    );
    let failed = rig
        .db
        .upload(&hopeless.id)
        .await
        .expect("reading")
        .expect("row");
    assert_eq!(failed.phase, UploadPhase::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|why| why.contains("attempts")),
        "{:?}",
        failed.error
    );
}

/// The same pipeline over RabbitMQ. One test only: the pipeline's queue
/// names are fixed, so two AMQP rigs on one broker would share jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_amqp_a_pushed_nar_becomes_visible() {
    let rig = Rig::start(DbKind::Sqlite, StorageKind::Local, QueueKind::Amqp).await;
    let cache = rig.create_cache("amqp").await;
    let nar = nar_of(&pseudo_random(1 << 20, 7));
    let upload = rig.push(&cache, path_hash(1), &nar).await;
    let upload = rig.visible(&upload.id, VISIBLE_WITHIN).await;
    assert_eq!(rig.reassemble(&upload).await, nar);
    rig.stop().await;
}

/// Two NARs of a 50 MiB file that differ by a small edit in the middle
/// share all but a handful of chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heavy_an_edit_in_the_middle_shares_all_but_a_few_chunks() {
    let rig = Rig::start(DbKind::Sqlite, StorageKind::Local, QueueKind::Embedded).await;
    let cache = rig.create_cache("edits").await;
    let original = pseudo_random(50 << 20, 8);
    let mut edited = original.clone();
    let middle = edited.len() / 2;
    edited[middle..middle + 100].copy_from_slice(&[0x5a; 100]);
    let (first_nar, second_nar) = (nar_of(&original), nar_of(&edited));
    drop((original, edited));

    let first = rig.push(&cache, path_hash(1), &first_nar).await;
    let first = rig.visible(&first.id, Duration::from_secs(240)).await;
    let second = rig.push(&cache, path_hash(2), &second_nar).await;
    let second = rig.visible(&second.id, Duration::from_secs(240)).await;
    assert_eq!(rig.reassemble(&second).await, second_nar);

    let ids = |entries: Vec<larder_db::NarChunk>| -> Vec<ChunkId> {
        entries.into_iter().map(|entry| entry.chunk.id).collect()
    };
    let first_chunks = ids(rig
        .db
        .chunks_of_nar(first.nar_id.expect("NAR"))
        .await
        .expect("chunks"));
    let second_chunks: Vec<ChunkId> = ids(rig
        .db
        .chunks_of_nar(second.nar_id.expect("NAR"))
        .await
        .expect("chunks"));
    let known: HashSet<ChunkId> = first_chunks.iter().copied().collect();
    let new = second_chunks
        .iter()
        .filter(|id| !known.contains(id))
        .count();
    let shared = second_chunks.len() - new;
    println!(
        "edit in the middle of 50 MiB: {} of {} chunks shared ({:.2}%), {new} new",
        shared,
        second_chunks.len(),
        100.0 * shared as f64 / second_chunks.len() as f64
    );
    assert!(new <= 4, "{new} new chunks for a 100-byte edit");
    assert!(first_chunks.len() > 400, "{} chunks", first_chunks.len());
    rig.stop().await;
}
