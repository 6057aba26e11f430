//! Watching the store directory for new valid paths (inotify through
//! `notify`).
//!
//! An entry appearing in the store directory is only a candidate: Nix
//! creates a path's files (or renames a build's output into place) before
//! it registers the path as valid, and it creates `<path>.lock` files,
//! `.drv` files, `.chroot` build roots and `.links`. So a candidate is
//! checked with `nix path-info` a moment after it appears, when its lock
//! file goes away, and then again with growing delays until it is valid
//! (a long build's output), removed, or a day has passed. Only paths that
//! appear while the watcher runs are seen; it does not scan the store.
//! Derivations (`.drv`) are not pushed, as `nix copy` does not push them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use larder_nix::{StoreDir, StorePath};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::nix;

/// How long after its first event a candidate is checked, so that a burst
/// of events for one path costs one check.
const SETTLE: Duration = Duration::from_millis(100);
/// The first delay before checking a still invalid candidate again.
const FIRST_RECHECK: Duration = Duration::from_secs(1);
/// The longest delay between two checks of one candidate.
const MAX_RECHECK: Duration = Duration::from_secs(60);
/// How long a candidate is watched before it is forgotten.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Paths per `nix path-info` call.
const CHECK_BATCH: usize = 500;

/// Why the store cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {dir}: {source}")]
pub struct WatchError {
    dir: PathBuf,
    source: notify::Error,
}

/// What an entry's name in the store directory says.
#[derive(Debug, PartialEq, Eq)]
enum Seen<'a> {
    /// A store path's base name.
    Path(&'a str),
    /// The lock file of this store path.
    LockOf(&'a str),
    Ignored,
}

fn classify(name: &str) -> Seen<'_> {
    if name.starts_with('.') {
        return Seen::Ignored;
    }
    let (base, is_lock) = match name.strip_suffix(".lock") {
        Some(base) => (base, true),
        None => (name, false),
    };
    if [".drv", ".chroot", ".check"]
        .iter()
        .any(|suffix| base.ends_with(suffix))
        || StorePath::from_base_name(base).is_err()
    {
        return Seen::Ignored;
    }
    if is_lock {
        Seen::LockOf(base)
    } else {
        Seen::Path(base)
    }
}

#[derive(Debug)]
struct Candidate {
    first_seen: Instant,
    next_check: Instant,
    delay: Duration,
}

/// A registered watch on a store directory; [`run`](Self::run) reports
/// new valid paths.
pub struct StoreWatcher {
    dir: PathBuf,
    // Kept alive: dropping it ends the watch.
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
}

impl StoreWatcher {
    /// Starts watching `dir`, the store directory as it is on disk. Events
    /// from now on are kept until [`run`](Self::run) reads them.
    pub fn start(dir: &Path) -> Result<Self, WatchError> {
        let (sender, events) = mpsc::unbounded_channel();
        let watch_error = |source| WatchError {
            dir: dir.to_owned(),
            source,
        };
        let mut watcher = notify::recommended_watcher(move |event| {
            // Fails only once `run` has returned; nothing is left to tell.
            let _ = sender.send(event);
        })
        .map_err(watch_error)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(Self {
            dir: dir.to_owned(),
            _watcher: watcher,
            events,
        })
    }

    /// Calls `found` with every batch of paths (full paths under the
    /// default store directory) that became valid, until `shutdown`.
    pub async fn run(mut self, mut found: impl FnMut(Vec<String>), shutdown: CancellationToken) {
        let store_dir = StoreDir::default();
        let mut candidates: HashMap<String, Candidate> = HashMap::new();
        loop {
            let next_check = candidates.values().map(|c| c.next_check).min();
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = self.events.recv() => match event {
                    Some(Ok(event)) => self.note(&event, &mut candidates),
                    Some(Err(error)) => tracing::warn!(dir = %self.dir.display(), %error, "store watch error"),
                    None => return,
                },
                () = sleep_until(next_check) => {
                    let valid = check_due(&store_dir, &mut candidates).await;
                    if !valid.is_empty() {
                        found(valid);
                    }
                }
            }
        }
    }

    fn note(&self, event: &notify::Event, candidates: &mut HashMap<String, Candidate>) {
        if event.need_rescan() {
            tracing::warn!(
                dir = %self.dir.display(),
                "the kernel dropped store events; paths added meanwhile are not pushed (queue them with `larder queue`)"
            );
        }
        let now = Instant::now();
        for path in &event.paths {
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
                continue;
            };
            match (classify(name), &event.kind) {
                (Seen::Path(base), EventKind::Remove(_)) => {
                    candidates.remove(base);
                }
                (Seen::Path(base), _) => {
                    candidates.entry(base.to_owned()).or_insert(Candidate {
                        first_seen: now,
                        next_check: now + SETTLE,
                        delay: FIRST_RECHECK,
                    });
                }
                // A lock taken or released: the path may have just become
                // valid, so look now rather than after its backoff.
                (Seen::LockOf(base), _) => {
                    let candidate = candidates.entry(base.to_owned()).or_insert(Candidate {
                        first_seen: now,
                        next_check: now,
                        delay: FIRST_RECHECK,
                    });
                    candidate.next_check = candidate.next_check.min(now + SETTLE);
                }
                (Seen::Ignored, _) => {}
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Checks the candidates that are due; returns the valid ones (full
/// paths) and reschedules the rest.
async fn check_due(
    store_dir: &StoreDir,
    candidates: &mut HashMap<String, Candidate>,
) -> Vec<String> {
    let now = Instant::now();
    let due: Vec<String> = candidates
        .iter()
        .filter(|(_, candidate)| candidate.next_check <= now)
        .map(|(base, _)| base.clone())
        .take(CHECK_BATCH)
        .collect();
    let full_path = |base: &str| format!("{}/{base}", store_dir.as_str());
    let full_paths: Vec<String> = due.iter().map(|base| full_path(base)).collect();
    let valid = match nix::valid_paths(&full_paths).await {
        Ok(valid) => valid,
        Err(error) => {
            tracing::warn!(%error, "checking new store paths; trying again later");
            Default::default()
        }
    };
    let mut found = Vec::new();
    for base in due {
        let path = full_path(&base);
        if valid.contains(&path) {
            candidates.remove(&base);
            found.push(path);
            continue;
        }
        let Some(candidate) = candidates.get_mut(&base) else {
            continue;
        };
        if candidate.first_seen.elapsed() > GIVE_UP_AFTER {
            tracing::info!(path, "forgetting a store entry that never became valid");
            candidates.remove(&base);
            continue;
        }
        candidate.next_check = Instant::now() + candidate.delay;
        candidate.delay = (candidate.delay * 2).min(MAX_RECHECK);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello";

    #[test]
    fn store_entries_are_classified() {
        assert_eq!(classify(BASE), Seen::Path(BASE));
        assert_eq!(classify(&format!("{BASE}.lock")), Seen::LockOf(BASE));
        for ignored in [
            ".links",
            "0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello.drv",
            "0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello.drv.chroot",
            "0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello.drv.lock",
            "0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello.check",
            "tmp-1234-0",
            "not-a-store-path",
        ] {
            assert_eq!(classify(ignored), Seen::Ignored, "{ignored}");
        }
    }
}
