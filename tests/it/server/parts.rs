//! The one-machine server (`ingest-api`'s monolithic role, pipeline in
//! process) on the real parts its documentation offers beside the defaults:
//! RabbitMQ as its queue, and S3 (Garage) as its storage, read back after
//! its own pipeline wrote the chunks. Every other `TestServer` runs on the
//! embedded queue and local disk, and the read tests seed their chunks
//! through the store layer; these push a closure through Attic's API and
//! have the real Nix client substitute and verify it.

use larder_config::{QueueConfig, Secret, StorageConfig};
use larder_token::Permission;
use tests::nix::NixVersion;
use tests::server::{TestServer, TestServerOptions};
use tests::services::{self, S3Settings};

use super::push::attic_push;
use super::HOUR;
use crate::server::pushing::Pushing;

/// Pushes a closure of a few paths, one of them 2 MiB (cut into several
/// chunks), to a new cache of `server`, each path answered once visible,
/// then substitutes it with Nix into a fresh store, trusting only the
/// cache's key, and verifies it.
async fn push_and_substitute(server: &TestServer, cache: &str, version: NixVersion) {
    server.create_cache(cache, false).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[(cache, &[Permission::Pull, Permission::Push])],
        )
        .await;
    let pushing = Pushing::with_large_paths(3, &[2], &token, version).await;
    attic_push(server, &token, cache, &pushing.sources).await;
    pushing.substitute_and_verify(server, &token, cache).await;
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_monolithic_server_on_rabbitmq_runs_its_pipeline_through_the_broker(version: NixVersion) {
        // A virtual host of its own: the pipeline's queue names are fixed.
        let vhost = services::unique_name("monolithic");
        services::add_rabbitmq_vhost(&services::services_dir(), &vhost).await;
        let url = tests::cluster::with_vhost(&services::amqp_url(), &vhost);
        let server = TestServer::start(TestServerOptions {
            edit_config: Some(std::sync::Arc::new(move |config| {
                config.queue = QueueConfig::Amqp {
                    url: Secret::new(url.clone()),
                    ca_file: None,
                };
            })),
            ..TestServerOptions::default()
        })
        .await;
        push_and_substitute(&server, "brokered", version).await;

        // The jobs went through the broker: the work queues exist in the
        // server's virtual host, drained, and nothing was dead-lettered (or
        // waits in a retry queue, `QUEUE.retry.MS`, should a job have failed
        // once).
        let listed = services::services_ctl_in(
            &services::services_dir(),
            &[
                "rabbitmqctl",
                "list_queues",
                "-p",
                &vhost,
                "--no-table-headers",
                "name",
                "messages",
            ],
        )
        .await;
        let queues: Vec<(&str, &str)> = listed
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .collect();
        let mut work_queues: Vec<(&str, &str)> = queues
            .iter()
            .copied()
            .filter(|(name, _)| !name.contains(".retry."))
            .collect();
        work_queues.sort_unstable();
        assert_eq!(
            work_queues,
            [
                ("larder.chunk", "0"),
                ("larder.chunk.dead", "0"),
                ("larder.compress", "0"),
                ("larder.compress.dead", "0"),
            ],
            "{listed}"
        );
        assert!(
            queues.iter().all(|(_, messages)| *messages == "0"),
            "{listed}"
        );
        server.stop().await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_on_s3_serves_the_chunks_its_pipeline_wrote(version: NixVersion) {
        let settings = S3Settings::from_env();
        let prefix = format!("{}/", services::unique_name("server-s3"));
        let storage = StorageConfig::S3(settings.storage_config(&prefix));
        let server = TestServer::start(TestServerOptions {
            edit_config: Some(std::sync::Arc::new(move |config| {
                config.storage = storage.clone();
            })),
            ..TestServerOptions::default()
        })
        .await;
        push_and_substitute(&server, "on-s3", version).await;

        // What was served came from the bucket: the packs the chunk rows
        // point into, under the server's prefix, and nothing on local disk.
        let chunk_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chunks")
            .fetch_one(server.database().pool())
            .await
            .expect("counting chunk rows");
        let mut chunk_keys: Vec<String> = sqlx::query_scalar("SELECT DISTINCT object_key FROM chunks")
            .fetch_all(server.database().pool())
            .await
            .expect("listing chunk objects");
        chunk_keys.sort();
        let listed = settings
            .client()
            .list_objects_v2()
            .bucket(&settings.bucket)
            .prefix(format!("{prefix}packs/"))
            .send()
            .await
            .expect("listing the bucket");
        assert!(
            chunk_rows > 3,
            "a 2 MiB path is several chunks: {chunk_rows}"
        );
        let mut stored: Vec<String> = listed
            .contents()
            .iter()
            .filter_map(|object| object.key()?.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        stored.sort();
        assert_eq!(stored, chunk_keys, "the chunks' packs, all in the bucket");
        assert_eq!(
            tests::server::count_files(&server.dir().join("storage")),
            0,
            "the server wrote to local disk"
        );
        server.stop().await;
    }
}

tests::under_each_nix! {
    /// `[storage] staging-path`: the same server on S3 stages pushed NARs in a
    /// local directory, so the bucket only ever receives packs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_on_s3_with_local_staging_keeps_staged_nars_out_of_the_bucket(version: NixVersion) {
        let settings = S3Settings::from_env();
        let prefix = format!("{}/", services::unique_name("server-s3-staging"));
        let staging = tempfile::tempdir().expect("a staging directory");
        let mut s3 = settings.storage_config(&prefix);
        s3.staging_path = Some(staging.path().to_owned());
        let storage = StorageConfig::S3(s3);
        let server = TestServer::start(TestServerOptions {
            edit_config: Some(std::sync::Arc::new(move |config| {
                config.storage = storage.clone();
            })),
            ..TestServerOptions::default()
        })
        .await;
        push_and_substitute(&server, "staged-locally", version).await;

        let listed = settings
            .client()
            .list_objects_v2()
            .bucket(&settings.bucket)
            .prefix(&prefix)
            .send()
            .await
            .expect("listing the bucket");
        let keys: Vec<&str> = listed
            .contents()
            .iter()
            .filter_map(|object| object.key()?.strip_prefix(&prefix))
            .collect();
        assert!(!keys.is_empty(), "the chunks are in the bucket");
        assert!(
            keys.iter().all(|key| key.starts_with("packs/")),
            "only packs in the bucket: {keys:?}"
        );
        assert!(
            staging.path().join("staging").is_dir(),
            "the pushes were staged in the local directory"
        );
        server.stop().await;
    }
}
