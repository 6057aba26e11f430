//! `larder`: log in to Larder servers, manage caches, push store paths and
//! point Nix at a cache.
//!
//! Every failure ends in one `error: …` line on stderr and exit status 1
//! (2 for a command line clap rejects).

use std::io::{BufRead, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use larder_api::byte_size::ByteSize;
use larder_api::duration::HumanDuration;
use larder_api::pin::PinName;
use larder_api::time::format_unix_seconds;
use larder_api::v1::{
    CacheConfig, CacheQuota, CacheStats, CreateCacheRequest, CreatePinRequest, KeepPolicy,
    KeyRotation, KeypairConfig, MintTokenRequest, PurgeRequest, QuotaPolicy, RetentionPeriodConfig,
    StorageUsage, TokenInfo,
};
use watcher_agent::api::ApiClient;
use watcher_agent::config::{self, config_path, CacheRef, ClientConfig, Token};
use watcher_agent::nix_conf::{
    check_public_key, check_substituter, check_token, default_netrc_path, update_netrc_file,
    user_nix_conf_path, NetrcChange, NixConf,
};
use watcher_agent::push::{push, PushOptions};
use watcher_agent::spool::{now_millis, store_path_of, QueuedPath, Spool};
use watcher_agent::{agent, control};

#[derive(Debug, Parser)]
#[command(name = "larder", version, about = "The Larder binary cache client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add a server (or replace its URL and token). The first one added
    /// becomes the default.
    Login {
        /// A short name for the server, used as `NAME:cache`.
        name: String,
        /// The server's URL, e.g. https://cache.example.com/
        url: String,
        /// An API token (`ingest-api make-token`); none for public caches only.
        token: Option<String>,
        /// Make this the default server.
        #[arg(long)]
        set_default: bool,
    },
    /// Configure Nix to substitute from a cache: substituter, public key
    /// and (for a private cache) the token in netrc.
    Use {
        /// `server:cache`, or `cache` on the default server.
        cache: CacheRef,
    },
    /// Create, configure, inspect or destroy caches.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Push store paths (and their closures) to a cache.
    Push(PushArgs),
    /// Queue store paths for the watcher-agent to push (returns at once;
    /// for Nix's post-build-hook), or show the queue: `larder queue status`.
    Queue(QueueArgs),
    /// Push every new store path to a cache as it appears, in the
    /// foreground, until Ctrl-C.
    WatchStore(WatchStoreArgs),
    /// Show, list, mint and revoke API tokens (minting and listing others'
    /// need the manage-tokens permission).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Pin a path's closure so that GC and quota eviction keep it (push
    /// permission to pin and unpin, any permission on the cache to list).
    #[command(subcommand)]
    Pin(PinCommand),
    /// The server's statistics: every cache and how they share storage
    /// (needs configure-cache-quota on every cache, an operator's token).
    Stats {
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Args)]
struct ServerArg {
    /// The server, by the name given to `larder login` [default: the
    /// default server]
    #[arg(long, value_name = "NAME")]
    server: Option<String>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Show the token in use: its subject, id, validity and permissions.
    Whoami {
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the tokens you manage, and your own.
    List {
        /// Only the tokens minted for this subject.
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Mint a token (printed alone on the last line) with at most your own
    /// permissions, expiring no later than your own token.
    Create {
        /// Who the token is for (shown in listings).
        subject: String,
        /// How long it is valid, e.g. '30d' or '3 months'.
        #[arg(long, value_name = "DURATION")]
        validity: HumanDuration,
        /// Permissions on caches matching a pattern, e.g.
        /// 'alice-*=pull,push' (repeatable). Permissions: pull, push,
        /// delete, create-cache, configure-cache, configure-cache-retention,
        /// destroy-cache, configure-cache-quota, manage-tokens.
        #[arg(long = "grant", value_name = "PATTERN=PERMISSIONS", required = true, value_parser = parse_grant)]
        grants: Vec<(String, Vec<String>)>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Revoke a token by its id (as `larder token list` shows it); every
    /// server of the deployment refuses it within seconds.
    Revoke {
        jti: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
enum PinCommand {
    /// Pin PATH (and its closure in the cache) under NAME; pinning NAME
    /// again adds a revision, and the --keep flags (default: the newest
    /// revision only) say which revisions stay.
    Create {
        /// `server:cache`, or `cache` on the default server.
        cache: CacheRef,
        /// Letters, digits, '-', '_' and '.', e.g. 'release-1.2' or 'main'.
        name: PinName,
        /// A store path (or a link to one such as ./result), its base
        /// name or its hash; the cache must hold it.
        path: String,
        #[command(flatten)]
        keep: KeepArgs,
    },
    /// List the cache's pins with their revisions, newest first.
    List {
        /// `server:cache`, or `cache` on the default server.
        cache: CacheRef,
    },
    /// Delete a pin and all its revisions: GC decides about what they
    /// kept again from its next run.
    Delete {
        /// `server:cache`, or `cache` on the default server.
        cache: CacheRef,
        name: PinName,
    },
}

/// Which revisions of a pin stay; at most one of the flags.
#[derive(Debug, Args)]
#[group(multiple = false)]
struct KeepArgs {
    /// Keep the newest N revisions [default for a new pin: 1, the newest
    /// alone; an existing pin keeps its policy unless one is given]
    #[arg(long, value_name = "N")]
    keep_revisions: Option<NonZeroU32>,
    /// Keep the revisions made within the last N days, and the newest
    #[arg(long, value_name = "N")]
    keep_days: Option<NonZeroU32>,
    /// Keep every revision until the pin is deleted
    #[arg(long)]
    forever: bool,
}

impl KeepArgs {
    /// The policy asked for, if any flag was given.
    fn given(&self) -> Option<KeepPolicy> {
        match (self.keep_revisions, self.keep_days, self.forever) {
            (Some(n), _, _) => Some(KeepPolicy::Revisions(n)),
            (_, Some(n), _) => Some(KeepPolicy::Days(n)),
            (_, _, true) => Some(KeepPolicy::Forever),
            (None, None, false) => None,
        }
    }
}

/// `PATTERN=PERMISSIONS`: the pattern and the permission names, which the
/// server checks.
fn parse_grant(text: &str) -> Result<(String, Vec<String>), String> {
    let (pattern, permissions) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not PATTERN=PERMISSIONS, e.g. 'alice-*=pull,push'"))?;
    let pattern = pattern.trim();
    pattern
        .parse::<larder_api::cache_name::CacheNamePattern>()
        .map_err(|error| error.to_string())?;
    let permissions = permissions
        .split(',')
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect::<Vec<_>>();
    Ok((pattern.to_owned(), permissions))
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct QueueArgs {
    #[command(subcommand)]
    command: Option<QueueCommand>,
    /// `server:cache`, or `cache` on the default server.
    #[arg(required = true)]
    cache: Option<CacheRef>,
    /// Store paths, or links to them such as ./result.
    #[arg(required = true)]
    paths: Vec<String>,
    #[command(flatten)]
    spool: SpoolArg,
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Show what is pending, in flight and failed (exit status 1 when no
    /// agent is running).
    Status {
        #[command(flatten)]
        spool: SpoolArg,
    },
}

#[derive(Debug, Args)]
struct SpoolArg {
    /// The agent's queue directory [default: the [agent] section's
    /// spool-dir, else $XDG_STATE_HOME/larder/agent]
    #[arg(long, env = "LARDER_SPOOL_DIR", value_name = "DIR")]
    spool_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct WatchStoreArgs {
    /// `server:cache`, or `cache` on the default server.
    cache: CacheRef,
    /// The store directory on disk [default: from Nix's `store` setting]
    #[arg(long, value_name = "DIR")]
    store_dir: Option<PathBuf>,
    /// Where to keep the queue of paths not pushed yet [default:
    /// $XDG_STATE_HOME/larder/watch-store/SERVER+CACHE]
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Uploads at once.
    #[arg(short = 'j', long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    jobs: u16,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Create a cache with a fresh signing key (or an imported one).
    Create {
        cache: CacheRef,
        #[command(flatten)]
        settings: CacheSettings,
        /// Sign with this Nix secret key (`name:base64`, as
        /// `nix-store --generate-binary-cache-key` writes it) instead of a
        /// new one: clients that trust its public key keep working, e.g.
        /// when moving a cache from Cachix or Attic.
        #[arg(long, value_name = "FILE")]
        import_key: Option<PathBuf>,
    },
    /// Change a cache's settings; only the ones given change.
    #[command(group(clap::ArgGroup::new("key_change").args([
        "regenerate_keypair", "rotate_key", "finish_rotation", "import_key",
    ])))]
    Configure {
        cache: CacheRef,
        #[command(flatten)]
        settings: CacheSettings,
        /// Keep unfetched paths this long, e.g. '30 days'.
        #[arg(
            long,
            value_name = "DURATION",
            conflicts_with = "reset_retention_period"
        )]
        retention_period: Option<HumanDuration>,
        /// Go back to the server's default retention period.
        #[arg(long)]
        reset_retention_period: bool,
        /// Go back to the server's default storage quota (needs the
        /// configure-cache-quota permission).
        #[arg(long, conflicts_with = "quota")]
        reset_quota: bool,
        /// Replace the signing key with a new one at once (clients must
        /// `use` the cache again to trust it; --rotate-key breaks none).
        #[arg(long)]
        regenerate_keypair: bool,
        /// Start a key rotation: a new key signs beside the current one, so
        /// clients can trust it (`larder use` again) before
        /// --finish-rotation retires the old key.
        #[arg(long)]
        rotate_key: bool,
        /// Finish the key rotation in progress: the new key becomes the
        /// only one; clients that trust only the old key stop trusting the
        /// cache.
        #[arg(long)]
        finish_rotation: bool,
        /// Replace the signing key at once with this Nix secret key
        /// (`name:base64`, as `nix-store --generate-binary-cache-key`
        /// writes it).
        #[arg(long, value_name = "FILE")]
        import_key: Option<PathBuf>,
    },
    /// Destroy a cache and every path in it.
    Destroy {
        cache: CacheRef,
        /// Do not ask to type the cache's name first.
        #[arg(long)]
        no_confirm: bool,
    },
    /// Show a cache's key, endpoints and settings.
    Info { cache: CacheRef },
    /// Remove store paths from a cache at once; the server frees their
    /// storage on its next garbage collection, unless another cache holds
    /// the same data. Needs delete permission.
    DeletePath {
        cache: CacheRef,
        /// Store paths (`/nix/store/<hash>-<name>`), base names or hashes.
        #[arg(required = true, value_name = "PATHS")]
        paths: Vec<String>,
    },
    /// Show who pushed, deleted or changed what, newest first. Needs
    /// configure-cache permission.
    Audit {
        cache: CacheRef,
        /// Events to show.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Only events older than this one (the ID column), for the next page.
        #[arg(long, value_name = "ID")]
        before: Option<i64>,
    },
    /// Delete every path one subject or one token pushed (by default only
    /// list them). Needs delete permission.
    Purge {
        cache: CacheRef,
        /// The subject whose tokens pushed the paths.
        #[arg(
            long,
            value_name = "SUBJECT",
            required_unless_present = "token",
            conflicts_with = "token"
        )]
        pushed_by: Option<String>,
        /// The id of the token that pushed them (`larder token list`).
        #[arg(long, value_name = "JTI")]
        token: Option<String>,
        /// Only paths that entered the cache at or after this time: an
        /// RFC 3339 time in UTC ('2026-12-01T08:00:00Z'), a date
        /// ('2026-12-01'), or a duration ago ('2 days').
        #[arg(long, value_name = "TIME", value_parser = parse_since)]
        since: Option<u64>,
        /// Delete them; without it, only list them.
        #[arg(long)]
        yes: bool,
    },
}

