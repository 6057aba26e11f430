//! The permissions a token can grant on a cache, and the set type that
//! carries them in token claims.
//!
//! On the wire a set is a JSON array of permission names in a fixed order,
//! e.g. `["pull", "push"]`: readable in `dump_claims` output and in a
//! decoded token, and only a few bytes longer than single-letter keys.
//! Names are `snake_case`; parsing also accepts `kebab-case`, as the CLI
//! and the design document write them.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};
use std::str::FromStr;

use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One thing a token may allow on a cache. Each is independent: `push`
/// does not imply `pull`, and `destroy_cache` does not imply `delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Read narinfos and NARs of a private cache.
    Pull,
    /// Upload store paths.
    Push,
    /// Delete store paths.
    Delete,
    /// Create a cache whose name matches the pattern.
    CreateCache,
    /// Change a cache's configuration, except its retention period.
    ConfigureCache,
    /// Change a cache's retention period.
    ConfigureCacheRetention,
    /// Destroy a cache with everything in it.
    DestroyCache,
    /// Set a cache's storage quota. Meant for operators: a tenant who could
    /// set its own quota would have none.
    ConfigureCacheQuota,
    /// List, mint and revoke tokens for the caches the pattern covers, never
    /// granting more than the minting token holds (see `auth::delegation`).
    ManageTokens,
}

impl Permission {
    /// Every permission, in wire order.
    pub const ALL: [Permission; 9] = [
        Permission::Pull,
        Permission::Push,
        Permission::Delete,
        Permission::CreateCache,
        Permission::ConfigureCache,
        Permission::ConfigureCacheRetention,
        Permission::DestroyCache,
        Permission::ConfigureCacheQuota,
        Permission::ManageTokens,
    ];

    /// The name used in token claims; a stable wire contract.
    pub const fn name(self) -> &'static str {
        match self {
            Permission::Pull => "pull",
            Permission::Push => "push",
            Permission::Delete => "delete",
            Permission::CreateCache => "create_cache",
            Permission::ConfigureCache => "configure_cache",
            Permission::ConfigureCacheRetention => "configure_cache_retention",
            Permission::DestroyCache => "destroy_cache",
            Permission::ConfigureCacheQuota => "configure_cache_quota",
            Permission::ManageTokens => "manage_tokens",
        }
    }

    const fn bit(self) -> u16 {
        1 << self as u8
    }

    fn from_name(name: &str) -> Option<Self> {
        let name = name.replace('-', "_");
        Permission::ALL
            .into_iter()
            .find(|permission| permission.name() == name)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A permission name that Larder does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown permission {0:?}: expected one of pull, push, delete, create_cache, configure_cache, configure_cache_retention, destroy_cache, configure_cache_quota, manage_tokens")]
pub struct UnknownPermission(pub String);

impl FromStr for Permission {
    type Err = UnknownPermission;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Permission::from_name(name).ok_or_else(|| UnknownPermission(name.to_owned()))
    }
}

/// A set of [`Permission`]s, as a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u16);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);
    pub const ALL: Permissions = {
        let mut bits = 0;
        let mut i = 0;
        while i < Permission::ALL.len() {
            bits |= Permission::ALL[i].bit();
            i += 1;
        }
        Permissions(bits)
    };

    pub const fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    /// Whether every permission of `other` is in this set.
    pub const fn contains_all(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// This set with `permission` added.
    #[must_use]
    pub const fn with(self, permission: Permission) -> Self {
        Permissions(self.0 | permission.bit())
    }

    pub fn insert(&mut self, permission: Permission) {
        self.0 |= permission.bit();
    }

    #[must_use]
    pub const fn union(self, other: Permissions) -> Self {
        Permissions(self.0 | other.0)
    }

    /// The permissions in the set, in wire order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |&permission| self.contains(permission))
    }
}

impl From<Permission> for Permissions {
    fn from(permission: Permission) -> Self {
        Permissions::NONE.with(permission)
    }
}

impl<const N: usize> From<[Permission; N]> for Permissions {
    fn from(permissions: [Permission; N]) -> Self {
        permissions.into_iter().collect()
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(permissions: I) -> Self {
        permissions
            .into_iter()
            .fold(Permissions::NONE, Permissions::with)
    }
}

impl BitOr for Permissions {
    type Output = Permissions;

