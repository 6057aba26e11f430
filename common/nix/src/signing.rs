//! ed25519 signing keys and narinfo signatures in Nix's formats.
//!
//! A secret key is `name:base64(seed32 || public32)`, a public key
//! `name:base64(public32)` and a signature `name:base64(signature64)`, where
//! the signed message is the path's fingerprint (see [`fingerprint`]).
//! Secret keys never appear in `Debug` output.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use super::hash::NarHash;
use super::store_path::{StoreDir, StorePath};

/// Why a key or signature is not in Nix's format.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SigningError {
    #[error("{what} is not `<name>:<base64>`")]
    MissingName { what: &'static str },
    #[error("{what} has an invalid name {name:?} (it must be non-empty, without `:`, whitespace or control characters)")]
    InvalidName { what: &'static str, name: String },
    #[error("{what} {name:?} is not valid base64")]
    Base64 { what: &'static str, name: String },
    #[error("{what} {name:?} has {len} bytes, expected {expected}")]
    WrongLength {
        what: &'static str,
        name: String,
        len: usize,
        expected: usize,
    },
    #[error("secret key {name:?} holds a public key that does not match its seed")]
    MismatchedPublicKey { name: String },
    #[error("public key {name:?} is not a valid ed25519 point")]
    InvalidPublicKey { name: String },
}

/// Key names end up in `trusted-public-keys` (space-separated) and in
/// narinfo lines, so they are restricted to visible, non-space characters.
fn check_key_name(what: &'static str, name: &str) -> Result<(), SigningError> {
    let valid = !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != ':');
    if valid {
        Ok(())
    } else {
        Err(SigningError::InvalidName {
            what,
            name: name.chars().take(64).collect(),
        })
    }
}

/// Splits `name:base64` and decodes the base64 into exactly `N` bytes.
fn split_and_decode<const N: usize>(
    what: &'static str,
    text: &str,
) -> Result<(String, [u8; N]), SigningError> {
    let (name, encoded) = text
        .split_once(':')
        .ok_or(SigningError::MissingName { what })?;
    check_key_name(what, name)?;
    let base64_error = || SigningError::Base64 {
        what,
        name: name.to_owned(),
    };
    // Bound the input before decoding so a long string cannot allocate.
    if encoded.len() > 4 * N.div_ceil(3) {
        return Err(base64_error());
    }
    let bytes = STANDARD.decode(encoded).map_err(|_| base64_error())?;
    let len = bytes.len();
    let bytes: [u8; N] = bytes.try_into().map_err(|_| SigningError::WrongLength {
        what,
        name: name.to_owned(),
        len,
        expected: N,
    })?;
    Ok((name.to_owned(), bytes))
}

/// An ed25519 secret key with its name.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate(name: &str) -> Result<Self, SigningError> {
        check_key_name("secret key", name)?;
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        })
    }

    /// Parses `name:base64(seed || public)` as `nix key generate-secret`
    /// writes it, checking that the public half belongs to the seed.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let (name, bytes) = split_and_decode::<64>("secret key", text.trim_end())?;
        let key = SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SigningError::MismatchedPublicKey { name: name.clone() })?;
        Ok(Self { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The key in Nix's secret key file format. Deliberately a named
    /// method rather than `Display`, so it is not printed by accident.
    pub fn to_nix_secret_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.to_keypair_bytes())
        )
    }

    /// Signs `message` (normally a [`fingerprint`]).
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .field(
                "public",
                &STANDARD.encode(self.key.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

/// An ed25519 public key with its name, as in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64(public)`.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let (name, bytes) = split_and_decode::<32>("public key", text.trim_end())?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SigningError::InvalidPublicKey { name: name.clone() })?;
        Ok(Self { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `signature` was made over `message` by this key (and names
    /// it). Strict verification rejects malleable and small-order forms, as
    /// libsodium (which Nix uses) does.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        signature.key_name == self.name
            && self
                .key
                .verify_strict(
                    message,
                    &ed25519_dalek::Signature::from_bytes(&signature.bytes),
                )
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = SigningError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// A signature line value: `name:base64(signature)`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let (key_name, bytes) = split_and_decode::<64>("signature", text)?;
        Ok(Self { key_name, bytes })
    }

    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    pub fn bytes(&self) -> &[u8; 64] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, STANDARD.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = SigningError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Signatures order by their text, as in Nix's `std::set<std::string>`,
/// which decides the order of `Sig:` lines.
impl Ord for Signature {
    fn cmp(&self, other: &Self) -> Ordering {
        self.to_string().cmp(&other.to_string())
    }
}

impl PartialOrd for Signature {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The message Nix signs for a store path:
/// `1;<full path>;<NarHash as sha256:base32>;<NarSize>;<full reference paths joined by ,>`.
/// References are sorted, as Nix keeps them in a sorted set.
pub fn fingerprint<'a>(
    store_dir: &StoreDir,
    store_path: &StorePath,
    nar_hash: &NarHash,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> String {
    let mut references: Vec<&StorePath> = references.into_iter().collect();
    references.sort();
    references.dedup();
    let references: Vec<String> = references
        .into_iter()
        .map(|reference| reference.to_full_path(store_dir))
        .collect();
    format!(
        "1;{};{};{};{}",
        store_path.to_full_path(store_dir),
        nar_hash,
        nar_size,
        references.join(",")
    )
}

/// Whether any of `signatures` over `message` is valid for any of the
/// `trusted` keys (matched by key name, as Nix does).
pub fn verify_any<'a>(
    trusted: &[PublicKey],
    message: &[u8],
    signatures: impl IntoIterator<Item = &'a Signature>,
) -> bool {
    signatures.into_iter().any(|signature| {
        trusted
            .iter()
            .filter(|key| key.name == signature.key_name)
            .any(|key| key.verify(message, signature))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix key generate-secret --key-name test-cache-1` and
    // `nix key convert-secret-to-public` (Nix 2.8).
    const SECRET: &str = "test-cache-1:OdpF8WH0p6B1wLPHp6o+9p8s1cLK4oX3A6g+MhRFMStepAfUNV3S7I8svOQD8+CT7oT1hxzqmD1BdGGwCU901A==";
    const PUBLIC: &str = "test-cache-1:XqQH1DVd0uyPLLzkA/Pgk+6E9Ycc6pg9QXRhsAlPdNQ=";

    #[test]
    fn parses_nix_keys() {
        let secret = SecretKey::parse(SECRET).unwrap();
        assert_eq!(secret.name(), "test-cache-1");
        assert_eq!(secret.to_public().to_string(), PUBLIC);
        assert_eq!(secret.to_nix_secret_string(), SECRET);
        assert_eq!(PublicKey::parse(PUBLIC).unwrap(), secret.to_public());
        // A trailing newline, as in key files, is fine.
        assert!(SecretKey::parse(&format!("{SECRET}\n")).is_ok());
    }

    #[test]
    fn debug_hides_the_secret() {
        let secret = SecretKey::parse(SECRET).unwrap();
        let debug = format!("{secret:?}");
        let seed = &SECRET["test-cache-1:".len()..][..20];
        assert!(!debug.contains(seed), "{debug}");
        assert!(debug.contains("test-cache-1"));
    }

    #[test]
    fn rejects_bad_keys() {
        // The public half of another key.
        let mut bytes = STANDARD.decode(&SECRET["test-cache-1:".len()..]).unwrap();
        bytes[40] ^= 1;
        let tampered = format!("test-cache-1:{}", STANDARD.encode(&bytes));
        assert_eq!(
            SecretKey::parse(&tampered).unwrap_err(),
            SigningError::MismatchedPublicKey {
                name: "test-cache-1".into()
            }
        );
        assert!(matches!(
            SecretKey::parse("no-colon"),
            Err(SigningError::MissingName { .. })
        ));
        assert!(matches!(
            SecretKey::parse(":AAAA"),
            Err(SigningError::InvalidName { .. })
        ));
        assert!(matches!(
            SecretKey::parse("a b:AAAA"),
            Err(SigningError::InvalidName { .. })
        ));
        assert!(matches!(
            SecretKey::parse("k:!!!"),
            Err(SigningError::Base64 { .. })
        ));
        assert!(matches!(
            SecretKey::parse(PUBLIC),
            Err(SigningError::WrongLength { len: 32, .. })
        ));
        assert!(matches!(
            PublicKey::parse(SECRET),
            Err(SigningError::Base64 { .. } | SigningError::WrongLength { .. })
        ));
        assert!(SecretKey::generate("bad name").is_err());
    }

    #[test]
    fn signs_and_verifies() {
        let secret = SecretKey::generate("larder-test-1").unwrap();
        let public = secret.to_public();
        let signature = secret.sign(b"message");
        assert!(public.verify(b"message", &signature));
        assert!(!public.verify(b"massage", &signature));
        let reparsed = Signature::parse(&signature.to_string()).unwrap();
        assert_eq!(reparsed, signature);
        // Another key of the same name does not verify it.
        let other = SecretKey::generate("larder-test-1").unwrap().to_public();
        assert!(!other.verify(b"message", &signature));
        assert!(verify_any(
            &[other.clone(), public.clone()],
            b"message",
            [&signature]
        ));
        assert!(!verify_any(&[other], b"message", [&signature]));
        // A key with another name is not consulted.
        let renamed = PublicKey::parse(&public.to_string().replace("larder-test-1", "x")).unwrap();
        assert!(!verify_any(&[renamed], b"message", [&signature]));
    }

    #[test]
    fn reproduces_a_nix_signature() {
        // `nix copy --to 'file://…?secret-key=…'` signed this path with
        // SECRET. ed25519 is deterministic, so we must produce the same bytes.
        const NIX_SIG: &str = "test-cache-1:WjLaPnNU1LhirB9Xz57gEgx+pfYd6USBEmnysSCL5pz4dt4KZCrV9mONQ/Bg8pTcjxAww+NpLoWMEPimScIkBg==";
        let secret = SecretKey::parse(SECRET).unwrap();
        let store_dir = StoreDir::default();
        let path = StorePath::from_base_name("81wvp5rwhzykzrpk4xx2mkbz79mh5b4n-b.txt").unwrap();
        let reference =
            StorePath::from_base_name("na40g9sk11kbclg4qi0gh9hx0k8hll3m-src.c").unwrap();
        let nar_hash =
            NarHash::parse("sha256:1ni2xlxwxmzqn8mvmsv9n6isn9r2915ycwa4pmmgxacbz6s027bq").unwrap();
        let message = fingerprint(&store_dir, &path, &nar_hash, 168, [&reference]);
        assert_eq!(
            message,
            "1;/nix/store/81wvp5rwhzykzrpk4xx2mkbz79mh5b4n-b.txt;\
sha256:1ni2xlxwxmzqn8mvmsv9n6isn9r2915ycwa4pmmgxacbz6s027bq;168;\
/nix/store/na40g9sk11kbclg4qi0gh9hx0k8hll3m-src.c"
        );
        assert_eq!(secret.sign(message.as_bytes()).to_string(), NIX_SIG);
        let nix_signature = Signature::parse(NIX_SIG).unwrap();
        let public = PublicKey::parse(PUBLIC).unwrap();
        assert!(public.verify(message.as_bytes(), &nix_signature));
        assert!(!public.verify(message.replace(";168;", ";169;").as_bytes(), &nix_signature));
    }

    #[test]
    fn fingerprint_sorts_references() {
        let store_dir = StoreDir::default();
        let a = StorePath::from_base_name("00000000000000000000000000000000-a").unwrap();
        let b = StorePath::from_base_name("11111111111111111111111111111111-b").unwrap();
        let hash =
            NarHash::parse("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap();
        let message = fingerprint(&store_dir, &a, &hash, 8, [&b, &a]);
        assert!(message.ends_with(";8;/nix/store/00000000000000000000000000000000-a,/nix/store/11111111111111111111111111111111-b"));
        assert!(fingerprint(&store_dir, &a, &hash, 8, []).ends_with(";8;"));
    }

    #[test]
    fn signatures_order_by_text() {
        let secret = SecretKey::generate("a").unwrap();
        let dashed = SecretKey::generate("a-").unwrap();
        let mut sigs = [secret.sign(b"m"), dashed.sign(b"m")];
        sigs.sort();
        // "a-:" < "a:" bytewise.
        assert_eq!(sigs[0].key_name(), "a-");
    }
}
