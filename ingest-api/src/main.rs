//! The `ingest-api` binary: parses flags, sets up logging, and hands over to
//! the `ingest_api` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use ingest_api::first_start;
use ingest_api::tokens::{self, TokenRequest};
use ingest_api::Role;
use larder_api::cache_name::CacheNamePattern;
use larder_api::duration::HumanDuration;
use larder_config::ServerConfig;
use larder_service::service::{init_logging, load_config, termination_signal};
use larder_token::Permission;

#[derive(Debug, Parser)]
#[command(
    name = "ingest-api",
    version,
    about = "Larder's HTTP server: a multi-tenant Nix binary cache"
)]
struct Cli {
    /// The server's config file; created with working defaults on first start.
    /// `--mode api`, and the token commands when the default file does not
    /// exist, read the config from `LARDER_…` environment variables alone
    /// without one. [default: $XDG_CONFIG_HOME/larder/server.toml]
    #[arg(long, global = true, env = "LARDER_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    /// Address to listen on, overriding the config file's `listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,

    /// What to run.
    #[arg(long, value_enum, default_value_t = Mode::Monolithic)]
    mode: Mode,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The whole server on one machine.
    Monolithic,
    /// HTTP only, handing uploads to separately running workers through a
    /// shared queue ([queue] type = "amqp").
    Api,
    /// Load and validate the configuration, then exit.
    CheckConfig,
    /// Apply database migrations, then exit.
    Migrate,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mint a scoped API token (printed alone on the last line).
    MakeToken(Box<MakeTokenArgs>),
    /// List the tokens minted on this server.
    ListTokens,
    /// Revoke a token by its `jti`; a running server refuses it within seconds.
    RevokeToken {
        /// The token's id, as `list-tokens` shows it.
        jti: String,
    },
}

#[derive(Debug, Args)]
struct MakeTokenArgs {
    /// Who the token is for (free text, shown in listings).
    #[arg(long)]
    sub: String,
    /// How long the token is valid, e.g. '3 months', '30d', '1y'.
    #[arg(long)]
    validity: HumanDuration,
    /// Caches (patterns with '*') the token may pull from.
    #[arg(long, value_name = "PATTERN")]
    pull: Vec<CacheNamePattern>,
    /// Caches the token may push to.
    #[arg(long, value_name = "PATTERN")]
    push: Vec<CacheNamePattern>,
    /// Caches the token may delete paths from.
    #[arg(long, value_name = "PATTERN")]
    delete: Vec<CacheNamePattern>,
    /// Cache names the token may create.
    #[arg(long, value_name = "PATTERN")]
    create_cache: Vec<CacheNamePattern>,
    /// Caches the token may reconfigure (visibility, priority, keys…).
    #[arg(long, value_name = "PATTERN")]
    configure_cache: Vec<CacheNamePattern>,
    /// Caches whose retention period the token may change.
    #[arg(long, value_name = "PATTERN")]
    configure_cache_retention: Vec<CacheNamePattern>,
    /// Caches the token may destroy.
    #[arg(long, value_name = "PATTERN")]
    destroy_cache: Vec<CacheNamePattern>,
    /// Caches whose storage quota the token may set (an operator's
    /// permission: tenants normally do not get it).
    #[arg(long, value_name = "PATTERN")]
    configure_cache_quota: Vec<CacheNamePattern>,
    /// Caches for which the token may list, mint (within its own
    /// permissions) and revoke tokens through the API.
    #[arg(long, value_name = "PATTERN")]
    manage_tokens: Vec<CacheNamePattern>,
    /// Print the claims the token would carry, unsigned, instead of minting it.
    #[arg(long)]
    dump_claims: bool,
}

