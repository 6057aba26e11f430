//! The NAR files of Nix's binary-cache upload protocol: their names, and
//! the join a pushed narinfo makes with the file it names.
//!
//! `nix copy --to http://…` PUTs each NAR file as
//! `nar/<FileHash>.nar[.zst|.xz]` (the Nix base-32 SHA-256 of the file as
//! sent, and its compression), then the narinfo, whose `URL` names that
//! file. [`PushedNarInfo::parse`] reads a pushed narinfo against the store
//! directory of the cache it is PUT to and the store-path hash in its
//! request path, and finds the file its URL names;
//! [`PushedNarInfo::check_staged`] then matches it with what that file was
//! found to hold when it arrived. Both are pure: looking the file up in
//! between is the caller's business.

use std::fmt;

use thiserror::Error;

use super::base32;
use super::hash::{NarHash, Sha256Hash};
use super::narinfo::{NarInfo, NarInfoError};
use super::store_path::{StoreDir, StorePathHash};

/// How a pushed NAR file is compressed, by its extension: the ones Larder
/// can decode as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NarFileCompression {
    /// `.nar`
    None,
    /// `.nar.zst`
    Zstd,
    /// `.nar.xz`
    Xz,
}

impl NarFileCompression {
    pub const fn extension(self) -> &'static str {
        match self {
            Self::None => ".nar",
            Self::Zstd => ".nar.zst",
            Self::Xz => ".nar.xz",
        }
    }
}

/// A NAR file name as Nix pushes it: `<FileHash>.nar[.zst|.xz]`. Parsing
/// is strict (the hash in Nix's own spelling), so a name has one spelling
/// and [`fmt::Display`] gives back exactly the text parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NarFileName {
    file_hash: Sha256Hash,
    compression: NarFileCompression,
}

/// Why a string is not a NAR file name this server takes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarFileNameError {
    #[error("invalid NAR file name {shown:?}: expected <nix-base32 SHA-256>.nar[.zst|.xz]")]
    Invalid { shown: String },
    #[error("NAR file {shown:?}: only compression=zstd, xz or none is accepted")]
    UnsupportedCompression { shown: String },
}

impl NarFileName {
    pub fn parse(file: &str) -> Result<Self, NarFileNameError> {
        let shown = || file.chars().take(80).collect::<String>();
        let invalid = || NarFileNameError::Invalid { shown: shown() };
        let (digest, extension) = file
            .split_at_checked(base32::encoded_len(32))
            .ok_or_else(invalid)?;
        let compression = match extension {
            ".nar" => NarFileCompression::None,
            ".nar.zst" => NarFileCompression::Zstd,
            ".nar.xz" => NarFileCompression::Xz,
            ".nar.bz2" | ".nar.br" => {
                return Err(NarFileNameError::UnsupportedCompression { shown: shown() })
            }
            _ => return Err(invalid()),
        };
        let file_hash = Sha256Hash::from_base32(digest).map_err(|_| invalid())?;
        Ok(Self {
            file_hash,
            compression,
        })
    }

    /// The SHA-256 of the file as sent.
    pub fn file_hash(&self) -> &Sha256Hash {
        &self.file_hash
    }

    pub fn compression(&self) -> NarFileCompression {
        self.compression
    }
}

impl fmt::Display for NarFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            self.file_hash.to_base32(),
            self.compression.extension()
        )
    }
}

/// A narinfo PUT to a cache, checked against the cache and the request,
/// with the NAR file its URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedNarInfo {
    pub narinfo: NarInfo,
    pub file: NarFileName,
}

/// Why a pushed narinfo cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PushedNarInfoError {
    #[error("the narinfo is not UTF-8 text")]
    NotUtf8,
    #[error("invalid narinfo: {0}")]
    Invalid(#[from] NarInfoError),
    #[error("the narinfo is for {store_path}, not for {expected}")]
    OtherPath {
        store_path: String,
        expected: StorePathHash,
    },
    #[error(
        "the narinfo's URL {url:?} does not name a NAR file pushed to this cache \
         (nar/<FileHash>.nar[.zst|.xz])"
    )]
    NotANarFile { url: String },
}

/// A narinfo whose NarHash or NarSize is not what its NAR file holds.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "the narinfo says NarHash {claimed_hash} and NarSize {claimed_size}, but nar/{file} is a \
     NAR of {staged_hash} with {staged_size} bytes"
)]
pub struct StagedNarMismatch {
    pub file: NarFileName,
    pub claimed_hash: NarHash,
    pub claimed_size: u64,
    pub staged_hash: NarHash,
    pub staged_size: u64,
}

impl PushedNarInfo {
    /// Parses `text`, PUT as `<path_hash>.narinfo` to a cache whose store
    /// directory is `store_dir`: it must be a narinfo of a path in that
    /// store with that hash, and its URL must be `nar/` and a NAR file
    /// name.
    pub fn parse(
        text: &[u8],
        store_dir: &StoreDir,
        path_hash: &StorePathHash,
    ) -> Result<Self, PushedNarInfoError> {
        let text = std::str::from_utf8(text).map_err(|_| PushedNarInfoError::NotUtf8)?;
        let narinfo = NarInfo::parse(text, store_dir)?;
        if narinfo.store_path.hash() != path_hash {
            return Err(PushedNarInfoError::OtherPath {
                store_path: store_dir.display_path(&narinfo.store_path),
                expected: *path_hash,
            });
        }
        let file = narinfo
            .url
            .strip_prefix("nar/")
            .and_then(|file| NarFileName::parse(file).ok())
            .ok_or_else(|| PushedNarInfoError::NotANarFile {
                url: narinfo.url.chars().take(200).collect(),
            })?;
        Ok(Self { narinfo, file })
    }

