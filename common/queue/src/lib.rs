//! The job queue between `ingest-api`, `chunker-worker` and `compressor-worker`.
//!
//! # Modules
//!
//! - `embedded` — the in-process backend.
//! - `amqp` — the RabbitMQ backend.
//! - Here: the [`Queue`] trait, its delivery contract, and the messages
//!   ([`ChunkJob`], [`CompressJob`]), the pipeline's wire contract.
//!
//! One object-safe trait, [`Queue`], with two backends: [`EmbeddedQueue`]
//! (in-process, the single-machine default) and [`AmqpQueue`] (RabbitMQ, for
//! horizontal scaling). Both pass the same conformance suite
//! (`tests/it/queue.rs`), so handlers written against `Arc<dyn Queue>` do not
//! care which one runs them.
//!
//! # Delivery contract
//!
//! - [`Queue::publish`] returns only once the message is durable as far as
//!   the backend can make it: confirmed by the broker (AMQP), or held by the
//!   process (embedded).
//! - Delivery is **at least once**. A consumer takes a [`Delivery`] and
//!   settles it exactly once: [`Delivery::ack`] after the handler's database
//!   commit, [`Delivery::retry`] to have it delivered again after a delay with
//!   [`Delivery::attempt`] one higher, or [`Delivery::dead_letter`] to move it,
//!   with a reason, to the queue's dead-letter queue ([`dead_letter_queue`]),
//!   which is an ordinary queue that can be consumed to inspect it. A delivery
//!   dropped unsettled (a handler that panicked, a consumer shut down) goes
//!   back to its queue with [`Delivery::redelivered`] set and the same
//!   attempt number. Handlers must therefore be idempotent.
//! - [`Queue::consume`] takes a prefetch bound: a consumer never holds more
//!   than that many unsettled deliveries.
//!
//! Messages carry references (ids, keys, hashes), never bulk bytes; the
//! message types here ([`ChunkJob`], [`CompressJob`]) are serialisable wire
//! contracts, JSON on the wire.
//!
//! Neither backend is the truth: the database is. A job lost with the process
//! (the embedded queue keeps nothing on disk) or with a broker's disk is
//! published again by the reconciler, which looks for uploads stuck in a
//! phase.

mod amqp;
mod embedded;

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, Stream, StreamExt};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use amqp::AmqpQueue;
pub use embedded::EmbeddedQueue;

/// The queue of [`ChunkJob`]s, consumed by `chunker-worker`.
pub const CHUNK_QUEUE: &str = "larder.chunk";
/// Where chunk jobs that can never succeed end up ([`dead_letter_queue`] of [`CHUNK_QUEUE`]).
pub const CHUNK_DEAD_LETTER_QUEUE: &str = "larder.chunk.dead";
/// The queue of [`CompressJob`]s, consumed by `compressor-worker`.
pub const COMPRESS_QUEUE: &str = "larder.compress";
/// Where compress jobs that can never succeed end up ([`dead_letter_queue`] of [`COMPRESS_QUEUE`]).
pub const COMPRESS_DEAD_LETTER_QUEUE: &str = "larder.compress.dead";

/// The suffix that names a queue's dead-letter queue.
const DEAD_LETTER_SUFFIX: &str = ".dead";

/// AMQP header carrying the trace id that follows an upload from the API to
/// its finaliser.
pub const TRACE_ID_HEADER: &str = "x-larder-trace-id";
/// AMQP header carrying the delivery attempt, 1 for the first.
pub const ATTEMPT_HEADER: &str = "x-larder-attempt";
/// AMQP header carrying why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-larder-dead-letter-reason";

/// The dead-letter queue of `queue`: `{queue}.dead`. A dead-letter queue is
/// its own dead-letter queue, so dead-lettering from it again never builds
/// `….dead.dead`.
pub fn dead_letter_queue(queue: &str) -> String {
    if queue.ends_with(DEAD_LETTER_SUFFIX) {
        queue.to_owned()
    } else {
        format!("{queue}{DEAD_LETTER_SUFFIX}")
    }
}

/// A job type: a wire contract bound to the queue it travels on.
pub trait Job: Serialize + DeserializeOwned {
    /// The queue this job is published to.
    const QUEUE: &'static str;
    /// The trace id that follows the upload this job belongs to.
    fn trace_id(&self) -> &str;
}

/// Cut a spooled upload into chunks (published by `ingest-api`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkJob {
    /// The `uploads` row whose staged NAR is to be chunked.
    pub upload_id: String,
    pub trace_id: String,
}

impl Job for ChunkJob {
    const QUEUE: &'static str = CHUNK_QUEUE;
    fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

/// Compress and store chunks of a NAR (published by `chunker-worker`).
///
/// The job names where the uncompressed bytes are (a staged NAR and byte
/// ranges of it), so a compressor needs no database read to find them, and
/// the chunker can publish jobs while it is still cutting the rest of the
/// NAR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressJob {
    pub nar_id: i64,
    /// The staging object holding the uncompressed NAR.
    pub staged_key: String,
    /// The `chunks` rows to compress and store, with their byte ranges in
    /// the staged NAR.
    pub chunks: Vec<ChunkRange>,
    pub trace_id: String,
}

