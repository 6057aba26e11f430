//! Tenants kept apart: a token for cache A can neither read, configure nor
//! destroy cache B, nor tell a private B from a missing one (status and
//! body are identical); A's NAR is not downloadable under B's name even
//! when B is public, and A's paths are not B's.

use larder_db::Backend;
use larder_token::Permission;
use reqwest::{Method, StatusCode};
use tests::server::TestServer;

use super::{api_error, fake_store_path, file_nar, get, ok_bytes, plain_metadata, send, HOUR};

/// Every request a token holder could make about a cache named `cache`:
/// method, path and body.
fn probes(
    cache: &str,
    hash: &str,
    nar_url: &str,
) -> Vec<(Method, String, Option<serde_json::Value>)> {
    let config = format!("/_api/v1/cache-config/{cache}");
    vec![
        (Method::GET, format!("/{cache}/nix-cache-info"), None),
        (Method::GET, format!("/{cache}/{hash}.narinfo"), None),
        (Method::HEAD, format!("/{cache}/{hash}.narinfo"), None),
        (Method::GET, format!("/{cache}/{hash}.ls"), None),
        (Method::GET, format!("/{cache}/{nar_url}"), None),
        (Method::GET, config.clone(), None),
        (
            Method::PATCH,
            config.clone(),
            Some(serde_json::json!({"is_public": true})),
        ),
        (
            Method::PATCH,
            config.clone(),
            Some(serde_json::json!({"retention_period": "Global"})),
        ),
        (Method::PATCH, config.clone(), Some(serde_json::json!({}))),
        (
            Method::PATCH,
            config.clone(),
            Some(serde_json::json!({"keypair": "Generate"})),
        ),
        (Method::DELETE, config, None),
    ]
}

/// Status and body of a probe, for comparing answers byte for byte.
async fn answer(
    server: &TestServer,
    probe: &(Method, String, Option<serde_json::Value>),
    token: Option<&str>,
) -> (StatusCode, Vec<u8>) {
    let (method, path, body) = probe;
    let response = send(server, method.clone(), path, token, body.clone()).await;
    let status = response.status();
    (status, response.bytes().await.expect("the body").to_vec())
}

async fn a_token_for_one_cache_learns_nothing_of_another(backend: Backend) {
    let server = TestServer::on(backend).await;
    server.create_cache("tenant-a", false).await;
    let b = server.create_cache("tenant-b", false).await;
    let in_b = server
        .seed_path(
            "tenant-b",
            plain_metadata(&fake_store_path("b-secret")),
            &file_nar(b"b"),
        )
        .await;
    let in_a = server
        .seed_path(
            "tenant-a",
            plain_metadata(&fake_store_path("a-own")),
            &file_nar(b"a"),
        )
        .await;
    let hash = in_b.store_path_hash.to_string();
    let nar_url = in_b.nar_url();
    // Every permission, but only on A (and on a name B is not).
    let token = server
        .mint(
            "tenant-a",
            HOUR,
            &[
                ("tenant-a", &Permission::ALL),
                ("tenant-a-*", &Permission::ALL),
            ],
        )
        .await;
    ok_bytes(
        get(
            &server,
            &format!("/tenant-a/{}.narinfo", in_a.store_path_hash),
            Some(&token),
        )
        .await,
    )
    .await;

    for (existing, missing) in probes("tenant-b", &hash, &nar_url).into_iter().zip(probes(
        "no-such-tenant",
        &hash,
        &nar_url,
    )) {
        let (method, path, _) = &existing;
        let with_token = answer(&server, &existing, Some(&token)).await;
        assert_eq!(
            with_token,
            answer(&server, &missing, Some(&token)).await,
            "{method} {path}: a token holder tells B from a missing cache"
        );
        assert_eq!(with_token.0, StatusCode::NOT_FOUND, "{method} {path}");
        if *method != Method::HEAD {
            let error: larder_api::v1::ErrorResponse =
                serde_json::from_slice(&with_token.1).expect("an error body");
            assert_eq!(error.error, "NoSuchCache", "{method} {path}");
        }
        let anonymous = answer(&server, &existing, None).await;
        assert_eq!(
            anonymous,
            answer(&server, &missing, None).await,
            "{method} {path}: an anonymous caller tells B from a missing cache"
        );
        assert_eq!(anonymous.0, StatusCode::UNAUTHORIZED, "{method} {path}");
    }

    // B is untouched: still private, same key, its path still there.
    let after = server
        .database()
        .cache_by_name(&b.name)
        .await
        .expect("looking up B")
        .expect("B still exists");
    assert_eq!(after, b);
    assert_eq!(
        server
            .database()
            .objects_of_cache(b.id)
            .await
            .expect("B's objects")
            .len(),
        1
    );
}

