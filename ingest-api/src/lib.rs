//! The HTTP server: Nix's binary-cache protocol, the Larder (and Attic)
//! API, and cache management.
//!
//! [`Server::build`] connects the database and storage, binds the ops
//! listener if `[ops] listen` asks for one, and prepares the router;
//! [`Server::run_until`] serves until the shutdown future resolves, then
//! lets in-flight requests finish within the shutdown grace period (module
//! `serve`). Tests build the same server on a port-0 listener.

mod access;
mod access_log;
mod audit;
mod endpoint;
pub mod error;
mod extract;
pub mod first_start;
mod http_metrics;
mod pipeline;
mod push;
mod quota;
mod routes;
pub mod serve;
mod spool;
mod state;
pub mod tokens;
mod ttl_cache;
mod upload_slots;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use larder_api::cache_name::{CacheNameError, CacheNamePattern};
use larder_config::{GcConfig, PipelineConfig, ServerConfig};
use larder_db::{Database, DbError};
use larder_service::metrics::{healthz_router, ops_router, Readiness};
use larder_service::service::{open_database, open_queue, open_shared_queue, ServiceError};
use larder_storage::{Storage, StorageError};
use larder_token::{
    KeyError, MintError, Permission, RevocationList, TokenBuilder, TokenSigningKey, TokenVerifier,
};

pub use routes::router;
pub use state::{AppState, ServedCache, ServedCaches, Shared, SigningKeys};
use ttl_cache::TtlCache;
use upload_slots::UploadSlots;

/// How often the revocation list is reloaded: a revoked token stops
/// working within this long on every server.
pub const REVOCATION_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// How long the read path may serve a cache row or a rendered narinfo
/// from memory: changes made on another replica (or by GC) show within
/// this long, the same bound revocations have.
pub const READ_CACHE_TIME_TO_LIVE: Duration = REVOCATION_REFRESH_INTERVAL;

/// Entries per read cache; a narinfo is about 1 KiB.
const READ_CACHE_CAPACITY: usize = 16_384;

