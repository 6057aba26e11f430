//! Tokens that manage tokens: the `manage_tokens` permission, and the rule
//! that a token never mints one that can do more than itself.
//!
//! A token may mint another only within its own reach: for every pattern
//! the new token names, the minting token must grant each permission asked
//! for (and `manage_tokens`) on *every* cache name the pattern matches, and
//! the new token must expire no later than the minting one. Otherwise a
//! short-lived or narrow token (a CI job's) could mint a lasting or wider
//! one, and revoking it would not end what it started.
//!
//! "Every name" is decided on patterns, without enumerating names:
//! names the minting token lists exactly get exactly their own entry (as
//! in [`Claims::permissions_for`]), and each other name must get each
//! permission from one wildcard pattern that [covers] the asked pattern.
//! A grant that only a union of several patterns would cover is refused:
//! refusing is the safe side of an approximation.
//!
//! Listing and revoking need less: a token *manages* another when it holds
//! `manage_tokens` on every name the other's patterns match, whatever the
//! other grants there. Revoking takes power away, so it needs no more.
//!
//! [covers]: larder_api::cache_name::CacheNamePattern::covers

use super::claims::Claims;
use super::permissions::{Permission, Permissions};
use larder_api::cache_name::CacheNamePattern;
use larder_api::time::format_unix_seconds;

/// Why a token may not mint the token asked of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DelegationDenied {
    #[error("your token does not grant {permission} on every cache matching {pattern:?}, so it cannot mint a token that does")]
    WiderThanMinter {
        pattern: CacheNamePattern,
        permission: Permission,
    },
    #[error(
        "the token would expire at {}, after the token minting it ({}): ask for a shorter validity",
        format_unix_seconds(*requested),
        format_unix_seconds(*minter)
    )]
    OutlivesMinter { requested: u64, minter: u64 },
}

impl Claims {
    /// Whether this token grants all of `wanted` on every cache name that
    /// `pattern` matches (see the module documentation for how).
    pub fn grants_on_every(&self, pattern: &CacheNamePattern, wanted: Permissions) -> bool {
        let mut exact_entries = self
            .caches
            .iter()
            .filter(|(entry, _)| entry.is_exact() && pattern.covers(entry));
        if !exact_entries.all(|(_, granted)| granted.contains_all(wanted)) {
            return false;
        }
        if pattern.is_exact() && self.caches.contains_key(pattern) {
            // The one name is listed exactly, and its entry was checked.
            return true;
        }
        wanted.iter().all(|permission| {
            self.caches.iter().any(|(entry, granted)| {
                !entry.is_exact() && granted.contains(permission) && entry.covers(pattern)
            })
        })
    }

    /// Whether this token may list and revoke `token`: it holds
    /// `manage_tokens` on every name `token` says anything about (on every
    /// name at all, for a token that names none).
    pub fn manages(&self, token: &Claims) -> bool {
        let manage = Permissions::from(Permission::ManageTokens);
        if token.caches.is_empty() {
            return self.grants_on_every(&CacheNamePattern::everything(), manage);
        }
        token
            .caches
            .keys()
            .all(|pattern| self.grants_on_every(pattern, manage))
    }

