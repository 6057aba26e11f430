//! Checking the metadata of an Attic upload (`PUT /_api/v1/upload-path`):
//! the JSON of the `X-Attic-Nar-Info` header or of the body's preamble,
//! turned into typed, validated fields before anything is looked up or
//! stored. Pure (no IO, no cache), so that it is fuzzed on its own
//! (`fuzz/fuzz_targets/attic_preamble.rs`); the server checks the store
//! path against the cache's store directory afterwards.

use thiserror::Error;

use crate::cache_name::{CacheName, CacheNameError};
use crate::v1::UploadPathNarInfo;
use larder_nix::{
    HashError, NarHash, Signature, SigningError, StorePath, StorePathError, StorePathHash,
};

/// The longest free-text field (`system`, `ca`) a path may carry.
pub const MAX_TEXT_LEN: usize = 1024;

/// Whether a free-text field fits on one narinfo line (`Key: value`): no
/// control character, at most [`MAX_TEXT_LEN`] bytes.
pub fn is_one_line_text(value: &str) -> bool {
    value.len() <= MAX_TEXT_LEN && !value.chars().any(char::is_control)
}

/// Why upload metadata was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UploadInfoError {
    /// Not the JSON of an [`UploadPathNarInfo`].
    #[error("{0}")]
    Json(String),
    #[error(transparent)]
    CacheName(#[from] CacheNameError),
    #[error(transparent)]
    StorePathHash(StorePathError),
    #[error("invalid {field} {text:?}: {error}")]
    BaseName {
        field: &'static str,
        text: String,
        error: StorePathError,
    },
    #[error("invalid signature {text:?}: {error}")]
    Signature { text: String, error: SigningError },
    #[error("{field} {text:?} contains a control character or is too long")]
    Text { field: &'static str, text: String },
    #[error(transparent)]
    NarHash(#[from] HashError),
    #[error("the NAR's size of {nar_size} bytes is larger than the limit of {max_nar_size} bytes")]
    TooLarge { nar_size: u64, max_nar_size: u64 },
}

/// Upload metadata with every field checked that can be checked without
/// the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUploadInfo {
    pub cache: CacheName,
    pub store_path_hash: StorePathHash,
    /// The full store path as sent: whether it lies in the cache's store
    /// directory and matches `store_path_hash` needs the cache.
    pub store_path: String,
    pub fields: PathFields,
}

/// The metadata of a pushed path besides its store path, checked: what
/// both upload protocols (Attic's JSON, Nix's narinfo) carry and the
/// server stores with the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathFields {
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub signatures: Vec<Signature>,
    pub ca: Option<String>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
}

impl CheckedUploadInfo {
    /// Parses and checks the metadata JSON (header or preamble). A NAR
    /// larger than `max_nar_size` is refused here already.
    pub fn parse(json: &[u8], max_nar_size: u64) -> Result<Self, UploadInfoError> {
        let info: UploadPathNarInfo = serde_json::from_slice(json)
            .map_err(|error| UploadInfoError::Json(error.to_string()))?;
        Self::check(&info, max_nar_size)
    }

