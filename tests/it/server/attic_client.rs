//! A small Attic client, written for these tests from Attic's published
//! wire format (the request and response types of its `attic::api::v1`
//! and the login config its CLI keeps; none of its code), run against
//! Larder the way Attic's `attic` CLI sequences its calls:
//!
//! - `attic login local URL TOKEN` writes the login config; every call
//!   then sends the token as `Authorization: bearer TOKEN`;
//! - `attic cache create`: `POST /_api/v1/cache-config/{cache}`;
//! - `attic push`: `GET /_api/v1/cache-config/{cache}` (and from then on
//!   the `api_endpoint` it names; paths signed by a key in
//!   `upstream_cache_key_names` are left out), `POST
//!   /_api/v1/get-missing-paths` with every path's hash, then `PUT
//!   /_api/v1/upload-path` for each missing path, several at once and in
//!   no particular order, each NAR a streamed body (no Content-Length) with
//!   its metadata in `X-Attic-Nar-Info`, or in a preamble of
//!   `X-Attic-Nar-Info-Preamble-Size` bytes (what Attic's client does for
//!   metadata of 4 KiB or more, or when told to), and reads the answer
//!   leniently (an unknown `kind` is `Uploaded`, an unreadable body is
//!   success);
//! - `attic use`: `GET /_api/v1/cache-config/{cache}` for
//!   `substituter_endpoint` and `public_key`, which go into nix.conf; here
//!   the real Nix client then substitutes the closure with exactly those.
//!
//! Attic's real client cannot be built here: it links Nix's C++
//! libraries, which Debian does not package.

use std::collections::BTreeMap;

use larder_nix::Sha256Hash;
use larder_token::Permission;
use serde::{Deserialize, Serialize};
use tests::server::TestServer;

use super::HOUR;
use crate::server::pushing::Pushing;
use crate::server::SourcePath;

/// Attic's threshold for sending the metadata as a preamble.
const NAR_INFO_PREAMBLE_THRESHOLD: usize = 4 * 1024;

/// `~/.config/attic/config.toml`, as `attic login` writes it.
#[derive(Debug, Deserialize)]
struct LoginConfig {
    #[serde(rename = "default-server")]
    default_server: String,
    servers: BTreeMap<String, LoginServer>,
}

#[derive(Debug, Deserialize)]
struct LoginServer {
    endpoint: String,
    token: String,
}

/// `CreateCacheRequest`; the keypair `"Generate"`.
#[derive(Debug, Serialize)]
struct CreateCacheRequest {
    keypair: &'static str,
    is_public: bool,
    store_dir: String,
    priority: i32,
    upstream_cache_key_names: Vec<String>,
}

/// `CacheConfig` as the server answers it: every field optional.
#[derive(Debug, Deserialize)]
struct CacheConfig {
    substituter_endpoint: Option<String>,
    api_endpoint: Option<String>,
    public_key: Option<String>,
    is_public: Option<bool>,
    store_dir: Option<String>,
    priority: Option<i32>,
    upstream_cache_key_names: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct GetMissingPathsRequest<'a> {
    cache: &'a str,
    store_path_hashes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct GetMissingPathsResponse {
    missing_paths: Vec<String>,
}

/// `UploadPathNarInfo`: the NAR hash as `sha256:` and 64 hex digits.
#[derive(Debug, Serialize)]
struct UploadPathNarInfo {
    cache: String,
    store_path_hash: String,
    store_path: String,
    references: Vec<String>,
    system: Option<String>,
    deriver: Option<String>,
    sigs: Vec<String>,
    ca: Option<String>,
    nar_hash: String,
    nar_size: usize,
}

/// `UploadPathResult`, read as Attic's client reads it: an unknown or
/// missing `kind` is `Uploaded`.
#[derive(Debug, Deserialize)]
struct UploadPathResult {
    #[serde(default, deserialize_with = "kind_or_default")]
    kind: UploadPathResultKind,
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
enum UploadPathResultKind {
    #[default]
    Uploaded,
    Deduplicated,
}

fn kind_or_default<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<UploadPathResultKind, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

/// The client: an endpoint (ending in `/`, joined with relative paths)
/// and an HTTP client that sends the token with every request.
#[derive(Clone)]
struct AtticClient {
    endpoint: String,
    http: reqwest::Client,
}

impl AtticClient {
    /// A client for the login config's default server.
    fn from_login_config(text: &str) -> Self {
        let config: LoginConfig = toml::from_str(text).expect("a login config");
        let server = &config.servers[&config.default_server];
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("bearer {}", server.token)
                .parse()
                .expect("a header value"),
        );
        headers.insert(
            reqwest::header::USER_AGENT,
            "attic (wire-format test client)"
                .parse()
                .expect("a header value"),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("an HTTP client");
        let mut client = Self {
            endpoint: String::new(),
            http,
        };
        client.set_endpoint(&server.endpoint);
        client
    }

