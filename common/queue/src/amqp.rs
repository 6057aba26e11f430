//! The AMQP backend: RabbitMQ through lapin, for several machines.
//!
//! # Topology
//!
//! Everything goes through the default exchange, routed by queue name.
//! For a work queue `q` (declared durable on first publish or consume):
//!
//! - `q.dead`, durable: the dead-letter queue. [`Delivery::dead_letter`]
//!   publishes a copy there with the reason in [`DEAD_LETTER_REASON_HEADER`],
//!   then acks the original. (Rejecting into a broker-side dead-letter
//!   exchange would lose the reason.)
//! - `q.retry.{ms}`, durable, one per retry delay: `x-message-ttl` = delay,
//!   dead-lettering to the default exchange with routing key `q`, and
//!   `x-expires` so that delay queues no longer used disappear.
//!   [`Delivery::retry`] publishes a copy there with the attempt header one
//!   higher, then acks the original; when the TTL runs out RabbitMQ moves it
//!   back to `q`. One queue per delay (rather than a per-message
//!   `expiration` on one delay queue) because RabbitMQ only expires messages
//!   at a queue's head: a long delay would hold up the short ones behind it.
//!   Each retry declares its delay queue again, which also restarts its
//!   expiry timer.
//!
//! Retry and dead-letter are publish-then-ack: a crash in between delivers the
//! message twice, which at-least-once allows; nothing is lost.
//!
//! Every message is persistent (delivery mode 2) and published with
//! `mandatory` on a channel in confirm mode; [`Queue::publish`] waits for the
//! broker's confirm and turns a nack or a returned message into an error. The
//! trace id and the attempt travel in headers ([`TRACE_ID_HEADER`],
//! [`ATTEMPT_HEADER`]).
//!
//! # Connections and their loss
//!
//! `amqps://` URLs connect over TLS (rustls, through lapin's TCP layer),
//! trusting the system's roots and the certificates of an optional CA file;
//! the broker's certificate must name the URL's host.
//!
//! Publishing shares one connection and confirm channel, opened lazily and
//! opened again on the next publish after it was lost (a publish that fails
//! on a channel that still looked open is tried once more on a new one); a
//! publish that fails because the broker is away returns a
//! [`QueueError::is_retryable`] error.
//!
//! Each consumer has its own connection and channel (with `basic.qos` set to
//! its prefetch), driven by a task. When the connection drops, the task
//! connects again with backoff, declares the topology again and resumes
//! consuming, so the [`Consumer`] stream just pauses. The broker has already
//! put the lost channel's unacked messages back; settling a delivery from
//! the lost channel fails with [`QueueError::ConnectionLost`], and the message
//! arrives again. The task ends when the [`Consumer`] is dropped.
//!
//! What remains: a publish during an outage is not retried inside
//! [`Queue::publish`] (the caller decides, and the reconciler covers a caller
//! that gives up); a broker that loses its disk loses messages, which the
//! reconciler publishes again from the database.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::mpsc;

use larder_tls::{install_crypto_provider, CaFile};

use super::{
    dead_letter_queue, Consumer, Delivery, Message, Queue, QueueError, Settle, ATTEMPT_HEADER,
    DEAD_LETTER_REASON_HEADER, TRACE_ID_HEADER,
};

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// How long an unused delay queue lives beyond its own delay.
const DELAY_QUEUE_GRACE: Duration = Duration::from_secs(60);

/// The first and the longest pause between a consumer's reconnection attempts.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The RabbitMQ queue backend.
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("AmqpQueue").finish_non_exhaustive()
    }
}

struct Inner {
    url: String,
    /// PEM certificates trusted beside the system's roots for `amqps://`.
    ca_certificates: Option<String>,
    connection_name: String,
    publisher: tokio::sync::Mutex<Option<Publisher>>,
}

/// The shared publishing connection, its confirm channel and the work queues
/// already declared on it.
struct Publisher {
    // Kept so the connection lives as long as its channel; also opens the
    // short-lived channels that inspect queues.
    connection: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

impl AmqpQueue {
    /// A backend for the broker at `url` (`amqp://user:password@host:port/vhost`,
    /// or `amqps://…` over TLS, trusting `ca_file` too). Connects lazily:
    /// the first publish or consume reports an unreachable broker.
    /// `connection_name` shows in RabbitMQ's management tools.
    pub fn new(url: &str, ca_file: Option<&CaFile>, connection_name: &str) -> Self {
        // lapin's TLS layer builds its rustls config with the process's
        // default provider.
        install_crypto_provider();
        Self {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                ca_certificates: ca_file.map(|ca_file| ca_file.pem().to_owned()),
                connection_name: connection_name.to_owned(),
                publisher: tokio::sync::Mutex::new(None),
            }),
        }
    }
}

