//! How NAR bodies are read (issue #16): frames adjacent in one storage
//! object come in a few ranged reads, `Range` requests get exactly their
//! bytes (206, 416, `Accept-Ranges`), and a NAR of 300,000 chunks is
//! served whole and in part on SQLite and PostgreSQL, from local storage
//! and from S3 (Garage).

use std::sync::Arc;

use larder_config::StorageConfig;
use larder_db::chunking::MIN_CHUNK_SIZE;
use larder_db::Backend;
use larder_token::Permission;
use reqwest::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, IF_RANGE, RANGE};
use reqwest::StatusCode;
use tests::nix::write_file;
use tests::server::{pseudo_random, SeededPath, TestServer, TestServerOptions, SEED_CHUNK_SIZE};
use tests::services::{self, S3Settings};

use super::push::{blocking, public_key_of};
use super::{api_error, fake_store_path, file_nar, one_path_env, plain_metadata, HOUR};

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// GET of `url` with a `Range` header (and `If-Range`, if given).
async fn get_range(
    server: &TestServer,
    url: &str,
    token: Option<&str>,
    range: &str,
    if_range: Option<&str>,
) -> reqwest::Response {
    let mut request = server.http().get(url).header(RANGE, range);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(validator) = if_range {
        request = request.header(IF_RANGE, validator);
    }
    request.send().await.expect("GET with Range")
}

/// Checks a 206 answer to `Range: <range>` against `served[first..=last]`.
async fn assert_partial(
    server: &TestServer,
    url: &str,
    token: Option<&str>,
    served: &[u8],
    (range, first, last): (&str, usize, usize),
) {
    let response = get_range(server, url, token, range, None).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{range}");
    assert_eq!(
        header(&response, CONTENT_RANGE),
        Some(format!("bytes {first}-{last}/{}", served.len())),
        "{range}"
    );
    assert_eq!(
        header(&response, CONTENT_LENGTH),
        Some((last - first + 1).to_string()),
        "{range}"
    );
    assert_eq!(header(&response, ACCEPT_RANGES).as_deref(), Some("bytes"));
    let body = response.bytes().await.expect("the partial body");
    assert!(
        body[..] == served[first..=last],
        "{range}: {} bytes differ from bytes {first}..={last}",
        body.len()
    );
}

