//! The keys tokens are signed and verified with.
//!
//! The operator configures one secret, and everything else follows from it:
//!
//! - **HS256**: a base64 secret of at least 32 bytes (`openssl rand -base64
//!   32`). The same bytes sign and verify.
//! - **RS256**: an RSA private key of at least 2048 bits in PEM, PKCS#8
//!   (`BEGIN PRIVATE KEY`, what `openssl genrsa` writes) or PKCS#1 (`BEGIN
//!   RSA PRIVATE KEY`). The public half is derived from it, so there is no
//!   second file to keep in step. A process that should verify but never
//!   mint can instead be given the public key alone
//!   ([`TokenVerifyingKey::rs256_from_public_pem`]).
//!
//! Key material never appears in `Debug` output or in error messages.
//!
//! RS256 uses the pure-Rust `rsa` crate (through jsonwebtoken's RustCrypto
//! backend). Its private-key operations are not fully constant-time
//! (RUSTSEC-2023-0071, no fixed release yet): the private key is used only
//! to mint, which should stay an operator action and not something any
//! client can trigger at will, while verifying a presented token uses only
//! the public key. HS256 has no such caveat and is the simpler default.

use std::fmt;
use std::str::FromStr;

use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::claims::Claims;

/// Shortest HS256 secret accepted: as long as the hash output, the size
/// RFC 7518 §3.2 requires.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Standard base64 that does not insist on padding, since secrets are
/// pasted into config files and environment variables by hand.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The JWS algorithms Larder signs tokens with. A server accepts exactly
/// the one it is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenAlgorithm {
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "RS256")]
    Rs256,
}

impl TokenAlgorithm {
    /// The name in the JWT header and in configuration.
    pub const fn name(self) -> &'static str {
        match self {
            TokenAlgorithm::Hs256 => "HS256",
            TokenAlgorithm::Rs256 => "RS256",
        }
    }

    pub(crate) const fn jwt(self) -> Algorithm {
        match self {
            TokenAlgorithm::Hs256 => Algorithm::HS256,
            TokenAlgorithm::Rs256 => Algorithm::RS256,
        }
    }
}

impl fmt::Display for TokenAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TokenAlgorithm {
    type Err = KeyError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.to_ascii_uppercase().as_str() {
            "HS256" => Ok(TokenAlgorithm::Hs256),
            "RS256" => Ok(TokenAlgorithm::Rs256),
            _ => Err(KeyError::UnsupportedAlgorithm(name.to_owned())),
        }
    }
}

/// Why configured key material cannot be used. No variant carries any of
/// the material itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("unsupported token algorithm {0:?}: expected HS256 or RS256")]
    UnsupportedAlgorithm(String),
    #[error("HS256 token secret is not valid base64")]
    SecretNotBase64,
    #[error("HS256 token secret is {length} bytes long; at least {MIN_HS256_SECRET_BYTES} are needed (make one with `openssl rand -base64 32`)")]
    SecretTooShort { length: usize },
    #[error("RS256 token key is not an RSA {part} key in PEM format")]
    NotRsaPem { part: &'static str },
    #[error("RS256 token key has {bits} bits; at least {MIN_RSA_BITS} are needed")]
    RsaKeyTooShort { bits: usize },
    #[error("RS256 token key failed its self-test: a token signed with it does not verify")]
    SelfTestFailed,
}

/// The key that mints tokens; it also knows how to verify them
/// ([`verifying_key`](Self::verifying_key)).
#[derive(Clone)]
pub struct TokenSigningKey {
    encoding: EncodingKey,
    verifying: TokenVerifyingKey,
}

impl TokenSigningKey {
    /// The key for `algorithm` from its configured secret: base64 bytes
    /// for HS256, a PEM private key for RS256.
    pub fn new(algorithm: TokenAlgorithm, secret: &str) -> Result<Self, KeyError> {
        match algorithm {
            TokenAlgorithm::Hs256 => Self::hs256_from_base64(secret),
            TokenAlgorithm::Rs256 => Self::rs256_from_pem(secret),
        }
    }

    /// An HS256 key from a base64 secret; surrounding whitespace and
    /// missing padding are tolerated.
    pub fn hs256_from_base64(secret: &str) -> Result<Self, KeyError> {
        let bytes = LENIENT_BASE64
            .decode(secret.trim())
            .map_err(|_| KeyError::SecretNotBase64)?;
        Self::hs256(&bytes)
    }

