//! Reads whose cost is bounded by their size, and Nix's upload protocol
//! without the narinfo/staged-file race (issue #12, items 5 and 7).
//!
//! - A `.ls` listing is answered from what the chunker stored when the NAR
//!   was cut: no chunk is read for it, even when every chunk object is
//!   gone.
//! - A NAR's headers cost one database lookup and no storage request; its
//!   body reads each frame once per run of repeats, so a NAR of 100,000
//!   repeated chunks costs a handful of storage reads, not 200,000.
//! - A chunk missing from storage cuts the download short (the connection
//!   drops before Content-Length bytes), and Nix refuses it.
//! - Two `nix copy` of one closure into one cache both succeed; a narinfo
//!   PUT again after success, or after its NAR file was claimed, succeeds;
//!   a NAR file PUT twice is kept once; an unclaimed one is reaped by the
//!   short reaping pass within seconds here (minutes by default).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use larder_api::duration::HumanDuration;
use larder_api::v1::UploadPathResult;
use larder_config::GcConfig;
use larder_db::chunking::MIN_CHUNK_SIZE;
use larder_db::{Backend, Cache};
use larder_nix::{Sha256Hash, StorePathHash};
use larder_token::Permission;
use reqwest::header::CONTENT_LENGTH;
use reqwest::StatusCode;
use tests::nix::{cache_files, file_cache_url, symlink, write_file, NixEnv, NixVersion};
use tests::server::{pseudo_random, TestServer, TestServerOptions, SEED_CHUNK_SIZE};

use crate::server::push::{
    all_uploads, attic_push, blocking, hash_of, nix_narinfo, nix_put, public_key_of, pushing_env,
    staging_files,
};
use crate::server::{
    api_error, fake_store_path, file_nar, get, ok_bytes, ok_json, one_path_env, plain_metadata,
};

const HOUR: Duration = Duration::from_secs(3600);

/// Hang guard for conditions polled below: far longer than any of them
/// takes.
const HANG_GUARD: Duration = Duration::from_secs(120);

async fn cache_row(server: &TestServer, name: &str) -> Cache {
    server
        .database()
        .cache_by_name(&name.parse().expect("a cache name"))
        .await
        .expect("looking up the cache")
        .expect("the cache exists")
}

/// A tree of a few files, one of them spanning several chunks.
fn make_tree(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("share/nested")).expect("creating the tree");
    write_file(
        &dir.join("share/blob.bin"),
        &pseudo_random(5 * SEED_CHUNK_SIZE, seed),
        false,
    )
    .expect("writing the blob");
    write_file(&dir.join("share/nested/empty"), b"", false).expect("writing an empty file");
    write_file(&dir.join("run.sh"), b"#!/bin/sh\necho larder\n", true).expect("writing a script");
    symlink("share/blob.bin", &dir.join("link")).expect("making a symlink");
}

tests::under_each_nix! {
    /// The `.ls` of a path pushed with `nix copy` is served from what the
    /// chunker stored: asking for it makes no storage request at all, and it
    /// is still served, byte for byte what Nix writes, once every chunk object
    /// of its NAR is gone. (Computing it on demand, as before, read and
    /// decompressed every chunk: both checks would fail, the second with a
    /// 503.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_is_served_without_reading_the_nar(version: NixVersion) {
        let server = TestServer::start(TestServerOptions {
            count_storage: true,
            ..TestServerOptions::default()
        })
        .await;
        server.create_cache("listed", false).await;
        let token = server
            .mint(
                "lister",
                HOUR,
                &[("listed", &[Permission::Pull, Permission::Push])],
            )
            .await;
        let url = format!("{}?compression=zstd", server.cache_url("listed"));
        let (path, expected) = {
            let token = token.clone();
            blocking(move || {
                let mut env = NixEnv::with_version(version).expect("a Nix environment");
                let root = env.path("store");
                let tree = env.path("tree");
                make_tree(&tree, 0x1ead);
                let path = env.add_path(&root, &tree).expect("adding the tree");
                let file_cache = env.path("file-cache");
                env.copy_to(
                    &root,
                    &file_cache_url(&file_cache, "write-nar-listing=true&compression=none"),
                    std::slice::from_ref(&path),
                )
                .expect("nix copy to a file:// cache with listings");
                let listings = cache_files(&file_cache, ".ls").expect("listing the cache");
                let expected = std::fs::read(&listings[0]).expect("reading Nix's .ls");
                env.use_netrc("127.0.0.1", &token).expect("a netrc");
                env.copy_to(&root, &url, std::slice::from_ref(&path))
                    .expect("nix copy to the server");
                (path, expected)
            })
            .await
        };
        let hash = hash_of(&path);
        let listing_path = format!("/listed/{hash}.ls");

        let before = server.storage_requests().requests();
        let listing = ok_bytes(get(&server, &listing_path, Some(&token)).await).await;
        assert!(
            tests::nix::same_listing(version, &listing, &expected),
            "{}\nNix wrote:\n{}",
            String::from_utf8_lossy(&listing),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(
            server.storage_requests().requests(),
            before,
            "answering .ls asked storage for something"
        );

        // Every chunk object of the NAR gone: the listing is still there.
        let cache = cache_row(&server, "listed").await;
        let found = server
            .database()
            .find_object(
                cache.id,
                &StorePathHash::parse(&hash).expect("a store path hash"),
            )
            .await
            .expect("looking up the path")
            .expect("the path is visible");
        let chunks = server
            .database()
            .chunks_of_nar(found.nar.id)
            .await
            .expect("the chunk list");
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        for entry in &chunks {
            let location = entry.chunk.location.as_ref().expect("a stored chunk");
            let key = larder_storage::ObjectKey::new(location.object_key.as_str()).expect("a key");
            larder_storage::Storage::delete(server.storage(), &key)
                .await
                .expect("deleting a chunk object");
        }
        let again = ok_bytes(get(&server, &listing_path, Some(&token)).await).await;
        assert_eq!(again, listing);
    }
}

