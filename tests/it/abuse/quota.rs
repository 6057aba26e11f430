//! Per-cache storage quotas against a tenant that pushes past its quota,
//! or a server that runs out of room: every push route is refused (413
//! `QuotaExceeded` over the quota, 507 `InsufficientStorage` out of room)
//! without touching what the cache holds or leaving anything staged;
//! concurrent pushes do not overshoot; LRU eviction takes the least
//! recently accessed paths and keeps the rest; usage follows deletions,
//! GC and destruction.

use std::path::{Path, PathBuf};
use std::time::Duration;

use larder_api::byte_size::ByteSize;
use larder_api::duration::HumanDuration;
use larder_api::v1::{CacheConfig, CacheQuota, ErrorResponse, StorageUsage, UploadPathResult};
use larder_config::GcConfig;
use larder_db::{CacheUpdate, Timestamp, UploadPhase};
use larder_nix::{NarHash, Sha256Hash};
use larder_storage::LocalStorage;
use larder_token::Permission;
use reqwest::{Response, StatusCode};
use serde_json::json;
use tests::server::{count_files, pseudo_random, TestServer, TestServerOptions};

use crate::server::push::{attic_info, blocking, nix_copy_to, public_key_of, pushing_env};
use crate::server::{fake_store_path, file_nar};

const HOUR: Duration = Duration::from_secs(3600);
const CONFIG: &str = "/_api/v1/cache-config";

/// A tenant's token for its own cache: pull, push, and the settings a
/// tenant normally has (not the quota).
async fn tenant_token(server: &TestServer, cache: &str) -> String {
    server
        .mint(
            cache,
            HOUR,
            &[(
                cache,
                &[
                    Permission::Pull,
                    Permission::Push,
                    Permission::Delete,
                    Permission::ConfigureCache,
                ],
            )],
        )
        .await
}

/// The operator's token: it may set quotas on every cache.
async fn operator_token(server: &TestServer) -> String {
    server
        .mint(
            "operator",
            HOUR,
            &[(
                "*",
                &[Permission::ConfigureCacheQuota, Permission::DestroyCache],
            )],
        )
        .await
}

/// Sets a cache's quota (and policy) through the API, as `token`.
async fn configure(server: &TestServer, token: &str, cache: &str, patch: serde_json::Value) {
    let response = server
        .http()
        .patch(server.url_of(&format!("{CONFIG}/{cache}")))
        .bearer_auth(token)
        .json(&patch)
        .send()
        .await
        .expect("PATCH cache-config");
    let status = response.status();
    let body = response.text().await.expect("the answer");
    assert_eq!(status, StatusCode::OK, "{patch}: {body}");
}

async fn set_quota(server: &TestServer, operator: &str, cache: &str, bytes: u64) {
    configure(
        server,
        operator,
        cache,
        json!({ "storage_quota": CacheQuota::Bytes(bytes) }),
    )
    .await;
}

