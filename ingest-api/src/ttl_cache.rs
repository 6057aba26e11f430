//! A small in-memory cache whose entries expire after a fixed time, for
//! the hot read path (cache rows with their parsed signing keys, rendered
//! narinfos).
//!
//! Staleness is bounded by the time-to-live, the same bound revocations
//! have, so several API replicas never disagree for longer than that; the
//! replica that makes a change clears its own entries at once. Memory is
//! bounded by the capacity: when it is reached, expired entries go, and if
//! that is not enough, everything goes (a burst of misses, never growth).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TtlCache<K, V> {
    time_to_live: Duration,
    capacity: usize,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    pub fn new(time_to_live: Duration, capacity: usize) -> Self {
        Self {
            time_to_live,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.lock();
        match entries.get(key) {
            Some((stored_at, value)) if stored_at.elapsed() < self.time_to_live => {
                Some(value.clone())
            }
            _ => None,
        }
    }

    pub fn insert(&self, key: K, value: V) {
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.retain(|_, (stored_at, _)| stored_at.elapsed() < self.time_to_live);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (Instant, V)>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every operation is one HashMap call), so a poisoned lock is safe
        // to keep using.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_capacity_is_bounded() {
        let cache = TtlCache::new(Duration::from_millis(50), 2);
        cache.insert("a", 1);
        assert_eq!(cache.get(&"a"), Some(1));
        cache.insert("b", 2);
        cache.insert("c", 3);
        assert!(cache.lock().len() <= 2);
        assert_eq!(cache.get(&"c"), Some(3));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&"c"), None);
        cache.insert("d", 4);
        cache.clear();
        assert_eq!(cache.get(&"d"), None);
    }
}
