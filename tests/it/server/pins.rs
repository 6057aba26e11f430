//! Pins (issue #18) through the real server and GC: a pinned closure
//! outlives a 1-second retention while unpinned paths go, and goes once
//! the pin does; `keep` policies drop revisions at pin time
//! (`revisions`) and in GC (`days`), and GC then takes what only the
//! dropped revisions kept; and the API's answers to bad names, unknown
//! paths and callers without the permission. Each runs on SQLite and on
//! PostgreSQL: the closure is one recursive query written per dialect.

use std::time::Duration;

use gc_scheduler::gc::{collect_garbage, GcReport};
use larder_api::v1::{KeepPolicy, PinInfo, PinList};
use larder_config::GcConfig;
use larder_db::{Backend, CacheUpdate, ObjectMetadata, Timestamp};
use larder_token::Permission;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tests::server::TestServer;

use super::{api_error, fake_store_path, file_nar, get, ok_json, plain_metadata, send, HOUR};

/// `/nix/store/<hash>-<name>` → `<hash>-<name>`, as references name paths.
fn base_name(path: &str) -> String {
    path.rsplit('/').next().expect("a path").to_owned()
}

/// `/nix/store/<hash>-<name>` → `<hash>`.
fn hash_of(path: &str) -> String {
    base_name(path)[..32].to_owned()
}

/// Seeds a made-up path named `name` referencing `references` (and
/// itself, as Nix records self-references) into `cache`; returns it.
async fn seed(server: &TestServer, cache: &str, name: &str, references: &[&str]) -> String {
    let path = fake_store_path(name);
    let mut all: Vec<String> = references.iter().map(|path| base_name(path)).collect();
    all.push(base_name(&path));
    let metadata = ObjectMetadata {
        references: all,
        ..plain_metadata(&path)
    };
    server
        .seed_path(cache, metadata, &file_nar(name.as_bytes()))
        .await;
    path
}

