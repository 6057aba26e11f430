//! Issue #18's signing keys through the `larder` binary: importing a key
//! made by `nix-store --generate-binary-cache-key` (`cache configure` and
//! `cache create --import-key`), refusing a file that holds none, and a
//! rotation (`--rotate-key`, `--finish-rotation`) during which `larder use`
//! trusts both keys, so that the Nix it configured keeps substituting after
//! the old key is retired.

use tests::nix::{NixEnv, NixVersion};
use tests::server::TestServer;

use super::{
    assert_substitutes_the_same_nars, blocking, path_for_seeding, server_view, text, Larder, HOUR,
};
use crate::server::store_with_a_built_path;
use larder_token::Permission;

/// A Nix environment of `version` with a store of three paths, one of
/// them built (input-addressed: substituting it needs a trusted
/// signature), seeded into `cache`.
async fn seeded_store(
    version: NixVersion,
    server: &TestServer,
    cache: &str,
) -> (NixEnv, tests::nix::TestStore) {
    let (env, store) = store_with_a_built_path(version, "keys").await;
    for path in &store.paths {
        let (metadata, nar) = path_for_seeding(&env, &store.root, path);
        server.seed_path(cache, metadata, &nar).await;
    }
    (env, store)
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_imported_key_signs_and_a_file_without_one_changes_nothing(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let root = server.root_token().await;
        let larder = Larder::new();
        larder.ok(&["login", "local", &server.url(), &root]).await;
        larder.ok(&["cache", "create", "imported"]).await;
        let (env, store) = seeded_store(version, &server, "imported").await;
        let generated = server_view(&server, "imported", &root)
            .await
            .public_key
            .expect("a key");

        // Files that hold no secret key: refused before anything is sent.
        let key = env
            .generate_binary_cache_key("moved-from-cachix-1")
            .expect("nix-store --generate-binary-cache-key");
        let secret_part = key.secret_key.split_once(':').expect("name:key").1.to_owned();
        let malformed = env.path("malformed.sk");
        std::fs::write(&malformed, "moved-1:this is not base64\n").expect("writing a key file");
        let public_only = env.path("public-only.sk");
        std::fs::write(&public_only, &key.public_key).expect("writing a key file");
        let missing = env.path("missing.sk");
        for (file, expected) in [
            (&malformed, "does not hold a Nix secret key"),
            (&public_only, "expected 64"),
            (&missing, "reading the secret key file"),
        ] {
            let file = file.to_str().expect("UTF-8");
            let line = larder
                .fails(&["cache", "configure", "imported", "--import-key", file])
                .await;
            assert!(line.contains(expected) && line.contains(file), "{line}");
            assert!(!line.contains("this is not base64"), "the file's text: {line}");
        }
        assert_eq!(
            server_view(&server, "imported", &root).await.public_key,
            Some(generated.clone()),
            "a refused key file changed nothing"
        );
        // The key flags exclude each other (clap: exit status 2).
        let secret_file = key.secret_key_file.to_str().expect("UTF-8");
        let both = larder
            .run(&["cache", "configure", "imported", "--rotate-key", "--import-key", secret_file])
            .await;
        assert_eq!(both.status.code(), Some(2), "{}", text(&both.stderr));

        let out = larder
            .ok(&["cache", "configure", "imported", "--import-key", secret_file])
            .await;
        assert!(out.contains(&key.public_key), "{out}");
        assert!(!out.contains(&secret_part), "the secret is printed: {out}");
        assert_eq!(
            server_view(&server, "imported", &root).await.public_key,
            Some(key.public_key.clone())
        );

        // A Nix trusting only the imported key's public half substitutes;
        // one trusting only the key it replaced does not.
        let pull = server
            .mint("puller", HOUR, &[("imported", &[Permission::Pull])])
            .await;
        let cache_url = server.cache_url("imported");
        let built = store.built.clone();
        let (with_imported, with_generated) = blocking({
            let public_key = key.public_key.clone();
            move || {
                let attempt = |public_key: &str| {
                    let mut client = NixEnv::with_version(version).expect("a Nix environment");
                    client.use_netrc("127.0.0.1", &pull).expect("a netrc");
                    client
                        .substitute_trusting(
                            &client.path("destination"),
                            &cache_url,
                            &[public_key],
                            &built,
                        )
                        .expect("running nix-store --realise")
                };
                (attempt(&public_key), attempt(&generated))
            }
        })
        .await;
        assert!(with_imported.status.success(), "{}", text(&with_imported.stderr));
        assert!(!with_generated.status.success(), "the replaced key is no longer trusted");

        // A cache moved from elsewhere starts with its old key.
        larder
            .ok(&["cache", "create", "moved", "--import-key", secret_file])
            .await;
        assert_eq!(
            server_view(&server, "moved", &root).await.public_key,
            Some(key.public_key.clone())
        );
        let line = larder
            .fails(&[
                "cache",
                "create",
                "refused",
                "--import-key",
                malformed.to_str().expect("UTF-8"),
            ])
            .await;
        assert!(line.contains("does not hold a Nix secret key"), "{line}");
        drop(env);
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn use_during_a_rotation_trusts_both_keys_so_nix_survives_its_end(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let root = server.root_token().await;
        let mut larder = Larder::with_nix(version);
        larder.ok(&["login", "local", &server.url(), &root]).await;
        larder.ok(&["cache", "create", "turning"]).await;
        let (env, store) = seeded_store(version, &server, "turning").await;
        std::fs::create_dir_all(larder.nix_conf().parent().expect("a directory")).expect("mkdir");
        std::fs::write(larder.nix_conf(), "substituters =\n").expect("writing nix.conf");
        let pull = server
            .mint("puller", HOUR, &[("turning", &[Permission::Pull])])
            .await;
        larder.set_env("LARDER_TOKEN", &pull);
        // A client set up before the rotation.
        larder.ok(&["use", "turning"]).await;
        let old_key = server_view(&server, "turning", &root)
            .await
            .public_key
            .expect("a key");
        let substituter = format!("{}/turning", server.url());
        let conf_with = |keys: &str| {
            format!(
                "substituters =\nextra-substituters = {substituter}\n\
                 extra-trusted-public-keys = {keys}\nnetrc-file = {}\n",
                larder.netrc().display()
            )
        };
        assert_eq!(
            std::fs::read_to_string(larder.nix_conf()).expect("nix.conf"),
            conf_with(&old_key)
        );

        // `LARDER_TOKEN` is the pull token now; configure with the root one.
        let admin = Larder::new();
        admin.ok(&["login", "local", &server.url(), &root]).await;
        let out = admin
            .ok(&["cache", "configure", "turning", "--rotate-key"])
            .await;
        assert!(out.contains("--finish-rotation"), "{out}");
        let next_key = server_view(&server, "turning", &root)
            .await
            .next_public_key
            .expect("a next key during the rotation");
        assert!(next_key.starts_with("turning-2:"), "{next_key}");
        let info = admin.ok(&["cache", "info", "turning"]).await;
        assert!(
            info.contains(&format!("Public key: {old_key}\n"))
                && info.contains(&format!("Next public key: {next_key} (key rotation in progress")),
            "{info}"
        );

        let out = larder.ok(&["use", "turning"]).await;
        assert!(
            out.contains(&format!("added {next_key} to extra-trusted-public-keys")),
            "{out}"
        );
        assert_eq!(
            std::fs::read_to_string(larder.nix_conf()).expect("nix.conf"),
            conf_with(&format!("{old_key} {next_key}"))
        );

        admin
            .ok(&["cache", "configure", "turning", "--finish-rotation"])
            .await;
        let info = admin.ok(&["cache", "info", "turning"]).await;
        assert!(
            info.contains(&format!("Public key: {next_key}\n")) && !info.contains("Next public key"),
            "{info}"
        );
        let line = admin
            .fails(&["cache", "configure", "turning", "--finish-rotation"])
            .await;
        assert!(line.contains("no key rotation in progress"), "{line}");
        // Only the new key signs now; the Nix `use` configured trusts it.
        let nix_conf = larder.nix_conf();
        blocking(move || {
            let puller = NixEnv::with_version(version).expect("a Nix environment");
            assert_substitutes_the_same_nars(
                &puller,
                &nix_conf,
                &puller.path("destination"),
                &env,
                &store.root,
                &store.built,
            );
        })
        .await;
        drop(admin);
    }
}