impl Inner {
    async fn connect(&self) -> Result<Connection, QueueError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(self.connection_name.clone().into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_certificates.clone(),
        };
        Connection::connect_with_config(&self.url, properties, tls)
            .await
            .map_err(QueueError::Connect)
    }

    /// The confirm channel, connecting first when there is none or it was lost,
    /// with `queue`'s topology declared on it.
    async fn publish_channel(&self, queue: &str) -> Result<Channel, QueueError> {
        let mut publisher = self.publisher.lock().await;
        let current = self.connected(&mut publisher).await?;
        if !current.declared.contains(queue) {
            declare_work_queue(&current.channel, queue).await?;
            current.declared.insert(queue.to_owned());
        }
        Ok(current.channel.clone())
    }

    /// Publishes `message` to `routing_key` on `channel` and waits for the
    /// broker's confirm.
    async fn publish_on(
        &self,
        channel: &Channel,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), QueueError> {
        let broker = |source| QueueError::Broker {
            operation: "publishing to queue",
            queue: routing_key.to_owned(),
            source,
        };
        let confirmation = channel
            .basic_publish(
                "",
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.payload,
                properties(message),
            )
            .await
            .map_err(broker)?
            .await
            .map_err(broker)?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(QueueError::Unroutable {
                queue: routing_key.to_owned(),
            }),
            // The channel is in confirm mode, so `NotRequested` would mean
            // the broker did not take responsibility for the message.
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(QueueError::Nacked {
                queue: routing_key.to_owned(),
            }),
        }
    }

    /// The publisher, connecting when there is none or it was lost.
    async fn connected<'a>(
        &self,
        publisher: &'a mut Option<Publisher>,
    ) -> Result<&'a mut Publisher, QueueError> {
        if !matches!(&*publisher, Some(current) if current.channel.status().connected()) {
            *publisher = None;
            let connection = self.connect().await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(QueueError::Connect)?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(QueueError::Connect)?;
            *publisher = Some(Publisher {
                connection,
                channel,
                declared: HashSet::new(),
            });
        }
        // Just set above when it was missing.
        Ok(publisher.as_mut().expect("a publisher was just connected"))
    }

    /// A fresh channel on the publishing connection, for a passive declare
    /// that the broker answers by closing the channel when the queue does
    /// not exist (which must not take the confirm channel down with it).
    async fn inspection_channel(&self) -> Result<Channel, QueueError> {
        let mut publisher = self.publisher.lock().await;
        let current = self.connected(&mut publisher).await?;
        current
            .connection
            .create_channel()
            .await
            .map_err(QueueError::Connect)
    }

    /// Publishes `message` to `queue`. A publish on a channel that looked
    /// open but failed (the broker restarted before lapin noticed) is tried
    /// once more on a fresh connection, so that the first publish after a
    /// broker restart does not fail for nothing.
    async fn publish_message(&self, queue: &str, message: &Message) -> Result<(), QueueError> {
        match self.publish_message_once(queue, message).await {
            Err(error @ QueueError::Broker { .. }) if error.is_retryable() => {
                tracing::info!(queue, error = %error, "publishing failed; connecting again");
                *self.publisher.lock().await = None;
                self.publish_message_once(queue, message).await
            }
            result => result,
        }
    }

    async fn publish_message_once(&self, queue: &str, message: &Message) -> Result<(), QueueError> {
        let channel = self.publish_channel(queue).await?;
        let result = self.publish_on(&channel, queue, message).await;
        if let Err(QueueError::Unroutable { .. }) = &result {
            // Someone deleted the queue: declare it again next time.
            if let Some(publisher) = self.publisher.lock().await.as_mut() {
                publisher.declared.remove(queue);
            }
        }
        result
    }

    /// Publishes `message` into `queue`'s delay queue for `after`.
    async fn publish_delayed(
        &self,
        queue: &str,
        message: &Message,
        after: Duration,
    ) -> Result<(), QueueError> {
        let channel = self.publish_channel(queue).await?;
        let delay_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let delay_queue = format!("{queue}.retry.{delay_ms}");
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms));
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(delay_ms.saturating_add(DELAY_QUEUE_GRACE.as_millis() as i64)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        // Declared on every retry, never cached: an expired delay queue must
        // come back, and declaring restarts its expiry timer.
        channel
            .queue_declare(&delay_queue, durable(), arguments)
            .await
            .map_err(|source| QueueError::Broker {
                operation: "declaring queue",
                queue: delay_queue.clone(),
                source,
            })?;
        self.publish_on(&channel, &delay_queue, message).await
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares `queue` and its dead-letter queue, both durable.
async fn declare_work_queue(channel: &Channel, queue: &str) -> Result<(), QueueError> {
    for name in [queue.to_owned(), dead_letter_queue(queue)] {
        channel
            .queue_declare(&name, durable(), FieldTable::default())
            .await
            .map_err(|source| QueueError::Broker {
                operation: "declaring queue",
                queue: name.clone(),
                source,
            })?;
    }
    Ok(())
}

fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        TRACE_ID_HEADER.into(),
        AMQPValue::LongString(message.trace_id.as_str().into()),
    );
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(message.attempt)),
    );
    if let Some(reason) = &message.dead_letter_reason {
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(reason.as_str().into()),
        );
    }
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers)
}