/// A cache whose retention period is one second.
async fn short_lived_cache(server: &TestServer, name: &str) {
    server.create_cache(name, false).await;
    server
        .database()
        .update_cache(
            &name.parse().expect("a cache name"),
            &CacheUpdate {
                retention_period: Some(Some(Duration::from_secs(1))),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("setting the retention period");
}

/// One GC run `ahead` from now, a page of one object at a time: a page
/// of pinned objects must not end the expiry early.
async fn gc_ahead(server: &TestServer, ahead: Duration) -> GcReport {
    let storage = larder_storage::open(&server.config().storage)
        .await
        .expect("the server's storage");
    let config = GcConfig {
        page_size: 1,
        ..GcConfig::default()
    };
    collect_garbage(
        server.database(),
        &*storage,
        &config,
        Timestamp::now().saturating_add(ahead),
    )
    .await
    .expect("a GC run")
}

/// Which of `paths` the cache still holds.
async fn held(server: &TestServer, cache: &str, paths: &[&str]) -> Vec<bool> {
    let objects = server.objects(cache).await;
    paths
        .iter()
        .map(|path| {
            objects
                .iter()
                .any(|object| object.store_path_hash.as_str() == hash_of(path))
        })
        .collect()
}

async fn pin(
    server: &TestServer,
    token: &str,
    cache: &str,
    name: &str,
    path: &str,
    keep: serde_json::Value,
) -> PinInfo {
    let body = json!({"name": name, "store_path_hash": hash_of(path), "keep": keep});
    ok_json(
        send(
            server,
            Method::POST,
            &format!("/_api/v1/pins/{cache}"),
            Some(token),
            Some(body),
        )
        .await,
    )
    .await
}

async fn pins(server: &TestServer, token: &str, cache: &str) -> PinList {
    ok_json(get(server, &format!("/_api/v1/pins/{cache}"), Some(token)).await).await
}

const TWO_DAYS: Duration = Duration::from_secs(2 * 24 * 3600);

async fn pinned_closure_outlives_retention_until_unpinned(backend: Backend) {
    let server = TestServer::on(backend).await;
    short_lived_cache(&server, "rel").await;
    let token = server
        .mint(
            "ci",
            HOUR,
            &[("rel", &[Permission::Pull, Permission::Push])],
        )
        .await;
    let leaf = seed(&server, "rel", "leaf", &[]).await;
    // A reference the cache never got: part of the closure, matching no
    // object.
    let elsewhere = fake_store_path("elsewhere");
    let dep = seed(&server, "rel", "dep", &[&leaf, &elsewhere]).await;
    let root = seed(&server, "rel", "root", &[&dep]).await;
    let loose = seed(&server, "rel", "loose", &[]).await;
    // Referencing the root keeps nothing: closures run downwards.
    let user = seed(&server, "rel", "user", &[&root]).await;

    let pinned = pin(
        &server,
        &token,
        "rel",
        "release-1.0",
        &root,
        json!("forever"),
    )
    .await;
    assert_eq!(pinned.name, "release-1.0");
    assert_eq!(pinned.revisions.len(), 1);
    assert_eq!(pinned.revisions[0].revision, 1);
    assert_eq!(pinned.revisions[0].store_path, root);
    assert_eq!(pinned.revisions[0].created_by.as_deref(), Some("ci"));
    assert!(pinned.revisions[0].present);

    let report = gc_ahead(&server, TWO_DAYS).await;
    assert_eq!(report.objects, 2, "{report:?}");
    assert_eq!(
        held(&server, "rel", &[&root, &dep, &leaf, &loose, &user]).await,
        [true, true, true, false, false]
    );
    // Served still, the whole closure.
    for path in [&root, &dep, &leaf] {
        let narinfo = get(
            &server,
            &format!("/rel/{}.narinfo", hash_of(path)),
            Some(&token),
        )
        .await;
        assert_eq!(narinfo.status(), StatusCode::OK, "{path}");
    }

    let deleted = send(
        &server,
        Method::DELETE,
        "/_api/v1/pins/rel/release-1.0",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(pins(&server, &token, "rel").await.pins, []);
    let report = gc_ahead(&server, TWO_DAYS).await;
    assert_eq!(report.objects, 3, "{report:?}");
    assert_eq!(
        held(&server, "rel", &[&root, &dep, &leaf]).await,
        [false, false, false]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_closure_outlives_retention_until_unpinned_on_sqlite() {
    pinned_closure_outlives_retention_until_unpinned(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_closure_outlives_retention_until_unpinned_on_postgres() {
    pinned_closure_outlives_retention_until_unpinned(Backend::Postgres).await;
}

async fn keep_policies_drop_old_revisions(backend: Backend) {
    let server = TestServer::on(backend).await;
    short_lived_cache(&server, "ci").await;
    let token = server
        .mint("ci", HOUR, &[("ci", &[Permission::Push])])
        .await;
    let shared = seed(&server, "ci", "shared", &[]).await;
    let first = seed(&server, "ci", "first", &[&shared]).await;
    let second = seed(&server, "ci", "second", &[&shared]).await;
    let third = seed(&server, "ci", "third", &[]).await;

    let keep_two = json!({"revisions": 2});
    for root in [&first, &second, &third] {
        pin(&server, &token, "ci", "main", root, keep_two.clone()).await;
    }
    // Pinning the newest root again (a retried job) adds no revision.
    let main = pin(&server, &token, "ci", "main", &third, keep_two).await;
    let kept: Vec<(u64, &str)> = main
        .revisions
        .iter()
        .map(|revision| (revision.revision, revision.store_path.as_str()))
        .collect();
    assert_eq!(kept, [(3, third.as_str()), (2, second.as_str())]);

    // `days`: GC drops the revisions older than that, but never the newest.
    let old_nightly = seed(&server, "ci", "old-nightly", &[]).await;
    let nightly = seed(&server, "ci", "nightly", &[]).await;
    let one_day = json!({"days": 1});
    pin(
        &server,
        &token,
        "ci",
        "nightly",
        &old_nightly,
        one_day.clone(),
    )
    .await;
    let nightlies = pin(&server, &token, "ci", "nightly", &nightly, one_day).await;
    assert_eq!(nightlies.revisions.len(), 2, "young revisions are kept");

    let report = gc_ahead(&server, TWO_DAYS).await;
    assert_eq!(report.pin_revisions, 1, "{report:?}");
    assert_eq!(report.objects, 2, "{report:?}");
    assert_eq!(
        held(
            &server,
            "ci",
            &[&first, &second, &shared, &third, &old_nightly, &nightly]
        )
        .await,
        [false, true, true, true, false, true]
    );
    let listed = pins(&server, &token, "ci").await.pins;
    let names: Vec<(&str, Vec<u64>)> = listed
        .iter()
        .map(|pin| {
            let revisions = pin.revisions.iter().map(|r| r.revision).collect();
            (pin.name.as_str(), revisions)
        })
        .collect();
    assert_eq!(names, [("main", vec![3, 2]), ("nightly", vec![2])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_policies_drop_old_revisions_on_sqlite() {
    keep_policies_drop_old_revisions(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_policies_drop_old_revisions_on_postgres() {
    keep_policies_drop_old_revisions(Backend::Postgres).await;
}

/// The default policy keeps the newest revision alone; an explicitly
/// deleted root leaves its revision in place, shown as absent.
async fn default_policy_and_explicit_deletion(backend: Backend) {
    let server = TestServer::on(backend).await;
    server.create_cache("app", false).await;
    let token = server
        .mint(
            "owner",
            HOUR,
            &[(
                "app",
                &[Permission::Pull, Permission::Push, Permission::Delete],
            )],
        )
        .await;
    let old = seed(&server, "app", "old", &[]).await;
    let new = seed(&server, "app", "new", &[]).await;
    let body = |path: &str| json!({"name": "app", "store_path_hash": hash_of(path)});
    for path in [&old, &new] {
        let _: PinInfo = ok_json(
            send(
                &server,
                Method::POST,
                "/_api/v1/pins/app",
                Some(&token),
                Some(body(path)),
            )
            .await,
        )
        .await;
    }
    let listed = pins(&server, &token, "app").await.pins;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].keep, KeepPolicy::DEFAULT);
    assert_eq!(listed[0].revisions.len(), 1);
    assert_eq!(listed[0].revisions[0].store_path, new);

    // A pin keeps the policy it was given until another is: pinning
    // without one drops nothing `forever` kept.
    pin(&server, &token, "app", "kept", &old, json!("forever")).await;
    let kept: PinInfo = ok_json(
        send(
            &server,
            Method::POST,
            "/_api/v1/pins/app",
            Some(&token),
            Some(json!({"name": "kept", "store_path_hash": hash_of(&new)})),
        )
        .await,
    )
    .await;
    assert_eq!(kept.keep, KeepPolicy::Forever);
    assert_eq!(kept.revisions.len(), 2);
    let kept = pin(
        &server,
        &token,
        "app",
        "kept",
        &old,
        json!({"revisions": 1}),
    )
    .await;
    assert_eq!(kept.keep, KeepPolicy::DEFAULT);
    assert_eq!(kept.revisions.len(), 1);
    assert_eq!(kept.revisions[0].revision, 3);

    let deleted: serde_json::Value = ok_json(
        send(
            &server,
            Method::POST,
            "/_api/v1/delete-paths",
            Some(&token),
            Some(json!({"cache": "app", "store_path_hashes": [hash_of(&new)]})),
        )
        .await,
    )
    .await;
    assert_eq!(deleted["deleted"], json!([hash_of(&new)]), "{deleted}");
    let listed = pins(&server, &token, "app").await.pins;
    assert_eq!(listed[0].name, "app");
    assert!(!listed[0].revisions[0].present, "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_and_explicit_deletion_on_sqlite() {
    default_policy_and_explicit_deletion(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_and_explicit_deletion_on_postgres() {
    default_policy_and_explicit_deletion(Backend::Postgres).await;
}

/// A request the API refuses: method, URL, token, body, and the status
/// and error name expected.
type Refusal<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    Option<serde_json::Value>,
    StatusCode,
    &'a str,
);

async fn pin_api_refusals(backend: Backend) {
    let server = TestServer::on(backend).await;
    server.create_cache("team", false).await;
    server.create_cache("open", true).await;
    let pusher = server
        .mint("pusher", HOUR, &[("team", &[Permission::Push])])
        .await;
    let reader = server
        .mint("reader", HOUR, &[("team", &[Permission::Pull])])
        .await;
    let stranger = server
        .mint("stranger", HOUR, &[("other", &[Permission::Push])])
        .await;
    let path = seed(&server, "team", "app", &[]).await;
    let absent = fake_store_path("absent");
    let create = |name: &str, path: &str, keep: serde_json::Value| json!({"name": name, "store_path_hash": hash_of(path), "keep": keep});
    let forever = json!("forever");
    let cases: Vec<Refusal> = vec![
        (
            Method::POST,
            "/_api/v1/pins/team",
            Some(&pusher),
            Some(create("-x", &path, forever.clone())),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            Method::POST,
            "/_api/v1/pins/team",
            Some(&pusher),
            Some(create("a/b", &path, forever.clone())),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            Method::POST,
            "/_api/v1/pins/team",
            Some(&pusher),
            Some(json!({"name": "x", "store_path_hash": "not-a-hash"})),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            Method::POST,
            "/_api/v1/pins/team",
            Some(&pusher),
            Some(create("x", &path, json!({"revisions": 0}))),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            Method::POST,
            "/_api/v1/pins/team",
            Some(&pusher),
            Some(create("x", &absent, forever.clone())),
            StatusCode::NOT_FOUND,
            "NoSuchPath",
        ),
        (
            Method::POST,
            "/_api/v1/pins/team",
            Some(&reader),
            Some(create("x", &path, forever.clone())),
            StatusCode::FORBIDDEN,
            "Forbidden",
        ),
        (
            Method::POST,
            "/_api/v1/pins/team",
            Some(&stranger),
            Some(create("x", &path, forever.clone())),
            StatusCode::NOT_FOUND,
            "NoSuchCache",
        ),
        (
            Method::POST,
            "/_api/v1/pins/team",
            None,
            Some(create("x", &path, forever.clone())),
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
        ),
        (
            Method::POST,
            "/_api/v1/pins/nowhere",
            Some(&pusher),
            Some(create("x", &path, forever.clone())),
            StatusCode::NOT_FOUND,
            "NoSuchCache",
        ),
        (
            Method::GET,
            "/_api/v1/pins/team",
            Some(&stranger),
            None,
            StatusCode::NOT_FOUND,
            "NoSuchCache",
        ),
        (
            Method::GET,
            "/_api/v1/pins/team",
            None,
            None,
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
        ),
        // A public cache's readers do not list its pins.
        (
            Method::GET,
            "/_api/v1/pins/open",
            Some(&stranger),
            None,
            StatusCode::FORBIDDEN,
            "Forbidden",
        ),
        (
            Method::DELETE,
            "/_api/v1/pins/team/nothing",
            Some(&pusher),
            None,
            StatusCode::NOT_FOUND,
            "NoSuchPin",
        ),
        (
            Method::DELETE,
            "/_api/v1/pins/team/.x",
            Some(&pusher),
            None,
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            Method::DELETE,
            "/_api/v1/pins/team/x",
            Some(&reader),
            None,
            StatusCode::FORBIDDEN,
            "Forbidden",
        ),
        (
            Method::DELETE,
            "/_api/v1/pins/team/x",
            Some(&stranger),
            None,
            StatusCode::NOT_FOUND,
            "NoSuchCache",
        ),
    ];
    for (method, url, token, body, status, name) in cases {
        let response = send(&server, method.clone(), url, token, body.clone()).await;
        let (error, _) = api_error(response, status).await;
        assert_eq!(
            error.error, name,
            "{method} {url} with {body:?}: {}",
            error.message
        );
    }
    // Nothing of the refused requests was recorded; a reader lists.
    assert_eq!(pins(&server, &reader, "team").await.pins, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_api_refusals_on_sqlite() {
    pin_api_refusals(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_api_refusals_on_postgres() {
    pin_api_refusals(Backend::Postgres).await;
}
