//! `.narinfo` files: parsing and rendering byte for byte as Nix 2.8 does.
//!
//! Nix writes the fields in a fixed order (`StorePath`, `URL`,
//! `Compression`, `FileHash`, `FileSize`, `NarHash`, `NarSize`,
//! `References`, `Deriver`, `System`, one `Sig` per signature, `CA`), keeps
//! the space after `References:` when there are none, sorts references and
//! signatures (they live in sorted sets) and ends with a newline. The parser
//! ignores fields it does not know, as Nix does.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::hash::{HashError, NarHash, Sha256Hash};
use super::signing::{self, PublicKey, SecretKey, Signature, SigningError};
use super::store_path::{StoreDir, StorePath, StorePathError};

/// The compression of the file at `URL`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
    Brotli,
    /// Anything else Nix might name (`gzip`, `lz4`, …), kept verbatim.
    Other(String),
}

impl Compression {
    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Brotli => "br",
            Self::Other(other) => other,
        }
    }

    /// The file name extension Nix uses for NARs in this compression.
    pub fn nar_extension(&self) -> String {
        match self {
            Self::None => ".nar".to_owned(),
            Self::Xz => ".nar.xz".to_owned(),
            Self::Zstd => ".nar.zst".to_owned(),
            Self::Bzip2 => ".nar.bz2".to_owned(),
            Self::Brotli => ".nar.br".to_owned(),
            Self::Other(other) => format!(".nar.{other}"),
        }
    }
}

