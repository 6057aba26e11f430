//! The `gc-scheduler` binary: a thin shell around the `gc_scheduler`
//! library. `--once` runs one GC pass and exits (for cron and tests);
//! otherwise GC runs every `gc.interval` until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use common::config::ServerConfig;
use common::db::Database;

#[derive(Parser)]
#[command(version, about = "Larder's garbage collector")]
struct Args {
    /// The server config file (TOML; `LARDER_…` variables override it).
    #[arg(long, env = "LARDER_CONFIG")]
    config: PathBuf,
    /// Run one pass and exit.
    #[arg(long)]
    once: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gc-scheduler: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = ServerConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    if args.once {
        gc_scheduler::gc::run_once(&config).await?;
        return Ok(());
    }
    let database = Database::connect(config.database.url.expose()).await?;
    database.migrate().await?;
    let storage = common::storage::open(&config.storage).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            shutdown.cancel();
        }
    });
    gc_scheduler::gc::run_gc_loop(database, storage, config.gc, shutdown).await;
    Ok(())
}
