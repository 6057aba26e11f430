//! Issue #18's signing-key rotation through the API: while a rotation is
//! in progress every narinfo carries the current and the next key's
//! signatures, so a Nix trusting either key substitutes with signatures
//! required; once it finishes only the new key signs. And the rotation's
//! refusals: its conflicts (409), a patch that both replaces and rotates
//! (400), and a token without `configure_cache` (403).

use larder_api::v1::CacheConfig;
use larder_nix::{NarInfo, PublicKey, StoreDir};
use larder_token::Permission;
use reqwest::{Method, StatusCode};
use tests::nix::{NixEnv, NixVersion};
use tests::server::TestServer;

use super::push::blocking;
use super::store_with_a_built_path;
use super::{api_error, get, ok_bytes, ok_json, send, source_paths, HOUR};

const CONFIG: &str = "/_api/v1/cache-config/rotating";

async fn patch(server: &TestServer, token: &str, body: serde_json::Value) -> reqwest::Response {
    send(server, Method::PATCH, CONFIG, Some(token), Some(body)).await
}

/// The `Sig:` key names of the narinfo at `path`, and whether each of
/// `keys` alone verifies it.
async fn narinfo_signers(
    server: &TestServer,
    token: &str,
    path: &str,
    keys: &[&str],
) -> (Vec<String>, Vec<bool>) {
    let text = String::from_utf8(ok_bytes(get(server, path, Some(token)).await).await)
        .expect("a text narinfo");
    let store_dir = StoreDir::default();
    let narinfo = NarInfo::parse(&text, &store_dir).expect("a narinfo");
    let signers = narinfo
        .signatures
        .iter()
        .map(|signature| signature.key_name().to_owned())
        .collect();
    let verified = keys
        .iter()
        .map(|key| narinfo.verify(&[PublicKey::parse(key).expect("a public key")], &store_dir))
        .collect();
    (signers, verified)
}

