//! Bad input, one kind per test: each is a 4xx with the JSON error body
//! (never a 500, never a hang), and the server goes on serving: every test
//! ends with a good request that succeeds.
//!
//! Paths an HTTP library would normalise (`..`, `%2f`) are sent raw.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use larder_token::Permission;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use tests::server::{expired_token, TestServer};

use super::{
    api_error, fake_store_path, file_nar, get, ok_bytes, plain_metadata, raw_api_error, send, HOUR,
};

/// A server with a private cache `main` holding one path, and a token
/// with every permission; returns the path's narinfo URL.
async fn server_with_a_path() -> (TestServer, String, String) {
    let server = TestServer::sqlite().await;
    server.create_cache("main", false).await;
    let seeded = server
        .seed_path(
            "main",
            plain_metadata(&fake_store_path("good")),
            &file_nar(b"good"),
        )
        .await;
    let token = server.root_token().await;
    (
        server,
        format!("/main/{}.narinfo", seeded.store_path_hash),
        token,
    )
}

/// The follow-up: the server still answers a good request.
async fn still_serving(server: &TestServer, narinfo: &str, token: &str) {
    let body = ok_bytes(get(server, narinfo, Some(token)).await).await;
    assert!(body.starts_with(b"StorePath: /nix/store/"));
}

/// A 400 for a raw request, with the error name `BadRequest`.
async fn raw_bad_request(server: &TestServer, method: &str, target: &str, token: &str) -> String {
    let auth = format!("Bearer {token}");
    let response = server
        .raw_request(method, target, &[("Authorization", &auth)], b"")
        .await;
    let error = raw_api_error(&response, 400);
    assert_eq!(error.error, "BadRequest", "{target}");
    error.message
}

#[tokio::test]
async fn malformed_store_path_hashes_are_400() {
    let (server, narinfo, token) = server_with_a_path().await;
    let valid_hash = &narinfo["/main/".len().."/main/".len() + 32];
    let bad_hashes = [
        "abc".to_owned(),
        // `e`, `o`, `u` and `t` are not in Nix's base-32 alphabet.
        format!("e{}", &valid_hash[1..]),
        format!("{valid_hash}0"),
        valid_hash[..31].to_owned(),
        valid_hash.to_uppercase(),
        "%00".repeat(32),
    ];
    for hash in &bad_hashes {
        for suffix in ["narinfo", "ls"] {
            // Existing cache, missing cache, with and without a token: the
            // hash is checked before anything is looked up.
            for cache in ["main", "no-such-cache"] {
                let target = format!("/{cache}/{hash}.{suffix}");
                raw_bad_request(&server, "GET", &target, &token).await;
                let anonymous = server.raw_request("GET", &target, &[], b"").await;
                assert_eq!(
                    raw_api_error(&anonymous, 400).error,
                    "BadRequest",
                    "{target}"
                );
            }
        }
    }
    let message = raw_bad_request(&server, "GET", "/main/abc.narinfo", &token).await;
    assert!(message.contains("abc"), "{message}");
    still_serving(&server, &narinfo, &token).await;
}

#[tokio::test]
async fn bad_cache_names_are_400() {
    let (server, narinfo, token) = server_with_a_path().await;
    let hash = &narinfo["/main/".len().."/main/".len() + 32];
    let too_long = "a".repeat(51);
    let names = [
        "_api",
        "_x",
        "..",
        ".",
        ".hidden",
        "-dash",
        too_long.as_str(),
        "a%20b",
        "a+b",
        "a@b",
        "a~b",
        "caf%C3%A9",
        "a%2fb",
        "a%00b",
        "*",
    ];
    for name in names {
        for target in [
            format!("/{name}/nix-cache-info"),
            format!("/{name}/{hash}.narinfo"),
            format!("/{name}/{hash}.ls"),
            format!("/{name}/nar/{}.nar.zst", "0".repeat(52)),
            format!("/_api/v1/cache-config/{name}"),
        ] {
            raw_bad_request(&server, "GET", &target, &token).await;
        }
        let target = format!("/_api/v1/cache-config/{name}");
        let body = br#"{"keypair":"Generate"}"#;
        let auth = format!("Bearer {token}");
        for method in ["POST", "PATCH"] {
            let response = server
                .raw_request(
                    method,
                    &target,
                    &[
                        ("Authorization", &auth),
                        ("Content-Type", "application/json"),
                    ],
                    body,
                )
                .await;
            assert_eq!(
                raw_api_error(&response, 400).error,
                "BadRequest",
                "{method} {target}"
            );
        }
        raw_bad_request(&server, "DELETE", &target, &token).await;
    }
    // No cache came into existence under any of those names.
    let names = server
        .database()
        .list_cache_names()
        .await
        .expect("listing caches");
    assert_eq!(names.len(), 1, "{names:?}");
    still_serving(&server, &narinfo, &token).await;
}

