//! Faults during pushes through the distributed topology: a chunker and a
//! compressor SIGKILLed mid-job, and RabbitMQ, Garage and PostgreSQL each
//! disturbed while uploads flow. The pusher behaves like a real client:
//! an upload answered with a 5xx or cut off is sent again a little later;
//! a 4xx fails the test. Each test ends with [`assert_whole`] and a
//! verified substitution.

use std::time::Duration;

use common::api::UploadPathResult;
use common::db::UploadPhase;
use reqwest::StatusCode;
use tests::cluster::{ApiEndpoint, Cluster, ClusterOptions, ClusterServices};
use tests::server::HttpApi;
use tests::services::PrivateServices;

use super::{assert_whole, pusher_token, Pushing};
use crate::server::push::attic_source_info;
use crate::server::SourcePath;

const CACHE: &str = "faults";

/// How often one path is sent before the test gives up.
const SEND_ATTEMPTS: u32 = 30;
/// The pause before sending a path again.
const RESEND_AFTER: Duration = Duration::from_secs(2);

/// Pushes `sources` in order through Attic's `upload-path` on `api`,
/// sending a path again after a 5xx or a transport error.
async fn push_retrying(api: ApiEndpoint, token: String, sources: Vec<SourcePath>) {
    for source in &sources {
        let info = attic_source_info(source, CACHE).to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = api
                .http()
                .put(api.url_of("/_api/v1/upload-path"))
                .bearer_auth(&token)
                .header("X-Attic-Nar-Info", &info)
                .body(source.nar.clone())
                .send()
                .await;
            let failure = match sent {
                Ok(response) if response.status() == StatusCode::OK => {
                    let result: UploadPathResult = response.json().await.expect("a push result");
                    // Not yet visible when the wait ran out is fine: the
                    // final checks wait for it.
                    assert_ne!(result.phase, "failed", "{}", source.path);
                    break;
                }
                Ok(response) if response.status().is_server_error() => {
                    format!(
                        "{}: {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    )
                }
                Ok(response) => panic!(
                    "{}: {} {}",
                    source.path,
                    response.status(),
                    response.text().await.unwrap_or_default()
                ),
                Err(error) => error.to_string(),
            };
            assert!(
                attempt < SEND_ATTEMPTS,
                "{}: still failing after {attempt} attempts: {failure}",
                source.path
            );
            tokio::time::sleep(RESEND_AFTER).await;
        }
    }
}

/// Waits until at least `n` uploads were acknowledged.
async fn wait_for_uploads(cluster: &Cluster, n: usize) {
    for _ in 0..600 {
        if cluster.uploads().await.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} uploads after a minute");
}

/// Pushes a closure of 20 paths while `disturb` runs once 3 are
/// acknowledged, then checks that everything arrived whole and can be
/// substituted through the other API server.
async fn push_through(cluster: &Cluster, disturb: impl std::future::Future<Output = ()>) {
    cluster.create_cache(CACHE, false).await;
    let token = pusher_token(cluster, &[CACHE]).await;
    let pushing = Pushing::new(20, &token).await;
    let push = tokio::spawn(push_retrying(
        cluster.api(0).clone(),
        token.clone(),
        pushing.sources.clone(),
    ));
    wait_for_uploads(cluster, 3).await;
    assert!(!push.is_finished(), "the push ended before the fault");
    disturb.await;
    push.await.expect("the push");
    assert_whole(cluster, &[(CACHE, &pushing.closure)], &[]).await;
    pushing
        .substitute_and_verify(cluster.api(1), &token, CACHE)
        .await;
}

/// Every worker loses its broker connection and subscribes again by
/// itself; publishing (the API's chunk jobs, the chunkers' compress jobs)
/// connects again too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_restart_rabbitmq_during_a_push() {
    let private = PrivateServices::start(&["rabbitmq"]).await;
    let services = ClusterServices::shared().with_private(&private);
    let mut cluster = Cluster::start(&services, ClusterOptions::default()).await;
    push_through(&cluster, private.ctl("restart-rabbitmq")).await;
    for worker in [
        "chunker-worker-1",
        "chunker-worker-2",
        "compressor-worker-1",
        "compressor-worker-2",
    ] {
        let messages = cluster.log_messages(worker);
        assert!(
            messages
                .iter()
                .any(|message| message == "queue consumer subscribed again"),
            "{worker} did not notice the restart: {messages:?}"
        );
    }
    cluster.stop();
    private.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_stop_garage_for_20_seconds_during_a_push() {
    let private = PrivateServices::start(&["garage"]).await;
    let services = ClusterServices::shared().with_private(&private);
    let cluster = Cluster::start(&services, ClusterOptions::default()).await;
    push_through(&cluster, async {
        private.ctl("stop-garage").await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        private.ctl("start-garage").await;
    })
    .await;
    cluster.stop();
    private.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_restart_postgres_during_a_push() {
    let private = PrivateServices::start(&["postgres"]).await;
    let services = ClusterServices::shared().with_private(&private);
    let cluster = Cluster::start(&services, ClusterOptions::default()).await;
    push_through(&cluster, private.ctl("restart-postgres")).await;
    cluster.stop();
    private.stop().await;
}

/// Two large paths keep both chunkers, then both compressors busy; one of
/// each is SIGKILLed in the middle of its job and started again. Its
/// deliveries go back to the queue and are done again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sigkill_a_chunker_and_a_compressor_mid_job() {
    let mut cluster = Cluster::start(&ClusterServices::shared(), ClusterOptions::default()).await;
    cluster.create_cache(CACHE, false).await;
    let token = pusher_token(&cluster, &[CACHE]).await;
    let pushing = Pushing::with_large_paths(4, &[24, 24], &token).await;
    // The large paths first, so both chunkers take one at once.
    let mut sources = pushing.sources.clone();
    sources.sort_by_key(|source| std::cmp::Reverse(source.nar.len()));
    let push = tokio::spawn(push_retrying(
        cluster.api(0).clone(),
        token.clone(),
        sources[..1].to_vec(),
    ));
    let push_other = tokio::spawn(push_retrying(
        cluster.api(1).clone(),
        token.clone(),
        sources[1..].to_vec(),
    ));

    wait_for_phase(&cluster, UploadPhase::Chunking, 2).await;
    cluster.kill("chunker-worker-1");
    wait_for_phase(&cluster, UploadPhase::Compressing, 1).await;
    cluster.kill("compressor-worker-1");
    cluster.start_again("chunker-worker-1");
    cluster.start_again("compressor-worker-1");

    push.await.expect("the push");
    push_other.await.expect("the other push");
    assert_whole(&cluster, &[(CACHE, &pushing.closure)], &[]).await;
    pushing
        .substitute_and_verify(cluster.api(1), &token, CACHE)
        .await;
    cluster.stop();
}

/// Waits until at least `n` uploads are in `phase` at once.
async fn wait_for_phase(cluster: &Cluster, phase: UploadPhase, n: usize) {
    for _ in 0..1200 {
        let uploads = cluster.uploads().await;
        if uploads
            .iter()
            .filter(|upload| upload.phase == phase)
            .count()
            >= n
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} uploads in phase {phase} within a minute");
}
