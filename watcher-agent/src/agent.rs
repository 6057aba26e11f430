//! The `watcher-agent` daemon (and `larder watch-store`, which runs the
//! same code in the foreground): background uploads from the durable queue
//! in [`crate::spool`], fed by `larder queue` (Nix's post-build-hook) and,
//! when configured, by a [`StoreWatcher`] on the local store.
//!
//! - Entries are pushed with [`crate::push::push`] (closure, upstream
//!   filter, missing paths, parallel uploads), grouped per cache, one push
//!   per cache at a time. An entry leaves the queue only after the server
//!   acknowledged its upload, so a crash, a SIGKILL or a reboot at any
//!   moment loses nothing; at worst a path is offered again and the
//!   server reports it cached.
//! - A transient failure (server unreachable, 5xx) is retried with a
//!   doubling delay; after `max-attempts` the entry is moved to `failed`,
//!   where `larder queue status` shows it with its error. Anything else
//!   (no such cache, a refused token, a path no longer valid) fails the
//!   entry at once: retrying would not help. When a group of entries
//!   fails that way, each is retried alone, so one bad path does not
//!   fail the others.
//! - A file in the queue that is not a usable entry (not JSON, truncated,
//!   unreadable, a directory) is logged and set aside in `failed/` with
//!   the reason; the rest of the queue flows. One that cannot even be
//!   moved (no write permission on the directory) is logged once and
//!   skipped. Likewise an entry whose new state cannot be written (say,
//!   uploaded but not removable) is logged once and held in memory, so
//!   that it is not pushed again in a tight loop.
//! - On shutdown, uploads in flight are abandoned; their entries are still
//!   pending and are pushed on the next start.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use larder_api::cache_name::CacheName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::ApiClient;
use crate::config::{state_home, AgentSettings, CacheRef, ClientConfig, ConfigError};
use crate::control::{self, AgentStatus, InFlight};
use crate::nix::{self, NixError};
use crate::push::{push, PushError, PushOptions, PushSummary};
use crate::spool::{now_millis, QueuedPath, Spool, SpoolError, UnreadableEntry};
use crate::watch::{StoreWatcher, WatchError};

/// Entries pushed together (one closure computation, one missing-paths
/// query).
const BATCH: usize = 100;
/// How often the spool is read even when nothing woke the agent: entries
/// written while the control socket was not listening are found this way.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// How long a control connection may take to send its request.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the agent stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("finding the store directory to watch: {0}")]
    StoreDir(#[from] NixError),
    #[error("another watcher-agent is already running on {0}")]
    AlreadyRunning(PathBuf),
    #[error("listening on {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// When to try a failed entry again, and when to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// About a day of attempts (5 s, 10 s, … then every 30 minutes) before
    /// giving up: long enough for a server's maintenance window.
    fn default() -> Self {
        Self {
            first_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(30 * 60),
            max_attempts: 55,
        }
    }
}

impl RetryPolicy {
    /// The delay after the `attempts`-th failed attempt.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        self.first_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
    }
}

/// What the agent does, resolved from the `[agent]` section and flags.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The client config (servers, tokens), read again for every push so
    /// that a new `larder login` applies without a restart.
    pub config_path: PathBuf,
    pub spool_dir: PathBuf,
    /// Caches that get every new valid store path.
    pub watch_store: Vec<CacheRef>,
    /// The store directory on disk to watch; `None`: ask Nix.
    pub store_dir: Option<PathBuf>,
    /// Uploads at once within one push.
    pub jobs: usize,
    pub retry: RetryPolicy,
}

impl AgentConfig {
    /// The agent's config from the `[agent]` section of the client config
    /// at `config_path`, with defaults for what it leaves out.
    pub fn from_settings(
        config_path: PathBuf,
        settings: &AgentSettings,
    ) -> Result<Self, ConfigError> {
        let defaults = RetryPolicy::default();
        Ok(Self {
            config_path,
            spool_dir: match &settings.spool_dir {
                Some(dir) => dir.clone(),
                None => default_spool_dir()?,
            },
            watch_store: settings.watch_store.clone(),
            store_dir: settings.store_dir.clone(),
            jobs: settings.jobs.map_or(5, usize::from).max(1),
            retry: RetryPolicy {
                first_delay: settings
                    .retry_delay
                    .map_or(defaults.first_delay, |delay| delay.as_duration()),
                max_delay: settings
                    .max_retry_delay
                    .map_or(defaults.max_delay, |delay| delay.as_duration()),
                max_attempts: settings
                    .max_attempts
                    .unwrap_or(defaults.max_attempts)
                    .max(1),
            },
        })
    }
}

