//! Store paths (`/nix/store/<hash>-<name>`) as validated newtypes.
//!
//! Raw strings from narinfos, API requests and database rows are parsed
//! into these types at the boundary, so core logic never sees a path Nix
//! itself would refuse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use super::base32;

/// Characters in a store path hash (20 bytes of Nix base-32).
pub const STORE_PATH_HASH_LEN: usize = 32;
/// The longest name Nix accepts.
pub const MAX_STORE_PATH_NAME_LEN: usize = 211;
/// The store directory of nearly every Nix installation.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// Why a string is not a store path (or a part of one).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    #[error("store path hash {text:?} has {len} characters, expected 32")]
    HashLength { text: String, len: usize },
    #[error("store path hash {text:?} has invalid character {character:?} at position {position}")]
    HashCharacter {
        text: String,
        character: char,
        position: usize,
    },
    #[error("store path name is empty")]
    NameEmpty,
    #[error("store path name {name:?} is {len} characters long, at most 211 are allowed")]
    NameTooLong { name: String, len: usize },
    #[error("store path name {name:?} has invalid character {character:?} at position {position}")]
    NameCharacter {
        name: String,
        character: char,
        position: usize,
    },
    #[error("store path name {name:?} starts with a period")]
    NameStartsWithPeriod { name: String },
    #[error("store path base name {text:?} is not `<32-character hash>-<name>`")]
    NotBaseName { text: String },
    #[error("path {path:?} is not directly inside the store directory {store_dir:?}")]
    NotInStore { path: String, store_dir: String },
    #[error("store directory {text:?} is not an absolute path without a trailing slash")]
    InvalidStoreDir { text: String },
}

