//! The token API (`/_api/v1/whoami`, `/_api/v1/tokens`): minting capped by
//! the caller's own permissions and lifetime, listing only the tokens the
//! caller manages, and revocation through the API reaching every replica.

use std::collections::BTreeMap;

use larder_api::v1::{MintTokenResponse, TokenInfo, TokenList};
use larder_db::Backend;
use larder_token::{Permission, TokenAlgorithm};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tests::server::{TestServer, TestServerOptions};

use super::tokens::wait_until_refused;
use super::{api_error, get, ok_json, send, HOUR};

fn grants(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(pattern, names)| {
            (
                (*pattern).to_owned(),
                names.iter().map(|name| (*name).to_owned()).collect(),
            )
        })
        .collect()
}

async fn mint(server: &TestServer, token: &str, body: serde_json::Value) -> reqwest::Response {
    send(
        server,
        Method::POST,
        "/_api/v1/tokens",
        Some(token),
        Some(body),
    )
    .await
}

/// The subjects of the tokens listed, sorted (tokens minted within one
/// second list in no particular order).
async fn listed(server: &TestServer, token: &str, query: &str) -> Vec<String> {
    let list: TokenList =
        ok_json(get(server, &format!("/_api/v1/tokens{query}"), Some(token)).await).await;
    let mut subjects = list
        .tokens
        .into_iter()
        .map(|token| token.subject)
        .collect::<Vec<_>>();
    subjects.sort();
    subjects
}