/// NAR names that try to climb out of `nar/`: a JSON error with the one
/// status right for each (400 `BadRequest` for a NAR name that is not one,
/// 404 `NoSuchEndpoint` for a path that is no route), and never a file of
/// the server's directory (its database, its config).
#[tokio::test]
async fn path_traversal_in_nar_urls_is_refused() {
    let (server, narinfo, token) = server_with_a_path().await;
    let auth = format!("Bearer {token}");
    for (target, status) in [
        ("/main/nar/..%2f..%2fserver.db", 400),
        ("/main/nar/..%2F..%2Fserver.toml", 400),
        ("/main/nar/%2e%2e%2f%2e%2e%2fserver.db", 400),
        ("/main/nar/..", 400),
        ("/main/nar/..%2f", 400),
        ("/main/nar/../x", 404),
        ("/main/nar/../../server.db", 404),
        ("/main/nar/%2e%2e/server.db", 404),
        ("/main/nar/storage%2fchunks", 400),
        ("/main/nar/..%5c..%5cserver.db", 400),
        ("/main/nar/x.nar.zst%00", 400),
        ("/main/nar/", 404),
    ] {
        for method in ["GET", "HEAD"] {
            let response = server
                .raw_request(method, target, &[("Authorization", &auth)], b"")
                .await;
            assert_eq!(
                response.status,
                status,
                "{method} {target}: {}",
                response.text()
            );
            if method == "GET" {
                let error = raw_api_error(&response, status);
                let name = if status == 400 {
                    "BadRequest"
                } else {
                    "NoSuchEndpoint"
                };
                assert_eq!(error.error, name, "{target}: {error:?}");
                assert!(!response.body.starts_with(b"SQLite format"), "{target}");
                assert!(!response.text().contains("hs256"), "{target}");
            }
        }
    }
    still_serving(&server, &narinfo, &token).await;
}