/// The cache's usage as `token` sees it in `GET cache-config`.
async fn usage(server: &TestServer, token: &str, cache: &str) -> StorageUsage {
    let config: CacheConfig = server
        .http()
        .get(server.url_of(&format!("{CONFIG}/{cache}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET cache-config")
        .json()
        .await
        .expect("a cache config");
    config.storage_usage.expect("usage is shown to the tenant")
}

/// Attic's `upload-path` of `nar` as the path `store_path`; answers once
/// the path is visible unless `no_wait`.
async fn attic_upload(
    server: &TestServer,
    token: &str,
    cache: &str,
    store_path: &str,
    nar: &[u8],
    no_wait: bool,
) -> Response {
    let mut request = server
        .http()
        .put(server.url_of("/_api/v1/upload-path"))
        .bearer_auth(token)
        .header(
            "X-Attic-Nar-Info",
            attic_info(cache, store_path, nar).to_string(),
        )
        .body(nar.to_vec());
    if no_wait {
        request = request.header("X-Larder-Wait", "0");
    }
    request.send().await.expect("sending upload-path")
}

/// `PUT` of one of Nix's upload files, with the token as Nix sends it.
async fn nix_put(server: &TestServer, token: &str, path: &str, body: Vec<u8>) -> Response {
    server
        .http()
        .put(server.url_of(path))
        .basic_auth("", Some(token))
        .body(body)
        .send()
        .await
        .expect("sending a PUT")
}

/// `/{cache}/nar/<FileHash>.nar`: where Nix puts an uncompressed NAR.
fn nar_file_path(cache: &str, nar: &[u8]) -> String {
    format!("/{cache}/nar/{}.nar", Sha256Hash::digest(nar).to_base32())
}

/// A narinfo as Nix writes it for an uncompressed NAR.
fn narinfo(store_path: &str, nar: &[u8]) -> String {
    let hash = Sha256Hash::digest(nar).to_base32();
    format!(
        "StorePath: {store_path}\nURL: nar/{hash}.nar\nCompression: none\n\
         FileHash: sha256:{hash}\nFileSize: {size}\nNarHash: sha256:{hash}\n\
         NarSize: {size}\nReferences: \n",
        size = nar.len()
    )
}

fn hash_of(store_path: &str) -> &str {
    &store_path["/nix/store/".len()..][..32]
}

/// Asserts an error answer of `status` with the documented JSON body.
async fn expect_error(response: Response, status: StatusCode) -> ErrorResponse {
    let actual = response.status();
    let body = response.text().await.expect("the answer");
    assert_eq!(actual, status, "{body}");
    let error: ErrorResponse = serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("not an error body ({error}): {body}"));
    assert_eq!(error.code, status.as_u16(), "{body}");
    error
}

async fn expect_quota_exceeded(response: Response) -> ErrorResponse {
    let error = expect_error(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(error.error, "QuotaExceeded", "{}", error.message);
    error
}

/// What a refused push must leave: no staged NAR in storage, nothing
/// pending in the cache (no upload in flight, no staged file), and the
/// counters true to the rows.
async fn assert_nothing_staged(server: &TestServer, storage_root: &Path, token: &str, cache: &str) {
    assert_eq!(
        count_files(&storage_root.join("staging")),
        0,
        "a staged NAR was left"
    );
    assert_eq!(usage(server, token, cache).await.pending_bytes, 0);
    let corrections = server
        .database()
        .recompute_usage()
        .await
        .expect("recomputing usage");
    assert!(corrections.is_empty(), "{corrections:?}");
}

async fn status_of(server: &TestServer, token: &str, path: &str) -> StatusCode {
    server
        .http()
        .get(server.url_of(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET")
        .status()
}

tests::under_each_nix! {
    /// Issue #12's acceptance: pushes past a quota get 413 on every route, and
    /// the cache's existing paths still substitute with real Nix and verify.
    /// Without the defence, the over-quota pushes would be answered 200/204
    /// (and the usage would grow past the quota).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pushes_past_a_quota_get_413_and_the_caches_paths_still_substitute(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let storage = server.dir().join("storage");
        server.create_cache("tenant", false).await;
        server.create_cache("neighbour", false).await;
        let tenant = tenant_token(&server, "tenant").await;
        let neighbour = tenant_token(&server, "neighbour").await;
        let operator = operator_token(&server).await;

        // The tenant's closure, pushed by real Nix while there is no quota.
        let (env, root, paths) = pushing_env(version, 3, tenant.clone()).await;
        let url = format!("{}?compression=zstd", server.cache_url("tenant"));
        let (env, root, closure) = {
            let url = url.clone();
            blocking(move || {
                nix_copy_to(&env, &root, &url, &paths);
                let closure = env.closure(&root, &paths).expect("the closure");
                (env, root, closure)
            })
            .await
        };
        let held = usage(&server, &tenant, "tenant").await;
        assert_eq!(held.quota_bytes, None, "no quota yet");
        assert_eq!(held.pending_bytes, 0);
        assert!(held.paths_bytes > 0);

        // The operator caps the cache at 1 KiB more than it holds.
        let quota = held.used_bytes + 1024;
        set_quota(&server, &operator, "tenant", quota).await;
        assert_eq!(
            usage(&server, &tenant, "tenant").await.quota_bytes,
            Some(quota)
        );
        // The tenant cannot lift its own quota.
        let response = server
            .http()
            .patch(server.url_of(&format!("{CONFIG}/tenant")))
            .bearer_auth(&tenant)
            .json(&json!({"storage_quota": "Unlimited"}))
            .send()
            .await
            .expect("PATCH");
        expect_error(response, StatusCode::FORBIDDEN).await;

        // Attic's upload-path of a NAR larger than the room: refused before
        // the body is read, with the quota, the usage and the push's size.
        let big = file_nar(&pseudo_random(8192, 1));
        let big_path = fake_store_path("too-big");
        let error = expect_quota_exceeded(
            attic_upload(&server, &tenant, "tenant", &big_path, &big, false).await,
        )
        .await;
        for part in [
            "tenant".to_owned(),
            format!("{quota} bytes"),
            format!("{} bytes", held.used_bytes),
            format!("{} bytes", big.len()),
        ] {
            assert!(
                error.message.contains(&part),
                "{part:?} in {}",
                error.message
            );
        }
        assert_nothing_staged(&server, &storage, &tenant, "tenant").await;

        // Nix's PUT nar of the same: it may write no more than the room.
        expect_quota_exceeded(
            nix_put(
                &server,
                &tenant,
                &nar_file_path("tenant", &big),
                big.clone(),
            )
            .await,
        )
        .await;
        assert_nothing_staged(&server, &storage, &tenant, "tenant").await;

        // The real `nix copy` of a new path: refused, and it says so.
        let env = {
            let url = url.clone();
            blocking(move || {
                let input = env.path("over-quota");
                std::fs::create_dir_all(&input).expect("a directory");
                std::fs::write(input.join("data"), pseudo_random(16 << 10, 2)).expect("a file");
                let new_path = env.add_path(&root, &input).expect("adding a path");
                let error = env
                    .copy_to(&root, &url, &[new_path.trim().to_owned()])
                    .expect_err("nix copy over the quota fails");
                assert!(error.to_string().contains("413"), "{error}");
                env
            })
            .await
        };
        assert_nothing_staged(&server, &storage, &tenant, "tenant").await;

        // A dedup link: another tenant holds the NAR, but a path linked to it
        // counts in full in this cache.
        let shared_path = fake_store_path("shared");
        let stored: UploadPathResult =
            attic_upload(&server, &neighbour, "neighbour", &shared_path, &big, false)
                .await
                .json()
                .await
                .expect("the neighbour's push");
        assert_eq!(stored.phase, "done");
        expect_quota_exceeded(
            attic_upload(&server, &tenant, "tenant", &shared_path, &big, false).await,
        )
        .await;
        assert_eq!(
            status_of(
                &server,
                &tenant,
                &format!("/tenant/{}.narinfo", hash_of(&shared_path))
            )
            .await,
            StatusCode::NOT_FOUND
        );
        assert_nothing_staged(&server, &storage, &tenant, "tenant").await;

        // Nix's narinfo: a NAR file staged within the room, then the quota
        // lowered below the usage; the narinfo claiming it is refused. The
        // staged NAR stays waiting (and counted) for a retry once there is room,
        // until the reaper takes it.
        let small = file_nar(b"small enough to fit");
        let small_path = fake_store_path("small");
        let response = nix_put(
            &server,
            &tenant,
            &nar_file_path("tenant", &small),
            small.clone(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            usage(&server, &tenant, "tenant").await.pending_bytes,
            small.len() as u64,
            "a staged NAR file counts"
        );
        set_quota(&server, &operator, "tenant", held.used_bytes).await;
        expect_quota_exceeded(
            nix_put(
                &server,
                &tenant,
                &format!("/tenant/{}.narinfo", hash_of(&small_path)),
                narinfo(&small_path, &small).into_bytes(),
            )
            .await,
        )
        .await;
        assert_eq!(
            usage(&server, &tenant, "tenant").await.pending_bytes,
            small.len() as u64,
            "the refused narinfo's NAR file still waits"
        );
        let local_storage = LocalStorage::open(&storage).await.expect("the storage");
        let past_deadline = Timestamp::now().saturating_add(HOUR);
        let reaped = gc_scheduler::gc::reap(
            server.database(),
            &local_storage,
            &GcConfig::default(),
            past_deadline,
        )
        .await
        .expect("a reaping pass");
        assert_eq!(reaped.staged_files_reaped, 1);
        assert_nothing_staged(&server, &storage, &tenant, "tenant").await;

        // Nothing stored was touched: the same usage, and real Nix substitutes
        // the whole closure from the cache and verifies it.
        assert_eq!(
            usage(&server, &tenant, "tenant").await.used_bytes,
            held.used_bytes
        );
        let public_key = public_key_of(&server, &tenant, "tenant").await;
        let cache_url = server.cache_url("tenant");
        blocking(move || {
            let mut env = env;
            // The pushing Nix cached the narinfos it wrote.
            env.add_config("narinfo-cache-positive-ttl", "0");
            let destination = env.path("destination");
            env.copy_from(&cache_url, &destination, &public_key, &closure)
                .expect("substituting the cache's paths");
            let verified = env
                .store_verify(&cache_url, &public_key, &closure)
                .expect("nix store verify");
            assert!(verified.status.success(), "{verified:?}");
        })
        .await;
    }
}

/// Many pushes at once into a cache with room for five: exactly five are
/// admitted (the check and the count are one atomic step per cache), so
/// the usage never passes the quota. Without the atomic step, pushes that
/// each saw room before the others were counted would all be admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_do_not_overshoot_the_quota() {
    const PUSHES: usize = 20;
    const FITS: u64 = 5;
    // All at once from one token: above the default per-token upload limit,
    // which is not what this test is about.
    let server = TestServer::start(TestServerOptions {
        edit_config: Some(std::sync::Arc::new(|config| {
            config.http.max_concurrent_uploads_per_token = PUSHES as u32;
        })),
        ..TestServerOptions::default()
    })
    .await;
    server.create_cache("raced", false).await;
    let tenant = tenant_token(&server, "raced").await;
    let operator = operator_token(&server).await;
    let nars: Vec<Vec<u8>> = (0..PUSHES)
        .map(|n| file_nar(&pseudo_random(64 << 10, 100 + n as u64)))
        .collect();
    let size = nars[0].len() as u64;
    assert!(nars.iter().all(|nar| nar.len() as u64 == size));
    let quota = FITS * size + size / 2;
    set_quota(&server, &operator, "raced", quota).await;

    let server = std::sync::Arc::new(server);
    let pushes: Vec<_> = nars
        .into_iter()
        .map(|nar| {
            let (server, tenant) = (server.clone(), tenant.clone());
            tokio::spawn(async move {
                let path = fake_store_path("raced");
                let response = attic_upload(&server, &tenant, "raced", &path, &nar, true).await;
                let status = response.status();
                let body = response.text().await.expect("the answer");
                (status, body)
            })
        })
        .collect();
    let mut admitted = 0;
    for push in pushes {
        let (status, body) = push.await.expect("a push task");
        match status {
            StatusCode::OK => admitted += 1,
            StatusCode::PAYLOAD_TOO_LARGE => {
                assert!(body.contains("QuotaExceeded"), "{body}")
            }
            other => panic!("a push answered {other}: {body}"),
        }
    }
    assert_eq!(admitted, FITS, "exactly what fits is admitted");
    let now = usage(&server, &tenant, "raced").await;
    assert_eq!(now.used_bytes, FITS * size);
    assert!(now.used_bytes <= quota);

    // The admitted ones become paths; the refused left nothing staged.
    for _ in 0..600 {
        if usage(&server, &tenant, "raced").await.pending_bytes == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = usage(&server, &tenant, "raced").await;
    assert_eq!(
        (settled.paths_bytes, settled.pending_bytes),
        (FITS * size, 0)
    );
    assert_eq!(count_files(&server.dir().join("storage/staging")), 0);
}

/// Under `evict-lru`, a push into a full cache evicts exactly the least
/// recently accessed path, and the rest stay served. Without the policy it
/// would be refused; with a wrong order another path would go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_lru_evicts_the_least_recently_accessed_and_keeps_the_rest() {
    let server = TestServer::start(TestServerOptions {
        gc: GcConfig {
            access_flush_interval: HumanDuration::from_secs(1),
            ..GcConfig::default()
        },
        ..TestServerOptions::default()
    })
    .await;
    let cache = server.create_cache("lru", false).await;
    let tenant = tenant_token(&server, "lru").await;
    let operator = operator_token(&server).await;
    // Paths a, b, c, d, pushed in that order, NARs of one size.
    let paths: Vec<(String, Vec<u8>)> = (0..4)
        .map(|n| {
            (
                fake_store_path(&format!("p{n}")),
                file_nar(&pseudo_random(20_000, n)),
            )
        })
        .collect();
    for (path, nar) in &paths {
        let response = attic_upload(&server, &tenant, "lru", path, nar, false).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let full = usage(&server, &tenant, "lru").await.used_bytes;
    set_quota(&server, &operator, "lru", full).await;
    // The policy is the tenant's choice.
    configure(&server, &tenant, "lru", json!({"quota_policy": "EvictLru"})).await;

    // Fetch c, then a (each flushed before the next): the order of last
    // access is b, d, c, a.
    for n in [2, 0] {
        let (path, _) = &paths[n];
        let before = last_access(&server, cache.id, path).await;
        let narinfo = format!("/lru/{}.narinfo", hash_of(path));
        assert_eq!(status_of(&server, &tenant, &narinfo).await, StatusCode::OK);
        for _ in 0..100 {
            if last_access(&server, cache.id, path).await > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            last_access(&server, cache.id, path).await > before,
            "the access was flushed"
        );
    }

    // A fifth path of the same size evicts b, and only b.
    let (new_path, new_nar) = (fake_store_path("e"), file_nar(&pseudo_random(20_000, 9)));
    let response = attic_upload(&server, &tenant, "lru", &new_path, &new_nar, false).await;
    assert_eq!(response.status(), StatusCode::OK);
    // Asked of the database: the server's read cache may serve an evicted
    // narinfo for up to 2 s.
    let kept: Vec<String> = server
        .database()
        .objects_of_cache(cache.id)
        .await
        .expect("objects")
        .into_iter()
        .map(|object| object.metadata.store_path)
        .collect();
    let mut expected = vec![
        paths[0].0.clone(),
        paths[2].0.clone(),
        paths[3].0.clone(),
        new_path.clone(),
    ];
    expected.sort();
    let mut kept_sorted = kept.clone();
    kept_sorted.sort();
    assert_eq!(kept_sorted, expected, "only b was evicted");
    assert!(usage(&server, &tenant, "lru").await.used_bytes <= full);
    // The rest are served, NARs included.
    for (path, nar) in [&paths[0], &paths[2], &paths[3], &(new_path, new_nar)] {
        assert_served(&server, &tenant, "lru", path, nar).await;
    }
}

/// The last access time of a path of a cache, from the database.
async fn last_access(server: &TestServer, cache_id: larder_db::CacheId, path: &str) -> Timestamp {
    server
        .database()
        .objects_of_cache(cache_id)
        .await
        .expect("objects")
        .into_iter()
        .find(|object| object.metadata.store_path == path)
        .unwrap_or_else(|| panic!("{path} is in the cache"))
        .last_accessed_at
}

/// The path's narinfo and NAR are served, and the NAR is `nar`.
async fn assert_served(server: &TestServer, token: &str, cache: &str, path: &str, nar: &[u8]) {
    let narinfo = server
        .http()
        .get(server.url_of(&format!("/{cache}/{}.narinfo", hash_of(path))))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET narinfo");
    assert_eq!(narinfo.status(), StatusCode::OK, "{path}");
    let text = narinfo.text().await.expect("a narinfo");
    let url = text
        .lines()
        .find_map(|line| line.strip_prefix("URL: "))
        .expect("a URL line");
    let served = server
        .http()
        .get(server.url_of(&format!("/{cache}/{url}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET NAR");
    assert_eq!(served.status(), StatusCode::OK, "{path}");
    let compressed = served.bytes().await.expect("the NAR");
    let decoded = zstd::stream::decode_all(compressed.as_ref()).expect("a zstd NAR");
    assert_eq!(
        NarHash::from(Sha256Hash::digest(&decoded)),
        NarHash::from(Sha256Hash::digest(nar)),
        "{path}"
    );
}

/// With less free space on local storage than `[quota] min-free-space`,
/// pushes get 507 before their body is read, on both protocols, and what
/// the server holds is still served. Without the reserve they would fill
/// the disk the database shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_that_would_eat_into_the_free_space_reserve_get_507() {
    let server = TestServer::start(TestServerOptions {
        edit_config: Some(std::sync::Arc::new(|config| {
            config.quota.min_free_space = ByteSize::new(i64::MAX as u64);
        })),
        ..TestServerOptions::default()
    })
    .await;
    server.create_cache("tenant", false).await;
    let tenant = tenant_token(&server, "tenant").await;
    let kept_path = fake_store_path("kept");
    let kept_nar = file_nar(b"stored before the disk filled");
    server
        .seed_path(
            "tenant",
            crate::server::plain_metadata(&kept_path),
            &kept_nar,
        )
        .await;

    let nar = file_nar(&pseudo_random(4096, 3));
    assert_both_protocols_get_507(&server, &tenant, "refused", &nar).await;
    assert_nothing_staged(&server, &server.dir().join("storage"), &tenant, "tenant").await;
    assert_served(&server, &tenant, "tenant", &kept_path, &kept_nar).await;
}

/// Pushing `nar` into the cache `tenant`, as `name` with Attic's
/// `upload-path` and as a NAR file with Nix's `PUT nar/…`, is answered
/// 507 InsufficientStorage.
async fn assert_both_protocols_get_507(server: &TestServer, token: &str, name: &str, nar: &[u8]) {
    let error = expect_error(
        attic_upload(server, token, "tenant", &fake_store_path(name), nar, false).await,
        StatusCode::INSUFFICIENT_STORAGE,
    )
    .await;
    assert_eq!(error.error, "InsufficientStorage");
    let error = expect_error(
        nix_put(server, token, &nar_file_path("tenant", nar), nar.to_vec()).await,
        StatusCode::INSUFFICIENT_STORAGE,
    )
    .await;
    assert_eq!(error.error, "InsufficientStorage");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    /// Mounts a tmpfs of `size` bytes at `path` (which must exist). Needs
    /// root, as the suite runs (`ops/test.sh`).
    fn new(path: &Path, size: u64) -> Self {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs at {} failed ({status}): this test needs root, as ops/test.sh runs",
            path.display()
        );
        Self(path.to_owned())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        // Lazily, so a file still open by the stopping server cannot keep
        // it mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A disk that really fills (a 1 MiB tmpfs under `staging/`, while the
/// storage directory's own file system has room, so no reserve check
/// stops the push first): a push that hits `ENOSPC` gets 507, its partial
/// NAR is removed, and a push that fits still goes through. Without the
/// mapping, the full disk would be a 500 that Nix retries without its
/// body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_fills_the_disk_gets_507_and_leaves_nothing() {
    let root = tempfile::Builder::new()
        .prefix("larder-full-disk-")
        .tempdir()
        .expect("a storage directory");
    let staging = root.path().join("staging");
    std::fs::create_dir_all(&staging).expect("a staging directory");
    let mount = TmpfsMount::new(&staging, 1 << 20);
    let storage_path = root.path().to_owned();
    let server = TestServer::start(TestServerOptions {
        edit_config: Some(std::sync::Arc::new(move |config| {
            config.storage = larder_config::StorageConfig::Local {
                path: storage_path.clone(),
            };
            config.quota.min_free_space = ByteSize::new(0);
        })),
        ..TestServerOptions::default()
    })
    .await;
    server.create_cache("tenant", false).await;
    let tenant = tenant_token(&server, "tenant").await;

    let too_big = file_nar(&pseudo_random(3 << 20, 4));
    assert_both_protocols_get_507(&server, &tenant, "big", &too_big).await;
    assert_nothing_staged(&server, root.path(), &tenant, "tenant").await;
    // Not even the temporary file of the write that failed.
    let left: Vec<_> = std::fs::read_dir(&staging)
        .expect("the staging directory")
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // What fits still goes through, and is served.
    let fits_path = fake_store_path("fits");
    let fits = file_nar(&pseudo_random(100 << 10, 5));
    let response = attic_upload(&server, &tenant, "tenant", &fits_path, &fits, false).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_served(&server, &tenant, "tenant", &fits_path, &fits).await;
    server.stop().await;
    drop(mount);
}

/// Usage follows what leaves the cache: a deleted path at once, expired
/// paths at the next GC run; and a destroyed cache leaves no row or chunk
/// behind once GC has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_goes_down_with_deletion_and_gc_and_a_destroyed_cache_leaves_nothing() {
    let server = TestServer::sqlite().await;
    let cache = server.create_cache("tenant", false).await;
    let tenant = tenant_token(&server, "tenant").await;
    let operator = operator_token(&server).await;
    let pushed: Vec<(String, Vec<u8>)> = (0..3)
        .map(|n| {
            (
                fake_store_path(&format!("p{n}")),
                file_nar(&pseudo_random(30_000 + n, n as u64)),
            )
        })
        .collect();
    for (path, nar) in &pushed {
        let response = attic_upload(&server, &tenant, "tenant", path, nar, false).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let sizes: Vec<u64> = pushed.iter().map(|(_, nar)| nar.len() as u64).collect();
    let all: u64 = sizes.iter().sum();
    assert_eq!(usage(&server, &tenant, "tenant").await.used_bytes, all);

    // Path deletion: at once.
    let response = server
        .http()
        .post(server.url_of("/_api/v1/delete-paths"))
        .bearer_auth(&tenant)
        .json(&json!({"cache": "tenant", "store_path_hashes": [hash_of(&pushed[0].0)]}))
        .send()
        .await
        .expect("delete-paths");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        usage(&server, &tenant, "tenant").await.used_bytes,
        all - sizes[0]
    );

    // Retention: at the next GC run.
    server
        .database()
        .update_cache(
            &"tenant".parse().expect("a name"),
            &CacheUpdate {
                retention_period: Some(Some(Duration::from_secs(1))),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("a retention period");
    let gc = GcConfig {
        orphan_grace: HumanDuration::from_secs(0),
        finished_upload_deadline: HumanDuration::from_secs(0),
        ..GcConfig::default()
    };
    let storage = LocalStorage::open(server.dir().join("storage"))
        .await
        .expect("the storage");
    let later = Timestamp::now().saturating_add(HOUR);
    let report = gc_scheduler::gc::collect_garbage(server.database(), &storage, &gc, later)
        .await
        .expect("a GC run");
    assert_eq!(report.objects, 2);
    assert_eq!(report.usage_corrected, 0, "the counters never drifted");
    assert_eq!(usage(&server, &tenant, "tenant").await.used_bytes, 0);

    // A destroyed cache: its rows go with it, and GC takes its NARs and
    // chunks (no other cache holds them).
    let response = attic_upload(
        &server,
        &tenant,
        "tenant",
        &pushed[1].0,
        &pushed[1].1,
        false,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = server
        .http()
        .delete(server.url_of(&format!("{CONFIG}/tenant")))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("DELETE cache-config");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(server
        .database()
        .cache_usage(cache.id)
        .await
        .expect("usage")
        .is_none());
    let report = gc_scheduler::gc::collect_garbage(server.database(), &storage, &gc, later)
        .await
        .expect("a GC run");
    assert!(report.nars >= 1, "{report:?}");
    assert!(server
        .database()
        .stuck_uploads(&UploadPhase::ALL, later, 10)
        .await
        .expect("uploads")
        .is_empty());
    for (_, nar) in &pushed {
        let hash = NarHash::from(Sha256Hash::digest(nar));
        assert!(server
            .database()
            .nar_by_hash(&hash)
            .await
            .expect("lookup")
            .is_none());
    }
    assert_eq!(count_files(&server.dir().join("storage/chunks")), 0);
    assert_eq!(count_files(&server.dir().join("storage/staging")), 0);
}
