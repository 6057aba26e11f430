//! The read path's memory of what was fetched, written to the database in
//! batches: GC's retention counts from an object's last access, and one
//! `UPDATE` per narinfo or NAR request would put a write on every read.
//!
//! Accesses are kept deduplicated (a path fetched a thousand times between
//! two flushes is one row to touch) and bounded: past
//! [`MAX_PENDING_ACCESSES`] the flusher is woken early, and further
//! accesses until it has run are dropped. A dropped or unflushed access
//! (a crash) only makes an object look older by up to one flush interval,
//! which matters only to a retention shorter than that. Accesses are
//! stamped with the flush's time, at most one interval after the fact.

use std::collections::{BTreeMap, HashSet};
use std::mem;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use larder_db::{CacheId, Database, DbError, NarId, Timestamp};
use larder_nix::StorePathHash;

/// Distinct accesses held between two flushes, at most.
pub const MAX_PENDING_ACCESSES: usize = 100_000;

#[derive(Debug, Default)]
struct Pending {
    /// Narinfo (and `.ls`) fetches: a path of a cache.
    paths: HashSet<(CacheId, StorePathHash)>,
    /// NAR fetches: every object of the cache pointing at the NAR.
    nars: HashSet<(CacheId, NarId)>,
}

impl Pending {
    fn len(&self) -> usize {
        self.paths.len() + self.nars.len()
    }
}

#[derive(Debug, Default)]
pub struct AccessLog {
    pending: Mutex<Pending>,
    full: Notify,
}

impl AccessLog {
    pub fn record_path(&self, cache_id: CacheId, hash: StorePathHash) {
        self.record(|pending| pending.paths.insert((cache_id, hash)));
    }

    pub fn record_nar(&self, cache_id: CacheId, nar_id: NarId) {
        self.record(|pending| pending.nars.insert((cache_id, nar_id)));
    }

    fn record(&self, insert: impl FnOnce(&mut Pending) -> bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING_ACCESSES {
            self.full.notify_one();
            return;
        }
        insert(&mut pending);
    }

    /// Writes every access collected so far as having happened at `at`.
    /// On failure the accesses are dropped (see the module documentation).
    pub async fn flush(&self, database: &Database, at: Timestamp) -> Result<u64, DbError> {
        let pending = mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut paths: BTreeMap<CacheId, Vec<StorePathHash>> = BTreeMap::new();
        for (cache_id, hash) in pending.paths {
            paths.entry(cache_id).or_default().push(hash);
        }
        let mut nars: BTreeMap<CacheId, Vec<NarId>> = BTreeMap::new();
        for (cache_id, nar_id) in pending.nars {
            nars.entry(cache_id).or_default().push(nar_id);
        }
        let touched = database.touch_objects_by_path(&paths, at).await?;
        Ok(touched + database.touch_objects_by_nar(&nars, at).await?)
    }

    /// Flushes every `interval`, or sooner when the log fills up, until
    /// `stop`; then flushes once more.
    pub async fn run_flusher(
        &self,
        database: Database,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                _ = ticks.tick() => false,
                () = self.full.notified() => false,
            };
            if let Err(error) = self.flush(&database, Timestamp::now()).await {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::new(error)),
                    "could not record access times; they are lost"
                );
            }
            if stopping {
                return;
            }
        }
    }
}
