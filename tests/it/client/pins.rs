//! `larder pin create|list|delete` and `larder push --pin` against the
//! real server, with a closure a real Nix built: the references GC follows
//! from the pinned root are the ones `nix path-info` reported.

use std::time::Duration;

use larder_db::CacheUpdate;
use tests::server::TestServer;

use super::{blocking, store_config, Larder};
use crate::server::{gc_two_days_on, store_with_a_built_path};

/// How many paths `cache` holds.
async fn paths_in(server: &TestServer, cache: &str) -> usize {
    server.objects(cache).await.len()
}

tests::under_each_nix! {
    /// Push with `--pin`, pin, list, unpin; GC keeps exactly what a pin
    /// still holds.
    #[tokio::test]
    async fn pin_commands_and_push_with_a_pin(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let (env, store) = store_with_a_built_path(version, "pinned").await;
        // Signed by a key a cache below calls upstream's.
        let (root, source_path) = (store.root.clone(), store.sources[0].clone());
        // The store lives in `env`'s directory: `env` comes back.
        let _env = blocking(move || {
            let key = env.keygen("upstream-pin-1").expect("an upstream key");
            env.sign(&root, &key.secret_key_file, &[source_path])
                .expect("signing a source path");
            env
        })
        .await;
        let root_token = server.root_token().await;
        let mut larder = Larder::with_nix(version);
        larder.set_env("NIX_CONFIG", &store_config(&store.root));
        larder
            .ok(&["login", "local", &server.url(), &root_token])
            .await;
        larder.ok(&["cache", "create", "pinned"]).await;
        let top = store.built[0].as_str();
        let source = store.sources[0].as_str();

        // One root only, refused before anything is pushed.
        let line = larder
            .fails(&["push", "pinned", top, source, "--pin", "main"])
            .await;
        assert!(line.contains("--pin pins one path"), "{line}");
        assert_eq!(paths_in(&server, "pinned").await, 0);

        let out = larder
            .ok(&["push", "pinned", top, "--pin", "main", "--keep-revisions", "2"])
            .await;
        assert!(
            out.contains(&format!("pinned {top} as main revision 1 in cache pinned")),
            "{out}"
        );
        let closure = paths_in(&server, "pinned").await;
        assert!(closure >= 2, "the built path has references: {closure}");

        // A base name, pinned remotely, under a second name.
        let base_name = source.rsplit('/').next().expect("a base name");
        let out = larder
            .ok(&["pin", "create", "pinned", "source", base_name, "--forever"])
            .await;
        assert!(out.contains("as source revision 1"), "{out}");
        let list = larder.ok(&["pin", "list", "pinned"]).await;
        assert!(list.contains("main (keeps the newest 2 revisions)"), "{list}");
        assert!(list.contains("source (keeps every revision)"), "{list}");
        assert!(list.contains(top) && list.contains("by root"), "{list}");

        // A bad name never reaches the server: clap refuses it (status 2).
        let refused = larder.run(&["pin", "create", "pinned", "bad/name", top]).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("contains '/'"), "{stderr}");
        let line = larder.fails(&["pin", "delete", "pinned", "nothing"]).await;
        assert!(line.contains("no such pin"), "{line}");
        larder.ok(&["pin", "delete", "pinned", "source"]).await;

        // Everything is past a 1-second retention, and the pin keeps the
        // closure Nix reported.
        server
            .database()
            .update_cache(
                &"pinned".parse().expect("a cache name"),
                &CacheUpdate {
                    retention_period: Some(Some(Duration::from_secs(1))),
                    ..CacheUpdate::default()
                },
            )
            .await
            .expect("setting the retention period");
        let report = gc_two_days_on(&server).await;
        assert_eq!(report.objects, 0, "{report:?}");
        assert_eq!(paths_in(&server, "pinned").await, closure);

        let out = larder.ok(&["pin", "delete", "pinned", "main"]).await;
        assert!(out.contains("deleted pin main of cache pinned"), "{out}");
        assert!(larder.ok(&["pin", "list", "pinned"]).await.contains("no pins"));
        let report = gc_two_days_on(&server).await;
        assert_eq!(report.objects as usize, closure, "{report:?}");
        assert_eq!(paths_in(&server, "pinned").await, 0);

        // A root the push leaves out as upstream's cannot be pinned; the
        // error says how to push it.
        larder
            .ok(&["cache", "create", "filtered", "--upstream-cache-key-name", "upstream-pin-1"])
            .await;
        let line = larder.fails(&["push", "filtered", source, "--pin", "main"]).await;
        assert!(line.contains("--ignore-upstream-cache-filter"), "{line}");
        let pushed = [source, "--pin", "main", "--ignore-upstream-cache-filter"];
        let out = larder.ok(&[&["push", "filtered"][..], &pushed[..]].concat()).await;
        assert!(out.contains("as main revision 1 in cache filtered"), "{out}");
    }
}