/// Quotes at most a bounded prefix of untrusted input in error messages, so
/// an enormous bad value cannot make an enormous error.
fn excerpt(text: &str) -> String {
    const MAX: usize = 300;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The 32-character hash part of a store path, which identifies it in a
/// binary cache (`<hash>.narinfo`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; STORE_PATH_HASH_LEN]);

impl StorePathHash {
    pub fn parse(text: &str) -> Result<Self, StorePathError> {
        let bytes: [u8; STORE_PATH_HASH_LEN] =
            text.as_bytes()
                .try_into()
                .map_err(|_| StorePathError::HashLength {
                    text: excerpt(text),
                    len: text.chars().count(),
                })?;
        if let Some(position) = bytes.iter().position(|&b| !base32::is_base32_char(b)) {
            return Err(StorePathError::HashCharacter {
                text: text.to_owned(),
                // `position` is a byte offset; report the character there.
                character: text[position..].chars().next().unwrap_or('\u{fffd}'),
                position,
            });
        }
        // 32 digits are exactly 160 bits, so there are no overflow bits to
        // check: every such string decodes.
        Ok(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        // The bytes were checked to be ASCII base-32 digits in `parse`.
        std::str::from_utf8(&self.0).expect("store path hash is ASCII by construction")
    }

    /// The 20 bytes the hash encodes.
    pub fn to_bytes(&self) -> [u8; 20] {
        // Every 32-digit string of the alphabet decodes to 20 bytes (160 bits
        // exactly), and `parse` checked the digits.
        base32::decode_array(&self.0).expect("validated store path hash decodes")
    }

    /// The hash whose base-32 spelling encodes `bytes`.
    pub fn from_bytes(bytes: &[u8; 20]) -> Self {
        let text = base32::encode(bytes);
        let mut out = [0u8; STORE_PATH_HASH_LEN];
        out.copy_from_slice(text.as_bytes());
        Self(out)
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({})", self.as_str())
    }
}

/// The name part of a store path, after `<hash>-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathName(String);

impl StorePathName {
    pub fn parse(name: &str) -> Result<Self, StorePathError> {
        if name.is_empty() {
            return Err(StorePathError::NameEmpty);
        }
        if name.len() > MAX_STORE_PATH_NAME_LEN {
            return Err(StorePathError::NameTooLong {
                name: excerpt(name),
                len: name.chars().count(),
            });
        }
        if let Some((position, character)) = name
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
        {
            return Err(StorePathError::NameCharacter {
                name: name.to_owned(),
                character,
                position,
            });
        }
        // Nix 2.8 refuses every name starting with a period, which also
        // rules out `.` and `..`.
        if name.starts_with('.') {
            return Err(StorePathError::NameStartsWithPeriod {
                name: name.to_owned(),
            });
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorePathName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorePathName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathName({})", self.0)
    }
}

/// A store path independent of the store directory: `<hash>-<name>`.
/// `Display` and serde use that base name; [`StoreDir`] makes full paths.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: StorePathHash,
    name: StorePathName,
}

impl StorePath {
    pub fn new(hash: StorePathHash, name: StorePathName) -> Self {
        Self { hash, name }
    }

    /// Parses a base name, `<hash>-<name>`, as narinfo `References` carry.
    pub fn from_base_name(text: &str) -> Result<Self, StorePathError> {
        let not_base_name = || StorePathError::NotBaseName {
            text: excerpt(text),
        };
        if text.len() <= STORE_PATH_HASH_LEN + 1 || !text.is_char_boundary(STORE_PATH_HASH_LEN) {
            return Err(not_base_name());
        }
        let (hash, rest) = text.split_at(STORE_PATH_HASH_LEN);
        let name = rest.strip_prefix('-').ok_or_else(not_base_name)?;
        Ok(Self {
            hash: StorePathHash::parse(hash)?,
            name: StorePathName::parse(name)?,
        })
    }

    /// Parses a full path such as `/nix/store/<hash>-<name>` in `store_dir`.
    pub fn from_full_path(path: &str, store_dir: &StoreDir) -> Result<Self, StorePathError> {
        store_dir.parse_path(path)
    }

    pub fn hash(&self) -> &StorePathHash {
        &self.hash
    }

    pub fn name(&self) -> &StorePathName {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn to_base_name(&self) -> String {
        self.to_string()
    }

    /// `<store_dir>/<hash>-<name>`.
    pub fn to_full_path(&self, store_dir: &StoreDir) -> String {
        store_dir.display_path(self)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    /// Parses a base name; full paths need a [`StoreDir`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_base_name(text)
    }
}

/// The store directory of a cache (`StoreDir:` in `nix-cache-info`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl StoreDir {
    /// Accepts an absolute path without a trailing slash, NUL or newline,
    /// and with no empty, `.` or `..` components.
    pub fn new(text: &str) -> Result<Self, StorePathError> {
        let invalid = || StorePathError::InvalidStoreDir {
            text: excerpt(text),
        };
        let rest = text.strip_prefix('/').ok_or_else(invalid)?;
        let bad_component = rest
            .split('/')
            .any(|component| component.is_empty() || component == "." || component == "..");
        if bad_component || text.contains(['\0', '\n', '\r']) {
            return Err(invalid());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses `<store dir>/<hash>-<name>`.
    pub fn parse_path(&self, path: &str) -> Result<StorePath, StorePathError> {
        let not_in_store = || StorePathError::NotInStore {
            path: excerpt(path),
            store_dir: self.0.clone(),
        };
        let base_name = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(not_in_store)?;
        if base_name.contains('/') {
            return Err(not_in_store());
        }
        StorePath::from_base_name(base_name)
    }

    /// `<store dir>/<hash>-<name>`.
    pub fn display_path(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path)
    }
}

impl Default for StoreDir {
    fn default() -> Self {
        Self(DEFAULT_STORE_DIR.to_owned())
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreDir({})", self.0)
    }
}

impl FromStr for StoreDir {
    type Err = StorePathError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::new(text)
    }
}

/// Serde through `Display`/`FromStr`: every type here is a plain string on
/// the wire.
macro_rules! serde_as_string {
    ($type:ty, $parse:path) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                $parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(StorePathHash, StorePathHash::parse);
serde_as_string!(StorePathName, StorePathName::parse);
serde_as_string!(StorePath, StorePath::from_base_name);
serde_as_string!(StoreDir, StoreDir::new);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = "42nz3hhz98ii98b2d6ri24navmv57jpg-built";

    #[test]
    fn parses_base_and_full_paths() {
        let path = StorePath::from_base_name(BASE).unwrap();
        assert_eq!(path.hash().as_str(), "42nz3hhz98ii98b2d6ri24navmv57jpg");
        assert_eq!(path.name().as_str(), "built");
        assert_eq!(path.to_string(), BASE);
        let store_dir = StoreDir::default();
        let full = format!("/nix/store/{BASE}");
        assert_eq!(
            StorePath::from_full_path(&full, &store_dir),
            Ok(path.clone())
        );
        assert_eq!(path.to_full_path(&store_dir), full);
        let other = StoreDir::new("/tmp/a/store").unwrap();
        assert_eq!(
            other.parse_path(&format!("/tmp/a/store/{BASE}")),
            Ok(path.clone())
        );
        assert!(matches!(
            other.parse_path(&full),
            Err(StorePathError::NotInStore { .. })
        ));
    }

    #[test]
    fn hash_bytes_round_trip() {
        let hash = StorePathHash::parse("cx2j60ggrnmqjrs54c0yzkdbi5kla8q1").unwrap();
        // From `nix-hash --type sha1 --to-base32 0123…4567`.
        assert_eq!(
            hex::encode(hash.to_bytes()),
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(StorePathHash::from_bytes(&hash.to_bytes()), hash);
    }

    type Check = fn(&StorePathError) -> bool;

    #[test]
    fn rejects_bad_paths() {
        let long_name = format!("42nz3hhz98ii98b2d6ri24navmv57jpg-{}", "a".repeat(212));
        let cases: Vec<(String, Check)> = vec![
            ("".into(), |e| {
                matches!(e, StorePathError::NotBaseName { .. })
            }),
            ("42nz3hhz98ii98b2d6ri24navmv57jpg".into(), |e| {
                matches!(e, StorePathError::NotBaseName { .. })
            }),
            ("42nz3hhz98ii98b2d6ri24navmv57jpg-".into(), |e| {
                matches!(e, StorePathError::NotBaseName { .. })
            }),
            ("42nz3hhz98ii98b2d6ri24navmv57jpgxbuilt".into(), |e| {
                matches!(e, StorePathError::NotBaseName { .. })
            }),
            ("42nz3hhz98ii98b2d6ri24navmv57jpe-built".into(), |e| {
                matches!(
                    e,
                    StorePathError::HashCharacter {
                        character: 'e',
                        position: 31,
                        ..
                    }
                )
            }),
            ("42NZ3hhz98ii98b2d6ri24navmv57jpg-built".into(), |e| {
                matches!(e, StorePathError::HashCharacter { .. })
            }),
            ("42nz3hhz98ii98b2d6ri24navmv57jpg-.hidden".into(), |e| {
                matches!(e, StorePathError::NameStartsWithPeriod { .. })
            }),
            ("42nz3hhz98ii98b2d6ri24navmv57jpg-a/b".into(), |e| {
                matches!(e, StorePathError::NameCharacter { character: '/', .. })
            }),
            ("42nz3hhz98ii98b2d6ri24navmv57jpg-é".into(), |e| {
                matches!(
                    e,
                    StorePathError::NameCharacter {
                        character: 'é', ..
                    }
                )
            }),
            ("42nz3hhz98ii98b2d6ri24navmv5éjpg-built".into(), |e| {
                matches!(
                    e,
                    StorePathError::NotBaseName { .. } | StorePathError::HashCharacter { .. }
                )
            }),
            (long_name, |e| {
                matches!(e, StorePathError::NameTooLong { len: 212, .. })
            }),
        ];
        for (text, check) in cases {
            let error = StorePath::from_base_name(&text).unwrap_err();
            assert!(check(&error), "{text}: {error:?}");
        }
        let max = format!("42nz3hhz98ii98b2d6ri24navmv57jpg-{}", "a".repeat(211));
        assert!(StorePath::from_base_name(&max).is_ok());
        let allowed = "42nz3hhz98ii98b2d6ri24navmv57jpg-A-z_0.9+?=";
        assert!(StorePath::from_base_name(allowed).is_ok());
    }

    #[test]
    fn rejects_nested_and_foreign_full_paths() {
        let store_dir = StoreDir::default();
        for path in [
            format!("/nix/store/{BASE}/bin"),
            format!("/nix/store{BASE}"),
            format!("/nix/stor/{BASE}"),
            format!("nix/store/{BASE}"),
            format!("/nix/store//{BASE}"),
        ] {
            assert!(
                matches!(
                    store_dir.parse_path(&path),
                    Err(StorePathError::NotInStore { .. } | StorePathError::NotBaseName { .. })
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn validates_store_dirs() {
        for bad in [
            "",
            "nix/store",
            "/nix/store/",
            "/nix//store",
            "/nix/./store",
            "/a\nb",
            "/",
        ] {
            assert!(StoreDir::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(StoreDir::new("/nix/store").unwrap(), StoreDir::default());
    }

    #[test]
    fn serde_as_strings() {
        let path = StorePath::from_base_name(BASE).unwrap();
        assert_eq!(serde_json::to_string(&path).unwrap(), format!("\"{BASE}\""));
        assert_eq!(
            serde_json::from_str::<StorePath>(&format!("\"{BASE}\"")).unwrap(),
            path
        );
        assert_eq!(
            serde_json::to_string(path.hash()).unwrap(),
            "\"42nz3hhz98ii98b2d6ri24navmv57jpg\""
        );
        assert!(serde_json::from_str::<StorePathHash>("\"42nz\"").is_err());
        assert!(serde_json::from_str::<StorePath>("\"x\"").is_err());
    }

    proptest! {
        #[test]
        fn valid_paths_round_trip(
            hash in "[0-9abcdfghijklmnpqrsvwxyz]{32}",
            name in "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}",
        ) {
            let text = format!("{hash}-{name}");
            let path = StorePath::from_base_name(&text).unwrap();
            prop_assert_eq!(path.to_string(), text);
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,300}") {
            let _ = StorePath::from_base_name(&text);
            let _ = StoreDir::default().parse_path(&text);
            let _ = StoreDir::new(&text);
        }
    }
}
