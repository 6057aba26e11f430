//! Larder API v1 wire types, shared by the server and the `larder` client so
//! the two cannot drift. They are wire-compatible with Attic's API, so that
//! Attic's client and CI action work against Larder unchanged.

use serde::{Deserialize, Serialize};

/// The JSON body of every API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The HTTP status, repeated for clients that only see the body.
    pub code: u16,
    /// A stable machine-readable name, e.g. `NoSuchCache`.
    pub error: String,
    /// What went wrong, for humans.
    pub message: String,
}

/// How long a cache keeps paths nobody has fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionPeriodConfig {
    /// The server's default applies.
    Global,
    /// Seconds since last access.
    Period(u64),
}

/// Where a cache's signing key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeypairConfig {
    /// A new key pair made by the server.
    Generate,
    /// An imported Nix secret key, `name:base64`.
    Keypair(String),
}

/// `GET /_api/v1/cache-config/{cache}`: a cache's configuration. In a
/// `PATCH`, every field is optional and only those present change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// The substituter URL to give Nix, e.g. `https://host/cache`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substituter_endpoint: Option<String>,
    /// The server's API base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<String>,
    /// The cache's public key, `name:base64`, for `trusted-public-keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_public: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Paths signed by these keys are assumed to be upstream; clients
    /// skip pushing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cache_key_names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_period: Option<RetentionPeriodConfig>,
    /// Only in a `PATCH`: regenerate or import the key pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keypair: Option<KeypairConfig>,
}

/// `POST /_api/v1/cache-config/{cache}`: create a cache. Attic's client
/// sends every field; Larder fills in defaults for the ones left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateCacheRequest {
    #[serde(default = "default_keypair")]
    pub keypair: KeypairConfig,
    #[serde(default)]
    pub is_public: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cache_key_names: Option<Vec<String>>,
}

fn default_keypair() -> KeypairConfig {
    KeypairConfig::Generate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_period_matches_attics_encoding() {
        let global = serde_json::to_string(&RetentionPeriodConfig::Global).expect("json");
        assert_eq!(global, r#""Global""#);
        let period = serde_json::to_string(&RetentionPeriodConfig::Period(60)).expect("json");
        assert_eq!(period, r#"{"Period":60}"#);
    }

    #[test]
    fn attic_create_request_parses() {
        let body = r#"{"keypair":"Generate","is_public":false,"store_dir":"/nix/store",
            "priority":41,"upstream_cache_key_names":["cache.nixos.org-1"]}"#;
        let request: CreateCacheRequest = serde_json::from_str(body).expect("parse");
        assert_eq!(request.keypair, KeypairConfig::Generate);
        let imported = r#"{"keypair":{"Keypair":"k-1:abc"},"is_public":true}"#;
        let request: CreateCacheRequest = serde_json::from_str(imported).expect("parse");
        assert_eq!(request.keypair, KeypairConfig::Keypair("k-1:abc".into()));
        assert!(request.is_public);
    }
}
