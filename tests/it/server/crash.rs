//! Restart safety (issue #4): the real `ingest-api` binary, SIGKILLed while
//! an acknowledged upload is after spooling, in chunking or in compression,
//! then started again on the same config. Every upload must end visible
//! and verified, nothing half-visible on the way, and no staged file left.
//!
//! Each crash is aimed by watching the upload's status endpoint (and,
//! inside compression, the chunk objects appearing in storage: the status
//! shows no chunk counts, which could come from other tenants' chunks) and
//! killing as soon as they show the state under test; the state read just
//! before the kill is asserted, so a kill that missed its phase fails the
//! test rather than passing for the wrong reason. The first server runs
//! with settings that widen the window (see each test).

use std::path::Path;
use std::time::{Duration, Instant};

use larder_api::v1::{UploadPathNarInfo, NAR_INFO_HEADER, WAIT_HEADER};
use larder_nix::nar::NarEncoder;
use larder_nix::{NarHash, Sha256Hash};
use serde_json::Value;
use tests::process::ServerProcess;
use tests::server::{count_files, pseudo_random};

/// A running server and what a client needs to talk to it.
struct Crashable {
    process: ServerProcess,
    url: String,
    token: String,
}

impl Crashable {
    /// Starts `ingest-api` on `config` (written on first start) with extra
    /// environment settings; `token` is the root token printed on first
    /// start, or the one kept from it.
    fn start(config: &Path, env: &[(&str, &str)], token: Option<String>) -> Self {
        let mut process = ServerProcess::start_with(config, env);
        let token = token.unwrap_or_else(|| {
            process.wait_for(|line| {
                let rest = line.trim().strip_prefix("larder login local ")?;
                let (_, token) = rest.split_once(' ')?;
                Some(token.trim().to_owned())
            })
        });
        let address = process.serving_address();
        Self {
            process,
            url: format!("http://{address}"),
            token,
        }
    }
}

/// A NAR of one file of `size` bytes of text-like data: words drawn
/// pseudo-randomly, so it compresses about as well as real text does and
/// zstd spends real time on it.
fn text_nar(size: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "store ",
        "path ",
        "closure ",
        "derivation ",
        "output ",
        "hash ",
        "narinfo ",
        "cache ",
        "substitute ",
        "reference ",
        "build ",
        "nix ",
        "chunk ",
        "zstd ",
        "signature ",
        "\n",
    ];
    let dice = pseudo_random(size, seed);
    let mut contents = Vec::with_capacity(size + 16);
    for byte in dice {
        if contents.len() >= size {
            break;
        }
        contents.extend_from_slice(WORDS[usize::from(byte & 0x0f)].as_bytes());
    }
    contents.truncate(size);
    let mut encoder = NarEncoder::new(Vec::with_capacity(size + 256)).expect("a NAR encoder");
    encoder
        .regular(false, &contents)
        .expect("encoding the file");
    encoder.finish().expect("finishing the NAR")
}

async fn create_cache(http: &reqwest::Client, server: &Crashable, cache: &str) {
    let response = http
        .post(format!("{}/_api/v1/cache-config/{cache}", server.url))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({"keypair": "Generate", "is_public": false}))
        .send()
        .await
        .expect("creating the cache");
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap_or_default()
    );
}

/// Pushes `nar` through Attic's `upload-path` without waiting for
/// visibility; returns the upload id.
async fn push_no_wait(
    http: &reqwest::Client,
    server: &Crashable,
    cache: &str,
    store_path: &str,
    nar: &[u8],
) -> String {
    let hash = store_path
        .strip_prefix("/nix/store/")
        .and_then(|name| name.split('-').next())
        .expect("a store path");
    let info = UploadPathNarInfo {
        cache: cache.to_owned(),
        store_path_hash: hash.to_owned(),
        store_path: store_path.to_owned(),
        references: Vec::new(),
        system: None,
        deriver: None,
        sigs: Vec::new(),
        ca: None,
        nar_hash: NarHash::from(Sha256Hash::digest(nar)).to_string(),
        nar_size: nar.len() as u64,
    };
    let response = http
        .put(format!("{}/_api/v1/upload-path", server.url))
        .bearer_auth(&server.token)
        .header(NAR_INFO_HEADER, serde_json::to_string(&info).expect("JSON"))
        .header(WAIT_HEADER, "0")
        .body(nar.to_vec())
        .send()
        .await
        .expect("pushing");
    let status = response.status();
    let answer: Value = response.json().await.expect("a JSON answer");
    assert!(status.is_success(), "{status}: {answer}");
    answer["upload_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no upload id in {answer}"))
        .to_owned()
}

