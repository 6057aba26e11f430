//! Realisations of content-addressed derivations (`ca-derivations`): which
//! store path a derivation's output built to, in a binary cache's two
//! layouts.
//!
//! - Nix up to 2.34: `realisations/<id>.doi`, the id
//!   `sha256:<hex of the derivation's hash modulo>!<output>` ([`DrvOutputId`]),
//!   the file `{"dependentRealisations":{},"id":"…","outPath":"<hash>-<name>","signatures":["key:…"]}`;
//!   a signature covers that object without `signatures`.
//! - Nix 2.35 on: `build-trace-v2/<drv base name>/<output>.doi`, keyed by the
//!   derivation's path, the file `{"outPath":"…","signatures":[{"keyName":"key","sig":"…"}]}`;
//!   a signature covers `{"key":{"drvPath":"…","outputName":"…"},"value":{"outPath":"…"}}`.
//!
//! Fingerprints are JSON with keys sorted and no whitespace, as Nix's JSON
//! library dumps them.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use super::signing::{SecretKey, Signature};
use super::store_path::StorePath;

/// The most bytes of a `.doi` file: a few hundred in practice.
pub const MAX_REALISATION_BYTES: usize = 64 * 1024;

/// Why a realisation or its id is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RealisationError {
    #[error("invalid realisation id {shown:?}: expected sha256:<64 hex digits>!<output name>")]
    InvalidId { shown: String },
    #[error("invalid realisation: {0}")]
    Invalid(String),
    #[error("the realisation's id {found:?} is not the one its file is named after, {named:?}")]
    IdMismatch { named: String, found: String },
}

/// `sha256:<hex>!<output>`: a derivation output, by the derivation's hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrvOutputId(String);

impl DrvOutputId {
    pub fn parse(text: &str) -> Result<Self, RealisationError> {
        let invalid = || RealisationError::InvalidId {
            shown: text.chars().take(120).collect(),
        };
        let (hash, output) = text.split_once('!').ok_or_else(invalid)?;
        let hex = hash.strip_prefix("sha256:").ok_or_else(invalid)?;
        let hex_ok = hex.len() == 64
            && hex
                .bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
        if !hex_ok || !valid_output_name(output) {
            return Err(invalid());
        }
        Ok(Self(text.to_owned()))
    }

    /// The id of a `realisations/` file name, `<id>.doi`.
    pub fn from_file_name(file: &str) -> Result<Self, RealisationError> {
        let id = file
            .strip_suffix(".doi")
            .ok_or_else(|| RealisationError::InvalidId {
                shown: file.chars().take(120).collect(),
            })?;
        Self::parse(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DrvOutputId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a realisation is of, in either layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealisationKey {
    /// Nix up to 2.34: by the derivation's hash modulo.
    DrvHash(DrvOutputId),
    /// Nix 2.35 on (`build-trace-v2/`): by the derivation's path.
    DrvPath { drv: StorePath, output: String },
}

impl RealisationKey {
    /// The key of `build-trace-v2/<drv>/<file>`.
    pub fn from_build_trace(drv: &str, file: &str) -> Result<Self, RealisationError> {
        let invalid = || RealisationError::InvalidId {
            shown: format!("{drv}/{file}").chars().take(120).collect(),
        };
        let drv = StorePath::from_base_name(drv).map_err(|_| invalid())?;
        let output = file.strip_suffix(".doi").ok_or_else(invalid)?;
        if !drv.to_string().ends_with(".drv") || !valid_output_name(output) {
            return Err(invalid());
        }
        Ok(Self::DrvPath {
            drv,
            output: output.to_owned(),
        })
    }

    /// How the key is kept in the database: the id, or `<drv>^<output>`
    /// (the two never look alike).
    pub fn stored(&self) -> String {
        match self {
            Self::DrvHash(id) => id.to_string(),
            Self::DrvPath { drv, output } => format!("{drv}^{output}"),
        }
    }
}

impl fmt::Display for RealisationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.stored())
    }
}

/// Whether `name` is a derivation output's name (store path name rules).
fn valid_output_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 211
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"+-._?=".contains(&byte))
}

/// A realisation: which store path a derivation output built to, with
/// the realisations it depended on (old layout only, and always empty from
/// Nix 2.33 on) and the signatures it came with (`name:base64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub key: RealisationKey,
    pub out_path: StorePath,
    pub dependent: BTreeMap<String, String>,
    pub signatures: Vec<String>,
}

