//! The queue conformance suite: every behaviour of `larder_queue::Queue`
//! written once and run against both backends, the embedded one
//! (`queue::embedded::…`) and RabbitMQ (`queue::amqp::…`, and again over
//! TLS: `queue::amqps::…`), each test on queues of its own. Retry delays are
//! short so the suite stays fast.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use larder_queue::{
    dead_letter_queue, AmqpQueue, Consumer, Delivery, EmbeddedQueue, Queue, QueueError,
};
use larder_tls::CaFile;
use tests::services;

/// How long to wait for a delivery that should come (a hang guard).
const ARRIVAL: Duration = Duration::from_secs(10);
/// The payload of the marker message [`assert_quiet`] publishes.
const MARKER: &[u8] = b"marker";

fn embedded() -> Arc<dyn Queue> {
    Arc::new(EmbeddedQueue::new())
}

fn amqp() -> Arc<dyn Queue> {
    Arc::new(AmqpQueue::new(
        &services::amqp_url(),
        None,
        "larder-tests-queue",
    ))
}

/// RabbitMQ's AMQPS listener, trusting the throwaway CA through a CA file.
fn amqps() -> Arc<dyn Queue> {
    let ca_file = CaFile::read(&services::tls_ca_file()).expect("the throwaway CA");
    Arc::new(AmqpQueue::new(
        &services::amqps_url(),
        Some(&ca_file),
        "larder-tests-queue-tls",
    ))
}

fn queue_name() -> String {
    services::unique_name("larder-it-queue")
}

/// The next delivery, failing the test if none arrives in [`ARRIVAL`].
async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(ARRIVAL, consumer.next())
        .await
        .expect("a delivery within the arrival timeout")
        .expect("the consumer stream is open")
}

/// Fails the test if `consumer` (which must have room for one more
/// delivery) has anything to receive from queue `name` before a marker
/// message published now: a message still due would come first. An event,
/// not a window of time in which nothing happened to arrive.
async fn assert_quiet(queue: &dyn Queue, name: &str, consumer: &mut Consumer) {
    queue.publish(name, MARKER, "marker").await.unwrap();
    let delivery = next(consumer).await;
    assert_eq!(
        delivery.payload(),
        MARKER,
        "expected no delivery before the marker, got {delivery:?}"
    );
    delivery.ack().await.unwrap();
}

/// Instantiates each behaviour for both backends.
macro_rules! conformance {
    ($($behaviour:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::$behaviour(super::embedded()).await;
                }
            )*
        }
        mod amqp {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::$behaviour(super::amqp()).await;
                }
            )*
        }
        mod amqps {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::$behaviour(super::amqps()).await;
                }
            )*
        }
    };
}

conformance!(
    a_message_round_trips_with_its_trace_id_and_an_ack_removes_it,
    prefetch_bounds_the_unacked_deliveries_in_flight,
    retry_redelivers_after_the_delay_with_the_next_attempt,
    dead_letter_moves_the_message_to_the_dead_letter_queue_with_its_reason,
    unacked_deliveries_of_a_dropped_consumer_go_to_another_consumer,
    two_concurrent_consumers_process_each_message_exactly_once,
    depth_counts_the_messages_waiting_and_check_answers,
);

async fn depth_counts_the_messages_waiting_and_check_answers(queue: Arc<dyn Queue>) {
    queue
        .check()
        .await
        .expect("a reachable queue passes its check");
    let name = queue_name();
    assert_eq!(queue.depth(&name).await.unwrap(), 0, "a queue never used");
    for n in 0..3 {
        queue.publish(&name, b"{}", &format!("t{n}")).await.unwrap();
    }
    assert_eq!(queue.depth(&name).await.unwrap(), 3);

    // A delivery in a consumer's hands no longer waits. With a prefetch of
    // one, the broker hands this consumer nothing more until it acks, so
    // each depth below is exact at the moment it is read.
    let mut consumer = queue.consume(&name, 1).await.unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(queue.depth(&name).await.unwrap(), 2);
    // Reading the depth disturbs nothing: the queue still takes messages.
    queue.publish(&name, b"{}", "t3").await.unwrap();
    assert_eq!(queue.depth(&name).await.unwrap(), 3);
    // Acked, the first is gone and the consumer is handed the next one.
    first.ack().await.unwrap();
    let second = next(&mut consumer).await;
    assert_eq!(queue.depth(&name).await.unwrap(), 2);
    second.ack().await.unwrap();
}