/// Everything a reader can ask of one NAR with ranges, checked against its
/// whole body.
async fn check_ranges(server: &TestServer, cache: &str, token: &str, seeded: &SeededPath) {
    let url = server.url_of(&format!("/{cache}/{}", seeded.nar_url()));

    let whole = server
        .http()
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .expect("GET");
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(header(&whole, ACCEPT_RANGES).as_deref(), Some("bytes"));
    let served = whole.bytes().await.expect("the whole body").to_vec();
    let size = served.len();
    assert_eq!(Some(size as u64), seeded.nar.file_size);

    // HEAD answers as the whole GET would, with or without a Range.
    for range in [None, Some("bytes=0-9")] {
        let mut request = server.http().head(&url).bearer_auth(token);
        if let Some(range) = range {
            request = request.header(RANGE, range);
        }
        let head = request.send().await.expect("HEAD");
        assert_eq!(head.status(), StatusCode::OK, "HEAD with {range:?}");
        assert_eq!(header(&head, ACCEPT_RANGES).as_deref(), Some("bytes"));
        assert_eq!(header(&head, CONTENT_LENGTH), Some(size.to_string()));
        assert_eq!(header(&head, CONTENT_RANGE), None);
    }

    // A frame is SEED_CHUNK_SIZE bytes or a little more for pseudo-random
    // data: these cross frame boundaries, start and end inside frames, or
    // fall inside one frame.
    let frame = SEED_CHUNK_SIZE;
    let ranges = [
        ("bytes=0-0".to_owned(), 0, 0),
        ("bytes=0-99".to_owned(), 0, 99),
        (
            format!("bytes={}-{}", frame - 10, frame + 10),
            frame - 10,
            frame + 10,
        ),
        (format!("bytes={}-{}", 100, 3 * frame), 100, 3 * frame),
        (format!("bytes={}-", size - 1), size - 1, size - 1),
        (format!("bytes={}-", size / 2), size / 2, size - 1),
        (
            format!("bytes={}-{}", size / 3, size * 10),
            size / 3,
            size - 1,
        ),
        ("bytes=-1".to_owned(), size - 1, size - 1),
        (format!("bytes=-{}", frame + 7), size - frame - 7, size - 1),
        (format!("bytes=-{}", size * 2), 0, size - 1),
    ];
    for (range, first, last) in &ranges {
        assert_partial(server, &url, Some(token), &served, (range, *first, *last)).await;
    }

    // Nothing selected: 416 with the size, as a JSON error.
    for range in [
        format!("bytes={size}-"),
        "bytes=9-5".to_owned(),
        "bytes=-0".to_owned(),
    ] {
        let response = get_range(server, &url, Some(token), &range, None).await;
        assert_eq!(
            header(&response, CONTENT_RANGE),
            Some(format!("bytes */{size}")),
            "{range}"
        );
        let (error, _) = api_error(response, StatusCode::RANGE_NOT_SATISFIABLE).await;
        assert_eq!(error.error, "RangeNotSatisfiable", "{range}");
    }

    // Several ranges, another unit, bad syntax or an If-Range: the whole NAR.
    for (range, if_range) in [
        ("bytes=0-1,5-6", None),
        ("lines=0-1", None),
        ("bytes=x-", None),
        ("bytes=0-9", Some("\"some-etag\"")),
    ] {
        let response = get_range(server, &url, Some(token), range, if_range).await;
        assert_eq!(response.status(), StatusCode::OK, "{range} {if_range:?}");
        assert_eq!(header(&response, CONTENT_RANGE), None);
        let body = response.bytes().await.expect("the whole body");
        assert!(body[..] == served[..], "{range}: not the whole NAR");
    }
}

/// Range requests on a NAR stored one object per chunk and on one stored
/// in packs (several frames per object, a pack boundary inside the NAR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nar_ranges_are_answered_206_with_their_bytes() {
    let server = TestServer::sqlite().await;
    server.create_cache("ranged", false).await;
    let token = server
        .mint("reader", HOUR, &[("ranged", &[Permission::Pull])])
        .await;
    let per_chunk = server
        .seed_path(
            "ranged",
            plain_metadata(&fake_store_path("per-chunk")),
            &file_nar(&pseudo_random(7 * SEED_CHUNK_SIZE + 333, 16)),
        )
        .await;
    let packed = server
        .seed_packed_path(
            "ranged",
            plain_metadata(&fake_store_path("packed")),
            &file_nar(&pseudo_random(9 * SEED_CHUNK_SIZE + 5, 17)),
            4 * SEED_CHUNK_SIZE,
        )
        .await;
    assert_eq!(per_chunk.nar.n_chunks, 8);
    assert_eq!(packed.nar.n_chunks, 10);
    assert_eq!(
        packed
            .chunk_keys
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "ten frames in packs of four"
    );
    check_ranges(&server, "ranged", &token, &per_chunk).await;
    check_ranges(&server, "ranged", &token, &packed).await;
}

/// Seeds `nar` into a new public cache `cache` with its frames in one pack,
/// downloads it whole and checks that it decodes to `nar`. Returns the
/// NAR's chunk count, its URL, the body and how many storage requests the
/// download made.
async fn download_packed(
    server: &TestServer,
    cache: &str,
    nar: &[u8],
) -> (u32, String, Vec<u8>, u64) {
    server.create_cache(cache, true).await;
    let seeded = server
        .seed_packed_path(
            cache,
            plain_metadata(&fake_store_path(cache)),
            nar,
            64 << 20,
        )
        .await;
    let url = server.url_of(&format!("/{cache}/{}", seeded.nar_url()));
    let before = server.storage_requests().requests();
    let body = super::ok_bytes(server.http().get(&url).send().await.expect("GET")).await;
    let reads = server.storage_requests().requests() - before;
    assert!(
        zstd::stream::decode_all(body.as_slice()).expect("zstd frames") == nar,
        "the NAR served is the one seeded"
    );
    (seeded.nar.n_chunks, url, body, reads)
}

