//! The agent's durable queue: one small JSON file per queued (path, cache)
//! in a spool directory, no database.
//!
//! ```text
//! SPOOL/pending/<hash>+<cache>+<server>.json   waiting, possibly after failed attempts
//! SPOOL/failed/<hash>+<cache>+<server>.json    given up on; listed until queued again
//! SPOOL/failed/<name>.json.reason              why an unreadable entry was set aside
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
//!
//! A file in `pending/` that is not a usable entry (not JSON, truncated,
//! unreadable, a directory, named for another entry) is listed apart, as
//! [`UnreadableEntry`], and never stops the rest of the queue: the agent
//! moves it to `failed/` with the reason beside it ([`Spool::set_aside`]).
//!
//! **Ownership.** Nix runs its post-build-hook as root, while the agent
//! runs as an ordinary user. So that what root queues is the agent's to
//! read and remove, every directory and file the queue creates is given to
//! the owner of the directory it is created in (only root can give files
//! away; for anyone else they are theirs already): with the spool
//! directory owned by the agent's user, everything in it stays the
//! agent's, whoever queued it. Because root then writes into a directory
//! another user controls, the spool's directories are opened without
//! following symlinks and every file is created, read, renamed and removed
//! relative to them (`openat` and friends, with `O_NOFOLLOW`), so that
//! replacing `pending/` or an entry with a symlink cannot make root write
//! or read anywhere else.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use larder_api::cache_name::CacheName;
use larder_nix::StorePath;
use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use serde::{Deserialize, Serialize};

const PENDING: &str = "pending";
const FAILED: &str = "failed";
const ENTRY_SUFFIX: &str = ".json";
/// Appended to an entry's file name for the file saying why it was set
/// aside.
const REASON_SUFFIX: &str = ".reason";
/// Larger than any entry: a file beyond this is not one, and reading it
/// whole would cost memory for nothing.
const MAX_ENTRY_SIZE: u64 = 64 * 1024;
/// How much of a reason file is read.
const MAX_REASON_SIZE: u64 = 4096;
/// The control socket's file name in the spool directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// Temporary files older than this are left over from a crash.
const STALE_TEMPORARY_AGE: Duration = Duration::from_secs(600);

/// Why the spool could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The cause is part of the message (not a `source`), so that a
    /// message printed with its chain names it once.
    #[error("{what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0:?} is not a store path (expected /nix/store/<hash>-<name> or a link to one)")]
    NotStorePath(String),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.to_owned();
    move |cause| SpoolError::Io { what, path, cause }
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

    /// The entry's file name in `pending/` or `failed/`.
    fn file_name(&self) -> String {
        format!("{}{ENTRY_SUFFIX}", self.key())
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

/// A file in the queue that is not a usable entry, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableEntry {
    /// Its file name in `pending/` or `failed/`.
    pub file_name: String,
    /// Its path, for messages.
    pub path: PathBuf,
    pub reason: String,
}

/// What a directory of the queue holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The entries, oldest first.
    pub entries: Vec<QueuedPath>,
    /// Files that are not usable entries: in `pending/`, the ones still to
    /// be set aside; in `failed/`, the ones set aside (with the reason
    /// recorded then).
    pub unreadable: Vec<UnreadableEntry>,
}

