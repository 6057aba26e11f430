//! GC racing real pushes: overlapping closures pushed with `nix copy` to
//! three caches while GC runs in a loop with a tiny retention on one of
//! them; what is still advertised must substitute and verify with real
//! Nix, and after a final run storage holds exactly the referenced chunk
//! objects.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use gc_scheduler::gc::collect_garbage_locked;
use larder_db::{Database, StoreState, Timestamp};
use larder_nix::signing::SecretKey;
use larder_storage::Storage;
use larder_token::Permission;
use sqlx::Row;
use tests::nix::NixEnv;
use tests::server::{TestServer, TestServerOptions};

use super::{eager_gc, HOUR};
use crate::server::push::nix_copy_to;

const CACHES: [&str; 3] = ["brief", "left", "right"];

async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(step)
        .await
        .expect("the Nix step panicked")
}

async fn public_key(server: &TestServer, cache: &str) -> String {
    let cache = server
        .database()
        .cache_by_name(&cache.parse().expect("name"))
        .await
        .expect("lookup")
        .expect("cache");
    SecretKey::parse(cache.keypair.expose_secret())
        .expect("the cache's key")
        .to_public()
        .to_string()
}

/// The store paths a cache advertises now.
async fn advertised(database: &Database, cache: &str) -> Vec<String> {
    let cache = database
        .cache_by_name(&cache.parse().expect("name"))
        .await
        .expect("lookup")
        .expect("cache");
    database
        .objects_of_cache(cache.id)
        .await
        .expect("objects")
        .into_iter()
        .map(|object| object.metadata.store_path)
        .collect()
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn heavy_gc_racing_pushes_never_breaks_an_advertised_path(version: NixVersion) {
        let server = TestServer::start(TestServerOptions {
            gc: eager_gc(),
            ..TestServerOptions::default()
        })
        .await;
        for cache in CACHES {
            server.create_cache(cache, false).await;
        }
        crate::gc::end_to_end::set_retention(server.database(), "brief", Duration::from_secs(1)).await;
        let grants: Vec<(&str, &[Permission])> = CACHES
            .iter()
            .map(|cache| (*cache, [Permission::Pull, Permission::Push].as_slice()))
            .collect();
        let token = server.mint("pusher", HOUR, &grants).await;

        let (env, root, paths) = blocking(move || {
            let mut env = NixEnv::with_version(version).expect("a Nix environment");
            let salt = format!("gc-stress-{:016x}", rand::random::<u64>());
            let store = env
                .make_store(&env.path("source"), 12, &salt)
                .expect("a store of referencing paths");
            env.use_netrc("127.0.0.1", &token).expect("a netrc");
            env.add_config("narinfo-cache-positive-ttl", "0");
            env.add_config("narinfo-cache-negative-ttl", "0");
            (env, store.root.clone(), store.paths)
        })
        .await;

        // GC in a loop, as fast as it goes, until the pushes are done.
        let stop = CancellationToken::new();
        let storage: Arc<dyn Storage> = Arc::new(server.storage().clone());
        let expired = Arc::new(AtomicU64::new(0));
        let collector = tokio::spawn({
            let (database, storage, stop, expired) = (
                server.database().clone(),
                storage.clone(),
                stop.clone(),
                expired.clone(),
            );
            async move {
                while !stop.is_cancelled() {
                    let report =
                        collect_garbage_locked(&database, &*storage, &eager_gc(), Timestamp::now())
                            .await
                            .expect("a GC run")
                            .expect("the only collector");
                    expired.fetch_add(report.objects, Ordering::Relaxed);
                }
            }
        });

        // Overlapping closures, rounds of them, each to every cache: `brief`
        // loses its paths within a second, so later rounds push them again
        // while GC deletes NARs and chunks the other caches may share. At
        // least four rounds, and on until GC has expired some of `brief`'s
        // paths (pushes can be quicker than its retention): the race this
        // test is about needs both.
        let halves = [paths[..8].to_vec(), paths[4..].to_vec()];
        let env = Arc::new(env);
        let mut repeated_copies = 0;
        for round in 0.. {
            if round >= 4 && expired.load(Ordering::Relaxed) > 0 {
                break;
            }
            // A hang guard: a second's retention expires within a few rounds.
            assert!(
                round < 200,
                "GC expired nothing in {round} rounds of pushes"
            );
            for (i, cache) in CACHES.iter().enumerate() {
                let subset = halves[(round + i) % 2].clone();
                let (env, root, url) = (
                    env.clone(),
                    root.clone(),
                    format!("{}?compression=zstd", server.cache_url(cache)),
                );
                // Nix refuses to upload a path whose reference the cache no
                // longer has, and with a 1 s retention GC can take a reference
                // in the middle of a copy to `brief`: that copy is repeated
                // (it uploads the reference again). The other caches keep
                // everything, so their copies must succeed at once.
                // Each repeat is reported with the error that caused it.
                let attempts = if *cache == "brief" { 5 } else { 1 };
                repeated_copies += blocking(move || {
                    let mut attempt = 1;
                    while let Err(error) = env.copy_to(&root, &url, &subset) {
                        assert!(attempt < attempts, "nix copy --to {url}: {error}");
                        eprintln!("round {round}: nix copy --to {url} repeated after: {error}");
                        attempt += 1;
                    }
                    attempt - 1
                })
                .await;
            }
        }
        stop.cancel();
        collector.await.expect("the GC loop");
        let expired = expired.load(Ordering::Relaxed);
        assert!(expired > 0, "GC removed nothing while the pushes ran");
        eprintln!("{repeated_copies} copies to brief were repeated; GC expired {expired} paths");

        // `brief` may have lost everything to its retention by now: push a
        // closure to it once more with GC stopped, so that every cache has
        // something to verify below. First the server's memory of narinfos it
        // rendered before GC's last deletions must lapse (this collector runs
        // beside the server and cannot clear it): Nix would take such a
        // narinfo for a path still there and not push it.
        tokio::time::sleep(ingest_api::READ_CACHE_TIME_TO_LIVE).await;
        {
            let (env, root, url) = (
                env.clone(),
                root.clone(),
                format!("{}?compression=zstd", server.cache_url("brief")),
            );
            let subset = halves[0].clone();
            blocking(move || nix_copy_to(&env, &root, &url, &subset)).await;
        }

        // Whatever a cache advertises now downloads and verifies. A cache
        // with a retention period may have lost a path's references (GC is
        // not closure-aware), so `brief`'s paths are verified one by one
        // (`nix store verify` downloads each NAR and checks its hash and
        // signature); the other caches' closures are substituted whole.
        for cache in CACHES {
            let listed = advertised(server.database(), cache).await;
            assert!(!listed.is_empty(), "{cache} advertises nothing to verify");
            let (env, key, url) = (
                env.clone(),
                public_key(&server, cache).await,
                server.cache_url(cache),
            );
            let destination: PathBuf = env.path(&format!("from-{cache}"));
            let whole_closures = cache != "brief";
            blocking(move || {
                if whole_closures {
                    env.copy_from(&url, &destination, &key, &listed)
                        .unwrap_or_else(|error| panic!("substituting from {url}: {error}"));
                }
                let verified = env
                    .store_verify(&url, &key, &listed)
                    .expect("nix store verify");
                assert!(verified.status.success(), "{url}: {verified:?}");
            })
            .await;
        }

        // A final run, then storage and database agree exactly.
        collect_garbage_locked(server.database(), &*storage, &eager_gc(), Timestamp::now())
            .await
            .expect("the final GC run")
            .expect("the only collector");
        let listed: BTreeSet<String> = crate::gc::end_to_end::chunk_objects(&*storage)
            .await
            .into_iter()
            .map(|key| key.to_string())
            .collect();
        // Packs compaction retired wait out their grace before they go.
        let mut referenced: BTreeSet<String> =
            sqlx::query_scalar("SELECT object_key FROM packs WHERE retired_at IS NOT NULL")
                .fetch_all(server.database().pool())
                .await
                .expect("listing retired packs")
                .into_iter()
                .collect();
        for row in sqlx::query("SELECT state, object_key FROM chunks")
            .fetch_all(server.database().pool())
            .await
            .expect("reading chunk rows")
        {
            let state: String = row.try_get("state").expect("state");
            let key: Option<String> = row.try_get("object_key").expect("object key");
            assert_eq!(state, StoreState::Valid.as_str(), "a chunk left {state}");
            referenced.insert(key.expect("a valid chunk's location"));
        }
        assert!(
            !referenced.is_empty(),
            "the other caches still hold their paths"
        );
        assert_eq!(
            listed, referenced,
            "storage holds exactly the referenced packs and the retired ones"
        );
        server.stop().await;
    }
}
