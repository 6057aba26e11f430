//! The serving layer: an accept loop on hyper's HTTP/1.1 connections with
//! the timers and limits `axum::serve` lacks, so that no client can hold
//! the server's connections, tasks or buffers for free.
//!
//! - **Header-read timeout**: a client must send a request's whole head
//!   within `header-read-timeout`. hyper (1.x) runs the same timer while a
//!   keep-alive connection waits for its next request, so idle connections
//!   close after that long too.
//! - **Body-idle timeout**: every request body is wrapped so that, while a
//!   handler waits for it, `body-idle-timeout` without a byte fails it. The
//!   handler sees an error from its body (as for a dropped connection) and
//!   cleans up as for any bad body: a stalled upload deletes what it
//!   staged and answers.
//! - **Connection limit**: at most `max-connections` are open. At the limit
//!   the loop stops accepting: new connections wait in the kernel's listen
//!   queue and are served as others close, rather than being accepted only
//!   to be closed (which would cost work and turn a brief surge into client
//!   errors; Nix 2.8 retries a failed request only four times within a few
//!   seconds). A connection that idles or stalls is closed by the timeouts
//!   above, so the queue moves.
//! - **Graceful shutdown within a deadline**: when `shutdown` resolves the
//!   listener closes, idle connections close, and requests in flight go
//!   on (their connections close after the answer) for `shutdown-grace`.
//!   Then every request body still being read fails (handlers clean up as
//!   after the idle timeout), and [`CUT_OFF_ALLOWANCE`] later whatever is
//!   left is dropped.
//!
//! [`serve`] takes any router, so a second listener (the ops endpoints)
//! can be served the same way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower::ServiceExt;

use larder_config::HttpConfig;
use larder_service::metrics::larder;

/// After the grace period, how long handlers get to clean up once their
/// bodies were cut off, before their connections are dropped.
pub const CUT_OFF_ALLOWANCE: Duration = Duration::from_secs(5);

/// How long the loop pauses after an accept error that is not about one
/// connection (out of file descriptors, say), as hyper's examples do.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The serving layer's timers and limits (from `[http]`).
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl From<&HttpConfig> for ServeSettings {
    fn from(config: &HttpConfig) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout.as_duration(),
            body_idle_timeout: config.body_idle_timeout.as_duration(),
            max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
            shutdown_grace: config.shutdown_grace.as_duration(),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then shuts
/// down within the grace period (see the module documentation). Returns
/// once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    let connection = ConnectionSettings {
        builder: Arc::new(builder),
        router,
        body_idle_timeout: settings.body_idle_timeout,
        // Stops keep-alive and closes idle connections.
        draining: CancellationToken::new(),
        // Fails every request body still being read.
        cut_off: CancellationToken::new(),
    };
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let at_limit = AtomicBool::new(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Finished connections are collected as they go, so the set
            // holds only open ones.
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = finished {
                    if error.is_panic() {
                        tracing::error!(%error, "a connection task panicked");
                    }
                }
            }
            (slot, accepted) = accept_within_limit(&listener, &slots, &at_limit) => {
                match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(connection.clone().serve(stream, slot));
                    }
                    Err(error) => accept_error(error).await,
                }
            }
        }
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        "shutting down: finishing in-flight requests"
    );
    connection.draining.cancel();
    if finish(&mut connections, settings.shutdown_grace).await {
        return;
    }
    tracing::warn!(
        open = connections.len(),
        grace = ?settings.shutdown_grace,
        "requests still in flight after the shutdown grace period: cutting off their bodies"
    );
    connection.cut_off.cancel();
    if finish(&mut connections, CUT_OFF_ALLOWANCE).await {
        return;
    }
    tracing::warn!(
        open = connections.len(),
        "closing the connections still open"
    );
    connections.shutdown().await;
}

/// Waits for every connection to end, at most `limit`; whether they did.
async fn finish(connections: &mut JoinSet<()>, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_ok()
}

/// Takes a connection slot, then accepts: at the limit, connections stay
/// in the listen queue until a slot frees.
async fn accept_within_limit(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    at_limit: &AtomicBool,
) -> (
    OwnedSemaphorePermit,
    io::Result<(TcpStream, std::net::SocketAddr)>,
) {
    let slot = match slots.clone().try_acquire_owned() {
        Ok(slot) => {
            at_limit.store(false, Ordering::Relaxed);
            slot
        }
        Err(_) => {
            if !at_limit.swap(true, Ordering::Relaxed) {
                tracing::warn!("max-connections reached: new connections wait until one closes");
            }
            // The semaphore is never closed.
            slots
                .clone()
                .acquire_owned()
                .await
                .expect("the connection semaphore stays open")
        }
    };
    (slot, listener.accept().await)
}

