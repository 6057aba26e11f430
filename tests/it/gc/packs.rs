//! Packs under GC (issue #16): compaction beside uploads and downloads,
//! empty and unrecorded packs, and the repacking of a store written before
//! packs, on both backends.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gc_scheduler::gc::{collect_garbage_locked, GcReport, PACK_GRACE};
use larder_api::byte_size::ByteSize;
use larder_config::{GcConfig, StorageConfig};
use larder_db::{Backend, Timestamp};
use larder_nix::StorePathHash;
use larder_storage::pack::PACK_TARGET_BYTES;
use larder_storage::{ObjectKey, Storage};
use tests::bench::{single_file_nar, store_path_hash_for, Pusher};
use tests::server::{pseudo_random, TestServer, TestServerOptions};
use tests::services;

use super::eager_gc;
use super::end_to_end::chunk_objects;
use crate::server::{fake_store_path, plain_metadata};

const MIB: usize = 1 << 20;

/// Where a test's server keeps its chunks.
#[derive(Debug, Clone, Copy)]
enum Store {
    Local,
    Garage,
}

/// A server with eager GC settings, and the storage its config names
/// (opened again here, as `gc-scheduler` would).
struct Rig {
    server: TestServer,
    storage: Arc<dyn Storage>,
}

impl Rig {
    async fn start(backend: Backend, store: Store) -> Self {
        Self::with_pack_size(backend, store, PACK_TARGET_BYTES).await
    }

    /// A rig whose compress jobs (and so packs) take `pack_size` bytes of
    /// new chunks.
    async fn with_pack_size(backend: Backend, store: Store, pack_size: u64) -> Self {
        let storage = match store {
            Store::Local => None,
            Store::Garage => {
                let prefix = format!("{}/", services::unique_name("packs"));
                Some(StorageConfig::S3(
                    services::S3Settings::from_env().storage_config(&prefix),
                ))
            }
        };
        let edit_config: tests::server::ConfigEdit = Arc::new(move |config| {
            if let Some(storage) = &storage {
                config.storage = storage.clone();
            }
            config.pipeline.pack_size = ByteSize::new(pack_size);
        });
        let server = TestServer::start(TestServerOptions {
            backend,
            gc: eager_gc(),
            edit_config: Some(edit_config),
            ..TestServerOptions::default()
        })
        .await;
        let storage = larder_storage::open(&server.config().storage)
            .await
            .expect("opening the server's storage");
        Self { server, storage }
    }

    /// One GC run with the tests' eager settings at `now`.
    async fn gc_at(&self, now: Timestamp) -> GcReport {
        self.gc_with(&eager_gc(), now).await
    }

    async fn gc_with(&self, config: &GcConfig, now: Timestamp) -> GcReport {
        collect_garbage_locked(self.server.database(), &*self.storage, config, now)
            .await
            .expect("a GC run")
            .expect("the only collector")
    }

    async fn chunk_objects(&self) -> Vec<ObjectKey> {
        chunk_objects(&*self.storage).await
    }

    /// Storage holds exactly the packs recorded, and every chunk is in one.
    async fn storage_matches_pack_rows(&self) {
        let stored: BTreeSet<String> = self
            .chunk_objects()
            .await
            .into_iter()
            .map(|key| key.to_string())
            .collect();
        let recorded: BTreeSet<String> = self
            .server
            .database()
            .packs()
            .await
            .expect("packs")
            .into_iter()
            .map(|pack| pack.object_key)
            .collect();
        assert_eq!(stored, recorded, "storage holds the recorded packs only");
        let located: Vec<String> = sqlx::query_scalar("SELECT DISTINCT object_key FROM chunks")
            .fetch_all(self.server.database().pool())
            .await
            .expect("chunk locations");
        for key in located {
            assert!(recorded.contains(&key), "chunk in {key}, no pack row");
        }
    }
}

/// A NAR of one file: `shared` then `own`.
fn nar_of(shared: &[u8], own: &[u8]) -> Vec<u8> {
    single_file_nar(&[shared, own].concat()).expect("a NAR")
}