/// A time in Unix seconds: RFC 3339 in UTC, a date, or a duration before
/// now.
fn parse_since(text: &str) -> Result<u64, String> {
    if let Some(seconds) = larder_api::time::parse_rfc3339_utc(text.trim()) {
        return Ok(seconds);
    }
    let ago: HumanDuration = text.parse().map_err(|_| {
        format!(
            "{text:?} is neither a time ('2026-12-01T08:00:00Z', '2026-12-01') nor a duration ago ('2 days')"
        )
    })?;
    Ok((now_millis() / 1000).saturating_sub(ago.as_secs()))
}

#[derive(Debug, Args)]
struct CacheSettings {
    /// Anyone may pull, without a token.
    #[arg(long, conflicts_with = "private")]
    public: bool,
    /// Pulling needs a token.
    #[arg(long)]
    private: bool,
    /// Substituter priority; lower is preferred.
    #[arg(long)]
    priority: Option<i32>,
    /// Paths signed by this key are not pushed (repeatable; the server
    /// defaults to cache.nixos.org-1).
    #[arg(long = "upstream-cache-key-name", value_name = "KEY_NAME")]
    upstream_cache_key_names: Vec<String>,
    /// Storage quota in logical bytes, e.g. '50 GiB' (binary) or '500 GB'
    /// (decimal), or 'unlimited'. Needs the configure-cache-quota
    /// permission, which is normally the operator's.
    #[arg(long, value_name = "SIZE", value_parser = parse_quota)]
    quota: Option<CacheQuota>,
    /// What a push over the quota does: 'refuse' it, or 'evict-lru' (remove
    /// the least recently used paths until it fits).
    #[arg(long, value_name = "POLICY")]
    quota_policy: Option<QuotaPolicy>,
}