/// Errors that concern one connection are ignored; others (no file
/// descriptors left, say) are logged and the loop pauses, rather than spin.
async fn accept_error(error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "could not accept a connection");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// What every connection task needs; cheap to clone.
#[derive(Clone)]
struct ConnectionSettings {
    builder: Arc<hyper::server::conn::http1::Builder>,
    router: Router,
    body_idle_timeout: Duration,
    draining: CancellationToken,
    cut_off: CancellationToken,
}

impl ConnectionSettings {
    /// Serves one connection until it closes, holding its slot.
    async fn serve(self, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let _open = OpenConnection::new(slot);
        // Answers are written whole by hyper; small ones should not wait
        // for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (router, body_idle_timeout, cut_off) =
            (self.router, self.body_idle_timeout, self.cut_off);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let request = request.map(|body| {
                axum::body::Body::new(GuardedBody::new(body, body_idle_timeout, &cut_off))
            });
            router.clone().oneshot(request)
        });
        let connection = self.builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = self.draining.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = ended {
            if error.is_timeout() {
                larder().http_timeouts.with(&["header"]).inc();
                tracing::debug!("closed a connection that sent no complete request head in time");
            } else {
                // Clients going away mid-request are routine.
                tracing::debug!(%error, "connection ended with an error");
            }
        }
    }
}

/// A connection's slot and its count in `larder_http_open_connections`,
/// given back however the connection task ends (aborted too).
struct OpenConnection {
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit) -> Self {
        larder().http_open_connections.inc();
        Self { _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        larder().http_open_connections.dec();
    }
}

/// Why a request body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the connection failed: {0}")]
    Transport(#[from] hyper::Error),
    #[error("no bytes of the request body arrived for {} seconds", .0.as_secs())]
    Idle(Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A request body that fails when the client sends nothing for the idle
/// timeout while it is being read, or when the shutdown cuts it off.
///
/// The idle clock runs only while a reader waits (the body is polled and
/// has nothing), so a request that waits for an upload slot before it
/// reads, or a handler that reads slowly, is not timed out. Its timer and
/// the shutdown future are made on the first wait, so bodies that arrive
/// whole cost no timer.
struct GuardedBody {
    inner: Incoming,
    idle_timeout: Duration,
    cut_off: CancellationToken,
    /// When the current wait for bytes began.
    waiting_since: Option<Instant>,
    /// Armed at or before the current wait's deadline; re-armed when it
    /// fires early, so a fast stream does not reset a timer per frame.
    timer: Option<Pin<Box<Sleep>>>,
    cut_off_wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl GuardedBody {
    fn new(inner: Incoming, idle_timeout: Duration, cut_off: &CancellationToken) -> Self {
        Self {
            inner,
            idle_timeout,
            cut_off: cut_off.clone(),
            waiting_since: None,
            timer: None,
            cut_off_wait: None,
        }
    }

    /// Polls the cut-off and the idle timer of a wait for bytes.
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let cut_off = self
            .cut_off_wait
            .get_or_insert_with(|| Box::pin(self.cut_off.clone().cancelled_owned()));
        if cut_off.as_mut().poll(cx).is_ready() {
            return Poll::Ready(cut_off_error());
        }
        let deadline = *self.waiting_since.get_or_insert_with(Instant::now) + self.idle_timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= deadline {
                larder().http_timeouts.with(&["body_idle"]).inc();
                return Poll::Ready(BodyError::Idle(self.idle_timeout));
            }
            // Armed for an earlier wait: move it to this one's deadline.
            timer.as_mut().reset(deadline);
        }
    }
}

/// A body cut off by the shutdown, counted.
fn cut_off_error() -> BodyError {
    larder().http_timeouts.with(&["shutdown"]).inc();
    BodyError::ShuttingDown
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.cut_off.is_cancelled() {
            return Poll::Ready(Some(Err(cut_off_error())));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.waiting_since = None;
                Poll::Ready(frame.map(|frame| frame.map_err(BodyError::from)))
            }
            Poll::Pending => self.poll_limits(cx).map(|error| Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
