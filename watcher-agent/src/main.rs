//! `watcher-agent`: uploads store paths to Larder caches in the background,
//! from the durable queue `larder queue` writes (Nix's post-build-hook) and,
//! when the `[agent]` section names caches in `watch-store`, from the store
//! itself. See `watcher_agent::agent`. Stops gracefully on SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use watcher_agent::agent::{self, AgentConfig};
use watcher_agent::config::{config_path, ClientConfig};

#[derive(Debug, Parser)]
#[command(
    name = "watcher-agent",
    version,
    about = "Larder's background uploader"
)]
struct Cli {
    /// The client config (servers, tokens and the [agent] section) [default:
    /// $XDG_CONFIG_HOME/larder/config.toml]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The queue's directory, shared with `larder queue` [default: the
    /// [agent] section's spool-dir, else $XDG_STATE_HOME/larder/agent]
    #[arg(long, env = "LARDER_SPOOL_DIR", value_name = "DIR")]
    spool_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    agent::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let path = match cli.config {
        Some(path) => path,
        None => config_path()?,
    };
    let settings = ClientConfig::load(&path)?.agent;
    let mut config = AgentConfig::from_settings(path, &settings)?;
    if let Some(dir) = cli.spool_dir {
        config.spool_dir = dir;
    }
    let shutdown = CancellationToken::new();
    agent::cancel_on_signals(shutdown.clone()).context("installing signal handlers")?;
    agent::run(config, shutdown).await?;
    Ok(())
}