/// Cancels `shutdown` on SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
            _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Logs to stderr, at `info` unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// `$XDG_STATE_HOME/larder/agent`: the daemon's queue, shared with
/// `larder queue`.
pub fn default_spool_dir() -> Result<PathBuf, ConfigError> {
    Ok(state_home()?.join("larder").join("agent"))
}

/// What the control socket and the uploader share.
#[derive(Debug, Default)]
struct Shared {
    /// Queue keys being uploaded, with when their attempt started.
    in_flight: Mutex<HashMap<String, u64>>,
    wake: Notify,
}

impl Shared {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs the agent until `shutdown`: the control socket, the store watcher
/// (if any cache is to get new store paths) and the uploader.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let spool = Spool::open(&config.spool_dir)?;
    spool.remove_stale_temporaries();
    let client_config = ClientConfig::load(&config.config_path)?;
    let watch_targets: Vec<(String, CacheName)> = config
        .watch_store
        .iter()
        .map(|cache| {
            let server = client_config.server(cache.server.as_deref())?;
            Ok((server.name, cache.cache.clone()))
        })
        .collect::<Result<_, ConfigError>>()?;
    // The watch is registered before the socket listens: once the agent
    // answers, it sees every new path.
    let watcher = if watch_targets.is_empty() {
        None
    } else {
        let dir = match &config.store_dir {
            Some(dir) => dir.clone(),
            None => nix::physical_store_dir().await?,
        };
        let watcher = StoreWatcher::start(&dir)?;
        tracing::info!(dir = %dir.display(), caches = ?config.watch_store, "watching the store");
        Some(watcher)
    };
    let socket_path = spool.socket_path();
    let listener = bind_control_socket(&socket_path)?;
    tracing::info!(spool = %spool.dir().display(), "agent ready");

    let shared = Arc::new(Shared::default());
    let mut tasks = JoinSet::new();
    tasks.spawn(serve_control(listener, shared.clone(), shutdown.clone()));
    if let Some(watcher) = watcher {
        let spool = spool.clone();
        let shared = shared.clone();
        let found = move |paths: Vec<String>| {
            let entries: Vec<QueuedPath> = watch_targets
                .iter()
                .flat_map(|(server, cache)| {
                    paths
                        .iter()
                        .map(move |path| QueuedPath::new(server, cache, path))
                })
                .collect();
            match spool.enqueue(&entries) {
                Ok(_) => {
                    tracing::info!(?paths, "queued new store paths");
                    shared.wake.notify_one();
                }
                Err(error) => tracing::error!(%error, ?paths, "queuing new store paths"),
            }
        };
        tasks.spawn(watcher.run(found, shutdown.clone()));
    }
    let uploader = Uploader {
        spool,
        config_path: config.config_path,
        jobs: config.jobs,
        retry: config.retry,
        shared,
    };
    uploader.run(shutdown).await;
    tasks.shutdown().await;
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("agent stopped");
    Ok(())
}

/// Listens on the spool's socket, replacing a stale socket file but never
/// a live agent's.
fn bind_control_socket(path: &Path) -> Result<UnixListener, AgentError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::AlreadyRunning(
            path.parent().unwrap_or(path).to_owned(),
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(AgentError::Socket {
                path: path.to_owned(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| AgentError::Socket {
        path: path.to_owned(),
        source,
    })
}

async fn serve_control(listener: UnixListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer_control(stream, shared.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a control connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn answer_control(stream: UnixStream, shared: Arc<Shared>) {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        CONTROL_READ_TIMEOUT,
        BufReader::new(reader).read_line(&mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(_))) {
        return;
    }
    let answer = match line.trim() {
        control::WAKE => {
            shared.wake.notify_one();
            control::OK.to_owned()
        }
        control::STATUS => {
            let in_flight = shared
                .in_flight()
                .iter()
                .map(|(key, &started_at)| InFlight {
                    key: key.clone(),
                    started_at,
                })
                .collect();
            let status = AgentStatus {
                pid: std::process::id(),
                in_flight,
            };
            serde_json::to_string(&status).unwrap_or_default()
        }
        other => format!("unknown request {other:?}"),
    };
    // The client may have gone; it asked for nothing more.
    let _ = writer.write_all(format!("{answer}\n").as_bytes()).await;
}

/// One cache's share of the queue, pushed together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Group {
    server: String,
    cache: CacheName,
}

/// A push that could not be done.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0:#}")]
    Client(anyhow::Error),
    #[error(transparent)]
    Push(#[from] PushError),
}

impl BatchError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Push(error) => error.is_transient(),
            Self::Config(_) | Self::Client(_) => false,
        }
    }
}