/// A NAR of 100,000 entries that all name one chunk (what FastCDC makes of
/// 1.6 GB of zeros): its `HEAD` asks storage for nothing, and its `GET`
/// reads the one frame a handful of times at most, yet sends every byte.
/// (Checking every chunk's presence first, as before, cost 100,000 size
/// lookups for either, and the body 100,000 reads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nar_of_repeated_chunks_costs_a_handful_of_storage_reads() {
    const ENTRIES: usize = 100_000;
    let server = TestServer::start(TestServerOptions {
        count_storage: true,
        ..TestServerOptions::default()
    })
    .await;
    server.create_cache("zeros", true).await;
    let chunk = vec![0_u8; MIN_CHUNK_SIZE as usize];
    let seeded = server
        .seed_repeated_chunk(
            "zeros",
            plain_metadata(&fake_store_path("zeros")),
            &chunk,
            ENTRIES,
        )
        .await;
    assert_eq!(seeded.nar.n_chunks as usize, ENTRIES);
    let frame = std::fs::read(
        server
            .dir()
            .join("storage")
            .join(seeded.chunk_keys[0].as_str()),
    )
    .expect("reading the chunk's frame");
    let url = server.url_of(&format!("/zeros/{}", seeded.nar_url()));

    let before = (
        server.storage_requests().reads(),
        server.storage_requests().size_lookups(),
    );
    let head = server.http().head(&url).send().await.expect("HEAD");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()),
        Some((frame.len() * ENTRIES).to_string().as_str())
    );
    assert_eq!(
        (
            server.storage_requests().reads(),
            server.storage_requests().size_lookups()
        ),
        before,
        "HEAD asked storage for something"
    );

    let body = ok_bytes(server.http().get(&url).send().await.expect("GET")).await;
    assert_eq!(body.len(), frame.len() * ENTRIES);
    assert!(
        body.chunks(frame.len()).all(|piece| piece == frame),
        "the body is the frame, {ENTRIES} times"
    );
    let reads = server.storage_requests().reads() - before.0;
    let size_lookups = server.storage_requests().size_lookups() - before.1;
    assert_eq!(size_lookups, 0, "no presence check before the body");
    assert!(
        (1..=4).contains(&reads),
        "{reads} storage reads for one distinct chunk"
    );
}

