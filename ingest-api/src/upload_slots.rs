//! Concurrent NAR uploads, bounded per token (its `jti`) and per server:
//! an upload holds a slot of each while its body is being received.
//!
//! The routes that receive a NAR take their slots in a middleware
//! (`routes::hold_slot`, which says what each route does when none is
//! free) before their handler runs. A slot is given back when dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use larder_config::HttpConfig;
use larder_service::metrics::larder;

use crate::error::ApiError;

/// The slots of one server; cheap to clone.
#[derive(Debug, Clone)]
pub struct UploadSlots(Arc<Slots>);

#[derive(Debug)]
struct Slots {
    server: Arc<Semaphore>,
    server_limit: u32,
    per_token_limit: u32,
    wait: Duration,
    /// Only tokens with an upload receiving or waiting have an entry.
    tokens: Mutex<HashMap<String, TokenEntry>>,
}

#[derive(Debug)]
struct TokenEntry {
    semaphore: Arc<Semaphore>,
    /// Requests holding or waiting for this token's slots; the entry goes
    /// when the last one ends.
    users: usize,
}

/// An upload's slots, given back when dropped.
#[derive(Debug)]
pub struct UploadSlot {
    // Fields drop in order: the permits go back before the token's entry
    // may be removed.
    _server: OwnedSemaphorePermit,
    _token: OwnedSemaphorePermit,
    _held: Held,
    _user: TokenUser,
}

/// Counts a held slot in `larder_upload_slots_held` while it lives.
#[derive(Debug)]
struct Held;

impl Held {
    fn new() -> Self {
        larder().upload_slots_held.inc();
        Self
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        larder().upload_slots_held.dec();
    }
}

/// Counts a wait in `larder_upload_slots_waiting` while it lasts (also
/// when the client gives up and the wait is dropped).
struct Waiting;

impl Waiting {
    fn new() -> Self {
        larder().upload_slots_waiting.inc();
        Self
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        larder().upload_slots_waiting.dec();
    }
}

impl UploadSlots {
    pub fn new(config: &HttpConfig) -> Self {
        Self(Arc::new(Slots {
            server: Arc::new(Semaphore::new(permits(config.max_concurrent_uploads))),
            server_limit: config.max_concurrent_uploads,
            per_token_limit: config.max_concurrent_uploads_per_token,
            wait: config.upload_slot_wait.as_duration(),
            tokens: Mutex::new(HashMap::new()),
        }))
    }

    /// How long a route that waits for slots waits (`upload-slot-wait`).
    pub fn wait(&self) -> Duration {
        self.0.wait
    }

    /// A slot of the token `jti` and one of the server, waiting at most
    /// `wait` for both (zero: only if free now); otherwise the 429 that
    /// names the limit that was reached.
    pub async fn acquire(&self, jti: &str, wait: Duration) -> Result<UploadSlot, ApiError> {
        let user = self.token_user(jti);
        let deadline = tokio::time::Instant::now() + wait;
        let mut waiting = None;
        let token = acquire_by(&user.semaphore, deadline, &mut waiting)
            .await
            .ok_or_else(|| {
                busy(format!(
                    "this token already has {} uploads in progress, the most this server \
                     allows per token ([http] max-concurrent-uploads-per-token)",
                    self.0.per_token_limit
                ))
            })?;
        let server = acquire_by(&self.0.server, deadline, &mut waiting)
            .await
            .ok_or_else(|| {
                busy(format!(
                    "the server already has {} uploads in progress, the most it allows \
                     ([http] max-concurrent-uploads)",
                    self.0.server_limit
                ))
            })?;
        Ok(UploadSlot {
            _server: server,
            _token: token,
            _held: Held::new(),
            _user: user,
        })
    }

    /// Registers a user of the token's semaphore, creating it if needed.
    fn token_user(&self, jti: &str) -> TokenUser {
        let mut tokens = lock(&self.0.tokens);
        let entry = tokens.entry(jti.to_owned()).or_insert_with(|| TokenEntry {
            semaphore: Arc::new(Semaphore::new(permits(self.0.per_token_limit))),
            users: 0,
        });
        entry.users += 1;
        TokenUser {
            slots: self.0.clone(),
            jti: jti.to_owned(),
            semaphore: entry.semaphore.clone(),
        }
    }
}

