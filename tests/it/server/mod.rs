//! `ingest-api` end to end: the server built as the binary builds it
//! (`tests::server::TestServer`), spoken to over real sockets by an HTTP
//! client, by the real Nix client and through the real `ingest-api`
//! binary's commands.
//!
//! Each submodule is one area of issue #3's or #4's acceptance lists. The
//! read-side areas write their data through the store layer
//! (`TestServer::seed_path`), for exact control over chunks; `push` and
//! `crash` push through the API and the real `nix copy`.

mod attic_client;
mod audit;
mod bad_input;
mod cache_config;
mod cli;
mod crash;
mod isolation;
mod key_rotation;
mod logs;
mod nar_reads;
mod nix_client;
mod observability;
mod parts;
mod pins;
pub(crate) mod push;
pub(crate) mod pushing;
mod realisations;
mod serving;
mod small_paths;
mod stats;
mod token_api;
mod tokens;

use std::path::Path;
use std::time::Duration;

use larder_api::v1::ErrorResponse;
use larder_db::ObjectMetadata;
use larder_nix::nar::NarEncoder;
use larder_nix::{NarHash, StorePathHash};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Response, StatusCode};
use tests::nix::{NixEnv, NixVersion};
use tests::server::{HttpApi, RawResponse};

pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// Sends `method path` with an optional bearer token and JSON body.
async fn send(
    server: &impl HttpApi,
    method: Method,
    path: &str,
    token: Option<&str>,
    json: Option<serde_json::Value>,
) -> Response {
    let mut request = server.http().request(method.clone(), server.url_of(path));
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(json) = json {
        request = request.json(&json);
    }
    request
        .send()
        .await
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
}

pub(crate) async fn get(server: &impl HttpApi, path: &str, token: Option<&str>) -> Response {
    send(server, Method::GET, path, token, None).await
}

/// The start of a body, for failure messages (a NAR served where an
/// error was expected is mostly binary).
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned()
}

/// Asserts a successful answer and returns its body.
pub(crate) async fn ok_bytes(response: Response) -> Vec<u8> {
    let status = response.status();
    let url = response.url().clone();
    let body = response.bytes().await.expect("reading the body").to_vec();
    assert_eq!(status, StatusCode::OK, "{url}: {}", excerpt(&body));
    body
}

pub(crate) async fn ok_json<T: serde::de::DeserializeOwned>(response: Response) -> T {
    let body = ok_bytes(response).await;
    serde_json::from_slice(&body)
        .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&body)))
}

/// The response's `Content-Type` (empty when absent or not text).
pub(crate) fn content_type(response: &Response) -> String {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Asserts an API error: the status, a JSON content type, and a body of
/// the documented shape whose `code` repeats the status. Returns the body
/// with the raw bytes, for comparisons between answers.
pub(crate) async fn api_error(response: Response, status: StatusCode) -> (ErrorResponse, Vec<u8>) {
    let url = response.url().clone();
    let actual = response.status();
    let content_type = content_type(&response);
    let body = response.bytes().await.expect("reading the body").to_vec();
    let text = excerpt(&body);
    assert_eq!(actual, status, "{url}: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "{url}: content type {content_type:?} for {text}"
    );
    let error: ErrorResponse = serde_json::from_slice(&body)
        .unwrap_or_else(|error| panic!("{url}: not an error body ({error}): {text}"));
    assert_eq!(error.code, status.as_u16(), "{url}: {text}");
    assert!(
        !error.error.is_empty() && !error.message.is_empty(),
        "{text}"
    );
    (error, body)
}

/// [`api_error`] for a response read off a raw connection.
fn raw_api_error(response: &RawResponse, status: u16) -> ErrorResponse {
    let text = excerpt(&response.body);
    assert_eq!(response.status, status, "{text}");
    let content_type = response.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("application/json"),
        "content type {content_type:?} for {text}"
    );
    let error: ErrorResponse = serde_json::from_slice(&response.body)
        .unwrap_or_else(|error| panic!("not an error body ({error}): {text}"));
    assert_eq!(error.code, status, "{text}");
    error
}

/// A made-up store path, `/nix/store/<random hash>-<name>`.
pub(crate) fn fake_store_path(name: &str) -> String {
    let hash = StorePathHash::from_bytes(&rand::random());
    format!("/nix/store/{hash}-{name}")
}

/// A NAR of one regular file with `contents`.
pub(crate) fn file_nar(contents: &[u8]) -> Vec<u8> {
    let mut encoder = NarEncoder::new(Vec::new()).expect("writing to a Vec");
    encoder.regular(false, contents).expect("a regular file");
    encoder.finish().expect("a complete NAR")
}