/// Whether a fresh Nix of `version` trusting only `public_key` (and
/// requiring signatures) substitutes `paths` from the cache; its stderr.
async fn substitutes_trusting_only(
    version: NixVersion,
    server: &TestServer,
    token: &str,
    public_key: &str,
    paths: &[String],
) -> (bool, String) {
    let cache_url = server.cache_url("rotating");
    let token = token.to_owned();
    let public_key = public_key.to_owned();
    let paths = paths.to_vec();
    blocking(move || {
        // A fresh environment: no narinfo remembered from an earlier try.
        let mut client = NixEnv::with_version(version).expect("a Nix environment");
        client
            .use_netrc("127.0.0.1", &token)
            .expect("writing the netrc");
        let destination = client.path("destination");
        let output = client
            .substitute_trusting(&destination, &cache_url, &[&public_key], &paths)
            .expect("running nix-store --realise");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
}

/// Creates the cache `CONFIG` names, with a generated key.
async fn create_cache(server: &TestServer, token: &str) -> CacheConfig {
    let body = serde_json::json!({"keypair": "Generate"});
    ok_json(send(server, Method::POST, CONFIG, Some(token), Some(body)).await).await
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn during_a_rotation_either_key_is_trusted_and_after_it_only_the_new_one(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let (source_env, store) = store_with_a_built_path(version, "rotation").await;
        let root = server.root_token().await;
        let created = create_cache(&server, &root).await;
        let old_key = created.public_key.expect("a public key");
        assert_eq!(created.next_public_key, None);
        for source in source_paths(&source_env, &store.root, &store.paths) {
            server.seed_path("rotating", source.metadata, &source.nar).await;
        }
        let built = store.built.clone();
        let hash = &built[0]["/nix/store/".len().."/nix/store/".len() + 32];
        let narinfo = format!("/rotating/{hash}.narinfo");
        let puller = server
            .mint("puller", HOUR, &[("rotating", &[Permission::Pull])])
            .await;
        let configurer = server
            .mint(
                "configurer",
                HOUR,
                &[("rotating", &[Permission::ConfigureCache, Permission::Pull])],
            )
            .await;

        // A token without configure_cache may not rotate.
        let (error, _) = api_error(
            patch(&server, &puller, serde_json::json!({"key_rotation": "Start"})).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(error.message.contains("configure_cache"), "{}", error.message);

        let started: CacheConfig = ok_json(
            patch(&server, &configurer, serde_json::json!({"key_rotation": "Start"})).await,
        )
        .await;
        assert_eq!(started.public_key.as_deref(), Some(old_key.as_str()));
        let new_key = started.next_public_key.expect("the next public key");
        assert!(new_key.starts_with("rotating-2:"), "{new_key}");
        let read: CacheConfig = ok_json(get(&server, CONFIG, Some(&puller)).await).await;
        assert_eq!(read.next_public_key.as_deref(), Some(new_key.as_str()));

        // Both keys sign, each on its own line, and each alone verifies.
        let (signers, verified) =
            narinfo_signers(&server, &puller, &narinfo, &[&old_key, &new_key]).await;
        assert_eq!(signers, ["rotating-1", "rotating-2"]);
        assert_eq!(verified, [true, true]);
        for key in [&old_key, &new_key] {
            let (substituted, stderr) =
                substitutes_trusting_only(version, &server, &puller, key, &built).await;
            assert!(substituted, "trusting only {key} during the rotation: {stderr}");
        }

        let finished: CacheConfig = ok_json(
            patch(&server, &configurer, serde_json::json!({"key_rotation": "Finish"})).await,
        )
        .await;
        assert_eq!(finished.public_key.as_deref(), Some(new_key.as_str()));
        assert_eq!(finished.next_public_key, None);
        let (signers, verified) =
            narinfo_signers(&server, &puller, &narinfo, &[&old_key, &new_key]).await;
        assert_eq!(signers, ["rotating-2"]);
        assert_eq!(verified, [false, true]);
        let (substituted, stderr) =
            substitutes_trusting_only(version, &server, &puller, &old_key, &built).await;
        assert!(!substituted, "trusting only the retired key after the rotation");
        // 2.8: "is not signed by any of the keys in 'trusted-public-keys'";
        // a current Nix: "as it's not signed by any of the keys …".
        assert!(stderr.contains("not signed by any of the keys"), "{stderr}");
        let (substituted, stderr) =
            substitutes_trusting_only(version, &server, &puller, &new_key, &built).await;
        assert!(substituted, "trusting only the new key after the rotation: {stderr}");
        drop(source_env);
    }
}

#[tokio::test]
async fn rotation_steps_the_state_forbids_are_conflicts_and_leave_the_keys_alone() {
    let server = TestServer::sqlite().await;
    let root = server.root_token().await;
    let created = create_cache(&server, &root).await;
    let keys = |config: &CacheConfig| (config.public_key.clone(), config.next_public_key.clone());

    let (error, _) = api_error(
        patch(
            &server,
            &root,
            serde_json::json!({"key_rotation": "Finish"}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(error.error, "Conflict");
    assert!(
        error.message.contains("no key rotation in progress"),
        "{}",
        error.message
    );
    // Both at once is malformed, whatever the state.
    let (error, _) = api_error(
        patch(
            &server,
            &root,
            serde_json::json!({"keypair": "Generate", "key_rotation": "Start"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(error.message.contains("key_rotation"), "{}", error.message);
    let read: CacheConfig = ok_json(get(&server, CONFIG, Some(&root)).await).await;
    assert_eq!(keys(&read), keys(&created));

    let started: CacheConfig =
        ok_json(patch(&server, &root, serde_json::json!({"key_rotation": "Start"})).await).await;
    for (body, expected) in [
        (
            serde_json::json!({"key_rotation": "Start"}),
            "already rotating its signing key to rotating-2",
        ),
        (
            serde_json::json!({"keypair": "Generate"}),
            "finish the rotation",
        ),
        (
            serde_json::json!({"keypair": {"Keypair": "not-even-a-key"}, "priority": 3}),
            "finish the rotation",
        ),
    ] {
        // `api_error` checks the JSON body's shape and its `code`.
        let (error, _) = api_error(
            patch(&server, &root, body.clone()).await,
            StatusCode::CONFLICT,
        )
        .await;
        assert_eq!(error.error, "Conflict", "{body}");
        assert!(
            error.message.contains(expected),
            "{body}: {}",
            error.message
        );
    }
    let read: CacheConfig = ok_json(get(&server, CONFIG, Some(&root)).await).await;
    assert_eq!(
        keys(&read),
        keys(&started),
        "refused patches changed nothing"
    );
    assert_eq!(read.priority, created.priority);
}
