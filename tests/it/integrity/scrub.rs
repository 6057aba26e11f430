//! The scrub on its own terms: frames packed in one object are checked
//! with one ranged read and damage in them withdraws only what it touches
//! (both backends), and the periodic pass of `[gc] scrub-interval` finds
//! damage without being asked, counted in the metrics.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;

use larder_api::duration::HumanDuration;
use larder_config::GcConfig;
use larder_db::{Actor, Backend, NewObject, StoreState, StoredChunk, Timestamp};
use larder_nix::{NarHash, Sha256Hash, StorePathHash};
use larder_storage::{ObjectKey, Storage};
use tests::counting_storage::CountingStorage;
use tests::prometheus;
use tests::server::{pseudo_random, TestServer, TestServerOptions, SEED_CHUNK_SIZE};

use crate::server::push::hash_of;
use crate::server::{fake_store_path, file_nar, plain_metadata, HOUR};

/// Six chunks of noise packed in one object, listed by two NARs of three
/// chunks each, each NAR a path of one cache. Returns the pack's key, its
/// bytes, the frames' `(offset, length)` and the two paths.
async fn packed_paths(server: &TestServer) -> (ObjectKey, Vec<u8>, Vec<(u64, u64)>, [String; 2]) {
    let cache = server.create_cache("packed", false).await;
    let key = ObjectKey::new("packs/ab/scrub-test.pack").expect("a key");
    let mut pack = Vec::new();
    let mut frames = Vec::new();
    let mut stored = Vec::new();
    for n in 0..6u64 {
        let data = pseudo_random(20_000, n + 1);
        let frame = zstd::bulk::compress(&data, 3).expect("compressing");
        frames.push((pack.len() as u64, frame.len() as u64));
        stored.push(StoredChunk {
            chunk_hash: Sha256Hash::digest(&data),
            chunk_size: data.len() as u64,
            location: larder_db::ChunkLocation {
                object_key: key.to_string(),
                offset: pack.len() as u64,
                length: frame.len() as u64,
            },
        });
        pack.extend_from_slice(&frame);
    }
    server
        .storage()
        .put(&key, Bytes::from(pack.clone()))
        .await
        .expect("writing the pack");
    let mut paths = Vec::new();
    for (n, chunks) in stored.chunks(3).enumerate() {
        // The rows say what the NAR is; its bytes are never served here.
        let nar_hash = NarHash::from(Sha256Hash::digest(format!("packed-{n}").as_bytes()));
        let nar = server
            .database()
            .store_complete_nar(&nar_hash, 60_000, chunks, Timestamp::now())
            .await
            .expect("storing a NAR");
        let path = fake_store_path(&format!("packed-{n}"));
        let object = NewObject {
            store_path_hash: StorePathHash::parse(&hash_of(&path)).expect("a hash"),
            nar_id: nar.id,
            metadata: plain_metadata(&path),
            created_by: Actor::default(),
        };
        server
            .database()
            .upsert_object(cache.id, &object, Timestamp::now())
            .await
            .expect("an object");
        paths.push(path);
    }
    let paths: [String; 2] = paths.try_into().expect("two paths");
    (key, pack, frames, paths)
}

async fn served(server: &TestServer, path: &str) -> bool {
    let cache = server
        .database()
        .cache_by_name(&"packed".parse().expect("a name"))
        .await
        .expect("reading the cache")
        .expect("the cache");
    server
        .database()
        .find_object(
            cache.id,
            &StorePathHash::parse(&hash_of(path)).expect("a hash"),
        )
        .await
        .expect("finding a path")
        .is_some()
}