tests::under_each_nix! {
    /// A chunk object deleted from storage under a valid NAR: the download's
    /// connection breaks (before its head, or with its body short of its
    /// Content-Length), never a complete response, and `nix copy --from`
    /// fails rather than accept the path. The download withdraws the path
    /// (its narinfo answers 404), and once it is pushed again both succeed.
    /// (Before, storage was asked about every chunk first and the answer was
    /// a 503.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nar_missing_a_chunk_is_cut_short_and_nix_refuses_it(version: NixVersion) {
        let server = TestServer::sqlite().await;
        server.create_cache("holey", false).await;
        let token = server
            .mint("reader", HOUR, &[("holey", &[Permission::Pull])])
            .await;
        let (env, path, source) =
            one_path_env(version, &token, |tree| make_tree(tree, 0x401e)).await;
        let env = Arc::new(env);
        let seeded = server
            .seed_path("holey", source.metadata.clone(), &source.nar)
            .await;
        assert!(seeded.chunk_keys.len() >= 4);
        let key = public_key_of(&server, &token, "holey").await;
        let nar_path = format!("/holey/{}", seeded.nar_url());

        // The third chunk: the first two may be sent before it is missed.
        let missing = &seeded.chunk_keys[2];
        let missing_file = server.dir().join("storage").join(missing.as_str());
        let saved = std::fs::read(&missing_file).expect("reading the chunk object");
        std::fs::remove_file(&missing_file).expect("deleting the chunk object");

        // The connection drops: before the head reaches the client (the first
        // frames and the error can come in one poll of the body, and hyper
        // then closes without flushing), or after some of the body.
        let sent = server
            .http()
            .get(server.url_of(&nar_path))
            .bearer_auth(&token)
            .send()
            .await;
        if let Ok(mut response) = sent {
            assert_eq!(response.status(), StatusCode::OK);
            let content_length = response.content_length().expect("a Content-Length");
            let (mut received, mut broken) = (0_u64, false);
            loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => received += bytes.len() as u64,
                    Ok(None) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            assert!(broken, "the body ended cleanly after {received} bytes");
            assert!(
                received < content_length,
                "{received} of {content_length} bytes"
            );
        }

        let cache_url = server.cache_url("holey");
        let copied = {
            let (env, cache_url, key, path) =
                (env.clone(), cache_url.clone(), key.clone(), path.clone());
            blocking(move || env.copy_from(&cache_url, &env.path("dest-1"), &key, &[path])).await
        };
        assert!(copied.is_err(), "nix copy --from took a NAR cut short");

        // Withdrawn by the download (on a task of its own: a hang guard).
        let narinfo_path = format!("/holey/{}.narinfo", hash_of(&path));
        let mut withdrawn = false;
        for _ in 0..300 {
            if get(&server, &narinfo_path, Some(&token)).await.status() == StatusCode::NOT_FOUND {
                withdrawn = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(withdrawn, "the path is still advertised 30 s after the cut");
        // Putting the object back does not bring it back: a push does.
        std::fs::write(&missing_file, saved).expect("restoring the chunk object");
        assert_eq!(
            get(&server, &narinfo_path, Some(&token)).await.status(),
            StatusCode::NOT_FOUND
        );
        let pusher = server
            .mint(
                "pusher",
                HOUR,
                &[("holey", &[Permission::Pull, Permission::Push])],
            )
            .await;
        attic_push(&server, &pusher, "holey", std::slice::from_ref(&source)).await;
        let whole = ok_bytes(get(&server, &nar_path, Some(&token)).await).await;
        assert_eq!(
            zstd::stream::decode_all(whole.as_slice()).expect("zstd frames"),
            source.nar
        );
        blocking(move || env.copy_from(&cache_url, &env.path("dest-2"), &key, &[path]))
            .await
            .expect("nix copy --from once the path is pushed again");
    }
}

async fn concurrent_nix_copies_of_one_closure_both_succeed(backend: Backend, version: NixVersion) {
    let server = TestServer::on(backend).await;
    server.create_cache("shared", false).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[("shared", &[Permission::Pull, Permission::Push])],
        )
        .await;
    let (env, root, paths) = pushing_env(version, 16, token.clone()).await;
    let env = Arc::new(env);
    let cache_url = server.cache_url("shared");
    let url = format!("{cache_url}?compression=zstd");
    // One round per path, dependencies first: each round's closure has one
    // path the cache lacks, which both copies push at once (see
    // `copy_with_own_disk_cache` for why one).
    for path in &paths {
        let copies: Vec<_> = (0..2)
            .map(|n| {
                let (env, root, url, path) = (env.clone(), root.clone(), url.clone(), path.clone());
                tokio::task::spawn_blocking(move || {
                    let cache_home = env.path(&format!("cache-{n}"));
                    copy_with_own_disk_cache(&env, &cache_home, &root, &url, &[path])
                })
            })
            .collect();
        for (n, copy) in copies.into_iter().enumerate() {
            copy.await
                .expect("the Nix step panicked")
                .unwrap_or_else(|error| panic!("nix copy #{n} of {path}: {error}"));
        }
    }
    // Every path of the closure is there, with the cache's signature.
    let key = public_key_of(&server, &token, "shared").await;
    let mut env = Arc::try_unwrap(env).unwrap_or_else(|_| panic!("the copies are done"));
    // The copies' narinfos, cached with Nix's own file names, must not
    // stand in for the server's.
    env.add_config("narinfo-cache-positive-ttl", "0");
    let verified = blocking(move || {
        let closure = env.closure(&root, &paths).expect("the closure");
        env.store_verify(&cache_url, &key, &closure)
            .expect("running nix store verify")
    })
    .await;
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
}