    fn bitor(self, other: Permissions) -> Permissions {
        self.union(other)
    }
}

impl BitOrAssign for Permissions {
    fn bitor_assign(&mut self, other: Permissions) {
        *self = self.union(other);
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Comma-separated names, as written on a command line: `pull,push`.
/// Empty parts are skipped, so `""` is the empty set.
impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, permission) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(permission.name())?;
        }
        Ok(())
    }
}

impl FromStr for Permissions {
    type Err = UnknownPermission;

    fn from_str(names: &str) -> Result<Self, Self::Err> {
        names
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::parse::<Permission>)
            .collect()
    }
}

impl Serialize for Permissions {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.iter().count()))?;
        for permission in self.iter() {
            seq.serialize_element(permission.name())?;
        }
        seq.end()
    }
}

/// Names this version does not know are skipped, not refused: a token
/// minted by a newer Larder then still works here with the permissions
/// this version understands. That is safe because the list only ever
/// grants; an unknown name can never take a permission away.
impl<'de> Deserialize<'de> for Permissions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PermissionsVisitor;

        impl<'de> Visitor<'de> for PermissionsVisitor {
            type Value = Permissions;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of permission names")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Permissions, A::Error> {
                let mut permissions = Permissions::NONE;
                // Owned strings, because a borrowed `&str` fails on names
                // written with JSON escapes.
                while let Some(name) = seq.next_element::<String>()? {
                    if let Some(permission) = Permission::from_name(&name) {
                        permissions.insert(permission);
                    }
                }
                Ok(permissions)
            }
        }

        deserializer.deserialize_seq(PermissionsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bit_is_independent() {
        for permission in Permission::ALL {
            let set = Permissions::from(permission);
            for other in Permission::ALL {
                assert_eq!(
                    set.contains(other),
                    permission == other,
                    "{permission} alone must not grant {other}"
                );
            }
            let all_but = Permission::ALL
                .into_iter()
                .filter(|&other| other != permission)
                .collect::<Permissions>();
            assert!(!all_but.contains(permission));
            assert_eq!(all_but.with(permission), Permissions::ALL);
        }
        assert!(Permissions::NONE.is_empty());
        assert_eq!(Permissions::ALL.iter().count(), Permission::ALL.len());
    }

    #[test]
    fn names_round_trip_and_accept_kebab_case() {
        for permission in Permission::ALL {
            assert_eq!(permission.name().parse::<Permission>(), Ok(permission));
        }
        assert_eq!(
            "configure-cache-retention".parse::<Permission>(),
            Ok(Permission::ConfigureCacheRetention)
        );
        assert_eq!(
            "write".parse::<Permission>(),
            Err(UnknownPermission("write".to_owned()))
        );
    }

    #[test]
    fn comma_lists_parse_and_display() {
        let set: Permissions = "push, pull,,delete".parse().expect("valid list");
        assert_eq!(
            set,
            Permissions::from([Permission::Pull, Permission::Push, Permission::Delete])
        );
        assert_eq!(set.to_string(), "pull,push,delete");
        assert_eq!("".parse::<Permissions>(), Ok(Permissions::NONE));
        assert!("pull,admin".parse::<Permissions>().is_err());
    }

    #[test]
    fn serialises_as_names_in_wire_order() {
        let set = Permissions::from([Permission::DestroyCache, Permission::Pull]);
        assert_eq!(
            serde_json::to_string(&set).expect("serialises"),
            r#"["pull","destroy_cache"]"#
        );
        let all = serde_json::to_string(&Permissions::ALL).expect("serialises");
        assert_eq!(
            all,
            r#"["pull","push","delete","create_cache","configure_cache","configure_cache_retention","destroy_cache","configure_cache_quota","manage_tokens"]"#
        );
        assert_eq!(
            serde_json::from_str::<Permissions>(&all).expect("deserialises"),
            Permissions::ALL
        );
        assert_eq!(
            serde_json::to_string(&Permissions::NONE).expect("serialises"),
            "[]"
        );
    }

    #[test]
    fn unknown_names_on_the_wire_grant_nothing() {
        let set: Permissions =
            serde_json::from_str(r#"["pull","teleport"]"#).expect("unknown names are skipped");
        assert_eq!(set, Permissions::from(Permission::Pull));
        assert!(serde_json::from_str::<Permissions>(r#"{"pull":1}"#).is_err());
        assert!(serde_json::from_str::<Permissions>(r#"[1]"#).is_err());
    }
}