    /// An HS256 key from raw secret bytes.
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_HS256_SECRET_BYTES {
            return Err(KeyError::SecretTooShort {
                length: secret.len(),
            });
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            verifying: TokenVerifyingKey {
                algorithm: TokenAlgorithm::Hs256,
                decoding: DecodingKey::from_secret(secret),
            },
        })
    }

    /// An RS256 key from a PEM private key, with its public half derived.
    /// The key is checked by signing and verifying once, so that a bad
    /// key fails at start-up rather than on the first mint.
    pub fn rs256_from_pem(private_key_pem: &str) -> Result<Self, KeyError> {
        let not_rsa = KeyError::NotRsaPem { part: "private" };
        let encoding =
            EncodingKey::from_rsa_pem(private_key_pem.as_bytes()).map_err(|_| not_rsa.clone())?;
        // The JWK of a private key holds only its public half (n, e).
        let jwk =
            Jwk::from_encoding_key(&encoding, Algorithm::RS256).map_err(|_| not_rsa.clone())?;
        let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
            return Err(not_rsa);
        };
        let modulus = URL_SAFE_NO_PAD
            .decode(&rsa.n)
            .map_err(|_| not_rsa.clone())?;
        check_modulus_bits(&modulus)?;
        let decoding = DecodingKey::from_jwk(&jwk).map_err(|_| not_rsa)?;

        let key = Self {
            encoding,
            verifying: TokenVerifyingKey {
                algorithm: TokenAlgorithm::Rs256,
                decoding,
            },
        };
        key.self_test()?;
        Ok(key)
    }

    pub fn algorithm(&self) -> TokenAlgorithm {
        self.verifying.algorithm
    }

    /// The key that verifies this key's tokens.
    pub fn verifying_key(&self) -> &TokenVerifyingKey {
        &self.verifying
    }

    /// Signs `claims` into a compact JWT. Only minting calls it, so that
    /// every token this module signs went through the builder's checks.
    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(self.algorithm().jwt()), claims, &self.encoding)
    }

    fn self_test(&self) -> Result<(), KeyError> {
        let message = b"larder token key self-test";
        let algorithm = self.algorithm().jwt();
        let signature = jsonwebtoken::crypto::sign(message, &self.encoding, algorithm)
            .map_err(|_| KeyError::SelfTestFailed)?;
        match jsonwebtoken::crypto::verify(&signature, message, &self.verifying.decoding, algorithm)
        {
            Ok(true) => Ok(()),
            _ => Err(KeyError::SelfTestFailed),
        }
    }
}

impl fmt::Debug for TokenSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigningKey")
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

/// The key that verifies tokens. For HS256 it is the shared secret, so it
/// is as sensitive as the signing key.
#[derive(Clone)]
pub struct TokenVerifyingKey {
    algorithm: TokenAlgorithm,
    decoding: DecodingKey,
}

impl TokenVerifyingKey {
    /// An RS256 verifying key from a PEM public key (`BEGIN PUBLIC KEY` or
    /// `BEGIN RSA PUBLIC KEY`), for a process that must not mint.
    pub fn rs256_from_public_pem(public_key_pem: &str) -> Result<Self, KeyError> {
        let not_rsa = KeyError::NotRsaPem { part: "public" };
        let decoding =
            DecodingKey::from_rsa_pem(public_key_pem.as_bytes()).map_err(|_| not_rsa.clone())?;
        // jsonwebtoken keeps a PEM public key as its PKCS#1 DER.
        let modulus = pkcs1_public_key_modulus(decoding.as_bytes()).ok_or(not_rsa)?;
        check_modulus_bits(modulus)?;
        Ok(Self {
            algorithm: TokenAlgorithm::Rs256,
            decoding,
        })
    }

    pub fn algorithm(&self) -> TokenAlgorithm {
        self.algorithm
    }

    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }
}

impl fmt::Debug for TokenVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifyingKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