    /// Checks that the NAR file the narinfo names, found to be a NAR of
    /// `nar_hash` with `nar_size` bytes when it arrived, is the NAR the
    /// narinfo describes.
    pub fn check_staged(&self, nar_hash: &NarHash, nar_size: u64) -> Result<(), StagedNarMismatch> {
        if self.narinfo.nar_hash == *nar_hash && self.narinfo.nar_size == nar_size {
            return Ok(());
        }
        Err(StagedNarMismatch {
            file: self.file,
            claimed_hash: self.narinfo.nar_hash,
            claimed_size: self.narinfo.nar_size,
            staged_hash: *nar_hash,
            staged_size: nar_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/0a9m7bhf6ns3dlk2axdh3jw6kwmmb3m1-hello-2.12";
    const HASH: &str = "0a9m7bhf6ns3dlk2axdh3jw6kwmmb3m1";

    fn file_name(compression: &str) -> String {
        format!("{}{compression}", Sha256Hash::digest(b"file").to_base32())
    }

    fn narinfo(store_path: &str, url: &str) -> String {
        format!(
            "StorePath: {store_path}\nURL: {url}\nCompression: zstd\nNarHash: {}\n\
             NarSize: 120\nReferences: \n",
            NarHash::new(Sha256Hash::digest(b"nar"))
        )
    }

    fn parse(text: &str) -> Result<PushedNarInfo, PushedNarInfoError> {
        PushedNarInfo::parse(
            text.as_bytes(),
            &StoreDir::default(),
            &StorePathHash::parse(HASH).unwrap(),
        )
    }

    #[test]
    fn file_names_parse_and_print_back() {
        for (extension, compression) in [
            (".nar", NarFileCompression::None),
            (".nar.zst", NarFileCompression::Zstd),
            (".nar.xz", NarFileCompression::Xz),
        ] {
            let name = file_name(extension);
            let parsed = NarFileName::parse(&name).unwrap();
            assert_eq!(parsed.compression(), compression);
            assert_eq!(*parsed.file_hash(), Sha256Hash::digest(b"file"));
            assert_eq!(parsed.to_string(), name);
        }
        assert!(matches!(
            NarFileName::parse(&file_name(".nar.bz2")),
            Err(NarFileNameError::UnsupportedCompression { .. })
        ));
        for bad in [
            String::new(),
            "x.nar".to_owned(),
            file_name(".nar.gz"),
            file_name(".narx"),
            format!("{}.nar", "e".repeat(52)),
            "é".repeat(40),
        ] {
            assert!(
                matches!(
                    NarFileName::parse(&bad),
                    Err(NarFileNameError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_pushed_narinfo_names_its_file_and_matches_what_it_holds() {
        let url = format!("nar/{}", file_name(".nar.zst"));
        let pushed = parse(&narinfo(PATH, &url)).unwrap();
        assert_eq!(format!("nar/{}", pushed.file), url);
        let nar_hash = NarHash::new(Sha256Hash::digest(b"nar"));
        assert_eq!(pushed.check_staged(&nar_hash, 120), Ok(()));
        let other = NarHash::new(Sha256Hash::digest(b"other"));
        let mismatch = pushed.check_staged(&other, 120).unwrap_err();
        assert!(mismatch.to_string().contains("NarSize 120"), "{mismatch}");
        assert!(pushed.check_staged(&nar_hash, 121).is_err());
    }

    #[test]
    fn pushed_narinfos_that_do_not_fit_are_refused() {
        let url = format!("nar/{}", file_name(".nar.zst"));
        assert!(matches!(
            parse("not a narinfo"),
            Err(PushedNarInfoError::Invalid(_))
        ));
        assert_eq!(
            PushedNarInfo::parse(
                b"\xff",
                &StoreDir::default(),
                &StorePathHash::parse(HASH).unwrap()
            ),
            Err(PushedNarInfoError::NotUtf8)
        );
        let other = "/nix/store/1b9m7bhf6ns3dlk2axdh3jw6kwmmb3m1-hello-2.12";
        assert!(matches!(
            parse(&narinfo(other, &url)),
            Err(PushedNarInfoError::OtherPath { .. })
        ));
        assert!(matches!(
            parse(&narinfo(&PATH.replace("/nix/store", "/gnu/store"), &url)),
            Err(PushedNarInfoError::Invalid(_))
        ));
        for url in [
            file_name(".nar.zst"),
            format!("nars/{}", file_name(".nar.zst")),
            format!("nar/{}", file_name(".nar.bz2")),
            format!("nar/../{}", file_name(".nar")),
        ] {
            assert!(
                matches!(
                    parse(&narinfo(PATH, &url)),
                    Err(PushedNarInfoError::NotANarFile { .. })
                ),
                "{url}"
            );
        }
    }
}
