//! Concurrent NAR uploads, bounded per token (its `jti`) and per server:
//! an upload holds a slot of each while its body is being received.
//!
//! The routes that receive a NAR take a slot before their handler runs,
//! and before a byte of the body is read, so that a refusal costs the
//! client nothing to retry:
//!
//! - `PUT /_api/v1/upload-path` is refused at once with 429,
//!   `Retry-After` and the usual JSON error naming the limit; `larder
//!   push` and the agent wait and retry.
//! - `PUT /{cache}/nar/…` (Nix) first waits up to `upload-slot-wait` for
//!   slots, without reading its body, and is refused only then. Nix 2.8
//!   retries a 429 only four times within about five seconds and never
//!   rewinds its upload buffer (a retried PUT goes out without the bytes
//!   the first attempt sent). curl sends `Expect: 100-continue` and holds
//!   the body back for up to a second, until the `100 Continue` hyper
//!   sends when the handler first reads the body: a 429 within that second
//!   leaves the retry whole (`upload-slot-wait = 0` does that, and Nix 2.8
//!   then gives up after five seconds at the limit), while waiting lets it
//!   through a limit held for minutes. A wait costs a task and the
//!   connection, no thread and no buffered body: what curl sends meanwhile
//!   stays in the socket. Current Nix rewinds, and retries a 429 after a
//!   minute.
//!
//! The slot is released when the body has been read to its end, fails, or
//! is dropped: waiting for a path to become visible holds none. Callers
//! without a valid token take no slot; their handler refuses them.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use common::config::HttpConfig;
use common::metrics::larder;

use crate::access::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// What a route does when no slot is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Answer 429 at once (clients that retry).
    Refuse,
    /// Wait up to `upload-slot-wait` without reading the body, then 429
    /// (Nix's own upload protocol).
    Wait,
}

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

/// The middleware of the routes that receive a NAR (see the module
/// documentation): takes the caller's slots, then runs the handler with
/// a body that gives them back when it ends.
pub async fn hold_slot(
    State((state, when_busy)): State<(AppState, WhenBusy)>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    // The handler authenticates again and answers a missing or invalid
    // token itself; only a token's own uploads are counted.
    let jti = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller.claims().map(|claims| claims.jti.clone()),
        Err(_) => None,
    };
    let Some(jti) = jti else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let wait = match when_busy {
        WhenBusy::Refuse => Duration::ZERO,
        WhenBusy::Wait => state.upload_slots.0.wait,
    };
    match state.upload_slots.acquire(&jti, wait).await {
        Ok(slot) => {
            let body = Body::new(SlotBody {
                inner: body,
                slot: Some(slot),
            });
            next.run(Request::from_parts(parts, body)).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// A request body holding its upload's slot until it ends.
struct SlotBody {
    inner: Body,
    slot: Option<UploadSlot>,
}

impl HttpBody for SlotBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::duration::HumanDuration;

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