impl FromStr for Compression {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "none" => Self::None,
            "xz" => Self::Xz,
            "zstd" => Self::Zstd,
            "bzip2" => Self::Bzip2,
            "br" => Self::Brotli,
            other => Self::Other(other.to_owned()),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a narinfo could not be parsed. Line numbers start at 1.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarInfoError {
    #[error("narinfo line {line} is not `Key: value`")]
    MalformedLine { line: usize },
    #[error("narinfo has no {field} field")]
    MissingField { field: &'static str },
    #[error("narinfo line {line}: {field} appears more than once")]
    DuplicateField { field: &'static str, line: usize },
    #[error("narinfo line {line}: {field} is empty")]
    EmptyValue { field: &'static str, line: usize },
    #[error("narinfo line {line}: invalid {field}")]
    InvalidStorePath {
        field: &'static str,
        line: usize,
        #[source]
        source: StorePathError,
    },
    #[error("narinfo line {line}: invalid {field}")]
    InvalidHash {
        field: &'static str,
        line: usize,
        #[source]
        source: HashError,
    },
    #[error("narinfo line {line}: {field} {value:?} is not a number")]
    InvalidNumber {
        field: &'static str,
        line: usize,
        value: String,
    },
    #[error("narinfo line {line}: invalid Sig")]
    InvalidSignature {
        line: usize,
        #[source]
        source: SigningError,
    },
    #[error("narinfo line {line}: {field} contains a control character")]
    ControlCharacter { field: &'static str, line: usize },
}

/// Everything a narinfo says about one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache root.
    pub url: String,
    pub compression: Compression,
    /// The hash and size of the file at `url`.
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// Sorted, as Nix keeps them.
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    /// Sorted by their text, as Nix keeps them.
    pub signatures: BTreeSet<Signature>,
    /// The content address (`fixed:r:sha256:…`, `text:sha256:…`), verbatim.
    pub ca: Option<String>,
}

/// Field values are the text after `Key: `; a value holding a line break
/// would split into two lines, so free-text values must not contain one.
fn check_text(field: &'static str, line: usize, value: &str) -> Result<(), NarInfoError> {
    if value.chars().any(char::is_control) {
        return Err(NarInfoError::ControlCharacter { field, line });
    }
    Ok(())
}

fn parse_number(field: &'static str, line: usize, value: &str) -> Result<u64, NarInfoError> {
    let invalid = || NarInfoError::InvalidNumber {
        field,
        line,
        value: value.chars().take(40).collect(),
    };
    // `u64::from_str` also takes a leading `+`; Nix never writes one.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    value.parse().map_err(|_| invalid())
}

impl NarInfo {
    /// Parses a narinfo whose paths live in `store_dir`.
    ///
    /// Like Nix: unknown fields are ignored, a missing `Compression` means
    /// `bzip2`, and `Deriver: unknown-deriver` means none. Unlike Nix, which
    /// lets a repeated field override the earlier one, a repeated field
    /// other than `Sig` is an error: no writer produces one, and two values
    /// for the same path would be ambiguous. A missing final newline is
    /// accepted.
    pub fn parse(text: &str, store_dir: &StoreDir) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut signatures = BTreeSet::new();
        let mut ca = None;

        let body = text.strip_suffix('\n').unwrap_or(text);
        for (index, line_text) in body.split('\n').enumerate() {
            let line = index + 1;
            let (key, value) = line_text
                .split_once(": ")
                .or_else(|| {
                    // `References:` with nothing after it has lost its space;
                    // Nix's own parser would mis-read it, but it is harmless.
                    line_text.strip_suffix(':').map(|key| (key, ""))
                })
                .ok_or(NarInfoError::MalformedLine { line })?;

            /// Stores a field's value, refusing a second one.
            fn set<T>(
                slot: &mut Option<T>,
                field: &'static str,
                line: usize,
                value: T,
            ) -> Result<(), NarInfoError> {
                if slot.is_some() {
                    return Err(NarInfoError::DuplicateField { field, line });
                }
                *slot = Some(value);
                Ok(())
            }
            let store_path_error = |field| {
                move |source| NarInfoError::InvalidStorePath {
                    field,
                    line,
                    source,
                }
            };
            let hash_error = |field| {
                move |source| NarInfoError::InvalidHash {
                    field,
                    line,
                    source,
                }
            };
            let non_empty = |field: &'static str| {
                if value.is_empty() {
                    Err(NarInfoError::EmptyValue { field, line })
                } else {
                    check_text(field, line, value)
                }
            };

            match key {
                "StorePath" => {
                    let path = store_dir
                        .parse_path(value)
                        .map_err(store_path_error("StorePath"))?;
                    set(&mut store_path, "StorePath", line, path)?;
                }
                "URL" => {
                    non_empty("URL")?;
                    set(&mut url, "URL", line, value.to_owned())?;
                }
                "Compression" => {
                    non_empty("Compression")?;
                    let parsed = match value.parse::<Compression>() {
                        Ok(compression) => compression,
                        Err(never) => match never {},
                    };
                    set(&mut compression, "Compression", line, parsed)?;
                }
                "FileHash" => {
                    let hash = Sha256Hash::parse(value).map_err(hash_error("FileHash"))?;
                    set(&mut file_hash, "FileHash", line, hash)?;
                }
                "FileSize" => {
                    let size = parse_number("FileSize", line, value)?;
                    set(&mut file_size, "FileSize", line, size)?;
                }
                "NarHash" => {
                    let hash = NarHash::parse(value).map_err(hash_error("NarHash"))?;
                    set(&mut nar_hash, "NarHash", line, hash)?;
                }
                "NarSize" => {
                    let size = parse_number("NarSize", line, value)?;
                    set(&mut nar_size, "NarSize", line, size)?;
                }
                "References" => {
                    let parsed = value
                        .split(' ')
                        .filter(|reference| !reference.is_empty())
                        .map(StorePath::from_base_name)
                        .collect::<Result<BTreeSet<_>, _>>()
                        .map_err(store_path_error("References"))?;
                    set(&mut references, "References", line, parsed)?;
                }
                "Deriver" => {
                    let parsed = if value == "unknown-deriver" {
                        None
                    } else {
                        Some(
                            StorePath::from_base_name(value)
                                .map_err(store_path_error("Deriver"))?,
                        )
                    };
                    set(&mut deriver, "Deriver", line, parsed)?;
                }
                "System" => {
                    non_empty("System")?;
                    set(&mut system, "System", line, value.to_owned())?;
                }
                "Sig" => {
                    let signature = Signature::parse(value)
                        .map_err(|source| NarInfoError::InvalidSignature { line, source })?;
                    signatures.insert(signature);
                }
                "CA" => {
                    non_empty("CA")?;
                    set(&mut ca, "CA", line, value.to_owned())?;
                }
                _ => {}
            }
        }

        Ok(Self {
            store_path: store_path.ok_or(NarInfoError::MissingField { field: "StorePath" })?,
            url: url.ok_or(NarInfoError::MissingField { field: "URL" })?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::MissingField { field: "NarHash" })?,
            nar_size: nar_size.ok_or(NarInfoError::MissingField { field: "NarSize" })?,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            system,
            signatures,
            ca,
        })
    }

    /// The narinfo text, exactly as Nix writes it.
    pub fn render(&self, store_dir: &StoreDir) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let mut line = |key: &str, value: &dyn fmt::Display| {
            writeln!(out, "{key}: {value}").expect("writing to a String");
        };
        line("StorePath", &self.store_path.to_full_path(store_dir));
        line("URL", &self.url);
        line("Compression", &self.compression);
        if let Some(file_hash) = &self.file_hash {
            line("FileHash", file_hash);
        }
        if let Some(file_size) = self.file_size {
            line("FileSize", &file_size);
        }
        line("NarHash", &self.nar_hash);
        line("NarSize", &self.nar_size);
        let references: Vec<String> = self.references.iter().map(ToString::to_string).collect();
        line("References", &references.join(" "));
        if let Some(deriver) = &self.deriver {
            line("Deriver", deriver);
        }
        if let Some(system) = &self.system {
            line("System", system);
        }
        for signature in &self.signatures {
            line("Sig", signature);
        }
        if let Some(ca) = &self.ca {
            line("CA", ca);
        }
        out
    }