/// Downloads path `name` of `cache` as Nix would (narinfo, then its NAR
/// URL) and returns the NAR, decompressed.
async fn download(server: &TestServer, token: &str, cache: &str, name: &str) -> Vec<u8> {
    let hash = store_path_hash_for(name);
    let narinfo = server
        .http()
        .get(server.url_of(&format!("/{cache}/{hash}.narinfo")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET narinfo");
    assert_eq!(narinfo.status(), 200, "{cache}/{name}");
    let narinfo = narinfo.text().await.expect("narinfo text");
    let url = narinfo
        .lines()
        .find_map(|line| line.strip_prefix("URL: "))
        .expect("a URL line");
    let body = server
        .http()
        .get(server.url_of(&format!("/{cache}/{url}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET NAR");
    assert_eq!(body.status(), 200, "{cache}/{url}");
    let compressed = body.bytes().await.expect("the whole NAR");
    zstd::stream::decode_all(&compressed[..]).expect("a zstd stream")
}

async fn compaction_beside_uploads_and_downloads(backend: Backend, store: Store) {
    compaction_of_a_third_live_pack(backend, store, MIB).await;
}

/// The same with a pack of 96 MiB, 32 of them copied by compaction while
/// 64 MiB downloads run across the move (read ahead in many ranged reads,
/// some planned before it and read after it).
async fn heavy_compaction_of_large_packs_beside_uploads_and_downloads(
    backend: Backend,
    store: Store,
) {
    compaction_of_a_third_live_pack(backend, store, 32 * MIB).await;
}

/// A pack of `3 × unit` bytes whose live chunks fall to a third is
/// compacted while uploads and downloads of what shares it go on; every
/// download is whole and right, before, during and after, and the old pack
/// goes after its grace.
async fn compaction_of_a_third_live_pack(backend: Backend, store: Store, unit: usize) {
    // One pack per NAR: X's 3 units fit in one compress job.
    let rig = Rig::with_pack_size(backend, store, 4 * unit as u64).await;
    let server = &rig.server;
    server.create_cache("gone", false).await;
    server.create_cache("kept", false).await;
    let token = server.root_token().await;
    let to = |cache: &str| Pusher::new(&server.url(), &token, cache).expect("a pusher");

    // X: 3 units in one pack. Y shares X's first unit and adds one of its
    // own.
    let shared = pseudo_random(unit, 71);
    let x = nar_of(&shared, &pseudo_random(2 * unit, 72));
    let y = nar_of(&shared, &pseudo_random(unit, 73));
    to("gone").push("x", x).await.expect("pushing X");
    to("kept").push("y", y.clone()).await.expect("pushing Y");
    let packs_before = server.database().packs().await.expect("packs");
    assert_eq!(packs_before.len(), 2, "one pack per NAR: {packs_before:?}");

    // X goes: its pack keeps only the chunks Y shares, about a third.
    let gone = server
        .database()
        .cache_by_name(&"gone".parse().expect("name"))
        .await
        .expect("lookup")
        .expect("cache");
    let x_hash = StorePathHash::parse(&store_path_hash_for("x")).expect("a hash");
    server
        .database()
        .delete_objects(gone.id, &[x_hash])
        .await
        .expect("deleting X");

    // Downloads of Y and pushes of paths sharing X's chunks, all the
    // while GC runs (in one task, interleaved at every await).
    let stop = AtomicBool::new(false);
    let downloads = AtomicU64::new(0);
    let downloader = async {
        while !stop.load(Ordering::Relaxed) {
            assert_eq!(
                download(server, &token, "kept", "y").await,
                y,
                "Y as pushed"
            );
            downloads.fetch_add(1, Ordering::Relaxed);
        }
    };
    let uploader = async {
        let kept = to("kept");
        let mut pushed = Vec::new();
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) || n < 2 {
            let z = nar_of(&shared, &pseudo_random(64 * 1024, 100 + n));
            let name = format!("z{n}");
            kept.push(&name, z.clone()).await.expect("pushing Z");
            pushed.push((name, z));
            n += 1;
        }
        pushed
    };
    let collector = async {
        let mut compacted = 0;
        for _ in 0..4 {
            compacted += rig.gc_at(Timestamp::now()).await.packs_compacted;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, Ordering::Relaxed);
        compacted
    };
    let ((), pushed, compacted) = tokio::join!(downloader, uploader, collector);
    assert!(compacted >= 1, "X's pack was compacted");
    assert!(
        downloads.load(Ordering::Relaxed) > 0,
        "Y was downloaded meanwhile"
    );
    let retired: Vec<String> = server
        .database()
        .packs()
        .await
        .expect("packs")
        .into_iter()
        .filter(|pack| pack.retired_at.is_some())
        .map(|pack| pack.object_key)
        .collect();
    assert!(
        retired.contains(&packs_before[0].object_key),
        "X's pack is retired: {retired:?}"
    );

    // Retired packs stay for their grace, then go; everything still reads.
    let soon = rig.gc_at(Timestamp::now()).await;
    assert_eq!(
        soon.packs_deleted, 0,
        "nothing retired goes within its grace"
    );
    let later = Timestamp::now().saturating_add(PACK_GRACE + Duration::from_secs(60));
    let report = rig.gc_at(later).await;
    assert!(
        report.packs_deleted >= retired.len() as u64,
        "{report:?} for {retired:?}"
    );
    assert_eq!(download(server, &token, "kept", "y").await, y);
    for (name, z) in &pushed {
        assert_eq!(&download(server, &token, "kept", name).await, z, "{name}");
    }
    rig.storage_matches_pack_rows().await;
    rig.server.stop().await;
}

/// A path gone, its pack goes whole in the next run; a pack object no row
/// names (a writer that crashed before recording it) goes once older than
/// `orphan-grace` and `PACK_GRACE`.
async fn empty_and_unrecorded_packs_are_deleted(backend: Backend, store: Store) {
    let rig = Rig::start(backend, store).await;
    let server = &rig.server;
    let cache = server.create_cache("brief", false).await;
    let token = server.root_token().await;
    let pusher = Pusher::new(&server.url(), &token, "brief").expect("a pusher");
    pusher
        .push("p", nar_of(&pseudo_random(2 * MIB, 81), b""))
        .await
        .expect("pushing");
    let hash = StorePathHash::parse(&store_path_hash_for("p")).expect("a hash");
    server
        .database()
        .delete_objects(cache.id, &[hash])
        .await
        .expect("deleting the path");
    let report = rig.gc_at(Timestamp::now()).await;
    assert_eq!(report.packs_deleted, 1, "{report:?}");
    assert!(rig.chunk_objects().await.is_empty());

    let stray = ObjectKey::new("packs/ab/left-by-a-crash.pack").expect("a key");
    rig.storage
        .put(&stray, bytes::Bytes::from_static(b"frames"))
        .await
        .expect("a stray pack");
    // Even with no orphan-grace, a pack is kept for PACK_GRACE.
    let fresh = rig.gc_at(Timestamp::now()).await;
    assert_eq!(fresh.orphans_removed, 0, "{fresh:?}");
    assert_eq!(
        rig.chunk_objects().await,
        std::slice::from_ref(&stray),
        "the stray pack waits out orphan-grace"
    );
    let aged = rig
        .gc_with(
            &eager_gc(),
            Timestamp::now().saturating_add(PACK_GRACE + Duration::from_secs(60)),
        )
        .await;
    assert_eq!(aged.orphans_removed, 1, "{aged:?}");
    assert!(rig.chunk_objects().await.is_empty());
    assert!(server.database().packs().await.expect("packs").is_empty());
    rig.server.stop().await;
}

/// A store written before packs (one object per chunk, as `seed_path`
/// writes them) beside packed paths: `gc-scheduler --repack` moves every
/// chunk into packs, the old objects go after their grace, and every path
/// still reads.
async fn a_store_of_per_chunk_objects_is_repacked(backend: Backend, store: Store) {
    let rig = Rig::start(backend, store).await;
    let server = &rig.server;
    server.create_cache("old", false).await;
    let token = server.root_token().await;
    let old_path = fake_store_path("before-packs");
    let old_nar = nar_of(&pseudo_random(MIB + 5000, 91), b"");
    let seeded = server
        .seed_path("old", plain_metadata(&old_path), &old_nar)
        .await;
    Pusher::new(&server.url(), &token, "old")
        .expect("a pusher")
        .push("after-packs", nar_of(&pseudo_random(MIB, 92), b""))
        .await
        .expect("pushing");
    let unpacked = |server: &TestServer| {
        let pool = server.database().pool().clone();
        async move {
            let count: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM chunks WHERE object_key LIKE 'chunks/%'")
                    .fetch_one(&pool)
                    .await
                    .expect("counting");
            count
        }
    };
    assert!(unpacked(server).await > 1, "the seeded path is per chunk");

    let output = tokio::process::Command::new(tests::server::binary("gc-scheduler"))
        .arg("--config")
        .arg(server.config_path())
        .arg("--repack")
        .output()
        .await
        .expect("running gc-scheduler --repack");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && printed.contains("repacked:"),
        "{output:?}"
    );
    assert_eq!(
        unpacked(server).await,
        0,
        "every chunk is in a pack: {printed}"
    );
    let later = Timestamp::now().saturating_add(PACK_GRACE + Duration::from_secs(60));
    rig.gc_at(later).await;
    rig.storage_matches_pack_rows().await;
    let hash = &old_path["/nix/store/".len()..][..32];
    let narinfo = server
        .http()
        .get(server.url_of(&format!("/old/{hash}.narinfo")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET narinfo");
    assert_eq!(narinfo.status(), 200);
    let served = server
        .http()
        .get(server.url_of(&format!("/old/{}", seeded.nar_url())))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET NAR")
        .bytes()
        .await
        .expect("the NAR");
    assert_eq!(
        zstd::stream::decode_all(&served[..]).expect("zstd"),
        old_nar,
        "the old path reads from its pack"
    );
    assert_eq!(
        download(server, &token, "old", "after-packs").await,
        nar_of(&pseudo_random(MIB, 92), b"")
    );
    rig.server.stop().await;
}

macro_rules! rigs {
    ($($module:ident: $backend:ident, $store:ident => [$($name:ident),* $(,)?];)*) => {
        $(
            mod $module {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name(larder_db::Backend::$backend, super::Store::$store).await;
                    }
                )*
            }
        )*
    };
}

rigs!(
    sqlite_local: Sqlite, Local => [
        compaction_beside_uploads_and_downloads,
        heavy_compaction_of_large_packs_beside_uploads_and_downloads,
        empty_and_unrecorded_packs_are_deleted,
        a_store_of_per_chunk_objects_is_repacked,
    ];
    postgres_local: Postgres, Local => [
        compaction_beside_uploads_and_downloads,
        empty_and_unrecorded_packs_are_deleted,
        a_store_of_per_chunk_objects_is_repacked,
    ];
    postgres_garage: Postgres, Garage => [
        compaction_beside_uploads_and_downloads,
        empty_and_unrecorded_packs_are_deleted,
        heavy_compaction_of_large_packs_beside_uploads_and_downloads,
    ];
);
