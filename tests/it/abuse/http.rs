//! Attacks on the serving layer (issue #12, item 4) and on the number of
//! uploads one token runs at once: half-sent headers, idle connections,
//! stalled uploads, more uploads than the limits allow, and a shutdown
//! with a stalled upload open. Each test would hang (and hit its guard)
//! or see no refusal if its defence broke.
//!
//! Limits and timeouts are set small for each test through the `[http]`
//! section; events are observed on the server's own metrics (the server
//! runs in the test's process), never by waiting a fixed time.

use std::path::Path;
use std::time::Duration;

use larder_api::duration::HumanDuration;
use larder_config::HttpConfig;
use larder_nix::Sha256Hash;
use larder_token::Permission;
use reqwest::StatusCode;
use tests::nix::{write_file, NixEnv, NixVersion};
use tests::prometheus::{self, Page};
use tests::server::{TestServer, TestServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{blocking, store_config, Larder};
use crate::server::push::{attic_info, upload, Form};
use crate::server::{fake_store_path, file_nar};

const HOUR: Duration = Duration::from_secs(3600);

/// The longest any awaited event may take before the test fails: far
/// beyond the one-second timeouts the tests configure.
const HANG_GUARD: Duration = Duration::from_secs(60);

const CACHE: &str = "tenant";

/// A server whose `[http]` section `edit` changed.
async fn server_with(edit: impl Fn(&mut HttpConfig) + Send + Sync + 'static) -> TestServer {
    TestServer::start(TestServerOptions {
        edit_config: Some(std::sync::Arc::new(move |config| edit(&mut config.http))),
        ..TestServerOptions::default()
    })
    .await
}

/// The cache and a push token for it.
async fn cache_and_token(server: &TestServer, subject: &str) -> String {
    if server
        .database()
        .cache_by_name(&CACHE.parse().expect("a cache name"))
        .await
        .expect("looking up the cache")
        .is_none()
    {
        server.create_cache(CACHE, false).await;
    }
    server
        .mint(
            subject,
            HOUR,
            &[(CACHE, &[Permission::Pull, Permission::Push])],
        )
        .await
}

fn secs(seconds: u64) -> HumanDuration {
    HumanDuration::from_secs(seconds)
}

/// This process's metrics page: the server runs in it.
fn metrics() -> Page {
    // Exact figures (open connections): only this test's server may move them.
    prometheus::assert_metrics_are_this_tests_own();
    prometheus::parse(&larder_service::metrics::render()).expect("a valid metrics page")
}

/// Waits until `condition` holds on the metrics page.
async fn wait_for(what: &str, condition: impl Fn(&Page) -> bool) {
    tokio::time::timeout(HANG_GUARD, async {
        while !condition(&metrics()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("waited {HANG_GUARD:?} for {what}"));
}

/// Bytes of request bodies the server has read on a route's PUTs.
fn body_bytes_read(page: &Page, route: &str) -> f64 {
    page.value(
        "larder_http_request_body_bytes_total",
        &[("route", route), ("method", "PUT")],
    )
}

fn answers(page: &Page, route: &str, status: &str) -> f64 {
    page.value(
        "larder_http_requests_total",
        &[("route", route), ("method", "PUT"), ("status", status)],
    )
}

fn timeouts(page: &Page, kind: &str) -> f64 {
    page.value("larder_http_timeouts_total", &[("kind", kind)])
}

const UPLOAD_PATH: &str = "/_api/v1/upload-path";
const NAR_ROUTE: &str = "/{cache}/nar/{file}";

/// Sends a PUT's head (with `Content-Length: declared`) and the first
/// bytes of its body, then nothing: a stalled upload, open as long as the
/// returned connection is.
async fn stalled_put(
    server: &TestServer,
    target: &str,
    headers: &[(&str, String)],
    declared: usize,
    sent: &[u8],
) -> TcpStream {
    let mut stream = TcpStream::connect(server.address())
        .await
        .expect("connecting to the server");
    let mut head = format!(
        "PUT {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: {declared}\r\n",
        server.address()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(&[head.as_bytes(), sent].concat())
        .await
        .expect("sending the start of an upload");
    stream
}

/// A stalled `upload-path` of a fresh 100 kB NAR: its head, metadata and
/// first 64 bytes.
async fn stalled_upload_path(server: &TestServer, token: &str) -> TcpStream {
    let nar = file_nar(&vec![7u8; 100_000]);
    let info = attic_info(CACHE, &fake_store_path("stalled"), &nar);
    stalled_put(
        server,
        UPLOAD_PATH,
        &[
            ("Authorization", format!("Bearer {token}")),
            ("X-Attic-Nar-Info", info.to_string()),
        ],
        nar.len(),
        &nar[..64],
    )
    .await
}

/// A stalled `PUT /{cache}/nar/…` as Nix sends it, with its first 64 bytes.
async fn stalled_nar_put(server: &TestServer, token: &str) -> TcpStream {
    let nar = file_nar(&vec![9u8; 100_000]);
    let file = format!("{}.nar", Sha256Hash::digest(&nar).to_base32());
    stalled_put(
        server,
        &format!("/{CACHE}/nar/{file}"),
        &[("Authorization", format!("Bearer {token}"))],
        nar.len(),
        &nar[..64],
    )
    .await
}

/// Reads until the server closes the connection (a reset counts), and
/// returns what it sent; fails after [`HANG_GUARD`].
async fn closed_by_server(mut stream: TcpStream, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(HANG_GUARD, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server kept {what} open for {HANG_GUARD:?}"));
    received
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

async fn count_rows(server: &TestServer, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(server.database().pool())
        .await
        .unwrap_or_else(|error| panic!("counting {table}: {error}"))
}

/// Everything under the server's `storage/staging`, temporaries included.
fn staging_entries(server: &TestServer) -> Vec<String> {
    match std::fs::read_dir(server.dir().join("storage/staging")) {
        Ok(entries) => entries
            .map(|entry| {
                entry
                    .expect("a staging entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A connection that sends half of a request head is closed once the
/// header-read timeout passes, and so is a keep-alive connection that sits
/// idle after its answer. Without the timer both stay open for good.
#[tokio::test]
async fn half_sent_headers_and_idle_connections_are_closed_after_the_header_read_timeout() {
    let server = server_with(|http| http.header_read_timeout = secs(1)).await;

    let mut half = TcpStream::connect(server.address())
        .await
        .expect("connecting");
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: larder\r\nX-Slow: ")
        .await
        .expect("sending half a head");
    let answer = closed_by_server(half, "a connection with half a request head").await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 2"),
        "half a head was answered: {}",
        String::from_utf8_lossy(&answer)
    );

    let mut idle = TcpStream::connect(server.address())
        .await
        .expect("connecting");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: larder\r\n\r\n")
        .await
        .expect("sending a request");
    let answer = closed_by_server(idle, "an idle keep-alive connection").await;
    assert_eq!(
        status_of(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(timeouts(&metrics(), "header") >= 2.0);
}

/// Sends `GET /healthz` on a keep-alive connection and reads its answer.
async fn healthz_on(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: larder\r\n\r\n")
        .await
        .expect("sending a request");
    let mut received = Vec::new();
    tokio::time::timeout(HANG_GUARD, async {
        let mut buffer = [0u8; 4096];
        // The answer's body is `{"alive":true}`.
        while !received.ends_with(b"}") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer to GET /healthz within {HANG_GUARD:?}"));
    received
}

/// Connections accepted by the kernel that wait in the listen queue of
/// the IPv4 socket listening on `port` (`/proc/net/tcp` shows that queue
/// as the listening socket's `rx_queue`).
fn listen_queue(port: u16) -> u32 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() > 4 && fields[1].ends_with(&local) && fields[3] == "0A")
        .and_then(|fields| fields[4].split_once(':').map(|(_, rx)| rx.to_owned()))
        .map(|rx| u32::from_str_radix(&rx, 16).expect("a hexadecimal queue length"))
        .unwrap_or_else(|| panic!("no listening socket on port {port} in /proc/net/tcp"))
}

/// With `max-connections` open, the server accepts no more: another
/// connection waits in the kernel's listen queue, and is served once one
/// of the open ones closes. Without the limit it is accepted at once and
/// never waits in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_until_one_closes() {
    let server = server_with(|http| http.max_connections = 2).await;
    let port = server.address().port();
    let mut first = TcpStream::connect(server.address())
        .await
        .expect("connecting");
    let mut second = TcpStream::connect(server.address())
        .await
        .expect("connecting");
    for stream in [&mut first, &mut second] {
        assert_eq!(status_of(&healthz_on(stream).await), Some(200));
    }

    let mut third = TcpStream::connect(server.address())
        .await
        .expect("connecting");
    let waiting = tokio::spawn(async move { healthz_on(&mut third).await });
    tokio::time::timeout(HANG_GUARD, async {
        while listen_queue(port) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the third connection waits in the listen queue");
    // It stays there while the server serves the open ones (an accept
    // loop without the limit would have taken it by then).
    for _ in 0..3 {
        assert_eq!(status_of(&healthz_on(&mut second).await), Some(200));
        assert_eq!(listen_queue(port), 1, "the third connection was accepted");
    }
    assert_eq!(metrics().value("larder_http_open_connections", &[]), 2.0);
    assert!(!waiting.is_finished(), "the third connection was served");

    drop(first);
    let answer = waiting.await.expect("the third connection's reader");
    assert_eq!(
        status_of(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(listen_queue(port), 0);
    drop(second);
}

/// A stalled upload, by either protocol, is dropped after the body-idle
/// timeout: its request ends with a 400 naming the stall, and nothing is
/// left in staging, `uploads` or `staged_files`. Without the timeout the
/// connections stay open and the staged objects with them.
#[tokio::test]
async fn a_stalled_upload_is_dropped_after_the_body_idle_timeout_and_leaves_nothing() {
    let server = server_with(|http| http.body_idle_timeout = secs(1)).await;
    let token = cache_and_token(&server, "staller").await;

    for (what, stalled) in [
        ("upload-path", stalled_upload_path(&server, &token).await),
        ("PUT nar/…", stalled_nar_put(&server, &token).await),
    ] {
        let answer = closed_by_server(stalled, what).await;
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(status_of(&answer), Some(400), "{what}: {text}");
        assert!(
            text.contains("no bytes of the request body arrived"),
            "{what}: {text}"
        );
    }
    assert!(timeouts(&metrics(), "body_idle") >= 2.0);
    assert_eq!(staging_entries(&server), Vec::<String>::new());
    assert_eq!(count_rows(&server, "uploads").await, 0);
    assert_eq!(count_rows(&server, "staged_files").await, 0);

    // The server still takes a whole upload.
    let nar = file_nar(b"after the stalls");
    let info = attic_info(CACHE, &fake_store_path("whole"), &nar);
    let response = upload(&server, Some(&token), &info, &nar, Form::Header).await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// Past its token's limit an upload is refused at once with 429, a
/// `Retry-After` and a JSON error naming the limit; another token's upload
/// goes through, and the token's own once its upload has ended. Without
/// the limit the second upload would be taken.
#[tokio::test]
async fn past_the_per_token_limit_an_upload_gets_429_with_retry_after() {
    let server = server_with(|http| http.max_concurrent_uploads_per_token = 1).await;
    let token = cache_and_token(&server, "busy").await;
    let other = cache_and_token(&server, "other").await;

    let stalled = stalled_upload_path(&server, &token).await;
    wait_for("the stalled upload to be read", |page| {
        body_bytes_read(page, UPLOAD_PATH) > 0.0
    })
    .await;

    // Large enough that most of it is still unsent when the refusal
    // comes: the client reads the 429 all the same.
    let nar = file_nar(&vec![2u8; 16 << 20]);
    let info = attic_info(CACHE, &fake_store_path("second"), &nar);
    let refused = upload(&server, Some(&token), &info, &nar, Form::Header).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = refused
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    assert!(
        retry_after.is_some_and(|seconds| seconds >= 1),
        "{retry_after:?}"
    );
    let error: larder_api::v1::ErrorResponse = refused.json().await.expect("a JSON error");
    assert_eq!((error.code, error.error.as_str()), (429, "TooManyUploads"));
    assert!(
        error.message.contains("max-concurrent-uploads-per-token"),
        "{}",
        error.message
    );

    let response = upload(&server, Some(&other), &info, &nar, Form::Header).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "another token is not limited"
    );

    drop(stalled);
    wait_for("the stalled upload's slot to be given back", |page| {
        page.value("larder_upload_slots_held", &[]) == 0.0
    })
    .await;
    let nar = file_nar(b"third upload");
    let info = attic_info(CACHE, &fake_store_path("third"), &nar);
    let response = upload(&server, Some(&token), &info, &nar, Form::Header).await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// `n` store paths that do not refer to each other (so that a push may
/// upload them all at once), added to the chroot store at `root`.
fn independent_paths(env: &NixEnv, root: &Path, n: usize, salt: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let dir = env.path(&format!("tree-{salt}-{i}"));
            std::fs::create_dir_all(&dir).expect("a directory");
            write_file(
                &dir.join("data"),
                format!("{salt} path {i}\n").repeat(2000).as_bytes(),
                false,
            )
            .expect("a file");
            env.add_path(root, &dir).expect("adding a path")
        })
        .collect()
}

tests::under_each_nix! {
    /// `larder push -j 4` with a per-token limit of 1, its slot held by a
    /// stalled upload of the same token: its uploads are refused with 429
    /// until the stalled one ends, and the push succeeds by retrying. The
    /// refusals are counted by the server. Without the limit there is no
    /// refusal to wait for.
    #[tokio::test]
    async fn larder_push_with_more_jobs_than_the_limit_succeeds_by_retrying(version: NixVersion) {
        let server = server_with(|http| http.max_concurrent_uploads_per_token = 1).await;
        let token = cache_and_token(&server, "pusher").await;
        let salt = format!("{:016x}", rand::random::<u64>());
        let (env, root, paths) = blocking(move || {
            let env = NixEnv::with_version(version).expect("a Nix environment");
            let root = env.path("store");
            let paths = independent_paths(&env, &root, 6, &salt);
            (env, root, paths)
        })
        .await;

        let mut larder = Larder::with_nix(version);
        larder.set_env("NIX_CONFIG", &store_config(&root));
        larder.ok(&["login", "local", &server.url(), &token]).await;

        let stalled = stalled_upload_path(&server, &token).await;
        wait_for("the stalled upload to be read", |page| {
            body_bytes_read(page, UPLOAD_PATH) > 0.0
        })
        .await;
        let mut arguments = vec!["push", CACHE, "-j", "4"];
        arguments.extend(paths.iter().map(String::as_str));
        let release = async {
            wait_for("a push refused with 429", |page| {
                answers(page, UPLOAD_PATH, "429") > 0.0
            })
            .await;
            drop(stalled);
        };
        let (output, ()) = tokio::join!(larder.run(&arguments), release);
        let (out, err) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(output.status.success(), "larder push failed: {out}{err}");
        assert!(out.contains("pushed 6 paths"), "{out}");
        assert!(answers(&metrics(), UPLOAD_PATH, "429") > 0.0);
        // The client read the refusal and the wait it asked for.
        assert!(err.contains("in 2.") || err.contains("in 3."), "{err}");
        assert!(err.contains("max-concurrent-uploads-per-token"), "{err}");
        for path in &paths {
            let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
            let response = server
                .http()
                .get(server.cache_url(&format!("{CACHE}/{hash}.narinfo")))
                .bearer_auth(&token)
                .send()
                .await
                .expect("GET narinfo");
            assert_eq!(response.status(), StatusCode::OK, "{path}");
        }
        drop(env);
    }
}

/// `nix copy` (`version`; two uploads at once on this machine) to a cache
/// whose token may run one upload, that slot held by a stalled `PUT
/// nar/…`, with `http.upload-slot-wait` set as `edit` says. Returns once
/// `nix copy` ended, with its paths; `release` says when to end the
/// stalled upload.
async fn nix_copy_past_the_limit(
    version: NixVersion,
    edit: impl Fn(&mut HttpConfig) + Send + Sync + 'static,
    release_when: (&'static str, fn(&Page) -> bool),
) -> (TestServer, String, Vec<String>, Result<(), String>) {
    let server = server_with(move |http| {
        http.max_concurrent_uploads_per_token = 1;
        edit(http);
    })
    .await;
    let token = cache_and_token(&server, "nix").await;
    let stalled = stalled_nar_put(&server, &token).await;
    wait_for("the stalled NAR to be read", |page| {
        body_bytes_read(page, NAR_ROUTE) > 0.0
    })
    .await;

    let salt = format!("{:016x}", rand::random::<u64>());
    let url = format!("{}?compression=zstd", server.cache_url(CACHE));
    let host = server.address().ip().to_string();
    let netrc_token = token.clone();
    let copy = blocking(move || {
        let mut env = NixEnv::with_version(version).expect("a Nix environment");
        env.use_netrc(&host, &netrc_token).expect("a netrc");
        let root = env.path("store");
        let paths = independent_paths(&env, &root, 4, &salt);
        let copied = env
            .copy_to(&root, &url, &paths)
            .map_err(|error| error.to_string());
        (paths, copied)
    });
    let release = async {
        wait_for(release_when.0, release_when.1).await;
        drop(stalled);
    };
    let ((paths, copied), ()) = tokio::join!(copy, release);
    (server, token, paths, copied)
}

async fn assert_served(server: &TestServer, token: &str, paths: &[String]) {
    for path in paths {
        let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
        let response = server
            .http()
            .get(server.cache_url(&format!("{CACHE}/{hash}.narinfo")))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET narinfo");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

tests::under_each_nix! {
    /// `nix copy` with more uploads than its token's limit: Nix's PUTs wait
    /// for the slot without sending their bodies, and the copy succeeds once
    /// the slot frees. Without the limit nothing ever waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nix_copy_with_more_uploads_than_the_limit_waits_and_succeeds(version: NixVersion) {
        let (server, token, paths, copied) = nix_copy_past_the_limit(
            version,
            |_| {},
            ("a Nix upload waiting for a slot", |page| {
                page.value("larder_upload_slots_waiting", &[]) > 0.0
            }),
        )
        .await;
        copied.expect("nix copy past the limit");
        assert_eq!(
            answers(&metrics(), NAR_ROUTE, "429"),
            0.0,
            "Nix's uploads waited"
        );
        assert_served(&server, &token, &paths).await;
    }
}

tests::under_each_nix! {
    /// The same with no waiting (`upload-slot-wait = 0`): Nix 2.8 gets a 429
    /// before it sent its body (it waits for `100 Continue`, which the server
    /// sends only when it reads the body), retries, and its retried PUT
    /// carries the whole NAR. Without the limit there is no 429 to wait for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nix_copy_retries_a_429_sent_before_its_body(version: NixVersion) {
        let (server, token, paths, copied) = nix_copy_past_the_limit(
            version,
            |http| http.upload_slot_wait = secs(0),
            ("a Nix upload refused with 429", |page| {
                answers(page, NAR_ROUTE, "429") > 0.0
            }),
        )
        .await;
        copied.expect("nix copy retrying past the limit");
        assert_served(&server, &token, &paths).await;
    }
}

/// A shutdown with a stalled upload open ends within the grace period
/// (plus the clean-up allowance, far below the guard): the stalled body is
/// cut off and its staged object deleted. Without the deadline the
/// shutdown waits for the stalled upload forever.
#[tokio::test]
async fn shutdown_with_a_stalled_upload_open_ends_within_the_deadline() {
    let mut server = server_with(|http| {
        http.shutdown_grace = secs(1);
        http.body_idle_timeout = secs(3600);
    })
    .await;
    let token = cache_and_token(&server, "stuck").await;
    let stalled = stalled_upload_path(&server, &token).await;
    wait_for("the stalled upload to be read", |page| {
        body_bytes_read(page, UPLOAD_PATH) > 0.0
    })
    .await;

    tokio::time::timeout(HANG_GUARD, server.shut_down())
        .await
        .expect("the server shut down with a stalled upload open");
    assert!(timeouts(&metrics(), "shutdown") >= 1.0);
    closed_by_server(stalled, "the stalled upload after shutdown").await;
    assert_eq!(staging_entries(&server), Vec::<String>::new());
    assert_eq!(count_rows(&server, "uploads").await, 0);
}