/// `unlimited`, or a byte size with its unit.
fn parse_quota(text: &str) -> Result<CacheQuota, String> {
    if text.trim().eq_ignore_ascii_case("unlimited") {
        return Ok(CacheQuota::Unlimited);
    }
    let size: ByteSize = text.parse().map_err(|error| format!("{error}"))?;
    Ok(CacheQuota::Bytes(size.bytes()))
}

impl CacheSettings {
    fn visibility(&self) -> Option<bool> {
        match (self.public, self.private) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }

    fn upstream_keys(&self) -> Option<Vec<String>> {
        (!self.upstream_cache_key_names.is_empty()).then(|| self.upstream_cache_key_names.clone())
    }
}

#[derive(Debug, Args)]
struct PushArgs {
    /// `server:cache`, or `cache` on the default server.
    cache: CacheRef,
    /// Store paths, or links to them such as ./result.
    #[arg(required = true)]
    paths: Vec<String>,
    /// Push only the paths given, not their closures.
    #[arg(long)]
    no_closure: bool,
    /// Also push paths signed by the cache's upstream keys.
    #[arg(long)]
    ignore_upstream_cache_filter: bool,
    /// Uploads at once.
    #[arg(short = 'j', long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    jobs: u16,
    /// Return once the server has the uploads, before they are visible.
    #[arg(long)]
    no_wait: bool,
    /// Also upload the build logs of the paths uploaded (their derivers'
    /// logs in the local store; paths without one are skipped).
    #[arg(long)]
    logs: bool,
    /// Once the push is done, pin the path (one path only: a pin names one
    /// closure) under NAME, as `larder pin create` does.
    #[arg(long, value_name = "NAME", conflicts_with = "no_wait")]
    pin: Option<PinName>,
    /// With --pin: which revisions of the pin stay.
    #[command(flatten)]
    keep: KeepArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Login {
            name,
            url,
            token,
            set_default,
        } => login(&name, &url, token, set_default),
        Command::Use { cache } => use_cache(&cache).await,
        Command::Cache(command) => cache_command(command).await,
        Command::Push(args) => push_command(args).await,
        Command::Queue(args) => queue_command(args).await,
        Command::WatchStore(args) => watch_store(args).await,
        Command::Token(command) => token_command(command).await,
        Command::Pin(command) => pin_command(command).await,
        Command::Stats { server } => server_stats(&server).await,
    }
}

fn login(name: &str, url: &str, token: Option<String>, set_default: bool) -> anyhow::Result<()> {
    let path = config_path()?;
    let mut config = ClientConfig::load(&path)?;
    let is_default = config.add_server(name, url, token.map(Token::new), set_default)?;
    config.save(&path)?;
    let endpoint = &config.servers[name].endpoint;
    if is_default {
        println!("logged in to {name} ({endpoint}), the default server");
    } else {
        println!("logged in to {name} ({endpoint})");
    }
    Ok(())
}

/// The API client for a server named by `--server`, or the default one.
fn client_of(server: &ServerArg) -> anyhow::Result<ApiClient> {
    let config = ClientConfig::load(&config_path()?)?;
    ApiClient::new(config.server(server.server.as_deref())?)
}

