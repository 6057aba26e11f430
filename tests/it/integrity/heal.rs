//! Damage found, withdrawn and healed, end to end: the server with its
//! in-process pipeline, the real `gc-scheduler --scrub`, the real Nix
//! client and Attic's API, on SQLite with local storage and on PostgreSQL
//! with Garage.

use std::sync::Arc;
use std::time::Duration;
use tests::nix::NixVersion;

use bytes::Bytes;
use reqwest::StatusCode;

use larder_api::v1::{GetMissingPathsRequest, GetMissingPathsResponse, UploadPathResult};
use larder_config::{IngestConfig, StorageConfig};
use larder_db::{Backend, ChunkLocation, DamagedChunk, Nar, NarChunk};
use larder_storage::{ObjectKey, Storage};
use larder_token::Permission;
use tests::server::{binary, pseudo_random, TestServer, TestServerOptions, SEED_CHUNK_SIZE};
use tests::services::{self, S3Settings};

use crate::server::push::{attic_info, attic_push, hash_of, nix_narinfo, nix_put, public_key_of};
use crate::server::pushing::Pushing;
use crate::server::{fake_store_path, file_nar, ok_json, plain_metadata, HOUR};

/// Where a test server keeps its chunks.
#[derive(Debug, Clone, Copy)]
enum Chunks {
    Local,
    Garage,
}

async fn server(backend: Backend, chunks: Chunks, ingest: IngestConfig) -> TestServer {
    let storage = match chunks {
        Chunks::Local => None,
        Chunks::Garage => {
            let prefix = format!("{}/", services::unique_name("integrity"));
            Some(StorageConfig::S3(
                S3Settings::from_env().storage_config(&prefix),
            ))
        }
    };
    TestServer::start(TestServerOptions {
        backend,
        ingest,
        edit_config: storage.map(|storage| {
            Arc::new(move |config: &mut larder_config::ServerConfig| {
                config.storage = storage.clone();
            }) as tests::server::ConfigEdit
        }),
        ..TestServerOptions::default()
    })
    .await
}

/// The server's storage, as its config names it (local or S3).
async fn storage_of(server: &TestServer) -> Arc<dyn Storage> {
    larder_storage::open(&server.config().storage)
        .await
        .expect("opening the server's storage")
}

async fn token_for(server: &TestServer, caches: &[&str]) -> String {
    let grants: Vec<(&str, &[Permission])> = caches
        .iter()
        .map(|cache| (*cache, &[Permission::Pull, Permission::Push][..]))
        .collect();
    server.mint("pusher", HOUR, &grants).await
}

async fn narinfo_status(server: &TestServer, token: &str, cache: &str, path: &str) -> StatusCode {
    server
        .http()
        .get(server.url_of(&format!("/{cache}/{}.narinfo", hash_of(path))))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET narinfo")
        .status()
}

