//! Validated cache names and the patterns tokens grant permissions by.
//!
//! A cache name is the first segment of every binary-cache URL
//! (`/{cache}/nix-cache-info`), so the rules keep it unambiguous there: it
//! cannot start with `_` (the `/_api/…` namespace) or `.` (no `.`/`..`
//! segments), and it uses only characters that need no escaping in a URL,
//! a netrc file or a shell.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest cache name accepted; long enough for `team-project-branch` schemes.
pub const MAX_CACHE_NAME_LEN: usize = 50;

/// Why a string is not a valid cache name or cache-name pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheNameError {
    #[error("cache name is empty")]
    Empty,
    #[error("cache name {0:?} is longer than {MAX_CACHE_NAME_LEN} characters")]
    TooLong(String),
    #[error("cache name {0:?} must start with a letter or a digit")]
    BadFirstCharacter(String),
    #[error("cache name {name:?} contains {character:?}: only letters, digits, '-', '_' and '.' are allowed")]
    BadCharacter { name: String, character: char },
}

/// The name of a cache, validated at the boundary so that core logic never
/// sees a raw string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CacheName(String);

impl CacheName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CacheName {
    type Err = CacheNameError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        validate(name, false)?;
        Ok(Self(name.to_owned()))
    }
}

impl TryFrom<String> for CacheName {
    type Error = CacheNameError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        validate(&name, false)?;
        Ok(Self(name))
    }
}

impl From<CacheName> for String {
    fn from(name: CacheName) -> Self {
        name.0
    }
}