/// Where one chunk's uncompressed bytes sit in a staged NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRange {
    pub chunk_id: i64,
    pub offset: u64,
    pub length: u64,
    /// The CRC-32 of the bytes the chunker cut (and took the chunk's
    /// SHA-256 of): the compressor checks what it reads back against it
    /// instead of hashing the chunk again. Absent for ranges computed from
    /// a recorded chunk list, and in jobs from versions before it, which
    /// are checked by SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

impl Job for CompressJob {
    const QUEUE: &'static str = COMPRESS_QUEUE;
    fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

/// Publishes `job` as JSON on its queue ([`Job::QUEUE`]) with its trace id.
pub async fn publish_job<J: Job + Sync>(queue: &dyn Queue, job: &J) -> Result<(), QueueError> {
    // Serialising these plain structs (strings and integers) cannot fail.
    let payload = serde_json::to_vec(job).expect("job types serialise infallibly");
    queue.publish(J::QUEUE, &payload, job.trace_id()).await
}

/// A queue backend. Object-safe: share it as `Arc<dyn Queue>`.
///
/// Queues are created on first use (publish or consume), with their
/// dead-letter queue.
#[async_trait]
pub trait Queue: Send + Sync + fmt::Debug {
    /// Publishes `payload` on `queue` with attempt 1 and returns once the
    /// message is durable (see the module documentation).
    async fn publish(&self, queue: &str, payload: &[u8], trace_id: &str) -> Result<(), QueueError>;

    /// Starts consuming `queue`, holding at most `prefetch` (at least 1)
    /// unsettled deliveries at a time.
    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, QueueError>;

    /// How many messages wait in `queue` to be delivered: neither those
    /// delivered and not yet settled nor retries still waiting out their
    /// delay. A queue never used holds 0. For metrics.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError>;

    /// Whether messages can be published and consumed now, cheaply, for a
    /// readiness probe.
    async fn check(&self) -> Result<(), QueueError>;
}

/// A queue error. [`QueueError::is_retryable`] tells a transient failure (the
/// broker is restarting) from one that will not go away by itself.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("connecting to the queue broker")]
    Connect(#[source] lapin::Error),
    /// `operation` names the step and its queue, e.g. "publishing to queue larder.chunk".
    #[error("{operation} {queue}")]
    Broker {
        operation: &'static str,
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker refused a message published to queue {queue}")]
    Nacked { queue: String },
    #[error("the broker could not route a message published to queue {queue}")]
    Unroutable { queue: String },
    #[error("the delivery from queue {queue} can no longer be settled: its connection was lost, so the broker delivers it again")]
    ConnectionLost { queue: String },
}

impl QueueError {
    /// Whether trying again later may succeed: the broker was unreachable or
    /// refused the message for now. A consumer's connection loss is not
    /// retryable (the broker redelivers the message itself).
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Connect(source) | QueueError::Broker { source, .. } => transient(source),
            QueueError::Nacked { .. } => true,
            // A queue deleted under us, or a lost delivery: settling again
            // cannot help.
            QueueError::Unroutable { .. } | QueueError::ConnectionLost { .. } => false,
        }
    }
}

/// Whether a lapin error may go away by itself: network trouble and a broker
/// closing connections as it stops are transient; refused credentials, a
/// missing virtual host or a queue declared with other arguments are not.
fn transient(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    match error {
        lapin::Error::ProtocolError(error) => !matches!(
            error.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
                    | AMQPSoftError::PRECONDITIONFAILED
            ) | AMQPErrorKind::Hard(AMQPHardError::INVALIDPATH | AMQPHardError::NOTALLOWED)
        ),
        _ => true,
    }
}

/// A message as both backends carry it.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) payload: Vec<u8>,
    pub(crate) trace_id: String,
    pub(crate) attempt: u32,
    pub(crate) dead_letter_reason: Option<String>,
}

/// How a backend settles one delivery. Exactly one method is called, once.
#[async_trait]
pub(crate) trait Settle: Send + Sync {
    async fn ack(&mut self) -> Result<(), QueueError>;
    async fn retry(&mut self, message: &Message, after: Duration) -> Result<(), QueueError>;
    async fn dead_letter(&mut self, message: &Message, reason: &str) -> Result<(), QueueError>;
    /// The delivery was dropped unsettled: put it back on its queue. Cannot
    /// await (it runs in `Drop`), so it may hand the work to a task.
    fn abandon(&mut self, message: Message);
}

