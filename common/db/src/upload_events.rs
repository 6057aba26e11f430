//! Wakes the requests waiting for an upload to leave the pipeline (`done`,
//! `failed`, or removed), instead of having them poll its row.
//!
//! The row stays the truth: a waiter that is woken reads the row again,
//! and one that hears nothing still reads it every so often (its caller's
//! safety net), so a lost wake-up costs time, never a wrong answer.
//!
//! - **In one process** (the single-machine server, whose pipeline shares
//!   the [`Database`](super::Database) handle with the API), the
//!   transaction that takes an upload out of the pipeline wakes the
//!   process's waiters right after its commit ([`UploadEvents::wake`]).
//! - **Across processes** (API replicas with separate workers, which needs
//!   PostgreSQL), that transaction also sends `NOTIFY larder_uploads,
//!   '<upload id>'`, which PostgreSQL delivers to every listening session
//!   when (and only if) the transaction commits. Each process that waits
//!   for uploads listens on one connection of its own, opened with its
//!   first waiter and kept until the [`Database`](super::Database) handle
//!   is dropped; a lost connection is reopened, and everyone waiting is
//!   woken to read their rows again, since notifications sent meanwhile are
//!   gone. SQLite has no such channel: it serves one machine, whose one
//!   process is woken directly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::error::{query_error, Result};
use super::types::UploadId;
use super::Backend;

/// The PostgreSQL notification channel of uploads leaving the pipeline;
/// each payload is one upload id.
pub(crate) const UPLOADS_CHANNEL: &str = "larder_uploads";

/// The wait before opening the listening connection again after it
/// failed to open.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A process's waiters, by upload id, and its listening connection.
pub(crate) struct UploadEvents {
    waiters: Mutex<HashMap<UploadId, Vec<Arc<Notify>>>>,
    /// PostgreSQL's URL, for the listening connection; `None` on SQLite.
    listen_url: Option<String>,
    /// Set once the listening task is started; dropping it stops the task.
    listening: OnceLock<DropGuard>,
}

impl std::fmt::Debug for UploadEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("UploadEvents")
            .field("listening", &self.listening.get().is_some())
            .finish_non_exhaustive()
    }
}

impl UploadEvents {
    /// Events for a database at `url` of `backend`.
    pub(crate) fn new(backend: Backend, url: &str) -> Self {
        Self {
            waiters: Mutex::new(HashMap::new()),
            listen_url: (backend == Backend::Postgres).then(|| url.to_owned()),
            listening: OnceLock::new(),
        }
    }

    /// Registers a waiter for `id`; it hears of every wake-up from now on,
    /// also one that comes before it starts waiting. On PostgreSQL the
    /// first waiter of the process starts the listening connection.
    pub(crate) fn watch(self: &Arc<Self>, id: &UploadId) -> UploadWatch {
        if let Some(url) = &self.listen_url {
            self.listening.get_or_init(|| {
                let stop = CancellationToken::new();
                tokio::spawn(listen(url.clone(), Arc::downgrade(self), stop.clone()));
                stop.drop_guard()
            });
        }
        let notify = Arc::new(Notify::new());
        self.lock()
            .entry(id.clone())
            .or_default()
            .push(notify.clone());
        UploadWatch {
            id: id.clone(),
            notify,
            events: self.clone(),
        }
    }

    /// Wakes this process's waiters of `id`: called after the commit that
    /// took the upload out of the pipeline.
    pub(crate) fn wake(&self, id: &UploadId) {
        if let Some(waiters) = self.lock().get(id) {
            for notify in waiters {
                // A permit is kept for a waiter that is not waiting yet.
                notify.notify_one();
            }
        }
    }

    /// Wakes every waiter of this process, to read their rows again.
    fn wake_all(&self) {
        for notify in self.lock().values().flatten() {
            notify.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UploadId, Vec<Arc<Notify>>>> {
        // A panic while holding this lock cannot leave the map half
        // changed (each change is one call), so a poisoned lock is usable.
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Tells PostgreSQL's listeners, when the transaction on `connection`
/// commits, that upload `id` left the pipeline. Nothing on SQLite.
pub(crate) async fn announce_on(
    connection: &mut sqlx::AnyConnection,
    backend: Backend,
    id: &UploadId,
) -> Result<()> {
    if backend != Backend::Postgres {
        return Ok(());
    }
    // NOTIFY takes no bind parameters; an upload id is 32 hex digits (a
    // validated newtype), so it is safe inside the quotes. Not persistent:
    // these one-off texts stay out of the statement cache. (`pg_notify`
    // would take parameters, but returns `void`, which `Any` cannot read.)
    let sql = format!("NOTIFY {UPLOADS_CHANNEL}, '{id}'");
    sqlx::query(&sql)
        .persistent(false)
        .execute(&mut *connection)
        .await
        .map_err(query_error("announcing a finished upload"))?;
    Ok(())
}

/// Listens on PostgreSQL for uploads leaving the pipeline in any process
/// and wakes this process's waiters, until `stop` or until the events are
/// dropped. Reconnects after a failure; each (re)connection wakes every
/// waiter, since notifications sent while not listening are lost.
async fn listen(url: String, events: Weak<UploadEvents>, stop: CancellationToken) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen(UPLOADS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = stop.cancelled() => return,
            listener = listener => match listener {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, "could not listen for finished uploads; trying again");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RECONNECT_DELAY) => continue,
                    }
                }
            },
        };
        let Some(strong) = events.upgrade() else {
            return;
        };
        strong.wake_all();
        drop(strong);
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                received = listener.try_recv() => received,
            };
            let Some(events) = events.upgrade() else {
                return;
            };
            match received {
                Ok(Some(notification)) => match notification.payload().parse::<UploadId>() {
                    Ok(id) => events.wake(&id),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a malformed upload notification")
                    }
                },
                // The connection was lost; the next call reconnects.
                Ok(None) => events.wake_all(),
                Err(error) => {
                    tracing::warn!(%error, "lost the connection listening for finished uploads");
                    events.wake_all();
                    break;
                }
            }
        }
    }
}

/// One waiter's registration for an upload's wake-ups; unregistered when
/// dropped.
#[derive(Debug)]
pub struct UploadWatch {
    id: UploadId,
    notify: Arc<Notify>,
    events: Arc<UploadEvents>,
}

impl UploadWatch {
    /// Waits until the upload may have left the pipeline (a wake-up since
    /// the last call, or since registration), or at most `timeout`.
    /// Returns whether it was woken; either way, the caller reads the row.
    pub async fn woken_within(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.notify.notified())
            .await
            .is_ok()
    }
}

impl Drop for UploadWatch {
    fn drop(&mut self) {
        let mut waiters = self.events.lock();
        if let Some(list) = waiters.get_mut(&self.id) {
            list.retain(|notify| !Arc::ptr_eq(notify, &self.notify));
            if list.is_empty() {
                waiters.remove(&self.id);
            }
        }
    }
}