impl Realisation {
    /// Parses a `.doi` file uploaded under `key`, in that key's layout:
    /// an old-layout id must be the one it is named after, `outPath` a
    /// store path base name, the signatures well formed.
    pub fn parse(key: &RealisationKey, bytes: &[u8]) -> Result<Self, RealisationError> {
        if bytes.len() > MAX_REALISATION_BYTES {
            return Err(RealisationError::Invalid(format!(
                "larger than {MAX_REALISATION_BYTES} bytes"
            )));
        }
        let invalid = |error: serde_json::Error| RealisationError::Invalid(error.to_string());
        let (out_path, dependent, signatures) = match key {
            RealisationKey::DrvHash(named) => {
                #[derive(serde::Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Raw {
                    id: String,
                    out_path: String,
                    #[serde(default)]
                    signatures: Vec<String>,
                    #[serde(default)]
                    dependent_realisations: BTreeMap<String, String>,
                }
                let raw: Raw = serde_json::from_slice(bytes).map_err(invalid)?;
                let id = DrvOutputId::parse(&raw.id)?;
                if &id != named {
                    return Err(RealisationError::IdMismatch {
                        named: named.to_string(),
                        found: id.to_string(),
                    });
                }
                for (dependency, path) in &raw.dependent_realisations {
                    DrvOutputId::parse(dependency)?;
                    StorePath::from_base_name(path).map_err(|error| {
                        RealisationError::Invalid(format!("dependentRealisations: {error}"))
                    })?;
                }
                (raw.out_path, raw.dependent_realisations, raw.signatures)
            }
            RealisationKey::DrvPath { .. } => {
                /// A signature as Nix 2.35 writes it, or as a string.
                #[derive(serde::Deserialize)]
                #[serde(untagged)]
                enum RawSignature {
                    Text(String),
                    #[serde(rename_all = "camelCase")]
                    Structured {
                        key_name: String,
                        sig: String,
                    },
                }
                #[derive(serde::Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Raw {
                    out_path: String,
                    #[serde(default)]
                    signatures: Vec<RawSignature>,
                }
                let raw: Raw = serde_json::from_slice(bytes).map_err(invalid)?;
                let signatures = raw
                    .signatures
                    .into_iter()
                    .map(|signature| match signature {
                        RawSignature::Text(text) => text,
                        RawSignature::Structured { key_name, sig } => format!("{key_name}:{sig}"),
                    })
                    .collect();
                (raw.out_path, BTreeMap::new(), signatures)
            }
        };
        let out_path = StorePath::from_base_name(&out_path)
            .map_err(|error| RealisationError::Invalid(format!("outPath: {error}")))?;
        for signature in &signatures {
            Signature::parse(signature)
                .map_err(|error| RealisationError::Invalid(format!("signature: {error}")))?;
        }
        Ok(Self {
            key: key.clone(),
            out_path,
            dependent,
            signatures,
        })
    }

    /// What a signature covers.
    pub fn fingerprint(&self) -> String {
        match &self.key {
            RealisationKey::DrvHash(_) => self.old_layout(None),
            RealisationKey::DrvPath { drv, output } => format!(
                "{{\"key\":{{\"drvPath\":{},\"outputName\":{}}},\"value\":{{\"outPath\":{}}}}}",
                json_text(&drv.to_string()),
                json_text(output),
                json_text(&self.out_path.to_string()),
            ),
        }
    }

    /// The `.doi` file served: the pusher's signatures, and each of
    /// `keys`' over the fingerprint (the cache's, two during a key
    /// rotation), in the realisation's layout.
    pub fn render<'k>(&self, keys: impl IntoIterator<Item = &'k SecretKey>) -> String {
        let mut signatures: Vec<String> = self.signatures.clone();
        for key in keys {
            let own = key.sign(self.fingerprint().as_bytes()).to_string();
            if !signatures.contains(&own) {
                signatures.push(own);
            }
        }
        // Nix keeps signatures in a set: sorted.
        signatures.sort();
        match &self.key {
            RealisationKey::DrvHash(_) => self.old_layout(Some(&signatures)),
            RealisationKey::DrvPath { .. } => {
                let list = signatures
                    .iter()
                    // Checked on the way in (`name:base64`); one that is
                    // not is left out rather than sent broken.
                    .filter_map(|signature| signature.split_once(':'))
                    .map(|(name, sig)| {
                        format!(
                            "{{\"keyName\":{},\"sig\":{}}}",
                            json_text(name),
                            json_text(sig)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                format!(
                    "{{\"outPath\":{},\"signatures\":[{list}]}}",
                    json_text(&self.out_path.to_string())
                )
            }
        }
    }

    /// The old layout's object with its keys sorted, with `signatures`
    /// when given.
    fn old_layout(&self, signatures: Option<&[String]>) -> String {
        let dependent = self
            .dependent
            .iter()
            .map(|(id, path)| format!("{}:{}", json_text(id), json_text(path)))
            .collect::<Vec<_>>()
            .join(",");
        let mut json = format!(
            "{{\"dependentRealisations\":{{{dependent}}},\"id\":{},\"outPath\":{}",
            json_text(&self.key.stored()),
            json_text(&self.out_path.to_string()),
        );
        if let Some(signatures) = signatures {
            let list = signatures
                .iter()
                .map(|signature| json_text(signature))
                .collect::<Vec<_>>()
                .join(",");
            json.push_str(&format!(",\"signatures\":[{list}]"));
        }
        json.push('}');
        json
    }
}

/// A JSON string.
fn json_text(value: &str) -> String {
    serde_json::to_string(value).expect("a string always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!out";

    /// What Nix 2.34 wrote into a `file://` cache for a CA derivation.
    const WRITTEN: &str = r#"{"dependentRealisations":{},"id":"sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!out","outPath":"7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test-larder","signatures":[]}"#;

    const DRV: &str = "bgah7s4j1armhz0myw5pmzwic90cbx3f-ca-test-larder.drv";

    /// What Nix 2.35 writes under `build-trace-v2/<drv>/out.doi` (its
    /// `registerDrvOutput`: the unkeyed realisation, signatures as objects).
    const WRITTEN_V2: &str =
        r#"{"outPath":"7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test-larder","signatures":[]}"#;

    fn old_key() -> RealisationKey {
        RealisationKey::DrvHash(DrvOutputId::from_file_name(&format!("{ID}.doi")).expect("an id"))
    }

    fn new_key() -> RealisationKey {
        RealisationKey::from_build_trace(DRV, "out.doi").expect("a key")
    }

    #[test]
    fn nix_s_files_parse_and_render_back_byte_for_byte() {
        let realisation = Realisation::parse(&old_key(), WRITTEN.as_bytes()).expect("parses");
        assert_eq!(realisation.render(None), WRITTEN);
        assert_eq!(
            realisation.fingerprint(),
            WRITTEN.replace(",\"signatures\":[]", "")
        );
        let realisation = Realisation::parse(&new_key(), WRITTEN_V2.as_bytes()).expect("parses");
        assert_eq!(realisation.render(None), WRITTEN_V2);
        assert_eq!(
            realisation.fingerprint(),
            format!(
                r#"{{"key":{{"drvPath":"{DRV}","outputName":"out"}},"value":{{"outPath":"7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test-larder"}}}}"#
            )
        );
        assert_eq!(new_key().stored(), format!("{DRV}^out"));
    }

    #[test]
    fn the_cache_s_signature_verifies_over_the_fingerprint_in_both_layouts() {
        let key = SecretKey::generate("cache-1").expect("a key");
        for (layout, written) in [(old_key(), WRITTEN), (new_key(), WRITTEN_V2)] {
            let realisation = Realisation::parse(&layout, written.as_bytes()).expect("parses");
            let rendered = realisation.render(Some(&key));
            let served = Realisation::parse(&layout, rendered.as_bytes()).expect("parses back");
            assert_eq!(served.signatures.len(), 1, "{rendered}");
            let signature = Signature::parse(&served.signatures[0]).expect("a signature");
            assert!(key
                .to_public()
                .verify(realisation.fingerprint().as_bytes(), &signature));
        }
        // During a key rotation, both keys sign.
        let next = SecretKey::generate("cache-2").expect("a key");
        for (layout, written) in [(old_key(), WRITTEN), (new_key(), WRITTEN_V2)] {
            let realisation = Realisation::parse(&layout, written.as_bytes()).expect("parses");
            let rendered = realisation.render([&key, &next]);
            let served = Realisation::parse(&layout, rendered.as_bytes()).expect("parses back");
            assert_eq!(served.signatures.len(), 2, "{rendered}");
            for (key, signature) in [&key, &next].into_iter().zip(&served.signatures) {
                let signature = Signature::parse(signature).expect("a signature");
                assert!(key
                    .to_public()
                    .verify(realisation.fingerprint().as_bytes(), &signature));
            }
        }
        // The new layout's signatures are objects.
        let realisation = Realisation::parse(&new_key(), WRITTEN_V2.as_bytes()).expect("parses");
        let rendered: serde_json::Value =
            serde_json::from_str(&realisation.render(Some(&key))).expect("JSON");
        assert_eq!(rendered["signatures"][0]["keyName"], "cache-1");
    }

    #[test]
    fn bad_ids_and_files_are_refused() {
        for id in [
            "sha256:ff51!out",
            "md5:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!out",
            "sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94",
            "sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!",
            "sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!a/b",
        ] {
            assert!(DrvOutputId::parse(id).is_err(), "{id}");
        }
        for (drv, file) in [
            ("not-a-path", "out.doi"),
            ("7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-not-a-drv", "out.doi"),
            (DRV, "out"),
            (DRV, ".doi"),
        ] {
            assert!(
                RealisationKey::from_build_trace(drv, file).is_err(),
                "{drv}/{file}"
            );
        }
        let other = ID.replace("!out", "!dev");
        for body in [
            "not json".to_owned(),
            WRITTEN.replace("7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test-larder", "../etc"),
            WRITTEN.replace("\"signatures\":[]", "\"signatures\":[\"no-colon\"]"),
            WRITTEN.replace(ID, &other),
            "x".repeat(MAX_REALISATION_BYTES + 1),
        ] {
            assert!(
                Realisation::parse(&old_key(), body.as_bytes()).is_err(),
                "{body:.80}"
            );
        }
        for body in [
            WRITTEN_V2.replace(
                "\"signatures\":[]",
                "\"signatures\":[{\"keyName\":\"k\",\"sig\":\"short\"}]",
            ),
            WRITTEN_V2.replace("7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test-larder", "x"),
            "[]".to_owned(),
        ] {
            assert!(
                Realisation::parse(&new_key(), body.as_bytes()).is_err(),
                "{body:.80}"
            );
        }
    }
}