/// The message in a lapin delivery. Missing or malformed headers (a message
/// published by something else) read as an empty trace id and attempt 1.
fn message_of(delivery: lapin::message::Delivery) -> Message {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let header = |name: &str| headers.inner().get(&ShortString::from(name)).cloned();
    let text = |value: Option<AMQPValue>| match value {
        Some(AMQPValue::LongString(text)) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        Some(AMQPValue::ShortString(text)) => Some(text.as_str().to_owned()),
        _ => None,
    };
    let attempt = match header(ATTEMPT_HEADER) {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).ok(),
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).ok(),
        Some(AMQPValue::LongUInt(n)) => Some(n),
        Some(AMQPValue::ShortInt(n)) => u32::try_from(n).ok(),
        Some(AMQPValue::ShortUInt(n)) => Some(u32::from(n)),
        _ => None,
    };
    Message {
        trace_id: text(header(TRACE_ID_HEADER)).unwrap_or_default(),
        attempt: attempt.unwrap_or(1).max(1),
        dead_letter_reason: text(header(DEAD_LETTER_REASON_HEADER)),
        payload: delivery.data,
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn publish(&self, queue: &str, payload: &[u8], trace_id: &str) -> Result<(), QueueError> {
        let message = Message {
            payload: payload.to_vec(),
            trace_id: trace_id.to_owned(),
            attempt: 1,
            dead_letter_reason: None,
        };
        self.inner.publish_message(queue, &message).await
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, QueueError> {
        let prefetch = prefetch.max(1);
        // The first subscription happens here, so that a wrong URL or an
        // unreachable broker is reported to the caller rather than retried
        // forever in the background.
        let subscription = subscribe(&self.inner, queue, prefetch).await?;
        // The broker sends at most `prefetch` unacked messages, so this
        // buffer never holds more than that.
        let (sender, receiver) = mpsc::channel(usize::from(prefetch));
        tokio::spawn(pump(
            self.inner.clone(),
            queue.to_owned(),
            prefetch,
            subscription,
            sender,
        ));
        let deliveries = stream::unfold(receiver, |mut receiver| async move {
            let delivery = receiver.recv().await?;
            Some((delivery, receiver))
        });
        Ok(Consumer::new(deliveries.boxed()))
    }

    /// A passive declare's message count, on a channel of its own.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let channel = self.inner.inspection_channel().await?;
        let declared = channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let depth = match declared {
            Ok(declared) => Ok(u64::from(declared.message_count())),
            // Nobody published to or consumed from it yet. The broker has
            // closed the channel.
            Err(lapin::Error::ProtocolError(error))
                if matches!(
                    error.kind(),
                    lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
                ) =>
            {
                return Ok(0)
            }
            Err(source) => Err(QueueError::Broker {
                operation: "inspecting queue",
                queue: queue.to_owned(),
                source,
            }),
        };
        close_quietly(&channel).await;
        depth
    }

    /// Opens and closes a channel on the publishing connection, connecting
    /// first if needed: a round trip to a broker that accepts us.
    async fn check(&self) -> Result<(), QueueError> {
        let channel = self.inner.inspection_channel().await?;
        close_quietly(&channel).await;
        Ok(())
    }
}

/// Closes a short-lived channel; one the broker closed already is fine.
async fn close_quietly(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done").await;
    }
}