async fn token_command(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Whoami { server } => {
            let token = client_of(&server)?.whoami().await?;
            print_token(&token);
        }
        TokenCommand::List { subject, server } => {
            let list = client_of(&server)?.list_tokens(subject.as_deref()).await?;
            println!(
                "{:<32}  {:<20}  {:<20}  {:<24}  CACHES",
                "JTI", "SUBJECT", "EXPIRES", "STATUS"
            );
            for token in &list.tokens {
                println!(
                    "{:<32}  {:<20}  {:<20}  {:<24}  {}",
                    token.jti,
                    token.subject,
                    format_unix_seconds(token.expires_at),
                    token_status(token),
                    grants_line(token)
                );
            }
        }
        TokenCommand::Create {
            subject,
            validity,
            grants,
            server,
        } => {
            let request = MintTokenRequest {
                subject,
                valid_for_secs: validity.as_secs(),
                caches: grants.into_iter().collect(),
            };
            let minted = client_of(&server)?.mint_token(&request).await?;
            print_token(&minted.info);
            println!("{}", minted.token);
        }
        TokenCommand::Revoke { jti, server } => {
            if jti.is_empty() || !jti.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                bail!("{jti:?} is not a token id: ids are hexadecimal, as `larder token list` shows them");
            }
            let revoked = client_of(&server)?.revoke_token(&jti).await?;
            println!("revoked token {} of {}", revoked.jti, revoked.subject);
        }
    }
    Ok(())
}

fn print_token(token: &TokenInfo) {
    let mut rows = vec![
        ("Subject", token.subject.clone()),
        ("Token id", token.jti.clone()),
        ("Issued", format_unix_seconds(token.issued_at)),
    ];
    if let Some(not_before) = token.not_before {
        rows.push(("Valid from", format_unix_seconds(not_before)));
    }
    rows.push(("Expires", format_unix_seconds(token.expires_at)));
    rows.push(("Status", token_status(token)));
    for (label, value) in rows {
        println!("{label:>10}: {value}");
    }
    for (pattern, permissions) in &token.caches {
        println!("{:>10}: {pattern} = {}", "Cache", permissions.join(","));
    }
}

fn token_status(token: &TokenInfo) -> String {
    match token.revoked_at {
        Some(at) => format!("revoked {}", format_unix_seconds(at)),
        None if token.expires_at <= now_millis() / 1000 => "expired".to_owned(),
        None => "valid".to_owned(),
    }
}

