//! Faults during pushes through the distributed topology: a chunker and a
//! compressor SIGKILLed mid-job, and RabbitMQ, Garage and PostgreSQL each
//! disturbed while uploads flow. The pusher behaves like a real client:
//! an upload answered with a 5xx or cut off is sent again a little later;
//! a 4xx fails the test. Each test ends with [`assert_whole`] and a
//! verified substitution.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tests::nix::NixVersion;

use larder_api::v1::UploadPathResult;
use larder_db::UploadPhase;
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
/// sending a path again after a 5xx or a transport error; `answered` counts
/// the requests that got an answer or were cut off, whatever the outcome.
async fn push_retrying(
    api: ApiEndpoint,
    token: String,
    sources: Vec<SourcePath>,
    answered: Arc<AtomicU32>,
) {
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
            answered.fetch_add(1, Ordering::SeqCst);
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

/// Pushes a closure of 20 paths through a stop and a start of `service`
/// (of `private`), then checks that everything arrived whole and can be
/// substituted through the other API server. Three paths are acknowledged
/// before the stop; the other 17 are sent only once the service is down,
/// and it comes back once the push has met the fault: the API answered (or
/// cut off) one of those requests, or, with the database up, recorded an
/// upload whose job it could not publish or store yet. So the fault always
/// lands in the middle of the push, however fast the machine: no race
/// between the push and the fault.
async fn push_through(
    cluster: &Cluster,
    private: &PrivateServices,
    service: &str,
    version: NixVersion,
) {
    cluster.create_cache(CACHE, false).await;
    let token = pusher_token(cluster, &[CACHE]).await;
    let pushing = Pushing::new(20, &token, version).await;
    let (before, during) = pushing.sources.split_at(3);
    push_retrying(
        cluster.api(0).clone(),
        token.clone(),
        before.to_vec(),
        Arc::default(),
    )
    .await;
    let recorded_before = cluster.uploads().await.len();
    private.ctl(&format!("stop-{service}")).await;
    let answered = Arc::new(AtomicU32::new(0));
    let push = tokio::spawn(push_retrying(
        cluster.api(0).clone(),
        token.clone(),
        during.to_vec(),
        answered.clone(),
    ));
    // A hang guard only: an answer may wait for the API's own timeouts
    // (the database pool's, or the wait for visibility).
    let mut polls = 0;
    loop {
        if answered.load(Ordering::SeqCst) > 0 {
            break;
        }
        if service != "postgres" && cluster.uploads().await.len() > recorded_before {
            break;
        }
        polls += 1;
        assert!(
            polls < 1800,
            "the push did not meet the fault in 3 minutes with {service} down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    private.ctl(&format!("start-{service}")).await;
    push.await.expect("the push");
    assert_whole(cluster, &[(CACHE, &pushing.closure)], &[]).await;
    pushing
        .substitute_and_verify(cluster.api(1), &token, CACHE)
        .await;
}

tests::under_each_nix! {
    /// Every worker loses its broker connection and subscribes again by
    /// itself; publishing (the API's chunk jobs, the chunkers' compress jobs)
    /// connects again too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_restart_rabbitmq_during_a_push(version: NixVersion) {
        let private = PrivateServices::start(&["rabbitmq"]).await;
        let services = ClusterServices::shared().with_private(&private);
        let mut cluster = Cluster::start(&services, ClusterOptions::default()).await;
        push_through(&cluster, &private, "rabbitmq", version).await;
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
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_stop_garage_during_a_push(version: NixVersion) {
        let private = PrivateServices::start(&["garage"]).await;
        let services = ClusterServices::shared().with_private(&private);
        let cluster = Cluster::start(&services, ClusterOptions::default()).await;
        push_through(&cluster, &private, "garage", version).await;
        cluster.stop();
        private.stop().await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_restart_postgres_during_a_push(version: NixVersion) {
        let private = PrivateServices::start(&["postgres"]).await;
        let services = ClusterServices::shared().with_private(&private);
        let cluster = Cluster::start(&services, ClusterOptions::default()).await;
        push_through(&cluster, &private, "postgres", version).await;
        cluster.stop();
        private.stop().await;
    }
}

tests::under_each_nix! {
    /// Two large paths keep both chunkers, then both compressors busy; one of
    /// each is SIGKILLed in the middle of its job and started again. Its
    /// deliveries go back to the queue and are done again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_sigkill_a_chunker_and_a_compressor_mid_job(version: NixVersion) {
        let mut cluster = Cluster::start(&ClusterServices::shared(), ClusterOptions::default()).await;
        cluster.create_cache(CACHE, false).await;
        let token = pusher_token(&cluster, &[CACHE]).await;
        let pushing = Pushing::with_large_paths(4, &[24, 24], &token, version).await;
        // The large paths first, so both chunkers take one at once.
        let mut sources = pushing.sources.clone();
        sources.sort_by_key(|source| std::cmp::Reverse(source.nar.len()));
        let push = tokio::spawn(push_retrying(
            cluster.api(0).clone(),
            token.clone(),
            sources[..1].to_vec(),
            Arc::default(),
        ));
        let push_other = tokio::spawn(push_retrying(
            cluster.api(1).clone(),
            token.clone(),
            sources[1..].to_vec(),
            Arc::default(),
        ));

        let chunker = kill_mid_job(
            &mut cluster,
            &["chunker-worker-1", "chunker-worker-2"],
            UploadPhase::Chunking,
            2,
        )
        .await;
        // Compress jobs go out while a NAR is still being cut, so the gate is
        // the other chunker at work, not a path done with cutting (by then
        // most of its compress jobs are done too).
        let compressor = kill_mid_job(
            &mut cluster,
            &["compressor-worker-1", "compressor-worker-2"],
            UploadPhase::Chunking,
            1,
        )
        .await;
        cluster.start_again(chunker);
        cluster.start_again(compressor);

        push.await.expect("the push");
        push_other.await.expect("the other push");
        assert_whole(&cluster, &[(CACHE, &pushing.closure)], &[]).await;
        pushing
            .substitute_and_verify(cluster.api(1), &token, CACHE)
            .await;
        cluster.stop();
    }
}

/// How many times [`kill_mid_job`] may find every worker between jobs.
const KILL_ATTEMPTS: u32 = 100;

/// SIGKILLs one of `workers` (all of one kind) in the middle of a job, and
/// returns its name: once `n` uploads are in `phase`, freezes each in turn
/// (SIGSTOP, so it finishes nothing meanwhile), asks RabbitMQ whether it
/// holds a delivery, and kills the first that does; one between jobs is
/// thawed. When all were between jobs, it says so and tries again shortly
/// (at most `KILL_ATTEMPTS` times). A kill between jobs would test nothing.
async fn kill_mid_job<'a>(
    cluster: &mut Cluster,
    workers: &[&'a str],
    phase: UploadPhase,
    n: usize,
) -> &'a str {
    wait_for_phase(cluster, phase, n).await;
    for attempt in 1..=KILL_ATTEMPTS {
        for &name in workers {
            cluster.freeze(name, true);
            let held = cluster.unacknowledged_deliveries(name).await;
            if held > 0 {
                cluster.kill(name);
                eprintln!("killed {name} holding {held} deliveries (attempt {attempt})");
                return name;
            }
            cluster.freeze(name, false);
        }
        eprintln!("{workers:?} held no delivery when frozen (attempt {attempt}); trying again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{workers:?} were between jobs at each of {KILL_ATTEMPTS} attempts");
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