/// A spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens the spool at `dir`, creating it and its subdirectories (owner
    /// only, given to the owner of the directory they are created in) if
    /// needed.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        let spool = Self {
            dir: dir.to_owned(),
        };
        let top = open_or_create_path(dir).map_err(io_error("creating", dir))?;
        for state in [PENDING, FAILED] {
            top.subdirectory(state)?;
        }
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the running agent's control socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }

    /// The directory of a state (`pending` or `failed`), opened afresh, so
    /// that a directory replaced since [`Spool::open`] is noticed.
    fn state_dir(&self, state: &str) -> Result<SpoolDir, SpoolError> {
        SpoolDir::open(&self.dir)
            .map_err(io_error("opening", &self.dir))?
            .subdirectory(state)
    }

    /// Queues `entries` durably. A path already pending keeps its entry
    /// (and its place in any backoff); one that had failed is queued
    /// afresh. Returns how many were new.
    pub fn enqueue(&self, entries: &[QueuedPath]) -> Result<usize, SpoolError> {
        let pending = self.state_dir(PENDING)?;
        let failed = self.state_dir(FAILED)?;
        let mut new = 0;
        let mut failed_removed = false;
        for entry in entries {
            let name = entry.file_name();
            if pending.exists(&name)? {
                continue;
            }
            pending.write_synced(&name, &encode(entry, &pending.path(&name))?)?;
            new += 1;
            for stale in [name.clone(), format!("{name}{REASON_SUFFIX}")] {
                failed_removed |= failed.remove(&stale)?;
            }
        }
        if new > 0 {
            pending.sync()?;
        }
        if failed_removed {
            failed.sync()?;
        }
        Ok(new)
    }

    /// Every pending entry, oldest first, and the files in `pending/` that
    /// are not usable entries. Other files (temporary ones, anything not
    /// named `*.json`) are not listed.
    pub fn pending(&self) -> Result<Listing, SpoolError> {
        self.state_dir(PENDING)?.listing(false)
    }

    /// Every entry given up on, oldest first, and the unreadable files set
    /// aside with their reasons.
    pub fn failed(&self) -> Result<Listing, SpoolError> {
        self.state_dir(FAILED)?.listing(true)
    }

    /// Records a failed attempt on a pending entry (the caller has updated
    /// its attempts, error and next attempt time).
    pub fn update(&self, entry: &QueuedPath) -> Result<(), SpoolError> {
        let pending = self.state_dir(PENDING)?;
        let name = entry.file_name();
        pending.write_synced(&name, &encode(entry, &pending.path(&name))?)?;
        pending.sync()
    }

    /// Moves an entry from pending to failed, with its last error.
    pub fn give_up(&self, entry: &QueuedPath) -> Result<(), SpoolError> {
        let failed = self.state_dir(FAILED)?;
        let name = entry.file_name();
        failed.write_synced(&name, &encode(entry, &failed.path(&name))?)?;
        failed.remove(&format!("{name}{REASON_SUFFIX}"))?;
        failed.sync()?;
        self.remove(entry)
    }

    /// Removes a pending entry once its path is uploaded.
    pub fn remove(&self, entry: &QueuedPath) -> Result<(), SpoolError> {
        let pending = self.state_dir(PENDING)?;
        if pending.remove(&entry.file_name())? {
            pending.sync()?;
        }
        Ok(())
    }

    /// Moves a file of `pending/` that is not a usable entry to `failed/`
    /// as it is (whatever it holds, it is kept for a look), with its
    /// reason in a file beside it.
    pub fn set_aside(&self, unreadable: &UnreadableEntry) -> Result<(), SpoolError> {
        let pending = self.state_dir(PENDING)?;
        let failed = self.state_dir(FAILED)?;
        let name = &unreadable.file_name;
        let reason_name = format!("{name}{REASON_SUFFIX}");
        // The reason first: once the file is in failed/, it is listed
        // with whatever reason is beside it.
        failed.write_synced(&reason_name, unreadable.reason.as_bytes())?;
        if let Err(error) =
            rustix::fs::renameat(&pending.fd, name.as_str(), &failed.fd, name.as_str())
        {
            // Nothing half done is left behind.
            let _ = failed.remove(&reason_name);
            return Err(io_error("moving to failed/", &pending.path(name))(
                error.into(),
            ));
        }
        failed.sync()?;
        pending.sync()
    }

    /// Deletes temporary files a crashed writer left behind.
    pub fn remove_stale_temporaries(&self) {
        for state in [PENDING, FAILED] {
            let Ok(dir) = self.state_dir(state) else {
                continue;
            };
            let Ok(names) = dir.names() else { continue };
            for name in names {
                if !(name.starts_with('.') && name.ends_with(".tmp")) {
                    continue;
                }
                let is_stale =
                    rustix::fs::statat(&dir.fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .ok()
                        .and_then(|stat| {
                            let modified = UNIX_EPOCH.checked_add(Duration::from_secs(
                                u64::try_from(stat.st_mtime).ok()?,
                            ))?;
                            modified.elapsed().ok()
                        })
                        .is_some_and(|age| age > STALE_TEMPORARY_AGE);
                if is_stale {
                    let _ = dir.remove(&name);
                }
            }
        }
    }
}

