//! Realisations of content-addressed derivations (issue #15): Nix (2.8
//! and a current one) builds a CA derivation, pushes it and its realisation with
//! `nix copy --to`, and another, with an empty store and Larder as its only
//! source, substitutes the derivation's output, checking the realisation's
//! signature by the cache's key; bad realisation uploads are refused with
//! nothing stored, and GC drops a realisation whose path is gone.

use larder_token::Permission;
use reqwest::StatusCode;
use tests::nix::{NixEnv, NixVersion};
use tests::server::TestServer;

use super::push::{blocking, public_key_of};
use super::HOUR;

/// A CA derivation whose output differs per run.
fn ca_derivation(salt: &str) -> String {
    format!(
        r#"derivation {{
  name = "larder-ca-{salt}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo content-addressed {salt} > $out" ];
  PATH = "/usr/bin:/bin";
  __contentAddressed = true;
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
}}"#
    )
}

/// An environment of `version` with content-addressed derivations on.
fn ca_env(version: NixVersion) -> NixEnv {
    let mut env = NixEnv::with_version(version).expect("a Nix environment");
    env.add_config("experimental-features", "nix-command ca-derivations");
    env
}

/// What `nix copy` is given to copy the output of the CA derivation `drv`
/// (written in `file`) with its realisation: its path and `DRV^out` on a
/// current Nix (the derivation itself too, so that whoever substitutes the
/// output from the cache alone reads it there); the expression on Nix 2.8,
/// which names a derivation's output neither `DRV^out` nor `DRV!out`.
fn ca_installables(version: NixVersion, file: &str, drv: &str) -> Vec<String> {
    match version {
        NixVersion::Debian => vec!["--file".to_owned(), file.to_owned()],
        NixVersion::Current => vec![drv.to_owned(), format!("{drv}^out")],
    }
}