/// Polls `path`'s narinfo in `cache` until it answers `status`: the server
/// keeps narinfos it served in memory for `READ_CACHE_TIME_TO_LIVE`, which
/// a withdrawal by another process cannot clear. A hang guard, not a
/// bound on that time.
async fn until_narinfo(
    server: &TestServer,
    token: &str,
    cache: &str,
    path: &str,
    status: StatusCode,
) {
    for _ in 0..300 {
        if narinfo_status(server, token, cache, path).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{cache}: the narinfo of {path} did not answer {status} within 30 s");
}

async fn nar_status(server: &TestServer, token: &str, cache: &str, nar: &Nar) -> StatusCode {
    let url = format!("/{cache}/nar/{}.nar.zst", nar.nar_hash.sha256().to_base32());
    server
        .http()
        .get(server.url_of(&url))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET NAR")
        .status()
}

/// The paths among `paths` that `get-missing-paths` reports missing from
/// `cache`, sorted.
async fn missing(server: &TestServer, token: &str, cache: &str, paths: &[String]) -> Vec<String> {
    let request = GetMissingPathsRequest {
        cache: cache.to_owned(),
        store_path_hashes: paths.iter().map(|path| hash_of(path)).collect(),
    };
    let response: GetMissingPathsResponse = ok_json(
        server
            .http()
            .post(server.url_of("/_api/v1/get-missing-paths"))
            .bearer_auth(token)
            .json(&request)
            .send()
            .await
            .expect("get-missing-paths"),
    )
    .await;
    let mut out: Vec<String> = paths
        .iter()
        .filter(|path| response.missing_paths.contains(&hash_of(path)))
        .cloned()
        .collect();
    out.sort();
    out
}

/// The NAR of `path` in `cache` and its chunk list (the path must be
/// served).
async fn stored_nar(server: &TestServer, cache: &str, path: &str) -> (Nar, Vec<NarChunk>) {
    let database = server.database();
    let cache = database
        .cache_by_name(&cache.parse().expect("a cache name"))
        .await
        .expect("reading the cache")
        .expect("the cache exists");
    let hash = larder_nix::StorePathHash::parse(&hash_of(path)).expect("a store path hash");
    let found = database
        .find_object(cache.id, &hash)
        .await
        .expect("finding the path")
        .unwrap_or_else(|| panic!("{path} is served in {}", cache.name));
    let chunks = database
        .chunks_of_nar(found.nar.id)
        .await
        .expect("reading the chunk list");
    (found.nar, chunks)
}

fn location(entry: &NarChunk) -> &ChunkLocation {
    entry.chunk.location.as_ref().expect("a stored chunk")
}

/// Every chunk of the NAR of `path` is valid and its object holds its
/// range.
async fn assert_stored(server: &TestServer, storage: &dyn Storage, cache: &str, path: &str) {
    let (_, chunks) = stored_nar(server, cache, path).await;
    for entry in &chunks {
        let location = location(entry);
        let key = ObjectKey::new(location.object_key.as_str()).expect("a key");
        let size = storage.size(&key).await.expect("asking storage");
        assert!(
            size.is_some_and(|size| size >= location.offset + location.length),
            "{path}: chunk {} at {location:?} is not in storage ({size:?})",
            entry.seq
        );
    }
}

/// Runs `gc-scheduler --config CONFIG --scrub`, which must succeed;
/// returns its report line.
async fn scrub_with_the_binary(server: &TestServer) -> String {
    let output = tokio::process::Command::new(binary("gc-scheduler"))
        .arg("--config")
        .arg(server.config_path())
        .arg("--scrub")
        .env("RUST_LOG", "info")
        .output()
        .await
        .expect("running gc-scheduler --scrub");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "gc-scheduler --scrub failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find(|line| line.starts_with("scrubbed: "))
        .unwrap_or_else(|| panic!("no report in {stdout:?}"))
        .to_owned()
}

/// A report's count before `label` (`"chunks checked"`, …).
fn count_in(report: &str, label: &str) -> u64 {
    let before = report
        .split(label)
        .next()
        .filter(|before| before.len() < report.len())
        .unwrap_or_else(|| panic!("{label:?} not in {report:?}"));
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .find(|word| !word.is_empty())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no count before {label:?} in {report:?}"))
}

/// The acceptance path: a closure pushed with `nix copy` into one cache and
/// with Attic's API into another; one chunk object of a large path and the
/// object of a small path deleted from storage; `gc-scheduler --scrub`
/// finds both; the two paths are withdrawn in both caches (narinfo and NAR
/// 404, reported missing) while the rest stays served; `nix copy` into the
/// first cache heals them (for both caches: the store is global); Nix then
/// substitutes the closure from the second cache and verifies it, and a
/// second scrub finds nothing.
async fn scrub_withdraws_missing_objects_and_nix_copy_heals(
    backend: Backend,
    chunks: Chunks,
    version: NixVersion,
) {
    let server = server(backend, chunks, IngestConfig::default()).await;
    let storage = storage_of(&server).await;
    let (first, second) = ("first", "second");
    server.create_cache(first, false).await;
    server.create_cache(second, false).await;
    let token = token_for(&server, &[first, second]).await;
    let pushing = Pushing::with_large_paths(3, &[2], &token, version).await;
    let pushing = pushing
        .copy_to(format!("{}?compression=zstd", server.cache_url(first)))
        .await;
    attic_push(&server, &token, second, &pushing.sources).await;
    let closure = pushing.closure.clone();
    assert!(missing(&server, &token, first, &closure).await.is_empty());

    // The large path (many chunks) loses the object holding a chunk from
    // its middle, a small one (stored by the chunker itself) the object of
    // its only chunk. With packs an object holds many chunks: what is
    // damaged is every chunk recorded in a deleted object, and what is
    // withdrawn every path listing one of them.
    let large = pushing
        .sources
        .iter()
        .max_by_key(|source| source.nar.len())
        .expect("a large path")
        .path
        .clone();
    let small = pushing
        .sources
        .iter()
        .find(|source| source.nar.len() < 64 << 10)
        .expect("a small path")
        .path
        .clone();
    let (large_nar, large_chunks) = stored_nar(&server, first, &large).await;
    let (small_nar, small_chunks) = stored_nar(&server, first, &small).await;
    assert!(large_chunks.len() > 4, "{} chunks", large_chunks.len());
    assert_eq!(small_chunks.len(), 1);
    let deleted: Vec<String> = [&large_chunks[large_chunks.len() / 2], &small_chunks[0]]
        .iter()
        .map(|entry| location(entry).object_key.clone())
        .collect();
    let mut damaged_chunks = 0;
    for key in &deleted {
        damaged_chunks += server
            .database()
            .chunks_in_object(key)
            .await
            .expect("the chunks of an object")
            .len();
    }
    let mut withdrawn = Vec::new();
    for path in &closure {
        let (_, chunks) = stored_nar(&server, first, path).await;
        if chunks
            .iter()
            .any(|entry| deleted.contains(&location(entry).object_key))
        {
            withdrawn.push(path.clone());
        }
    }
    withdrawn.sort();
    assert!(withdrawn.contains(&large) && withdrawn.contains(&small));
    for key in &deleted {
        let key = ObjectKey::new(key.as_str()).expect("a key");
        storage.delete(&key).await.expect("deleting a chunk object");
    }

    let report = scrub_with_the_binary(&server).await;
    assert_eq!(
        count_in(&report, "damaged chunks"),
        damaged_chunks as u64,
        "{report}"
    );
    assert_eq!(
        count_in(&report, "NARs"),
        withdrawn.len() as u64,
        "{report}"
    );
    assert_eq!(count_in(&report, "chunks unreadable"), 0, "{report}");

    for cache in [first, second] {
        for path in &withdrawn {
            until_narinfo(&server, &token, cache, path, StatusCode::NOT_FOUND).await;
        }
        for nar in [&large_nar, &small_nar] {
            assert_eq!(
                nar_status(&server, &token, cache, nar).await,
                StatusCode::NOT_FOUND
            );
        }
        assert_eq!(missing(&server, &token, cache, &closure).await, withdrawn);
        for path in closure.iter().filter(|path| !withdrawn.contains(path)) {
            assert_eq!(
                narinfo_status(&server, &token, cache, path).await,
                StatusCode::OK,
                "{cache}: {path} is whole and stays served"
            );
        }
    }

    // Nix's own protocol heals: it pushes what the cache says is missing.
    let pushing = pushing
        .copy_to(format!("{}?compression=zstd", server.cache_url(first)))
        .await;
    for cache in [first, second] {
        assert!(
            missing(&server, &token, cache, &closure).await.is_empty(),
            "{cache}"
        );
        for path in &withdrawn {
            until_narinfo(&server, &token, cache, path, StatusCode::OK).await;
        }
    }
    for path in &withdrawn {
        assert_stored(&server, &*storage, first, path).await;
    }
    let public_key = public_key_of(&server, &token, second).await;
    pushing
        .substitute_from(server.cache_url(second), public_key)
        .await;
    let report = scrub_with_the_binary(&server).await;
    assert_eq!(count_in(&report, "damaged chunks"), 0, "{report}");
    assert_eq!(count_in(&report, "NARs"), 0, "{report}");
    server.stop().await;
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_local_scrub_withdraws_missing_objects_and_nix_copy_heals(version: NixVersion) {
        scrub_withdraws_missing_objects_and_nix_copy_heals(Backend::Sqlite, Chunks::Local, version).await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_garage_scrub_withdraws_missing_objects_and_nix_copy_heals(version: NixVersion) {
        scrub_withdraws_missing_objects_and_nix_copy_heals(Backend::Postgres, Chunks::Garage, version).await;
    }
}

/// Bytes corrupted in place (same length, so nothing but decoding can
/// tell) are found by the scrub library; the path is withdrawn, and
/// Attic's `upload-path` heals it with a full pass through the pipeline.
async fn scrub_withdraws_corrupt_frames_and_attic_upload_heals(
    backend: Backend,
    chunks: Chunks,
    version: NixVersion,
) {
    let server = server(backend, chunks, IngestConfig::default()).await;
    let storage = storage_of(&server).await;
    let cache = "corrupt";
    server.create_cache(cache, false).await;
    let token = token_for(&server, &[cache]).await;
    let pushing = Pushing::with_large_paths(2, &[2], &token, version).await;
    attic_push(&server, &token, cache, &pushing.sources).await;
    let large = pushing
        .sources
        .iter()
        .max_by_key(|source| source.nar.len())
        .expect("a large path");
    let (nar, chunks) = stored_nar(&server, cache, &large.path).await;
    let victim = location(&chunks[1]).clone();
    let key = ObjectKey::new(victim.object_key.as_str()).expect("a key");
    let object = storage
        .get_bytes(
            &key,
            0,
            storage.size(&key).await.expect("size").expect("stored"),
        )
        .await
        .expect("reading the object");
    let mut corrupt = object.to_vec();
    let middle = usize::try_from(victim.offset + victim.length / 2).expect("an offset");
    for byte in &mut corrupt[middle..middle + 8] {
        *byte ^= 0x5a;
    }
    storage
        .put(&key, Bytes::from(corrupt))
        .await
        .expect("corrupting the object");

    let report = gc_scheduler::scrub::scrub(server.database(), &*storage, &server.config().gc)
        .await
        .expect("scrubbing");
    assert_eq!(report.chunks_damaged, 1, "{report}");
    assert_eq!(report.nars_withdrawn, 1, "{report}");
    assert_eq!(report.chunks_unreadable, 0, "{report}");
    assert!(report.chunks_checked >= chunks.len() as u64, "{report}");
    until_narinfo(&server, &token, cache, &large.path, StatusCode::NOT_FOUND).await;
    assert_eq!(
        nar_status(&server, &token, cache, &nar).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        missing(&server, &token, cache, &pushing.closure).await,
        std::slice::from_ref(&large.path)
    );

    attic_push(&server, &token, cache, std::slice::from_ref(large)).await;
    until_narinfo(&server, &token, cache, &large.path, StatusCode::OK).await;
    assert_stored(&server, &*storage, cache, &large.path).await;
    let served = server
        .http()
        .get(server.url_of(&format!(
            "/{cache}/nar/{}.nar.zst",
            nar.nar_hash.sha256().to_base32()
        )))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET NAR")
        .bytes()
        .await
        .expect("the whole NAR");
    let decoded = zstd::stream::decode_all(&served[..]).expect("zstd frames");
    assert!(decoded == large.nar, "the healed NAR is the pushed one");
    let again = gc_scheduler::scrub::scrub(server.database(), &*storage, &server.config().gc)
        .await
        .expect("scrubbing again");
    assert_eq!(
        (again.chunks_damaged, again.nars_withdrawn),
        (0, 0),
        "{again}"
    );
    server.stop().await;
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_local_scrub_withdraws_corrupt_frames_and_attic_upload_heals(version: NixVersion) {
        scrub_withdraws_corrupt_frames_and_attic_upload_heals(Backend::Sqlite, Chunks::Local, version).await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_garage_scrub_withdraws_corrupt_frames_and_attic_upload_heals(version: NixVersion) {
        scrub_withdraws_corrupt_frames_and_attic_upload_heals(Backend::Postgres, Chunks::Garage, version).await;
    }
}

/// A NAR download that reaches a chunk missing from storage is cut short
/// (never a complete 200), and the read path withdraws the path: its
/// narinfo answers 404 and `get-missing-paths` reports it, until an upload
/// of the same path heals it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_missing_a_chunk_is_cut_short_and_withdraws_its_path() {
    let server = TestServer::sqlite().await;
    let cache = "reads";
    server.create_cache(cache, false).await;
    let token = token_for(&server, &[cache]).await;
    // Noise, so that it stays several seeded chunks: more than the 1 MiB
    // a chunker stores itself, so the heal goes through compress jobs.
    let contents = pseudo_random(20 * SEED_CHUNK_SIZE, 0x1dea);
    let nar = file_nar(&contents);
    let path = fake_store_path("withdrawn");
    let seeded = server.seed_path(cache, plain_metadata(&path), &nar).await;
    server
        .storage()
        .delete(&seeded.chunk_keys[10])
        .await
        .expect("deleting a chunk object");

    let response = server
        .http()
        .get(server.url_of(&format!("/{cache}/{}", seeded.nar_url())))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET NAR");
    assert_eq!(response.status(), StatusCode::OK);
    let length = response.content_length().expect("a Content-Length");
    match response.bytes().await {
        Err(_) => {}
        Ok(body) => panic!(
            "a NAR missing a chunk was answered whole: {} of {length} bytes",
            body.len()
        ),
    }
    until_narinfo(&server, &token, cache, &path, StatusCode::NOT_FOUND).await;
    assert_eq!(
        missing(&server, &token, cache, std::slice::from_ref(&path)).await,
        std::slice::from_ref(&path)
    );
    let nar_row = server
        .database()
        .nar_by_id(seeded.nar.id)
        .await
        .expect("reading the NAR")
        .expect("kept for healing");
    assert_eq!(nar_row.state, larder_db::StoreState::Pending);

    let result: UploadPathResult = ok_json(
        server
            .http()
            .put(server.url_of("/_api/v1/upload-path"))
            .bearer_auth(&token)
            .header(
                "X-Attic-Nar-Info",
                attic_info(cache, &path, &nar).to_string(),
            )
            .body(nar.clone())
            .send()
            .await
            .expect("upload-path"),
    )
    .await;
    assert_eq!(result.phase, "done");
    until_narinfo(&server, &token, cache, &path, StatusCode::OK).await;
    let served = server
        .http()
        .get(server.url_of(&format!("/{cache}/{}", seeded.nar_url())))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET NAR")
        .bytes()
        .await
        .expect("the whole NAR");
    assert!(zstd::stream::decode_all(&served[..]).expect("zstd frames") == nar);
    server.stop().await;
}

/// The push paths that attach a path without the pipeline never attach a
/// withdrawn NAR: a server without proof of possession reads the body and
/// stores it (its answer names an upload), and a narinfo `PUT` whose NAR
/// file the cache no longer holds is refused rather than linked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_nar_is_never_linked_without_the_pipeline() {
    let server = server(
        Backend::Sqlite,
        Chunks::Local,
        IngestConfig {
            require_proof_of_possession: false,
            ..IngestConfig::default()
        },
    )
    .await;
    let cache = "links";
    server.create_cache(cache, false).await;
    let token = token_for(&server, &[cache]).await;
    let nar = file_nar(&pseudo_random(3 * SEED_CHUNK_SIZE, 0x11e));
    let path = fake_store_path("linked");
    let seeded = server.seed_path(cache, plain_metadata(&path), &nar).await;
    let chunks = server
        .database()
        .chunks_of_nar(seeded.nar.id)
        .await
        .expect("the chunk list");
    let damaged = DamagedChunk {
        id: chunks[0].chunk.id,
        location: location(&chunks[0]).clone(),
    };
    let withdrawal = server
        .database()
        .mark_chunks_damaged(&[damaged])
        .await
        .expect("marking");
    assert_eq!(withdrawal.nars, [seeded.nar.nar_hash]);
    server
        .storage()
        .delete(&seeded.chunk_keys[0])
        .await
        .expect("deleting the damaged chunk's object");
    until_narinfo(&server, &token, cache, &path, StatusCode::NOT_FOUND).await;

    // Nix's narinfo alone, as a retried `nix copy` would send it after the
    // path's NAR file was claimed long ago: nothing is linked.
    let hash = hash_of(&path);
    let response = nix_put(
        &server,
        &token,
        &format!("/{cache}/{hash}.narinfo"),
        nix_narinfo(&path, &nar, &nar, "").into_bytes(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        narinfo_status(&server, &token, cache, &path).await,
        StatusCode::NOT_FOUND
    );

    // Without proof of possession a valid NAR is linked at once (no upload
    // id); a withdrawn one is read and stored through an upload.
    let result: UploadPathResult = ok_json(
        server
            .http()
            .put(server.url_of("/_api/v1/upload-path"))
            .bearer_auth(&token)
            .header(
                "X-Attic-Nar-Info",
                attic_info(cache, &path, &nar).to_string(),
            )
            .body(nar.clone())
            .send()
            .await
            .expect("upload-path"),
    )
    .await;
    assert!(result.upload_id.is_some(), "{result:?}");
    assert_eq!(result.phase, "done");
    until_narinfo(&server, &token, cache, &path, StatusCode::OK).await;
    assert_stored(&server, server.storage(), cache, &path).await;
    server.stop().await;
}
