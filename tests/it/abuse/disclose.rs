//! Issue #12, item 6: side channels across tenants. The attacker holds a
//! push token for its own cache and wants to learn what other tenants hold:
//! whether a NAR it guessed is stored (from the push reply or the upload
//! status), when pushes deduplicate (from `/metrics`), or whether a private
//! cache exists (from how the server looks it up).
//!
//! Each test asserts the defended outcome on a real server with real
//! storage. None measures time: the existence tests observe *which memory*
//! a lookup read or filled, by changing the database behind the server's
//! back and seeing which answer comes out.

use std::time::Duration;

use larder_api::v1::UploadStatus;
use larder_db::{CacheUpdate, StoreState, UploadId};
use larder_nix::Sha256Hash;
use larder_service::metrics::CONTENT_TYPE;
use larder_token::Permission;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE as CONTENT_TYPE_HEADER};
use reqwest::StatusCode;
use tests::server::{pseudo_random, TestServer, TestServerOptions};

use crate::server::push::{attic_info, nix_narinfo, nix_put};
use crate::server::{fake_store_path, file_nar, get, ok_json, plain_metadata};

const HOUR: Duration = Duration::from_secs(3600);

/// The victim's cache and the attacker's.
const VICTIM: &str = "victim";
const ATTACKER: &str = "attacker";

/// A server with a private victim cache and an attacker's cache, and the
/// attacker's push token (pull and push on its own cache only).
async fn two_tenants(options: TestServerOptions) -> (TestServer, String) {
    let server = TestServer::start(options).await;
    server.create_cache(VICTIM, false).await;
    server.create_cache(ATTACKER, false).await;
    let attacker = server
        .mint(
            "mallory",
            HOUR,
            &[(ATTACKER, &[Permission::Pull, Permission::Push])],
        )
        .await;
    (server, attacker)
}

fn hash_of(store_path: &str) -> &str {
    &store_path["/nix/store/".len()..][..32]
}

/// A push's reply: its status and body, with the upload id in the body
/// replaced by `<id>`, and that id.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: StatusCode,
    body: String,
}