fn check_modulus_bits(modulus: &[u8]) -> Result<(), KeyError> {
    let modulus = match modulus.iter().position(|&byte| byte != 0) {
        Some(first_nonzero) => &modulus[first_nonzero..],
        None => &[],
    };
    let bits = match modulus.first() {
        Some(&top) => (modulus.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if bits < MIN_RSA_BITS {
        return Err(KeyError::RsaKeyTooShort { bits });
    }
    Ok(())
}

/// The modulus of a DER `RSAPublicKey ::= SEQUENCE { modulus INTEGER,
/// publicExponent INTEGER }` (RFC 8017 A.1.1), or `None` if the bytes are
/// not shaped like one. Only the key size is wanted from it, which does not
/// justify an ASN.1 dependency.
fn pkcs1_public_key_modulus(der: &[u8]) -> Option<&[u8]> {
    let (tag, sequence, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, modulus, _) = der_element(sequence)?;
    (tag == 0x02).then_some(modulus)
}

/// Splits one DER element off `input`: its tag, its contents and what
/// follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first_length_byte, rest) = rest.split_first()?;
    let (length, rest) = if first_length_byte < 0x80 {
        (usize::from(first_length_byte), rest)
    } else {
        // Long form: the low bits say how many big-endian length bytes follow.
        let n_length_bytes = usize::from(first_length_byte & 0x7f);
        if n_length_bytes == 0 || n_length_bytes > std::mem::size_of::<usize>() {
            return None;
        }
        let (length_bytes, rest) = rest.split_at_checked(n_length_bytes)?;
        let length = length_bytes
            .iter()
            .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
        (length, rest)
    };
    let (contents, after) = rest.split_at_checked(length)?;
    Some((tag, contents, after))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const RSA_PKCS8: &str = include_str!("testdata/rsa-2048-pkcs8.pem");
    pub(crate) const RSA_PKCS8_PUBLIC: &str = include_str!("testdata/rsa-2048-pkcs8.pub.pem");
    pub(crate) const RSA_PKCS1_OTHER: &str = include_str!("testdata/rsa-2048-pkcs1.pem");
    const RSA_1024: &str = include_str!("testdata/rsa-1024.pem");

    /// 32 bytes of 0x2a, base64.
    pub(crate) const HS_SECRET: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

    #[test]
    fn hs256_secrets_are_checked() {
        assert!(TokenSigningKey::hs256_from_base64(HS_SECRET).is_ok());
        // Unpadded and surrounded by a newline, as pasted into a file.
        assert!(TokenSigningKey::hs256_from_base64(&format!(
            "{}\n",
            HS_SECRET.trim_end_matches('=')
        ))
        .is_ok());
        assert_eq!(
            TokenSigningKey::hs256_from_base64("not base64!").unwrap_err(),
            KeyError::SecretNotBase64
        );
        assert_eq!(
            TokenSigningKey::hs256_from_base64("c2hvcnQ=").unwrap_err(),
            KeyError::SecretTooShort { length: 5 }
        );
    }

    #[test]
    fn rs256_keys_load_in_both_pem_forms() {
        let key = TokenSigningKey::rs256_from_pem(RSA_PKCS8).expect("PKCS#8 key loads");
        assert_eq!(key.algorithm(), TokenAlgorithm::Rs256);
        let key = TokenSigningKey::rs256_from_pem(RSA_PKCS1_OTHER).expect("PKCS#1 key loads");
        assert_eq!(key.verifying_key().algorithm(), TokenAlgorithm::Rs256);
        let public =
            TokenVerifyingKey::rs256_from_public_pem(RSA_PKCS8_PUBLIC).expect("public key loads");
        assert_eq!(public.algorithm(), TokenAlgorithm::Rs256);
    }

    #[test]
    fn rs256_rejects_short_and_non_rsa_keys() {
        assert_eq!(
            TokenSigningKey::rs256_from_pem(RSA_1024).unwrap_err(),
            KeyError::RsaKeyTooShort { bits: 1024 }
        );
        assert_eq!(
            TokenSigningKey::rs256_from_pem("garbage").unwrap_err(),
            KeyError::NotRsaPem { part: "private" }
        );
        // A public key where the private key belongs.
        assert_eq!(
            TokenSigningKey::rs256_from_pem(RSA_PKCS8_PUBLIC).unwrap_err(),
            KeyError::NotRsaPem { part: "private" }
        );
        assert_eq!(
            TokenVerifyingKey::rs256_from_public_pem("garbage").unwrap_err(),
            KeyError::NotRsaPem { part: "public" }
        );
    }

    #[test]
    fn debug_and_errors_never_show_key_material() {
        let key = TokenSigningKey::hs256_from_base64(HS_SECRET).expect("valid secret");
        let debug = format!("{key:?} {:?}", key.verifying_key());
        assert_eq!(
            debug,
            "TokenSigningKey { algorithm: Hs256, .. } TokenVerifyingKey { algorithm: Hs256, .. }"
        );
        let error = TokenSigningKey::hs256_from_base64("c2VjcmV0").unwrap_err();
        assert!(!error.to_string().contains("c2VjcmV0"));
        assert!(!error.to_string().contains("secret\""));
    }

    #[test]
    fn algorithm_names_parse_from_config() {
        assert_eq!("HS256".parse::<TokenAlgorithm>(), Ok(TokenAlgorithm::Hs256));
        assert_eq!("rs256".parse::<TokenAlgorithm>(), Ok(TokenAlgorithm::Rs256));
        assert!("none".parse::<TokenAlgorithm>().is_err());
        assert_eq!(
            serde_json::to_string(&TokenAlgorithm::Rs256).expect("serialises"),
            "\"RS256\""
        );
        let key = TokenSigningKey::new(TokenAlgorithm::Hs256, HS_SECRET).expect("valid secret");
        assert_eq!(key.algorithm(), TokenAlgorithm::Hs256);
    }

    #[test]
    fn der_lengths_are_bounded() {
        // A SEQUENCE claiming more bytes than there are.
        assert_eq!(pkcs1_public_key_modulus(&[0x30, 0x05, 0x02, 0x01]), None);
        assert_eq!(pkcs1_public_key_modulus(&[0x30, 0x89, 0xff]), None);
        assert_eq!(
            pkcs1_public_key_modulus(&[0x30, 0x06, 0x02, 0x01, 0x07, 0x02, 0x01, 0x03]),
            Some(&[0x07][..])
        );
    }
}
