//! The audit log and purges (`/_api/v1/audit`, `/_api/v1/purge`): every
//! push, deletion, cache change and token change recorded with who did it;
//! a purge removes exactly what one subject or one token pushed, and its
//! dry run lists the same paths; events go after `audit-retention`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use larder_api::duration::HumanDuration;
use larder_api::v1::{AuditEvent, AuditPage, MintTokenResponse, PurgeResponse};
use larder_config::GcConfig;
use larder_db::{Backend, Timestamp};
use larder_token::Permission;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tests::server::{pseudo_random, TestServer};

use super::push::{hash_of, push_visible};
use super::{api_error, fake_store_path, file_nar, get, ok_json, send, HOUR};

/// Every event of a cache's log (or the server's, with `cache` `None`),
/// newest first, read a page of two at a time.
async fn all_events(server: &TestServer, token: &str, cache: Option<&str>) -> Vec<AuditEvent> {
    let base = match cache {
        Some(cache) => format!("/_api/v1/audit/{cache}?limit=2"),
        None => "/_api/v1/audit?limit=2".to_owned(),
    };
    let mut events = Vec::new();
    let mut path = base.clone();
    loop {
        let page: AuditPage = ok_json(get(server, &path, Some(token)).await).await;
        assert!(page.events.len() <= 2);
        events.extend(page.events);
        match page.next_before {
            Some(before) => path = format!("{base}&before={before}"),
            None => return events,
        }
    }
}

/// `(action, subject)` of each event, newest first.
fn summary(events: &[AuditEvent]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .map(|event| (event.action.clone(), event.subject.clone()))
        .collect()
}