/// `alice-*=pull,push shared=pull`.
fn grants_line(token: &TokenInfo) -> String {
    token
        .caches
        .iter()
        .map(|(pattern, permissions)| format!("{pattern}={}", permissions.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn server_stats(server: &ServerArg) -> anyhow::Result<()> {
    let stats = client_of(server)?.server_stats().await?;
    println!(
        "{} paths, {} of NARs stored in {} ({}); {} of it used by some cache",
        stats.paths,
        size(stats.nar_bytes),
        size(stats.stored_bytes),
        ratio_line(stats.dedup_ratio),
        size(stats.referenced_bytes),
    );
    println!(
        "{:<24}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
        "CACHE", "PATHS", "NARS", "STORED", "UNIQUE", "SHARED", "ATTRIBUTED"
    );
    for cache in &stats.caches {
        println!(
            "{:<24}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
            cache.stats.cache,
            cache.stats.paths,
            size(cache.stats.nar_bytes),
            size(cache.stats.stored_bytes),
            size(cache.unique_bytes),
            size(cache.shared_bytes),
            size(cache.attributed_bytes),
        );
    }
    Ok(())
}

/// `5.2× smaller`, or what an empty store has.
fn ratio_line(ratio: Option<f64>) -> String {
    match ratio {
        Some(ratio) => format!("{ratio:.2}× smaller"),
        None => "nothing stored".to_owned(),
    }
}

/// A cache's statistics under its info, for a caller who may see them.
fn print_stats(stats: &CacheStats) {
    let when = |time: Option<u64>| time.map_or_else(|| "never".to_owned(), format_unix_seconds);
    let rows = [
        ("Paths", stats.paths.to_string()),
        ("NAR bytes", size(stats.nar_bytes)),
        (
            "Stored",
            format!(
                "{} ({})",
                size(stats.stored_bytes),
                ratio_line(stats.dedup_ratio)
            ),
        ),
        ("Last push", when(stats.last_push)),
        ("Last access", when(stats.last_access)),
    ];
    for (label, value) in rows {
        println!("{label:>20}: {value}");
    }
}

/// The API client for the server a cache argument names.
fn client_for(cache: &CacheRef) -> anyhow::Result<ApiClient> {
    let config = ClientConfig::load(&config_path()?)?;
    let server = config.server(cache.server.as_deref())?;
    ApiClient::new(server)
}

async fn cache_command(command: CacheCommand) -> anyhow::Result<()> {
    match command {
        CacheCommand::Create {
            cache,
            settings,
            import_key,
        } => {
            let keypair = match import_key {
                Some(file) => KeypairConfig::Keypair(read_secret_key(&file)?),
                None => KeypairConfig::Generate,
            };
            let client = client_for(&cache)?;
            let request = CreateCacheRequest {
                keypair,
                is_public: settings.visibility().unwrap_or(false),
                store_dir: None,
                priority: settings.priority,
                upstream_cache_key_names: settings.upstream_keys(),
                storage_quota: settings.quota,
                quota_policy: settings.quota_policy,
            };
            let created = client.create_cache(&cache.cache, &request).await?;
            println!("created cache {cache}");
            print_info(&cache, &created);
        }
        CacheCommand::Configure {
            cache,
            settings,
            retention_period,
            reset_retention_period,
            reset_quota,
            regenerate_keypair,
            rotate_key,
            finish_rotation,
            import_key,
        } => {
            // clap lets at most one of the four through.
            let keypair = match import_key {
                Some(file) => Some(KeypairConfig::Keypair(read_secret_key(&file)?)),
                None => regenerate_keypair.then_some(KeypairConfig::Generate),
            };
            let key_rotation = match (rotate_key, finish_rotation) {
                (true, _) => Some(KeyRotation::Start),
                (_, true) => Some(KeyRotation::Finish),
                _ => None,
            };
            let patch = CacheConfig {
                is_public: settings.visibility(),
                priority: settings.priority,
                upstream_cache_key_names: settings.upstream_keys(),
                storage_quota: settings.quota.or(reset_quota.then_some(CacheQuota::Global)),
                quota_policy: settings.quota_policy,
                retention_period: match (retention_period, reset_retention_period) {
                    (Some(period), _) => Some(RetentionPeriodConfig::Period(period.as_secs())),
                    (None, true) => Some(RetentionPeriodConfig::Global),
                    (None, false) => None,
                },
                keypair,
                key_rotation,
                ..CacheConfig::default()
            };
            if patch == CacheConfig::default() {
                bail!("nothing to change: give at least one setting (see `larder cache configure --help`)");
            }
            let client = client_for(&cache)?;
            let configured = client.configure_cache(&cache.cache, &patch).await?;
            println!("configured cache {cache}");
            match key_rotation {
                Some(KeyRotation::Start) => println!(
                    "started a key rotation: both keys sign now; have clients trust the next \
                     public key (`larder use {cache}` again), then run \
                     `larder cache configure {cache} --finish-rotation`"
                ),
                Some(KeyRotation::Finish) => println!(
                    "finished the key rotation: only the new key signs; clients that trust \
                     only the old key no longer accept the cache's paths"
                ),
                None => {}
            }
            print_info(&cache, &configured);
        }
        CacheCommand::Destroy { cache, no_confirm } => {
            let client = client_for(&cache)?;
            if !no_confirm {
                confirm_destroy(&cache)?;
            }
            client.destroy_cache(&cache.cache).await?;
            println!("destroyed cache {cache}");
        }
        CacheCommand::Info { cache } => {
            let client = client_for(&cache)?;
            let config = client.cache_config(&cache.cache).await?;
            print_info(&cache, &config);
            // Usage is reported to tenants only; so are statistics.
            if config.storage_usage.is_some() {
                print_stats(&client.cache_stats(&cache.cache).await?);
            }
        }
        CacheCommand::DeletePath { cache, paths } => delete_paths(&cache, &paths).await?,
        CacheCommand::Audit {
            cache,
            limit,
            before,
        } => audit(&cache, limit, before).await?,
        CacheCommand::Purge {
            cache,
            pushed_by,
            token,
            since,
            yes,
        } => {
            let request = PurgeRequest {
                pushed_by,
                token,
                since,
                dry_run: !yes,
            };
            let answer = client_for(&cache)?.purge(&cache.cache, &request).await?;
            for path in &answer.paths {
                println!("{path}");
            }
            if answer.dry_run {
                eprintln!(
                    "{} path(s) would be deleted from cache {cache}; run again with --yes to delete them",
                    answer.paths.len()
                );
            } else {
                eprintln!("deleted {} path(s) from cache {cache}", answer.paths.len());
            }
        }
    }
    Ok(())
}

/// The Nix secret key in `file` (`name:base64`), checked here so that a
/// wrong file fails before anything is sent. Error messages never show
/// the file's contents: they may be a secret.
fn read_secret_key(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the secret key file {}", file.display()))?;
    let key = larder_nix::signing::SecretKey::parse(text.trim()).with_context(|| {
        format!(
            "{} does not hold a Nix secret key (`name:base64`, as \
             `nix-store --generate-binary-cache-key` writes it)",
            file.display()
        )
    })?;
    Ok(key.to_nix_secret_string())
}

/// `larder cache audit`: one page of events, newest first.
async fn audit(cache: &CacheRef, limit: u32, before: Option<i64>) -> anyhow::Result<()> {
    let page = client_for(cache)?
        .audit(&cache.cache, limit, before)
        .await?;
    println!(
        "{:<10}  {:<20}  {:<16}  {:<20}  {:<32}  DETAIL",
        "ID", "TIME", "ACTION", "SUBJECT", "TOKEN"
    );
    for event in &page.events {
        let at = u64::try_from(event.at / 1000).unwrap_or(0);
        println!(
            "{:<10}  {:<20}  {:<16}  {:<20}  {:<32}  {}",
            event.id,
            format_unix_seconds(at),
            event.action,
            event.subject.as_deref().unwrap_or("-"),
            event.jti.as_deref().unwrap_or("-"),
            event.detail
        );
    }
    if let Some(before) = page.next_before {
        eprintln!("older events: --before {before}");
    }
    Ok(())
}

/// `larder cache delete-path`: every path's hash is checked before
/// anything is sent.
async fn delete_paths(cache: &CacheRef, paths: &[String]) -> anyhow::Result<()> {
    let hashes = paths
        .iter()
        .map(|path| store_path_hash_of(path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = client_for(cache)?;
    let answer = client.delete_paths(&cache.cache, &hashes).await?;
    println!(
        "deleted {} path(s) from cache {cache}",
        answer.deleted.len()
    );
    for hash in &answer.not_found {
        println!("not in cache {cache}: {hash}");
    }
    Ok(())
}

/// The hash of a store path, a base name (`<hash>-<name>`) or a bare hash.
fn store_path_hash_of(path: &str) -> anyhow::Result<larder_nix::StorePathHash> {
    let base_name = path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path);
    let hash = base_name
        .split_once('-')
        .map_or(base_name, |(hash, _)| hash);
    larder_nix::StorePathHash::parse(hash)
        .with_context(|| format!("{path:?} is not a store path, base name or store path hash"))
}

/// Asks for the cache's name on stdin; anything else cancels.
fn confirm_destroy(cache: &CacheRef) -> anyhow::Result<()> {
    eprint!(
        "Destroying cache {cache} deletes every path in it. Type the cache's name ({}) to confirm: ",
        cache.cache
    );
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    if answer.trim() != cache.cache.as_str() {
        bail!("not destroying cache {cache}: the confirmation did not match its name");
    }
    Ok(())
}

fn print_info(cache: &CacheRef, config: &CacheConfig) {
    let unknown = || "(not reported)".to_owned();
    let mut rows = vec![
        ("Cache", cache.to_string()),
        (
            "Public key",
            config.public_key.clone().unwrap_or_else(unknown),
        ),
        (
            "Substituter endpoint",
            config.substituter_endpoint.clone().unwrap_or_else(unknown),
        ),
        (
            "API endpoint",
            config.api_endpoint.clone().unwrap_or_else(unknown),
        ),
        (
            "Priority",
            config.priority.map_or_else(unknown, |p| p.to_string()),
        ),
        (
            "Visibility",
            config.is_public.map_or_else(unknown, |public| {
                if public { "public" } else { "private" }.to_owned()
            }),
        ),
        (
            "Retention",
            match config.retention_period {
                Some(RetentionPeriodConfig::Global) => "the server's default".to_owned(),
                Some(RetentionPeriodConfig::Period(seconds)) => {
                    HumanDuration::from_secs(seconds).to_string()
                }
                None => unknown(),
            },
        ),
        (
            "Upstream keys",
            config
                .upstream_cache_key_names
                .as_ref()
                .map_or_else(unknown, |names| names.join(" ")),
        ),
        (
            "Storage quota",
            match (config.storage_quota, &config.storage_usage) {
                (Some(CacheQuota::Global), Some(usage)) => match usage.quota_bytes {
                    Some(bytes) => format!("{} (the server's default)", size(bytes)),
                    None => "unlimited (the server's default)".to_owned(),
                },
                (Some(CacheQuota::Unlimited), _) => "unlimited".to_owned(),
                (Some(CacheQuota::Bytes(bytes)), _) => size(bytes),
                _ => unknown(),
            },
        ),
        (
            "Storage used",
            config
                .storage_usage
                .as_ref()
                .map_or_else(unknown, usage_line),
        ),
        (
            "When full",
            match config.quota_policy {
                Some(QuotaPolicy::Refuse) => "refuse pushes".to_owned(),
                Some(QuotaPolicy::EvictLru) => "evict the least recently used paths".to_owned(),
                None => unknown(),
            },
        ),
    ];
    if let Some(next) = &config.next_public_key {
        rows.insert(
            2,
            (
                "Next public key",
                format!("{next} (key rotation in progress: both keys sign)"),
            ),
        );
    }
    for (label, value) in rows {
        println!("{label:>20}: {value}");
    }
}

/// `1.2 GiB` for a byte count.
fn size(bytes: u64) -> String {
    ByteSize::new(bytes).approximate()
}

/// `1.2 GiB of 50.0 GiB (2%): 1.1 GiB in paths, 100.0 MiB in flight`.
fn usage_line(usage: &StorageUsage) -> String {
    let of_quota = match usage.quota_bytes {
        // Rounded down, so 100% means full.
        Some(quota) if quota > 0 => format!(
            " of {} ({}%)",
            size(quota),
            u128::from(usage.used_bytes) * 100 / u128::from(quota)
        ),
        Some(_) => " of 0 B".to_owned(),
        None => String::new(),
    };
    format!(
        "{}{of_quota}: {} in paths, {} in flight",
        size(usage.used_bytes),
        size(usage.paths_bytes),
        size(usage.pending_bytes)
    )
}

async fn use_cache(cache: &CacheRef) -> anyhow::Result<()> {
    let client = client_for(cache)?;
    let config = client.cache_config(&cache.cache).await?;
    let substituter = config
        .substituter_endpoint
        .context("the server did not report the cache's substituter endpoint")?;
    // During a key rotation both keys sign: trusting both keeps this
    // client working when the rotation finishes.
    let public_keys: Vec<String> = std::iter::once(
        config
            .public_key
            .context("the server did not report the cache's public key")?,
    )
    .chain(config.next_public_key)
    .collect();
    // Everything the files will hold is checked before either is touched:
    // a refused value writes nothing.
    let host = check_substituter(&substituter)?;
    for public_key in &public_keys {
        check_public_key(public_key)?;
    }
    let private = !config.is_public.unwrap_or(false);
    let token = if private {
        let token = client.server().token.clone().with_context(|| {
            format!(
                "cache {cache} is private, so Nix needs a token, and none is configured for server {}: \
                 log in with one (`larder login {} URL TOKEN`) or set LARDER_TOKEN",
                client.server().name,
                client.server().name
            )
        })?;
        check_token(token.expose())?;
        Some(token)
    } else {
        None
    };

    let conf_path = user_nix_conf_path()?;
    let mut conf =
        NixConf::read(&conf_path).with_context(|| format!("reading {}", conf_path.display()))?;
    let shown_conf = conf_path.display();
    let mut conf_changed = false;
    if conf.add_to_list("substituters", &substituter) {
        println!("{shown_conf}: added {substituter} to extra-substituters");
        conf_changed = true;
    }
    for public_key in &public_keys {
        if conf.add_to_list("trusted-public-keys", public_key) {
            println!("{shown_conf}: added {public_key} to extra-trusted-public-keys");
            conf_changed = true;
        }
    }

    let mut netrc_note = None;
    if let Some(token) = token {
        let netrc_path = match conf.get("netrc-file") {
            Some(path) => path.into(),
            None => {
                let path = default_netrc_path()?;
                let shown = path.display().to_string();
                conf.set_if_absent("netrc-file", &shown);
                println!("{shown_conf}: set netrc-file = {shown}");
                conf_changed = true;
                path
            }
        };
        let change = update_netrc_file(&netrc_path, &host, token.expose())
            .with_context(|| format!("updating {}", netrc_path.display()))?;
        netrc_note = Some((netrc_path, host, change));
    }
    if conf_changed {
        conf.write(&conf_path)
            .with_context(|| format!("writing {}", conf_path.display()))?;
    }
    let netrc_changed = match &netrc_note {
        Some((path, host, change)) => {
            match change {
                NetrcChange::Added => println!("{}: added the token for {host}", path.display()),
                NetrcChange::Replaced => {
                    println!("{}: replaced the token for {host}", path.display())
                }
                NetrcChange::Unchanged => {}
            }
            *change != NetrcChange::Unchanged
        }
        None => false,
    };
    if !conf_changed && !netrc_changed {
        println!("Nix is already configured to use {cache} ({substituter}); nothing changed");
    } else {
        println!("Nix now substitutes from {cache} ({substituter})");
    }
    Ok(())
}

async fn push_command(args: PushArgs) -> anyhow::Result<()> {
    let keep = args.keep.given();
    // Checked before anything is pushed.
    let pin_root = match (&args.pin, keep) {
        (None, Some(_)) => bail!("--keep-revisions, --keep-days and --forever go with --pin"),
        (None, None) => None,
        (Some(_), _) => match args.paths.as_slice() {
            [path] => Some(root_hash(path)?),
            _ => bail!(
                "--pin pins one path, not {}: a pin names one closure (pin each root \
                 under a name of its own, or build one root that depends on them all)",
                args.paths.len()
            ),
        },
    };
    let client = client_for(&args.cache)?;
    let options = PushOptions {
        closure: !args.no_closure,
        ignore_upstream_filter: args.ignore_upstream_cache_filter,
        jobs: usize::from(args.jobs),
        wait: !args.no_wait,
        logs: args.logs,
    };
    let summary = push(&client, &args.cache.cache, &args.paths, &options).await?;
    println!("{summary}");
    if let (Some(name), Some(hash)) = (args.pin, pin_root) {
        let pinned = create_pin(&client, &args.cache, name, hash, keep).await;
        if let Err(error) = &pinned {
            // The one way a path just pushed is not in the cache.
            let skipped_as_upstream = !args.ignore_upstream_cache_filter
                && error.downcast_ref::<watcher_agent::api::ApiError>().is_some_and(
                    |error| matches!(error, watcher_agent::api::ApiError::Server { name, .. } if name == "NoSuchPath"),
                );
            if skipped_as_upstream {
                bail!(
                    "{error:#}: push leaves out paths signed by the cache's upstream keys; \
                     push with --ignore-upstream-cache-filter to pin this one"
                );
            }
        }
        pinned?;
    }
    Ok(())
}

async fn pin_command(command: PinCommand) -> anyhow::Result<()> {
    match command {
        PinCommand::Create {
            cache,
            name,
            path,
            keep,
        } => {
            let hash = root_hash(&path)?;
            create_pin(&client_for(&cache)?, &cache, name, hash, keep.given()).await?;
        }
        PinCommand::List { cache } => {
            let list = client_for(&cache)?.list_pins(&cache.cache).await?;
            if list.pins.is_empty() {
                println!("no pins in cache {cache}");
            }
            for pin in &list.pins {
                println!("{} (keeps {})", pin.name, pin.keep);
                for revision in &pin.revisions {
                    println!(
                        "  {:>4}  {}  {}{}{}",
                        revision.revision,
                        format_unix_seconds(revision.created_at),
                        revision.store_path,
                        revision
                            .created_by
                            .as_ref()
                            .map_or_else(String::new, |by| format!("  by {by}")),
                        if revision.present {
                            ""
                        } else {
                            "  (deleted from the cache)"
                        }
                    );
                }
            }
        }
        PinCommand::Delete { cache, name } => {
            client_for(&cache)?.delete_pin(&cache.cache, &name).await?;
            println!("deleted pin {name} of cache {cache}");
        }
    }
    Ok(())
}

/// Pins `hash` under `name`; without a policy, the pin keeps its own (a
/// new one gets the default).
async fn create_pin(
    client: &ApiClient,
    cache: &CacheRef,
    name: PinName,
    hash: larder_nix::StorePathHash,
    keep: Option<KeepPolicy>,
) -> anyhow::Result<()> {
    let request = CreatePinRequest {
        name: name.to_string(),
        store_path_hash: hash.to_string(),
        keep,
    };
    let pin = client.create_pin(&cache.cache, &request).await?;
    let newest = pin
        .revisions
        .first()
        .context("the server answered a pin without revisions")?;
    println!(
        "pinned {} as {name} revision {} in cache {cache} (keeps {})",
        newest.store_path, newest.revision, pin.keep
    );
    Ok(())
}

/// The hash of a root given as a store path, a link to one (./result), a
/// base name or a hash.
fn root_hash(path: &str) -> anyhow::Result<larder_nix::StorePathHash> {
    match store_path_of(path) {
        Ok(store_path) => store_path_hash_of(&store_path),
        Err(_) => store_path_hash_of(path),
    }
}

/// The agent's spool directory: the flag (or `LARDER_SPOOL_DIR`), else the
/// `[agent]` section's, else the default.
fn agent_spool_dir(config: &ClientConfig, spool: SpoolArg) -> anyhow::Result<PathBuf> {
    match spool.spool_dir.or_else(|| config.agent.spool_dir.clone()) {
        Some(dir) => Ok(dir),
        None => Ok(agent::default_spool_dir()?),
    }
}

async fn queue_command(args: QueueArgs) -> anyhow::Result<()> {
    let config = ClientConfig::load(&config_path()?)?;
    let (cache, spool_arg) = match (args.command, args.cache) {
        (Some(QueueCommand::Status { spool }), _) => {
            return queue_status(&agent_spool_dir(&config, spool)?)
        }
        (None, Some(cache)) => (cache, args.spool),
        (None, None) => bail!("give a cache and store paths, or `status`"),
    };
    // Only local work here, no `nix` and no network: Nix waits for its
    // post-build-hook before the next build.
    let server = config.server(cache.server.as_deref())?;
    let entries = args
        .paths
        .iter()
        .map(|path| {
            Ok(QueuedPath::new(
                &server.name,
                &cache.cache,
                &store_path_of(path)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spool = Spool::open(&agent_spool_dir(&config, spool_arg)?)?;
    let new = spool.enqueue(&entries)?;
    let target = format!("{}:{}", server.name, cache.cache);
    match new {
        0 => println!("already queued for {target}"),
        1 => println!("queued 1 path for {target}"),
        n => println!("queued {n} paths for {target}"),
    }
    if let Err(error) = control::wake(&spool.socket_path()) {
        eprintln!("warning: {error}; the paths stay queued until it starts");
    }
    Ok(())
}

/// Prints the queue on stdout; fails when no agent runs, after printing.
/// Files in the queue that are not usable entries count as failed, with
/// their reason, whether the agent has set them aside in `failed/` yet or
/// not.
fn queue_status(spool_dir: &std::path::Path) -> anyhow::Result<()> {
    let spool = Spool::open(spool_dir)?;
    let agent = control::status(&spool.socket_path());
    let pending = spool.pending()?;
    let failed = spool.failed()?;
    let now = now_millis();
    let seconds = |millis: u64| format!("{:.0} s", millis as f64 / 1000.0);
    let in_flight = agent
        .as_ref()
        .map(|status| status.in_flight.clone())
        .unwrap_or_default();
    let started: std::collections::HashMap<String, u64> = in_flight
        .into_iter()
        .map(|flight| (flight.key, flight.started_at))
        .collect();
    match &agent {
        Ok(status) => println!(
            "agent: running (pid {}), queue in {}",
            status.pid,
            spool_dir.display()
        ),
        Err(_) => println!("agent: not running, queue in {}", spool_dir.display()),
    }
    let (uploading, waiting): (Vec<&QueuedPath>, Vec<&QueuedPath>) = pending
        .entries
        .iter()
        .partition(|entry| started.contains_key(&entry.key()));
    println!("in flight: {}", uploading.len());
    for entry in uploading {
        let since = started[&entry.key()];
        println!(
            "  {} {} (for {})",
            entry.cache_ref(),
            entry.path,
            seconds(now.saturating_sub(since))
        );
    }
    println!("pending: {}", waiting.len());
    for entry in waiting {
        match &entry.last_error {
            None => println!("  {} {}", entry.cache_ref(), entry.path),
            Some(error) => println!(
                "  {} {} (attempt {} failed, next in {}: {error})",
                entry.cache_ref(),
                entry.path,
                entry.attempts,
                seconds(entry.next_attempt_at.saturating_sub(now))
            ),
        }
    }
    println!(
        "failed: {}",
        failed.entries.len() + failed.unreadable.len() + pending.unreadable.len()
    );
    for entry in &failed.entries {
        println!(
            "  {} {} (after {} attempt{}: {})",
            entry.cache_ref(),
            entry.path,
            entry.attempts,
            if entry.attempts == 1 { "" } else { "s" },
            entry.last_error.as_deref().unwrap_or("no reason recorded")
        );
    }
    // The file name is quoted: whoever can write to the queue chooses it.
    for unreadable in failed.unreadable.iter().chain(&pending.unreadable) {
        println!(
            "  unusable queue entry {:?} ({})",
            unreadable.path, unreadable.reason
        );
    }
    agent?;
    Ok(())
}

async fn watch_store(args: WatchStoreArgs) -> anyhow::Result<()> {
    let path = config_path()?;
    let config = ClientConfig::load(&path)?;
    let server = config.server(args.cache.server.as_deref())?;
    // Fail now, in the foreground, rather than queue paths for a cache
    // that is not there.
    let client = ApiClient::new(server.clone())?;
    client.cache_config(&args.cache.cache).await?;
    let spool_dir = match args.spool_dir {
        Some(dir) => dir,
        None => config::state_home()?
            .join("larder/watch-store")
            .join(format!("{}+{}", server.name, args.cache.cache)),
    };
    let mut agent_config = agent::AgentConfig::from_settings(path, &config.agent)?;
    agent_config.spool_dir = spool_dir;
    agent_config.watch_store = vec![args.cache];
    agent_config.jobs = usize::from(args.jobs);
    if args.store_dir.is_some() {
        agent_config.store_dir = args.store_dir;
    }
    agent::init_logging();
    let shutdown = tokio_util::sync::CancellationToken::new();
    agent::cancel_on_signals(shutdown.clone()).context("installing signal handlers")?;
    agent::run(agent_config, shutdown).await?;
    Ok(())
}
