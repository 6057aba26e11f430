//! SHA-256 hashes as Nix spells them: `sha256:<base32>` canonically, and
//! also `sha256:<hex>`, `sha256:<base64>` and SRI `sha256-<base64>` on input.
//!
//! Narinfos written by Nix carry base-32, Attic clients send hex, and
//! `nix path-info --json` prints SRI, so the parser takes all of them and
//! every value prints in the one canonical form.

use std::fmt;
use std::io;
use std::str::FromStr;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::base32;

/// The number of bytes in a SHA-256 digest.
pub const SHA256_LEN: usize = 32;
/// The length of a SHA-256 digest in Nix base-32.
pub const SHA256_BASE32_LEN: usize = base32::encoded_len(SHA256_LEN);
const SHA256_HEX_LEN: usize = 64;
const SHA256_BASE64_LEN: usize = 44;

/// Nix accepts SRI hashes with or without `=` padding; trailing bits must
/// still be zero so that every digest has a single accepted spelling.
const BASE64_INDIFFERENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a string is not a SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("hash {text:?} does not start with `sha256:` or `sha256-`")]
    UnknownAlgorithm { text: String },
    #[error("hash {text:?} has a digest of {len} characters, expected 52 (base-32), 64 (hex) or 44 (base64)")]
    WrongLength { text: String, len: usize },
    // `cause` rather than `source`: the message already says it, and a
    // source would print it twice in an error chain.
    #[error("invalid base-32 in hash {text:?}: {cause}")]
    Base32 {
        text: String,
        cause: base32::Base32Error,
    },
    #[error("invalid hex in hash {text:?}")]
    Hex { text: String },
    #[error("invalid base64 in hash {text:?}")]
    Base64 { text: String },
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash([u8; SHA256_LEN]);

impl Sha256Hash {
    pub const fn from_bytes(bytes: [u8; SHA256_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; SHA256_LEN] {
        &self.0
    }

    /// Hashes `data` in one go; see [`Sha256Hasher`] for streams.
    pub fn digest(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Parses any spelling Nix accepts: `sha256:` followed by base-32, hex or
    /// base64, or SRI `sha256-<base64>`.
    pub fn parse(text: &str) -> Result<Self, HashError> {
        if let Some(digest) = text.strip_prefix("sha256:") {
            match digest.len() {
                SHA256_BASE32_LEN => Self::from_base32(digest).map_err(|cause| HashError::Base32 {
                    text: text.to_owned(),
                    cause,
                }),
                SHA256_HEX_LEN => Self::from_hex(digest).ok_or_else(|| HashError::Hex {
                    text: text.to_owned(),
                }),
                SHA256_BASE64_LEN => Self::from_base64(digest, text),
                len => Err(HashError::WrongLength {
                    text: text.to_owned(),
                    len,
                }),
            }
        } else if let Some(digest) = text.strip_prefix("sha256-") {
            Self::from_base64(digest, text)
        } else {
            Err(HashError::UnknownAlgorithm {
                text: text.to_owned(),
            })
        }
    }

    /// Parses 52 characters of bare Nix base-32 (no `sha256:` prefix), as in
    /// the names of NAR files.
    pub fn from_base32(digest: &str) -> Result<Self, base32::Base32Error> {
        base32::decode_array(digest.as_bytes()).map(Self)
    }

    /// Parses 64 bare hex digits (either case, as Nix does).
    fn from_hex(digest: &str) -> Option<Self> {
        let mut bytes = [0u8; SHA256_LEN];
        hex::decode_to_slice(digest, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    fn from_base64(digest: &str, text: &str) -> Result<Self, HashError> {
        let error = || HashError::Base64 {
            text: text.to_owned(),
        };
        // Bound the input before decoding so a long string cannot allocate.
        if digest.len() > SHA256_BASE64_LEN {
            return Err(error());
        }
        let bytes = BASE64_INDIFFERENT.decode(digest).map_err(|_| error())?;
        let bytes: [u8; SHA256_LEN] = bytes.try_into().map_err(|_| error())?;
        Ok(Self(bytes))
    }

    /// The 52-character Nix base-32 digest, without prefix.
    pub fn to_base32(&self) -> String {
        base32::encode(&self.0)
    }

    /// The 64-character lowercase hex digest, without prefix.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The SRI form, `sha256-<base64>`, as `nix path-info --json` prints it.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", STANDARD.encode(self.0))
    }
}

/// Canonical form: `sha256:<base32>`.
impl fmt::Display for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_base32())
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hash({self})")
    }
}

impl FromStr for Sha256Hash {
    type Err = HashError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl Serialize for Sha256Hash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Hash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The SHA-256 of an uncompressed NAR: what narinfos, signatures, the
/// database and the API carry. A distinct type so that a file hash (of the
/// compressed bytes) cannot be passed where a NAR hash is meant.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NarHash(Sha256Hash);

impl NarHash {
    pub const fn new(hash: Sha256Hash) -> Self {
        Self(hash)
    }

