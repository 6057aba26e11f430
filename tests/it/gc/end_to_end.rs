//! GC end to end: the server's read path and delete API, the real
//! `gc-scheduler --once` binary on SQLite with local storage, and the GC
//! library on PostgreSQL with Garage.

use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt;
use reqwest::StatusCode;

use gc_scheduler::gc::{collect_garbage, collect_garbage_locked, reap_locked, GcLock};
use larder_api::duration::HumanDuration;
use larder_api::v1::{DeletePathsRequest, DeletePathsResponse};
use larder_config::{
    AuthConfig, DatabaseConfig, GcConfig, HttpConfig, IngestConfig, LogConfig, OpsConfig,
    PipelineConfig, QueueConfig, QuotaConfig, Secret, ServerConfig, StorageConfig,
};
use larder_db::{Actor, CacheKeypair, CacheUpdate, Database, NewCache, Timestamp};
use larder_nix::signing::SecretKey;
use larder_storage::{ObjectKey, Storage};
use larder_token::Permission;
use tests::server::{
    binary, pseudo_random, seed_nar, TestServer, TestServerOptions, SEED_CHUNK_SIZE,
};
use tests::services;

use super::{eager_gc, fake_store_path, file_nar, plain_metadata, HOUR};

/// Runs `gc-scheduler --config CONFIG --once`, which must succeed; returns
/// what it printed and logged.
pub(super) async fn run_gc_once(config: &Path) -> String {
    let output = tokio::process::Command::new(binary("gc-scheduler"))
        .arg("--config")
        .arg(config)
        .arg("--once")
        .env("RUST_LOG", "info")
        .output()
        .await
        .expect("running gc-scheduler");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "gc-scheduler --once failed: {log}");
    assert!(log.contains("GC run finished"), "{log}");
    assert!(
        log.contains(" pin revisions and ") && log.contains(" audit events expired"),
        "{log}"
    );
    log
}

