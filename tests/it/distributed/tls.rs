//! The whole distributed topology over TLS: every process reaches
//! PostgreSQL with `sslmode=verify-full`, RabbitMQ over `amqps://` and S3
//! through the TLS terminator, each trusting the throwaway CA by its own
//! setting (`sslrootcert`, `[queue] ca-file`, `[storage] ca-file`).

use tests::cluster::{Cluster, ClusterOptions, ClusterServices};
use tests::server::HttpApi;

use super::{assert_whole, pusher_token, Pushing};
use crate::server::push::{blocking, nix_copy_to};

tests::under_each_nix! {
    /// A closure with a path larger than one multipart part (so the staged NAR
    /// goes to S3 as a multipart upload through the terminator) is pushed with
    /// `nix copy` through one API server, stored whole by the workers, and
    /// substituted back through the other one and verified. Meanwhile every
    /// database and broker connection of the cluster was encrypted, by the
    /// servers' own account: with TLS off anywhere, a check below fails (S3's
    /// terminator speaks nothing but TLS).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distributed_push_and_substitute_with_every_service_over_tls(version: NixVersion) {
        let cluster = Cluster::start(
            &ClusterServices::shared_over_tls(),
            ClusterOptions::default(),
        )
        .await;
        let cache = "over-tls";
        cluster.create_cache(cache, false).await;
        let token = pusher_token(&cluster, &[cache]).await;
        let pushing = Pushing::with_large_paths(8, &[12], &token, version).await;

        let url = format!("{}?compression=zstd", cluster.api(0).cache_url(cache));
        let pushing = blocking(move || {
            nix_copy_to(&pushing.env, &pushing.root, &url, &pushing.closure);
            pushing
        })
        .await;
        let closure = pushing.closure.clone();
        assert_whole(&cluster, &[(cache, &closure)], &[]).await;
        pushing
            .substitute_and_verify(cluster.api(1), &token, cache)
            .await;

        let postgres = cluster.postgres_connections_over_tls().await;
        assert!(
            !postgres.is_empty(),
            "PostgreSQL lists the cluster's connections"
        );
        assert!(postgres.iter().all(|tls| *tls), "PostgreSQL: {postgres:?}");
        let rabbitmq = cluster.rabbitmq_connections_over_tls().await;
        assert!(
            !rabbitmq.is_empty(),
            "RabbitMQ lists the cluster's connections"
        );
        assert!(rabbitmq.iter().all(|tls| *tls), "RabbitMQ: {rabbitmq:?}");
        cluster.stop();
    }
}