/// Metadata for a made-up path with no references, deriver or CA.
pub(crate) fn plain_metadata(store_path: &str) -> ObjectMetadata {
    ObjectMetadata {
        store_path: store_path.to_owned(),
        references: Vec::new(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        ca: None,
    }
}

/// A store path of a real Nix store: its metadata as `nix path-info`
/// reports it, converted to what the store layer keeps, and its NAR.
#[derive(Clone)]
pub(crate) struct SourcePath {
    pub(crate) path: String,
    pub(crate) metadata: ObjectMetadata,
    /// `sha256:<base32>` as the source store recorded it.
    pub(crate) nar_hash: String,
    pub(crate) nar: Vec<u8>,
}

/// An environment of `version` whose store holds one path, the tree
/// `make_tree` writes into the directory it is given, read back as a
/// [`SourcePath`], with a netrc giving `token` to the server.
pub(crate) async fn one_path_env(
    version: NixVersion,
    token: &str,
    make_tree: impl FnOnce(&Path) + Send + 'static,
) -> (NixEnv, String, SourcePath) {
    let token = token.to_owned();
    push::blocking(move || {
        let mut env = NixEnv::with_version(version).expect("a Nix environment");
        let root = env.path("store");
        let tree = env.path("tree");
        make_tree(&tree);
        let path = env.add_path(&root, &tree).expect("adding the tree");
        let source = source_paths(&env, &root, std::slice::from_ref(&path))
            .pop()
            .expect("one path");
        env.use_netrc("127.0.0.1", &token).expect("a netrc");
        (env, path, source)
    })
    .await
}

/// A Nix environment of `version` with a chroot store of three paths under
/// `source`, one of them built (input-addressed, so substituting it needs
/// a trusted signature). `label` and a random salt keep each test's paths
/// its own.
pub(crate) async fn store_with_a_built_path(
    version: NixVersion,
    label: &str,
) -> (NixEnv, tests::nix::TestStore) {
    let salt = format!("{label}-{:016x}", rand::random::<u64>());
    let (env, store) = push::blocking(move || {
        let env = NixEnv::with_version(version).expect("a Nix environment");
        let store = env
            .make_store(&env.path("source"), 3, &salt)
            .expect("a store with a built path");
        (env, store)
    })
    .await;
    assert_eq!(store.built.len(), 1, "a path that needs a signature");
    (env, store)
}

/// Reads `paths` of the chroot store at `root`: `nix path-info --json`
/// for the metadata and `nix-store --dump` for each NAR, checking that the
/// dump matches the recorded hash and size.
pub(crate) fn source_paths(env: &NixEnv, root: &Path, paths: &[String]) -> Vec<SourcePath> {
    let mut infos = env.path_infos(root, paths).expect("nix path-info --json");
    assert_eq!(infos.len(), paths.len(), "{infos:?}");
    // Nix lists them sorted; callers get them in the order they asked.
    let position =
        |info: &serde_json::Value| paths.iter().position(|path| info["path"] == path.as_str());
    infos.sort_by_key(|info| position(info).unwrap_or(usize::MAX));
    let base_name = |full: &str| {
        full.strip_prefix("/nix/store/")
            .unwrap_or_else(|| panic!("{full} is not in /nix/store"))
            .to_owned()
    };
    infos
        .iter()
        .map(|info| {
            let path = info["path"].as_str().expect("path").to_owned();
            let nar = env
                .dump(&tests::nix::physical_path(root, &path))
                .expect("nix-store --dump");
            let nar_hash = env.nar_hash(root, &path).expect("nix-store --query --hash");
            let recorded = NarHash::parse(info["narHash"].as_str().expect("narHash"))
                .expect("an SRI NAR hash");
            assert_eq!(
                NarHash::from(larder_nix::Sha256Hash::digest(&nar)),
                recorded,
                "the dump of {path} has the recorded NAR hash"
            );
            assert_eq!(Some(nar.len() as u64), info["narSize"].as_u64(), "{path}");
            let strings = |key: &str| -> Vec<String> {
                info[key]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|item| item.as_str().expect("a string").to_owned())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let metadata = ObjectMetadata {
                store_path: path.clone(),
                references: strings("references")
                    .iter()
                    .map(|reference| base_name(reference))
                    .collect(),
                deriver: info["deriver"].as_str().map(base_name),
                system: None,
                sigs: strings("signatures"),
                ca: info["ca"].as_str().map(str::to_owned),
            };
            SourcePath {
                path,
                metadata,
                nar_hash,
                nar,
            }
        })
        .collect()
}

/// One GC pass over `server`'s database and storage with the default
/// settings, two days from now: past the day GC leaves a pushed file's
/// name or a realisation (each may be recorded before its path's object).
pub(crate) async fn gc_two_days_on(
    server: &tests::server::TestServer,
) -> gc_scheduler::gc::GcReport {
    let storage = larder_storage::open(&server.config().storage)
        .await
        .expect("the server's storage");
    gc_scheduler::gc::collect_garbage(
        server.database(),
        &*storage,
        &larder_config::GcConfig::default(),
        larder_db::Timestamp::now().saturating_add(std::time::Duration::from_secs(2 * 24 * 3600)),
    )
    .await
    .expect("a GC run")
}