async fn narinfo_status(server: &TestServer, cache: &str, path: &str, token: &str) -> StatusCode {
    let hash = &path["/nix/store/".len()..][..32];
    server
        .http()
        .get(server.url_of(&format!("/{cache}/{hash}.narinfo")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET narinfo")
        .status()
}

pub(super) async fn set_retention(database: &Database, cache: &str, retention: Duration) {
    database
        .update_cache(
            &cache.parse().expect("cache name"),
            &CacheUpdate {
                retention_period: Some(Some(retention)),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("setting a retention period");
}

/// How far [`age_objects`] moves last accesses back: far past any
/// retention period the tests set.
pub(super) const AGED: Duration = HOUR;

/// Moves the last access of every object of `cache` back by [`AGED`], as
/// if that much time had passed since: a retention period is then over
/// without the test waiting for the clock.
pub(super) async fn age_objects(database: &Database, cache: &str) {
    let aged = sqlx::query(
        "UPDATE objects SET last_accessed_at = last_accessed_at - $1 \
         WHERE cache_id = (SELECT id FROM caches WHERE name = $2)",
    )
    .bind(i64::try_from(AGED.as_millis()).expect("an hour in milliseconds fits"))
    .bind(cache)
    .execute(database.pool())
    .await
    .expect("ageing objects");
    assert!(aged.rows_affected() > 0, "{cache} has no objects to age");
}

/// Waits until the server has flushed an access to path `hash` of cache
/// `cache_id` later than `after` (it flushes access times in batches) and
/// returns the access time recorded.
async fn flushed_access(
    server: &TestServer,
    cache_id: larder_db::CacheId,
    hash: &str,
    after: Timestamp,
) -> Timestamp {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let objects = server
                .database()
                .objects_of_cache(cache_id)
                .await
                .expect("objects");
            let object = objects
                .iter()
                .find(|object| object.store_path_hash.as_str() == hash)
                .expect("the fetched object");
            if object.last_accessed_at > after {
                return object.last_accessed_at;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the access was flushed")
}

/// Polls a narinfo until it answers 404: the server keeps narinfos it
/// served in memory for `READ_CACHE_TIME_TO_LIVE`, which a separate
/// collector cannot clear. A hang guard, not a bound on that time.
async fn until_not_found(server: &TestServer, cache: &str, path: &str, token: &str) {
    for _ in 0..300 {
        match narinfo_status(server, cache, path, token).await {
            StatusCode::NOT_FOUND => return,
            StatusCode::OK => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("{cache}: {path}: {other}"),
        }
    }
    panic!("{cache}: {path} still served 30 s after its collection");
}

/// Cache `name`, which must exist.
async fn cache_named(database: &Database, name: &str) -> larder_db::Cache {
    database
        .cache_by_name(&name.parse().expect("a cache name"))
        .await
        .expect("looking the cache up")
        .expect("the cache exists")
}

async fn exists(storage: &dyn Storage, key: &ObjectKey) -> bool {
    storage.size(key).await.expect("storage size").is_some()
}

/// Every object that holds chunk data: packs, and the one-chunk objects of
/// stores written before packs (which `seed_path` writes).
pub(super) async fn chunk_objects(storage: &dyn Storage) -> Vec<ObjectKey> {
    let mut keys = Vec::new();
    for prefix in ["chunks", "packs"] {
        let prefix = ObjectKey::new(prefix).expect("key");
        let listed: Vec<_> = storage.list(&prefix).try_collect().await.expect("listing");
        keys.extend(listed.into_iter().map(|object| object.key));
    }
    keys
}

fn gc_server_options() -> TestServerOptions {
    TestServerOptions {
        gc: eager_gc(),
        ..TestServerOptions::default()
    }
}

/// A cache with retention 1 s loses its path at the next run; the chunks
/// stay while another cache holds the same NAR, and go once none does.
#[tokio::test]
async fn retention_on_sqlite_with_the_gc_scheduler_binary() {
    let server = TestServer::start(gc_server_options()).await;
    server.create_cache("brief", false).await;
    server.create_cache("lasting", false).await;
    let root = server.root_token().await;
    let path = fake_store_path("shared");
    let nar = file_nar(&pseudo_random(3 * SEED_CHUNK_SIZE + 10, 1));
    let seeded = server.seed_path("brief", plain_metadata(&path), &nar).await;
    server
        .seed_path("lasting", plain_metadata(&path), &nar)
        .await;
    let lasting = cache_named(server.database(), "lasting").await;
    let lasting_pushed_at = server
        .database()
        .objects_of_cache(lasting.id)
        .await
        .expect("objects")[0]
        .last_accessed_at;
    set_retention(server.database(), "brief", Duration::from_secs(1)).await;
    // The retention period passes since the push (the last access).
    age_objects(server.database(), "brief").await;

    let log = run_gc_once(server.config_path()).await;
    assert!(log.contains("objects=1"), "{log}");
    assert_eq!(
        narinfo_status(&server, "brief", &path, &root).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        narinfo_status(&server, "lasting", &path, &root).await,
        StatusCode::OK
    );
    for key in &seeded.chunk_keys {
        assert!(
            exists(server.storage(), key).await,
            "{key} freed while held"
        );
    }

    // The fetch above is an access: once the server has flushed it (a
    // later flush would make the path fresh again), the retention passes.
    let hash = &path["/nix/store/".len()..][..32];
    flushed_access(&server, lasting.id, hash, lasting_pushed_at).await;
    set_retention(server.database(), "lasting", Duration::from_secs(1)).await;
    age_objects(server.database(), "lasting").await;
    let log = run_gc_once(server.config_path()).await;
    assert!(log.contains("nars=1"), "{log}");
    until_not_found(&server, "lasting", &path, &root).await;
    for key in &seeded.chunk_keys {
        assert!(!exists(server.storage(), key).await, "{key} still stored");
    }
    assert!(chunk_objects(server.storage()).await.is_empty());
    server.stop().await;
}

/// The same on PostgreSQL with Garage, with the binary on a config of
/// its own (its own storage prefix).
#[tokio::test]
async fn retention_on_postgres_with_garage() {
    let database_url = services::fresh_postgres_database().await;
    let database = Database::connect(&database_url).await.expect("connecting");
    database.migrate().await.expect("migrating");
    let settings = services::S3Settings::from_env();
    let prefix = services::unique_name("gc");
    let storage_config = StorageConfig::S3(settings.storage_config(&prefix));
    let storage = larder_storage::open(&storage_config)
        .await
        .expect("opening S3 storage");
    let dir = tempfile::tempdir().expect("a config directory");
    let config_path = dir.path().join("gc.toml");
    let config = ServerConfig {
        listen: ServerConfig::default_listen(),
        api_endpoint: None,
        database: DatabaseConfig {
            url: Secret::new(database_url),
        },
        storage: storage_config,
        auth: AuthConfig {
            hs256_secret_base64: Some(Secret::new("c2VjcmV0LWZvci10ZXN0cw==")),
            rs256_private_key_pem: None,
        },
        ingest: IngestConfig::default(),
        http: HttpConfig::default(),
        pipeline: PipelineConfig::default(),
        gc: eager_gc(),
        queue: QueueConfig::default(),
        quota: QuotaConfig::default(),
        log: LogConfig::default(),
        ops: OpsConfig::default(),
    };
    std::fs::write(&config_path, config.to_toml()).expect("writing the config");

    let mut caches = Vec::new();
    for name in ["brief", "lasting"] {
        let key = SecretKey::generate(&format!("{name}-1")).expect("key");
        let cache = database
            .create_cache(
                &NewCache::new(
                    name.parse().expect("name"),
                    CacheKeypair::new(key.to_nix_secret_string()),
                ),
                Timestamp::now(),
            )
            .await
            .expect("cache");
        caches.push(cache);
    }
    let path = fake_store_path("shared");
    let hash = larder_nix::StorePathHash::parse(&path["/nix/store/".len()..][..32]).expect("hash");
    let nar = file_nar(&pseudo_random(2 * SEED_CHUNK_SIZE + 10, 2));
    let mut keys = Vec::new();
    for cache in &caches {
        let (_, chunk_keys) = seed_nar(
            &database,
            &*storage,
            cache.id,
            hash,
            plain_metadata(&path),
            "test",
            &nar,
        )
        .await
        .expect("seeding");
        keys = chunk_keys;
    }
    set_retention(&database, "brief", Duration::from_secs(1)).await;
    age_objects(&database, "brief").await;

    let log = run_gc_once(&config_path).await;
    assert!(log.contains("objects=1 nars=0 chunks=0"), "{log}");
    assert!(database
        .objects_of_cache(caches[0].id)
        .await
        .expect("objects")
        .is_empty());
    for key in &keys {
        assert!(exists(&*storage, key).await, "{key} freed while held");
    }

    set_retention(&database, "lasting", Duration::from_secs(1)).await;
    age_objects(&database, "lasting").await;
    let log = run_gc_once(&config_path).await;
    let expected = format!("objects=1 nars=1 chunks={}", keys.len());
    assert!(log.contains(&expected), "{log}");
    for key in &keys {
        assert!(!exists(&*storage, key).await, "{key} still stored");
    }
    assert!(chunk_objects(&*storage).await.is_empty());
}

/// A fresh, migrated PostgreSQL database and local storage in a temporary
/// directory (kept while the returned guard lives).
async fn postgres_with_local_storage() -> (Database, larder_storage::LocalStorage, tempfile::TempDir)
{
    let database = Database::connect(&services::fresh_postgres_database().await)
        .await
        .expect("connecting");
    database.migrate().await.expect("migrating");
    let dir = tempfile::tempdir().expect("storage directory");
    let storage = larder_storage::LocalStorage::open(dir.path())
        .await
        .expect("storage");
    (database, storage, dir)
}

/// Two collectors on one PostgreSQL database: while one holds the lock,
/// the other skips its run.
#[tokio::test]
async fn a_second_collector_on_postgres_skips_its_run() {
    let (database, storage, _dir) = postgres_with_local_storage().await;
    let held = GcLock::try_acquire(&database)
        .await
        .expect("locking")
        .expect("the lock is free");
    let skipped = collect_garbage_locked(&database, &storage, &eager_gc(), Timestamp::now())
        .await
        .expect("GC");
    assert!(
        skipped.is_none(),
        "ran while another collector held the lock"
    );
    held.release().await;
    let ran = collect_garbage_locked(&database, &storage, &eager_gc(), Timestamp::now())
        .await
        .expect("GC");
    assert!(ran.is_some(), "the lock was released");
}

/// The reaping pass has a lock of its own on PostgreSQL: it runs while a
/// GC run holds GC's lock (both reap with conditional statements), and a
/// second reaper skips its pass while another holds the reaping lock.
#[tokio::test]
async fn the_reaping_pass_has_its_own_lock_on_postgres() {
    let (database, storage, _dir) = postgres_with_local_storage().await;
    let collecting = GcLock::try_acquire(&database)
        .await
        .expect("locking")
        .expect("the GC lock is free");
    let reaped = reap_locked(&database, &storage, &eager_gc(), Timestamp::now())
        .await
        .expect("reaping");
    assert!(reaped.is_some(), "a GC run kept the reaper from its pass");
    let reaping = GcLock::try_acquire_reaping(&database)
        .await
        .expect("locking")
        .expect("the reaping lock is free");
    let skipped = reap_locked(&database, &storage, &eager_gc(), Timestamp::now())
        .await
        .expect("reaping");
    assert!(
        skipped.is_none(),
        "reaped while another reaper held the lock"
    );
    reaping.release().await;
    collecting.release().await;
}

/// A path fetched after the retention period survives the run that
/// removes an untouched path pushed at the same time.
#[tokio::test]
async fn a_recently_fetched_path_survives_an_untouched_one() {
    let server = TestServer::start(gc_server_options()).await;
    server.create_cache("lru", false).await;
    let root = server.root_token().await;
    let fetched = fake_store_path("fetched");
    let untouched = fake_store_path("untouched");
    server
        .seed_path("lru", plain_metadata(&fetched), &file_nar(b"fetched"))
        .await;
    server
        .seed_path("lru", plain_metadata(&untouched), &file_nar(b"untouched"))
        .await;
    set_retention(server.database(), "lru", Duration::from_secs(1)).await;
    let cache = cache_named(server.database(), "lru").await;
    // Both were pushed long ago (past the retention), then one is fetched.
    age_objects(server.database(), "lru").await;
    let pushed_at = server
        .database()
        .objects_of_cache(cache.id)
        .await
        .expect("objects")[0]
        .last_accessed_at;
    assert_eq!(
        narinfo_status(&server, "lru", &fetched, &root).await,
        StatusCode::OK
    );
    let fetched_hash = &fetched["/nix/store/".len()..][..32];
    let accessed_at = flushed_access(&server, cache.id, fetched_hash, pushed_at).await;

    // Half a second after the access: 1 s retention keeps it, not the other.
    let now = accessed_at.saturating_add(Duration::from_millis(500));
    let storage: &dyn Storage = server.storage();
    let report = collect_garbage(server.database(), storage, &eager_gc(), now)
        .await
        .expect("GC");
    assert_eq!(report.objects, 1);
    assert_eq!(
        narinfo_status(&server, "lru", &fetched, &root).await,
        StatusCode::OK
    );
    assert_eq!(
        narinfo_status(&server, "lru", &untouched, &root).await,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

async fn delete_paths(
    server: &TestServer,
    token: Option<&str>,
    cache: &str,
    paths: &[&str],
) -> reqwest::Response {
    let request = DeletePathsRequest {
        cache: cache.to_owned(),
        store_path_hashes: paths
            .iter()
            .map(|path| path["/nix/store/".len()..][..32].to_owned())
            .collect(),
    };
    let mut builder = server
        .http()
        .post(server.url_of("/_api/v1/delete-paths"))
        .json(&request);
    if let Some(token) = token {
        builder = builder.bearer_auth(token);
    }
    builder.send().await.expect("POST delete-paths")
}

/// A deleted path is gone at once; its chunks go with the next run unless
/// another cache holds them; the delete bit is required.
#[tokio::test]
async fn deleted_paths_404_at_once_and_their_storage_goes_with_the_next_run() {
    let server = TestServer::start(gc_server_options()).await;
    server.create_cache("trash", false).await;
    server.create_cache("keeper", false).await;
    let root = server.root_token().await;
    let doomed = fake_store_path("doomed");
    let shared = fake_store_path("shared");
    let doomed_nar = file_nar(&pseudo_random(2 * SEED_CHUNK_SIZE, 3));
    let shared_nar = file_nar(&pseudo_random(2 * SEED_CHUNK_SIZE, 4));
    let doomed_seed = server
        .seed_path("trash", plain_metadata(&doomed), &doomed_nar)
        .await;
    let shared_seed = server
        .seed_path("trash", plain_metadata(&shared), &shared_nar)
        .await;
    server
        .seed_path("keeper", plain_metadata(&shared), &shared_nar)
        .await;

    // Without the delete bit: 403 for a token that knows the cache, the
    // no-discovery answers otherwise; nothing is deleted.
    let puller = server
        .mint("puller", HOUR, &[("trash", &[Permission::Pull])])
        .await;
    let stranger = server
        .mint("stranger", HOUR, &[("keeper", &[Permission::Delete])])
        .await;
    let forbidden = delete_paths(&server, Some(&puller), "trash", &[&doomed]).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let hidden = delete_paths(&server, Some(&stranger), "trash", &[&doomed]).await;
    assert_eq!(hidden.status(), StatusCode::NOT_FOUND);
    let anonymous = delete_paths(&server, None, "trash", &[&doomed]).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let malformed = server
        .http()
        .post(server.url_of("/_api/v1/delete-paths"))
        .bearer_auth(&root)
        .json(&serde_json::json!({"cache": "trash", "store_path_hashes": ["not-a-hash"]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        narinfo_status(&server, "trash", &doomed, &root).await,
        StatusCode::OK
    );

    let deleter = server
        .mint("deleter", HOUR, &[("trash", &[Permission::Delete])])
        .await;
    let missing = fake_store_path("never-pushed");
    let response = delete_paths(
        &server,
        Some(&deleter),
        "trash",
        &[&doomed, &shared, &missing],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: DeletePathsResponse = response.json().await.expect("JSON answer");
    assert_eq!(answer.deleted.len(), 2);
    assert_eq!(
        answer.not_found,
        vec![missing["/nix/store/".len()..][..32].to_owned()]
    );
    // At once, even though the narinfo was just served (and cached).
    assert_eq!(
        narinfo_status(&server, "trash", &doomed, &root).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        narinfo_status(&server, "trash", &shared, &root).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        narinfo_status(&server, "keeper", &shared, &root).await,
        StatusCode::OK
    );

    run_gc_once(server.config_path()).await;
    for key in &doomed_seed.chunk_keys {
        assert!(!exists(server.storage(), key).await, "{key} still stored");
    }
    for key in &shared_seed.chunk_keys {
        assert!(
            exists(server.storage(), key).await,
            "{key} freed while held"
        );
    }
    server.stop().await;
}

/// Runs `larder ARGS` with its config in `config_home`.
async fn larder(config_home: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(binary("larder"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", config_home)
        .env("XDG_CONFIG_HOME", config_home)
        .output()
        .await
        .expect("running larder")
}

/// `larder cache delete-path` takes store paths, base names and hashes;
/// without the delete bit it fails with one readable line.
#[tokio::test]
async fn larder_cache_delete_path_removes_paths() {
    let server = TestServer::start(gc_server_options()).await;
    server.create_cache("cli", false).await;
    let root = server.root_token().await;
    let paths: Vec<String> = (0..3).map(|n| fake_store_path(&format!("p{n}"))).collect();
    for (n, path) in paths.iter().enumerate() {
        let nar = file_nar(format!("path {n}").as_bytes());
        server.seed_path("cli", plain_metadata(path), &nar).await;
    }
    let home = tempfile::tempdir().expect("a config home");
    let puller = server
        .mint("puller", HOUR, &[("cli", &[Permission::Pull])])
        .await;
    let login = larder(home.path(), &["login", "local", &server.url(), &puller]).await;
    assert!(login.status.success(), "{login:?}");
    let refused = larder(home.path(), &["cache", "delete-path", "cli", &paths[0]]).await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
    let bad = larder(home.path(), &["cache", "delete-path", "cli", "not-a-path"]).await;
    assert_eq!(bad.status.code(), Some(1));

    let deleter = server
        .mint(
            "deleter",
            HOUR,
            &[("cli", &[Permission::Pull, Permission::Delete])],
        )
        .await;
    let login = larder(home.path(), &["login", "local", &server.url(), &deleter]).await;
    assert!(login.status.success(), "{login:?}");
    let base_name = &paths[1]["/nix/store/".len()..];
    let never_pushed = fake_store_path("never");
    let hash = &never_pushed["/nix/store/".len()..][..32];
    let deleted = larder(
        home.path(),
        &["cache", "delete-path", "cli", &paths[0], base_name, hash],
    )
    .await;
    assert!(deleted.status.success(), "{deleted:?}");
    let stdout = String::from_utf8_lossy(&deleted.stdout);
    assert!(
        stdout.contains("deleted 2 path(s) from cache cli"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("not in cache cli: {hash}")),
        "{stdout}"
    );
    assert_eq!(
        narinfo_status(&server, "cli", &paths[0], &root).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        narinfo_status(&server, "cli", &paths[1], &root).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        narinfo_status(&server, "cli", &paths[2], &root).await,
        StatusCode::OK
    );
    server.stop().await;
}

/// Reaping: uploads failed or stuck (here in `chunking` and `spooled`)
/// past their deadlines and unclaimed
/// staged files go with their staged NARs; stray objects under `chunks/`
/// and `staging/` go once older than their grace, referenced ones never.
#[tokio::test]
async fn reaping_removes_stale_uploads_staged_files_and_orphan_chunk_objects() {
    use larder_config::GcConfig;
    use larder_db::{NewUpload, StagedFile, UploadPhase};
    use larder_nix::{NarHash, Sha256Hash, StorePathHash};

    let server = TestServer::start(gc_server_options()).await;
    let cache = server.create_cache("reaped", false).await;
    let database = server.database();
    let storage: &dyn Storage = server.storage();
    let kept_path = fake_store_path("kept");
    let kept = server
        .seed_path("reaped", plain_metadata(&kept_path), &file_nar(b"kept"))
        .await;
    let now = Timestamp::now();
    let staged = |name: &str| ObjectKey::new(format!("staging/{name}.nar")).expect("key");
    let mut uploads = Vec::new();
    for (n, name) in ["failed", "chunking", "spooled"].iter().enumerate() {
        let hash = StorePathHash::from_bytes(&[n as u8 + 1; 20]);
        storage
            .put(&staged(name), bytes::Bytes::from_static(b"nar"))
            .await
            .expect("staging");
        let upload = database
            .create_upload(
                &NewUpload {
                    cache_id: cache.id,
                    store_path_hash: hash,
                    nar_hash: NarHash::new(Sha256Hash::digest(name.as_bytes())),
                    nar_size: 3,
                    metadata: plain_metadata(&format!("/nix/store/{hash}-{name}")),
                    staged_key: staged(name).to_string(),
                    staged_crc32: None,
                    trace_id: None,
                    created_by: Actor::default(),
                },
                now,
            )
            .await
            .expect("upload");
        uploads.push(upload);
    }
    database
        .fail_upload(&uploads[0].id, "test", now)
        .await
        .expect("failing");
    database
        .set_upload_phase(&uploads[1].id, UploadPhase::Chunking, now)
        .await
        .expect("phase");
    storage
        .put(&staged("unclaimed"), bytes::Bytes::from_static(b"nar"))
        .await
        .expect("staging");
    database
        .put_staged_file(&StagedFile {
            cache_id: cache.id,
            file_name: "x.nar".to_owned(),
            staged_key: staged("unclaimed").to_string(),
            staged_crc32: None,
            nar_hash: NarHash::new(Sha256Hash::digest(b"unclaimed")),
            nar_size: 3,
            created_at: now,
        })
        .await
        .expect("staged file");
    let stray = ObjectKey::new("chunks/ab/left-by-a-crash.zst").expect("key");
    let stray_staged = staged("left-by-a-crashed-spool");
    for key in [&stray, &stray_staged] {
        storage
            .put(key, bytes::Bytes::from_static(b"zst"))
            .await
            .expect("a stray object");
    }

    let config = GcConfig {
        orphan_grace: HumanDuration::from_secs(3600),
        ..eager_gc()
    };
    // Within every deadline and the grace: nothing goes.
    let report = collect_garbage(database, storage, &config, now)
        .await
        .expect("GC");
    assert_eq!(
        (
            report.uploads_reaped,
            report.staged_files_reaped,
            report.orphans_removed
        ),
        (0, 0, 0)
    );
    assert!(exists(storage, &stray).await);
    assert!(exists(storage, &stray_staged).await);

    // A day and a bit later (the defaults), everything stale goes.
    let later = now.saturating_add(Duration::from_secs(25 * 3600));
    let report = collect_garbage(database, storage, &config, later)
        .await
        .expect("GC");
    assert_eq!(report.uploads_reaped, 3);
    assert_eq!(report.staged_files_reaped, 1);
    // The stray objects, written "25 hours ago" by then.
    assert_eq!(report.orphans_removed, 2);
    for upload in &uploads {
        assert!(database.upload(&upload.id).await.expect("lookup").is_none());
    }
    for name in ["failed", "chunking", "spooled", "unclaimed"] {
        assert!(!exists(storage, &staged(name)).await, "{name} still staged");
    }
    assert!(database
        .staged_file(cache.id, "x.nar")
        .await
        .expect("lookup")
        .is_none());
    assert!(!exists(storage, &stray).await);
    assert!(!exists(storage, &stray_staged).await);
    // The seeded path has no retention: it and its chunks stay.
    for key in &kept.chunk_keys {
        assert!(exists(storage, key).await, "{key} removed");
    }
    server.stop().await;
}

/// The server's own periodic GC (no run started by the test) applies the
/// server-wide `default-retention` to a cache that sets none, and not to a
/// cache with a retention period of its own, nor to a path accessed within
/// the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_periodic_gc_applies_the_default_retention() {
    let server = TestServer::start(TestServerOptions {
        gc: GcConfig {
            interval: HumanDuration::from_secs(1),
            default_retention: Some(HumanDuration::from_secs(600)),
            ..eager_gc()
        },
        ..TestServerOptions::default()
    })
    .await;
    let root = server.root_token().await;
    server.create_cache("defaulted", false).await;
    server.create_cache("own", false).await;
    set_retention(server.database(), "own", 30 * 24 * HOUR).await;
    let old = fake_store_path("old");
    let recent = fake_store_path("recent");
    let kept = fake_store_path("kept");
    server
        .seed_path("defaulted", plain_metadata(&old), &file_nar(b"old"))
        .await;
    server
        .seed_path("own", plain_metadata(&kept), &file_nar(b"kept"))
        .await;
    // Untouched for an hour: past the default retention of 10 minutes,
    // within `own`'s 30 days.
    age_objects(server.database(), "defaulted").await;
    age_objects(server.database(), "own").await;
    server
        .seed_path("defaulted", plain_metadata(&recent), &file_nar(b"recent"))
        .await;

    // The server's loop removes the old path; the test runs no GC itself,
    // and reads the database (a fetch would be an access, keeping the
    // path). A hang guard only: the loop runs every second.
    let paths_of = |cache: &'static str| {
        let database = server.database().clone();
        async move {
            let cache = cache_named(&database, cache).await;
            let objects = database.objects_of_cache(cache.id).await.expect("objects");
            objects
                .into_iter()
                .map(|object| object.metadata.store_path)
                .collect::<Vec<String>>()
        }
    };
    let mut polls = 0;
    while paths_of("defaulted").await.contains(&old) {
        polls += 1;
        assert!(
            polls < 600,
            "the periodic GC never removed the expired path"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(paths_of("defaulted").await, std::slice::from_ref(&recent));
    assert_eq!(paths_of("own").await, std::slice::from_ref(&kept));
    assert_eq!(
        narinfo_status(&server, "defaulted", &recent, &root).await,
        StatusCode::OK
    );
    server.stop().await;
}