/// How long the root token printed on first start stays valid.
const ROOT_TOKEN_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the server could not start or an admin command failed.
///
/// Each variant names the step and leaves the cause to `source()`, so that
/// a report of the whole chain (`{:#}` through anyhow, as `main` prints)
/// shows every cause once.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("database")]
    Database(#[from] DbError),
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("token signing key")]
    Key(#[from] KeyError),
    #[error("minting a token")]
    Mint(#[from] MintError),
    #[error("serving")]
    Io(#[from] std::io::Error),
    #[error("binding the ops listener ([ops] listen) on {address}")]
    OpsListener {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{0}")]
    Internal(String),
}

/// The token-signing key the config names.
pub fn signing_key(config: &ServerConfig) -> Result<TokenSigningKey, ServerError> {
    let auth = &config.auth;
    Ok(
        match (&auth.hs256_secret_base64, &auth.rs256_private_key_pem) {
            (Some(secret), _) => TokenSigningKey::hs256_from_base64(secret.expose())?,
            (None, Some(pem)) => TokenSigningKey::rs256_from_pem(pem.expose())?,
            // `ServerConfig::validate` guarantees one of the two.
            (None, None) => {
                return Err(ServerError::Internal(
                    "no token signing key configured".into(),
                ))
            }
        },
    )
}

/// Checks what can be checked without connecting anywhere
/// (`--mode check-config`): the token-signing key is usable and the
/// database URL names a supported database.
pub fn check_config(config: &ServerConfig) -> Result<(), ServerError> {
    signing_key(config)?;
    larder_db::Backend::from_url(config.database.url.expose())?;
    Ok(())
}

/// Applies database migrations (`--mode migrate`).
pub async fn migrate(config: &ServerConfig) -> Result<(), ServerError> {
    Database::connect(config.database.url.expose())
        .await?
        .migrate()
        .await?;
    Ok(())
}

/// What a server process runs besides HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything on one machine: the pipeline's workers and the
    /// reconciler run in this process, on the configured queue.
    Monolithic,
    /// HTTP only (`--mode api`): uploads are handed to workers running
    /// elsewhere through a shared queue; any number of these can run.
    Api,
}

/// A server ready to serve on its listener.
pub struct Server {
    state: AppState,
    listener: TcpListener,
    /// `[ops] listen`: where `/metrics` and `/readyz` go instead of the
    /// public listener.
    ops_listener: Option<TcpListener>,
    signing_key: TokenSigningKey,
    revocations: Arc<RevocationList>,
    /// The in-process pipeline's settings, and whether it must republish
    /// every upload in flight at start; none for [`Role::Api`].
    pipeline: Option<(PipelineConfig, bool)>,
    gc: GcConfig,
    serving: serve::ServeSettings,
}

impl Server {
    /// [`Server::build_as`] for the whole server on one machine.
    pub async fn build(config: ServerConfig, listener: TcpListener) -> Result<Self, ServerError> {
        Self::build_as(config, listener, Role::Monolithic).await
    }

    /// Connects and migrates the database, opens storage and the queue,
    /// loads the revocation list, binds the ops listener (`[ops] listen`)
    /// and prepares the router. [`Role::Api`] refuses an embedded queue:
    /// its jobs would never leave the process.
    pub async fn build_as(
        config: ServerConfig,
        listener: TcpListener,
        role: Role,
    ) -> Result<Self, ServerError> {
        let storage = larder_storage::open(&config.storage).await?;
        Self::build_with_storage(config, listener, role, storage).await
    }

    /// [`Server::build_as`] on storage the caller opened instead of the
    /// configured one: for tests that watch what the server asks of
    /// storage through a wrapper around it.
    pub async fn build_with_storage(
        config: ServerConfig,
        listener: TcpListener,
        role: Role,
        storage: Arc<dyn Storage>,
    ) -> Result<Self, ServerError> {
        let ops_listener = match config.ops.listen {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| ServerError::OpsListener { address, source })?,
            ),
            None => None,
        };
        let queue = match role {
            Role::Api => open_shared_queue(&config, "ingest-api --mode api")?,
            Role::Monolithic => open_queue(&config.queue, "ingest-api")?,
        };
        let database = open_database(&config).await?;
        let signing_key = signing_key(&config)?;
        let revocations = Arc::new(RevocationList::new());
        // Loaded before the first request, so a revoked token is never
        // accepted in the moments after a restart.
        revocations.replace(database.revoked_jtis().await?);
        let verifier = TokenVerifier::new(signing_key.verifying_key().clone(), revocations.clone());
        let state = AppState::new(Shared {
            database,
            storage,
            queue,
            ingest: config.ingest.clone(),
            quota: config.quota.clone(),
            door: spool::Door::new(&config.ingest),
            verifier,
            token_key: signing_key.clone(),
            api_endpoint: config
                .api_endpoint
                .as_deref()
                .map(endpoint::with_trailing_slash),
            served_caches: ServedCaches::new(READ_CACHE_TIME_TO_LIVE, READ_CACHE_CAPACITY),
            narinfos: TtlCache::new(READ_CACHE_TIME_TO_LIVE, READ_CACHE_CAPACITY),
            cache_stats: TtlCache::new(routes::STATS_TIME_TO_LIVE, READ_CACHE_CAPACITY),
            access_log: Arc::default(),
            upload_slots: UploadSlots::new(&config.http),
        });
        Ok(Self {
            state,
            listener,
            ops_listener,
            signing_key,
            revocations,
            // An embedded queue starts empty: the uploads left in flight
            // by the previous run need their jobs again. A broker kept them.
            pipeline: (role == Role::Monolithic)
                .then(|| (config.pipeline.clone(), !config.queue.is_shared())),
            gc: config.gc.clone(),
            serving: serve::ServeSettings::from(&config.http),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    /// Where the ops endpoints are served when `[ops] listen` is set.
    pub fn ops_local_addr(&self) -> Result<Option<SocketAddr>, ServerError> {
        Ok(self
            .ops_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?)
    }

    /// The URL clients use: the configured `api-endpoint`, or one made
    /// from the listening address (`localhost` for a wildcard address).
    pub fn public_endpoint(&self) -> String {
        if let Some(endpoint) = &self.state.api_endpoint {
            return endpoint.clone();
        }
        match self.listener.local_addr() {
            Ok(address) if address.ip().is_unspecified() => {
                format!("http://localhost:{}/", address.port())
            }
            Ok(address) => format!("http://{address}/"),
            Err(_) => "http://localhost:8080/".to_owned(),
        }
    }

    /// Mints and records a token with every permission on every cache.
    pub async fn mint_root_token(&self) -> Result<String, ServerError> {
        let everything: CacheNamePattern = "*"
            .parse()
            .map_err(|error: CacheNameError| ServerError::Internal(error.to_string()))?;
        let minted = TokenBuilder::new("root", ROOT_TOKEN_VALIDITY)
            .grant(everything, Permission::ALL)
            .mint(&self.signing_key)?;
        tokens::record(&self.state.database, &minted).await?;
        Ok(minted.token)
    }

    /// Starts the in-process pipeline (module `pipeline`) unless this is an
    /// API-only server, serves until `shutdown` resolves, waits for
    /// in-flight requests (at most `[http] shutdown-grace`, then cuts them
    /// off), then stops the pipeline.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let stop = CancellationToken::new();
        let refresher = tokio::spawn(refresh_revocations(
            self.state.database.clone(),
            self.revocations.clone(),
            stop.clone(),
        ));
        let pipeline = self.pipeline.as_ref().map(|(config, resume)| {
            pipeline::InProcessPipeline::start(&self.state, config, *resume, &self.gc)
        });
        let access_flusher = tokio::spawn({
            let (log, database, interval, stop) = (
                self.state.access_log.clone(),
                self.state.database.clone(),
                self.gc.access_flush_interval.as_duration(),
                stop.clone(),
            );
            async move { log.run_flusher(database, interval, stop).await }
        });
        if let Ok(address) = self.listener.local_addr() {
            tracing::info!(%address, "serving");
        }
        let readiness = Readiness::new(
            self.state.database.clone(),
            self.state.queue.clone(),
            self.state.storage.clone(),
        );
        let (app, ops) = match self.ops_listener {
            None => (router(self.state).merge(ops_router(readiness)), None),
            Some(listener) => {
                if let Ok(address) = listener.local_addr() {
                    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
                }
                (
                    router(self.state).merge(healthz_router()),
                    Some((listener, ops_router(readiness))),
                )
            }
        };
        // One shutdown for both listeners.
        let stop_serving = CancellationToken::new();
        let signal = tokio::spawn({
            let stop_serving = stop_serving.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: finishing in-flight requests");
                stop_serving.cancel();
            }
        });
        let ops = ops.map(|(listener, ops_app)| {
            tokio::spawn(serve::serve(
                listener,
                ops_app,
                self.serving,
                stop_serving.clone().cancelled_owned(),
            ))
        });
        serve::serve(
            self.listener,
            app,
            self.serving,
            stop_serving.clone().cancelled_owned(),
        )
        .await;
        // The ops listener stops with the public one.
        signal.abort();
        stop_serving.cancel();
        if let Some(ops) = ops {
            if let Err(error) = ops.await {
                tracing::warn!(%error, "the ops listener's task failed");
            }
        }
        stop.cancel();
        // After the requests: a push waiting for its path to be visible
        // needs the workers until it answers.
        if let Some(pipeline) = pipeline {
            pipeline.stop().await;
        }
        // Its last flush records the accesses of the final requests.
        let _ = access_flusher.await;
        // The refresher only reads; stopping it mid-query loses nothing.
        let _ = refresher.await;
        Ok(())
    }
}

/// Reloads revoked token ids until `stop`; a failed reload keeps the
/// previous list (revocations only ever grow) and is retried next tick.
async fn refresh_revocations(
    database: Database,
    revocations: Arc<RevocationList>,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(REVOCATION_REFRESH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        match database.revoked_jtis().await {
            Ok(revoked) => revocations.replace(revoked),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(error)),
                "could not reload revoked tokens; keeping the last list"
            ),
        }
    }
}
