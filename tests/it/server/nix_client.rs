//! The real Nix client (2.8) against the server: substituting a closure
//! from a private cache with signatures required, `nix store verify`
//! against the cache, and `.ls` listings equal to the ones Nix writes.

use super::content_type;
use std::path::Path;

use larder_api::v1::CacheConfig;
use larder_db::Backend;
use larder_token::Permission;
use reqwest::{Method, StatusCode};
use tests::nix::{cache_files, file_cache_url, symlink, write_file, NixEnv, NixVersion};
use tests::server::{TestServer, SEED_CHUNK_SIZE};

use super::{api_error, get, ok_bytes, ok_json, send, source_paths, HOUR};
use tests::server::pseudo_random;

/// A directory with one file larger than several seed chunks (noise, so
/// that it stays large compressed), an executable, a symlink, an empty
/// file and a nested directory: its NAR spans chunks, and so does the
/// listing's walk over it.
fn make_multi_chunk_tree(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("share/nested")).expect("creating the tree");
    write_file(
        &dir.join("share/blob.bin"),
        &pseudo_random(5 * SEED_CHUNK_SIZE / 2, seed),
        false,
    )
    .expect("writing the blob");
    write_file(&dir.join("share/nested/empty"), b"", false).expect("writing an empty file");
    write_file(&dir.join("run.sh"), b"#!/bin/sh\necho larder\n", true).expect("writing a script");
    write_file(&dir.join("zz-after-blob.txt"), b"after the blob\n", false).expect("writing a file");
    symlink("share/blob.bin", &dir.join("link")).expect("making a symlink");
}

/// Runs a blocking Nix step off the async runtime's workers, so the
/// in-process server keeps answering while Nix talks to it.
async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(step)
        .await
        .expect("the Nix step panicked")
}

