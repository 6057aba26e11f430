//! Attic's `/_api/v1/cache-config/{cache}`: creating, reading, changing
//! (each field under the permission it needs), re-keying and destroying a
//! cache, with the served signatures following the key.

use larder_api::v1::{CacheConfig, CacheQuota, QuotaPolicy, RetentionPeriodConfig, StorageUsage};
use larder_nix::{NarInfo, PublicKey, StoreDir};
use larder_token::Permission;
use reqwest::{Method, StatusCode};
use tests::nix::NixEnv;
use tests::server::TestServer;

use super::{
    api_error, fake_store_path, file_nar, get, ok_bytes, ok_json, plain_metadata, send, HOUR,
};

const CONFIG: &str = "/_api/v1/cache-config/team-cfg";

async fn patch(server: &TestServer, token: &str, body: serde_json::Value) -> reqwest::Response {
    send(server, Method::PATCH, CONFIG, Some(token), Some(body)).await
}

/// The narinfo of `hash` in `team-cfg`, and whether `key` signed it.
async fn narinfo_signed_by(server: &TestServer, token: &str, hash: &str, key: &str) -> bool {
    let text = ok_bytes(get(server, &format!("/team-cfg/{hash}.narinfo"), Some(token)).await).await;
    let text = String::from_utf8(text).expect("a text narinfo");
    let store_dir = StoreDir::default();
    let narinfo = NarInfo::parse(&text, &store_dir).expect("a narinfo");
    let key = PublicKey::parse(key).expect("a public key");
    narinfo.verify(&[key], &store_dir)
}

