//! Observability (issue #5): `/metrics` moves by what requests and the
//! pipeline did, and parses as strict Prometheus text; `/healthz` answers
//! while the process serves; `/readyz` says 503, naming the culprit, when
//! storage or the database is unreachable. `serve_ops`, which the workers
//! and gc-scheduler run, serves the same three routes on a listener.

use super::content_type;
use std::sync::Arc;
use std::time::Duration;

use larder_api::v1::{UploadPathResult, UploadPathResultKind};
use larder_db::{Backend, Database};
use larder_nix::{NarHash, Sha256Hash};
use larder_queue::{EmbeddedQueue, CHUNK_QUEUE, COMPRESS_QUEUE};
use larder_service::metrics::{serve_ops, Readiness};
use larder_storage::LocalStorage;
use larder_token::Permission;
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use tests::prometheus::{self, Page};
use tests::server::{pseudo_random, TestServer, TestServerOptions};
use tests::services::{self, PrivateServices};
use tokio_util::sync::CancellationToken;

use super::push::attic_info;
use super::{fake_store_path, file_nar, get, ok_bytes, HOUR};

/// Scrapes `/metrics` from `base` (`http://host:port`), checking the
/// content type and that the page parses strictly.
async fn scrape(http: &reqwest::Client, base: &str) -> Page {
    let response = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = content_type(&response);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let text = response.text().await.expect("reading /metrics");
    prometheus::parse(&text).unwrap_or_else(|why| panic!("{why}\n{text}"))
}