    /// Whether this token may mint a token with `minted`'s claims.
    pub fn check_delegation(&self, minted: &Claims) -> Result<(), DelegationDenied> {
        for (pattern, &granted) in &minted.caches {
            let needed = granted.with(Permission::ManageTokens);
            if self.grants_on_every(pattern, needed) {
                continue;
            }
            // Name the first permission missing, `manage_tokens` first.
            let permission = std::iter::once(Permission::ManageTokens)
                .chain(granted.iter())
                .find(|&permission| !self.grants_on_every(pattern, permission.into()))
                .unwrap_or(Permission::ManageTokens);
            return Err(DelegationDenied::WiderThanMinter {
                pattern: pattern.clone(),
                permission,
            });
        }
        if minted.exp > self.exp {
            return Err(DelegationDenied::OutlivesMinter {
                requested: minted.exp,
                minter: self.exp,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Permission::*;

    use crate::claims::tests::claims;

    fn pattern(s: &str) -> CacheNamePattern {
        s.parse().expect("valid test pattern")
    }

    #[test]
    fn a_grant_on_every_name_comes_from_a_covering_pattern() {
        let minter = claims(&[("alice-*", &[Pull, Push]), ("*", &[Pull])]);
        assert!(minter.grants_on_every(&pattern("alice-ci"), [Pull, Push].into()));
        assert!(minter.grants_on_every(&pattern("alice-ci-*"), [Pull, Push].into()));
        assert!(minter.grants_on_every(&pattern("*"), Pull.into()));
        assert!(!minter.grants_on_every(&pattern("*"), Push.into()));
        assert!(!minter.grants_on_every(&pattern("al*"), Push.into()));
        assert!(!minter.grants_on_every(&pattern("bob"), Push.into()));
        assert!(minter.grants_on_every(&pattern("bob"), Permissions::NONE));
    }

    #[test]
    fn exact_entries_narrow_every_pattern_that_matches_them() {
        let minter = claims(&[("*", &[Pull, Push]), ("prod", &[Pull])]);
        assert!(!minter.grants_on_every(&pattern("*"), Push.into()));
        assert!(!minter.grants_on_every(&pattern("pro*"), Push.into()));
        assert!(minter.grants_on_every(&pattern("dev-*"), Push.into()));
        assert!(minter.grants_on_every(&pattern("prod"), Pull.into()));
        assert!(!minter.grants_on_every(&pattern("prod"), Push.into()));
        // An exact entry is the whole answer for its name, even when it
        // grants more than the patterns.
        let minter = claims(&[("*", &[Pull]), ("prod", &[Pull, Push])]);
        assert!(minter.grants_on_every(&pattern("prod"), Push.into()));
    }

    #[test]
    fn minting_stays_within_the_minter() {
        let minter = claims(&[
            ("alice-*", &[Pull, Push, ManageTokens]),
            ("shared", &[Pull]),
        ]);
        let mut minted = claims(&[("alice-ci", &[Push])]);
        minted.exp = minter.exp;
        assert_eq!(minter.check_delegation(&minted), Ok(()));

        // Pull on shared, but no manage_tokens there.
        let minted = claims(&[("shared", &[Pull])]);
        assert_eq!(
            minter.check_delegation(&minted),
            Err(DelegationDenied::WiderThanMinter {
                pattern: pattern("shared"),
                permission: ManageTokens
            })
        );
        let minted = claims(&[("alice-*", &[Pull, Delete])]);
        assert_eq!(
            minter.check_delegation(&minted),
            Err(DelegationDenied::WiderThanMinter {
                pattern: pattern("alice-*"),
                permission: Delete
            })
        );
        let minted = claims(&[("*", &[Pull])]);
        assert!(minter.check_delegation(&minted).is_err());
    }

    #[test]
    fn a_minted_token_expires_no_later_than_its_minter() {
        let minter = claims(&[("*", &Permission::ALL)]);
        let mut minted = claims(&[("a", &[Pull])]);
        minted.exp = minter.exp + 1;
        assert_eq!(
            minter.check_delegation(&minted),
            Err(DelegationDenied::OutlivesMinter {
                requested: minter.exp + 1,
                minter: minter.exp
            })
        );
    }

    #[test]
    fn managing_needs_manage_tokens_on_every_name_the_token_names() {
        let manager = claims(&[("alice-*", &[ManageTokens]), ("*", &[Pull])]);
        assert!(manager.manages(&claims(&[("alice-ci", &[Push, DestroyCache])])));
        assert!(manager.manages(&claims(&[("alice-*", &[Pull])])));
        assert!(!manager.manages(&claims(&[("alice-ci", &[Push]), ("bob", &[Pull])])));
        assert!(!manager.manages(&claims(&[("*", &[Pull])])));
        assert!(!manager.manages(&claims(&[])));
        let root = claims(&[("*", &Permission::ALL)]);
        assert!(root.manages(&claims(&[])));
        assert!(root.manages(&claims(&[("anything-*", &[Pull])])));
    }
}