/// A NAR whose frames are packed in one object is read with a handful of
/// ranged reads (the first small, each next one twice as long), not one
/// per chunk, and comes out byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_frames_are_served_with_few_ranged_reads() {
    let server = TestServer::start(TestServerOptions {
        count_storage: true,
        ..TestServerOptions::default()
    })
    .await;
    // 12 MiB of incompressible data: 192 frames of a little over 64 KiB.
    let nar = file_nar(&pseudo_random(192 * SEED_CHUNK_SIZE, 18));
    let (n_chunks, url, body, reads) = download_packed(&server, "packed", &nar).await;
    assert_eq!(n_chunks, 193);
    // 1 + 2 + 4 + 8 MiB cover the 12 MiB of frames.
    assert!(
        (1..=4).contains(&reads),
        "{reads} storage requests for 193 frames in one object"
    );

    // The last 10 bytes: one read, whatever precedes them.
    let before = server.storage_requests().requests();
    let response = get_range(&server, &url, None, "bytes=-10", None).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    let tail = response.bytes().await.expect("the tail");
    assert_eq!(tail[..], body[body.len() - 10..]);
    assert_eq!(server.storage_requests().requests() - before, 1);
}

/// A NAR that lists chunks again far from their first use (the same file
/// twice in a closure's NAR) is served from its pack with the same few
/// reads as one without repeats: each repeated frame is kept from its
/// first use to its next, instead of being read again and cutting the
/// pack's read in two each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_listed_again_far_on_are_not_read_again() {
    let server = TestServer::start(TestServerOptions {
        count_storage: true,
        ..TestServerOptions::default()
    })
    .await;
    // 100 slices of incompressible data, the NAR's slices 60, 62, …, 98
    // made copies of slices 5, 7, …, 43: twenty repeats, each between new
    // frames, 55 frames (3.5 MiB) after its first use.
    let mut contents = pseudo_random(100 * SEED_CHUNK_SIZE, 20);
    let header = file_nar(&contents)
        .windows(64)
        .position(|window| window == &contents[..64])
        .expect("the contents in the NAR");
    for i in 0..20 {
        let (from, to) = (
            (2 * i + 5) * SEED_CHUNK_SIZE,
            (60 + 2 * i) * SEED_CHUNK_SIZE,
        );
        contents.copy_within(from - header..from - header + SEED_CHUNK_SIZE, to - header);
    }
    let nar = file_nar(&contents);
    let (n_chunks, _, _, reads) = download_packed(&server, "repeats", &nar).await;
    assert_eq!(n_chunks, 101);
    // 1 + 2 + 4 MiB cover the 81 distinct frames (5.1 MiB); read again,
    // the twenty repeats would cost forty more.
    assert!(
        (1..=3).contains(&reads),
        "{reads} storage requests for 101 entries of 81 frames in one pack"
    );
}

tests::under_each_nix! {
    /// Nix substitutes a path whose NAR is stored in packs (read with ranged
    /// reads across pack boundaries) and checks its hash: the bytes served are
    /// the NAR, whatever the layout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nix_substitutes_a_packed_nar(version: NixVersion) {
        let server = TestServer::sqlite().await;
        server.create_cache("packed", false).await;
        let token = server
            .mint("reader", HOUR, &[("packed", &[Permission::Pull])])
            .await;
        let (env, path, source) = one_path_env(version, &token, |tree| {
            std::fs::create_dir_all(tree).expect("creating the tree");
            write_file(
                &tree.join("blob.bin"),
                &pseudo_random(40 * SEED_CHUNK_SIZE, 19),
                false,
            )
            .expect("writing the blob");
            write_file(&tree.join("run.sh"), b"#!/bin/sh\necho packed\n", true)
                .expect("writing a script");
        })
        .await;
        // Packs of about 1.5 MiB: the first read (1 MiB) and the later ones
        // end inside packs and at their boundaries.
        let seeded = server
            .seed_packed_path(
                "packed",
                source.metadata.clone(),
                &source.nar,
                24 * SEED_CHUNK_SIZE,
            )
            .await;
        assert!(seeded.nar.n_chunks > 40);
        let key = public_key_of(&server, &token, "packed").await;
        let cache_url = server.cache_url("packed");
        blocking(move || env.copy_from(&cache_url, &env.path("dest"), &key, &[path]))
            .await
            .expect("nix copy --from a packed NAR");
    }
}