/// A server with a private cache `ca`, and a token that may push to it.
async fn server_with_pusher() -> (TestServer, String) {
    let server = TestServer::sqlite().await;
    server.create_cache("ca", false).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[("ca", &[Permission::Pull, Permission::Push])],
        )
        .await;
    (server, token)
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nix_substitutes_a_content_addressed_output_from_its_realisation(version: NixVersion) {
        let (server, token) = server_with_pusher().await;
        let public_key = public_key_of(&server, &token, "ca").await;
        let cache_url = server.cache_url("ca");
        let salt = format!("{:016x}", rand::random::<u64>());
        let (drv, out) = {
            let (token, cache_url, salt) = (token.clone(), cache_url.clone(), salt.clone());
            blocking(move || {
                let mut builder = ca_env(version);
                builder.use_netrc("127.0.0.1", &token).expect("a netrc");
                let file = builder.path("ca.nix");
                std::fs::write(&file, ca_derivation(&salt)).expect("writing the derivation");
                let file = file.to_str().expect("UTF-8").to_owned();
                let drv = builder
                    .run_text("nix", &["eval", "--raw", "--file", &file, "drvPath"])
                    .expect("the derivation's path");
                // (`nix-build`: Nix 2.8's `nix build` cannot print the path.)
                let out = builder
                    .run_text("nix-build", &["--no-out-link", &file])
                    .expect("building the CA derivation");
                let mut copy = vec!["copy", "--to", &cache_url];
                let installables = ca_installables(version, &file, &drv);
                copy.extend(installables.iter().map(String::as_str));
                builder
                    .run("nix", &copy)
                    .expect("nix copy --to of the derivation's output");
                (drv, out)
            })
            .await
        };

        let substituted = {
            let (token, cache_url, public_key) = (token.clone(), cache_url.clone(), public_key.clone());
            let out = out.clone();
            blocking(move || {
                let mut client = ca_env(version);
                client.use_netrc("127.0.0.1", &token).expect("a netrc");
                let file = client.path("ca.nix");
                std::fs::write(&file, ca_derivation(&salt)).expect("writing the derivation");
                let file = file.to_str().expect("UTF-8").to_owned();
                let fresh = client.path("fresh");
                let fresh_arg = fresh.to_str().expect("UTF-8").to_owned();
                // Signatures checked: the realisation's by the cache's key.
                let mut copy = vec![
                    "copy",
                    "--from",
                    &cache_url,
                    "--to",
                    &fresh_arg,
                    "--option",
                    "trusted-public-keys",
                    &public_key,
                ];
                let installables = ca_installables(version, &file, &drv);
                copy.extend(installables.iter().map(String::as_str));
                client
                    .run("nix", &copy)
                    .expect("substituting the output from the cache alone");
                client
                    .path_infos(&fresh, std::slice::from_ref(&out))
                    .expect("the substituted output")
            })
            .await
        };
        assert_eq!(substituted.len(), 1, "{substituted:?}");
        assert_eq!(substituted[0]["path"], out.as_str(), "{substituted:?}");

        // Served with the cache's signature beside the pusher's (none here).
        let drv_output: String = sqlx::query_scalar("SELECT drv_output FROM realisations")
            .fetch_one(server.database().pool())
            .await
            .expect("the realisation's row");
        let get_realisation = || async {
            server
                .http()
                .get(server.url_of(&format!("/ca/realisations/{drv_output}.doi")))
                .bearer_auth(&token)
                .send()
                .await
                .expect("GET realisation")
        };
        let response = get_realisation().await;
        assert_eq!(response.status(), StatusCode::OK);
        let served: serde_json::Value = response.json().await.expect("JSON");
        let key_name = public_key.split(':').next().expect("a key name");
        assert!(
            served["signatures"]
                .as_array()
                .expect("signatures")
                .iter()
                .any(|signature| signature
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{key_name}:")))),
            "{served}"
        );

        // The path gone from the cache, the realisation is no longer served,
        // and GC (a day on) deletes it.
        let cache = server
            .database()
            .cache_by_name(&"ca".parse().expect("a name"))
            .await
            .expect("the cache")
            .expect("it exists");
        let hash =
            larder_nix::StorePathHash::parse(&out["/nix/store/".len().."/nix/store/".len() + 32])
                .expect("a path hash");
        server
            .database()
            .delete_objects(cache.id, &[hash])
            .await
            .expect("deleting the output");
        assert_eq!(get_realisation().await.status(), StatusCode::NOT_FOUND);
        let report = crate::server::gc_two_days_on(&server).await;
        assert_eq!(report.realisations, 1, "{report:?}");
    }
}

