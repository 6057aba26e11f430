//! The agent's durable queue: one small JSON file per queued (path, cache)
//! in a spool directory, no database.
//!
//! ```text
//! SPOOL/pending/<hash>+<cache>+<server>.json   waiting, possibly after failed attempts
//! SPOOL/failed/<hash>+<cache>+<server>.json    given up on; listed until queued again
//! SPOOL/agent.sock                             the running agent's control socket
//! ```
//!
//! Every write goes to a temporary file in the same directory, is synced,
//! renamed over the entry and the directory synced: after a crash or a
//! power loss an entry is either there whole or not written yet, and a
//! caller told "queued" is never wrong. A path queued twice for one cache
//! names the same file, so it is uploaded once. Writers need no lock: the
//! CLI only creates entries, the agent only rewrites or removes them, and
//! a rename is atomic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::cache_name::CacheName;
use common::nix::StorePath;
use serde::{Deserialize, Serialize};

const PENDING: &str = "pending";
const FAILED: &str = "failed";
const ENTRY_SUFFIX: &str = ".json";
/// The control socket's file name in the spool directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// Temporary files older than this are left over from a crash.
const STALE_TEMPORARY_AGE: Duration = Duration::from_secs(600);

/// Why the spool could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not a store path (expected /nix/store/<hash>-<name> or a link to one)")]
    NotStorePath(String),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.to_owned();
    move |source| SpoolError::Io { what, path, source }
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// One queued path: what to upload where, and how its attempts went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueuedPath {
    /// The server's name in the client config.
    pub server: String,
    pub cache: CacheName,
    /// The full store path, e.g. `/nix/store/<hash>-hello-2.12`.
    pub path: String,
    /// When it was queued (Unix milliseconds).
    pub queued_at: u64,
    /// Failed attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Not to be tried before this time (Unix milliseconds).
    #[serde(default)]
    pub next_attempt_at: u64,
}

impl QueuedPath {
    /// A fresh entry for `path`, which must be a full store path (see
    /// [`store_path_of`]).
    pub fn new(server: &str, cache: &CacheName, path: &str) -> Self {
        Self {
            server: server.to_owned(),
            cache: cache.clone(),
            path: path.to_owned(),
            queued_at: now_millis(),
            attempts: 0,
            last_error: None,
            next_attempt_at: 0,
        }
    }

    /// The entry's file name without the suffix: unique per path, cache
    /// and server. `+` appears in neither a server nor a cache name, and
    /// the hash is all a store path needs to be told apart.
    pub fn key(&self) -> String {
        let base_name = self.path.rsplit('/').next().unwrap_or_default();
        let hash = base_name.split('-').next().unwrap_or_default();
        format!("{hash}+{}+{}", self.cache, self.server)
    }

    /// `server:cache`, as the user writes it.
    pub fn cache_ref(&self) -> String {
        format!("{}:{}", self.server, self.cache)
    }
}

/// The store path an argument names: a full store path (in any store
/// directory), a path inside one, or a link to either such as `./result`.
/// Only the text and at most one symlink are looked at, so this costs no
/// `nix` call.
pub fn store_path_of(argument: &str) -> Result<String, SpoolError> {
    let not_store_path = || SpoolError::NotStorePath(argument.to_owned());
    let parse = |text: &str| -> Option<String> {
        let path = Path::new(text);
        if !path.is_absolute() {
            return None;
        }
        // The store path is the first component that parses as
        // `<hash>-<name>`: `/nix/store/<hash>-x/bin/y` names `<hash>-x`.
        let mut prefix = PathBuf::from("/");
        for component in path.components().skip(1) {
            let name = component.as_os_str().to_str()?;
            prefix.push(name);
            if prefix.parent() != Some(Path::new("/")) && StorePath::from_base_name(name).is_ok() {
                return prefix.to_str().map(str::to_owned);
            }
        }
        None
    };
    if let Some(path) = parse(argument) {
        return Ok(path);
    }
    let target = std::fs::read_link(argument).map_err(|_| not_store_path())?;
    target.to_str().and_then(parse).ok_or_else(not_store_path)
}

