//! The in-memory set of revoked token ids that verification consults.
//!
//! The database is the source of truth; a server task reloads the whole
//! list every few seconds and hands it to [`RevocationList::replace`].
//! Until that has happened once the list is *not loaded*, and every
//! verification fails with
//! [`AuthError::RevocationListNotLoaded`](super::AuthError): a server that
//! has not yet read the revocations cannot tell a revoked token from a good
//! one, so it must not accept either.

use std::collections::HashSet;
use std::fmt;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::error::AuthError;

/// Revoked `jti`s, shared between the verifier and the task that refreshes
/// them (wrap it in an `Arc`). Lookups take a read lock for one hash
/// lookup; a refresh builds the new set first and holds the write lock
/// only to swap it in.
#[derive(Default)]
pub struct RevocationList {
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    loaded: bool,
    revoked: HashSet<String>,
}

impl RevocationList {
    /// A list that has not been loaded yet, so that it accepts nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A loaded list holding `revoked`.
    pub fn with_revoked(revoked: impl IntoIterator<Item = String>) -> Self {
        let list = Self::new();
        list.replace(revoked);
        list
    }

    /// Replaces the whole list with `revoked` (the database's current
    /// revoked ids) and marks it loaded.
    pub fn replace(&self, revoked: impl IntoIterator<Item = String>) {
        let revoked: HashSet<String> = revoked.into_iter().collect();
        let mut state = self.write();
        state.revoked = revoked;
        state.loaded = true;
    }

    /// Adds one id at once, so that the server that handled a revocation
    /// refuses the token before its next refresh. The next
    /// [`replace`](Self::replace) must include it (the database has it).
    pub fn revoke(&self, jti: impl Into<String>) {
        self.write().revoked.insert(jti.into());
    }

    pub fn is_loaded(&self) -> bool {
        self.read().loaded
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        self.read().revoked.contains(jti)
    }

    pub fn len(&self) -> usize {
        self.read().revoked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a token with this id may be accepted.
    pub(crate) fn check(&self, jti: &str) -> Result<(), AuthError> {
        let state = self.read();
        if !state.loaded {
            return Err(AuthError::RevocationListNotLoaded);
        }
        if state.revoked.contains(jti) {
            return Err(AuthError::Revoked {
                jti: jti.to_owned(),
            });
        }
        Ok(())
    }

    // A panic while the lock is held cannot leave the state half-updated
    // (only whole-value swaps and single inserts happen under it), so a
    // poisoned lock is safe to keep using.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("RevocationList")
            .field("loaded", &state.loaded)
            .field("len", &state.revoked.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn an_unloaded_list_accepts_nothing() {
        let list = RevocationList::new();
        assert!(!list.is_loaded());
        assert_eq!(list.check("a"), Err(AuthError::RevocationListNotLoaded));
    }

    #[test]
    fn replace_swaps_the_whole_list() {
        let list = RevocationList::with_revoked(["a".to_owned(), "b".to_owned()]);
        assert!(list.is_loaded());
        assert!(list.is_revoked("a") && list.is_revoked("b"));
        assert_eq!(
            list.check("a"),
            Err(AuthError::Revoked {
                jti: "a".to_owned()
            })
        );
        assert_eq!(list.check("c"), Ok(()));

        list.replace(["c".to_owned()]);
        assert!(!list.is_revoked("a"));
        assert!(list.is_revoked("c"));
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn revoke_takes_effect_at_once() {
        let list = RevocationList::with_revoked([]);
        assert!(list.is_empty());
        list.revoke("x");
        assert!(list.check("x").is_err());
    }

    #[test]
    fn shared_between_threads() {
        let list = Arc::new(RevocationList::with_revoked([]));
        let refresher = {
            let list = Arc::clone(&list);
            std::thread::spawn(move || {
                for i in 0..100 {
                    list.replace([format!("jti-{i}")]);
                }
            })
        };
        for _ in 0..100 {
            let _ = list.is_revoked("jti-5");
        }
        refresher.join().expect("refresher thread does not panic");
        assert!(list.is_revoked("jti-99"));
        assert!(!list.is_revoked("jti-5"));
    }
}
