//! Issue #15's uploads beside paths: narinfo, `.ls` and build-log PUTs
//! with a `Content-Encoding` (every encoding Nix ≥ 2.33 may send), build
//! logs stored, served, replaced, garbage-collected and deleted with their
//! cache, the debug-info index, and the bad input around them, each a 4xx
//! with nothing stored. The real Nix 2.8 copies a build log with
//! `nix store copy-log --to` and reads it back with `nix log --store`, and
//! writes the debug-info index with `index-debug-info=true`.

use super::content_type;
use std::io::Write;

use gc_scheduler::gc::collect_garbage;
use larder_api::duration::HumanDuration;
use larder_config::{GcConfig, IngestConfig};
use larder_db::{Backend, CacheId, CacheUpdate, Timestamp};
use larder_nix::Sha256Hash;
use larder_token::Permission;
use reqwest::header::CONTENT_ENCODING;
use reqwest::{Method, Response, StatusCode};
use tests::nix::{write_file, NixEnv};
use tests::server::{HttpApi, TestServer, TestServerOptions};

use super::push::{all_uploads, blocking, hash_of, nix_narinfo};
use super::{api_error, fake_store_path, file_nar, get, send, HOUR};

/// Every `Content-Encoding` the server decodes, as Nix names them, and
/// `none`, which Nix sends for `…-compression=none`.
const ENCODINGS: [&str; 6] = ["none", "gzip", "zstd", "xz", "br", "bzip2"];

/// `data` encoded as `encoding` says.
fn encode(encoding: &str, data: &[u8]) -> Vec<u8> {
    match encoding {
        "none" | "identity" => data.to_vec(),
        "gzip" => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(data).expect("gzip into a Vec");
            encoder.finish().expect("gzip into a Vec")
        }
        "zstd" => zstd::bulk::compress(data, 3).expect("zstd"),
        "xz" => {
            let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 6);
            encoder.write_all(data).expect("xz into a Vec");
            encoder.finish().expect("xz into a Vec")
        }
        "bzip2" => {
            let mut encoder =
                bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
            encoder.write_all(data).expect("bzip2 into a Vec");
            encoder.finish().expect("bzip2 into a Vec")
        }
        "br" => brotli_stored(data),
        other => panic!("no encoder for {other}"),
    }
}

/// A brotli stream of `data` in uncompressed meta-blocks (RFC 7932, 9.2):
/// no brotli encoder is built here, and the server must decode any valid
/// stream.
fn brotli_stored(data: &[u8]) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        used: u32,
    }
    impl Bits {
        fn put(&mut self, value: u32, count: u32) {
            for bit in 0..count {
                if self.used == 0 {
                    self.out.push(0);
                }
                if value >> bit & 1 == 1 {
                    *self.out.last_mut().expect("a byte was pushed") |= 1 << self.used;
                }
                self.used = (self.used + 1) % 8;
            }
        }
        fn align(&mut self) {
            self.used = 0;
        }
    }
    let mut bits = Bits {
        out: Vec::new(),
        used: 0,
    };
    bits.put(0, 1); // WBITS: a 64 KiB window.
    for block in data.chunks(1 << 16) {
        bits.put(0, 1); // ISLAST
        bits.put(0, 2); // MNIBBLES: 4
        bits.put(u32::try_from(block.len() - 1).expect("at most 64 KiB"), 16);
        bits.put(1, 1); // ISUNCOMPRESSED
        bits.align();
        bits.out.extend_from_slice(block);
    }
    bits.put(1, 1); // ISLAST
    bits.put(1, 1); // ISLASTEMPTY
    bits.out
}