async fn every_change_is_recorded(backend: Backend) {
    let server = TestServer::on(backend).await;
    let owner = server
        .mint_token(
            "owner",
            HOUR,
            &[("owned", &Permission::ALL), ("gone", &Permission::ALL)],
        )
        .await;
    let pusher = server
        .mint_token("ci", HOUR, &[("owned", &[Permission::Push])])
        .await;
    let root = server.root_token().await;

    for cache in ["owned", "gone"] {
        let response = send(
            &server,
            Method::POST,
            &format!("/_api/v1/cache-config/{cache}"),
            Some(&owner.token),
            Some(json!({"keypair": "Generate", "is_public": false})),
        )
        .await;
        ok_json::<serde_json::Value>(response).await;
    }
    let response = send(
        &server,
        Method::PATCH,
        "/_api/v1/cache-config/owned",
        Some(&owner.token),
        Some(json!({"priority": 30, "key_rotation": "Start"})),
    )
    .await;
    ok_json::<serde_json::Value>(response).await;
    let first = file_nar(b"first");
    let first_path = fake_store_path("first");
    let second_path = fake_store_path("second");
    push_visible(&server, &pusher.token, "owned", &first_path, &first).await;
    push_visible(
        &server,
        &pusher.token,
        "owned",
        &second_path,
        &file_nar(b"second"),
    )
    .await;
    let response = send(
        &server,
        Method::POST,
        "/_api/v1/delete-paths",
        Some(&owner.token),
        Some(json!({"cache": "owned", "store_path_hashes": [hash_of(&first_path)]})),
    )
    .await;
    ok_json::<serde_json::Value>(response).await;
    let pin = json!({"name": "release", "store_path_hash": hash_of(&second_path)});
    let response = send(
        &server,
        Method::POST,
        "/_api/v1/pins/owned",
        Some(&owner.token),
        Some(pin),
    )
    .await;
    ok_json::<serde_json::Value>(response).await;
    let path = "/_api/v1/pins/owned/release";
    let response = send(&server, Method::DELETE, path, Some(&owner.token), None).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = send(
        &server,
        Method::DELETE,
        "/_api/v1/cache-config/gone",
        Some(&owner.token),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = send(
        &server,
        Method::POST,
        "/_api/v1/tokens",
        Some(&root),
        Some(json!({"subject": "new", "valid_for_secs": 60, "caches": {"owned": ["pull"]}})),
    )
    .await;
    let minted: MintTokenResponse = ok_json(response).await;
    let path = format!("/_api/v1/tokens/{}", minted.info.jti);
    ok_json::<serde_json::Value>(send(&server, Method::DELETE, &path, Some(&root), None).await)
        .await;

    let events = all_events(&server, &owner.token, Some("owned")).await;
    let owner_name = Some("owner".to_owned());
    let ci = Some("ci".to_owned());
    assert_eq!(
        summary(&events),
        [
            ("pin-delete".to_owned(), owner_name.clone()),
            ("pin-create".to_owned(), owner_name.clone()),
            ("delete".to_owned(), owner_name.clone()),
            ("push".to_owned(), ci.clone()),
            ("push".to_owned(), ci.clone()),
            ("cache-configure".to_owned(), owner_name.clone()),
            ("cache-create".to_owned(), owner_name.clone()),
        ]
    );
    // Who is the token, not only its subject; what is the path or change.
    assert_eq!(events[3].jti.as_deref(), Some(pusher.claims.jti.as_str()));
    assert_eq!(events[2].jti.as_deref(), Some(owner.claims.jti.as_str()));
    assert_eq!(events[4].detail["store_path"], first_path);
    assert_eq!(events[2].detail["store_path_hash"], hash_of(&first_path));
    assert_eq!(events[4].detail["nar_size"], first.len());
    assert_eq!(events[5].detail["changes"]["priority"], 30);
    assert_eq!(events[5].detail["changes"]["key_rotation"], "Start");
    assert_eq!(events[5].detail["next_key"], "owned-2");
    assert_eq!(events[1].detail["pin"], "release");
    assert_eq!(events[1].detail["store_path"], second_path);
    assert!(events
        .iter()
        .all(|event| event.cache.as_deref() == Some("owned")));
    let now = Timestamp::now().unix_millis();
    assert!(events
        .windows(2)
        .all(|pair| pair[0].id > pair[1].id && pair[0].at >= pair[1].at));
    assert!(events
        .iter()
        .all(|event| event.at <= now && event.at > now - 600_000));

    // The operator's log also has the destroyed cache and the tokens.
    let everything = all_events(&server, &root, None).await;
    let actions = everything
        .iter()
        .map(|event| (event.action.as_str(), event.cache.as_deref()))
        .collect::<BTreeSet<_>>();
    for expected in [
        ("token-revoke", None),
        ("token-mint", None),
        ("cache-destroy", Some("gone")),
        ("cache-create", Some("gone")),
    ] {
        assert!(actions.contains(&expected), "{expected:?} in {actions:?}");
    }
    let minted_event = everything
        .iter()
        .find(|event| event.action == "token-mint")
        .expect("the mint");
    assert_eq!(minted_event.detail["token"], minted.info.jti);

    // Who may read it.
    for (path, token, status) in [
        (
            "/_api/v1/audit/owned",
            Some(pusher.token.as_str()),
            StatusCode::FORBIDDEN,
        ),
        ("/_api/v1/audit/owned", None, StatusCode::UNAUTHORIZED),
        (
            "/_api/v1/audit",
            Some(owner.token.as_str()),
            StatusCode::FORBIDDEN,
        ),
        (
            "/_api/v1/audit/owned?limit=0",
            Some(owner.token.as_str()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/_api/v1/audit/owned?limit=1001",
            Some(owner.token.as_str()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/_api/v1/audit/owned?before=x",
            Some(owner.token.as_str()),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        api_error(get(&server, path, token).await, status).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_recorded_on_sqlite() {
    every_change_is_recorded(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_recorded_on_postgres() {
    every_change_is_recorded(Backend::Postgres).await;
}

async fn purge(server: &TestServer, token: &str, body: serde_json::Value) -> PurgeResponse {
    ok_json(
        send(
            server,
            Method::POST,
            "/_api/v1/purge/shared",
            Some(token),
            Some(body),
        )
        .await,
    )
    .await
}

async fn served(server: &TestServer, token: &str, store_path: &str) -> bool {
    let path = format!("/shared/{}.narinfo", hash_of(store_path));
    let status = get(server, &path, Some(token)).await.status();
    assert!(
        status == StatusCode::OK || status == StatusCode::NOT_FOUND,
        "{status}"
    );
    status == StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_removes_exactly_what_a_subject_or_token_pushed() {
    let server = TestServer::sqlite().await;
    server.create_cache("shared", false).await;
    let push = &[Permission::Push];
    let alice_laptop = server.mint_token("alice", HOUR, &[("shared", push)]).await;
    let alice_ci = server.mint_token("alice", HOUR, &[("shared", push)]).await;
    let bob = server.mint_token("bob", HOUR, &[("shared", push)]).await;
    let owner = server
        .mint(
            "owner",
            HOUR,
            &[("shared", &[Permission::Pull, Permission::Delete])],
        )
        .await;
    let named: BTreeMap<&str, String> = ["a1", "a2", "a3", "b1"]
        .into_iter()
        .map(|name| (name, fake_store_path(name)))
        .collect();
    for (token, name) in [
        (&alice_laptop, "a1"),
        (&alice_laptop, "a2"),
        (&alice_ci, "a3"),
        (&bob, "b1"),
    ] {
        push_visible(
            &server,
            &token.token,
            "shared",
            &named[name],
            &file_nar(&pseudo_random(1000, 7)),
        )
        .await;
    }
    let paths = |names: &[&str]| {
        names
            .iter()
            .map(|name| named[name].clone())
            .collect::<Vec<_>>()
    };

    // Dry runs (the default) list and delete nothing.
    let listed = purge(&server, &owner, json!({"pushed_by": "alice"})).await;
    assert!(listed.dry_run);
    assert_eq!(listed.paths, paths(&["a1", "a2", "a3"]));
    let by_laptop = json!({"token": alice_laptop.claims.jti, "dry_run": true});
    let listed = purge(&server, &owner, by_laptop).await;
    assert_eq!(listed.paths, paths(&["a1", "a2"]));
    let in_future = larder_api::time::unix_seconds(std::time::SystemTime::now()) + 3600;
    let listed = purge(
        &server,
        &owner,
        json!({"pushed_by": "alice", "since": in_future}),
    )
    .await;
    assert!(listed.paths.is_empty());
    for name in ["a1", "a2", "a3", "b1"] {
        assert!(
            served(&server, &owner, &named[name]).await,
            "{name} before the purge"
        );
    }

    // The real purge deletes exactly what its dry run listed.
    let purged = purge(
        &server,
        &owner,
        json!({"token": alice_laptop.claims.jti, "dry_run": false}),
    )
    .await;
    assert!(!purged.dry_run);
    assert_eq!(purged.paths, paths(&["a1", "a2"]));
    for (name, kept) in [("a1", false), ("a2", false), ("a3", true), ("b1", true)] {
        assert_eq!(served(&server, &owner, &named[name]).await, kept, "{name}");
    }
    let purged = purge(
        &server,
        &owner,
        json!({"pushed_by": "alice", "dry_run": false}),
    )
    .await;
    assert_eq!(purged.paths, paths(&["a3"]));
    assert!(served(&server, &owner, &named["b1"]).await);

    for (body, token, status) in [
        (json!({}), owner.as_str(), StatusCode::BAD_REQUEST),
        (
            json!({"pushed_by": "a", "token": "b"}),
            owner.as_str(),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"pushed_by": "bob", "dry_run": "no"}),
            owner.as_str(),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"pushed_by": "bob"}),
            bob.token.as_str(),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let response = send(
            &server,
            Method::POST,
            "/_api/v1/purge/shared",
            Some(token),
            Some(body.clone()),
        )
        .await;
        api_error(response, status).await;
    }
    assert!(served(&server, &owner, &named["b1"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_after_the_audit_retention() {
    let server = TestServer::sqlite().await;
    server.create_cache("kept", false).await;
    let token = server
        .mint(
            "ci",
            HOUR,
            &[("kept", &[Permission::Push, Permission::ConfigureCache])],
        )
        .await;
    let one = fake_store_path("one");
    push_visible(&server, &token, "kept", &one, &file_nar(b"one")).await;
    assert_eq!(all_events(&server, &token, Some("kept")).await.len(), 1);

    let storage = larder_storage::open(&server.config().storage)
        .await
        .expect("the server's storage");
    let config = GcConfig {
        audit_retention: HumanDuration::from_secs(24 * 3600),
        ..GcConfig::default()
    };
    let run = |days: u64| {
        gc_scheduler::gc::collect_garbage(
            server.database(),
            &*storage,
            &config,
            Timestamp::now().saturating_add(Duration::from_secs(days * 24 * 3600)),
        )
    };
    assert_eq!(run(0).await.expect("a GC run").audit_events, 0);
    assert_eq!(all_events(&server, &token, Some("kept")).await.len(), 1);
    assert_eq!(run(2).await.expect("a GC run").audit_events, 1);
    assert!(all_events(&server, &token, Some("kept")).await.is_empty());
}
