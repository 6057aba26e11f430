//! Pushing through the distributed topology: issue #5's acceptance push,
//! and a poison message.

use larder_api::duration::HumanDuration;
use larder_api::v1::UploadPathResult;
use larder_config::IngestConfig;
use larder_db::UploadPhase;
use larder_queue::CHUNK_DEAD_LETTER_QUEUE;
use tests::bench::{single_file_nar, Pusher};
use tests::cluster::{Cluster, ClusterOptions, ClusterServices};
use tests::server::{pseudo_random, HttpApi};

use super::{assert_whole, pusher_token, Pushing};
use crate::server::ok_json;
use crate::server::push::{attic_push, attic_source_info, blocking, nix_copy_to, upload, Form};

tests::under_each_nix! {
    /// A closure of at least 20 referencing paths, pushed with `nix copy --to`
    /// through one API server and with Attic's API through the other, each
    /// into its own cache; each cache is substituted back through the *other*
    /// API server into a fresh store trusting only its key, and verified. Then
    /// every process stops cleanly on SIGTERM.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distributed_nix_copy_and_attic_push_through_two_api_servers(version: NixVersion) {
        let cluster = Cluster::start(&ClusterServices::shared(), ClusterOptions::default()).await;
        let (via_nix, via_attic) = ("via-nix", "via-attic");
        cluster.create_cache(via_nix, false).await;
        cluster.create_cache(via_attic, false).await;
        let token = pusher_token(&cluster, &[via_nix, via_attic]).await;
        let pushing = Pushing::new(20, &token, version).await;
        assert!(pushing.closure.len() >= 20, "{:?}", pushing.closure);

        let url = format!("{}?compression=zstd", cluster.api(0).cache_url(via_nix));
        let pushing = blocking(move || {
            nix_copy_to(&pushing.env, &pushing.root, &url, &pushing.closure);
            pushing
        })
        .await;
        attic_push(cluster.api(1), &token, via_attic, &pushing.sources).await;

        let closure = pushing.closure.clone();
        assert_whole(&cluster, &[(via_nix, &closure), (via_attic, &closure)], &[]).await;
        let pushing = pushing
            .substitute_and_verify(cluster.api(1), &token, via_nix)
            .await;
        pushing
            .substitute_and_verify(cluster.api(0), &token, via_attic)
            .await;
        cluster.stop();
    }
}

tests::under_each_nix! {
    /// An upload whose staged NAR vanished before a chunker got to it: its
    /// chunk job ends in the dead-letter queue and the upload fails with a
    /// reason, while the uploads around it are stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distributed_a_poison_message_is_dead_lettered_and_its_upload_failed(version: NixVersion) {
        let mut cluster = Cluster::start(&ClusterServices::shared(), ClusterOptions::default()).await;
        let cache = "poison";
        cluster.create_cache(cache, false).await;
        let token = pusher_token(&cluster, &[cache]).await;
        let pushing = Pushing::new(4, &token, version).await;

        // No chunker runs while the uploads are acknowledged, so the staged
        // NAR can be taken away before its job is handled.
        let chunkers: Vec<String> = cluster
            .process_names()
            .into_iter()
            .filter(|name| name.starts_with("chunker-worker"))
            .collect();
        for chunker in &chunkers {
            cluster.kill(chunker);
        }
        for source in &pushing.sources {
            let response = upload(
                cluster.api(0),
                Some(&token),
                &attic_source_info(source, cache),
                &source.nar,
                Form::Header,
            )
            .await;
            let result: UploadPathResult = ok_json(response).await;
            assert_eq!(result.phase, "spooled", "{}", source.path);
        }
        let poisoned = pushing.closure.last().expect("a path").clone();
        let uploads = cluster.uploads().await;
        let poisoned_upload = uploads
            .iter()
            .find(|upload| upload.metadata.store_path == poisoned)
            .expect("the poisoned path's upload");
        cluster.delete_object(&poisoned_upload.staged_key).await;
        for chunker in &chunkers {
            cluster.start_again(chunker);
        }

        let uploads = assert_whole(
            &cluster,
            &[(cache, &pushing.closure)],
            std::slice::from_ref(&poisoned),
        )
        .await;
        let failed = uploads
            .iter()
            .find(|upload| upload.metadata.store_path == poisoned)
            .expect("the poisoned upload");
        assert_eq!(failed.phase, UploadPhase::Failed);
        let reason = failed.error.as_deref().unwrap_or_default();
        assert!(reason.contains("staged"), "the reason says why: {reason:?}");
        assert_eq!(cluster.queue_length(CHUNK_DEAD_LETTER_QUEUE).await, 1);

        // The API reports the failure to the pusher.
        let status: serde_json::Value = ok_json(
            cluster
                .api(1)
                .http()
                .get(
                    cluster
                        .api(1)
                        .url_of(&format!("/_api/v1/uploads/{}", failed.id)),
                )
                .bearer_auth(&token)
                .send()
                .await
                .expect("upload status"),
        )
        .await;
        assert_eq!(status["phase"], "failed", "{status}");
        cluster.stop();
    }
}

/// In this topology no API server finalises an upload: a worker process
/// does, and its `NOTIFY` through PostgreSQL wakes the push waiting in the
/// API process. The API servers read a waiting upload's row only when woken
/// (their safety net is an hour) and wait up to a minute, so a push
/// answered `done` was woken by the worker that finished it: a small NAR
/// (stored by a chunker itself) and a large one (by compressors), through
/// each API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_waiting_push_is_woken_by_the_worker_that_finishes_it() {
    let options = ClusterOptions {
        ingest: IngestConfig {
            wait_for_visible: HumanDuration::from_secs(60),
            wait_recheck_interval: HumanDuration::from_secs(3600),
            ..IngestConfig::default()
        },
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(&ClusterServices::shared(), options).await;
    let cache = "woken";
    cluster.create_cache(cache, false).await;
    let token = pusher_token(&cluster, &[cache]).await;
    for api in 0..2 {
        let pusher = Pusher::new(&cluster.api(api).url(), &token, cache).expect("a client");
        let pushes = [
            (
                format!("small-{api}"),
                pseudo_random(40 << 10, 11 + api as u64),
            ),
            (
                format!("large-{api}"),
                pseudo_random(3 << 20, 13 + api as u64),
            ),
        ];
        for (name, contents) in pushes {
            let nar = single_file_nar(&contents).expect("a NAR");
            let (_, phase) = pusher
                .upload(&pusher.info(&name, &nar), nar, None)
                .await
                .expect("a push");
            assert_eq!(
                phase.as_deref(),
                Some("done"),
                "{name} through API server {api}"
            );
        }
    }
    cluster.stop();
}