struct Uploader {
    spool: Spool,
    config_path: PathBuf,
    jobs: usize,
    retry: RetryPolicy,
    shared: Arc<Shared>,
}

/// What a finished push task hands back.
type Finished = (Group, Vec<QueuedPath>, Result<PushSummary, BatchError>);

/// What the uploader remembers between rounds, beyond the spool.
#[derive(Debug, Default)]
struct Memory {
    /// Entries whose group failed for a reason that is not transient:
    /// pushed one at a time to find the culprit.
    alone: HashSet<String>,
    /// Unreadable files that could not be moved to `failed/` (reported
    /// once, then skipped while they stay).
    unmovable: HashSet<String>,
    /// Entries whose new state could not be written to the spool, and
    /// when they may be tried again (`u64::MAX`: not until a restart).
    held: HashMap<String, u64>,
}

impl Uploader {
    async fn run(self, shutdown: CancellationToken) {
        let mut running: JoinSet<Finished> = JoinSet::new();
        let mut tasks: HashMap<tokio::task::Id, (Group, Vec<String>)> = HashMap::new();
        let mut memory = Memory::default();
        loop {
            let next_due = self.start_due(&mut running, &mut tasks, &mut memory);
            let wait = next_due.map_or(RESCAN_INTERVAL, |due| {
                Duration::from_millis(due.saturating_sub(now_millis())).min(RESCAN_INTERVAL)
            });
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = running.join_next_with_id() => {
                    let id = match &joined {
                        Ok((id, _)) => *id,
                        Err(error) => error.id(),
                    };
                    let Some((_, keys)) = tasks.remove(&id) else { continue };
                    // Settled before they stop being in flight, so that a
                    // status query never sees an uploaded path as pending.
                    match joined {
                        Ok((_, finished)) => self.settle(finished, &mut memory),
                        // The entries are still pending: the next round
                        // offers them again.
                        Err(error) => tracing::error!(%error, "an upload task failed"),
                    }
                    let mut in_flight = self.shared.in_flight();
                    for key in &keys {
                        in_flight.remove(key);
                    }
                }
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        // Abandoned uploads stay pending for the next start.
        running.shutdown().await;
    }

    /// Starts a push for every cache with due entries and none running;
    /// returns when the next entry not yet due will be.
    fn start_due(
        &self,
        running: &mut JoinSet<Finished>,
        tasks: &mut HashMap<tokio::task::Id, (Group, Vec<String>)>,
        memory: &mut Memory,
    ) -> Option<u64> {
        let listing = match self.spool.pending() {
            Ok(listing) => listing,
            Err(error) => {
                tracing::error!(%error, "reading the queue");
                return Some(now_millis() + RESCAN_INTERVAL.as_millis() as u64);
            }
        };
        self.set_aside(listing.unreadable, &mut memory.unmovable);
        let pending = listing.entries;
        memory
            .held
            .retain(|key, _| pending.iter().any(|entry| entry.key() == *key));
        let now = now_millis();
        let busy: HashSet<&Group> = tasks.values().map(|(group, _)| group).collect();
        let mut next_due: Option<u64> = None;
        let mut batches: HashMap<Group, Vec<QueuedPath>> = HashMap::new();
        {
            let in_flight = self.shared.in_flight();
            for entry in pending {
                if in_flight.contains_key(&entry.key()) {
                    continue;
                }
                let held_until = memory.held.get(&entry.key()).copied().unwrap_or(0);
                let due_at = entry.next_attempt_at.max(held_until);
                if due_at > now {
                    if due_at != u64::MAX {
                        next_due = Some(next_due.map_or(due_at, |due| due.min(due_at)));
                    }
                    continue;
                }
                let group = Group {
                    server: entry.server.clone(),
                    cache: entry.cache.clone(),
                };
                if busy.contains(&group) {
                    continue;
                }
                batches.entry(group).or_default().push(entry);
            }
        }
        for (group, mut entries) in batches {
            // An entry to be pushed alone goes alone.
            match entries
                .iter()
                .position(|entry| memory.alone.contains(&entry.key()))
            {
                Some(position) => entries = vec![entries.swap_remove(position)],
                None => entries.truncate(BATCH),
            }
            let keys: Vec<String> = entries.iter().map(QueuedPath::key).collect();
            {
                let mut in_flight = self.shared.in_flight();
                for key in &keys {
                    in_flight.insert(key.clone(), now);
                }
            }
            let config_path = self.config_path.clone();
            let jobs = self.jobs;
            let task_group = group.clone();
            let span = tracing::info_span!(
                "push",
                cache = %format!("{}:{}", group.server, group.cache),
                paths = entries.len()
            );
            let handle = running.spawn(
                async move {
                    let paths: Vec<String> =
                        entries.iter().map(|entry| entry.path.clone()).collect();
                    let result = push_group(&config_path, &task_group, &paths, jobs).await;
                    (task_group, entries, result)
                }
                .instrument(span),
            );
            tasks.insert(handle.id(), (group, keys));
        }
        next_due
    }

    /// Moves files of `pending/` that are not usable entries to `failed/`,
    /// each logged once: when it is set aside, or, if it cannot be moved,
    /// the first time that fails (then it is skipped while it stays).
    fn set_aside(&self, unreadable: Vec<UnreadableEntry>, unmovable: &mut HashSet<String>) {
        unmovable.retain(|name| unreadable.iter().any(|entry| entry.file_name == *name));
        for entry in unreadable {
            let path = entry.path.display();
            match self.spool.set_aside(&entry) {
                Ok(()) => {
                    unmovable.remove(&entry.file_name);
                    tracing::warn!(%path, reason = entry.reason, "moved an unusable queue entry to failed/");
                }
                Err(error) => {
                    if unmovable.insert(entry.file_name.clone()) {
                        tracing::error!(%path, reason = entry.reason, %error, "cannot move an unusable queue entry to failed/; skipping it");
                    }
                }
            }
        }
    }

    /// Records how a push went in the spool. An entry whose new state
    /// cannot be written is held in memory instead (and logged), so that
    /// it is not pushed again at once.
    fn settle(&self, (group, entries, result): Finished, memory: &mut Memory) {
        let cache = format!("{}:{}", group.server, group.cache);
        let error = match result {
            Ok(summary) => {
                for entry in &entries {
                    memory.alone.remove(&entry.key());
                    if let Err(error) = self.spool.remove(entry) {
                        tracing::error!(%error, path = entry.path, "removing an uploaded path from the queue; not offering it again until a restart");
                        memory.held.insert(entry.key(), u64::MAX);
                    }
                }
                tracing::info!(cache, paths = entries.len(), %summary, "uploaded queued paths");
                return;
            }
            Err(error) => error,
        };
        if !error.is_transient() && entries.len() > 1 {
            tracing::warn!(cache, %error, paths = entries.len(), "a push failed; trying its paths one at a time");
            memory.alone.extend(entries.iter().map(QueuedPath::key));
            self.shared.wake.notify_one();
            return;
        }
        let message = error.to_string();
        for mut entry in entries {
            entry.attempts += 1;
            entry.last_error = Some(message.clone());
            let give_up = !error.is_transient() || entry.attempts >= self.retry.max_attempts;
            let recorded = if give_up {
                memory.alone.remove(&entry.key());
                tracing::warn!(
                    cache,
                    path = entry.path,
                    attempts = entry.attempts,
                    error = message,
                    "giving up on a queued path"
                );
                self.spool.give_up(&entry)
            } else {
                let delay = self.retry.delay_after(entry.attempts);
                entry.next_attempt_at = now_millis() + delay.as_millis() as u64;
                tracing::warn!(cache, path = entry.path, attempts = entry.attempts, retry_in = ?delay, error = message, "upload failed; will retry");
                self.spool.update(&entry)
            };
            if let Err(error) = recorded {
                tracing::error!(%error, path = entry.path, "recording a failed upload in the queue; holding it in memory");
                let until = if give_up {
                    u64::MAX
                } else {
                    entry.next_attempt_at
                };
                memory.held.insert(entry.key(), until);
            }
        }
    }
}

/// Pushes `paths` (with their closures) to one cache, with the server's
/// current URL and token from the client config.
async fn push_group(
    config_path: &Path,
    group: &Group,
    paths: &[String],
    jobs: usize,
) -> Result<PushSummary, BatchError> {
    let server = ClientConfig::load(config_path)?.server(Some(&group.server))?;
    let client = ApiClient::new(server).map_err(BatchError::Client)?;
    let options = PushOptions {
        closure: true,
        ignore_upstream_filter: false,
        jobs,
        // Acknowledged uploads are the server's to finish (it resumes them
        // after a crash); waiting would only hold up the queue.
        wait: false,
        // Build logs are `larder push --logs`'s; the agent pushes paths.
        logs: false,
    };
    Ok(push(&client, &group.cache, paths, &options).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_maximum() {
        let policy = RetryPolicy {
            first_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(60),
            max_attempts: 10,
        };
        let delays: Vec<u64> = (1..=6).map(|n| policy.delay_after(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert_eq!(policy.delay_after(1000).as_secs(), 60);
    }
}
