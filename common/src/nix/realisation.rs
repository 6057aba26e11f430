//! Realisations of content-addressed derivations (`ca-derivations`), as
//! Nix up to 2.34 keeps them in a binary cache: `realisations/<id>.doi`,
//! where the id is `sha256:<hex of the derivation's hash modulo>!<output>`
//! and the file is JSON:
//!
//! ```json
//! {"dependentRealisations":{},"id":"sha256:…!out","outPath":"<hash>-<name>","signatures":["key:…"]}
//! ```
//!
//! A signature covers the fingerprint: that object without `signatures`,
//! keys sorted, no whitespace (how Nix's JSON library dumps it).

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
        // Output names follow store path name rules (Nix checks them so).
        let output_ok = !output.is_empty()
            && output.len() <= 211
            && output
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"+-._?=".contains(&byte))
            && !output.starts_with('.');
        if !hex_ok || !output_ok {
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

/// A realisation: which store path a derivation output built to, with
/// the realisations it depended on (always empty from Nix 2.33 on) and
/// the signatures it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub id: DrvOutputId,
    pub out_path: StorePath,
    pub dependent: BTreeMap<String, String>,
    pub signatures: Vec<String>,
}

impl Realisation {
    /// Parses a `.doi` file uploaded as `named`: its id must be that one,
    /// its `outPath` a store path base name, its signatures well formed.
    pub fn parse(named: &DrvOutputId, bytes: &[u8]) -> Result<Self, RealisationError> {
        if bytes.len() > MAX_REALISATION_BYTES {
            return Err(RealisationError::Invalid(format!(
                "larger than {MAX_REALISATION_BYTES} bytes"
            )));
        }
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
        let raw: Raw = serde_json::from_slice(bytes)
            .map_err(|error| RealisationError::Invalid(error.to_string()))?;
        let id = DrvOutputId::parse(&raw.id)?;
        if &id != named {
            return Err(RealisationError::IdMismatch {
                named: named.to_string(),
                found: id.to_string(),
            });
        }
        let out_path = StorePath::from_base_name(&raw.out_path)
            .map_err(|error| RealisationError::Invalid(format!("outPath: {error}")))?;
        for (dependency, path) in &raw.dependent_realisations {
            DrvOutputId::parse(dependency)?;
            StorePath::from_base_name(path).map_err(|error| {
                RealisationError::Invalid(format!("dependentRealisations: {error}"))
            })?;
        }
        for signature in &raw.signatures {
            Signature::parse(signature)
                .map_err(|error| RealisationError::Invalid(format!("signature: {error}")))?;
        }
        Ok(Self {
            id,
            out_path,
            dependent: raw.dependent_realisations,
            signatures: raw.signatures,
        })
    }

    /// What a signature covers.
    pub fn fingerprint(&self) -> String {
        self.json(None)
    }

    /// The `.doi` file served: the pusher's signatures, and `key`'s over
    /// the fingerprint when given.
    pub fn render(&self, key: Option<&SecretKey>) -> String {
        let mut signatures = self.signatures.clone();
        if let Some(key) = key {
            let own = key.sign(self.fingerprint().as_bytes()).to_string();
            if !signatures.contains(&own) {
                signatures.push(own);
            }
        }
        // Nix keeps signatures in a set: sorted.
        signatures.sort();
        self.json(Some(&signatures))
    }

    /// The object with its keys sorted and no whitespace, as Nix's JSON
    /// library writes it; with `signatures` when given.
    fn json(&self, signatures: Option<&[String]>) -> String {
        let text = |value: &str| serde_json::to_string(value).expect("a string always serialises");
        let dependent = self
            .dependent
            .iter()
            .map(|(id, path)| format!("{}:{}", text(id), text(path)))
            .collect::<Vec<_>>()
            .join(",");
        let mut json = format!(
            "{{\"dependentRealisations\":{{{dependent}}},\"id\":{},\"outPath\":{}",
            text(self.id.as_str()),
            text(&self.out_path.to_string()),
        );
        if let Some(signatures) = signatures {
            let list = signatures
                .iter()
                .map(|signature| text(signature))
                .collect::<Vec<_>>()
                .join(",");
            json.push_str(&format!(",\"signatures\":[{list}]"));
        }
        json.push('}');
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!out";

    /// What Nix 2.34 wrote into a `file://` cache for a CA derivation.
    const WRITTEN: &str = r#"{"dependentRealisations":{},"id":"sha256:ff51cc5099788a082b91d8622142fcfa2179092fa2cbf4f7976a2c1514f5ba94!out","outPath":"7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test-larder","signatures":[]}"#;

    #[test]
    fn nix_s_file_parses_and_renders_back_byte_for_byte() {
        let id = DrvOutputId::from_file_name(&format!("{ID}.doi")).expect("an id");
        let realisation = Realisation::parse(&id, WRITTEN.as_bytes()).expect("parses");
        assert_eq!(realisation.render(None), WRITTEN);
        assert_eq!(
            realisation.fingerprint(),
            WRITTEN.replace(",\"signatures\":[]", "")
        );
    }

    #[test]
    fn a_signature_verifies_over_the_fingerprint() {
        let id = DrvOutputId::parse(ID).expect("an id");
        let realisation = Realisation::parse(&id, WRITTEN.as_bytes()).expect("parses");
        let key = SecretKey::generate("cache-1").expect("a key");
        let rendered = realisation.render(Some(&key));
        let served = Realisation::parse(&id, rendered.as_bytes()).expect("parses back");
        assert_eq!(served.signatures.len(), 1);
        let signature = Signature::parse(&served.signatures[0]).expect("a signature");
        assert!(key
            .to_public()
            .verify(realisation.fingerprint().as_bytes(), &signature));
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
        let id = DrvOutputId::parse(ID).expect("an id");
        let other = ID.replace("!out", "!dev");
        for body in [
            "not json".to_owned(),
            WRITTEN.replace("7x36ylfb9id6m7jmhnqqd5d3jb6gm06m-ca-test-larder", "../etc"),
            WRITTEN.replace("\"signatures\":[]", "\"signatures\":[\"no-colon\"]"),
            WRITTEN.replace(ID, &other),
            "x".repeat(MAX_REALISATION_BYTES + 1),
        ] {
            assert!(
                Realisation::parse(&id, body.as_bytes()).is_err(),
                "{body:.80}"
            );
        }
    }
}