/// Bad realisation uploads: each a 4xx, and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_realisation_uploads_are_refused_with_nothing_stored() {
    let (server, pusher) = server_with_pusher().await;
    let reader = server
        .mint("reader", HOUR, &[("ca", &[Permission::Pull])])
        .await;
    let id = "sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!out";
    let good = format!(
        r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test","signatures":[]}}"#
    );
    let put = |token: Option<&str>, file: String, body: String| {
        let mut request = server
            .http()
            .put(server.url_of(&format!("/ca/realisations/{file}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.body(body).send().await.expect("PUT") }
    };
    let cases = [
        (
            Some(reader.as_str()),
            format!("{id}.doi"),
            good.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            None,
            format!("{id}.doi"),
            good.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(pusher.as_str()),
            format!("{id}.doi"),
            "{not json".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(pusher.as_str()),
            "sha256:abc!out.doi".to_owned(),
            good.clone(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(pusher.as_str()),
            format!("{}.doi", id.replace("!out", "!dev")),
            good.clone(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(pusher.as_str()),
            format!("{id}.doi"),
            good.replace("7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test", "not a path"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(pusher.as_str()),
            format!("{id}.doi"),
            "x".repeat(100_000),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (token, file, body, status) in cases {
        let response = put(token, file.clone(), body).await;
        assert_eq!(response.status(), status, "{file}");
        let error: serde_json::Value = response.json().await.expect("a JSON error");
        assert!(error["message"].is_string(), "{error}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM realisations")
        .fetch_one(server.database().pool())
        .await
        .expect("counting realisations");
    assert_eq!(rows, 0);
    // A good one is stored, but not served while the cache lacks its path.
    assert_eq!(
        put(Some(&pusher), format!("{id}.doi"), good).await.status(),
        StatusCode::NO_CONTENT
    );
    let response = server
        .http()
        .get(server.url_of(&format!("/ca/realisations/{id}.doi")))
        .bearer_auth(&pusher)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// Nix 2.35's layout (`build-trace-v2/<drv>/<output>.doi`, keyed by the
/// derivation's path, signatures as objects), which no Nix in the suite
/// writes: stored as uploaded, served only while the cache holds the path,
/// with the cache's signature over 2.35's fingerprint (and, during a key
/// rotation, the next key's beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_trace_layout_is_stored_and_served_signed() {
    let (server, pusher) = server_with_pusher().await;
    let public_key = public_key_of(&server, &pusher, "ca").await;
    let out = super::fake_store_path("ca-output");
    let out_name = &out["/nix/store/".len()..];
    let drv = format!(
        "{}.drv",
        &super::fake_store_path("ca-output")["/nix/store/".len()..]
    );
    let url = server.url_of(&format!("/ca/build-trace-v2/{drv}/out.doi"));
    let body = format!(r#"{{"outPath":"{out_name}","signatures":[]}}"#);
    let put = server
        .http()
        .put(&url)
        .bearer_auth(&pusher)
        .body(body.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let get = || async {
        server
            .http()
            .get(&url)
            .bearer_auth(&pusher)
            .send()
            .await
            .expect("GET")
    };
    assert_eq!(get().await.status(), StatusCode::NOT_FOUND, "no path yet");
    server
        .seed_path("ca", super::plain_metadata(&out), &super::file_nar(b"ca"))
        .await;
    let response = get().await;
    assert_eq!(response.status(), StatusCode::OK);
    let served: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(served["outPath"], out_name);
    let signature = &served["signatures"][0];
    let signature = larder_nix::Signature::parse(&format!(
        "{}:{}",
        signature["keyName"].as_str().expect("a key name"),
        signature["sig"].as_str().expect("a signature")
    ))
    .expect("a signature");
    let fingerprint = format!(
        r#"{{"key":{{"drvPath":"{drv}","outputName":"out"}},"value":{{"outPath":"{out_name}"}}}}"#
    );
    let key: larder_nix::PublicKey = public_key.parse().expect("the cache's public key");
    assert!(key.verify(fingerprint.as_bytes(), &signature), "{served}");
    // During a key rotation the next key signs too (issue #18).
    let root = server.root_token().await;
    let rotating: larder_api::v1::CacheConfig = super::ok_json(
        super::send(
            &server,
            reqwest::Method::PATCH,
            "/_api/v1/cache-config/ca",
            Some(&root),
            Some(serde_json::json!({"key_rotation": "Start"})),
        )
        .await,
    )
    .await;
    let served: serde_json::Value = get().await.json().await.expect("JSON");
    let signers: Vec<larder_nix::Signature> = served["signatures"]
        .as_array()
        .expect("signatures")
        .iter()
        .map(|signature| {
            larder_nix::Signature::parse(&format!(
                "{}:{}",
                signature["keyName"].as_str().expect("a key name"),
                signature["sig"].as_str().expect("a signature")
            ))
            .expect("a signature")
        })
        .collect();
    let keys = [
        public_key.as_str(),
        rotating.next_public_key.as_deref().expect("a next key"),
    ];
    assert_eq!(signers.len(), keys.len(), "{served}");
    for (key, signature) in keys.iter().zip(&signers) {
        let key: larder_nix::PublicKey = key.parse().expect("a public key");
        assert!(key.verify(fingerprint.as_bytes(), signature), "{served}");
    }
    // Not a derivation, or no `.doi`: a 400, nothing stored.
    for bad in [
        format!("/ca/build-trace-v2/{out_name}/out.doi"),
        format!("/ca/build-trace-v2/{drv}/out"),
    ] {
        let response = server
            .http()
            .put(server.url_of(&bad))
            .bearer_auth(&pusher)
            .body(body.clone())
            .send()
            .await
            .expect("PUT");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM realisations")
        .fetch_one(server.database().pool())
        .await
        .expect("counting realisations");
    assert_eq!(rows, 1);
}