    /// Checks metadata already parsed.
    pub fn check(info: &UploadPathNarInfo, max_nar_size: u64) -> Result<Self, UploadInfoError> {
        let cache: CacheName = info.cache.parse()?;
        let store_path_hash =
            StorePathHash::parse(&info.store_path_hash).map_err(UploadInfoError::StorePathHash)?;
        let base_name = |field: &'static str, text: &str| {
            StorePath::from_base_name(text).map_err(|error| UploadInfoError::BaseName {
                field,
                text: text.to_owned(),
                error,
            })
        };
        let references = info
            .references
            .iter()
            .map(|reference| base_name("reference", reference))
            .collect::<Result<Vec<_>, _>>()?;
        // Attic sends no deriver; Nix spells a missing one `unknown-deriver`.
        let deriver = match info.deriver.as_deref() {
            None | Some("" | "unknown-deriver") => None,
            Some(deriver) => Some(base_name("deriver", deriver)?),
        };
        let signatures = info
            .sigs
            .iter()
            .map(|text| {
                text.parse().map_err(|error| UploadInfoError::Signature {
                    text: text.clone(),
                    error,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let nar_hash = NarHash::parse(&info.nar_hash)?;
        if info.nar_size > max_nar_size {
            return Err(UploadInfoError::TooLarge {
                nar_size: info.nar_size,
                max_nar_size,
            });
        }
        let optional_text = |field: &'static str, value: &Option<String>| match value.as_deref() {
            None | Some("") => Ok(None),
            Some(text) if is_one_line_text(text) => Ok(Some(text.to_owned())),
            Some(text) => Err(UploadInfoError::Text {
                field,
                text: text.chars().take(80).collect(),
            }),
        };
        Ok(Self {
            cache,
            store_path_hash,
            store_path: info.store_path.clone(),
            fields: PathFields {
                references,
                deriver,
                system: optional_text("system", &info.system)?,
                signatures,
                ca: optional_text("ca", &info.ca)?,
                nar_hash,
                nar_size: info.nar_size,
            },
        })
    }

    /// The metadata as a client would send it, in Larder's spelling
    /// (checking it again gives the same fields).
    pub fn to_wire(&self) -> UploadPathNarInfo {
        let fields = &self.fields;
        UploadPathNarInfo {
            cache: self.cache.to_string(),
            store_path_hash: self.store_path_hash.to_string(),
            store_path: self.store_path.clone(),
            references: fields
                .references
                .iter()
                .map(StorePath::to_base_name)
                .collect(),
            system: fields.system.clone(),
            deriver: fields.deriver.as_ref().map(StorePath::to_base_name),
            sigs: fields.signatures.iter().map(ToString::to_string).collect(),
            ca: fields.ca.clone(),
            nar_hash: fields.nar_hash.to_string(),
            nar_size: fields.nar_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"cache":"main","store_path_hash":"nhzy8v6fzgqnz5ksbk6qwm5ayjh9yx48",
        "store_path":"/nix/store/nhzy8v6fzgqnz5ksbk6qwm5ayjh9yx48-a",
        "references":["ss0xprzsdhbh3jcnm5vnvxb99wi0qcv0-c.sh"],"system":"x86_64-linux",
        "deriver":"unknown-deriver","sigs":[],"ca":null,
        "nar_hash":"sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "nar_size":168}"#;

    #[test]
    fn valid_metadata_is_checked_and_round_trips() {
        let checked = CheckedUploadInfo::parse(HEADER.as_bytes(), 1000).expect("valid");
        assert_eq!(checked.cache.as_str(), "main");
        assert_eq!(checked.fields.references.len(), 1);
        assert_eq!(checked.fields.deriver, None);
        assert_eq!(checked.fields.system.as_deref(), Some("x86_64-linux"));
        let again = CheckedUploadInfo::check(&checked.to_wire(), 1000).expect("still valid");
        assert_eq!(again, checked);
    }

    #[test]
    fn each_bad_field_is_named() {
        let with = |field: &str, value: serde_json::Value| {
            let mut json: serde_json::Value = serde_json::from_str(HEADER).expect("JSON");
            json[field] = value;
            CheckedUploadInfo::parse(json.to_string().as_bytes(), 1000)
                .expect_err("refused")
                .to_string()
        };
        assert!(with("cache", "Not A Cache!".into()).contains("cache name"));
        assert!(with("store_path_hash", "short".into()).contains("expected 32"));
        assert!(with("references", serde_json::json!(["not a store path"]))
            .starts_with("invalid reference"));
        assert!(with("deriver", "/nix/store/x".into()).starts_with("invalid deriver"));
        assert!(with("sigs", serde_json::json!(["nope"])).starts_with("invalid signature"));
        assert!(with("system", "a\nb".into()).contains("control character"));
        assert!(with("ca", "x".repeat(MAX_TEXT_LEN + 1).into()).contains("too long"));
        assert!(with("nar_size", 1001.into()).contains("larger than the limit"));
        assert!(matches!(
            CheckedUploadInfo::parse(b"{", 1000),
            Err(UploadInfoError::Json(_))
        ));
    }
}