    /// Parses any spelling [`Sha256Hash::parse`] accepts.
    pub fn parse(text: &str) -> Result<Self, HashError> {
        Sha256Hash::parse(text).map(Self)
    }

    pub const fn sha256(&self) -> &Sha256Hash {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.0.to_hex()
    }

    pub fn to_sri(&self) -> String {
        self.0.to_sri()
    }
}

impl From<Sha256Hash> for NarHash {
    fn from(hash: Sha256Hash) -> Self {
        Self(hash)
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({})", self.0)
    }
}

impl FromStr for NarHash {
    type Err = HashError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Streaming SHA-256 that also counts the bytes it has seen, which is what
/// a NAR or file needs (`NarHash` + `NarSize`, `FileHash` + `FileSize`).
#[derive(Clone, Default)]
pub struct Sha256Hasher {
    hasher: Sha256,
    len: u64,
}

impl Sha256Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// The number of bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest and the number of bytes hashed.
    pub fn finish(self) -> (Sha256Hash, u64) {
        (Sha256Hash(self.hasher.finalize().into()), self.len)
    }
}

impl fmt::Debug for Sha256Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sha256Hasher")
            .field("len", &self.len)
            .finish()
    }
}

impl io::Write for Sha256Hasher {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.update(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // sha256("") in every spelling, from `nix hash to-base32|to-sri`.
    const EMPTY_BASE32: &str = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_SRI: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn parses_every_spelling() {
        let empty = Sha256Hash::digest(b"");
        for text in [
            EMPTY_BASE32.to_owned(),
            format!("sha256:{EMPTY_HEX}"),
            format!("sha256:{}", EMPTY_HEX.to_uppercase()),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
            EMPTY_SRI.to_owned(),
            EMPTY_SRI.trim_end_matches('=').to_owned(),
        ] {
            assert_eq!(Sha256Hash::parse(&text), Ok(empty), "{text}");
        }
        assert_eq!(empty.to_string(), EMPTY_BASE32);
        assert_eq!(empty.to_hex(), EMPTY_HEX);
        assert_eq!(empty.to_sri(), EMPTY_SRI);
        assert_eq!(format!("{empty:?}"), format!("Sha256Hash({EMPTY_BASE32})"));
    }

    type Check = fn(&HashError) -> bool;

    #[test]
    fn rejects_malformed() {
        let cases: &[(&str, Check)] = &[
            ("md5:abc", |e| {
                matches!(e, HashError::UnknownAlgorithm { .. })
            }),
            (
                "SHA256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
                |e| matches!(e, HashError::UnknownAlgorithm { .. }),
            ),
            ("sha256:", |e| {
                matches!(e, HashError::WrongLength { len: 0, .. })
            }),
            (
                "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7",
                |e| matches!(e, HashError::WrongLength { len: 51, .. }),
            ),
            (
                "sha256:0MDQA9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
                |e| matches!(e, HashError::Base32 { .. }),
            ),
            (
                "sha256:2zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
                |e| matches!(e, HashError::Base32 { .. }),
            ),
            (
                "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                |e| matches!(e, HashError::Hex { .. }),
            ),
            ("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuF", |e| {
                matches!(e, HashError::Base64 { .. })
            }),
            // Non-zero trailing bits: a second spelling of a digest.
            ("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV=", |e| {
                matches!(e, HashError::Base64 { .. })
            }),
            ("sha256-", |e| matches!(e, HashError::Base64 { .. })),
        ];
        for (text, check) in cases {
            let error = Sha256Hash::parse(text).unwrap_err();
            assert!(check(&error), "{text}: {error:?}");
        }
    }

    #[test]
    fn serde_uses_canonical_string() {
        let hash = NarHash::parse(EMPTY_SRI).unwrap();
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{EMPTY_BASE32}\""));
        let back: NarHash = serde_json::from_str(&format!("\"sha256:{EMPTY_HEX}\"")).unwrap();
        assert_eq!(back, hash);
        assert!(serde_json::from_str::<NarHash>("\"sha256:zz\"").is_err());
    }

    #[test]
    fn hasher_counts_and_hashes() {
        let mut hasher = Sha256Hasher::new();
        hasher.update(b"ab");
        std::io::Write::write_all(&mut hasher, b"c").unwrap();
        let (hash, len) = hasher.finish();
        assert_eq!(len, 3);
        assert_eq!(hash, Sha256Hash::digest(b"abc"));
        assert_eq!(
            hash.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    proptest! {
        #[test]
        fn spellings_round_trip(bytes in any::<[u8; 32]>()) {
            let hash = Sha256Hash::from_bytes(bytes);
            prop_assert_eq!(Sha256Hash::parse(&hash.to_string()), Ok(hash));
            prop_assert_eq!(Sha256Hash::parse(&format!("sha256:{}", hash.to_hex())), Ok(hash));
            prop_assert_eq!(Sha256Hash::parse(&hash.to_sri()), Ok(hash));
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,80}") {
            let _ = Sha256Hash::parse(&text);
            let _ = Sha256Hash::parse(&format!("sha256:{text}"));
            let _ = Sha256Hash::parse(&format!("sha256-{text}"));
        }
    }
}