/// One message handed to a consumer. Settle it with [`ack`](Self::ack),
/// [`retry`](Self::retry) or [`dead_letter`](Self::dead_letter); dropping it
/// unsettled returns it to its queue.
pub struct Delivery {
    queue: String,
    message: Message,
    redelivered: bool,
    // `None` once settled, so that `Drop` does not return it to the queue.
    settler: Option<Box<dyn Settle>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("trace_id", &self.message.trace_id)
            .field("attempt", &self.message.attempt)
            .field("redelivered", &self.redelivered)
            .field("payload_len", &self.message.payload.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    pub(crate) fn new(
        queue: String,
        message: Message,
        redelivered: bool,
        settler: Box<dyn Settle>,
    ) -> Self {
        Self {
            queue,
            message,
            redelivered,
            settler: Some(settler),
        }
    }

    /// The queue it came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The payload as a JSON job.
    pub fn decode<J: DeserializeOwned>(&self) -> Result<J, serde_json::Error> {
        serde_json::from_slice(&self.message.payload)
    }

    pub fn trace_id(&self) -> &str {
        &self.message.trace_id
    }

    /// 1 for the first delivery, one more after each [`retry`](Self::retry).
    pub fn attempt(&self) -> u32 {
        self.message.attempt
    }

    /// Whether an earlier delivery of this message was dropped unsettled
    /// (for instance by a crashed worker), so a handler may find its work
    /// half done.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Why it was dead-lettered, on deliveries from a dead-letter queue.
    pub fn dead_letter_reason(&self) -> Option<&str> {
        self.message.dead_letter_reason.as_deref()
    }

    /// Done: the message is removed for good.
    pub async fn ack(mut self) -> Result<(), QueueError> {
        self.take_settler().ack().await
    }

    /// Delivers the message again, no sooner than `after`, with the next
    /// attempt number.
    pub async fn retry(mut self, after: Duration) -> Result<(), QueueError> {
        let mut settler = self.take_settler();
        settler.retry(&self.message, after).await
    }

    /// Moves the message to its queue's dead-letter queue with `reason`.
    pub async fn dead_letter(mut self, reason: &str) -> Result<(), QueueError> {
        let mut settler = self.take_settler();
        settler.dead_letter(&self.message, reason).await
    }

    fn take_settler(&mut self) -> Box<dyn Settle> {
        // Every settling method takes `self` by value, so it runs at most once
        // and finds the settler still there.
        self.settler.take().expect("a delivery is settled once")
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(mut settler) = self.settler.take() {
            let message = Message {
                payload: std::mem::take(&mut self.message.payload),
                trace_id: std::mem::take(&mut self.message.trace_id),
                attempt: self.message.attempt,
                dead_letter_reason: self.message.dead_letter_reason.take(),
            };
            settler.abandon(message);
        }
    }
}

/// A stream of deliveries from one queue. Dropping it stops consuming; its
/// unsettled deliveries go back to the queue as they are dropped.
pub struct Consumer {
    deliveries: BoxStream<'static, Delivery>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(deliveries: BoxStream<'static, Delivery>) -> Self {
        Self { deliveries }
    }

    /// The next delivery, waiting for one; `None` only when the backend has
    /// shut down. Cancel-safe: dropping the future loses no message.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.next().await
    }
}

impl Stream for Consumer {
    type Item = Delivery;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.deliveries.poll_next_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dead_letter_constants_follow_the_naming_rule() {
        assert_eq!(dead_letter_queue(CHUNK_QUEUE), CHUNK_DEAD_LETTER_QUEUE);
        assert_eq!(
            dead_letter_queue(COMPRESS_QUEUE),
            COMPRESS_DEAD_LETTER_QUEUE
        );
        assert_eq!(
            dead_letter_queue(CHUNK_DEAD_LETTER_QUEUE),
            CHUNK_DEAD_LETTER_QUEUE
        );
    }

    #[test]
    fn jobs_keep_their_json_shape() {
        let job = CompressJob {
            nar_id: 7,
            staged_key: "staging/x.nar".to_owned(),
            chunks: vec![
                ChunkRange {
                    chunk_id: 1,
                    offset: 0,
                    length: 10,
                    crc32: None,
                },
                ChunkRange {
                    chunk_id: 2,
                    offset: 10,
                    length: 5,
                    crc32: Some(7),
                },
            ],
            trace_id: "t".to_owned(),
        };
        let json = serde_json::to_string(&job).unwrap();
        // Without a CRC, a range is what versions before it wrote and read.
        assert_eq!(
            json,
            r#"{"nar_id":7,"staged_key":"staging/x.nar","chunks":[{"chunk_id":1,"offset":0,"length":10},{"chunk_id":2,"offset":10,"length":5,"crc32":7}],"trace_id":"t"}"#
        );
        assert_eq!(serde_json::from_str::<CompressJob>(&json).unwrap(), job);
        let job = ChunkJob {
            upload_id: "u".to_owned(),
            trace_id: "t".to_owned(),
        };
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(json, r#"{"upload_id":"u","trace_id":"t"}"#);
    }
}