/// A configured limit as a number of permits (a semaphore holds at most
/// `MAX_PERMITS`, far beyond any sensible limit).
fn permits(limit: u32) -> usize {
    usize::try_from(limit)
        .unwrap_or(Semaphore::MAX_PERMITS)
        .min(Semaphore::MAX_PERMITS)
}

/// A permit of `semaphore` now, or by `deadline`; a wait is counted in
/// `waiting` from its start to the end of the acquisition.
async fn acquire_by(
    semaphore: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
    waiting: &mut Option<Waiting>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = semaphore.clone().try_acquire_owned() {
        return Some(permit);
    }
    if deadline <= tokio::time::Instant::now() {
        return None;
    }
    waiting.get_or_insert_with(Waiting::new);
    // The semaphores are never closed: an error cannot happen.
    tokio::time::timeout_at(deadline, semaphore.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

fn busy(message: String) -> ApiError {
    ApiError::TooManyUploads(format!("{message}; retry in a moment"))
}

/// The token map's lock: held only for map operations, which cannot
/// panic, so a poisoned lock still holds a consistent map.
fn lock(
    tokens: &Mutex<HashMap<String, TokenEntry>>,
) -> std::sync::MutexGuard<'_, HashMap<String, TokenEntry>> {
    tokens
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One request's use of a token's semaphore.
#[derive(Debug)]
struct TokenUser {
    slots: Arc<Slots>,
    jti: String,
    semaphore: Arc<Semaphore>,
}

impl Drop for TokenUser {
    fn drop(&mut self) {
        let mut tokens = lock(&self.slots.tokens);
        if let Some(entry) = tokens.get_mut(&self.jti) {
            entry.users -= 1;
            if entry.users == 0 {
                tokens.remove(&self.jti);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use larder_api::duration::HumanDuration;

    fn slots(server: u32, per_token: u32) -> UploadSlots {
        UploadSlots::new(&HttpConfig {
            max_concurrent_uploads: server,
            max_concurrent_uploads_per_token: per_token,
            upload_slot_wait: HumanDuration::from_secs(60),
            ..HttpConfig::default()
        })
    }

    fn refused(result: Result<UploadSlot, ApiError>) -> String {
        match result {
            Err(ApiError::TooManyUploads(message)) => message,
            other => panic!("expected a 429, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_token_past_its_limit_is_refused_and_others_are_not() {
        let slots = slots(3, 2);
        let first = slots
            .acquire("a", Duration::ZERO)
            .await
            .expect("a first slot");
        let _second = slots
            .acquire("a", Duration::ZERO)
            .await
            .expect("a second slot");
        let message = refused(slots.acquire("a", Duration::ZERO).await);
        assert!(
            message.contains("max-concurrent-uploads-per-token"),
            "{message}"
        );

        // Another token takes the server's last slot, then the server is full.
        let _other = slots
            .acquire("b", Duration::ZERO)
            .await
            .expect("another token");
        let message = refused(slots.acquire("c", Duration::ZERO).await);
        assert!(
            message.contains("[http] max-concurrent-uploads)"),
            "{message}"
        );
        drop(first);
        slots
            .acquire("c", Duration::ZERO)
            .await
            .expect("the slot given back");
    }

    #[tokio::test]
    async fn a_waiting_upload_gets_the_slot_that_frees_or_gives_up() {
        let slots = slots(8, 1);
        let held = slots.acquire("a", Duration::ZERO).await.expect("a slot");
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("a", Duration::from_secs(600)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "the waiter gave up early");
        drop(held);
        let slot = tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .expect("the waiter got the slot freed for it")
            .expect("the waiter task")
            .expect("the freed slot");

        // While the slot is held, a wait ends with a refusal.
        refused(slots.acquire("a", Duration::from_millis(50)).await);
        drop(slot);
    }

    #[tokio::test]
    async fn a_token_leaves_no_entry_once_its_uploads_end() {
        let slots = slots(8, 1);
        let held = slots.acquire("a", Duration::ZERO).await.expect("a slot");
        refused(slots.acquire("a", Duration::ZERO).await);
        assert_eq!(lock(&slots.0.tokens).len(), 1);
        drop(held);
        assert!(lock(&slots.0.tokens).is_empty());
        assert_eq!(slots.0.server.available_permits(), 8);
    }
}