impl fmt::Display for CacheName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cache name in which `*` stands for any run of characters (`alice-*`,
/// `*`). Tokens grant permissions by pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CacheNamePattern(String);

impl CacheNamePattern {
    /// `*`: every cache name.
    pub fn everything() -> Self {
        Self("*".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern has no wildcard, so that it names one cache.
    /// Exact names take precedence over patterns when permissions are
    /// resolved.
    pub fn is_exact(&self) -> bool {
        !self.0.contains('*')
    }

    pub fn matches(&self, name: &CacheName) -> bool {
        wildcard_match(self.0.as_bytes(), name.as_str().as_bytes())
    }

    /// Whether every name `other` matches, this pattern matches too.
    ///
    /// Decided by matching `other`'s text, its `*`s taken as characters:
    /// a name never contains `*`, so only a `*` of this pattern can take
    /// one in, and whatever a `*` of `other` stands for then falls inside
    /// that star's span. It answers `false` for some pairs whose languages
    /// do nest only through a union (`a*` is not covered by `ab*` and `a`
    /// together), which errs on the side of refusing.
    pub fn covers(&self, other: &CacheNamePattern) -> bool {
        wildcard_match(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl FromStr for CacheNamePattern {
    type Err = CacheNameError;

    fn from_str(pattern: &str) -> Result<Self, Self::Err> {
        validate(pattern, true)?;
        Ok(Self(pattern.to_owned()))
    }
}

impl TryFrom<String> for CacheNamePattern {
    type Error = CacheNameError;

    fn try_from(pattern: String) -> Result<Self, Self::Error> {
        validate(&pattern, true)?;
        Ok(Self(pattern))
    }
}

impl From<CacheNamePattern> for String {
    fn from(pattern: CacheNamePattern) -> Self {
        pattern.0
    }
}

impl fmt::Display for CacheNamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn validate(name: &str, allow_wildcard: bool) -> Result<(), CacheNameError> {
    let first = name.chars().next().ok_or(CacheNameError::Empty)?;
    if name.len() > MAX_CACHE_NAME_LEN {
        return Err(CacheNameError::TooLong(name.to_owned()));
    }
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !(first.is_ascii_alphanumeric() || (allow_wildcard && first == '*')) {
        return Err(CacheNameError::BadFirstCharacter(name.to_owned()));
    }
    match name
        .chars()
        .find(|&c| !(is_name_char(c) || (allow_wildcard && c == '*')))
    {
        Some(character) => Err(CacheNameError::BadCharacter {
            name: name.to_owned(),
            character,
        }),
        None => Ok(()),
    }
}

/// Glob matching with `*` only, iterative with one backtrack point, so a
/// pattern full of stars cannot make it exponential.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    wildcard_match_counting(pattern, text).0
}

/// [`wildcard_match`], also returning how many steps it took, which the
/// tests bound by the pattern's length times the text's.
fn wildcard_match_counting(pattern: &[u8], text: &[u8]) -> (bool, usize) {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    let mut steps = 0;
    while t < text.len() {
        steps += 1;
        if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star, matched_until)) = backtrack {
            p = star + 1;
            t = matched_until + 1;
            backtrack = Some((star, matched_until + 1));
        } else {
            return (false, steps);
        }
    }
    (pattern[p..].iter().all(|&c| c == b'*'), steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> CacheNamePattern {
        s.parse().expect("valid test pattern")
    }

    #[test]
    fn a_pattern_covers_the_patterns_whose_names_it_all_matches() {
        for (wider, narrower) in [
            ("*", "*"),
            ("*", "alice-*"),
            ("*", "prod"),
            ("alice-*", "alice-ci-*"),
            ("alice-*", "alice-*"),
            ("alice-*", "alice-ci"),
            ("*-ci", "team-*-ci"),
            ("a*b", "a*x*b"),
            ("prod", "prod"),
        ] {
            assert!(
                pattern(wider).covers(&pattern(narrower)),
                "{wider} ⊇ {narrower}"
            );
        }
        for (not_wider, other) in [
            ("alice-*", "*"),
            ("alice-*", "alic*"),
            ("alice-*", "*-alice"),
            ("prod", "prod*"),
            ("prod", "prod-1"),
            ("*-ci", "*"),
            ("a*b", "a*"),
        ] {
            assert!(
                !pattern(not_wider).covers(&pattern(other)),
                "{not_wider} must not cover {other}"
            );
        }
    }

    fn name(s: &str) -> CacheName {
        s.parse().expect("valid test cache name")
    }

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["a", "hello", "alice-ci", "Team_1.cache", "0day"] {
            assert_eq!(name(ok).as_str(), ok);
        }
    }

    #[test]
    fn rejects_names_that_would_be_ambiguous_in_urls() {
        assert_eq!("".parse::<CacheName>(), Err(CacheNameError::Empty));
        for bad in ["_api", ".", "..", ".hidden", "-x"] {
            assert!(matches!(
                bad.parse::<CacheName>(),
                Err(CacheNameError::BadFirstCharacter(_))
            ));
        }
        for bad in ["a/b", "a b", "a%2f", "caché", "a*"] {
            assert!(matches!(
                bad.parse::<CacheName>(),
                Err(CacheNameError::BadCharacter { .. })
            ));
        }
        assert!(matches!(
            "a".repeat(MAX_CACHE_NAME_LEN + 1).parse::<CacheName>(),
            Err(CacheNameError::TooLong(_))
        ));
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<CacheName>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<CacheName>("\"../etc\"").is_err());
    }

    #[test]
    fn patterns_match_with_stars() {
        let pattern = |s: &str| s.parse::<CacheNamePattern>().expect("valid test pattern");
        assert!(pattern("*").matches(&name("anything")));
        assert!(pattern("alice-*").matches(&name("alice-ci")));
        assert!(pattern("alice-*").matches(&name("alice-")));
        assert!(!pattern("alice-*").matches(&name("bob-ci")));
        assert!(pattern("*-ci").matches(&name("alice-ci")));
        assert!(pattern("a*b*c").matches(&name("aXXbYYc")));
        assert!(!pattern("a*b*c").matches(&name("aXXbYY")));
        assert!(pattern("exact").matches(&name("exact")));
        assert!(!pattern("exact").matches(&name("exactly")));
        assert!(pattern("exact").is_exact());
        assert!(!pattern("ex*").is_exact());
    }

    /// A pattern of many stars against the longest name that almost
    /// matches: the work is bounded by the product of their lengths (a
    /// backtracking matcher would take exponentially many steps).
    #[test]
    fn many_stars_stay_fast() {
        let pattern = "*a*a*a*a*a*a*a*a*a*b";
        let text = "a".repeat(MAX_CACHE_NAME_LEN);
        let parsed: CacheNamePattern = pattern.parse().expect("valid pattern");
        assert!(!parsed.matches(&name(&text)));
        let (matched, steps) = wildcard_match_counting(pattern.as_bytes(), text.as_bytes());
        assert!(!matched);
        let bound = (pattern.len() + 1) * (text.len() + 1);
        assert!(steps <= bound, "{steps} steps, more than {bound}");
    }
}