async fn reply(response: reqwest::Response) -> (Reply, Option<String>) {
    let status = response.status();
    let body = response.text().await.expect("the reply's body");
    assert!(status.is_success(), "{status}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("a JSON reply");
    let id = json["upload_id"].as_str().map(str::to_owned);
    let body = match &id {
        Some(id) => body.replace(id, "<id>"),
        None => body,
    };
    (Reply { status, body }, id)
}

/// `upload-path` of `nar` as a new path of the attacker's cache, with
/// `X-Larder-Wait` when given.
async fn attic_push(
    server: &TestServer,
    token: &str,
    nar: &[u8],
    wait: Option<&str>,
) -> (String, Reply, Option<String>) {
    let store_path = fake_store_path("guess");
    let mut request = server
        .http()
        .put(server.url_of("/_api/v1/upload-path"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(
            "X-Attic-Nar-Info",
            attic_info(ATTACKER, &store_path, nar).to_string(),
        )
        .body(nar.to_vec());
    if let Some(wait) = wait {
        request = request.header("X-Larder-Wait", wait);
    }
    let response = request.send().await.expect("sending upload-path");
    let (reply, id) = reply(response).await;
    (store_path, reply, id)
}

/// `nix copy`'s two PUTs of `nar` as a new path of the attacker's cache;
/// the narinfo's reply.
async fn nix_push(server: &TestServer, token: &str, nar: &[u8]) -> (String, Reply) {
    let store_path = fake_store_path("guess");
    let file_hash = Sha256Hash::digest(nar).to_base32();
    let staged = nix_put(
        server,
        token,
        &format!("/{ATTACKER}/nar/{file_hash}.nar"),
        nar.to_vec(),
    )
    .await;
    assert_eq!(staged.status(), StatusCode::NO_CONTENT);
    let narinfo = nix_narinfo(&store_path, nar, nar, "");
    let response = nix_put(
        server,
        token,
        &format!("/{ATTACKER}/{}.narinfo", hash_of(&store_path)),
        narinfo.into_bytes(),
    )
    .await;
    (store_path, reply(response).await.0)
}

/// Asserts that the attacker's path is served under its cache: pushing a
/// NAR someone else holds still works.
async fn assert_visible(server: &TestServer, token: &str, store_path: &str) {
    let narinfo = get(
        server,
        &format!("/{ATTACKER}/{}.narinfo", hash_of(store_path)),
        Some(token),
    )
    .await;
    assert_eq!(narinfo.status(), StatusCode::OK, "{store_path}");
}

/// The victim's NAR, and a fresh one of the same size nobody holds.
async fn victims_nar_and_a_fresh_one(server: &TestServer) -> (Vec<u8>, Vec<u8>) {
    let held = file_nar(&pseudo_random(300_000, 0x5ec2e7));
    server
        .seed_path(VICTIM, plain_metadata(&fake_store_path("secret")), &held)
        .await;
    let fresh = file_nar(&pseudo_random(300_000, rand::random()));
    assert_eq!(held.len(), fresh.len());
    (held, fresh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attic_push_reply_does_not_say_whether_another_tenant_holds_the_nar() {
    let (server, attacker) = two_tenants(TestServerOptions::default()).await;
    let (held, fresh) = victims_nar_and_a_fresh_one(&server).await;

    // Answered once visible (the default) and at once (`X-Larder-Wait: 0`,
    // as the agent pushes). Broken, the guessed NAR answers `Deduplicated`
    // with the stored NAR's `file_size` and `frac_deduplicated: 1.0`, and
    // without an upload id; a fresh one answers `Uploaded`.
    for wait in [None, Some("0")] {
        let (guessed_path, guessed, _) = attic_push(&server, &attacker, &held, wait).await;
        let (fresh_path, unheld, _) = attic_push(&server, &attacker, &fresh, wait).await;
        assert_eq!(guessed, unheld, "X-Larder-Wait {wait:?}");
        assert!(guessed.body.contains("<id>"), "{}", guessed.body);
        if wait.is_none() {
            assert!(
                guessed.body.contains(r#""phase":"done""#),
                "{}",
                guessed.body
            );
            assert_visible(&server, &attacker, &guessed_path).await;
            assert_visible(&server, &attacker, &fresh_path).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_push_reply_does_not_say_whether_another_tenant_holds_the_nar() {
    let (server, attacker) = two_tenants(TestServerOptions::default()).await;
    let (held, fresh) = victims_nar_and_a_fresh_one(&server).await;

    // Broken, the guessed NAR's narinfo PUT answers `Deduplicated` with the
    // stored NAR's size, the fresh one `Uploaded`.
    let (guessed_path, guessed) = nix_push(&server, &attacker, &held).await;
    let (fresh_path, unheld) = nix_push(&server, &attacker, &fresh).await;
    assert_eq!(guessed, unheld);
    assert!(
        guessed.body.contains(r#""phase":"done""#),
        "{}",
        guessed.body
    );
    assert_visible(&server, &attacker, &guessed_path).await;
    assert_visible(&server, &attacker, &fresh_path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_status_shows_nothing_of_chunks_another_tenant_stored() {
    // The victim pushes a NAR of several FastCDC chunks through a whole
    // pipeline.
    let victim_server = TestServer::sqlite().await;
    victim_server.create_cache(VICTIM, false).await;
    let victim = victim_server
        .mint("victor", HOUR, &[(VICTIM, &[Permission::Push])])
        .await;
    let contents = pseudo_random(1 << 20, 0x0dd5);
    let victims = file_nar(&contents);
    let pushed = victim_server
        .http()
        .put(victim_server.url_of("/_api/v1/upload-path"))
        .bearer_auth(&victim)
        .header(
            "X-Attic-Nar-Info",
            attic_info(VICTIM, &fake_store_path("secret"), &victims).to_string(),
        )
        .body(victims.clone())
        .send()
        .await
        .expect("the victim's push");
    assert_eq!(pushed.status(), StatusCode::OK);

    // The attacker's server shares the database and storage but has no
    // compressor, so its uploads stop in `compressing` with whatever chunks
    // were stored before: its own none, the victim's all of theirs.
    let (database_url, storage) = (
        victim_server.config().database.url.clone(),
        victim_server.dir().join("storage"),
    );
    let server = TestServer::start(TestServerOptions {
        database_url: Some(database_url.expose().to_owned()),
        edit_config: Some(std::sync::Arc::new(move |config| {
            config.storage = larder_config::StorageConfig::Local {
                path: storage.clone(),
            };
            config.pipeline.compress_concurrency = 0;
        })),
        ..TestServerOptions::default()
    })
    .await;
    server.create_cache(ATTACKER, false).await;
    let attacker = server
        .mint("mallory", HOUR, &[(ATTACKER, &[Permission::Push])])
        .await;

    // A guess that shares most chunks with the victim's NAR (the same file
    // with a tail), and a fresh NAR of the same size.
    let mut guessed = contents;
    guessed.extend(pseudo_random(64 << 10, 0x7a11));
    let fresh = file_nar(&pseudo_random(guessed.len(), rand::random()));
    let guessed = file_nar(&guessed);
    assert_eq!(guessed.len(), fresh.len());
    let mut statuses = Vec::new();
    for nar in [&guessed, &fresh] {
        let (_, answer, id) = attic_push(&server, &attacker, nar, Some("0")).await;
        assert!(
            answer.body.contains(r#""phase":"spooled""#),
            "{}",
            answer.body
        );
        let id: UploadId = id.expect("an upload id").parse().expect("a valid id");
        statuses.push((id.clone(), compressing(&server, &attacker, &id).await));
    }

    // The attack is real: the guess's chunk list holds chunks the victim
    // stored, which count as stored at once.
    let guessed_upload = server
        .database()
        .upload(&statuses[0].0)
        .await
        .expect("reading the upload")
        .expect("the upload");
    let chunks = server
        .database()
        .chunks_of_nar(guessed_upload.nar_id.expect("linked to its NAR"))
        .await
        .expect("the chunk list");
    assert!(
        chunks
            .iter()
            .any(|entry| entry.chunk.state == StoreState::Valid),
        "the guess shares no stored chunk with the victim's NAR"
    );

    // Broken, the guess shows `chunks_stored` > 0 (the victim's chunks)
    // where the fresh NAR shows 0. The status may only differ in what the
    // attacker's own upload determines: its id, path and times.
    let strip = |status: &serde_json::Value| {
        let mut status = status.clone();
        let object = status.as_object_mut().expect("a JSON object");
        for own in ["id", "store_path", "created_at", "updated_at"] {
            assert!(object.remove(own).is_some(), "no {own} in {status:?}");
        }
        status
    };
    assert_eq!(strip(&statuses[0].1), strip(&statuses[1].1));
    // And it still parses as the client's status type.
    let typed: UploadStatus = serde_json::from_value(statuses[0].1.clone()).expect("a status");
    assert_eq!(typed.nar_size, guessed.len() as u64);
}

/// Polls the upload's status until it is `compressing` (the chunker is
/// done; no compressor runs), and returns that status.
async fn compressing(server: &TestServer, token: &str, id: &UploadId) -> serde_json::Value {
    for _ in 0..600 {
        let status: serde_json::Value =
            ok_json(get(server, &format!("/_api/v1/uploads/{id}"), Some(token)).await).await;
        match status["phase"].as_str() {
            Some("compressing") => return status,
            Some("spooled" | "chunking") => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => panic!("the upload cannot end without a compressor: {status}"),
        }
    }
    panic!("the upload did not reach compressing within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_ops_listener_metrics_leave_the_public_port() {
    let server = TestServer::start(TestServerOptions {
        edit_config: Some(std::sync::Arc::new(|config| {
            config.ops.listen = Some("127.0.0.1:0".parse().expect("an address"));
        })),
        ..TestServerOptions::default()
    })
    .await;
    let ops = server.ops_url().expect("an ops listener");

    // Broken, the public port serves the dedup counters to anyone.
    for path in ["/metrics", "/readyz"] {
        let public = get(&server, path, None).await;
        assert_eq!(public.status(), StatusCode::NOT_FOUND, "public {path}");
        let body: larder_api::v1::ErrorResponse = public.json().await.expect("a JSON error");
        assert_eq!(body.error, "NoSuchEndpoint");
    }
    let metrics = server
        .http()
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .expect("GET /metrics on the ops port");
    assert_eq!(metrics.status(), StatusCode::OK);
    assert_eq!(
        metrics
            .headers()
            .get(CONTENT_TYPE_HEADER)
            .and_then(|value| value.to_str().ok()),
        Some(CONTENT_TYPE)
    );
    let text = metrics.text().await.expect("the metrics page");
    assert!(text.contains("larder_chunks_deduplicated_total"), "{text}");
    let ready = server
        .http()
        .get(format!("{ops}/readyz"))
        .send()
        .await
        .expect("GET /readyz on the ops port");
    assert_eq!(ready.status(), StatusCode::OK);
    // Liveness stays on both: load balancers probe the public port.
    for base in [server.url(), ops] {
        let health = server
            .http()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("GET /healthz");
        assert_eq!(health.status(), StatusCode::OK, "{base}");
    }
}

// ---------------------------------------------------------------------------
// The existence oracle. A caller whose token grants nothing on a name may
// only find a public cache of that name, in the database or in the memory
// kept for such callers; the memory filled for permitted callers is never
// theirs to read or fill. So for them a private cache and a missing one take
// the same path: the same query, which finds no row, and no memory.
//
// Each test changes a cache's row directly in the database (the server's
// memory is not told) and sees from the answers which copy a request used.
// The in-memory copies live 2 s; a round in which a permitted caller's copy
// visibly expired too early proves nothing and is played again.
// ---------------------------------------------------------------------------

/// The victim's cache as the oracle tests set it up: private, with a
/// permitted owner and a stranger holding a token for other caches.
struct Oracle {
    server: TestServer,
    owner: String,
    stranger: String,
    root: String,
}

async fn oracle() -> Oracle {
    let server = TestServer::sqlite().await;
    server.create_cache(VICTIM, false).await;
    let owner = server
        .mint("victor", HOUR, &[(VICTIM, &[Permission::Pull])])
        .await;
    let stranger = server
        .mint(
            "mallory",
            HOUR,
            &[("attacker-*", &[Permission::Pull, Permission::Push])],
        )
        .await;
    let root = server.root_token().await;
    Oracle {
        server,
        owner,
        stranger,
        root,
    }
}

impl Oracle {
    /// Sets a cache's row behind the server's back.
    async fn set_row(&self, cache: &str, is_public: bool, priority: i32) {
        self.server
            .database()
            .update_cache(
                &cache.parse().expect("a cache name"),
                &CacheUpdate {
                    is_public: Some(is_public),
                    priority: Some(priority),
                    ..CacheUpdate::default()
                },
            )
            .await
            .expect("updating the cache's row");
    }

    /// Makes the server forget every cache row it keeps in memory: it does
    /// so whenever a cache is configured through it.
    async fn forget(&self) {
        let response = self
            .server
            .http()
            .patch(
                self.server
                    .url_of(&format!("/_api/v1/cache-config/{VICTIM}")),
            )
            .bearer_auth(&self.root)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("configuring the cache");
        assert_eq!(response.status(), StatusCode::OK);
    }

    /// `GET /{cache}/nix-cache-info` as `token` (or anonymously): the
    /// status, and the priority it shows when it is a 200.
    async fn cache_info(&self, cache: &str, token: Option<&str>) -> (StatusCode, Option<i32>) {
        let response = get(&self.server, &format!("/{cache}/nix-cache-info"), token).await;
        let status = response.status();
        let text = response.text().await.expect("the body");
        let priority = text
            .lines()
            .find_map(|line| line.strip_prefix("Priority: "))
            .filter(|_| status == StatusCode::OK)
            .map(|value| value.trim().parse().expect("a priority"));
        (status, priority)
    }
}

/// How many rounds a test plays before giving up on seeing a 2 s memory
/// outlive four local requests.
const ROUNDS: i32 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_grant_never_read_what_permitted_callers_cached() {
    let oracle = oracle().await;
    for round in 0..ROUNDS {
        let (old, new) = (10 + 2 * round, 11 + 2 * round);
        oracle.set_row(VICTIM, false, old).await;
        oracle.forget().await;
        // The owner's lookup fills the memory permitted callers read.
        assert_eq!(
            oracle.cache_info(VICTIM, Some(&oracle.owner)).await,
            (StatusCode::OK, Some(old))
        );
        // Behind the server's back, the cache turns public.
        oracle.set_row(VICTIM, true, new).await;
        let before = oracle.cache_info(VICTIM, Some(&oracle.owner)).await;
        let anonymous = oracle.cache_info(VICTIM, None).await;
        let stranger = oracle.cache_info(VICTIM, Some(&oracle.stranger)).await;
        let after = oracle.cache_info(VICTIM, Some(&oracle.owner)).await;
        if before != (StatusCode::OK, Some(old)) || after != (StatusCode::OK, Some(old)) {
            // The owner's copy expired during the round: inconclusive.
            continue;
        }
        // The owner's copy was live throughout, yet the others went to the
        // database, the one place that says the cache is public now, just
        // as they would for a cache that does not exist. Broken, they read
        // the owner's copy of the private row: a 401 and a 404, served from
        // memory (fast) where a missing cache costs a query.
        assert_eq!(anonymous, (StatusCode::OK, Some(new)), "round {round}");
        assert_eq!(stranger, (StatusCode::OK, Some(new)), "round {round}");
        return;
    }
    panic!("in {ROUNDS} rounds the owner's copy never outlived four requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_grant_leave_no_private_cache_in_memory() {
    let oracle = oracle().await;
    const WITNESS: &str = "witness";
    oracle.server.create_cache(WITNESS, true).await;
    for round in 0..ROUNDS {
        let (old, new) = (10 + 2 * round, 11 + 2 * round);
        oracle.set_row(VICTIM, false, old).await;
        oracle.set_row(WITNESS, true, old).await;
        oracle.forget().await;
        // A public cache's copy, made just before the probes: while it
        // lives, so would anything the probes left.
        assert_eq!(
            oracle.cache_info(WITNESS, None).await,
            (StatusCode::OK, Some(old))
        );
        let (anonymous, _) = oracle.cache_info(VICTIM, None).await;
        assert_eq!(anonymous, StatusCode::UNAUTHORIZED);
        let (stranger, _) = oracle.cache_info(VICTIM, Some(&oracle.stranger)).await;
        assert_eq!(stranger, StatusCode::NOT_FOUND);
        oracle.set_row(VICTIM, false, new).await;
        oracle.set_row(WITNESS, true, new).await;
        let owner = oracle.cache_info(VICTIM, Some(&oracle.owner)).await;
        if oracle.cache_info(WITNESS, None).await != (StatusCode::OK, Some(old)) {
            // The witness's copy expired before the owner looked:
            // inconclusive.
            continue;
        }
        // Nothing of the private cache was in memory: the owner's lookup
        // went to the database, as it would had the probes been for a
        // missing cache. Broken, the probes cached the private row, and
        // the owner gets that copy with the old priority.
        assert_eq!(owner, (StatusCode::OK, Some(new)), "round {round}");
        return;
    }
    panic!("in {ROUNDS} rounds the witness's copy never outlived four requests");
}