    fn set_endpoint(&mut self, endpoint: &str) {
        self.endpoint = format!("{}/", endpoint.trim_end_matches('/'));
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    async fn cache_config(&self, cache: &str) -> CacheConfig {
        let response = self
            .http
            .get(self.url(&format!("_api/v1/cache-config/{cache}")))
            .send()
            .await
            .expect("GET cache-config");
        success(response).await.json().await.expect("a CacheConfig")
    }

    async fn create_cache(&self, cache: &str, request: &CreateCacheRequest) {
        let response = self
            .http
            .post(self.url(&format!("_api/v1/cache-config/{cache}")))
            .json(request)
            .send()
            .await
            .expect("POST cache-config");
        success(response).await;
    }

    async fn missing_paths(&self, cache: &str, hashes: Vec<String>) -> Vec<String> {
        let response = self
            .http
            .post(self.url("_api/v1/get-missing-paths"))
            .json(&GetMissingPathsRequest {
                cache,
                store_path_hashes: hashes,
            })
            .send()
            .await
            .expect("POST get-missing-paths");
        let answer: GetMissingPathsResponse = success(response)
            .await
            .json()
            .await
            .expect("a GetMissingPathsResponse");
        answer.missing_paths
    }

    /// Uploads one NAR as a stream of 64 KiB pieces; `None` when the
    /// answer's body is not a result (which Attic's client takes as
    /// success).
    async fn upload_path(
        &self,
        info: &UploadPathNarInfo,
        nar: Vec<u8>,
        force_preamble: bool,
    ) -> Option<UploadPathResult> {
        let json = serde_json::to_string(info).expect("JSON");
        let mut pieces: Vec<Result<Vec<u8>, std::io::Error>> = nar
            .chunks(64 << 10)
            .map(|piece| Ok(piece.to_vec()))
            .collect();
        let request = self.http.put(self.url("_api/v1/upload-path"));
        let request = if force_preamble || json.len() >= NAR_INFO_PREAMBLE_THRESHOLD {
            pieces.insert(0, Ok(json.clone().into_bytes()));
            request.header("X-Attic-Nar-Info-Preamble-Size", json.len())
        } else {
            request.header("X-Attic-Nar-Info", json)
        };
        let body = reqwest::Body::wrap_stream(futures::stream::iter(pieces));
        let response = request.body(body).send().await.expect("PUT upload-path");
        success(response).await.json().await.ok()
    }
}

/// `response`, which must be a success: Attic's client fails the command
/// on anything else.
async fn success(response: reqwest::Response) -> reqwest::Response {
    let status = response.status();
    if !status.is_success() {
        let url = response.url().clone();
        panic!(
            "{url}: {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    response
}

/// What `attic push` sends for `source`: base-name references, the pusher's
/// signatures, no system or deriver.
fn nar_info(cache: &str, source: &SourcePath) -> UploadPathNarInfo {
    let base = source
        .path
        .strip_prefix("/nix/store/")
        .expect("a store path");
    UploadPathNarInfo {
        cache: cache.to_owned(),
        store_path_hash: base[..32].to_owned(),
        store_path: source.path.clone(),
        references: source.metadata.references.clone(),
        system: None,
        deriver: None,
        sigs: source.metadata.sigs.clone(),
        ca: source.metadata.ca.clone(),
        nar_hash: format!("sha256:{}", Sha256Hash::digest(&source.nar).to_hex()),
        nar_size: source.nar.len(),
    }
}

fn hash_of(source: &SourcePath) -> String {
    source.path["/nix/store/".len()..][..32].to_owned()
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attic_client_logs_in_creates_pushes_and_uses_a_cache(version: NixVersion) {
        const CACHE: &str = "attic";
        let server = TestServer::sqlite().await;
        let token = server
            .mint(
                "attic-user",
                HOUR,
                &[(
                    CACHE,
                    &[
                        Permission::Pull,
                        Permission::Push,
                        Permission::CreateCache,
                        Permission::ConfigureCache,
                    ],
                )],
            )
            .await;
        // `attic login local URL TOKEN`.
        let login = format!(
            "default-server = \"local\"\n\n[servers.local]\nendpoint = \"{}\"\ntoken = \"{token}\"\n",
            server.url()
        );
        let mut client = AtticClient::from_login_config(&login);

        // `attic cache create attic --upstream-cache-key-name upstream.example-1`.
        client
            .create_cache(
                CACHE,
                &CreateCacheRequest {
                    keypair: "Generate",
                    is_public: false,
                    store_dir: "/nix/store".to_owned(),
                    priority: 41,
                    upstream_cache_key_names: vec!["upstream.example-1".to_owned()],
                },
            )
            .await;

        // `attic push attic PATHS…`: the cache's config, with every field
        // Attic's client reads, then the API endpoint it names.
        let pushing = Pushing::new(6, &token, version).await;
        let config = client.cache_config(CACHE).await;
        assert_eq!(config.is_public, Some(false));
        assert_eq!(config.store_dir.as_deref(), Some("/nix/store"));
        assert_eq!(config.priority, Some(41));
        assert_eq!(
            config.upstream_cache_key_names,
            Some(vec!["upstream.example-1".to_owned()])
        );
        let public_key = config.public_key.expect("a public key");
        assert!(public_key.starts_with("attic-"), "{public_key}");
        let api_endpoint = config.api_endpoint.expect("an API endpoint");
        assert_eq!(api_endpoint.trim_end_matches('/'), server.url());
        client.set_endpoint(&api_endpoint);
        let upstream = config.upstream_cache_key_names.unwrap_or_default();
        let candidates: Vec<&SourcePath> = pushing
            .sources
            .iter()
            .filter(|source| {
                !source.metadata.sigs.iter().any(|sig| {
                    sig.split_once(':')
                        .is_some_and(|(name, _)| upstream.iter().any(|key| key == name))
                })
            })
            .collect();
        assert_eq!(candidates.len(), pushing.sources.len());
        let missing = client
            .missing_paths(
                CACHE,
                candidates.iter().map(|source| hash_of(source)).collect(),
            )
            .await;
        assert_eq!(missing.len(), candidates.len(), "{missing:?}");

        // Every missing path at once, dependents before what they reference
        // (Attic's client keeps no order), half of them with a preamble.
        let uploads = candidates
            .iter()
            .rev()
            .filter(|source| missing.contains(&hash_of(source)))
            .enumerate()
            .map(|(index, source)| {
                let client = client.clone();
                let info = nar_info(CACHE, source);
                let nar = source.nar.clone();
                tokio::spawn(async move { client.upload_path(&info, nar, index % 2 == 0).await })
            })
            .collect::<Vec<_>>();
        for upload in uploads {
            let result = upload
                .await
                .expect("an upload task")
                .expect("an UploadPathResult body");
            assert_eq!(result.kind, UploadPathResultKind::Uploaded);
        }
        // Pushing again: nothing is missing.
        let missing = client
            .missing_paths(
                CACHE,
                candidates.iter().map(|source| hash_of(source)).collect(),
            )
            .await;
        assert!(missing.is_empty(), "{missing:?}");

        // `attic use attic`: nix.conf gets the substituter endpoint and the
        // public key; Nix substitutes the closure with exactly those.
        let config = client.cache_config(CACHE).await;
        let substituter = config.substituter_endpoint.expect("a substituter endpoint");
        assert_eq!(config.public_key.as_deref(), Some(public_key.as_str()));
        pushing.substitute_from(substituter, public_key).await;
        server.stop().await;
    }
}