    /// The message signatures are made over.
    pub fn fingerprint(&self, store_dir: &StoreDir) -> String {
        signing::fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds a signature by `key` (an identical one is not duplicated).
    pub fn sign(&mut self, key: &SecretKey, store_dir: &StoreDir) {
        let signature = key.sign(self.fingerprint(store_dir).as_bytes());
        self.signatures.insert(signature);
    }

    /// Whether at least one signature is valid for one of `trusted`.
    pub fn verify(&self, trusted: &[PublicKey], store_dir: &StoreDir) -> bool {
        signing::verify_any(
            trusted,
            self.fingerprint(store_dir).as_bytes(),
            &self.signatures,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Written by `nix copy --to 'file://…?compression=none&secret-key=…'`.
    const TEXT_PATH: &str = "\
StorePath: /nix/store/81wvp5rwhzykzrpk4xx2mkbz79mh5b4n-b.txt
URL: nar/1ni2xlxwxmzqn8mvmsv9n6isn9r2915ycwa4pmmgxacbz6s027bq.nar
Compression: none
FileHash: sha256:1ni2xlxwxmzqn8mvmsv9n6isn9r2915ycwa4pmmgxacbz6s027bq
FileSize: 168
NarHash: sha256:1ni2xlxwxmzqn8mvmsv9n6isn9r2915ycwa4pmmgxacbz6s027bq
NarSize: 168
References: na40g9sk11kbclg4qi0gh9hx0k8hll3m-src.c
Sig: test-cache-1:WjLaPnNU1LhirB9Xz57gEgx+pfYd6USBEmnysSCL5pz4dt4KZCrV9mONQ/Bg8pTcjxAww+NpLoWMEPimScIkBg==
CA: text:sha256:15pmph3xjw4h167s1m61424zspk20mrs9qgg3aax4zm2ich0mqzv
";
    const PUBLIC: &str = "test-cache-1:XqQH1DVd0uyPLLzkA/Pgk+6E9Ycc6pg9QXRhsAlPdNQ=";

    /// From nix-client.md: a built output with a Deriver and xz compression.
    const BUILT: &str = "\
StorePath: /nix/store/42nz3hhz98ii98b2d6ri24navmv57jpg-built
URL: nar/0yp6nwghjvx1kd5h75fl8myc51xnhad4p54w3ng9z2k5cs4yihgz.nar.xz
Compression: xz
FileHash: sha256:0yp6nwghjvx1kd5h75fl8myc51xnhad4p54w3ng9z2k5cs4yihgz
FileSize: 172
NarHash: sha256:0sm9bccq8y5iz2i4c8842diyhpifg0vhfsidmvkcw2zqa1sq97ws
NarSize: 168
References: ss0xprzsdhbh3jcnm5vnvxb99wi0qcv0-c.sh
Deriver: gbrh1wdmawxj4sz20rzaqgb8kx30a6ds-built.drv
Sig: test-cache-1:KeQUgvuzAwSYU4NvdVn4cAqw+B7UXOaPmZmypUiv4RC1gtHsO7NXfQZBLU26XN8Sz6nIRgqMpRqm7DNvcfQCDQ==
";

    /// A source path with no references: `References: ` keeps its space.
    const NO_REFERENCES: &str = "\
StorePath: /nix/store/na40g9sk11kbclg4qi0gh9hx0k8hll3m-src.c
URL: nar/142bnyg6jgk3kysxmlibhrj536wcimvjq0dgzjx83lb5xvn0z4z9.nar
Compression: none
FileHash: sha256:142bnyg6jgk3kysxmlibhrj536wcimvjq0dgzjx83lb5xvn0z4z9
FileSize: 128
NarHash: sha256:142bnyg6jgk3kysxmlibhrj536wcimvjq0dgzjx83lb5xvn0z4z9
NarSize: 128
References: 
Sig: test-cache-1:5O4R1tBkGdN4ycuQiL4NTs6+5+ipyE4rNQqnZMSSg5kJQG86zwkAZ+OUK25BTWGBoFlwRuqYWMRA3+BwtymhAw==
CA: fixed:r:sha256:142bnyg6jgk3kysxmlibhrj536wcimvjq0dgzjx83lb5xvn0z4z9
";

    fn store_dir() -> StoreDir {
        StoreDir::default()
    }

    #[test]
    fn round_trips_nix_narinfos() {
        for text in [TEXT_PATH, BUILT, NO_REFERENCES] {
            let info = NarInfo::parse(text, &store_dir()).unwrap();
            assert_eq!(info.render(&store_dir()), text);
        }
        let built = NarInfo::parse(BUILT, &store_dir()).unwrap();
        assert_eq!(built.compression, Compression::Xz);
        assert_eq!(
            built.deriver.unwrap().to_string(),
            "gbrh1wdmawxj4sz20rzaqgb8kx30a6ds-built.drv"
        );
        assert_eq!(built.nar_size, 168);
        assert_eq!(built.file_size, Some(172));
        let none = NarInfo::parse(NO_REFERENCES, &store_dir()).unwrap();
        assert!(none.references.is_empty());
        assert!(none.render(&store_dir()).contains("\nReferences: \n"));
    }

    #[test]
    fn verifies_nix_signature_and_detects_tampering() {
        let trusted = [PublicKey::parse(PUBLIC).unwrap()];
        let info = NarInfo::parse(TEXT_PATH, &store_dir()).unwrap();
        assert!(info.verify(&trusted, &store_dir()));
        let tampered = NarInfo::parse(
            &TEXT_PATH.replace("NarSize: 168", "NarSize: 169"),
            &store_dir(),
        )
        .unwrap();
        assert!(!tampered.verify(&trusted, &store_dir()));
        let mut unreferenced = info.clone();
        unreferenced.references.clear();
        assert!(!unreferenced.verify(&trusted, &store_dir()));
        assert!(!info.verify(&[], &store_dir()));
    }

    #[test]
    fn signing_adds_one_sorted_line() {
        let key = SecretKey::generate("a-larder-1").unwrap();
        let mut info = NarInfo::parse(TEXT_PATH, &store_dir()).unwrap();
        info.sign(&key, &store_dir());
        info.sign(&key, &store_dir());
        assert_eq!(info.signatures.len(), 2);
        assert!(info.verify(&[key.to_public()], &store_dir()));
        let rendered = info.render(&store_dir());
        let sigs: Vec<&str> = rendered
            .lines()
            .filter(|l| l.starts_with("Sig: "))
            .collect();
        assert_eq!(sigs.len(), 2);
        assert!(sigs[0].starts_with("Sig: a-larder-1:"));
        // CA stays last.
        assert!(rendered.lines().last().unwrap().starts_with("CA: "));
    }

    #[test]
    fn tolerates_unknown_fields_and_defaults() {
        let text = "StorePath: /nix/store/na40g9sk11kbclg4qi0gh9hx0k8hll3m-src.c\n\
URL: nar/x.nar.bz2\nNarHash: sha256:142bnyg6jgk3kysxmlibhrj536wcimvjq0dgzjx83lb5xvn0z4z9\n\
NarSize: 128\nFutureField: whatever: it is\nDeriver: unknown-deriver\nReferences:";
        let info = NarInfo::parse(text, &store_dir()).unwrap();
        assert_eq!(info.compression, Compression::Bzip2);
        assert_eq!(info.deriver, None);
        assert!(info.references.is_empty());
        assert_eq!(info.file_hash, None);
        // Hex and SRI hashes are accepted and rendered canonically.
        let hex = NO_REFERENCES.replace(
            "NarHash: sha256:142bnyg6jgk3kysxmlibhrj536wcimvjq0dgzjx83lb5xvn0z4z9",
            &format!(
                "NarHash: sha256:{}",
                Sha256Hash::parse("sha256:142bnyg6jgk3kysxmlibhrj536wcimvjq0dgzjx83lb5xvn0z4z9")
                    .unwrap()
                    .to_hex()
            ),
        );
        assert_eq!(
            NarInfo::parse(&hex, &store_dir())
                .unwrap()
                .render(&store_dir()),
            NO_REFERENCES
        );
    }

    #[test]
    fn rejects_bad_narinfos() {
        type Check = fn(&NarInfoError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (
                TEXT_PATH.replace(
                    "StorePath: /nix/store/81wvp5rwhzykzrpk4xx2mkbz79mh5b4n-b.txt\n",
                    "",
                ),
                |e| matches!(e, NarInfoError::MissingField { field: "StorePath" }),
            ),
            (
                TEXT_PATH.replace(
                    "URL: nar/1ni2xlxwxmzqn8mvmsv9n6isn9r2915ycwa4pmmgxacbz6s027bq.nar\n",
                    "",
                ),
                |e| matches!(e, NarInfoError::MissingField { field: "URL" }),
            ),
            (
                TEXT_PATH.replace(
                    "NarHash: sha256:1ni2xlxwxmzqn8mvmsv9n6isn9r2915ycwa4pmmgxacbz6s027bq\n",
                    "",
                ),
                |e| matches!(e, NarInfoError::MissingField { field: "NarHash" }),
            ),
            (TEXT_PATH.replace("NarSize: 168\n", ""), |e| {
                matches!(e, NarInfoError::MissingField { field: "NarSize" })
            }),
            (TEXT_PATH.replace("NarSize: 168", "NarSize: 1x"), |e| {
                matches!(
                    e,
                    NarInfoError::InvalidNumber {
                        field: "NarSize",
                        line: 7,
                        ..
                    }
                )
            }),
            (TEXT_PATH.replace("NarSize: 168", "NarSize: +168"), |e| {
                matches!(e, NarInfoError::InvalidNumber { .. })
            }),
            (
                TEXT_PATH.replace("FileSize: 168", "FileSize: 99999999999999999999999"),
                |e| {
                    matches!(
                        e,
                        NarInfoError::InvalidNumber {
                            field: "FileSize",
                            ..
                        }
                    )
                },
            ),
            (
                TEXT_PATH.replace("NarHash: sha256:1", "NarHash: sha256:e"),
                |e| {
                    matches!(
                        e,
                        NarInfoError::InvalidHash {
                            field: "NarHash",
                            ..
                        }
                    )
                },
            ),
            (
                TEXT_PATH.replace("FileHash: sha256:", "FileHash: md5:"),
                |e| {
                    matches!(
                        e,
                        NarInfoError::InvalidHash {
                            field: "FileHash",
                            ..
                        }
                    )
                },
            ),
            (
                TEXT_PATH.replace("StorePath: /nix/store/", "StorePath: /gnu/store/"),
                |e| {
                    matches!(
                        e,
                        NarInfoError::InvalidStorePath {
                            field: "StorePath",
                            ..
                        }
                    )
                },
            ),
            (
                TEXT_PATH.replace("References: na40", "References: /nix/store/na40"),
                |e| {
                    matches!(
                        e,
                        NarInfoError::InvalidStorePath {
                            field: "References",
                            ..
                        }
                    )
                },
            ),
            (BUILT.replace("Deriver: gbrh", "Deriver: gbr"), |e| {
                matches!(
                    e,
                    NarInfoError::InvalidStorePath {
                        field: "Deriver",
                        ..
                    }
                )
            }),
            (
                TEXT_PATH.replace("Sig: test-cache-1:", "Sig: test-cache-1"),
                |e| matches!(e, NarInfoError::InvalidSignature { line: 9, .. }),
            ),
            (
                TEXT_PATH.replace("Compression: none", "Compression none"),
                |e| matches!(e, NarInfoError::MalformedLine { line: 3 }),
            ),
            (format!("{TEXT_PATH}\n"), |e| {
                matches!(e, NarInfoError::MalformedLine { line: 11 })
            }),
            (format!("{TEXT_PATH}NarSize: 168\n"), |e| {
                matches!(
                    e,
                    NarInfoError::DuplicateField {
                        field: "NarSize",
                        line: 11
                    }
                )
            }),
            (TEXT_PATH.replace("URL: nar/", "URL: nar/\r"), |e| {
                matches!(e, NarInfoError::ControlCharacter { field: "URL", .. })
            }),
            (
                TEXT_PATH.replace(
                    "CA: text:sha256:15pmph3xjw4h167s1m61424zspk20mrs9qgg3aax4zm2ich0mqzv",
                    "CA: ",
                ),
                |e| matches!(e, NarInfoError::EmptyValue { field: "CA", .. }),
            ),
            (String::new(), |e| {
                matches!(e, NarInfoError::MalformedLine { line: 1 })
            }),
        ];
        for (text, check) in cases {
            let error = NarInfo::parse(&text, &store_dir()).unwrap_err();
            assert!(check(&error), "{error:?} for\n{text}");
        }
    }

    #[test]
    fn error_messages_have_context() {
        let error = NarInfo::parse(
            &TEXT_PATH.replace("NarSize: 168", "NarSize: x"),
            &store_dir(),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "narinfo line 7: NarSize \"x\" is not a number"
        );
    }

    #[test]
    fn compression_names() {
        for (name, extension) in [
            ("none", ".nar"),
            ("xz", ".nar.xz"),
            ("zstd", ".nar.zst"),
            ("bzip2", ".nar.bz2"),
            ("br", ".nar.br"),
            ("lz4", ".nar.lz4"),
        ] {
            let compression: Compression = name.parse().unwrap();
            assert_eq!(compression.to_string(), name);
            assert_eq!(compression.nar_extension(), extension);
        }
    }

    proptest! {
        #[test]
        fn random_text_never_panics(text in "\\PC{0,400}") {
            let _ = NarInfo::parse(&text, &store_dir());
        }

        #[test]
        fn mutated_narinfos_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..5),
        ) {
            let mut chars: Vec<char> = BUILT.chars().collect();
            for (index, replacement) in edits {
                let at = index.index(chars.len());
                chars[at] = replacement;
            }
            let text: String = chars.into_iter().collect();
            if let Ok(info) = NarInfo::parse(&text, &store_dir()) {
                // Whatever parses renders to something that parses the same.
                let rendered = info.render(&store_dir());
                prop_assert_eq!(NarInfo::parse(&rendered, &store_dir()), Ok(info));
            }
        }
    }
}
