//! The operations endpoints every Larder process serves: `/metrics` (the
//! registry, after reading the queues' depths), `/healthz` (200 while the
//! process serves) and `/readyz` (200 only when the database, the queue
//! and storage answer; 503 naming what is down otherwise).
//!
//! `ingest-api` merges [`ops_router`] into its own router, or, with
//! `[ops] listen`, serves it on a listener of its own and keeps only
//! [`healthz_router`] on the public port; the workers and gc-scheduler,
//! which have no router, run [`serve_ops`] on a listener.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use larder_db::Database;
use larder_queue::{
    Queue, CHUNK_DEAD_LETTER_QUEUE, CHUNK_QUEUE, COMPRESS_DEAD_LETTER_QUEUE, COMPRESS_QUEUE,
};
use larder_storage::Storage;

/// The paths [`ops_router`] serves. None can be a cache's URL: cache
/// routes have at least two segments (`/{cache}/nix-cache-info`).
pub const OPS_PATHS: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

/// How long one readiness check or queue-depth read may take before it
/// counts as down. A database whose server is gone makes a pooled query
/// wait for a connection far longer than a probe should.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The queues whose depth `/metrics` reports.
const QUEUES: [&str; 4] = [
    CHUNK_QUEUE,
    COMPRESS_QUEUE,
    CHUNK_DEAD_LETTER_QUEUE,
    COMPRESS_DEAD_LETTER_QUEUE,
];

/// What a process needs reachable to be ready: its database, queue and
/// storage. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Readiness {
    database: Database,
    queue: Arc<dyn Queue>,
    storage: Arc<dyn Storage>,
}

/// One dependency of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    Database,
    Queue,
    Storage,
}

impl Check {
    /// The name `/readyz` reports it by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Queue => "queue",
            Self::Storage => "storage",
        }
    }
}

/// The outcome of [`Readiness::check`]: what is down, if anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    pub down: Vec<Check>,
}

impl Readiness {
    pub fn new(database: Database, queue: Arc<dyn Queue>, storage: Arc<dyn Storage>) -> Self {
        Self {
            database,
            queue,
            storage,
        }
    }

    /// Checks the three at once, each within [`CHECK_TIMEOUT`]; logs why
    /// each one that is down is down.
    pub async fn check(&self) -> ReadinessReport {
        let (database, queue, storage) = tokio::join!(
            bounded(Check::Database, async {
                self.database.ping().await.map_err(report)
            }),
            bounded(Check::Queue, async {
                self.queue.check().await.map_err(report)
            }),
            bounded(Check::Storage, async {
                self.storage.check().await.map_err(report)
            }),
        );
        let down: Vec<Check> = [database, queue, storage]
            .into_iter()
            .filter_map(Result::err)
            .collect();
        ReadinessReport {
            ready: down.is_empty(),
            down,
        }
    }

    /// Reads every pipeline queue's depth into `larder_queue_depth`. A
    /// queue that cannot be read keeps its last value; the failure is
    /// logged.
    pub async fn refresh_queue_depths(&self) {
        let metrics = super::larder();
        for queue in QUEUES {
            match tokio::time::timeout(CHECK_TIMEOUT, self.queue.depth(queue)).await {
                Ok(Ok(depth)) => metrics.set_queue_depth(queue, depth),
                Ok(Err(error)) => {
                    tracing::warn!(
                        queue,
                        error = report(error),
                        "could not read a queue's depth"
                    )
                }
                Err(_) => tracing::warn!(queue, "reading a queue's depth timed out"),
            }
        }
    }
}

/// An error and its causes on one line.
fn report(error: impl std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs one check within [`CHECK_TIMEOUT`]; `Err(check)` when it is down.
async fn bounded(
    check: Check,
    probe: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), Check> {
    let reason = match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(reason)) => reason,
        Err(_) => format!("no answer within {CHECK_TIMEOUT:?}"),
    };
    tracing::warn!(check = check.as_str(), %reason, "not ready");
    Err(check)
}

/// `/metrics`, `/healthz` and `/readyz` ([`OPS_PATHS`]). They need no
/// token: the metrics carry no cache names, hashes or users, and the
/// readiness answer names only which dependency is down (the reason goes
/// to the log).
pub fn ops_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .with_state(readiness)
        .merge(healthz_router())
}

/// `/healthz` alone: what `ingest-api` keeps on its public port when the
/// rest of [`ops_router`] is served elsewhere. It says only that the
/// process answers, so it may be public, and a load balancer probing the
/// port that takes the traffic tests the path the traffic takes.
pub fn healthz_router() -> Router {
    Router::new().route("/healthz", get(healthz))
}

/// Serves [`ops_router`] on `listener` until `shutdown` is cancelled, for a
/// process without an HTTP router of its own (the workers, gc-scheduler):
///
/// ```ignore
/// let listener = tokio::net::TcpListener::bind(listen).await?;
/// let readiness = Readiness::new(database.clone(), queue.clone(), storage.clone());
/// tokio::spawn(larder_service::metrics::serve_ops(listener, readiness, shutdown.clone()));
/// ```
///
/// Returns when the shutdown is complete, or with the error that stopped
/// the listener.
pub async fn serve_ops(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    }
    axum::serve(listener, ops_router(readiness))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(readiness): State<Readiness>) -> Response {
    readiness.refresh_queue_depths().await;
    (
        [(header::CONTENT_TYPE, super::CONTENT_TYPE)],
        super::render(),
    )
        .into_response()
}

/// 200 while the process serves requests at all.
async fn healthz() -> Response {
    Json(serde_json::json!({ "alive": true })).into_response()
}

/// 200 with `{"ready": true, "down": []}`; otherwise 503 with the usual
/// error body (`code`, `error`, `message`) plus `ready` and `down`.
async fn readyz(State(readiness): State<Readiness>) -> Response {
    let report = readiness.check().await;
    if report.ready {
        return Json(report).into_response();
    }
    let names: Vec<&str> = report.down.iter().map(|check| check.as_str()).collect();
    let body = serde_json::json!({
        "code": StatusCode::SERVICE_UNAVAILABLE.as_u16(),
        "error": "NotReady",
        "message": format!("not ready: unreachable: {}", names.join(", ")),
        "ready": false,
        "down": report.down,
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
