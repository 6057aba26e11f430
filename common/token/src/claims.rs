//! The claims a Larder token carries, and how they resolve to the
//! permissions on one cache.
//!
//! # Wire format
//!
//! The JSON below is a wire contract: tokens minted today must verify after
//! an upgrade. Fields may be added (unknown fields are ignored when
//! reading) but never renamed or given a new meaning.
//!
//! ```json
//! {
//!   "sub": "alice",
//!   "iat": 1735689600,
//!   "nbf": 1735689600,
//!   "exp": 1743465600,
//!   "jti": "9f0c4d0e5b7a4c21a1d3e8f6b2c7a9d0",
//!   "caches": {
//!     "alice-*": ["pull", "push"],
//!     "shared": ["pull"]
//!   }
//! }
//! ```
//!
//! - `sub`: who the token was minted for; free text, shown in listings.
//! - `iat`, `nbf`, `exp`: JWT NumericDates (Unix seconds). `nbf` is
//!   omitted unless the token was minted to start later.
//! - `jti`: 128 random bits in hex; the handle for listing and revocation.
//! - `caches`: cache-name pattern to permission names (see
//!   [`Permissions`] for the list form and the names).
//!
//! # Resolution
//!
//! [`Claims::permissions_for`] decides what a token may do on one cache:
//!
//! 1. An **exact** entry (a pattern without `*`) naming the cache is the
//!    whole answer: patterns are not consulted. So `{"*": ["pull",
//!    "push"], "prod": ["pull"]}` grants only `pull` on `prod`, and an
//!    exact entry with an empty list takes everything away from that one
//!    cache.
//! 2. Otherwise the permissions of **every** matching wildcard pattern add
//!    up. So `{"*": ["pull"], "alice-*": ["push"]}` grants `pull` and
//!    `push` on `alice-ci`.
//!
//! Adding up is the unsurprising rule for patterns: no pattern takes
//! away what another grants, and the result does not hinge on an ordering
//! of patterns by "specificity" that users would have to learn. Narrowing
//! is what exact entries are for.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::permissions::{Permission, Permissions};
use larder_api::cache_name::{CacheName, CacheNamePattern};
use larder_api::time::system_time;

/// The payload of a Larder token. Obtained by minting
/// ([`TokenBuilder`](super::TokenBuilder)) or, from a token string, only
/// through [`TokenVerifier`](super::TokenVerifier), which checks the
/// signature, the validity period and revocation first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token was minted for.
    pub sub: String,
    /// When it was minted, in Unix seconds.
    pub iat: u64,
    /// When it starts being valid, in Unix seconds, if later than `iat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// When it stops being valid, in Unix seconds.
    pub exp: u64,
    /// Its unique id, by which it is listed and revoked.
    pub jti: String,
    /// Permissions by cache-name pattern; a `BTreeMap` so that the JSON
    /// lists patterns in a stable order.
    pub caches: BTreeMap<CacheNamePattern, Permissions>,
}

impl Claims {
    /// What this token may do on `cache`; see the module documentation for
    /// the rule.
    pub fn permissions_for(&self, cache: &CacheName) -> Permissions {
        let exact = self
            .caches
            .iter()
            .find(|(pattern, _)| pattern.is_exact() && pattern.matches(cache));
        if let Some((_, &permissions)) = exact {
            return permissions;
        }
        self.caches
            .iter()
            .filter(|(pattern, _)| !pattern.is_exact() && pattern.matches(cache))
            .fold(Permissions::NONE, |all, (_, &permissions)| {
                all | permissions
            })
    }

    /// Whether this token may do `permission` on `cache`.
    pub fn can(&self, cache: &CacheName, permission: Permission) -> bool {
        self.permissions_for(cache).contains(permission)
    }

    /// Like [`can`](Self::can), as an error to return with `?`.
    pub fn require(
        &self,
        cache: &CacheName,
        permission: Permission,
    ) -> Result<(), PermissionDenied> {
        if self.can(cache, permission) {
            Ok(())
        } else {
            Err(PermissionDenied {
                cache: cache.clone(),
                permission,
            })
        }
    }

    /// Whether this token grants anything at all on `cache`. A server can
    /// use it to decide whether the holder may learn that a private cache
    /// exists.
    pub fn grants_anything_on(&self, cache: &CacheName) -> bool {
        !self.permissions_for(cache).is_empty()
    }

    pub fn issued_at(&self) -> SystemTime {
        system_time(self.iat)
    }

    pub fn expires_at(&self) -> SystemTime {
        system_time(self.exp)
    }

    pub fn not_before(&self) -> Option<SystemTime> {
        self.nbf.map(system_time)
    }

    /// The claims as indented JSON, for `dump-claims` style output.
    pub fn to_json_pretty(&self) -> String {
        // Serialising cannot fail: every map key is a string and every
        // value a string, an integer or a list of strings.
        serde_json::to_string_pretty(self).expect("claims always serialise to JSON")
    }
}

