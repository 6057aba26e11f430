//! What every Larder service process shares: the
//! `--config`/`--listen` flags, loading the config, logging, opening the
//! database, storage and queue the config names, and turning SIGTERM or
//! Ctrl-C into a [`CancellationToken`].
//!
//! A service binary is a few lines around [`run_service`]: it parses its
//! flags (with [`ServiceArgs`] flattened in), and hands its library's
//! `run(config, shutdown)` over. The library opens what it needs with
//! [`Services::open`] (or the single openers) and winds down when the token
//! is cancelled.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::metrics::{serve_ops, Readiness};
use larder_api::byte_size::ByteSize;
use larder_config::{ConfigError, LogFormat, PipelineConfig, QueueConfig, ServerConfig};
use larder_db::{Database, DbError, QuotaDefaults};
use larder_queue::{AmqpQueue, EmbeddedQueue, Queue};
use larder_storage::{Storage, StorageError};
use larder_tls::{CaFile, TlsError};

/// The flags every service binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// The config file (TOML); `LARDER_SECTION__KEY` environment variables
    /// override it. Without one, the config comes from the environment
    /// variables alone.
    #[arg(long, env = "LARDER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Address to listen on, overriding the config's `listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// Why a service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("configuration")]
    Config(#[from] ConfigError),
    #[error("database")]
    Database(#[from] DbError),
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("job queue")]
    Queue(#[from] larder_queue::QueueError),
    #[error("job queue: queue.ca-file")]
    QueueCaFile(#[source] TlsError),
    #[error("serving /metrics, /healthz and /readyz on {address}")]
    Ops {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{service} needs a queue other processes share: set [queue] type = \"amqp\" and its url \
         (an embedded queue lives inside one process)"
    )]
    EmbeddedQueue { service: &'static str },
}

/// Loads the config: `path` (then the environment), or the `LARDER_…`
/// environment variables alone when there is no file; `listen` overrides
/// the config's.
pub fn load_config(
    path: Option<&Path>,
    listen: Option<SocketAddr>,
) -> Result<ServerConfig, ConfigError> {
    let mut config = match path {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::from_toml_and_env(
            "",
            Path::new("(environment variables)"),
            std::env::vars_os(),
        )?,
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    Ok(config)
}

/// Installs the process-wide log subscriber: human-readable lines or JSON
/// lines for log collectors; the level comes from `RUST_LOG` (default
/// `info`). A second call (tests starting several servers in one process)
/// keeps the first.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: log files and collectors
    // get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Connects to the configured database and brings its schema up to date
/// (safe from several processes at once, see [`Database::migrate`]), so
/// that services may start in any order. The handle enforces the
/// configured `[quota] default-cache-quota`.
pub async fn open_database(config: &ServerConfig) -> Result<Database, DbError> {
    let database = Database::connect(config.database.url.expose())
        .await?
        .with_quota_defaults(QuotaDefaults {
            default_quota: config.quota.default_cache_quota.map(ByteSize::bytes),
        });
    database.migrate().await?;
    Ok(database)
}

/// The configured queue. `service` names this process's broker connections
/// (with its pid), as RabbitMQ's management tools show them. An AMQP queue
/// connects lazily: the first publish or consume reports a broker that
/// cannot be reached; its CA file is read and checked now.
pub fn open_queue(config: &QueueConfig, service: &str) -> Result<Arc<dyn Queue>, ServiceError> {
    Ok(match config {
        QueueConfig::Embedded => Arc::new(EmbeddedQueue::new()),
        QueueConfig::Amqp { url, ca_file } => {
            let ca_file =
                CaFile::read_optional(ca_file.as_deref()).map_err(ServiceError::QueueCaFile)?;
            Arc::new(AmqpQueue::new(
                url.expose(),
                ca_file.as_ref(),
                &format!("{service} (pid {})", std::process::id()),
            ))
        }
    })
}

/// What a separately running service works with: the database, storage
/// and a queue shared with the other processes.
#[derive(Debug, Clone)]
pub struct Services {
    pub database: Database,
    pub storage: Arc<dyn Storage>,
    pub queue: Arc<dyn Queue>,
}

impl Services {
    /// Opens the database, storage and queue of `config` for `service`,
    /// refusing an embedded queue: jobs published into it would never
    /// leave this process.
    pub async fn open(config: &ServerConfig, service: &'static str) -> Result<Self, ServiceError> {
        let queue = open_shared_queue(config, service)?;
        Ok(Self {
            database: open_database(config).await?,
            storage: larder_storage::open(&config.storage).await?,
            queue,
        })
    }

    /// Starts serving `/metrics`, `/healthz` and `/readyz` (ready: these
    /// services reachable) on `listen`, until `shutdown` or
    /// [`OpsServer::stop`]: what a service without its own HTTP router
    /// runs beside its work.
    pub async fn serve_ops(
        &self,
        listen: SocketAddr,
        shutdown: &CancellationToken,
    ) -> Result<OpsServer, ServiceError> {
        let ops_error = |source| ServiceError::Ops {
            address: listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(ops_error)?;
        let readiness = Readiness::new(
            self.database.clone(),
            self.queue.clone(),
            self.storage.clone(),
        );
        let stop = shutdown.child_token();
        let task = tokio::spawn(serve_ops(listener, readiness, stop.clone()));
        Ok(OpsServer { listen, stop, task })
    }
}

/// A pipeline worker's service: opens the database, storage and the shared
/// queue `config` names, serves `/metrics`, `/healthz` and `/readyz` on
/// `listen`, and runs `work` (the worker's consume loop over those
/// services and the `[pipeline]` settings) until `shutdown`.
pub async fn run_worker<Work, Worked>(
    config: ServerConfig,
    shutdown: CancellationToken,
    service: &'static str,
    work: Work,
) -> Result<(), ServiceError>
where
    Work: FnOnce(Services, PipelineConfig, CancellationToken) -> Worked,
    Worked: Future<Output = Result<(), larder_queue::QueueError>>,
{
    let services = Services::open(&config, service).await?;
    let ops = services.serve_ops(config.listen, &shutdown).await?;
    let worked = work(services, config.pipeline, shutdown).await;
    ops.stop().await?;
    Ok(worked?)
}

/// The ops endpoints of a service, served in the background.
#[derive(Debug)]
pub struct OpsServer {
    listen: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OpsServer {
    /// Stops serving (also when the service's work ended without a
    /// shutdown, e.g. on an error) and reports what stopped the listener,
    /// if anything did.
    pub async fn stop(self) -> Result<(), ServiceError> {
        self.stop.cancel();
        let served = self
            .task
            .await
            .map_err(|join| std::io::Error::other(join.to_string()))
            .and_then(|served| served);
        served.map_err(|source| ServiceError::Ops {
            address: self.listen,
            source,
        })
    }
}

/// The configured queue if other processes can share it (see [`open_queue`]).
pub fn open_shared_queue(
    config: &ServerConfig,
    service: &'static str,
) -> Result<Arc<dyn Queue>, ServiceError> {
    if !config.queue.is_shared() {
        return Err(ServiceError::EmbeddedQueue { service });
    }
    open_queue(&config.queue, service)
}

/// A token cancelled on the first SIGTERM or Ctrl-C (the signals an init
/// system or an operator stops a service with). A second signal is left to
/// its default action, so a stuck shutdown can still be interrupted. The
/// handlers are installed before this returns, so a signal that arrives
/// at any later moment (say, just after the service says it is serving)
/// is a graceful shutdown, never the default action's death.
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let cancel = shutdown.clone();
    let signal = termination_signal();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down: letting running work finish");
        cancel.cancel();
    });
    shutdown
}

/// Resolves on Ctrl-C or SIGTERM; the handlers are installed when it is
/// called, not when it is first polled. Must be called within a tokio
/// runtime.
pub fn termination_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // A handler that cannot be installed leaves that signal's default
        // action, which still ends the process.
        let terminate = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async move {
            let received = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = received(terminate) => {}
                () = received(interrupt) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            // If the handler cannot be installed, Ctrl-C still kills the process.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// glibc's malloc settings every Larder service runs with, unless its
/// operator set `GLIBC_TUNABLES`: at most two malloc arenas. By default
/// glibc gives each thread that allocates an arena of its own, up to eight
/// per core, and each keeps the memory freed in it (a megabyte buffer freed
/// raises the size under which freed memory stays cached); with tokio's
/// blocking threads and SQLite's connection threads, `ingest-api` held
/// about 110 MiB in fifteen arenas through `ops/bench-push.sh` (peak RSS
/// 122 MiB), against 66 MiB in all with two.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub const MALLOC_TUNABLES: &str = "glibc.malloc.arena_max=2";

/// Runs this process again, the same program with the same arguments and
/// process id, with [`MALLOC_TUNABLES`] in `GLIBC_TUNABLES`, which glibc
/// reads only at start; does nothing when `GLIBC_TUNABLES` is set already
/// (by the operator, or by this re-execution) or off glibc, and goes on
/// with glibc's defaults (saying so) if the re-execution fails. Call it
/// first in `main`, before any thread starts.
pub fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        let mut args = std::env::args_os();
        let program = args.next().unwrap_or_default();
        // `/proc/self/exe` is this very binary, even if its file was
        // replaced or removed since it started.
        let error = std::process::Command::new("/proc/self/exe")
            .arg0(&program)
            .args(args)
            .env("GLIBC_TUNABLES", MALLOC_TUNABLES)
            .exec();
        eprintln!(
            "{}: could not run again with GLIBC_TUNABLES={MALLOC_TUNABLES} ({error}); going on \
             with glibc's malloc defaults",
            program.to_string_lossy()
        );
    }
}

/// A service binary's `main`: starts the runtime, loads the config from
/// `args`, sets up logging, runs `run(config, shutdown)` until it returns
/// (after a signal cancelled `shutdown`, or on an error), and reports an
/// error with its causes on stderr with a non-zero exit.
pub fn run_service<Run, Fut, E>(service: &str, args: &ServiceArgs, run: Run) -> ExitCode
where
    Run: FnOnce(ServerConfig, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    bound_malloc_arenas();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{service}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let config = match load_config(args.config.as_deref(), args.listen) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{service}: {}", error_chain(&error));
            return ExitCode::FAILURE;
        }
    };
    init_logging(config.log.format);
    let outcome = runtime.block_on(async {
        let shutdown = shutdown_on_signal();
        run(config, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{service}: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