tests::under_each_nix! {
    #[tokio::test]
    async fn caches_are_created_read_changed_rekeyed_and_destroyed(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let creator = server
            .mint(
                "creator",
                HOUR,
                &[("team-*", &[Permission::CreateCache, Permission::Pull])],
            )
            .await;

        // Create: defaults filled in, a generated key named after the cache.
        let created: CacheConfig = ok_json(
            send(
                &server,
                Method::POST,
                CONFIG,
                Some(&creator),
                Some(serde_json::json!({"keypair": "Generate", "is_public": false, "priority": 45})),
            )
            .await,
        )
        .await;
        let first_key = created.public_key.clone().expect("a public key");
        assert!(first_key.starts_with("team-cfg-1:"), "{first_key}");
        assert_eq!(created.is_public, Some(false));
        assert_eq!(created.priority, Some(45));
        assert_eq!(created.store_dir.as_deref(), Some("/nix/store"));
        assert_eq!(
            created.retention_period,
            Some(RetentionPeriodConfig::Global)
        );
        assert_eq!(
            created.upstream_cache_key_names,
            Some(vec!["cache.nixos.org-1".to_owned()])
        );
        let host = server.address().to_string();
        assert_eq!(
            created.api_endpoint.as_deref(),
            Some(format!("http://{host}/").as_str())
        );
        assert_eq!(
            created.substituter_endpoint.as_deref(),
            Some(format!("http://{host}/team-cfg").as_str())
        );
        // A second create of the same name: 409, and the first cache stands.
        let (error, _) = api_error(
            send(
                &server,
                Method::POST,
                CONFIG,
                Some(&creator),
                Some(serde_json::json!({})),
            )
            .await,
            StatusCode::CONFLICT,
        )
        .await;
        assert_eq!(error.error, "CacheAlreadyExists");
        // Outside the pattern: forbidden, and nothing created.
        let (error, _) = api_error(
            send(
                &server,
                Method::POST,
                "/_api/v1/cache-config/other",
                Some(&creator),
                Some(serde_json::json!({})),
            )
            .await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert_eq!(error.error, "Forbidden");

        // GET returns the same; the public key verifies what is served.
        let read: CacheConfig = ok_json(get(&server, CONFIG, Some(&creator)).await).await;
        assert_eq!(read, created);
        let seeded = server
            .seed_path(
                "team-cfg",
                plain_metadata(&fake_store_path("signed")),
                &file_nar(b"signed"),
            )
            .await;
        let hash = seeded.store_path_hash.to_string();
        assert!(narinfo_signed_by(&server, &creator, &hash, &first_key).await);
        let info = String::from_utf8(
            ok_bytes(get(&server, "/team-cfg/nix-cache-info", Some(&creator)).await).await,
        )
        .expect("text");
        assert!(info.contains("Priority: 45\n"), "{info}");

        // configure_cache alone: every field but the retention period.
        let configurer = server
            .mint(
                "configurer",
                HOUR,
                &[("team-cfg", &[Permission::ConfigureCache])],
            )
            .await;
        let changed: CacheConfig = ok_json(
            patch(
                &server,
                &configurer,
                serde_json::json!({
                    "is_public": true,
                    "priority": 30,
                    "upstream_cache_key_names": ["upstream-1", "other-2"],
                    "store_dir": "/nix/store",
                }),
            )
            .await,
        )
        .await;
        assert_eq!(changed.is_public, Some(true));
        assert_eq!(changed.priority, Some(30));
        assert_eq!(
            changed.upstream_cache_key_names,
            Some(vec!["upstream-1".to_owned(), "other-2".to_owned()])
        );
        assert_eq!(changed.public_key.as_deref(), Some(first_key.as_str()));
        // Public now: anonymous callers read it.
        let info =
            String::from_utf8(ok_bytes(get(&server, "/team-cfg/nix-cache-info", None).await).await)
                .expect("text");
        assert!(info.contains("Priority: 30\n"), "{info}");
        let (error, _) = api_error(
            patch(
                &server,
                &configurer,
                serde_json::json!({"retention_period": {"Period": 3600}}),
            )
            .await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(
            error.message.contains("configure_cache_retention"),
            "{}",
            error.message
        );
        // Both at once need both.
        api_error(
            patch(
                &server,
                &configurer,
                serde_json::json!({"is_public": false, "retention_period": "Global"}),
            )
            .await,
            StatusCode::FORBIDDEN,
        )
        .await;

        // configure_cache_retention alone: the retention period only.
        let retainer = server
            .mint(
                "retainer",
                HOUR,
                &[("team-cfg", &[Permission::ConfigureCacheRetention])],
            )
            .await;
        let changed: CacheConfig = ok_json(
            patch(
                &server,
                &retainer,
                serde_json::json!({"retention_period": {"Period": 86400}}),
            )
            .await,
        )
        .await;
        assert_eq!(
            changed.retention_period,
            Some(RetentionPeriodConfig::Period(86400))
        );
        assert_eq!(
            changed.is_public,
            Some(true),
            "the retention change changed nothing else"
        );
        for body in [
            serde_json::json!({"is_public": false}),
            serde_json::json!({"priority": 1}),
            serde_json::json!({"keypair": "Generate"}),
            serde_json::json!({"key_rotation": "Start"}),
            serde_json::json!({}),
        ] {
            let (error, _) = api_error(
                patch(&server, &retainer, body.clone()).await,
                StatusCode::FORBIDDEN,
            )
            .await;
            assert_eq!(error.error, "Forbidden", "{body}");
        }
        let changed: CacheConfig = ok_json(
            patch(
                &server,
                &retainer,
                serde_json::json!({"retention_period": "Global"}),
            )
            .await,
        )
        .await;
        assert_eq!(
            changed.retention_period,
            Some(RetentionPeriodConfig::Global)
        );

        // Regenerating the key: a new key name and key, and the served
        // signatures follow it.
        let rekeyed: CacheConfig = ok_json(
            patch(
                &server,
                &configurer,
                serde_json::json!({"keypair": "Generate"}),
            )
            .await,
        )
        .await;
        let second_key = rekeyed.public_key.clone().expect("a public key");
        assert!(second_key.starts_with("team-cfg-2:"), "{second_key}");
        assert_ne!(second_key, first_key);
        assert!(narinfo_signed_by(&server, &creator, &hash, &second_key).await);
        assert!(!narinfo_signed_by(&server, &creator, &hash, &first_key).await);

        // Importing a key made by `nix key generate-secret`.
        let nix_key = tokio::task::spawn_blocking(move || {
            NixEnv::with_version(version)
                .expect("a Nix environment")
                .keygen("imported-1")
                .expect("nix key generate-secret")
        })
        .await
        .expect("the Nix step");
        let imported: CacheConfig = ok_json(
            patch(
                &server,
                &configurer,
                serde_json::json!({"keypair": {"Keypair": nix_key.secret_key}}),
            )
            .await,
        )
        .await;
        assert_eq!(
            imported.public_key.as_deref(),
            Some(nix_key.public_key.as_str())
        );
        assert!(narinfo_signed_by(&server, &creator, &hash, &nix_key.public_key).await);
        assert!(!narinfo_signed_by(&server, &creator, &hash, &second_key).await);
        // The secret never comes back.
        let read = String::from_utf8(ok_bytes(get(&server, CONFIG, Some(&creator)).await).await)
            .expect("text");
        let secret_part = nix_key.secret_key.split_once(':').expect("name:key").1;
        assert!(!read.contains(secret_part), "{read}");

        // Destroying needs destroy_cache; it removes the cache and its paths.
        let (error, _) = api_error(
            send(&server, Method::DELETE, CONFIG, Some(&configurer), None).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(error.message.contains("destroy_cache"), "{}", error.message);
        let destroyer = server
            .mint(
                "destroyer",
                HOUR,
                &[("team-cfg", &[Permission::DestroyCache, Permission::Pull])],
            )
            .await;
        let cache_id = server
            .database()
            .cache_by_name(&"team-cfg".parse().expect("a cache name"))
            .await
            .expect("looking up")
            .expect("the cache")
            .id;
        let response = send(&server, Method::DELETE, CONFIG, Some(&destroyer), None).await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(server
            .database()
            .cache_by_name(&"team-cfg".parse().expect("a cache name"))
            .await
            .expect("looking up")
            .is_none());
        assert!(server
            .database()
            .objects_of_cache(cache_id)
            .await
            .expect("listing objects")
            .is_empty());
        for path in [
            CONFIG.to_owned(),
            format!("/team-cfg/{hash}.narinfo"),
            format!("/team-cfg/{}", seeded.nar_url()),
        ] {
            let (error, _) = api_error(
                get(&server, &path, Some(&destroyer)).await,
                StatusCode::NOT_FOUND,
            )
            .await;
            assert_eq!(error.error, "NoSuchCache", "{path}");
        }
        // Destroying again: the cache is gone.
        let (error, _) = api_error(
            send(&server, Method::DELETE, CONFIG, Some(&destroyer), None).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        assert_eq!(error.error, "NoSuchCache");
        // The name is free again.
        ok_json::<CacheConfig>(
            send(
                &server,
                Method::POST,
                CONFIG,
                Some(&creator),
                Some(serde_json::json!({})),
            )
            .await,
        )
        .await;
    }
}

/// With `api-endpoint` set (a server behind a reverse proxy), cache
/// answers name that endpoint, not the address the request came to.
#[tokio::test]
async fn the_configured_api_endpoint_is_what_clients_are_told() {
    let server = TestServer::start(tests::server::TestServerOptions {
        api_endpoint: Some("https://cache.example.org/larder".to_owned()),
        ..Default::default()
    })
    .await;
    let token = server.root_token().await;
    let created: CacheConfig = ok_json(
        send(
            &server,
            Method::POST,
            "/_api/v1/cache-config/proxied",
            Some(&token),
            Some(serde_json::json!({})),
        )
        .await,
    )
    .await;
    assert_eq!(
        created.api_endpoint.as_deref(),
        Some("https://cache.example.org/larder/")
    );
    assert_eq!(
        created.substituter_endpoint.as_deref(),
        Some("https://cache.example.org/larder/proxied")
    );
}

/// A cache's store directory is part of every narinfo it serves (the
/// paths and the signed fingerprints are in it): it can change while the
/// cache is empty, but not under paths pushed for another directory.
#[tokio::test]
async fn the_store_directory_cannot_change_under_existing_paths() {
    let server = TestServer::sqlite().await;
    let token = server.root_token().await;
    server.create_cache("team-cfg", true).await;
    let seeded = server
        .seed_path(
            "team-cfg",
            plain_metadata(&fake_store_path("kept")),
            &file_nar(b"kept"),
        )
        .await;
    let narinfo = format!("/team-cfg/{}.narinfo", seeded.store_path_hash);

    let (error, _) = api_error(
        patch(
            &server,
            &token,
            serde_json::json!({"store_dir": "/gnu/store"}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(error.error, "Conflict");
    assert!(error.message.contains("/gnu/store"), "{}", error.message);
    // Nothing changed, and the paths are still served.
    let read: CacheConfig = ok_json(get(&server, CONFIG, Some(&token)).await).await;
    assert_eq!(read.store_dir.as_deref(), Some("/nix/store"));
    let text = String::from_utf8(ok_bytes(get(&server, &narinfo, None).await).await).expect("text");
    assert!(text.starts_with("StorePath: /nix/store/"), "{text}");
    // Naming the current directory is no change.
    ok_json::<CacheConfig>(
        patch(
            &server,
            &token,
            serde_json::json!({"store_dir": "/nix/store"}),
        )
        .await,
    )
    .await;

    // An empty cache may move.
    let created: CacheConfig = ok_json(
        send(
            &server,
            Method::POST,
            "/_api/v1/cache-config/empty",
            Some(&token),
            Some(serde_json::json!({})),
        )
        .await,
    )
    .await;
    assert_eq!(created.store_dir.as_deref(), Some("/nix/store"));
    let moved: CacheConfig = ok_json(
        send(
            &server,
            Method::PATCH,
            "/_api/v1/cache-config/empty",
            Some(&token),
            Some(serde_json::json!({"store_dir": "/gnu/store"})),
        )
        .await,
    )
    .await;
    assert_eq!(moved.store_dir.as_deref(), Some("/gnu/store"));
    let info = String::from_utf8(
        ok_bytes(get(&server, "/empty/nix-cache-info", Some(&token)).await).await,
    )
    .expect("text");
    assert!(info.starts_with("StoreDir: /gnu/store\n"), "{info}");
}

/// `nix-cache-info` carries the priority as Nix reads it (lower wins);
/// what the API accepts is exactly what the cache then advertises.
#[tokio::test]
async fn priorities_are_served_as_set_and_negative_ones_refused() {
    let server = TestServer::sqlite().await;
    let token = server.root_token().await;
    for priority in [-1, -40, i32::MIN] {
        let (error, _) = api_error(
            send(
                &server,
                Method::POST,
                CONFIG,
                Some(&token),
                Some(serde_json::json!({"priority": priority})),
            )
            .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(error.message.contains("priority"), "{}", error.message);
    }
    ok_json::<CacheConfig>(
        send(
            &server,
            Method::POST,
            CONFIG,
            Some(&token),
            Some(serde_json::json!({"priority": 0})),
        )
        .await,
    )
    .await;
    let (error, _) = api_error(
        patch(&server, &token, serde_json::json!({"priority": -5})).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(error.message.contains("priority"), "{}", error.message);
    for priority in [0, 10, 100] {
        let changed: CacheConfig =
            ok_json(patch(&server, &token, serde_json::json!({"priority": priority})).await).await;
        assert_eq!(changed.priority, Some(priority));
        let info = String::from_utf8(
            ok_bytes(get(&server, "/team-cfg/nix-cache-info", Some(&token)).await).await,
        )
        .expect("text");
        assert!(info.contains(&format!("Priority: {priority}\n")), "{info}");
    }
}

/// Storage quotas: set and reset only with `configure_cache_quota` (on
/// creation too), the policy with `configure_cache`; shown with the usage
/// to callers whose token grants something on the cache, not to anonymous
/// readers of a public cache; the server's default applies to caches that
/// set none; bad values are 400s.
#[tokio::test]
async fn storage_quotas_are_the_operators_and_usage_is_shown_to_tenants() {
    let server = TestServer::start(tests::server::TestServerOptions {
        edit_config: Some(std::sync::Arc::new(|config| {
            config.quota.default_cache_quota = Some(larder_api::byte_size::ByteSize::new(1 << 30));
        })),
        ..Default::default()
    })
    .await;
    let creator = server
        .mint(
            "creator",
            HOUR,
            &[(
                "team-*",
                &[Permission::CreateCache, Permission::ConfigureCache],
            )],
        )
        .await;
    let operator = server
        .mint(
            "operator",
            HOUR,
            &[(
                "*",
                &[Permission::CreateCache, Permission::ConfigureCacheQuota],
            )],
        )
        .await;

    // Creating with a quota needs the quota permission; the policy does not.
    let (error, _) = api_error(
        send(
            &server,
            Method::POST,
            CONFIG,
            Some(&creator),
            Some(serde_json::json!({"storage_quota": {"Bytes": 1000}})),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(
        error.message.contains("configure_cache_quota"),
        "{}",
        error.message
    );
    let created: CacheConfig = ok_json(
        send(
            &server,
            Method::POST,
            CONFIG,
            Some(&creator),
            Some(serde_json::json!({"quota_policy": "EvictLru", "is_public": true})),
        )
        .await,
    )
    .await;
    assert_eq!(created.storage_quota, Some(CacheQuota::Global));
    assert_eq!(created.quota_policy, Some(QuotaPolicy::EvictLru));
    assert_eq!(
        created.storage_usage,
        Some(StorageUsage {
            quota_bytes: Some(1 << 30),
            used_bytes: 0,
            paths_bytes: 0,
            pending_bytes: 0,
        }),
        "the server's default applies"
    );
    let with_quota: CacheConfig = ok_json(
        send(
            &server,
            Method::POST,
            "/_api/v1/cache-config/team-capped",
            Some(&operator),
            Some(serde_json::json!({"storage_quota": {"Bytes": 5000}})),
        )
        .await,
    )
    .await;
    assert_eq!(with_quota.storage_quota, Some(CacheQuota::Bytes(5000)));

    // Usage follows what the cache holds; anonymous readers of the public
    // cache see Attic's fields only.
    let nar = file_nar(b"counted");
    server
        .seed_path(
            "team-cfg",
            plain_metadata(&fake_store_path("counted")),
            &nar,
        )
        .await;
    let read: CacheConfig = ok_json(get(&server, CONFIG, Some(&creator)).await).await;
    let usage = read.storage_usage.expect("usage");
    assert_eq!(usage.used_bytes, nar.len() as u64);
    assert_eq!(usage.paths_bytes, nar.len() as u64);
    let anonymous: CacheConfig = ok_json(get(&server, CONFIG, None).await).await;
    assert!(anonymous.public_key.is_some());
    assert_eq!(
        (
            anonymous.storage_quota,
            anonymous.quota_policy,
            anonymous.storage_usage
        ),
        (None, None, None)
    );

    // The tenant cannot set its quota; the operator can, and can reset it.
    let (error, _) = api_error(
        patch(
            &server,
            &creator,
            serde_json::json!({"storage_quota": "Unlimited"}),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(
        error.message.contains("configure_cache_quota"),
        "{}",
        error.message
    );
    for (quota, effective) in [
        (CacheQuota::Bytes(12_345), Some(12_345)),
        (CacheQuota::Unlimited, None),
        (CacheQuota::Global, Some(1 << 30)),
    ] {
        let changed: CacheConfig = ok_json(
            patch(
                &server,
                &operator,
                serde_json::json!({"storage_quota": quota}),
            )
            .await,
        )
        .await;
        assert_eq!(changed.storage_quota, Some(quota));
        assert_eq!(
            changed.storage_usage.map(|usage| usage.quota_bytes),
            Some(effective)
        );
    }
    // The policy is a configuration setting, which the operator's token
    // does not grant here.
    let (error, _) = api_error(
        patch(
            &server,
            &operator,
            serde_json::json!({"quota_policy": "Refuse"}),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(
        error.message.contains("configure_cache"),
        "{}",
        error.message
    );
    let changed: CacheConfig = ok_json(
        patch(
            &server,
            &creator,
            serde_json::json!({"quota_policy": "Refuse"}),
        )
        .await,
    )
    .await;
    assert_eq!(changed.quota_policy, Some(QuotaPolicy::Refuse));

    // Bad values are 400s, and change nothing.
    for bad in [
        serde_json::json!({"storage_quota": {"Bytes": u64::MAX}}),
        serde_json::json!({"storage_quota": {"Bytes": -1}}),
        serde_json::json!({"storage_quota": "Lots"}),
        serde_json::json!({"storage_quota": "50 GiB"}),
        serde_json::json!({"quota_policy": "Sometimes"}),
    ] {
        api_error(
            patch(&server, &operator, bad.clone()).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    let read: CacheConfig = ok_json(get(&server, CONFIG, Some(&creator)).await).await;
    assert_eq!(read.storage_quota, Some(CacheQuota::Global));
    assert_eq!(read.quota_policy, Some(QuotaPolicy::Refuse));
}