#[tokio::test]
async fn sqlite_a_token_for_one_cache_learns_nothing_of_another() {
    a_token_for_one_cache_learns_nothing_of_another(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_token_for_one_cache_learns_nothing_of_another() {
    a_token_for_one_cache_learns_nothing_of_another(Backend::Postgres).await;
}

/// A's NAR and narinfo asked for under B, with B public and a token that
/// may pull both: 404, exactly as for a NAR hash nobody has; the same NAR
/// pushed to B as well becomes downloadable there.
#[tokio::test]
async fn a_nar_of_one_cache_is_not_served_under_another() {
    let server = TestServer::sqlite().await;
    server.create_cache("tenant-a", false).await;
    server.create_cache("tenant-b", true).await;
    let a_nar = file_nar(b"only in A");
    let a_path = fake_store_path("only-in-a");
    let in_a = server
        .seed_path("tenant-a", plain_metadata(&a_path), &a_nar)
        .await;
    server
        .seed_path(
            "tenant-b",
            plain_metadata(&fake_store_path("b")),
            &file_nar(b"B"),
        )
        .await;
    let a_token = server
        .mint("a", HOUR, &[("tenant-a", &[Permission::Pull])])
        .await;
    let both_token = server
        .mint("both", HOUR, &[("tenant-*", &[Permission::Pull])])
        .await;
    ok_bytes(
        get(
            &server,
            &format!("/tenant-a/{}", in_a.nar_url()),
            Some(&a_token),
        )
        .await,
    )
    .await;

    let unknown_nar = format!(
        "/tenant-b/nar/{}.nar.zst",
        larder_nix::Sha256Hash::digest(b"no such NAR").to_base32()
    );
    let a_nar_under_b = format!("/tenant-b/{}", in_a.nar_url());
    let unknown_narinfo = format!("/tenant-b/{}.narinfo", "3".repeat(32));
    let a_narinfo_under_b = format!("/tenant-b/{}.narinfo", in_a.store_path_hash);
    let a_listing_under_b = format!("/tenant-b/{}.ls", in_a.store_path_hash);
    for token in [None, Some(a_token.as_str()), Some(both_token.as_str())] {
        let (nar_error, nar_body) = api_error(
            get(&server, &a_nar_under_b, token).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        assert_eq!(nar_error.error, "NoSuchPath");
        let (_, unknown_body) = api_error(
            get(&server, &unknown_nar, token).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        assert_eq!(
            nar_body, unknown_body,
            "A's NAR under B looks like no NAR at all"
        );
        for path in [&a_narinfo_under_b, &a_listing_under_b] {
            let (_, body) = api_error(get(&server, path, token).await, StatusCode::NOT_FOUND).await;
            let (_, unknown) = api_error(
                get(&server, &unknown_narinfo, token).await,
                StatusCode::NOT_FOUND,
            )
            .await;
            assert_eq!(body, unknown, "{path}");
        }
    }

    // Once B has a path with the same NAR, B serves it: the NAR is
    // global, access to it goes through the cache's own objects.
    server
        .seed_path(
            "tenant-b",
            plain_metadata(&fake_store_path("same-bytes")),
            &a_nar,
        )
        .await;
    let served = ok_bytes(get(&server, &a_nar_under_b, None).await).await;
    assert_eq!(
        zstd::stream::decode_all(served.as_slice()).expect("zstd"),
        a_nar
    );
    // The path itself is still A's alone.
    api_error(
        get(&server, &a_narinfo_under_b, None).await,
        StatusCode::NOT_FOUND,
    )
    .await;
}