/// A spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens the spool at `dir`, creating it (owner only) if needed.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        use std::os::unix::fs::DirBuilderExt;
        for sub in [PENDING, FAILED] {
            let path = dir.join(sub);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(io_error("creating", &path))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the running agent's control socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }

    fn entry_path(&self, state: &str, entry: &QueuedPath) -> PathBuf {
        self.dir
            .join(state)
            .join(format!("{}{ENTRY_SUFFIX}", entry.key()))
    }

    /// Queues `entries` durably. A path already pending keeps its entry
    /// (and its place in any backoff); one that had failed is queued
    /// afresh. Returns how many were new.
    pub fn enqueue(&self, entries: &[QueuedPath]) -> Result<usize, SpoolError> {
        let mut new = 0;
        let mut failed_removed = false;
        for entry in entries {
            let pending = self.entry_path(PENDING, entry);
            if pending.exists() {
                continue;
            }
            write_synced(&pending, entry)?;
            new += 1;
            let failed = self.entry_path(FAILED, entry);
            match std::fs::remove_file(&failed) {
                Ok(()) => failed_removed = true,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io_error("removing", &failed)(error)),
            }
        }
        if new > 0 {
            sync_directory(&self.dir.join(PENDING))?;
        }
        if failed_removed {
            sync_directory(&self.dir.join(FAILED))?;
        }
        Ok(new)
    }

    /// Every pending entry, oldest first. Files that are not entries
    /// (temporary files, a hand-edited file that no longer parses) are
    /// skipped with a warning.
    pub fn pending(&self) -> Result<Vec<QueuedPath>, SpoolError> {
        self.read_state(PENDING)
    }

    /// Every entry given up on, oldest first.
    pub fn failed(&self) -> Result<Vec<QueuedPath>, SpoolError> {
        self.read_state(FAILED)
    }

    fn read_state(&self, state: &str) -> Result<Vec<QueuedPath>, SpoolError> {
        let dir = self.dir.join(state);
        let mut entries = Vec::new();
        for item in std::fs::read_dir(&dir).map_err(io_error("listing", &dir))? {
            let item = item.map_err(io_error("listing", &dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(ENTRY_SUFFIX) {
                continue;
            }
            let path = item.path();
            let text = match std::fs::read(&path) {
                Ok(text) => text,
                // Removed since the listing: uploaded in the meantime.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io_error("reading", &path)(error)),
            };
            match serde_json::from_slice(&text) {
                Ok(entry) => entries.push(entry),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "skipping an unreadable queue entry")
                }
            }
        }
        entries.sort_by(|a: &QueuedPath, b| {
            (a.queued_at, &a.path, &a.cache).cmp(&(b.queued_at, &b.path, &b.cache))
        });
        Ok(entries)
    }

    /// Records a failed attempt on a pending entry (the caller has updated
    /// its attempts, error and next attempt time).
    pub fn update(&self, entry: &QueuedPath) -> Result<(), SpoolError> {
        let path = self.entry_path(PENDING, entry);
        write_synced(&path, entry)?;
        sync_directory(&self.dir.join(PENDING))
    }

    /// Moves an entry from pending to failed, with its last error.
    pub fn give_up(&self, entry: &QueuedPath) -> Result<(), SpoolError> {
        write_synced(&self.entry_path(FAILED, entry), entry)?;
        sync_directory(&self.dir.join(FAILED))?;
        self.remove(entry)
    }

    /// Removes a pending entry once its path is uploaded.
    pub fn remove(&self, entry: &QueuedPath) -> Result<(), SpoolError> {
        let path = self.entry_path(PENDING, entry);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_directory(&self.dir.join(PENDING)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("removing", &path)(error)),
        }
    }

    /// Deletes temporary files a crashed writer left behind.
    pub fn remove_stale_temporaries(&self) {
        for state in [PENDING, FAILED] {
            let Ok(items) = std::fs::read_dir(self.dir.join(state)) else {
                continue;
            };
            for item in items.flatten() {
                let is_temporary = item
                    .file_name()
                    .to_str()
                    .is_some_and(|name| name.starts_with('.') && name.ends_with(".tmp"));
                let is_stale = item
                    .metadata()
                    .and_then(|metadata| metadata.modified())
                    .ok()
                    .and_then(|modified| modified.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMPORARY_AGE);
                if is_temporary && is_stale {
                    let _ = std::fs::remove_file(item.path());
                }
            }
        }
    }
}