#[tokio::test]
async fn invalid_json_bodies_are_400() {
    let (server, narinfo, token) = server_with_a_path().await;
    for body in ["{not json", "", "{\"is_public\": true", "[]]", "\u{0}"] {
        for (method, cache) in [(Method::POST, "fresh"), (Method::PATCH, "main")] {
            let response = server
                .http()
                .request(
                    method.clone(),
                    server.url_of(&format!("/_api/v1/cache-config/{cache}")),
                )
                .header(AUTHORIZATION, format!("Bearer {token}"))
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .expect("sending");
            let (error, _) = api_error(response, StatusCode::BAD_REQUEST).await;
            assert_eq!(error.error, "BadRequest", "{method} {body:?}");
        }
    }
    // A JSON body without the JSON content type is refused too.
    let response = server
        .http()
        .post(server.url_of("/_api/v1/cache-config/fresh"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(r#"{"keypair":"Generate"}"#)
        .send()
        .await
        .expect("sending");
    api_error(response, StatusCode::BAD_REQUEST).await;
    assert!(server
        .database()
        .cache_by_name(&"fresh".parse().expect("a cache name"))
        .await
        .expect("looking up")
        .is_none());
    still_serving(&server, &narinfo, &token).await;
}

#[tokio::test]
async fn json_of_the_wrong_types_is_400() {
    let (server, narinfo, token) = server_with_a_path().await;
    let bodies = [
        serde_json::json!({"is_public": "yes"}),
        serde_json::json!({"priority": "high"}),
        serde_json::json!({"priority": 1.5}),
        serde_json::json!({"priority": 99_999_999_999_i64}),
        serde_json::json!({"keypair": 42}),
        serde_json::json!({"keypair": "Regenerate"}),
        serde_json::json!({"keypair": {"Keypair": "not-a-key"}}),
        serde_json::json!({"upstream_cache_key_names": "cache.nixos.org-1"}),
        serde_json::json!({"upstream_cache_key_names": ["has space"]}),
        serde_json::json!({"store_dir": "relative/store"}),
        serde_json::json!({"store_dir": 7}),
        serde_json::json!([1, 2, 3]),
        serde_json::json!("Generate"),
    ];
    // Creating a cache takes no retention period (a field it does not
    // know is ignored, as Attic's clients expect); changing one does.
    let patch_only = [
        serde_json::json!({"retention_period": {"Period": -5}}),
        serde_json::json!({"retention_period": "Forever"}),
        serde_json::json!({"retention_period": {"Period": "1 day"}}),
        serde_json::json!({"key_rotation": "Rotate"}),
        serde_json::json!({"key_rotation": true}),
    ];
    let cases = bodies
        .iter()
        .flat_map(|body| [(Method::POST, "fresh", body), (Method::PATCH, "main", body)])
        .chain(patch_only.iter().map(|body| (Method::PATCH, "main", body)));
    for (method, cache, body) in cases {
        {
            let response = send(
                &server,
                method.clone(),
                &format!("/_api/v1/cache-config/{cache}"),
                Some(&token),
                Some(body.clone()),
            )
            .await;
            let (error, _) = api_error(response, StatusCode::BAD_REQUEST).await;
            assert_eq!(error.error, "BadRequest", "{method} {body}");
        }
    }
    assert_eq!(
        server
            .database()
            .list_cache_names()
            .await
            .expect("listing caches")
            .len(),
        1
    );
    still_serving(&server, &narinfo, &token).await;
}

/// `{"alg":"none"}` with no signature, also naming an algorithm in odd
/// case: refused before any signature is looked at.
#[tokio::test]
async fn alg_none_tokens_are_401() {
    let (server, narinfo, token) = server_with_a_path().await;
    let payload = token.split('.').nth(1).expect("a payload part").to_owned();
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None","typ":"JWT"}"#,
        r#"{"alg":"NONE"}"#,
        r#"{"typ":"JWT"}"#,
    ] {
        let header = URL_SAFE_NO_PAD.encode(header);
        for forged in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            let (error, _) = api_error(
                get(&server, &narinfo, Some(&forged)).await,
                StatusCode::UNAUTHORIZED,
            )
            .await;
            assert_eq!(error.error, "Unauthorized", "{forged}");
        }
    }
    still_serving(&server, &narinfo, &token).await;
}

/// The payload of a genuine token changed (more caches, another subject,
/// a later expiry) under its original signature.
#[tokio::test]
async fn tampered_tokens_are_401() {
    let server = TestServer::sqlite().await;
    server.create_cache("mine", false).await;
    server.create_cache("theirs", false).await;
    let seeded = server
        .seed_path(
            "theirs",
            plain_metadata(&fake_store_path("secret")),
            &file_nar(b"secret"),
        )
        .await;
    let narinfo = format!("/theirs/{}.narinfo", seeded.store_path_hash);
    let token = server
        .mint("mallory", HOUR, &[("mine", &[Permission::Pull])])
        .await;
    let parts: Vec<&str> = token.split('.').collect();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("base64url"))
            .expect("JSON");
    let mut wider = claims.clone();
    wider["caches"] = serde_json::json!({"*": ["pull"]});
    let mut longer = claims.clone();
    longer["exp"] = serde_json::json!(claims["exp"].as_u64().expect("exp") + 1_000_000);
    let mut renamed = claims.clone();
    renamed["sub"] = serde_json::json!("root");
    for changed in [wider, longer, renamed] {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&changed).expect("JSON"));
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        let (error, _) = api_error(
            get(&server, &narinfo, Some(&forged)).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert!(
            error.message.contains("signature is invalid"),
            "{}",
            error.message
        );
    }
    // A flipped signature byte, and a signature cut short.
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("base64url");
    signature[0] ^= 1;
    let flipped = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(&signature)
    );
    let cut = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..10]);
    for forged in [flipped, cut] {
        let (error, _) = api_error(
            get(&server, &narinfo, Some(&forged)).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert_eq!(error.error, "Unauthorized");
    }
    // The genuine token still sees nothing of `theirs`.
    let (error, _) = api_error(
        get(&server, &narinfo, Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(error.error, "NoSuchCache");
    ok_bytes(get(&server, "/mine/nix-cache-info", Some(&token)).await).await;
}

#[tokio::test]
async fn expired_tokens_are_401() {
    let (server, narinfo, token) = server_with_a_path().await;
    let expired = expired_token(server.signing_key(), &[("*", &Permission::ALL)]);
    for path in [
        narinfo.as_str(),
        "/main/nix-cache-info",
        "/_api/v1/cache-config/main",
    ] {
        let (error, _) = api_error(
            get(&server, path, Some(&expired)).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert!(error.message.contains("expired"), "{}", error.message);
    }
    still_serving(&server, &narinfo, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_401() {
    let (server, narinfo, token) = server_with_a_path().await;
    let revoked = server
        .mint_token("gone", HOUR, &[("*", &Permission::ALL)])
        .await;
    ok_bytes(get(&server, &narinfo, Some(&revoked.token)).await).await;
    server
        .database()
        .revoke_token(&revoked.claims.jti, larder_db::Timestamp::now())
        .await
        .expect("revoking");
    // The refresher reloads the list every REVOCATION_REFRESH_INTERVAL.
    super::tokens::wait_until_refused(&server, &narinfo, &revoked.token).await;
    for path in [
        narinfo.as_str(),
        "/main/nix-cache-info",
        "/_api/v1/cache-config/main",
    ] {
        let (error, _) = api_error(
            get(&server, path, Some(&revoked.token)).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert!(error.message.contains("revoked"), "{}", error.message);
    }
    still_serving(&server, &narinfo, &token).await;
}

/// Authorization headers that carry no usable token: a 401 with a JSON
/// body (and a `WWW-Authenticate` hint), never anonymous access, also on
/// a public cache that anonymous callers may read.
#[tokio::test]
async fn garbage_authorization_headers_are_401() {
    let (server, narinfo, token) = server_with_a_path().await;
    server.create_cache("open", true).await;
    let headers = [
        "Basic !!!not-base64!!!".to_owned(),
        format!("Basic {}", STANDARD.encode("no-colon-here")),
        format!("Basic {}", STANDARD.encode("user:")),
        format!("Basic {}", STANDARD.encode(":")),
        format!("Basic {}", STANDARD.encode(b"\xff\xfe:\xff")),
        format!("Basic {}", STANDARD.encode(":not.a.jwt")),
        format!("Basic {}", STANDARD.encode(":garbage")),
        "Basic".to_owned(),
        "Bearer".to_owned(),
        "Bearer a b".to_owned(),
        "Bearer not-a-jwt".to_owned(),
        "Bearer a.b.c".to_owned(),
        "Token abc".to_owned(),
        token.clone(),
    ];
    for header in &headers {
        for path in [narinfo.as_str(), "/open/nix-cache-info"] {
            let response = server
                .raw_request("GET", path, &[("Authorization", header)], b"")
                .await;
            let error = raw_api_error(&response, 401);
            assert_eq!(error.error, "Unauthorized", "{header:?}");
            assert!(
                response
                    .header("www-authenticate")
                    .is_some_and(|value| value.starts_with("Basic")),
                "{header:?}: {:?}",
                response.headers
            );
        }
    }
    // Nix's own form works: Basic with an empty user and the token.
    let nix_style = format!("Basic {}", STANDARD.encode(format!(":{token}")));
    let response = server
        .raw_request("GET", &narinfo, &[("Authorization", &nix_style)], b"")
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    still_serving(&server, &narinfo, &token).await;
}