/// What moved between two scrapes of one sample.
fn delta(before: &Page, after: &Page, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

/// `/readyz`'s status and JSON body.
async fn readyz(server: &TestServer) -> (StatusCode, serde_json::Value) {
    let response = get(server, "/readyz", None).await;
    let status = response.status();
    let body = response.json().await.expect("a JSON /readyz body");
    (status, body)
}

/// Pushes `nar` as `store_path` into `cache` with Attic's API, waiting
/// until it is visible.
async fn push(
    server: &TestServer,
    token: &str,
    cache: &str,
    store_path: &str,
    nar: &[u8],
) -> UploadPathResult {
    let response = server
        .http()
        .put(server.url_of("/_api/v1/upload-path"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(
            "X-Attic-Nar-Info",
            attic_info(cache, store_path, nar).to_string(),
        )
        .body(nar.to_vec())
        .send()
        .await
        .expect("sending upload-path");
    let body = ok_bytes(response).await;
    serde_json::from_slice(&body).expect("an upload-path result")
}

// The first cache is named `metrics`: the ops routes must not hide a
// cache's URLs (`/metrics/<hash>.narinfo` has two segments, `/metrics` one).
const CACHE: &str = "metrics";
const SECOND_CACHE: &str = "second";
const UPLOAD_ROUTE: &str = "/_api/v1/upload-path";
const NARINFO_ROUTE: &str = "/{cache}/{file}";
const NAR_ROUTE: &str = "/{cache}/nar/{file}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_push_a_substitution_and_a_deduplicated_push() {
    let server = TestServer::sqlite().await;
    server.create_cache(CACHE, true).await;
    server.create_cache(SECOND_CACHE, true).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[
                (CACHE, &[Permission::Pull, Permission::Push]),
                (SECOND_CACHE, &[Permission::Pull, Permission::Push]),
            ],
        )
        .await;
    // Several FastCDC chunks (16/64/256 KiB), none repeated.
    // Larger than a NAR the chunker stores itself, so that compress jobs
    // run too.
    let size = usize::try_from(chunker_worker::INLINE_NAR_BYTES).expect("1 MiB") + (600 << 10);
    let nar = file_nar(&pseudo_random(size, 5));
    let nar_hash = NarHash::from(Sha256Hash::digest(&nar));
    let store_path = fake_store_path("observed");
    let base = server.url();
    // Exact deltas: this test's process records only this test's metrics.
    tests::prometheus::assert_metrics_are_this_tests_own();
    let before = scrape(server.http(), &base).await;

    // A push, waited for until visible.
    let pushed = push(&server, &token, CACHE, &store_path, &nar).await;
    assert_eq!(pushed.kind, UploadPathResultKind::Uploaded);
    assert_eq!(pushed.phase, "done");
    let stored = server
        .database()
        .valid_nar_by_hash(&nar_hash)
        .await
        .unwrap()
        .expect("the pushed NAR is valid");
    let n_chunks = f64::from(stored.n_chunks);
    assert!(n_chunks >= 3.0, "{n_chunks} chunks");

    // A substitution: the narinfo, then the NAR it names.
    let hash = &store_path["/nix/store/".len().."/nix/store/".len() + 32];
    let narinfo = ok_bytes(get(&server, &format!("/{CACHE}/{hash}.narinfo"), None).await).await;
    let narinfo_text = String::from_utf8(narinfo.clone()).expect("a UTF-8 narinfo");
    let nar_url = narinfo_text
        .lines()
        .find_map(|line| line.strip_prefix("URL: "))
        .expect("a URL line");
    let served = ok_bytes(get(&server, &format!("/{CACHE}/{nar_url}"), None).await).await;
    // Not found, and not a route at all.
    let missing = get(
        &server,
        &format!("/{CACHE}/{}.narinfo", "0".repeat(32)),
        None,
    )
    .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let nowhere = get(&server, "/no/route/here/at/all", None).await;
    assert_eq!(nowhere.status(), StatusCode::NOT_FOUND);
    let not_allowed = super::send(
        &server,
        reqwest::Method::DELETE,
        &format!("/{CACHE}/nix-cache-info"),
        None,
        None,
    )
    .await;
    assert_eq!(not_allowed.status(), StatusCode::METHOD_NOT_ALLOWED);

    let after = scrape(server.http(), &base).await;
    let moved = |name: &str, labels: &[(&str, &str)]| delta(&before, &after, name, labels);
    let requests = "larder_http_requests_total";
    assert_eq!(
        moved(
            requests,
            &[
                ("route", UPLOAD_ROUTE),
                ("method", "PUT"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert_eq!(
        moved(
            requests,
            &[
                ("route", NARINFO_ROUTE),
                ("method", "GET"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert_eq!(
        moved(
            requests,
            &[
                ("route", NARINFO_ROUTE),
                ("method", "GET"),
                ("status", "404")
            ]
        ),
        1.0
    );
    assert_eq!(
        moved(
            requests,
            &[("route", NAR_ROUTE), ("method", "GET"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            requests,
            &[("route", "unmatched"), ("method", "GET"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            requests,
            &[
                ("route", "unmatched"),
                ("method", "DELETE"),
                ("status", "405")
            ]
        ),
        1.0
    );
    // Raw paths never become labels.
    for (labels, _) in after.samples_of(requests) {
        assert!(!labels["route"].contains(hash), "{labels:?}");
    }
    assert_eq!(
        moved(
            "larder_http_request_body_bytes_total",
            &[("route", UPLOAD_ROUTE), ("method", "PUT")]
        ),
        nar.len() as f64
    );
    let response_bytes = "larder_http_response_body_bytes_total";
    assert_eq!(
        moved(response_bytes, &[("route", NAR_ROUTE), ("method", "GET")]),
        served.len() as f64
    );
    assert_eq!(served.len() as u64, stored.file_size.expect("a file size"));
    let narinfo_404_body = after.value(
        response_bytes,
        &[("route", NARINFO_ROUTE), ("method", "GET")],
    ) - before.value(
        response_bytes,
        &[("route", NARINFO_ROUTE), ("method", "GET")],
    ) - narinfo.len() as f64;
    assert!(narinfo_404_body > 0.0, "the 404's JSON body counts too");
    assert_eq!(
        moved(
            "larder_http_request_duration_seconds_count",
            &[("route", NAR_ROUTE), ("method", "GET")]
        ),
        1.0
    );

    // The pipeline: every chunk stored once, nothing deduplicated, one
    // upload done, its latency observed, jobs done on both queues.
    assert_eq!(moved("larder_chunks_stored_total", &[]), n_chunks);
    assert_eq!(
        moved("larder_chunk_bytes_stored_total", &[]),
        nar.len() as f64
    );
    assert_eq!(
        moved("larder_chunk_compressed_bytes_stored_total", &[]),
        served.len() as f64
    );
    assert_eq!(moved("larder_chunks_deduplicated_total", &[]), 0.0);
    assert_eq!(
        moved("larder_uploads_finished_total", &[("phase", "done")]),
        1.0
    );
    assert_eq!(moved("larder_upload_visible_seconds_count", &[]), 1.0);
    assert_eq!(
        moved("larder_jobs_done_total", &[("queue", CHUNK_QUEUE)]),
        1.0
    );
    assert!(moved("larder_jobs_done_total", &[("queue", COMPRESS_QUEUE)]) >= 1.0);
    assert_eq!(
        moved("larder_jobs_failed_total", &[("queue", CHUNK_QUEUE)]),
        0.0
    );
    for queue in [CHUNK_QUEUE, COMPRESS_QUEUE] {
        assert_eq!(
            after.get("larder_queue_depth", &[("queue", queue)]),
            Some(0.0),
            "{queue} is read and empty"
        );
    }

    // The same NAR into a second cache: answered as any push, linked by
    // the pipeline, every chunk deduplicated, none stored.
    let again = push(&server, &token, SECOND_CACHE, &store_path, &nar).await;
    assert_eq!(again.kind, UploadPathResultKind::Uploaded);
    assert_eq!(again.phase, "done");
    let last = scrape(server.http(), &base).await;
    let moved = |name: &str| delta(&after, &last, name, &[]);
    assert_eq!(moved("larder_chunks_deduplicated_total"), n_chunks);
    assert_eq!(
        moved("larder_chunk_bytes_deduplicated_total"),
        nar.len() as f64
    );
    assert_eq!(moved("larder_chunks_stored_total"), 0.0);
    assert_eq!(moved("larder_chunk_bytes_stored_total"), 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_storage_whose_directory_is_gone_and_healthz_stays_up() {
    let server = TestServer::sqlite().await;
    let healthz = get(&server, "/healthz", None).await;
    assert_eq!(healthz.status(), StatusCode::OK);
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, serde_json::json!({"ready": true, "down": []}));

    // The storage directory vanishes, as an unmounted volume would.
    let storage_dir = server.dir().join("storage");
    std::fs::remove_dir_all(&storage_dir).expect("removing the storage directory");
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], 503, "{body}");
    assert_eq!(body["error"], "NotReady", "{body}");
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["down"], serde_json::json!(["storage"]), "{body}");
    assert!(!storage_dir.exists(), "the probe must not recreate it");
    assert_eq!(
        get(&server, "/healthz", None).await.status(),
        StatusCode::OK
    );

    std::fs::create_dir(&storage_dir).expect("restoring the storage directory");
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_readyz_names_a_stopped_postgresql_and_recovers_with_it() {
    let private = PrivateServices::start(&["postgres"]).await;
    let database_url = services::fresh_postgres_database_on(&private.postgres_url()).await;
    let server = TestServer::start(TestServerOptions {
        backend: Backend::Postgres,
        database_url: Some(database_url),
        ..TestServerOptions::default()
    })
    .await;
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    private.ctl("stop-postgres").await;
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["down"], serde_json::json!(["database"]), "{body}");
    assert_eq!(
        get(&server, "/healthz", None).await.status(),
        StatusCode::OK
    );
    // `/metrics` does not need the database either.
    scrape(server.http(), &server.url()).await;

    private.ctl("start-postgres").await;
    // The pool reconnects by itself; give it a moment, without asserting
    // how long it takes.
    let mut last = (StatusCode::SERVICE_UNAVAILABLE, serde_json::Value::Null);
    for _ in 0..60 {
        last = readyz(&server).await;
        if last.0 == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(last.0, StatusCode::OK, "ready again: {}", last.1);
    server.stop().await;
    private.stop().await;
}

/// What the workers and gc-scheduler run: the three routes on a listener
/// of their own, until cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_ops_serves_the_three_routes_until_cancelled() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let database = Database::connect(&format!("sqlite://{}", dir.path().join("db").display()))
        .await
        .expect("a SQLite database");
    let storage = Arc::new(
        LocalStorage::open(dir.path().join("storage"))
            .await
            .expect("local storage"),
    );
    let queue = Arc::new(EmbeddedQueue::new());
    larder_queue::Queue::publish(&*queue, CHUNK_QUEUE, b"{}", "t")
        .await
        .expect("publishing");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a port");
    let base = format!("http://{}", listener.local_addr().expect("an address"));
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(serve_ops(
        listener,
        Readiness::new(database, queue, storage),
        shutdown.clone(),
    ));

    let http = reqwest::Client::new();
    let page = scrape(&http, &base).await;
    assert_eq!(
        page.get("larder_queue_depth", &[("queue", CHUNK_QUEUE)]),
        Some(1.0)
    );
    assert_eq!(page.types["larder_jobs_done_total"], "counter");
    for path in ["/healthz", "/readyz"] {
        let response = http.get(format!("{base}{path}")).send().await.expect(path);
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let other = http
        .get(format!("{base}/cache/nix-cache-info"))
        .send()
        .await
        .expect("another path");
    assert_eq!(other.status(), StatusCode::NOT_FOUND);

    shutdown.cancel();
    serving
        .await
        .expect("the server task")
        .expect("a clean shutdown");
    assert!(http.get(format!("{base}/healthz")).send().await.is_err());
}