fn encode(entry: &QueuedPath, path: &Path) -> Result<Vec<u8>, SpoolError> {
    serde_json::to_vec(entry).map_err(|error| SpoolError::Io {
        what: "encoding",
        path: path.to_owned(),
        cause: error.into(),
    })
}

/// One directory of the spool, held open: every file operation is
/// relative to it and follows no symlink (see the module's doc).
struct SpoolDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Directory flags: no symlink is followed at the last component.
fn directory_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Opens `path` as a directory, creating what is missing of it. Existing
/// ancestors are followed as the system resolves them (a home directory
/// may be a symlink); the directory itself must not be a symlink. Each
/// directory created is given to the owner of its parent.
fn open_or_create_path(path: &Path) -> std::io::Result<SpoolDir> {
    if let Ok(dir) = SpoolDir::open(path) {
        return Ok(dir);
    }
    let mut current = PathBuf::from(if path.is_absolute() { "/" } else { "." });
    let mut parent = SpoolDir {
        fd: rustix::fs::openat(
            CWD,
            current.as_path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?,
        path: current.clone(),
    };
    let components: Vec<Component> = path.components().collect();
    for (index, component) in components.iter().enumerate() {
        let name = match component {
            Component::Normal(name) => *name,
            Component::RootDir | Component::CurDir => continue,
            // `..` after a symlink means what the system says it means.
            Component::ParentDir | Component::Prefix(_) => std::ffi::OsStr::new(".."),
        };
        current.push(name);
        let is_last = index + 1 == components.len();
        // The caller names the whole path; an ancestor that fails is named
        // here.
        parent = parent.child(name, is_last).map_err(|error| {
            if is_last {
                error
            } else {
                std::io::Error::new(error.kind(), format!("{}: {error}", current.display()))
            }
        })?;
    }
    Ok(parent)
}

/// A hidden name to create `name` under before renaming it into place: the
/// process id and a counter keep concurrent writers (several hook calls,
/// the agent) off each other's temporary files.
fn temporary_name(name: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{name}.{}.{unique}.tmp", std::process::id())
}

impl SpoolDir {
    /// Opens an existing directory; it must not be a symlink.
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            fd: rustix::fs::openat(CWD, path, directory_flags(), Mode::empty())?,
            path: path.to_owned(),
        })
    }

    /// Opens (creating it if missing) the subdirectory `name`, following
    /// a symlink only where `no_symlink` is false.
    fn child(&self, name: &std::ffi::OsStr, no_symlink: bool) -> std::io::Result<Self> {
        let mut flags = directory_flags();
        if !no_symlink {
            flags.remove(OFlags::NOFOLLOW);
        }
        let path = self.path.join(name);
        match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => return Ok(Self { fd, path }),
            Err(rustix::io::Errno::NOENT) => {}
            Err(error @ (rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)) if no_symlink => {
                let is_symlink = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|stat| {
                        rustix::fs::FileType::from_raw_mode(stat.st_mode)
                            == rustix::fs::FileType::Symlink
                    });
                return Err(if is_symlink {
                    std::io::Error::other(
                        "it is a symlink, which the queue does not follow: name the real directory",
                    )
                } else {
                    error.into()
                });
            }
            Err(error) => return Err(error.into()),
        }
        self.create_owned_directory(name)?;
        let fd = rustix::fs::openat(&self.fd, name, directory_flags(), Mode::empty())?;
        Ok(Self { fd, path })
    }

    /// Creates the directory `name`, already given to this directory's
    /// owner when it appears: made under a temporary name, given away, then
    /// renamed into place. Made in place and given away after, it would be
    /// root's for a moment when root runs `larder queue` (the hook, or a
    /// status query), and an agent running as the owner opening it just
    /// then would be refused and stop. Another writer having made it first
    /// is fine.
    fn create_owned_directory(&self, name: &std::ffi::OsStr) -> std::io::Result<()> {
        let temporary = temporary_name(&name.to_string_lossy());
        rustix::fs::mkdirat(&self.fd, temporary.as_str(), Mode::from_raw_mode(0o700))?;
        let result = (|| -> std::io::Result<()> {
            let made = rustix::fs::openat(
                &self.fd,
                temporary.as_str(),
                directory_flags(),
                Mode::empty(),
            )?;
            self.give_to_owner(&made)?;
            match rustix::fs::renameat_with(
                &self.fd,
                temporary.as_str(),
                &self.fd,
                name,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => Ok(()),
                // Another writer made it first.
                Err(rustix::io::Errno::EXIST) => {
                    rustix::fs::unlinkat(&self.fd, temporary.as_str(), AtFlags::REMOVEDIR)?;
                    Ok(())
                }
                Err(error) => Err(error.into()),
            }
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, temporary.as_str(), AtFlags::REMOVEDIR);
        }
        result
    }

    /// `pending/` or `failed/` of the spool directory.
    fn subdirectory(&self, state: &str) -> Result<Self, SpoolError> {
        let path = self.path.join(state);
        self.child(std::ffi::OsStr::new(state), true)
            .map_err(io_error("opening", &path))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Gives a file or directory just created in this directory to this
    /// directory's owner. Only root can give files away; anyone else
    /// created it as the owner already, or is not the owner and keeps it.
    fn give_to_owner(&self, created: impl AsFd) -> std::io::Result<()> {
        let owner = rustix::fs::fstat(&self.fd)?;
        let stat = rustix::fs::fstat(&created)?;
        if (stat.st_uid, stat.st_gid) == (owner.st_uid, owner.st_gid) {
            return Ok(());
        }
        match rustix::fs::fchown(
            created,
            Some(rustix::fs::Uid::from_raw(owner.st_uid)),
            Some(rustix::fs::Gid::from_raw(owner.st_gid)),
        ) {
            Ok(()) | Err(rustix::io::Errno::PERM) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    fn exists(&self, name: &str) -> Result<bool, SpoolError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(error) => Err(io_error("looking at", &self.path(name))(error.into())),
        }
    }

    /// Writes `contents` to `name` through a synced temporary file and a
    /// rename; the file belongs to this directory's owner.
    fn write_synced(&self, name: &str, contents: &[u8]) -> Result<(), SpoolError> {
        let temporary = temporary_name(name);
        let result = (|| -> std::io::Result<()> {
            let fd = rustix::fs::openat(
                &self.fd,
                temporary.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let mut file = File::from(fd);
            self.give_to_owner(&file)?;
            file.write_all(contents)?;
            file.sync_all()?;
            rustix::fs::renameat(&self.fd, temporary.as_str(), &self.fd, name)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, temporary.as_str(), AtFlags::empty());
        }
        result.map_err(io_error("writing", &self.path(name)))
    }

    /// Removes `name` (an empty directory too); whether it was there.
    fn remove(&self, name: &str) -> Result<bool, SpoolError> {
        let result = match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Err(rustix::io::Errno::ISDIR) => {
                rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)
            }
            other => other,
        };
        match result {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(error) => Err(io_error("removing", &self.path(name))(error.into())),
        }
    }

    /// Makes this directory's entries (creations, renames, removals)
    /// durable.
    fn sync(&self) -> Result<(), SpoolError> {
        rustix::fs::fsync(&self.fd).map_err(|error| io_error("syncing", &self.path)(error.into()))
    }

    /// The names in this directory that are UTF-8.
    fn names(&self) -> Result<Vec<String>, SpoolError> {
        let listing_error =
            |error: rustix::io::Errno| io_error("listing", &self.path)(error.into());
        let mut names = Vec::new();
        for item in rustix::fs::Dir::read_from(&self.fd).map_err(listing_error)? {
            let item = item.map_err(listing_error)?;
            if let Ok(name) = item.file_name().to_str() {
                if name != "." && name != ".." {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    /// Reads a regular file of at most `limit` bytes; `Ok(None)` when it
    /// is gone.
    fn read(&self, name: &str, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
        // Non-blocking: a FIFO named like an entry must not hang the agent.
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let file = File::from(fd);
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(std::io::Error::other(if metadata.is_dir() {
                "it is a directory"
            } else {
                "it is not a regular file"
            }));
        }
        if metadata.size() > limit {
            return Err(std::io::Error::other(format!(
                "it has {} bytes, more than any queue entry",
                metadata.size()
            )));
        }
        let mut contents = Vec::new();
        file.take(limit).read_to_end(&mut contents)?;
        Ok(Some(contents))
    }

    /// Every `*.json` entry, parsed, and the files that are not usable
    /// entries. With `reasons`, a file with a reason file beside it is
    /// listed as unreadable with that reason (it was set aside), whatever
    /// it holds.
    fn listing(&self, reasons: bool) -> Result<Listing, SpoolError> {
        let names = self.names()?;
        let mut listing = Listing::default();
        for name in &names {
            if name.starts_with('.') || !name.ends_with(ENTRY_SUFFIX) {
                continue;
            }
            let recorded = if reasons && names.contains(&format!("{name}{REASON_SUFFIX}")) {
                self.read_reason(&format!("{name}{REASON_SUFFIX}"))
            } else {
                None
            };
            let reason = match recorded {
                Some(reason) => reason,
                None => match self.parse_entry(name) {
                    Ok(Some(entry)) => {
                        listing.entries.push(entry);
                        continue;
                    }
                    // Removed since the listing: uploaded in the meantime.
                    Ok(None) => continue,
                    Err(reason) => reason,
                },
            };
            listing.unreadable.push(UnreadableEntry {
                file_name: name.clone(),
                path: self.path(name),
                reason,
            });
        }
        listing.entries.sort_by(|a: &QueuedPath, b| {
            (a.queued_at, &a.path, &a.cache).cmp(&(b.queued_at, &b.path, &b.cache))
        });
        listing
            .unreadable
            .sort_by(|a, b| a.file_name.cmp(&b.file_name));
        Ok(listing)
    }

    /// The entry in file `name`, or why it is not one.
    fn parse_entry(&self, name: &str) -> Result<Option<QueuedPath>, String> {
        let Some(contents) = self
            .read(name, MAX_ENTRY_SIZE)
            .map_err(|error| format!("cannot read it: {error}"))?
        else {
            return Ok(None);
        };
        let entry: QueuedPath = serde_json::from_slice(&contents)
            .map_err(|error| format!("not a queue entry: {error}"))?;
        let expected = entry.file_name();
        if expected != name {
            return Err(format!(
                "its file name does not match what it holds (a queue entry for {} in {} is named {expected})",
                entry.path,
                entry.cache_ref()
            ));
        }
        Ok(Some(entry))
    }

    /// The first line of a reason file, without control characters (it is
    /// printed to a terminal).
    fn read_reason(&self, name: &str) -> Option<String> {
        let contents = self.read(name, MAX_REASON_SIZE).ok()??;
        let text = String::from_utf8_lossy(&contents);
        let line = text.lines().next().unwrap_or_default();
        Some(line.chars().filter(|c| !c.is_control()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello";

    fn cache(name: &str) -> CacheName {
        name.parse().expect("a cache name")
    }

    fn pending(spool: &Spool) -> Vec<QueuedPath> {
        spool.pending().expect("pending").entries
    }

    fn failed(spool: &Spool) -> Vec<QueuedPath> {
        spool.failed().expect("failed").entries
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
        assert_eq!(pending(&spool).len(), 2);

        let mut failing = pending(&spool)[0].clone();
        failing.attempts = 3;
        failing.last_error = Some("unreachable".to_owned());
        spool.update(&failing).expect("update");
        assert!(pending(&spool).contains(&failing));
        spool.give_up(&failing).expect("give up");
        assert_eq!(pending(&spool).len(), 1);
        assert_eq!(failed(&spool), [failing.clone()]);

        // Queued again, a failed path is pending afresh and no longer failed.
        spool
            .enqueue(&[QueuedPath::new(&failing.server, &failing.cache, PATH)])
            .expect("enqueue");
        assert!(failed(&spool).is_empty());
        let pending_now = pending(&spool);
        assert_eq!(pending_now.len(), 2);
        assert!(pending_now.iter().all(|entry| entry.attempts == 0));

        for entry in &pending_now {
            spool.remove(entry).expect("remove");
        }
        assert!(pending(&spool).is_empty());
        spool
            .remove(&pending_now[0])
            .expect("removing twice is fine");
    }

    #[test]
    fn unusable_files_are_listed_apart_and_set_aside_with_their_reason() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open");
        let good = QueuedPath::new("local", &cache("main"), PATH);
        spool.enqueue(std::slice::from_ref(&good)).expect("enqueue");
        let pending_dir = dir.path().join(PENDING);
        std::fs::write(pending_dir.join("garbage.json"), b"{\"server\": ").expect("write");
        std::fs::create_dir(pending_dir.join("a-directory.json")).expect("mkdir");
        // A copy under another entry's name would be pushed but never
        // removed (removal goes by the entry's own name).
        let other = QueuedPath::new("local", &cache("other"), PATH);
        std::fs::write(
            pending_dir.join(other.file_name()),
            serde_json::to_vec(&good).expect("json"),
        )
        .expect("write");
        // A symlink is not followed, even to a good entry.
        let outside = dir.path().join("outside.json");
        std::fs::write(&outside, serde_json::to_vec(&good).expect("json")).expect("write");
        symlink(&outside, pending_dir.join("link.json")).expect("symlink");
        // Not entries at all: left alone.
        std::fs::write(pending_dir.join("notes.txt"), b"x").expect("write");

        let listing = spool.pending().expect("pending");
        assert_eq!(listing.entries, std::slice::from_ref(&good));
        let reasons: Vec<(&str, &str)> = listing
            .unreadable
            .iter()
            .map(|entry| (entry.file_name.as_str(), entry.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        let reason_of = |name: &str| {
            reasons
                .iter()
                .find(|(file, _)| *file == name)
                .unwrap_or_else(|| panic!("{name} in {reasons:?}"))
                .1
                .to_owned()
        };
        assert!(
            reason_of("garbage.json").starts_with("not a queue entry: EOF"),
            "{reasons:?}"
        );
        assert_eq!(
            reason_of("a-directory.json"),
            "cannot read it: it is a directory"
        );
        assert!(
            reason_of(&other.file_name()).contains("does not match"),
            "{reasons:?}"
        );
        assert!(
            reason_of("link.json").starts_with("cannot read it:"),
            "{reasons:?}"
        );

        for unreadable in &listing.unreadable {
            spool.set_aside(unreadable).expect("set aside");
        }
        let listing = spool.pending().expect("pending");
        assert_eq!(listing.entries, std::slice::from_ref(&good));
        assert!(listing.unreadable.is_empty());
        // In failed/ they keep the reason they were set aside for, even the
        // one that parses.
        let failed_listing = spool.failed().expect("failed");
        assert!(failed_listing.entries.is_empty());
        let set_aside: Vec<(String, String)> = failed_listing
            .unreadable
            .iter()
            .map(|entry| (entry.file_name.clone(), entry.reason.clone()))
            .collect();
        assert_eq!(set_aside.len(), 4);
        assert!(set_aside.contains(&(other.file_name(), reason_of(&other.file_name()))));
        assert_eq!(
            std::fs::read(dir.path().join(FAILED).join("garbage.json")).expect("kept as it was"),
            b"{\"server\": "
        );

        // Queuing that entry afresh clears it from failed/.
        spool
            .enqueue(std::slice::from_ref(&other))
            .expect("enqueue");
        let failed_listing = spool.failed().expect("failed");
        assert_eq!(failed_listing.unreadable.len(), 3);
        assert_eq!(pending(&spool).len(), 2);
    }

    #[test]
    fn a_spool_that_is_a_symlink_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        Spool::open(&real).expect("open");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(Spool::open(&link).is_err());
        // A replaced subdirectory is noticed at the next write.
        let spool = Spool::open(&real).expect("open");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::remove_dir(real.join(PENDING)).expect("rmdir");
        std::os::unix::fs::symlink(&elsewhere, real.join(PENDING)).expect("symlink");
        let entry = QueuedPath::new("local", &cache("main"), PATH);
        assert!(spool.enqueue(&[entry]).is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).expect("list").count(), 0);
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