/// `PUT path` with a token (Basic, as Nix sends it) and an optional
/// `Content-Encoding`.
async fn put(
    server: &impl HttpApi,
    token: Option<&str>,
    path: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> Response {
    let mut request = server.http().put(server.url_of(path)).body(body);
    if let Some(token) = token {
        request = request.basic_auth("", Some(token));
    }
    if let Some(encoding) = encoding {
        request = request.header(CONTENT_ENCODING, encoding);
    }
    request.send().await.expect("sending a PUT")
}

/// A made-up derivation's base name, as a log is named.
fn drv_name(name: &str) -> String {
    format!("{}-{name}.drv", hash_of(&fake_store_path(name)))
}

fn config_with(ingest: IngestConfig) -> TestServerOptions {
    TestServerOptions {
        ingest: IngestConfig {
            wait_for_visible: HumanDuration::from_secs(0),
            ..ingest
        },
        // Uploads stay spooled: these tests look at what the door accepted.
        edit_config: Some(std::sync::Arc::new(|config| {
            config.pipeline.chunk_concurrency = 0;
        })),
        ..TestServerOptions::default()
    }
}

async fn cache_id(server: &TestServer, name: &str) -> CacheId {
    server
        .database()
        .cache_by_name(&name.parse().expect("a cache name"))
        .await
        .expect("looking the cache up")
        .expect("the cache exists")
        .id
}

async fn stored_log(server: &TestServer, cache: &str, drv: &str) -> Option<Vec<u8>> {
    let id = cache_id(server, cache).await;
    server
        .database()
        .build_log(id, drv)
        .await
        .expect("reading the log row")
        .map(|log| log.decode().expect("a stored log decodes"))
}

/// Rows of `table` (`build_logs`, `debug_infos`) of a cache, by id (also
/// after the cache is gone).
async fn rows_of(server: &TestServer, table: &str, cache: CacheId) -> i64 {
    let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE cache_id = $1");
    let row = sqlx::query(&sql)
        .bind(cache.0)
        .fetch_one(server.database().pool())
        .await
        .expect("counting rows");
    sqlx::Row::try_get::<i64, _>(&row, "n").expect("a count")
}

async fn text_of(response: Response) -> String {
    let status = response.status();
    let url = response.url().clone();
    let content_type = content_type(&response);
    let body = response.text().await.expect("a text body");
    assert_eq!(status, StatusCode::OK, "{url}: {body}");
    assert!(
        content_type.starts_with("text/plain"),
        "{url}: {content_type}"
    );
    body
}

/// A narinfo, a `.ls` listing and a build log PUT with each encoding are
/// decoded: the narinfo is recorded as an upload of the NAR it names, the
/// log is served back as sent before encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_narinfos_listings_and_logs_are_decoded_for_every_encoding() {
    let server = TestServer::start(config_with(IngestConfig::default())).await;
    server.create_cache("enc", false).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[("enc", &[Permission::Pull, Permission::Push])],
        )
        .await;
    for encoding in ENCODINGS {
        let nar = file_nar(format!("a NAR pushed with a {encoding} narinfo").as_bytes());
        let store_path = fake_store_path(encoding);
        let hash = hash_of(&store_path);
        let nar_file = format!("/enc/nar/{}.nar", Sha256Hash::digest(&nar).to_base32());
        let staged = put(&server, Some(&token), &nar_file, None, nar.clone()).await;
        assert_eq!(staged.status(), StatusCode::NO_CONTENT, "{encoding}");

        let narinfo = nix_narinfo(&store_path, &nar, &nar, "");
        let response = put(
            &server,
            Some(&token),
            &format!("/enc/{hash}.narinfo"),
            Some(encoding),
            encode(encoding, narinfo.as_bytes()),
        )
        .await;
        let status = response.status();
        let body = response.text().await.expect("a body");
        assert_eq!(status, StatusCode::OK, "{encoding}: {body}");
        assert!(body.contains("\"Uploaded\""), "{encoding}: {body}");

        let listing = br#"{"version":1,"root":{"type":"regular","size":42}}"#;
        let response = put(
            &server,
            Some(&token),
            &format!("/enc/{hash}.ls"),
            Some(encoding),
            encode(encoding, listing),
        )
        .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT, "{encoding}");

        let drv = drv_name(encoding);
        let log: String = (0..2000)
            .map(|line| format!("{encoding} build, line {line}\n"))
            .collect();
        let response = put(
            &server,
            Some(&token),
            &format!("/enc/log/{drv}"),
            Some(encoding),
            encode(encoding, log.as_bytes()),
        )
        .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT, "{encoding}");
        let served = text_of(get(&server, &format!("/enc/log/{drv}"), Some(&token)).await).await;
        assert_eq!(served, log, "{encoding}");
    }
    assert_eq!(all_uploads(&server).await.len(), ENCODINGS.len());
}