/// Writes `entry` to `path` through a synced temporary file and a rename.
fn write_synced(path: &Path, entry: &QueuedPath) -> Result<(), SpoolError> {
    use std::os::unix::fs::OpenOptionsExt;
    let directory = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    // The process id and a counter keep concurrent writers (several hook
    // calls, the agent) off each other's temporary files.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = directory.join(format!(".{file_name}.{}.{unique}.tmp", std::process::id()));
    let contents = serde_json::to_vec(entry).map_err(|error| SpoolError::Io {
        what: "encoding",
        path: path.to_owned(),
        source: error.into(),
    })?;
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(io_error("writing", path))
}

/// Makes a directory's entries (creations, renames, removals) durable.
fn sync_directory(dir: &Path) -> Result<(), SpoolError> {
    std::fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error("syncing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello";

    fn cache(name: &str) -> CacheName {
        name.parse().expect("a cache name")
    }

    #[test]
    fn a_path_queued_twice_is_one_entry_and_failure_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        let entry = QueuedPath::new("local", &cache("main"), PATH);
        assert_eq!(
            spool
                .enqueue(std::slice::from_ref(&entry))
                .expect("enqueue"),
            1
        );
        assert_eq!(
            spool
                .enqueue(std::slice::from_ref(&entry))
                .expect("enqueue"),
            0
        );
        let other_cache = QueuedPath::new("local", &cache("other"), PATH);
        assert_eq!(spool.enqueue(&[other_cache]).expect("enqueue"), 1);
        assert_eq!(spool.pending().expect("pending").len(), 2);

        let mut failing = spool.pending().expect("pending")[0].clone();
        failing.attempts = 3;
        failing.last_error = Some("unreachable".to_owned());
        spool.update(&failing).expect("update");
        assert!(spool.pending().expect("pending").contains(&failing));
        spool.give_up(&failing).expect("give up");
        assert_eq!(spool.pending().expect("pending").len(), 1);
        assert_eq!(spool.failed().expect("failed"), [failing.clone()]);

        // Queued again, a failed path is pending afresh and no longer failed.
        spool
            .enqueue(&[QueuedPath::new(&failing.server, &failing.cache, PATH)])
            .expect("enqueue");
        assert!(spool.failed().expect("failed").is_empty());
        let pending = spool.pending().expect("pending");
        assert_eq!(pending.len(), 2);
        assert!(pending.iter().all(|entry| entry.attempts == 0));

        for entry in &pending {
            spool.remove(entry).expect("remove");
        }
        assert!(spool.pending().expect("pending").is_empty());
        spool.remove(&pending[0]).expect("removing twice is fine");
    }

    #[test]
    fn store_path_arguments() {
        assert_eq!(store_path_of(PATH).expect("a store path"), PATH);
        assert_eq!(
            store_path_of(&format!("{PATH}/bin/hello")).expect("inside a store path"),
            PATH
        );
        let custom = "/opt/store/0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello";
        assert_eq!(store_path_of(custom).expect("another store dir"), custom);
        for bad in ["relative/path", "/nix/store", "/nix/store/not-a-hash", ""] {
            assert!(store_path_of(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("result");
        std::os::unix::fs::symlink(PATH, &link).expect("symlink");
        assert_eq!(
            store_path_of(link.to_str().expect("UTF-8")).expect("a link"),
            PATH
        );
    }
}