#[tokio::test]
async fn whoami_shows_the_callers_own_claims() {
    let server = TestServer::sqlite().await;
    let minted = server
        .mint_token(
            "ci@alice",
            HOUR,
            &[
                ("alice-*", &[Permission::Pull, Permission::Push]),
                ("shared", &[Permission::Pull]),
            ],
        )
        .await;
    let info: TokenInfo = ok_json(get(&server, "/_api/v1/whoami", Some(&minted.token)).await).await;
    assert_eq!(info.jti, minted.claims.jti);
    assert_eq!(info.subject, "ci@alice");
    assert_eq!(
        (info.issued_at, info.expires_at),
        (minted.claims.iat, minted.claims.exp)
    );
    assert_eq!(info.revoked_at, None);
    assert_eq!(
        info.caches,
        grants(&[("alice-*", &["pull", "push"]), ("shared", &["pull"])])
    );
    let (error, _) = api_error(
        get(&server, "/_api/v1/whoami", None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(error.message.contains("needs a token"), "{}", error.message);
}

/// A token minted through the API never does more, nor lasts longer, than
/// the token that minted it; malformed requests are 400s saying why.
#[tokio::test]
async fn minting_is_capped_by_the_callers_permissions() {
    let server = TestServer::sqlite().await;
    server.create_cache("alice-ci", false).await;
    let manager = server
        .mint_token(
            "alice",
            HOUR,
            &[
                (
                    "alice-*",
                    &[Permission::Pull, Permission::Push, Permission::ManageTokens],
                ),
                ("shared", &[Permission::Pull]),
            ],
        )
        .await;
    let half_hour = 1800;

    let response = mint(
        &server,
        &manager.token,
        json!({"subject": "ci", "valid_for_secs": half_hour, "caches": {"alice-ci": ["push"]}}),
    )
    .await;
    let minted: MintTokenResponse = ok_json(response).await;
    assert_eq!(minted.info.subject, "ci");
    assert_eq!(minted.info.caches, grants(&[("alice-ci", &["push"])]));
    // The token works, with exactly what it was given.
    let info: TokenInfo = ok_json(get(&server, "/_api/v1/whoami", Some(&minted.token)).await).await;
    assert_eq!(info.jti, minted.info.jti);
    ok_json::<serde_json::Value>(
        get(
            &server,
            "/_api/v1/cache-stats/alice-ci",
            Some(&minted.token),
        )
        .await,
    )
    .await;
    // Recorded, so that it can be listed and revoked.
    let record = server
        .database()
        .token(&minted.info.jti)
        .await
        .expect("reading the token table")
        .expect("the minted token is recorded");
    assert_eq!(record.sub, "ci");

    for (body, status, needle) in [
        // Wider than the minter: a permission it lacks, a cache where it
        // cannot manage tokens, a pattern wider than its own.
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": {"alice-*": ["delete"]}}),
            StatusCode::FORBIDDEN,
            "delete",
        ),
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": {"shared": ["pull"]}}),
            StatusCode::FORBIDDEN,
            "manage_tokens",
        ),
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": {"*": ["pull"]}}),
            StatusCode::FORBIDDEN,
            "\"*\"",
        ),
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": {"al*": ["pull"]}}),
            StatusCode::FORBIDDEN,
            "al*",
        ),
        // Outliving the minter.
        (
            json!({"subject": "x", "valid_for_secs": 2 * 3600, "caches": {"alice-ci": ["pull"]}}),
            StatusCode::FORBIDDEN,
            "expire",
        ),
        // Malformed.
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": {"alice-ci": ["teleport"]}}),
            StatusCode::BAD_REQUEST,
            "teleport",
        ),
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": {"../x": ["pull"]}}),
            StatusCode::BAD_REQUEST,
            "../x",
        ),
        (
            json!({"subject": "x", "valid_for_secs": 0, "caches": {"alice-ci": ["pull"]}}),
            StatusCode::BAD_REQUEST,
            "zero",
        ),
        (
            json!({"subject": " ", "valid_for_secs": 60, "caches": {"alice-ci": ["pull"]}}),
            StatusCode::BAD_REQUEST,
            "subject",
        ),
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": {}}),
            StatusCode::BAD_REQUEST,
            "no permission",
        ),
        (
            json!({"subject": "x".repeat(257), "valid_for_secs": 60, "caches": {"alice-ci": ["pull"]}}),
            StatusCode::BAD_REQUEST,
            "at most 256",
        ),
        (
            json!({"subject": "x", "valid_for_secs": 60, "caches": (0..65).map(|n| (format!("alice-{n}"), vec!["pull"])).collect::<BTreeMap<_, _>>()}),
            StatusCode::BAD_REQUEST,
            "at most 64",
        ),
        (
            json!({"subject": "x", "caches": {}}),
            StatusCode::BAD_REQUEST,
            "valid_for_secs",
        ),
    ] {
        let (error, _) = api_error(mint(&server, &manager.token, body.clone()).await, status).await;
        assert!(error.message.contains(needle), "{body}: {}", error.message);
    }

    // Without manage_tokens, nothing can be minted, not even less.
    let pusher = server
        .mint(
            "pusher",
            HOUR,
            &[("alice-ci", &[Permission::Pull, Permission::Push])],
        )
        .await;
    let (error, _) = api_error(
        mint(
            &server,
            &pusher,
            json!({"subject": "x", "valid_for_secs": 60, "caches": {"alice-ci": ["pull"]}}),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(error.message.contains("manage_tokens"), "{}", error.message);
    let (error, _) = api_error(
        send(
            &server,
            Method::POST,
            "/_api/v1/tokens",
            None,
            Some(json!({"subject": "x", "valid_for_secs": 60, "caches": {}})),
        )
        .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(error.error, "Unauthorized");
}

/// A manager lists the tokens within its patterns and its own; a token
/// without `manage_tokens` sees only itself.
#[tokio::test]
async fn listing_shows_the_tokens_one_manages_and_ones_own() {
    let server = TestServer::sqlite().await;
    for (subject, pattern) in [
        ("alice-ci", "alice-ci"),
        ("alice-dev", "alice-*"),
        ("bob-ci", "bob-ci"),
    ] {
        server
            .mint_token(subject, HOUR, &[(pattern, &[Permission::Push])])
            .await;
    }
    // Spans alice's and bob's caches: only a manager of both sees it.
    server
        .mint_token(
            "both",
            HOUR,
            &[
                ("alice-x", &[Permission::Pull]),
                ("bob-x", &[Permission::Pull]),
            ],
        )
        .await;
    let manager = server
        .mint(
            "alice-admin",
            HOUR,
            &[("alice-*", &[Permission::ManageTokens])],
        )
        .await;
    let plain = server
        .mint("plain", HOUR, &[("alice-ci", &[Permission::Pull])])
        .await;
    let root = server.root_token().await;

    // `plain` names only alice-ci, so alice's manager manages it too.
    assert_eq!(
        listed(&server, &manager, "").await,
        ["alice-admin", "alice-ci", "alice-dev", "plain"]
    );
    assert_eq!(
        listed(&server, &manager, "?subject=alice-dev").await,
        ["alice-dev"]
    );
    assert!(listed(&server, &manager, "?subject=bob-ci")
        .await
        .is_empty());
    assert_eq!(listed(&server, &plain, "").await, ["plain"]);
    assert_eq!(listed(&server, &root, "").await.len(), 7);
    let (error, _) = api_error(
        get(&server, "/_api/v1/tokens?sub=x", Some(&manager)).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(error.message.contains("sub"), "{}", error.message);
}

/// Revoked through one replica's API, a token is refused there at once and
/// on the other replica within the revocation list's reload; a token the
/// caller does not manage is answered like one that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_through_the_api_is_refused_on_every_replica() {
    // RS256 servers share their key, so the two replicas of one database
    // accept the same tokens.
    let options = TestServerOptions {
        backend: Backend::Postgres,
        algorithm: TokenAlgorithm::Rs256,
        ..TestServerOptions::default()
    };
    let first = TestServer::start(options.clone()).await;
    let second = TestServer::start(TestServerOptions {
        database_url: Some(first.config().database.url.expose().to_owned()),
        ..options
    })
    .await;
    let leaver = first
        .mint_token("leaver", HOUR, &[("team-*", &[Permission::Pull])])
        .await;
    let outsider = first
        .mint_token("outsider", HOUR, &[("other", &[Permission::Pull])])
        .await;
    let manager = first
        .mint("manager", HOUR, &[("team-*", &[Permission::ManageTokens])])
        .await;
    for server in [&first, &second] {
        ok_json::<TokenInfo>(get(server, "/_api/v1/whoami", Some(&leaver.token)).await).await;
    }

    for jti in [
        outsider.claims.jti.as_str(),
        "0123456789abcdef0123456789abcdef",
    ] {
        let (error, _) = api_error(
            send(
                &first,
                Method::DELETE,
                &format!("/_api/v1/tokens/{jti}"),
                Some(&manager),
                None,
            )
            .await,
            StatusCode::NOT_FOUND,
        )
        .await;
        assert_eq!(error.error, "NoSuchToken");
    }
    ok_json::<TokenInfo>(get(&first, "/_api/v1/whoami", Some(&outsider.token)).await).await;

    let response = send(
        &first,
        Method::DELETE,
        &format!("/_api/v1/tokens/{}", leaver.claims.jti),
        Some(&manager),
        None,
    )
    .await;
    let revoked: TokenInfo = ok_json(response).await;
    assert!(revoked.revoked_at.is_some());
    // At once where it was revoked.
    let (error, _) = api_error(
        get(&first, "/_api/v1/whoami", Some(&leaver.token)).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(error.message.contains("revoked"), "{}", error.message);
    // On the other replica once it reloads the list.
    let (elapsed, error) = wait_until_refused(&second, "/_api/v1/whoami", &leaver.token).await;
    assert!(error.message.contains("revoked"), "{}", error.message);
    eprintln!("the revocation reached the other replica after {elapsed:?}");

    // A token may revoke itself without managing anything.
    let path = format!("/_api/v1/tokens/{}", outsider.claims.jti);
    ok_json::<TokenInfo>(send(&first, Method::DELETE, &path, Some(&outsider.token), None).await)
        .await;
    let (error, _) = api_error(
        get(&first, "/_api/v1/whoami", Some(&outsider.token)).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(error.message.contains("revoked"), "{}", error.message);
}