async fn a_message_round_trips_with_its_trace_id_and_an_ack_removes_it(queue: Arc<dyn Queue>) {
    let name = queue_name();
    queue
        .publish(&name, b"{\"upload_id\":\"u1\"}", "trace-1")
        .await
        .unwrap();

    let mut consumer = queue.consume(&name, 4).await.unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.payload(), b"{\"upload_id\":\"u1\"}");
    assert_eq!(delivery.trace_id(), "trace-1");
    assert_eq!(delivery.attempt(), 1);
    assert!(!delivery.redelivered());
    assert_eq!(delivery.dead_letter_reason(), None);
    assert_eq!(delivery.queue(), name);
    delivery.ack().await.unwrap();
    drop(consumer);

    // Acked means gone, also for a new consumer.
    let mut consumer = queue.consume(&name, 4).await.unwrap();
    assert_quiet(&*queue, &name, &mut consumer).await;
}

async fn prefetch_bounds_the_unacked_deliveries_in_flight(queue: Arc<dyn Queue>) {
    let name = queue_name();
    for n in 0..5 {
        queue
            .publish(&name, format!("{n}").as_bytes(), "trace")
            .await
            .unwrap();
    }
    let mut consumer = queue.consume(&name, 2).await.unwrap();
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    // The broker's own count: the other three still wait there (without
    // the bound, all five would have been handed out at once).
    assert_eq!(queue.depth(&name).await.unwrap(), 3);

    // Settling one frees exactly one slot.
    first.ack().await.unwrap();
    let third = next(&mut consumer).await;
    assert_eq!(queue.depth(&name).await.unwrap(), 2);

    let payloads: Vec<_> = [&second, &third]
        .iter()
        .map(|d| d.payload().to_vec())
        .collect();
    assert_eq!(payloads, [b"1".to_vec(), b"2".to_vec()]);
    second.ack().await.unwrap();
    third.ack().await.unwrap();
}

async fn retry_redelivers_after_the_delay_with_the_next_attempt(queue: Arc<dyn Queue>) {
    let name = queue_name();
    let delay = Duration::from_millis(500);
    queue.publish(&name, b"flaky", "trace-retry").await.unwrap();
    let mut consumer = queue.consume(&name, 1).await.unwrap();

    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.attempt(), 1);
    let retried_at = Instant::now();
    delivery.retry(delay).await.unwrap();

    let delivery = next(&mut consumer).await;
    let waited = retried_at.elapsed();
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    assert_eq!(delivery.attempt(), 2);
    assert_eq!(delivery.payload(), b"flaky");
    assert_eq!(delivery.trace_id(), "trace-retry");

    // And again: attempts keep counting.
    delivery.retry(Duration::from_millis(50)).await.unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.attempt(), 3);
    delivery.ack().await.unwrap();
    assert_quiet(&*queue, &name, &mut consumer).await;
}

async fn dead_letter_moves_the_message_to_the_dead_letter_queue_with_its_reason(
    queue: Arc<dyn Queue>,
) {
    let name = queue_name();
    queue
        .publish(&name, b"poison", "trace-poison")
        .await
        .unwrap();
    let mut consumer = queue.consume(&name, 1).await.unwrap();
    let delivery = next(&mut consumer).await;
    delivery.dead_letter("staged file missing").await.unwrap();
    assert_quiet(&*queue, &name, &mut consumer).await;

    let mut dead_letters = queue.consume(&dead_letter_queue(&name), 1).await.unwrap();
    let dead = next(&mut dead_letters).await;
    assert_eq!(dead.payload(), b"poison");
    assert_eq!(dead.trace_id(), "trace-poison");
    assert_eq!(dead.dead_letter_reason(), Some("staged file missing"));
    assert_eq!(dead.queue(), dead_letter_queue(&name));
    dead.ack().await.unwrap();
}

async fn unacked_deliveries_of_a_dropped_consumer_go_to_another_consumer(queue: Arc<dyn Queue>) {
    let name = queue_name();
    for n in 0..3 {
        queue
            .publish(&name, format!("{n}").as_bytes(), "trace")
            .await
            .unwrap();
    }
    let mut crashing = queue.consume(&name, 3).await.unwrap();
    let held = vec![
        next(&mut crashing).await,
        next(&mut crashing).await,
        next(&mut crashing).await,
    ];
    let mut survivor = queue.consume(&name, 3).await.unwrap();
    assert_quiet(&*queue, &name, &mut survivor).await;

    // A crashed worker: its consumer and unsettled deliveries vanish.
    drop(held);
    drop(crashing);

    let mut payloads = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut survivor).await;
        assert!(delivery.redelivered());
        assert_eq!(delivery.attempt(), 1);
        payloads.push(delivery.payload().to_vec());
        delivery.ack().await.unwrap();
    }
    payloads.sort();
    assert_eq!(payloads, [b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]);
    assert_quiet(&*queue, &name, &mut survivor).await;
}