/// A verified token lacks the permission an operation needs. The server
/// decides the status (403, or 404 where even the cache's existence must
/// not show).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token does not grant {permission} on cache {cache}")]
pub struct PermissionDenied {
    pub cache: CacheName,
    pub permission: Permission,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use Permission::*;

    fn name(s: &str) -> CacheName {
        s.parse().expect("valid test cache name")
    }

    /// Claims of `alice`, valid in the first quarter of 2025, granting
    /// `entries`; the auth modules' unit tests share it.
    pub(crate) fn claims(entries: &[(&str, &[Permission])]) -> Claims {
        Claims {
            sub: "alice".to_owned(),
            iat: 1_735_689_600,
            nbf: None,
            exp: 1_743_465_600,
            jti: "9f0c4d0e5b7a4c21a1d3e8f6b2c7a9d0".to_owned(),
            caches: entries
                .iter()
                .map(|(pattern, permissions)| {
                    (
                        pattern.parse().expect("valid test pattern"),
                        permissions.iter().copied().collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn exact_entry_wins_over_every_pattern() {
        let claims = claims(&[
            ("*", &[Pull, Push, Delete]),
            ("prod-*", &[DestroyCache]),
            ("prod-main", &[Pull]),
        ]);
        assert_eq!(claims.permissions_for(&name("prod-main")), Pull.into());
        assert!(!claims.can(&name("prod-main"), Push));
        assert!(!claims.can(&name("prod-main"), DestroyCache));
    }

    #[test]
    fn an_empty_exact_entry_takes_everything_away() {
        let claims = claims(&[("*", &[Pull]), ("secret", &[])]);
        assert!(claims.permissions_for(&name("secret")).is_empty());
        assert!(!claims.grants_anything_on(&name("secret")));
        assert!(claims.grants_anything_on(&name("public")));
    }

    #[test]
    fn matching_patterns_add_up() {
        let claims = claims(&[("*", &[Pull]), ("alice-*", &[Push]), ("*-ci", &[Delete])]);
        assert_eq!(
            claims.permissions_for(&name("alice-ci")),
            Permissions::from([Pull, Push, Delete])
        );
        assert_eq!(
            claims.permissions_for(&name("alice-dev")),
            Permissions::from([Pull, Push])
        );
        assert_eq!(claims.permissions_for(&name("bob")), Pull.into());
    }

    #[test]
    fn nothing_matches_means_nothing_granted() {
        let claims = claims(&[("alice-*", &[Pull]), ("team", &[Pull])]);
        assert!(claims.permissions_for(&name("bob")).is_empty());
        assert!(claims.permissions_for(&name("teams")).is_empty());
    }

    #[test]
    fn every_permission_is_checked_on_its_own() {
        for granted in Permission::ALL {
            let claims = claims(&[("c", &[granted])]);
            for asked in Permission::ALL {
                assert_eq!(
                    claims.require(&name("c"), asked).is_ok(),
                    granted == asked,
                    "granting {granted} must decide {asked} alone"
                );
            }
        }
    }

    #[test]
    fn permission_denied_says_what_is_missing() {
        let claims = claims(&[("c", &[Pull])]);
        let error = claims.require(&name("c"), Push).unwrap_err();
        assert_eq!(error.to_string(), "token does not grant push on cache c");
    }

    #[test]
    fn json_is_the_documented_wire_format() {
        let claims = claims(&[("shared", &[Pull]), ("alice-*", &[Push, Pull])]);
        assert_eq!(
            serde_json::to_string(&claims).expect("serialises"),
            concat!(
                r#"{"sub":"alice","iat":1735689600,"exp":1743465600,"#,
                r#""jti":"9f0c4d0e5b7a4c21a1d3e8f6b2c7a9d0","#,
                r#""caches":{"alice-*":["pull","push"],"shared":["pull"]}}"#
            )
        );
        let with_nbf = Claims {
            nbf: Some(1_735_689_600),
            ..claims.clone()
        };
        let json = serde_json::to_string(&with_nbf).expect("serialises");
        assert!(json.contains(r#""iat":1735689600,"nbf":1735689600,"exp""#));
        assert_eq!(
            serde_json::from_str::<Claims>(&json).expect("deserialises"),
            with_nbf
        );
        assert!(claims.to_json_pretty().contains("\n  \"caches\": {"));
    }

    #[test]
    fn reading_ignores_unknown_fields_but_requires_known_ones() {
        let json = r#"{"sub":"a","iat":1,"exp":2,"jti":"x","caches":{},"iss":"elsewhere"}"#;
        assert!(serde_json::from_str::<Claims>(json).is_ok());
        let no_jti = r#"{"sub":"a","iat":1,"exp":2,"caches":{}}"#;
        assert!(serde_json::from_str::<Claims>(no_jti).is_err());
        let bad_pattern = r#"{"sub":"a","iat":1,"exp":2,"jti":"x","caches":{"../x":["pull"]}}"#;
        assert!(serde_json::from_str::<Claims>(bad_pattern).is_err());
    }
}