/// One consumer's connection, channel and lapin consumer.
struct Subscription {
    connection: Arc<Connection>,
    channel: Channel,
    consumer: lapin::Consumer,
}

async fn subscribe(inner: &Inner, queue: &str, prefetch: u16) -> Result<Subscription, QueueError> {
    let connection = inner.connect().await?;
    let broker = |operation| {
        move |source| QueueError::Broker {
            operation,
            queue: queue.to_owned(),
            source,
        }
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(QueueError::Connect)?;
    // The publisher's confirm channel republishes on retry and dead-letter;
    // this one only consumes.
    declare_work_queue(&channel, queue).await?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(broker("setting the prefetch of queue"))?;
    let consumer = channel
        .basic_consume(
            queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("consuming queue"))?;
    Ok(Subscription {
        connection: Arc::new(connection),
        channel,
        consumer,
    })
}

/// Forwards a consumer's deliveries until the [`Consumer`] is dropped,
/// subscribing again whenever the connection is lost.
async fn pump(
    inner: Arc<Inner>,
    queue: String,
    prefetch: u16,
    mut subscription: Subscription,
    sender: mpsc::Sender<Delivery>,
) {
    loop {
        loop {
            let next = tokio::select! {
                next = subscription.consumer.next() => next,
                () = sender.closed() => return,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(queue, error = %error, "queue consumer lost its connection; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!(
                        queue,
                        "queue consumer was cancelled by the broker; subscribing again"
                    );
                    break;
                }
            };
            let redelivered = delivery.redelivered;
            let settler = AmqpSettler {
                inner: inner.clone(),
                queue: queue.clone(),
                acker: delivery.acker.clone(),
                channel: subscription.channel.clone(),
                _connection: subscription.connection.clone(),
            };
            let delivery = Delivery::new(
                queue.clone(),
                message_of(delivery),
                redelivered,
                Box::new(settler),
            );
            if sender.send(delivery).await.is_err() {
                // The consumer is gone; the delivery just dropped went back
                // to the queue.
                return;
            }
        }
        let mut backoff = RECONNECT_BACKOFF_MIN;
        subscription = loop {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = sender.closed() => return,
            }
            match subscribe(&inner, &queue, prefetch).await {
                Ok(subscription) => break subscription,
                Err(error) => {
                    tracing::debug!(queue, error = %error, "queue consumer could not subscribe again yet");
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
            }
        };
        tracing::info!(queue, "queue consumer subscribed again");
    }
}

/// Settles one AMQP delivery. Holds its channel and connection, so they stay
/// open (and can ack) while the delivery lives, even after its consumer is
/// dropped.
struct AmqpSettler {
    inner: Arc<Inner>,
    queue: String,
    acker: lapin::acker::Acker,
    channel: Channel,
    _connection: Arc<Connection>,
}

impl AmqpSettler {
    async fn ack_original(&self) -> Result<(), QueueError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|source| {
                if self.channel.status().connected() {
                    QueueError::Broker {
                        operation: "acknowledging a delivery from queue",
                        queue: self.queue.clone(),
                        source,
                    }
                } else {
                    QueueError::ConnectionLost {
                        queue: self.queue.clone(),
                    }
                }
            })
    }
}

#[async_trait]
impl Settle for AmqpSettler {
    async fn ack(&mut self) -> Result<(), QueueError> {
        self.ack_original().await
    }

    async fn retry(&mut self, message: &Message, after: Duration) -> Result<(), QueueError> {
        let mut message = message.clone();
        message.attempt = message.attempt.saturating_add(1);
        self.inner
            .publish_delayed(&self.queue, &message, after)
            .await?;
        self.ack_original().await
    }

    async fn dead_letter(&mut self, message: &Message, reason: &str) -> Result<(), QueueError> {
        let mut message = message.clone();
        message.dead_letter_reason = Some(reason.to_owned());
        let dead_letters = dead_letter_queue(&self.queue);
        self.inner.publish_message(&dead_letters, &message).await?;
        self.ack_original().await
    }

    fn abandon(&mut self, _message: Message) {
        // The broker still has the message; a nack with requeue hands it to
        // the next consumer now rather than when this channel closes. Without
        // a runtime (a drop at shutdown) the channel's close does it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let acker = self.acker.clone();
            let keep_open = (self.channel.clone(), self._connection.clone());
            runtime.spawn(async move {
                // A failure means the channel is gone, and the broker has
                // requeued the message with everything else it held.
                let _ = acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
                drop(keep_open);
            });
        }
    }
}
