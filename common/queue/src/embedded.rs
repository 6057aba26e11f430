//! The embedded backend: in-process queues on tokio, for a single machine.
//!
//! Each queue is an unbounded channel whose receiving end consumers take
//! turns on (a fair lock, so competing consumers share the work). A consumer
//! holds one semaphore permit per unsettled delivery, which bounds its
//! prefetch; a message is taken off the queue only when a permit is free, so
//! nothing sits buffered in a consumer. Retries wait on tokio timers;
//! dead-lettered messages go to `{queue}.dead`, an ordinary queue.
//!
//! Nothing survives the process: a "durable" publish here means the message
//! is in memory. The database is the truth, and the reconciler publishes the
//! jobs of stuck uploads again after a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{dead_letter_queue, Consumer, Delivery, Message, Queue, QueueError, Settle};

/// The in-process queue backend. Cheap to clone; clones share the queues.
#[derive(Clone, Default)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
}

/// One queue. Entries carry whether they were abandoned before (redelivered).
struct Lane {
    sender: mpsc::UnboundedSender<(Message, bool)>,
    receiver: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Message, bool)>>,
    /// Messages in the channel. Counted beside it because a consumer holds
    /// the receiver's lock while it waits, so its `len()` is out of reach.
    waiting: AtomicU64,
}

impl Lane {
    fn push(&self, message: Message, redelivered: bool) {
        // Counted before sending, so a consumer that takes the message at
        // once never makes the count wrap below zero.
        self.waiting.fetch_add(1, Ordering::Relaxed);
        // The lane owns its receiver, so the channel is never closed while
        // anyone can send on it.
        let _ = self.sender.send((message, redelivered));
    }

    /// Takes the next message, waiting for one.
    async fn pop(&self) -> Option<(Message, bool)> {
        let entry = self.receiver.lock().await.recv().await;
        if entry.is_some() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        entry
    }
}

impl Inner {
    fn lane(&self, queue: &str) -> Arc<Lane> {
        // A poisoned lock only means another thread panicked while inserting
        // a lane; the map itself is still consistent.
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        lanes
            .entry(queue.to_owned())
            .or_insert_with(|| {
                let (sender, receiver) = mpsc::unbounded_channel();
                Arc::new(Lane {
                    sender,
                    receiver: tokio::sync::Mutex::new(receiver),
                    waiting: AtomicU64::new(0),
                })
            })
            .clone()
    }
}

impl EmbeddedQueue {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn publish(&self, queue: &str, payload: &[u8], trace_id: &str) -> Result<(), QueueError> {
        let message = Message {
            payload: payload.to_vec(),
            trace_id: trace_id.to_owned(),
            attempt: 1,
            dead_letter_reason: None,
        };
        self.inner.lane(queue).push(message, false);
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, QueueError> {
        let state = ConsumerState {
            queue: queue.to_owned(),
            lane: self.inner.lane(queue),
            inner: self.inner.clone(),
            permits: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        };
        let deliveries = stream::unfold(state, |state| async move {
            // The permit is taken first, so a consumer at its prefetch bound
            // leaves messages on the queue for others. Both waits are
            // cancel-safe: a dropped `next()` releases the permit and loses no
            // message.
            let permit = state.permits.clone().acquire_owned().await.ok()?;
            let (message, redelivered) = state.lane.pop().await?;
            let settler = EmbeddedSettler {
                lane: state.lane.clone(),
                inner: state.inner.clone(),
                queue: state.queue.clone(),
                _permit: permit,
            };
            let delivery =
                Delivery::new(state.queue.clone(), message, redelivered, Box::new(settler));
            Some((delivery, state))
        });
        Ok(Consumer::new(deliveries.boxed()))
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        // Looked up without creating the lane: asking creates no queue.
        let lanes = self
            .inner
            .lanes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Ok(lanes
            .get(queue)
            .map_or(0, |lane| lane.waiting.load(Ordering::Relaxed)))
    }

    /// Always ready: the queue lives in this process.
    async fn check(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

struct ConsumerState {
    queue: String,
    lane: Arc<Lane>,
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
}

/// Settles one embedded delivery; dropping it frees the consumer's permit.
struct EmbeddedSettler {
    lane: Arc<Lane>,
    inner: Arc<Inner>,
    queue: String,
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Settle for EmbeddedSettler {
    async fn ack(&mut self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn retry(&mut self, message: &Message, after: Duration) -> Result<(), QueueError> {
        let mut message = message.clone();
        message.attempt = message.attempt.saturating_add(1);
        let lane = self.lane.clone();
        // The permit is released now, as AMQP's ack of the original would:
        // a waiting retry is not in the consumer's hands.
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            lane.push(message, false);
        });
        Ok(())
    }

    async fn dead_letter(&mut self, message: &Message, reason: &str) -> Result<(), QueueError> {
        let mut message = message.clone();
        message.dead_letter_reason = Some(reason.to_owned());
        self.inner
            .lane(&dead_letter_queue(&self.queue))
            .push(message, false);
        Ok(())
    }

    fn abandon(&mut self, message: Message) {
        self.lane.push(message, true);
    }
}