const IDENTICAL_CHUNKS: usize = 300_000;

/// A NAR of 300,000 identical chunks (a NAR of zeros cut by FastCDC, 4.9 GB
/// uncompressed): its chunk list is read and summed a page at a time
/// (never bound as one parameter list), its one frame is read from storage
/// a handful of times, and ranges deep inside it come out right.
async fn identical_chunks_are_served(server: TestServer) {
    server.create_cache("zeros", true).await;
    let chunk = vec![0_u8; MIN_CHUNK_SIZE as usize];
    let seeded = server
        .seed_repeated_chunk(
            "zeros",
            plain_metadata(&fake_store_path("zeros")),
            &chunk,
            IDENTICAL_CHUNKS,
        )
        .await;
    assert_eq!(seeded.nar.n_chunks as usize, IDENTICAL_CHUNKS);
    let frame = zstd::bulk::compress(&chunk, 3).expect("compressing the chunk");
    let size = frame.len() * IDENTICAL_CHUNKS;
    assert_eq!(seeded.nar.file_size, Some(size as u64), "the seeded frame");
    let url = server.url_of(&format!("/zeros/{}", seeded.nar_url()));

    let before = server.storage_requests().requests();
    let response = server.http().get(&url).send().await.expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, CONTENT_LENGTH), Some(size.to_string()));
    let body = response.bytes().await.expect("the whole body");
    assert_eq!(body.len(), size);
    assert!(
        body.chunks(frame.len()).all(|piece| piece == frame),
        "the body is the frame, {IDENTICAL_CHUNKS} times"
    );
    let requests = server.storage_requests().requests() - before;
    assert!(
        (1..=4).contains(&requests),
        "{requests} storage requests for one distinct chunk"
    );

    // Ranges far into the list: across three frames near its end, inside
    // one frame in its middle, and its last bytes. The expected bytes are
    // the frame's, at the same offsets within it.
    let expected = |first: usize, last: usize| -> Vec<u8> {
        (first..=last).map(|at| frame[at % frame.len()]).collect()
    };
    let near_end = frame.len() * (IDENTICAL_CHUNKS - 3) - 5;
    let middle = frame.len() * (IDENTICAL_CHUNKS / 2) + 3;
    for (first, last) in [
        (near_end, near_end + 2 * frame.len() + 1),
        (middle, middle + 1),
        (size - 7, size - 1),
    ] {
        let before = server.storage_requests().requests();
        let response = get_range(&server, &url, None, &format!("bytes={first}-{last}"), None).await;
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            header(&response, CONTENT_RANGE),
            Some(format!("bytes {first}-{last}/{size}"))
        );
        let body = response.bytes().await.expect("the partial body");
        assert_eq!(body[..], expected(first, last)[..], "bytes {first}-{last}");
        let requests = server.storage_requests().requests() - before;
        assert!(
            (1..=4).contains(&requests),
            "{requests} storage requests for bytes {first}-{last}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_nar_of_300000_identical_chunks_is_served_on_sqlite_and_local_storage() {
    identical_chunks_are_served(
        TestServer::start(TestServerOptions {
            count_storage: true,
            ..TestServerOptions::default()
        })
        .await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_nar_of_300000_identical_chunks_is_served_on_postgres_and_s3() {
    let settings = S3Settings::from_env();
    let prefix = format!("{}/", services::unique_name("identical-chunks"));
    let storage = StorageConfig::S3(settings.storage_config(&prefix));
    identical_chunks_are_served(
        TestServer::start(TestServerOptions {
            backend: Backend::Postgres,
            count_storage: true,
            edit_config: Some(Arc::new(move |config| config.storage = storage.clone())),
            ..TestServerOptions::default()
        })
        .await,
    )
    .await;
}