async fn two_concurrent_consumers_process_each_message_exactly_once(queue: Arc<dyn Queue>) {
    const MESSAGES: usize = 200;
    let name = queue_name();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for worker in 0..2 {
        let mut consumer = queue.consume(&name, 8).await.unwrap();
        let sender = sender.clone();
        workers.push(tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let payload = delivery.payload().to_vec();
                delivery.ack().await.unwrap();
                if sender.send((worker, payload)).is_err() {
                    return;
                }
            }
        }));
    }
    drop(sender);
    for n in 0..MESSAGES {
        queue
            .publish(&name, format!("{n}").as_bytes(), "trace")
            .await
            .unwrap();
    }

    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut per_worker = [0usize; 2];
    for _ in 0..MESSAGES {
        let (worker, payload) = tokio::time::timeout(ARRIVAL, receiver.recv())
            .await
            .expect("every message processed within the arrival timeout")
            .expect("the workers are running");
        per_worker[worker] += 1;
        *seen.entry(payload).or_default() += 1;
    }
    // Nothing more arrives before a marker published now: no message is
    // processed twice.
    queue.publish(&name, MARKER, "marker").await.unwrap();
    let (_, after) = tokio::time::timeout(ARRIVAL, receiver.recv())
        .await
        .expect("the marker within the arrival timeout")
        .expect("the workers are running");
    assert_eq!(after, MARKER, "a message processed twice");
    assert_eq!(seen.len(), MESSAGES);
    assert!(seen.values().all(|&count| count == 1));
    assert!(
        per_worker.iter().all(|&count| count > 0),
        "one consumer did all the work: {per_worker:?}"
    );
    for worker in workers {
        worker.abort();
    }
}

/// RabbitMQ restarts under a consumer holding an unacked delivery: the
/// persistent messages survive, the consumer resumes by itself, a publish
/// during the outage fails with a retryable error and works again after.
#[tokio::test]
async fn fault_amqp_messages_survive_a_rabbitmq_restart_and_consumers_resume() {
    let private = services::PrivateServices::start(&["rabbitmq"]).await;
    let queue: Arc<dyn Queue> = Arc::new(AmqpQueue::new(
        &private.amqp_url(),
        None,
        "larder-tests-fault",
    ));
    let name = queue_name();
    for n in 0..5 {
        queue
            .publish(&name, format!("{n}").as_bytes(), &format!("trace-{n}"))
            .await
            .unwrap();
    }
    let mut consumer = queue.consume(&name, 1).await.unwrap();
    let held = next(&mut consumer).await;

    private.ctl("restart-rabbitmq").await;

    // The delivery's channel died with the broker: settling it reports that,
    // and the broker delivers the message again.
    match held.ack().await {
        Err(error @ QueueError::ConnectionLost { .. }) => assert!(!error.is_retryable()),
        other => panic!("expected a lost connection, got {other:?}"),
    }

    // The publisher reconnects by itself; a failure while the broker comes
    // back is retryable.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match queue.publish(&name, b"5", "trace-5").await {
            Ok(()) => break,
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("publishing after the restart: {error}"),
        }
    }

    let mut seen = Vec::new();
    for _ in 0..6 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("the consumer resumes after the restart")
            .expect("the consumer stream is open");
        assert_eq!(
            delivery.trace_id(),
            format!("trace-{}", String::from_utf8_lossy(delivery.payload()))
        );
        seen.push(delivery.payload().to_vec());
        delivery.ack().await.unwrap();
    }
    seen.sort();
    let expected: Vec<Vec<u8>> = (0..6).map(|n| format!("{n}").into_bytes()).collect();
    assert_eq!(seen, expected);
    assert_quiet(&*queue, &name, &mut consumer).await;
    drop(consumer);
    private.stop().await;
}

/// A broker that is down is worth retrying; a virtual host that does not
/// exist is a configuration error that retrying cannot fix.
#[tokio::test]
async fn amqp_errors_tell_an_unreachable_broker_from_a_misconfigured_one() {
    // A port held with nothing listening: the connection is refused.
    let closed = tests::ports::HeldPort::new();
    let down = AmqpQueue::new(
        &format!("amqp://guest:guest@{}/%2f", closed.address()),
        None,
        "larder-tests-down",
    );
    let error = down.publish(&queue_name(), b"x", "t").await.unwrap_err();
    assert!(matches!(error, QueueError::Connect(_)), "{error:?}");
    assert!(error.is_retryable(), "{error:?}");

    let url = services::amqp_url();
    let (server, _vhost) = url
        .rsplit_once('/')
        .expect("the AMQP URL names a virtual host");
    let wrong_vhost = AmqpQueue::new(
        &format!("{server}/larder-no-such-vhost"),
        None,
        "larder-tests-vhost",
    );
    let error = wrong_vhost.consume(&queue_name(), 1).await.unwrap_err();
    assert!(matches!(error, QueueError::Connect(_)), "{error:?}");
    assert!(!error.is_retryable(), "{error:?}");
}
