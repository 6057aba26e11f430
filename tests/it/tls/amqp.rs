//! RabbitMQ over TLS: `amqps://` with the throwaway CA as a CA file,
//! against the suite's broker's AMQPS listener. The queue conformance suite
//! over TLS is `queue::amqps::…`.

use std::time::Duration;

use larder_queue::{AmqpQueue, Queue, QueueError};
use larder_tls::CaFile;
use tests::services;

/// `amqps://…/%2f` on virtual host `vhost` instead.
fn amqps_url_on(vhost: &str) -> String {
    let url = services::amqps_url();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    format!("{base}/{vhost}")
}

/// A message published and consumed over `amqps://` with the CA file, on a
/// virtual host of its own; RabbitMQ reports every connection to it as TLS.
/// (Over plain AMQP the TLS port would not answer the handshake; with TLS
/// off in the client, `ssl` would be false.)
#[tokio::test]
async fn amqps_with_a_ca_file_publishes_and_consumes_over_tls() {
    let vhost = services::unique_name("larder-tls");
    services::add_rabbitmq_vhost(&services::services_dir(), &vhost).await;
    let ca_file = CaFile::read(&services::tls_ca_file()).expect("the throwaway CA");
    let queue = AmqpQueue::new(&amqps_url_on(&vhost), Some(&ca_file), "larder-tests-amqps");
    let name = services::unique_name("larder-it-amqps");

    queue
        .publish(&name, b"over TLS", "trace-tls")
        .await
        .expect("publishing over amqps");
    let mut consumer = queue.consume(&name, 1).await.expect("consuming over amqps");
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("a delivery within 30 s")
        .expect("the consumer stream is open");
    assert_eq!(delivery.payload(), b"over TLS");
    delivery.ack().await.expect("acking over amqps");

    let connections =
        services::rabbitmq_connections_over_tls(&services::services_dir(), &vhost).await;
    assert!(!connections.is_empty(), "the broker lists our connections");
    assert!(connections.iter().all(|tls| *tls), "{connections:?}");
}

/// Without the CA (the system's roots only) and with the wrong one, the
/// broker's certificate is refused: the connection error says so.
#[tokio::test]
async fn amqps_without_the_ca_or_with_the_wrong_one_is_refused() {
    let other = CaFile::read(&services::tls_other_ca_file()).expect("the unrelated CA");
    for ca_file in [None, Some(&other)] {
        let queue = AmqpQueue::new(
            &services::amqps_url(),
            ca_file,
            "larder-tests-amqps-refused",
        );
        let error = queue
            .publish(&services::unique_name("larder-it-amqps"), b"x", "t")
            .await
            .expect_err("an untrusted certificate");
        assert!(matches!(error, QueueError::Connect(_)), "{error:?}");
        let shown = larder_service::service::error_chain(&error);
        assert!(shown.contains("invalid peer certificate"), "{shown}");
    }
}