async fn packed_frames_are_read_together_and_damage_takes_only_what_it_touches(backend: Backend) {
    let server = TestServer::on(backend).await;
    let (key, pack, frames, [first, second]) = packed_paths(&server).await;
    let storage = CountingStorage::new(Arc::new(server.storage().clone()));
    let config = GcConfig::default();

    let report = gc_scheduler::scrub::scrub(server.database(), &storage, &config)
        .await
        .expect("scrubbing");
    assert_eq!(
        (report.objects, report.chunks_checked, report.bytes_read),
        (1, 6, pack.len() as u64),
        "{report}"
    );
    assert_eq!(
        (report.chunks_damaged, report.nars_withdrawn),
        (0, 0),
        "{report}"
    );
    assert_eq!(storage.reads(), 1, "six adjacent frames, one ranged read");

    // A byte of the fifth frame (the second NAR's) flipped in place.
    let mut corrupt = pack.clone();
    let (offset, length) = frames[4];
    corrupt[usize::try_from(offset + length / 2).expect("an offset")] ^= 0x01;
    server
        .storage()
        .put(&key, Bytes::from(corrupt))
        .await
        .expect("corrupting the pack");
    let report = gc_scheduler::scrub::scrub(server.database(), &storage, &config)
        .await
        .expect("scrubbing");
    assert_eq!(
        (report.chunks_damaged, report.nars_withdrawn),
        (1, 1),
        "{report}"
    );
    assert!(served(&server, &first).await);
    assert!(!served(&server, &second).await);

    // The pack gone: the five chunks still recorded in it go, and with
    // them the first NAR.
    server
        .storage()
        .delete(&key)
        .await
        .expect("deleting the pack");
    let report = gc_scheduler::scrub::scrub(server.database(), &storage, &config)
        .await
        .expect("scrubbing");
    assert_eq!(
        (report.chunks_damaged, report.nars_withdrawn),
        (5, 1),
        "{report}"
    );
    assert!(!served(&server, &first).await);
    let valid: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chunks WHERE state = 'valid'")
        .fetch_one(server.database().pool())
        .await
        .expect("counting chunks");
    assert_eq!(valid, 0);
    // Nothing valid is left in storage's name: a pass finds nothing to do.
    let report = gc_scheduler::scrub::scrub(server.database(), &storage, &config)
        .await
        .expect("scrubbing");
    assert_eq!((report.objects, report.chunks_damaged), (0, 0), "{report}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_packed_frames_are_read_together_and_damage_takes_only_what_it_touches() {
    packed_frames_are_read_together_and_damage_takes_only_what_it_touches(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_packed_frames_are_read_together_and_damage_takes_only_what_it_touches() {
    packed_frames_are_read_together_and_damage_takes_only_what_it_touches(Backend::Postgres).await;
}

/// With `[gc] scrub-interval` set, the server scrubs on its own: a chunk
/// object deleted behind its back withdraws its path without anyone
/// reading it, and the metrics count the pass and the damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_scrub_finds_damage_on_its_own_and_counts_it() {
    prometheus::assert_metrics_are_this_tests_own();
    let server = TestServer::start(TestServerOptions {
        gc: GcConfig {
            scrub_interval: Some(HumanDuration::from_secs(1)),
            ..GcConfig::default()
        },
        ..TestServerOptions::default()
    })
    .await;
    let cache = "periodic";
    server.create_cache(cache, false).await;
    let token = server
        .mint(
            "reader",
            HOUR,
            &[(cache, &[larder_token::Permission::Pull])],
        )
        .await;
    let path = fake_store_path("scrubbed");
    let seeded = server
        .seed_path(
            cache,
            plain_metadata(&path),
            &file_nar(&pseudo_random(3 * SEED_CHUNK_SIZE, 0x5c)),
        )
        .await;
    server
        .storage()
        .delete(&seeded.chunk_keys[1])
        .await
        .expect("deleting a chunk object");

    let mut withdrawn = false;
    for _ in 0..300 {
        let nar = server
            .database()
            .nar_by_id(seeded.nar.id)
            .await
            .expect("reading the NAR")
            .expect("kept");
        if nar.state == StoreState::Pending {
            withdrawn = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(withdrawn, "no scrub withdrew the NAR within 30 s");
    let narinfo = server
        .http()
        .get(server.url_of(&format!("/{cache}/{}.narinfo", hash_of(&path))))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET narinfo");
    assert_eq!(narinfo.status(), StatusCode::NOT_FOUND);

    // The pass that withdrew it is counted when it ends.
    let mut page = None;
    for _ in 0..300 {
        let text = server
            .http()
            .get(server.url_of("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the page");
        let scraped = prometheus::parse(&text).unwrap_or_else(|why| panic!("{why}\n{text}"));
        if scraped.value("larder_scrub_passes_total", &[("outcome", "ok")]) >= 1.0 {
            page = Some(scraped);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = page.expect("a scrub pass counted within 30 s");
    assert_eq!(
        page.value("larder_damaged_chunks_total", &[("found_by", "scrub")]),
        1.0
    );
    assert_eq!(page.value("larder_withdrawn_nars_total", &[]), 1.0);
    assert!(page.value("larder_scrub_chunks_checked_total", &[]) >= 2.0);
    server.stop().await;
}