/// `nix copy` of `paths` to `url` with a narinfo disk cache of its own in
/// `cache_home`: two Nix processes writing one disk cache at once fail on
/// the client's side ("constraint failed" in Nix's SQLite cache), which is
/// not what this tests.
///
/// Nix 2.8 has a client bug of its own here too: `nix copy` streams every
/// missing path's NAR through one source, and a path that became valid in
/// the cache after the copy started is skipped by draining that source,
/// all the NARs after it included, so the copy then fails with "coroutine
/// has finished" (later Nix gives each path its own source). Copies whose
/// closure lacks one path in the cache never meet it, whatever the server
/// does, so the tests push one new path per copy.
fn copy_with_own_disk_cache(
    env: &NixEnv,
    cache_home: &Path,
    root: &Path,
    url: &str,
    paths: &[String],
) -> Result<(), String> {
    let output = env
        .command("nix")
        .env("XDG_CACHE_HOME", cache_home)
        .args(["copy", "--store"])
        .arg(root)
        .args(["--to", url])
        .args(paths)
        .output()
        .map_err(|error| format!("starting nix copy: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

tests::under_each_nix! {
    /// Two `nix copy` of one closure into one cache at once, path after path:
    /// they PUT the same NAR files and narinfos, skip files the other staged,
    /// and claim files the other PUT. Both must succeed. (Before, a narinfo took its staged
    /// file before its upload committed and a second PUT of a file replaced
    /// the first's: one of the two ended with a 400, "PUT it first".)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_nix_copies_of_one_closure_into_one_cache_both_succeed_on_sqlite(version: NixVersion) {
        concurrent_nix_copies_of_one_closure_both_succeed(Backend::Sqlite, version).await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_nix_copies_of_one_closure_into_one_cache_both_succeed_on_postgres(version: NixVersion) {
        concurrent_nix_copies_of_one_closure_both_succeed(Backend::Postgres, version).await;
    }
}

/// `PUT nar/<FileHash>.nar` of `nar` into `cache`, answered 204.
async fn put_nar_file(server: &TestServer, token: &str, cache: &str, nar: &[u8]) {
    let response = nix_put(
        server,
        token,
        &format!("/{cache}/nar/{}.nar", Sha256Hash::digest(nar).to_base32()),
        nar.to_vec(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

/// `PUT <hash>.narinfo`, with `X-Larder-Wait` when given.
async fn put_narinfo(
    server: &TestServer,
    token: &str,
    cache: &str,
    store_path: &str,
    narinfo: String,
    wait: Option<&str>,
) -> reqwest::Response {
    let mut request = server
        .http()
        .put(server.url_of(&format!("/{cache}/{}.narinfo", hash_of(store_path))))
        .basic_auth("", Some(token))
        .body(narinfo);
    if let Some(wait) = wait {
        request = request.header(larder_api::v1::WAIT_HEADER, wait);
    }
    request.send().await.expect("sending a PUT")
}

/// A narinfo PUT again succeeds: after the first succeeded, and after the
/// first claimed its NAR file (here answered at once, its upload possibly
/// still in flight); a narinfo that does not fit its file leaves the file
/// for the one that does; the same NAR file PUT twice is kept once. Before,
/// the first PUT consumed the file: every retry was a 400 "PUT it first".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narinfo_put_again_succeeds() {
    const CACHE: &str = "retried";
    let server = TestServer::sqlite().await;
    server.create_cache(CACHE, false).await;
    let cache = cache_row(&server, CACHE).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[(CACHE, &[Permission::Pull, Permission::Push])],
        )
        .await;
    let narinfo_of = |path: &str, nar: &[u8]| nix_narinfo(path, nar, nar, "");
    let visible = |path: String| {
        let (server, token) = (&server, &token);
        async move {
            let narinfo = format!("/{CACHE}/{}.narinfo", hash_of(&path));
            ok_bytes(get(server, &narinfo, Some(token)).await).await;
        }
    };

    // After success.
    let nar = file_nar(b"retried after success");
    let path = fake_store_path("after-success");
    put_nar_file(&server, &token, CACHE, &nar).await;
    for attempt in 0..2 {
        let response =
            put_narinfo(&server, &token, CACHE, &path, narinfo_of(&path, &nar), None).await;
        let result: UploadPathResult = ok_json(response).await;
        assert_eq!(result.phase, "done", "attempt {attempt}");
    }
    visible(path).await;

    // After its NAR file was claimed, the upload answered at once.
    let nar = file_nar(b"retried after the claim");
    let path = fake_store_path("after-claim");
    let file_name = format!("{}.nar", Sha256Hash::digest(&nar).to_base32());
    put_nar_file(&server, &token, CACHE, &nar).await;
    let response = put_narinfo(
        &server,
        &token,
        CACHE,
        &path,
        narinfo_of(&path, &nar),
        Some("0"),
    )
    .await;
    let _: UploadPathResult = ok_json(response).await;
    assert_eq!(
        server
            .database()
            .staged_file(cache.id, &file_name)
            .await
            .expect("looking up the staged file"),
        None,
        "the narinfo claimed its file"
    );
    let response = put_narinfo(&server, &token, CACHE, &path, narinfo_of(&path, &nar), None).await;
    let result: UploadPathResult = ok_json(response).await;
    assert_eq!(result.phase, "done");
    visible(path.clone()).await;
    let uploads_of_path = all_uploads(&server)
        .await
        .into_iter()
        .filter(|upload| upload.metadata.store_path == path)
        .count();
    assert_eq!(uploads_of_path, 1, "the retry waited for the first upload");

    // A narinfo that does not fit leaves the file for the one that does.
    let nar = file_nar(b"a wrong narinfo first");
    let path = fake_store_path("wrong-first");
    put_nar_file(&server, &token, CACHE, &nar).await;
    let wrong = narinfo_of(&path, &nar).replace(
        &format!("NarSize: {}", nar.len()),
        &format!("NarSize: {}", nar.len() + 8),
    );
    api_error(
        put_narinfo(&server, &token, CACHE, &path, wrong, None).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let response = put_narinfo(&server, &token, CACHE, &path, narinfo_of(&path, &nar), None).await;
    let result: UploadPathResult = ok_json(response).await;
    assert_eq!(result.phase, "done");

    // The same NAR file twice: one staged copy, one waiting file.
    let nar = file_nar(b"the same file twice");
    let path = fake_store_path("twice");
    let file_name = format!("{}.nar", Sha256Hash::digest(&nar).to_base32());
    put_nar_file(&server, &token, CACHE, &nar).await;
    put_nar_file(&server, &token, CACHE, &nar).await;
    assert_eq!(
        staging_files(&server).len(),
        1,
        "{:?}",
        staging_files(&server)
    );
    assert!(server
        .database()
        .staged_file(cache.id, &file_name)
        .await
        .expect("looking up the staged file")
        .is_some());
    let response = put_narinfo(&server, &token, CACHE, &path, narinfo_of(&path, &nar), None).await;
    let result: UploadPathResult = ok_json(response).await;
    assert_eq!(result.phase, "done");
    visible(path).await;
}

/// A NAR file no narinfo claims is reaped by the short reaping pass, with
/// its staged object, while the full GC run is an hour away. (Before, it
/// waited for a GC run and a deadline of a day.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclaimed_nar_file_is_reaped_by_the_short_pass() {
    const CACHE: &str = "unclaimed";
    let server = TestServer::start(TestServerOptions {
        gc: GcConfig {
            staged_file_deadline: HumanDuration::from_secs(1),
            reap_interval: HumanDuration::from_secs(1),
            ..GcConfig::default()
        },
        ..TestServerOptions::default()
    })
    .await;
    assert_eq!(server.config().gc.interval, HumanDuration::from_secs(3600));
    server.create_cache(CACHE, false).await;
    let cache = cache_row(&server, CACHE).await;
    let token = server
        .mint("pusher", HOUR, &[(CACHE, &[Permission::Push])])
        .await;
    let nar = file_nar(b"never claimed");
    let file_name = format!("{}.nar", Sha256Hash::digest(&nar).to_base32());
    put_nar_file(&server, &token, CACHE, &nar).await;
    assert_eq!(staging_files(&server).len(), 1);

    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        let waiting = server
            .database()
            .staged_file(cache.id, &file_name)
            .await
            .expect("looking up the staged file");
        if waiting.is_none() && staging_files(&server).is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unclaimed file is still there after {HANG_GUARD:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