/// `version` makes a closure, then substitutes it from the cache and
/// verifies it against the cache.
async fn nix_substitutes_a_private_closure_with_signatures_required(
    backend: Backend,
    version: NixVersion,
) {
    let server = TestServer::on(backend).await;
    let salt = format!("closure-{:016x}", rand::random::<u64>());
    let (source_env, store, paths) = blocking(move || {
        let env = NixEnv::with_version(version).expect("a Nix environment");
        let store = env
            .make_store(&env.path("source"), 12, &salt)
            .expect("making a store of 12 referencing paths");
        let tree = env.path("big-tree");
        make_multi_chunk_tree(&tree, 0x5eed);
        let big = env
            .add_path(&store.root, &tree)
            .expect("adding the big tree");
        let mut paths = store.paths.clone();
        paths.push(big);
        // The pusher's own signatures travel with the paths; the cache's
        // is added beside them when serving.
        let pusher = env.keygen("pusher-1").expect("a pusher key");
        env.sign(&store.root, &pusher.secret_key_file, &paths)
            .expect("signing the source paths");
        (env, store, paths)
    })
    .await;
    assert!(paths.len() >= 13);
    assert!(
        !store.built.is_empty(),
        "input-addressed paths need signatures"
    );
    let sources = source_paths(&source_env, &store.root, &paths);

    // The cache is created through the API; its paths go in through the
    // store layer.
    let root = server.root_token().await;
    let created: CacheConfig = ok_json(
        send(
            &server,
            Method::POST,
            "/_api/v1/cache-config/closure",
            Some(&root),
            Some(serde_json::json!({"keypair": "Generate", "is_public": false})),
        )
        .await,
    )
    .await;
    let public_key = created.public_key.expect("the cache's public key");
    let mut chunk_counts = Vec::new();
    for source in &sources {
        let seeded = server
            .seed_path("closure", source.metadata.clone(), &source.nar)
            .await;
        chunk_counts.push(seeded.nar.n_chunks);
    }
    assert!(
        chunk_counts.iter().any(|&n| n >= 3),
        "one NAR spans several chunks: {chunk_counts:?}"
    );

    // Private: without a token the cache looks empty to Nix.
    let built = sources
        .iter()
        .find(|source| store.built.contains(&source.path))
        .expect("a built path");
    let hash = &built.path["/nix/store/".len().."/nix/store/".len() + 32];
    let narinfo_path = format!("/closure/{hash}.narinfo");
    api_error(
        get(&server, &narinfo_path, None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    let token = server
        .mint("nix-client", HOUR, &[("closure", &[Permission::Pull])])
        .await;
    let narinfo =
        String::from_utf8(ok_bytes(get(&server, &narinfo_path, Some(&token)).await).await)
            .expect("a text narinfo");
    let signers: Vec<&str> = narinfo
        .lines()
        .filter_map(|line| line.strip_prefix("Sig: "))
        .filter_map(|signature| signature.split_once(':').map(|(name, _)| name))
        .collect();
    assert_eq!(signers, ["closure-1", "pusher-1"], "{narinfo}");
    let cache_url = server.cache_url("closure");
    let (pull_paths, pulled) = {
        let token = token.clone();
        let cache_url = cache_url.clone();
        let public_key = public_key.clone();
        let paths = paths.clone();
        blocking(move || {
            let mut client = NixEnv::with_version(version).expect("a Nix environment");
            client
                .use_netrc("127.0.0.1", &token)
                .expect("writing the netrc");
            client.add_config("require-sigs", "true");
            let destination = client.path("destination");
            let destination_arg = destination.to_str().expect("UTF-8").to_owned();
            let mut args = vec![
                "--store",
                destination_arg.as_str(),
                "--realise",
                "--option",
                "substituters",
                cache_url.as_str(),
                "--option",
                "trusted-public-keys",
                public_key.as_str(),
            ];
            args.extend(paths.iter().map(String::as_str));
            client
                .run("nix-store", &args)
                .expect("nix-store --realise substitutes the whole closure");
            let hashes: Vec<String> = paths
                .iter()
                .map(|path| client.nar_hash(&destination, path).expect("the NAR hash"))
                .collect();
            (paths, hashes)
        })
        .await
    };
    for ((path, pulled), source) in pull_paths.iter().zip(&pulled).zip(&sources) {
        assert_eq!(path, &source.path);
        assert_eq!(pulled, &source.nar_hash, "NAR hash of substituted {path}");
    }

    // A fresh client (no narinfo disk cache) verifies every path against
    // the cache: signatures by the cache's key, and each NAR re-hashed.
    let verify = blocking(move || {
        let mut verifier = NixEnv::with_version(version).expect("a Nix environment");
        verifier
            .use_netrc("127.0.0.1", &token)
            .expect("writing the netrc");
        verifier
            .store_verify(&cache_url, &public_key, &paths)
            .expect("running nix store verify")
    })
    .await;
    assert!(
        verify.status.success(),
        "nix store verify --sigs-needed 1 against the cache: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    drop(source_env);
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_nix_substitutes_a_private_closure_with_signatures_required(version: NixVersion) {
        nix_substitutes_a_private_closure_with_signatures_required(Backend::Sqlite, version).await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_nix_substitutes_a_private_closure_with_signatures_required(version: NixVersion) {
        nix_substitutes_a_private_closure_with_signatures_required(Backend::Postgres, version).await;
    }
}

tests::under_each_nix! {
    /// The server's `.ls` of a multi-chunk NAR is byte for byte the one
    /// `nix copy --to 'file://…?write-nar-listing=true'` writes for that path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listing_equals_the_one_nix_writes(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let (env, root, path, expected) = blocking(move || {
            let env = NixEnv::with_version(version).expect("a Nix environment");
            let root = env.path("store");
            let tree = env.path("tree");
            make_multi_chunk_tree(&tree, 0x115);
            let path = env.add_path(&root, &tree).expect("adding the tree");
            let cache_dir = env.path("file-cache");
            env.copy_to(
                &root,
                &file_cache_url(&cache_dir, "write-nar-listing=true&compression=none"),
                std::slice::from_ref(&path),
            )
            .expect("nix copy to a file:// cache with listings");
            let listings = cache_files(&cache_dir, ".ls").expect("listing the cache");
            assert_eq!(listings.len(), 1, "{listings:?}");
            let expected = std::fs::read(&listings[0]).expect("reading Nix's .ls");
            (env, root, path, expected)
        })
        .await;
        let source = source_paths(&env, &root, std::slice::from_ref(&path))
            .pop()
            .expect("one path");
        server.create_cache("listed", false).await;
        let seeded = server
            .seed_path("listed", source.metadata, &source.nar)
            .await;
        assert!(seeded.nar.n_chunks >= 3, "{} chunks", seeded.nar.n_chunks);

        let token = server
            .mint("lister", HOUR, &[("listed", &[Permission::Pull])])
            .await;
        let response = get(
            &server,
            &format!("/listed/{}.ls", seeded.store_path_hash),
            Some(&token),
        )
        .await;
        let content_type = content_type(&response);
        let listing = ok_bytes(response).await;
        assert_eq!(content_type, "application/json");
        assert!(
            tests::nix::same_listing(version, &listing, &expected),
            "the .ls of {path}: {}\nNix wrote:\n{}",
            String::from_utf8_lossy(&listing),
            String::from_utf8_lossy(&expected)
        );
    }
}
