//! Nix's base-32 encoding, used for store path hashes and narinfo hashes.
//!
//! It is not RFC 4648: the alphabet omits `e`, `o`, `u` and `t`, and Nix
//! reads the input as one little-endian bit string and emits 5-bit digits
//! starting from the most significant end. A 32-byte SHA-256 becomes 52
//! characters and a 20-byte store path hash 32 characters. The test vectors
//! below were produced by `nix-hash --to-base32` from Nix 2.8.

use thiserror::Error;

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Maps an ASCII byte to its digit value, or `0xff` when it is not a digit.
const DECODE_TABLE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut digit = 0;
    while digit < ALPHABET.len() {
        table[ALPHABET[digit] as usize] = digit as u8;
        digit += 1;
    }
    table
};

/// Why a string is not the base-32 form of the expected number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Base32Error {
    #[error("base-32 string has {actual} characters, expected {expected}")]
    WrongLength { expected: usize, actual: usize },
    #[error("invalid base-32 character {character:?} at position {position}")]
    InvalidCharacter { character: char, position: usize },
    #[error("base-32 string encodes more than {n_bytes} bytes (non-zero overflow bits)")]
    Overflow { n_bytes: usize },
}

/// The number of base-32 characters Nix uses for `n_bytes` bytes.
pub const fn encoded_len(n_bytes: usize) -> usize {
    if n_bytes == 0 {
        0
    } else {
        (n_bytes * 8 - 1) / 5 + 1
    }
}

/// Whether `byte` is one of the 32 digits.
pub fn is_base32_char(byte: u8) -> bool {
    DECODE_TABLE[byte as usize] != 0xff
}

/// Encodes `bytes` the way Nix prints hashes.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    // Digit `n` holds bits `5n .. 5n+5` of the little-endian bit string;
    // Nix writes the highest digit first.
    for n in (0..len).rev() {
        let bit = n * 5;
        let byte_index = bit / 8;
        let shift = bit % 8;
        let low = u16::from(bytes[byte_index]) >> shift;
        let high = bytes
            .get(byte_index + 1)
            .map_or(0, |&next| u16::from(next) << (8 - shift));
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

/// Decodes `text` into exactly `out.len()` bytes, strictly: the length must
/// be the one Nix would print, every character must be a digit, and bits
/// beyond `out.len()` bytes must be zero (so every value has one spelling).
pub fn decode_into(text: &[u8], out: &mut [u8]) -> Result<(), Base32Error> {
    let expected = encoded_len(out.len());
    if text.len() != expected {
        return Err(Base32Error::WrongLength {
            expected,
            actual: text.len(),
        });
    }
    out.fill(0);
    for (position, &character) in text.iter().enumerate() {
        let digit = DECODE_TABLE[usize::from(character)];
        if digit == 0xff {
            return Err(Base32Error::InvalidCharacter {
                character: char::from(character),
                position,
            });
        }
        // The last character is digit 0.
        let n = expected - 1 - position;
        let bit = n * 5;
        let byte_index = bit / 8;
        let shift = bit % 8;
        let value = u16::from(digit) << shift;
        // Truncation is intended: the low 8 bits belong to this byte and the
        // rest carries into the next one.
        out[byte_index] |= (value & 0xff) as u8;
        let carry = (value >> 8) as u8;
        match out.get_mut(byte_index + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return Err(Base32Error::Overflow { n_bytes: out.len() }),
            None => {}
        }
    }
    Ok(())
}

/// Decodes `text` into an array of `N` bytes; see [`decode_into`].
pub fn decode_array<const N: usize>(text: &[u8]) -> Result<[u8; N], Base32Error> {
    let mut out = [0u8; N];
    decode_into(text, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (hex, base-32) pairs printed by `nix-hash --type sha256|sha1|md5 --to-base32 HEX`.
    const VECTORS: &[(&str, &str)] = &[
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0000000000000000000000000000000000000000000000000000",
        ),
        (
            "0100000000000000000000000000000000000000000000000000000000000000",
            "0000000000000000000000000000000000000000000000000001",
        ),
        (
            "00000000000000000000000000000000000000000000000000000000000000ff",
            "1zq0000000000000000000000000000000000000000000000000",
        ),
        (
            "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "1zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ),
        (
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        ),
        (
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        ),
        (
            "0123456789abcdef0123456789abcdef01234567",
            "cx2j60ggrnmqjrs54c0yzkdbi5kla8q1",
        ),
        (
            "ffffffffffffffffffffffffffffffffffffffff",
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ),
        (
            "0000000000000000000000000000000000000001",
            "04000000000000000000000000000000",
        ),
        (
            "d41d8cd98f00b204e9800998ecf8427e",
            "3y8bwfr609h3lh9ch0izcqq7fl",
        ),
    ];

    #[test]
    fn matches_nix_vectors() {
        for (hex_text, base32_text) in VECTORS {
            let bytes = hex::decode(hex_text).unwrap();
            assert_eq!(&encode(&bytes), base32_text, "encoding {hex_text}");
            let mut decoded = vec![0u8; bytes.len()];
            decode_into(base32_text.as_bytes(), &mut decoded).unwrap();
            assert_eq!(decoded, bytes, "decoding {base32_text}");
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        assert_eq!(encode(&[]), "");
    }

    #[test]
    fn rejects_wrong_length() {
        assert_eq!(
            decode_array::<32>(b"000"),
            Err(Base32Error::WrongLength {
                expected: 52,
                actual: 3
            })
        );
    }

    #[test]
    fn rejects_bad_characters() {
        // `e`, `o`, `u` and `t` are not in the alphabet, nor are capitals.
        for bad in [b'e', b'o', b'u', b't', b'A', b'-', 0, 0xff] {
            let mut text = *b"00000000000000000000000000000000";
            text[5] = bad;
            assert_eq!(
                decode_array::<20>(&text),
                Err(Base32Error::InvalidCharacter {
                    character: char::from(bad),
                    position: 5
                })
            );
        }
    }

    #[test]
    fn rejects_overflow_bits() {
        // 52 digits hold 260 bits; the top 4 must be zero, so the first
        // digit is at most `1` (Nix: "invalid base-32 hash").
        let text = "2zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";
        assert_eq!(
            decode_array::<32>(text.as_bytes()),
            Err(Base32Error::Overflow { n_bytes: 32 })
        );
        let text = "10000000000000000000000000000000000000000000000000000";
        assert!(decode_array::<32>(&text.as_bytes()[..52]).is_ok());
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = encode(&bytes);
            prop_assert_eq!(text.len(), encoded_len(bytes.len()));
            let mut decoded = vec![0u8; bytes.len()];
            decode_into(text.as_bytes(), &mut decoded).unwrap();
            prop_assert_eq!(decoded, bytes);
        }

        #[test]
        fn decoding_never_panics(text in proptest::collection::vec(any::<u8>(), 0..60)) {
            let _ = decode_array::<32>(&text);
            let _ = decode_array::<20>(&text);
        }

        #[test]
        fn every_accepted_string_is_canonical(text in "[0-9a-z]{52}") {
            if let Ok(bytes) = decode_array::<32>(text.as_bytes()) {
                prop_assert_eq!(encode(&bytes), text);
            }
        }
    }
}