async fn upload_status(http: &reqwest::Client, server: &Crashable, upload_id: &str) -> Value {
    let response = http
        .get(format!("{}/_api/v1/uploads/{upload_id}", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("reading the upload's status");
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.expect("a JSON status")
}

/// Polls the upload until `aimed` accepts its status (with the number of
/// chunk objects in `storage`) and returns that status, or `None` if the
/// upload ended first; fails if a minute passes first.
async fn watch_until(
    http: &reqwest::Client,
    server: &Crashable,
    upload_id: &str,
    storage: &Path,
    aimed: impl Fn(&Value, usize) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = upload_status(http, server, upload_id).await;
        let packs = count_files(&storage.join("packs"));
        if aimed(&status, packs) {
            return Some(status);
        }
        if matches!(status["phase"].as_str(), Some("done" | "failed")) {
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "never reached the aimed state: {status}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// After the restart: the upload ends `done`, its path is never served
/// before that (nothing half-visible), its narinfo names the pushed NAR, the
/// NAR served decompresses to exactly the pushed bytes, and staging holds
/// nothing.
async fn assert_completes(
    http: &reqwest::Client,
    server: &Crashable,
    cache: &str,
    store_path: &str,
    upload_id: &str,
    nar: &[u8],
    staging: &Path,
) {
    let hash = &store_path["/nix/store/".len()..][..32];
    let fetch_narinfo = || {
        http.get(format!("{}/{cache}/{hash}.narinfo", server.url))
            .bearer_auth(&server.token)
            .send()
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut polls_before_done = 0;
    loop {
        // The narinfo is read before the status: a path served then must
        // belong to an upload that is done by the status read after it,
        // since the upload's end and its object are one transaction.
        let served = fetch_narinfo()
            .await
            .expect("fetching the narinfo")
            .status();
        let status = upload_status(http, server, upload_id).await;
        match (status["phase"].as_str(), served.as_u16()) {
            (Some("done"), _) => break,
            (Some("failed"), _) => panic!("the upload failed after the restart: {status}"),
            (_, 404) => polls_before_done += 1,
            (_, other) => panic!("the path answered {other} while its upload was {status}"),
        }
        assert!(
            Instant::now() < deadline,
            "not done 180 s after the restart: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the path was 404 at {polls_before_done} reads before its upload was done");
    let narinfo = fetch_narinfo().await.expect("fetching the narinfo");
    assert_eq!(narinfo.status(), 200);
    let narinfo = narinfo.text().await.expect("the narinfo's text");
    let expected_hash = NarHash::from(Sha256Hash::digest(nar)).to_string();
    assert!(
        narinfo.contains(&format!("NarHash: {expected_hash}\n")),
        "{narinfo}"
    );
    let url = narinfo
        .lines()
        .find_map(|line| line.strip_prefix("URL: "))
        .expect("a URL line");
    let body = http
        .get(format!("{}/{cache}/{url}", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("fetching the NAR");
    assert_eq!(body.status(), 200);
    let body = body.bytes().await.expect("the NAR's bytes");
    let served = zstd::decode_all(&body[..]).expect("the NAR decompresses");
    assert!(served == nar, "the NAR served differs from the NAR pushed");
    let left: Vec<_> = std::fs::read_dir(staging)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "staged files left after completion: {left:?}"
    );
}

/// How many times a crash test doubles its NAR when the upload ended before
/// the kill could be aimed (a machine faster than the phase is long).
const MAX_DOUBLINGS: u32 = 2;

/// One crash test: push, watch until `aimed`, SIGKILL, restart, check. An
/// upload that ends before it could be aimed at proves nothing, so the
/// test starts over on a fresh server with a NAR twice as large, saying so,
/// at most `MAX_DOUBLINGS` times; then it fails.
async fn crash_and_recover(
    first_env: &[(&str, &str)],
    nar_mib: usize,
    aimed: impl Fn(&Value, usize) -> bool,
    describe: &str,
) {
    let http = reqwest::Client::new();
    let cache = "crash";
    let store_path = "/nix/store/0c4jgkhvx7mv2fjbksq7f2dmkbh8yh9a-crash-test";
    let mut doublings = 0;
    let (dir, nar, upload_id, token) = loop {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("server.toml");
        let storage = dir.path().join("storage");
        let mib = nar_mib << doublings;
        let nar = text_nar(mib << 20, 0xc4a5);
        let server = Crashable::start(&config, first_env, None);
        create_cache(&http, &server, cache).await;
        let upload_id = push_no_wait(&http, &server, cache, store_path, &nar).await;
        if let Some(seen) = watch_until(&http, &server, &upload_id, &storage, &aimed).await {
            let token = server.token.clone();
            server.process.kill();
            eprintln!("killed the server {describe} ({mib} MiB NAR): {seen}");
            break (dir, nar, upload_id, token);
        }
        server.process.stop();
        assert!(
            doublings < MAX_DOUBLINGS,
            "the upload of a {mib} MiB NAR ended before the server could be killed {describe}"
        );
        doublings += 1;
        eprintln!(
            "the upload of a {mib} MiB NAR ended before the server could be killed {describe}: \
             starting over with {} MiB",
            mib * 2
        );
    };
    let config = dir.path().join("server.toml");
    let staging = dir.path().join("storage").join("staging");

    // Nothing is half-visible: the path is not served before it is done.
    let server = Crashable::start(&config, &[], Some(token));
    assert_completes(
        &http, &server, cache, store_path, &upload_id, &nar, &staging,
    )
    .await;
    server.process.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_server_killed_after_spooling_resumes_the_upload() {
    // No chunker in the first process: the upload cannot leave `spooled`.
    crash_and_recover(
        &[("LARDER_PIPELINE__CHUNK_CONCURRENCY", "0")],
        8,
        |status, _| status["phase"] == "spooled",
        "after spooling",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_server_killed_while_chunking_resumes_the_upload() {
    crash_and_recover(
        &[("LARDER_PIPELINE__COMPRESS_CONCURRENCY", "1")],
        192,
        |status, _| status["phase"] == "chunking",
        "while chunking",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_server_killed_while_compressing_resumes_the_upload() {
    // One slow compressor (zstd level 15) keeps compression going long
    // enough to land the kill between the first pack and the last: a
    // 64 MiB NAR is two compress jobs, each one pack.
    crash_and_recover(
        &[
            ("LARDER_PIPELINE__COMPRESS_CONCURRENCY", "1"),
            ("LARDER_PIPELINE__COMPRESSION_LEVEL", "15"),
        ],
        64,
        // Still compressing, with at least one pack written: past the
        // first compress job, before the last one was recorded.
        |status, packs| status["phase"] == "compressing" && packs > 0,
        "while compressing",
    )
    .await;
}