/// Each bad upload is a 4xx with the JSON error and leaves nothing: an
/// unknown encoding (415), bytes that are not what their encoding says or
/// that decode to a narinfo that is not one (400), a log over
/// `max-log-size` or a bomb past the decompression ratio (413), and a log
/// without push permission (401, 403, or to another tenant 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_encoded_uploads_are_4xx_and_store_nothing() {
    let limit = 4096;
    let server = TestServer::start(config_with(IngestConfig {
        max_log_size: limit,
        ..IngestConfig::default()
    }))
    .await;
    server.create_cache("bad", false).await;
    server.create_cache("elsewhere", false).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[("bad", &[Permission::Pull, Permission::Push])],
        )
        .await;
    let store_path = fake_store_path("bad");
    let hash = hash_of(&store_path);
    let nar = file_nar(b"a NAR for bad narinfos");
    let nar_file = format!("/bad/nar/{}.nar", Sha256Hash::digest(&nar).to_base32());
    let staged = put(&server, Some(&token), &nar_file, None, nar.clone()).await;
    assert_eq!(staged.status(), StatusCode::NO_CONTENT);
    let narinfo = nix_narinfo(&store_path, &nar, &nar, "");
    let drv = drv_name("bad");
    let narinfo_path = format!("/bad/{hash}.narinfo");
    let log_path = format!("/bad/log/{drv}");
    let files = [
        (narinfo_path.as_str(), narinfo.as_bytes()),
        (&format!("/bad/{hash}.ls"), b"{}"),
        (log_path.as_str(), b"a log"),
        (
            "/bad/debuginfo/0123456789abcdef0123456789abcdef01234567",
            br#"{"archive":"../nar/x.nar","member":"lib/debug/.build-id/01/23.debug"}"#,
        ),
    ];
    let nothing_stored = || async {
        assert!(all_uploads(&server).await.is_empty(), "no upload recorded");
        assert_eq!(
            stored_log(&server, "bad", &drv).await,
            None,
            "no log stored"
        );
        let id = cache_id(&server, "bad").await;
        assert_eq!(rows_of(&server, "debug_infos", id).await, 0);
    };

    for (path, body) in files {
        for unknown in ["lz4", "compress", "gzip, br", "deflate"] {
            let (error, _) = api_error(
                put(
                    &server,
                    Some(&token),
                    path,
                    Some(unknown),
                    encode("gzip", body),
                )
                .await,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            )
            .await;
            assert_eq!(error.error, "UnsupportedMediaType");
            assert!(error.message.contains(unknown), "{}", error.message);
        }
    }
    nothing_stored().await;

    for encoding in ENCODINGS.into_iter().filter(|encoding| *encoding != "none") {
        for path in [narinfo_path.as_str(), log_path.as_str()] {
            let (error, _) = api_error(
                put(
                    &server,
                    Some(&token),
                    path,
                    Some(encoding),
                    b"not compressed".to_vec(),
                )
                .await,
                StatusCode::BAD_REQUEST,
            )
            .await;
            assert!(
                error.message.contains(encoding),
                "{encoding}: {}",
                error.message
            );
            // Cut short: the stream does not end.
            let mut cut = encode(encoding, narinfo.as_bytes());
            cut.truncate(cut.len() - 3);
            api_error(
                put(&server, Some(&token), path, Some(encoding), cut).await,
                StatusCode::BAD_REQUEST,
            )
            .await;
        }
        // A well-compressed narinfo that decodes to garbage.
        api_error(
            put(
                &server,
                Some(&token),
                &narinfo_path,
                Some(encoding),
                encode(encoding, b"\x00 not a narinfo \xff"),
            )
            .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    nothing_stored().await;

    // Over max-log-size, plain or compressed; a log of exactly the limit
    // is stored.
    let too_long = vec![b'x'; usize::try_from(limit).expect("small") + 1];
    for encoding in ["none", "zstd", "gzip"] {
        let (error, _) = api_error(
            put(
                &server,
                Some(&token),
                &log_path,
                Some(encoding),
                encode(encoding, &too_long),
            )
            .await,
            StatusCode::PAYLOAD_TOO_LARGE,
        )
        .await;
        assert!(error.message.contains("max-log-size"), "{}", error.message);
    }
    nothing_stored().await;

    // Without push permission: anonymous, pull only, another tenant's.
    let reader = server
        .mint("reader", HOUR, &[("bad", &[Permission::Pull])])
        .await;
    let stranger = server
        .mint(
            "stranger",
            HOUR,
            &[("elsewhere", &[Permission::Pull, Permission::Push])],
        )
        .await;
    for (caller, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(reader.as_str()), StatusCode::FORBIDDEN),
        (Some(stranger.as_str()), StatusCode::NOT_FOUND),
    ] {
        for (path, body) in files {
            api_error(
                put(&server, caller, path, Some("zstd"), encode("zstd", body)).await,
                status,
            )
            .await;
        }
    }
    nothing_stored().await;

    let exact = vec![b'y'; usize::try_from(limit).expect("small")];
    let response = put(
        &server,
        Some(&token),
        &log_path,
        Some("xz"),
        encode("xz", &exact),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(stored_log(&server, "bad", &drv).await, Some(exact));
}

/// A bomb (1 GiB of zeros in a few KB of zstd) is refused past the
/// decompression ratio with a 413, having decoded about ratio × its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_bomb_is_refused_at_the_decompression_ratio() {
    let server = TestServer::start(config_with(IngestConfig {
        max_log_size: 2 << 30,
        max_decompression_ratio: 100,
        ..IngestConfig::default()
    }))
    .await;
    server.create_cache("bomb", false).await;
    let token = server
        .mint("pusher", HOUR, &[("bomb", &[Permission::Push])])
        .await;
    let bomb = blocking(|| {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 19).expect("zstd");
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            encoder.write_all(&zeros).expect("zstd into a Vec");
        }
        encoder.finish().expect("zstd into a Vec")
    })
    .await;
    assert!(bomb.len() < 1 << 20, "a bomb of {} bytes", bomb.len());
    let drv = drv_name("bomb");
    let (error, _) = api_error(
        put(
            &server,
            Some(&token),
            &format!("/bomb/log/{drv}"),
            Some("zstd"),
            bomb,
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(
        error.message.contains("max-decompression-ratio"),
        "{}",
        error.message
    );
    assert_eq!(stored_log(&server, "bomb", &drv).await, None);
}

/// Logs and debug-info entries are served to readers only (public caches:
/// anyone; a stranger's answer is the missing cache's), replaced by a PUT
/// again, collected once their cache's retention has passed since their
/// upload, and deleted with their cache.
async fn logs_are_served_replaced_collected_and_deleted(backend: Backend) {
    let server = TestServer::start(TestServerOptions {
        backend,
        ..config_with(IngestConfig::default())
    })
    .await;
    server.create_cache("private", false).await;
    server.create_cache("open", true).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[
                ("private", &[Permission::Pull, Permission::Push]),
                ("open", &[Permission::Pull, Permission::Push]),
            ],
        )
        .await;
    let stranger = server
        .mint("stranger", HOUR, &[("open", &[Permission::Pull])])
        .await;
    let drv = drv_name("hello");
    let log_path = format!("/private/log/{drv}");
    let response = put(
        &server,
        Some(&token),
        &log_path,
        None,
        b"first build\n".to_vec(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        text_of(get(&server, &log_path, Some(&token)).await).await,
        "first build\n"
    );
    let response = put(
        &server,
        Some(&token),
        &log_path,
        None,
        b"second build\n".to_vec(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        text_of(get(&server, &log_path, Some(&token)).await).await,
        "second build\n"
    );

    // Readers only, without telling a stranger whether the cache exists.
    api_error(
        get(&server, &log_path, None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let (hidden, _) = api_error(
        get(&server, &log_path, Some(&stranger)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let (missing, _) = api_error(
        get(
            &server,
            &format!("/no-such-cache/log/{drv}"),
            Some(&stranger),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(
        (hidden.error.as_str(), hidden.message.as_str()),
        (missing.error.as_str(), missing.message.as_str())
    );
    let (absent, _) = api_error(
        get(
            &server,
            &format!("/private/log/{}", drv_name("never")),
            Some(&token),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(absent.error, "NoSuchFile");
    api_error(
        get(&server, "/private/log/not-a-store-path", Some(&token)).await,
        StatusCode::BAD_REQUEST,
    )
    .await;

    // A public cache's log is anyone's to read.
    let open_log = format!("/open/log/{drv}");
    let response = put(
        &server,
        Some(&token),
        &open_log,
        Some("gzip"),
        encode("gzip", b"public\n"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        text_of(get(&server, &open_log, None).await).await,
        "public\n"
    );

    // The debug-info index: JSON as sent, to readers.
    let build_id = "00112233445566778899aabbccddeeff00112233";
    let info = r#"{"archive":"../nar/0abc.nar.xz","member":"lib/debug/.build-id/00/112233445566778899aabbccddeeff00112233.debug"}"#;
    let info_path = format!("/private/debuginfo/{build_id}");
    let response = put(
        &server,
        Some(&token),
        &info_path,
        None,
        info.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let served = get(&server, &info_path, Some(&token)).await;
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.text().await.expect("a body"), info);
    api_error(
        get(&server, &info_path, None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    for (path, body) in [
        (info_path.as_str(), &b"{\"archive\": 1}"[..]),
        (info_path.as_str(), b"not json"),
        ("/private/debuginfo/0011", info.as_bytes()),
        (
            "/private/debuginfo/00112233445566778899AABBCCDDEEFF00112233",
            info.as_bytes(),
        ),
    ] {
        api_error(
            put(&server, Some(&token), path, None, body.to_vec()).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }

    // Retention, measured from the upload.
    server
        .database()
        .update_cache(
            &"private".parse().expect("a cache name"),
            &CacheUpdate {
                retention_period: Some(Some(HOUR)),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("setting a retention period");
    let gc = GcConfig::default();
    let storage = larder_storage::LocalStorage::open(server.dir().join("storage"))
        .await
        .expect("the storage");
    let soon = Timestamp::now().saturating_add(HOUR / 2);
    let report = collect_garbage(server.database(), &storage, &gc, soon)
        .await
        .expect("a GC run");
    assert_eq!(report.logs, 0, "{report:?}");
    assert_eq!(
        text_of(get(&server, &log_path, Some(&token)).await).await,
        "second build\n"
    );
    let later = Timestamp::now().saturating_add(2 * HOUR);
    let report = collect_garbage(server.database(), &storage, &gc, later)
        .await
        .expect("a GC run");
    assert_eq!(
        report.logs, 2,
        "the log and the debug-info entry: {report:?}"
    );
    api_error(
        get(&server, &log_path, Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    api_error(
        get(&server, &info_path, Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    // The open cache keeps no retention: its log stays.
    assert_eq!(
        text_of(get(&server, &open_log, None).await).await,
        "public\n"
    );

    // Deleted with the cache.
    let open_id = cache_id(&server, "open").await;
    let response = put(
        &server,
        Some(&token),
        &format!("/open/debuginfo/{build_id}"),
        None,
        info.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(rows_of(&server, "build_logs", open_id).await, 1);
    assert_eq!(rows_of(&server, "debug_infos", open_id).await, 1);
    let root = server.root_token().await;
    let response = send(
        &server,
        Method::DELETE,
        "/_api/v1/cache-config/open",
        Some(&root),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(rows_of(&server, "build_logs", open_id).await, 0);
    assert_eq!(rows_of(&server, "debug_infos", open_id).await, 0);
    server.create_cache("open", true).await;
    api_error(get(&server, &open_log, None).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_served_replaced_collected_and_deleted_on_sqlite() {
    logs_are_served_replaced_collected_and_deleted(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_served_replaced_collected_and_deleted_on_postgres() {
    logs_are_served_replaced_collected_and_deleted(Backend::Postgres).await;
}

tests::under_each_nix! {
    /// The real Nix 2.8: `nix store copy-log --to` the server, then `nix log
    /// --store` prints it, given the derivation or its output; and `nix copy --to '…?index-debug-info=true'`
    /// of a path with a `lib/debug/.build-id` file writes its debug-info entry,
    /// which the server then serves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nix_copies_a_build_log_and_reads_it_back(version: NixVersion) {
        let server = TestServer::start(TestServerOptions::default()).await;
        server.create_cache("nixlogs", false).await;
        let token = server
            .mint(
                "nix",
                HOUR,
                &[("nixlogs", &[Permission::Pull, Permission::Push])],
            )
            .await;
        let url = server.cache_url("nixlogs");
        let salt = format!("salt-{:016x}", rand::random::<u64>());
        let (drv, printed) = {
            let (token, url, salt) = (token.clone(), url.clone(), salt.clone());
            blocking(move || {
                let mut env = NixEnv::with_version(version).expect("a Nix environment");
                env.use_netrc("127.0.0.1", &token).expect("a netrc");
                let store = env.path("store");
                let store_arg = store.to_str().expect("UTF-8").to_owned();
                let (drv, output) = env
                    .build_logging_derivation(&store, &salt)
                    .expect("building a derivation that logs");
                env.run(
                    "nix",
                    &[
                        "store", "copy-log", "--store", &store_arg, "--to", &url, &drv,
                    ],
                )
                .expect("nix store copy-log --to the server");
                // `nix log --store URL DRV` reads the derivation from that
                // store (`--derivation` copies it rather than its outputs);
                // `nix log --store URL OUTPUT` finds it as the output's Deriver.
                env.run(
                    "nix",
                    &[
                        "copy",
                        "--derivation",
                        "--store",
                        &store_arg,
                        "--to",
                        &url,
                        &drv,
                    ],
                )
                .expect("nix copy --derivation --to the server");
                env.copy_to(&store, &url, std::slice::from_ref(&output))
                    .expect("nix copy --to the server");
                // Read as another machine would, with no cache of its own.
                let mut reader = NixEnv::with_version(version).expect("a Nix environment");
                reader.use_netrc("127.0.0.1", &token).expect("a netrc");
                let printed = reader
                    .run_text("nix", &["log", "--store", &url, &drv])
                    .expect("nix log --store the server DRV");
                let by_output = reader
                    .run_text("nix", &["log", "--store", &url, &output])
                    .expect("nix log --store the server OUTPUT");
                assert_eq!(by_output, printed);
                (drv, printed)
            })
            .await
        };
        assert!(printed.contains(&format!("building {salt}")), "{printed}");
        assert!(printed.contains(&format!("to stderr {salt}")), "{printed}");
        let base = drv.trim_start_matches("/nix/store/");
        assert!(stored_log(&server, "nixlogs", base).await.is_some());

        // The debug-info index.
        let build_id: String = rand::random::<[u8; 20]>()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let member = format!(
            "lib/debug/.build-id/{}/{}.debug",
            &build_id[..2],
            &build_id[2..]
        );
        let pushed = {
            let (token, url, member) = (token.clone(), url.clone(), member.clone());
            blocking(move || {
                let mut env = NixEnv::with_version(version).expect("a Nix environment");
                env.use_netrc("127.0.0.1", &token).expect("a netrc");
                let tree = env.path("with-debug");
                let debug_file = tree.join(&member);
                std::fs::create_dir_all(debug_file.parent().expect("a parent"))
                    .expect("the .build-id directory");
                write_file(&debug_file, b"not really ELF", false).expect("a debug file");
                let store = env.path("store");
                let path = env.add_path(&store, &tree).expect("adding the tree");
                env.copy_to(
                    &store,
                    &format!("{url}?index-debug-info=true&compression=xz"),
                    std::slice::from_ref(&path),
                )
                .expect("nix copy --to with index-debug-info");
                path
            })
            .await
        };
        // Named as Nix names it: `<build id>.debug`.
        let served = get(
            &server,
            &format!("/nixlogs/debuginfo/{build_id}.debug"),
            Some(&token),
        )
        .await;
        assert_eq!(served.status(), StatusCode::OK, "{pushed}");
        let info: serde_json::Value = served.json().await.expect("JSON");
        assert_eq!(info["member"], member.as_str(), "{info}");
        assert!(
            info["archive"]
                .as_str()
                .is_some_and(|archive| archive.starts_with("../nar/")),
            "{info}"
        );
    }
}