impl MakeTokenArgs {
    fn into_request(self) -> TokenRequest {
        let grants = [
            (Permission::Pull, self.pull),
            (Permission::Push, self.push),
            (Permission::Delete, self.delete),
            (Permission::CreateCache, self.create_cache),
            (Permission::ConfigureCache, self.configure_cache),
            (
                Permission::ConfigureCacheRetention,
                self.configure_cache_retention,
            ),
            (Permission::DestroyCache, self.destroy_cache),
            (Permission::ConfigureCacheQuota, self.configure_cache_quota),
            (Permission::ManageTokens, self.manage_tokens),
        ];
        TokenRequest {
            subject: self.sub,
            validity: self.validity.into(),
            grants: grants
                .into_iter()
                .flat_map(|(permission, patterns)| {
                    patterns
                        .into_iter()
                        .map(move |pattern| (pattern, permission))
                })
                .collect(),
        }
    }
}

fn main() -> ExitCode {
    larder_service::service::bound_malloc_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ingest-api: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ingest-api: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.mode == Mode::Api && cli.command.is_none() {
        // No first start: a fresh config is a single-machine one.
        let config = load_config(cli.config.as_deref(), cli.listen)?;
        return serve(config, Role::Api, None).await;
    }
    // The admin commands read an existing config: the file, or, when none
    // was named and the default one does not exist (a container configured
    // by its environment), the `LARDER_…` variables alone.
    let from_environment = cli.config.is_none()
        && cli.command.is_some()
        && !first_start::default_config_path()?.exists();
    let existing = |path: &std::path::Path| -> anyhow::Result<ServerConfig> {
        if from_environment {
            Ok(load_config(None, None)?)
        } else {
            Ok(first_start::load_existing(path)?)
        }
    };
    let config_path = match cli.config {
        Some(path) => path,
        None => first_start::default_config_path()?,
    };
    match cli.command {
        Some(Command::MakeToken(args)) => {
            let config = existing(&config_path)?;
            let dump_claims = args.dump_claims;
            let request = args.into_request();
            if dump_claims {
                println!("{}", tokens::claims_preview(&request)?.to_json_pretty());
                return Ok(());
            }
            let minted = tokens::mint_and_record(&config, &request).await?;
            println!("{}", minted.token);
            Ok(())
        }
        Some(Command::ListTokens) => {
            let config = existing(&config_path)?;
            print!("{}", tokens::list(&config).await?);
            Ok(())
        }
        Some(Command::RevokeToken { jti }) => {
            let config = existing(&config_path)?;
            tokens::revoke(&config, &jti).await?;
            println!("revoked token {jti}");
            Ok(())
        }
        None => run_mode(cli.mode, &config_path, cli.listen).await,
    }
}

async fn run_mode(
    mode: Mode,
    config_path: &std::path::Path,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    // A check reads the config and never writes one; the other modes
    // create it on first start.
    let prepared = match mode {
        Mode::CheckConfig => {
            let config = first_start::load_existing(config_path)?;
            ingest_api::check_config(&config)?;
            println!("configuration {} is valid", config_path.display());
            return Ok(());
        }
        Mode::Migrate | Mode::Monolithic | Mode::Api => first_start::prepare(config_path)?,
    };
    let mut config = prepared.config;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if mode == Mode::Migrate {
        ingest_api::migrate(&config).await?;
        println!("database migrations applied");
        return Ok(());
    }
    let first_start = prepared.created.then_some(config_path);
    serve(config, Role::Monolithic, first_start).await
}

/// Serves until SIGTERM or Ctrl-C; after a first start (`first_start`
/// names the config just written) prints how to log in.
async fn serve(
    config: ServerConfig,
    role: Role,
    first_start: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    init_logging(config.log.format);
    // Installed first: a SIGTERM from here on is a graceful shutdown.
    let signal = termination_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let server = ingest_api::Server::build_as(config, listener, role).await?;
    if let Some(config_path) = first_start {
        let token = server.mint_root_token().await?;
        println!("Larder is set up: the config is {}", config_path.display());
        println!("A root token with every permission on every cache (keep it secret):");
        println!();
        println!(
            "    larder login local {} {}",
            server.public_endpoint(),
            token
        );
        println!();
    }
    server.run_until(signal).await?;
    Ok(())
}
