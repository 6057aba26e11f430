//! The push endpoints (issue #4): Attic's `get-missing-paths` and
//! `upload-path`, Nix's own PUT protocol driven by the real `nix copy`,
//! the upload status, verification at the door, and pushes of NARs that
//! are stored already.
//!
//! The first group needs only the push endpoints: uploads are checked up
//! to the point where they are acknowledged (verified, spooled, recorded,
//! job published), with `X-Larder-Wait: 0` or a `wait-for-visible` of 0.
//! The last group (`pipeline_*`) needs the chunker and compressor to make
//! pushed paths visible.

use std::path::{Path, PathBuf};
use std::time::Duration;

use larder_api::duration::HumanDuration;
use larder_api::v1::{
    GetMissingPathsResponse, UploadPathResult, UploadPathResultKind, UploadStatus,
};
use larder_config::IngestConfig;
use larder_db::{Timestamp, Upload, UploadPhase};
use larder_nix::{NarHash, Sha256Hash, StorePathHash};
use larder_token::Permission;
use reqwest::header::AUTHORIZATION;
use reqwest::{Method, Response, StatusCode};
use serde_json::json;
use tests::nix::{NixEnv, NixVersion};
use tests::server::{count_files, HttpApi, TestServer, TestServerOptions};

use super::{
    api_error, fake_store_path, file_nar, get, ok_json, plain_metadata, send, source_paths,
    SourcePath, HOUR,
};

const CACHE: &str = "push";

/// A server that answers pushes as soon as they are acknowledged.
async fn server_with(ingest: IngestConfig) -> TestServer {
    let server = TestServer::start(TestServerOptions {
        ingest,
        ..TestServerOptions::default()
    })
    .await;
    server.create_cache(CACHE, false).await;
    server
}

fn no_wait() -> IngestConfig {
    IngestConfig {
        wait_for_visible: HumanDuration::from_secs(0),
        ..IngestConfig::default()
    }
}

async fn push_token(server: &TestServer) -> String {
    server
        .mint(
            "pusher",
            HOUR,
            &[(CACHE, &[Permission::Pull, Permission::Push])],
        )
        .await
}

pub(crate) fn hash_of(store_path: &str) -> String {
    store_path["/nix/store/".len().."/nix/store/".len() + 32].to_owned()
}

/// Attic's `X-Attic-Nar-Info` for a path of `cache` with this NAR, as
/// Attic's client writes it (hex NAR hash, base-name references).
pub(crate) fn attic_info(cache: &str, store_path: &str, nar: &[u8]) -> serde_json::Value {
    json!({
        "cache": cache,
        "store_path_hash": hash_of(store_path),
        "store_path": store_path,
        "references": [],
        "system": null,
        "deriver": null,
        "sigs": [],
        "ca": null,
        "nar_hash": format!("sha256:{}", Sha256Hash::digest(nar).to_hex()),
        "nar_size": nar.len(),
    })
}

/// How the metadata travels.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Form {
    Header,
    Preamble,
}

pub(crate) async fn upload(
    server: &impl HttpApi,
    token: Option<&str>,
    info: &serde_json::Value,
    nar: &[u8],
    form: Form,
) -> Response {
    let json = info.to_string();
    let mut request = server
        .http()
        .put(server.url_of("/_api/v1/upload-path"))
        .header("X-Larder-Wait", "0");
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    request = match form {
        Form::Header => request.header("X-Attic-Nar-Info", json).body(nar.to_vec()),
        Form::Preamble => request
            .header("X-Attic-Nar-Info-Preamble-Size", json.len())
            .body([json.as_bytes(), nar].concat()),
    };
    request.send().await.expect("sending upload-path")
}

/// Pushes `store_path` holding `nar` into `cache` through `upload-path`,
/// waiting (the server's default) until it is visible.
pub(crate) async fn push_visible(
    server: &impl HttpApi,
    token: &str,
    cache: &str,
    store_path: &str,
    nar: &[u8],
) {
    let info = attic_info(cache, store_path, nar);
    let response = server
        .http()
        .put(server.url_of("/_api/v1/upload-path"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header("X-Attic-Nar-Info", info.to_string())
        .body(nar.to_vec())
        .send()
        .await
        .expect("sending upload-path");
    let result: serde_json::Value = ok_json(response).await;
    assert_eq!(result["phase"], "done", "{result}");
}

pub(crate) async fn all_uploads(server: &TestServer) -> Vec<Upload> {
    server
        .database()
        .stuck_uploads(
            &UploadPhase::ALL,
            Timestamp::now().saturating_add(HOUR),
            10_000,
        )
        .await
        .expect("listing uploads")
}

pub(crate) fn staging_files(server: &TestServer) -> Vec<PathBuf> {
    match std::fs::read_dir(server.dir().join("storage/staging")) {
        Ok(entries) => entries
            .map(|entry| entry.expect("an entry").path())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Nothing of a rejected push is visible or kept, and the server serves.
async fn assert_nothing_kept(server: &TestServer, token: &str) {
    assert!(
        all_uploads(server).await.is_empty(),
        "no upload is recorded"
    );
    let cache = server
        .database()
        .cache_by_name(&CACHE.parse().expect("a name"))
        .await
        .expect("the cache")
        .expect("the cache exists");
    assert!(
        server
            .database()
            .objects_of_cache(cache.id)
            .await
            .expect("objects")
            .is_empty(),
        "no object is visible"
    );
    assert_eq!(
        staging_files(server),
        Vec::<PathBuf>::new(),
        "nothing staged"
    );
    let info = get(server, &format!("/{CACHE}/nix-cache-info"), Some(token)).await;
    assert_eq!(info.status(), StatusCode::OK, "the server keeps serving");
}

/// A NAR written token by token, for archives the encoder refuses to make.
fn raw_nar(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for token in tokens {
        out.extend_from_slice(&(token.len() as u64).to_le_bytes());
        out.extend_from_slice(token);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_path_is_acknowledged_in_both_forms_and_counts_as_present() {
    let server = server_with(IngestConfig::default()).await;
    let token = push_token(&server).await;
    let mut acknowledged = Vec::new();
    for form in [Form::Header, Form::Preamble] {
        let store_path = fake_store_path("pushed");
        let nar = file_nar(format!("contents of {store_path}").as_bytes());
        let result: UploadPathResult = ok_json(
            upload(
                &server,
                Some(&token),
                &attic_info(CACHE, &store_path, &nar),
                &nar,
                form,
            )
            .await,
        )
        .await;
        assert_eq!(result.kind, UploadPathResultKind::Uploaded, "{form:?}");
        let id = result.upload_id.expect("an upload id");
        let upload = server
            .database()
            .upload(&id.parse().expect("an upload id"))
            .await
            .expect("reading the upload")
            .expect("the upload is recorded");
        assert_eq!(upload.metadata.store_path, store_path);
        assert_eq!(upload.nar_hash, NarHash::from(Sha256Hash::digest(&nar)));
        assert!(
            upload.staged_key.starts_with("staging/"),
            "{}",
            upload.staged_key
        );
        let staged = std::fs::read(server.dir().join("storage").join(&upload.staged_key))
            .expect("the staged NAR");
        assert_eq!(staged, nar, "the staged NAR is the NAR");

        let status: UploadStatus =
            ok_json(get(&server, &format!("/_api/v1/uploads/{id}"), Some(&token)).await).await;
        assert_eq!(status.id, id);
        assert_eq!(status.cache, CACHE);
        assert_eq!(status.store_path, store_path);
        assert_eq!(status.nar_size, nar.len() as u64);
        assert!(status.error.is_none());
        acknowledged.push(hash_of(&store_path));
    }

    let absent = hash_of(&fake_store_path("absent"));
    let mut asked = acknowledged.clone();
    asked.push(absent.clone());
    let missing: GetMissingPathsResponse = ok_json(
        send(
            &server,
            Method::POST,
            "/_api/v1/get-missing-paths",
            Some(&token),
            Some(json!({"cache": CACHE, "store_path_hashes": asked})),
        )
        .await,
    )
    .await;
    // Present as in-flight uploads (or, once the pipeline has run, as
    // objects): only the path never pushed is missing.
    assert_eq!(missing.missing_paths, vec![absent]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_4xx_and_leave_nothing() {
    let server = server_with(IngestConfig {
        max_preamble_size: 4096,
        ..IngestConfig::default()
    })
    .await;
    let token = push_token(&server).await;
    let store_path = fake_store_path("bad");
    let nar = file_nar(&vec![42u8; 10_000]);
    let info = attic_info(CACHE, &store_path, &nar);
    let with = |key: &str, value: serde_json::Value| {
        let mut info = info.clone();
        info[key] = value;
        info
    };
    let dotdot = raw_nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"..",
        b"node",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b")",
        b")",
        b")",
    ]);
    let other_hash = hash_of(&fake_store_path("other"));
    // Each case with the one status that is right for it.
    let cases: Vec<(&str, serde_json::Value, Vec<u8>, Form, StatusCode)> = vec![
        (
            "wrong NarHash",
            with(
                "nar_hash",
                json!(format!("sha256:{}", Sha256Hash::digest(b"x").to_hex())),
            ),
            nar.clone(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong NarSize",
            with("nar_size", json!(nar.len() + 8)),
            nar.clone(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "truncated body",
            info.clone(),
            nar[..nar.len() - 16].to_vec(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "not a NAR",
            attic_info(CACHE, &store_path, b"just some bytes"),
            b"just some bytes".to_vec(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "a .. entry",
            attic_info(CACHE, &store_path, &dotdot),
            dotdot.clone(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "store path not matching its hash",
            with("store_path_hash", json!(other_hash)),
            nar.clone(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid reference names",
            with("references", json!(["not a store path"])),
            nar.clone(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "a reference given as a full path",
            with("references", json!([fake_store_path("dep")])),
            nar.clone(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
        (
            "oversized preamble",
            with("system", json!("x".repeat(5000))),
            nar.clone(),
            Form::Preamble,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "garbage metadata",
            json!({"cache": CACHE}),
            nar.clone(),
            Form::Header,
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (case, info, body, form, status) in cases {
        let response = upload(&server, Some(&token), &info, &body, form).await;
        eprintln!("{case}: {}", response.status());
        let (error, _) = api_error(response, status).await;
        eprintln!("{case}: {} {}", error.error, error.message);
        assert_nothing_kept(&server, &token).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_needs_push_permission_without_revealing_caches() {
    let server = server_with(no_wait()).await;
    let pusher = push_token(&server).await;
    let puller = server
        .mint("puller", HOUR, &[(CACHE, &[Permission::Pull])])
        .await;
    let stranger = server
        .mint("stranger", HOUR, &[("elsewhere", &[Permission::Push])])
        .await;
    let store_path = fake_store_path("guarded");
    let nar = file_nar(b"guarded");
    let info = attic_info(CACHE, &store_path, &nar);
    let missing_request = json!({"cache": CACHE, "store_path_hashes": [hash_of(&store_path)]});
    let ask = |token: Option<String>| {
        let server = &server;
        let body = missing_request.clone();
        async move {
            send(
                server,
                Method::POST,
                "/_api/v1/get-missing-paths",
                token.as_deref(),
                Some(body),
            )
            .await
        }
    };

    api_error(ask(Some(puller.clone())).await, StatusCode::FORBIDDEN).await;
    api_error(ask(Some(stranger.clone())).await, StatusCode::NOT_FOUND).await;
    api_error(ask(None).await, StatusCode::UNAUTHORIZED).await;
    let (missing_cache, _) = api_error(
        send(
            &server,
            Method::POST,
            "/_api/v1/get-missing-paths",
            Some(&stranger),
            Some(json!({"cache": "no-such-cache", "store_path_hashes": []})),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(missing_cache.error, "NoSuchCache");

    for (token, status) in [
        (Some(puller.as_str()), StatusCode::FORBIDDEN),
        (Some(stranger.as_str()), StatusCode::NOT_FOUND),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let response = upload(&server, token, &info, &nar, Form::Header).await;
        api_error(response, status).await;
    }
    assert_nothing_kept(&server, &pusher).await;

    let result: UploadPathResult =
        ok_json(upload(&server, Some(&pusher), &info, &nar, Form::Header).await).await;
    let id = result.upload_id.expect("an upload id");
    let status_path = format!("/_api/v1/uploads/{id}");
    let (hidden, _) = api_error(
        get(&server, &status_path, Some(&puller)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let (absent, _) = api_error(
        get(
            &server,
            &format!("/_api/v1/uploads/{}", "0".repeat(32)),
            Some(&puller),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(hidden, absent, "an upload one may not follow looks missing");
    api_error(
        get(&server, &status_path, None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    api_error(
        get(&server, "/_api/v1/uploads/not-an-id", Some(&pusher)).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_nar_is_linked_by_the_pipeline_after_proof_of_possession() {
    let server = server_with(IngestConfig::default()).await;
    server.create_cache("origin", false).await;
    let token = push_token(&server).await;
    let nar = file_nar(&vec![9u8; 200_000]);
    let seeded = server
        .seed_path("origin", plain_metadata(&fake_store_path("origin")), &nar)
        .await;

    // A wrong body is no proof: 400, nothing linked.
    let store_path = fake_store_path("dedup");
    let info = attic_info(CACHE, &store_path, &nar);
    let mut wrong = nar.clone();
    let middle = wrong.len() / 2;
    wrong[middle] ^= 1;
    let response = upload(&server, Some(&token), &info, &wrong, Form::Header).await;
    api_error(response, StatusCode::BAD_REQUEST).await;
    assert_nothing_kept(&server, &token).await;

    // The right body: acknowledged like any push (the answer must not say
    // that another cache holds the NAR), then linked by the pipeline.
    let chunks_before = packs_stored(&server);
    let result: UploadPathResult =
        ok_json(upload(&server, Some(&token), &info, &nar, Form::Header).await).await;
    assert_eq!(result.kind, UploadPathResultKind::Uploaded);
    assert_eq!(result.phase, "spooled");
    let id = result.upload_id.expect("an upload id");
    pipeline_settles(&server).await;
    let upload = server
        .database()
        .upload(&id.parse().expect("an upload id"))
        .await
        .expect("reading the upload")
        .expect("the upload");
    assert_eq!(
        upload.nar_id,
        Some(seeded.nar.id),
        "linked to the stored NAR"
    );
    assert_eq!(packs_stored(&server), chunks_before, "nothing stored again");
    assert!(staging_files(&server).is_empty(), "nothing left staged");
    let narinfo = get(
        &server,
        &format!("/{CACHE}/{}.narinfo", hash_of(&store_path)),
        Some(&token),
    )
    .await;
    assert_eq!(narinfo.status(), StatusCode::OK, "visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_proof_of_possession_the_body_is_not_read() {
    let server = server_with(IngestConfig {
        require_proof_of_possession: false,
        ..IngestConfig::default()
    })
    .await;
    server.create_cache("origin", false).await;
    let token = push_token(&server).await;
    let nar = file_nar(b"known to the server");
    server
        .seed_path("origin", plain_metadata(&fake_store_path("origin")), &nar)
        .await;
    let store_path = fake_store_path("claimed");
    let result: UploadPathResult = ok_json(
        upload(
            &server,
            Some(&token),
            &attic_info(CACHE, &store_path, &nar),
            b"",
            Form::Header,
        )
        .await,
    )
    .await;
    // Linked unread, and so answered at once without an upload: this mode
    // tells a pusher that the NAR was stored (README, `[ingest]`).
    assert_eq!(result.kind, UploadPathResultKind::Uploaded);
    assert_eq!(result.upload_id, None);
    assert_eq!(result.phase, "done");
    let narinfo = get(
        &server,
        &format!("/{CACHE}/{}.narinfo", hash_of(&store_path)),
        Some(&token),
    )
    .await;
    assert_eq!(narinfo.status(), StatusCode::OK, "visible at once");
}

/// `PUT` of a Nix upload file with a push token (Basic, as Nix sends it).
pub(crate) async fn nix_put(
    server: &TestServer,
    token: &str,
    path: &str,
    body: Vec<u8>,
) -> Response {
    server
        .http()
        .put(server.url_of(path))
        .basic_auth("", Some(token))
        .body(body)
        .send()
        .await
        .expect("sending a PUT")
}

/// A narinfo as Nix writes it for an uncompressed NAR.
pub(crate) fn nix_narinfo(
    store_path: &str,
    nar: &[u8],
    nar_hash_of: &[u8],
    references: &str,
) -> String {
    let file_hash = Sha256Hash::digest(nar).to_base32();
    let nar_hash = Sha256Hash::digest(nar_hash_of).to_base32();
    format!(
        "StorePath: {store_path}\nURL: nar/{file_hash}.nar\nCompression: none\n\
         FileHash: sha256:{file_hash}\nFileSize: {}\nNarHash: sha256:{nar_hash}\n\
         NarSize: {}\nReferences: {references}\n",
        nar.len(),
        nar.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_nix_puts_are_4xx_and_leave_nothing() {
    let server = server_with(no_wait()).await;
    let token = push_token(&server).await;
    let nar_path =
        |body: &[u8]| format!("/{CACHE}/nar/{}.nar", Sha256Hash::digest(body).to_base32());

    // Garbage narinfo.
    let hash = hash_of(&fake_store_path("garbage"));
    let response = nix_put(
        &server,
        &token,
        &format!("/{CACHE}/{hash}.narinfo"),
        b"\x00garbage".to_vec(),
    )
    .await;
    api_error(response, StatusCode::BAD_REQUEST).await;
    assert_nothing_kept(&server, &token).await;

    // A NAR file that is not a NAR, then the narinfo naming it.
    let not_a_nar = b"this is not a NAR at all".to_vec();
    let response = nix_put(&server, &token, &nar_path(&not_a_nar), not_a_nar.clone()).await;
    api_error(response, StatusCode::BAD_REQUEST).await;
    assert_nothing_kept(&server, &token).await;
    let store_path = fake_store_path("not-a-nar");
    let narinfo = nix_narinfo(&store_path, &not_a_nar, &not_a_nar, "");
    let response = nix_put(
        &server,
        &token,
        &format!("/{CACHE}/{}.narinfo", hash_of(&store_path)),
        narinfo.into_bytes(),
    )
    .await;
    api_error(response, StatusCode::BAD_REQUEST).await;
    assert_nothing_kept(&server, &token).await;

    // A NAR file whose bytes do not hash to its name.
    let nar = file_nar(b"a real NAR");
    let response = nix_put(&server, &token, &nar_path(b"something else"), nar.clone()).await;
    api_error(response, StatusCode::BAD_REQUEST).await;
    assert_nothing_kept(&server, &token).await;

    // A good NAR file, then narinfos that do not fit it: each leaves the
    // staged file waiting (the bytes were verified; the narinfo is what is
    // wrong), and the file PUT again before each is kept once.
    let store_path = fake_store_path("good");
    let hash = hash_of(&store_path);
    let narinfo_path = format!("/{CACHE}/{hash}.narinfo");
    let other = fake_store_path("other");
    let bad_narinfos = [
        (
            "wrong NarHash",
            nix_narinfo(&store_path, &nar, b"other bytes", ""),
        ),
        (
            "wrong NarSize",
            nix_narinfo(&store_path, &nar, &nar, "").replace(
                &format!("NarSize: {}", nar.len()),
                &format!("NarSize: {}", nar.len() + 8),
            ),
        ),
        (
            "store path not matching its hash",
            nix_narinfo(&other, &nar, &nar, ""),
        ),
        (
            "invalid reference names",
            nix_narinfo(&store_path, &nar, &nar, "not/a-reference"),
        ),
        (
            "another store directory",
            nix_narinfo(
                &store_path.replace("/nix/store", "/gnu/store"),
                &nar,
                &nar,
                "",
            ),
        ),
    ];
    for (case, narinfo) in bad_narinfos {
        let response = nix_put(&server, &token, &nar_path(&nar), nar.clone()).await;
        assert_eq!(
            response.status(),
            StatusCode::NO_CONTENT,
            "{case}: staging the NAR"
        );
        let response = nix_put(&server, &token, &narinfo_path, narinfo.into_bytes()).await;
        eprintln!("{case}: {}", response.status());
        api_error(response, StatusCode::BAD_REQUEST).await;
        assert!(all_uploads(&server).await.is_empty(), "{case}");
        assert!(
            staging_files(&server).len() <= 1,
            "{case}: a re-PUT keeps one staged copy"
        );
    }
    // The last staged copy is still there: HEAD finds it.
    let head = server
        .http()
        .head(server.url_of(&nar_path(&nar)))
        .basic_auth("", Some(&token))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(staging_files(&server).len(), 1);

    // Nix's other files are accepted; a foreign store directory is not.
    let accepted = nix_put(
        &server,
        &token,
        &format!("/{CACHE}/nix-cache-info"),
        b"StoreDir: /nix/store\n".to_vec(),
    )
    .await;
    assert_eq!(accepted.status(), StatusCode::NO_CONTENT);
    let refused = nix_put(
        &server,
        &token,
        &format!("/{CACHE}/nix-cache-info"),
        b"StoreDir: /gnu/store\n".to_vec(),
    )
    .await;
    api_error(refused, StatusCode::BAD_REQUEST).await;
    let listing = nix_put(
        &server,
        &token,
        &format!("/{CACHE}/{hash}.ls"),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(listing.status(), StatusCode::NO_CONTENT);
    let drv = format!("{}-x.drv", hash_of(&fake_store_path("x")));
    let log = nix_put(
        &server,
        &token,
        &format!("/{CACHE}/log/{drv}"),
        b"log".to_vec(),
    )
    .await;
    assert_eq!(log.status(), StatusCode::NO_CONTENT);
}

/// Runs a blocking Nix step off the async runtime's workers.
pub(crate) async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(step)
        .await
        .expect("the Nix step panicked")
}

/// An environment of `version` with a store of `n` referencing paths,
/// signed by a pusher key, and a netrc with `token` for the server.
pub(crate) async fn pushing_env(
    version: NixVersion,
    n: usize,
    token: String,
) -> (NixEnv, PathBuf, Vec<String>) {
    blocking(move || {
        let mut env = NixEnv::with_version(version).expect("a Nix environment");
        let salt = format!("push-{:016x}", rand::random::<u64>());
        let store = env
            .make_store(&env.path("source"), n, &salt)
            .expect("a store of referencing paths");
        let pusher = env.keygen("pusher-1").expect("a pusher key");
        env.sign(&store.root, &pusher.secret_key_file, &store.paths)
            .expect("signing");
        env.use_netrc("127.0.0.1", &token).expect("a netrc");
        let root = store.root.clone();
        (env, root, store.paths)
    })
    .await
}

pub(crate) fn nix_copy_to(env: &NixEnv, root: &Path, url: &str, paths: &[String]) {
    env.copy_to(root, url, paths)
        .unwrap_or_else(|error| panic!("nix copy --to {url}: {error}"));
}

tests::under_each_nix! {
    /// `nix copy --to` for each compression is acknowledged with one upload per
    /// path of the closure, each holding the pusher's signature and, staged, the
    /// NAR it names. No chunker runs, so every upload is still waiting with its
    /// staged NAR when it is checked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nix_copy_to_is_acknowledged_for_zstd_xz_and_none(version: NixVersion) {
        let server = TestServer::start(TestServerOptions {
            ingest: no_wait(),
            edit_config: Some(std::sync::Arc::new(|config| {
                config.pipeline.chunk_concurrency = 0;
            })),
            ..TestServerOptions::default()
        })
        .await;
        for compression in ["zstd", "xz", "none"] {
            let cache = format!("nix-{compression}");
            server.create_cache(&cache, false).await;
            let token = server
                .mint(
                    "nix",
                    HOUR,
                    &[(&cache, &[Permission::Pull, Permission::Push])],
                )
                .await;
            let (env, root, paths) = pushing_env(version, 4, token).await;
            let url = format!("{}?compression={compression}", server.cache_url(&cache));
            let closure = {
                let (root, paths, url) = (root.clone(), paths.clone(), url.clone());
                blocking(move || {
                    nix_copy_to(&env, &root, &url, &paths);
                    env.closure(&root, &paths).expect("the closure")
                })
                .await
            };
            let cache_row = server
                .database()
                .cache_by_name(&cache.parse().expect("a name"))
                .await
                .expect("the cache")
                .expect("it exists");
            let uploads: Vec<Upload> = all_uploads(&server)
                .await
                .into_iter()
                .filter(|upload| upload.cache_id == cache_row.id)
                .collect();
            let mut pushed: Vec<&str> = uploads
                .iter()
                .map(|upload| upload.metadata.store_path.as_str())
                .collect();
            pushed.sort_unstable();
            let mut expected: Vec<&str> = closure.iter().map(String::as_str).collect();
            expected.sort_unstable();
            assert_eq!(pushed, expected, "{compression}: one upload per path");
            for upload in &uploads {
                assert!(
                    !upload.metadata.sigs.is_empty(),
                    "the pusher's signature is kept"
                );
                assert_eq!(upload.phase, UploadPhase::Spooled, "{compression}");
                let staged = server.dir().join("storage").join(&upload.staged_key);
                let nar = std::fs::read(&staged)
                    .unwrap_or_else(|error| panic!("{compression}: {}: {error}", staged.display()));
                assert_eq!(NarHash::from(Sha256Hash::digest(&nar)), upload.nar_hash);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Needs the pipeline (chunker and compressor) to make pushed paths visible.
// ---------------------------------------------------------------------------

/// Waits until every upload of the server is done.
async fn pipeline_settles(server: &TestServer) {
    for _ in 0..600 {
        let uploads = all_uploads(server).await;
        if let Some(failed) = uploads
            .iter()
            .find(|upload| upload.phase == UploadPhase::Failed)
        {
            panic!("upload failed: {:?}", failed.error);
        }
        if uploads
            .iter()
            .all(|upload| upload.phase == UploadPhase::Done)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("uploads did not finish within a minute");
}

/// The number of packs (chunk data objects) in the server's storage.
fn packs_stored(server: &TestServer) -> usize {
    count_files(&server.dir().join("storage").join("packs"))
}

/// Attic's `X-Attic-Nar-Info` for `source` in `cache`.
pub(crate) fn attic_source_info(source: &SourcePath, cache: &str) -> serde_json::Value {
    let mut info = attic_info(cache, &source.path, &source.nar);
    info["references"] = json!(source.metadata.references);
    info["deriver"] = json!(source.metadata.deriver);
    info["sigs"] = json!(source.metadata.sigs);
    info["ca"] = json!(source.metadata.ca);
    info
}

/// Pushes `closure` (dependencies first) through Attic's `upload-path`,
/// each answered once visible.
pub(crate) async fn attic_push(
    server: &impl HttpApi,
    token: &str,
    cache: &str,
    sources: &[SourcePath],
) {
    for source in sources {
        let response = server
            .http()
            .put(server.url_of("/_api/v1/upload-path"))
            .bearer_auth(token)
            .header(
                "X-Attic-Nar-Info",
                attic_source_info(source, cache).to_string(),
            )
            .body(source.nar.clone())
            .send()
            .await
            .expect("upload-path");
        let result: UploadPathResult = ok_json(response).await;
        assert_eq!(result.phase, "done", "{}", source.path);
    }
}

pub(crate) async fn public_key_of(server: &impl HttpApi, token: &str, cache: &str) -> String {
    let config: larder_api::v1::CacheConfig = ok_json(
        get(
            server,
            &format!("/_api/v1/cache-config/{cache}"),
            Some(token),
        )
        .await,
    )
    .await;
    config.public_key.expect("a public key")
}

tests::under_each_nix! {
    /// `version` pushes a closure with `nix copy --to`, in each
    /// compression Nix writes (a current Nix compressing its narinfos and `.ls`
    /// listings too), then substitutes it on the same machine (into
    /// another store, its narinfo disk cache kept: the narinfos it wrote, naming
    /// its own files) and verifies it with a fresh cache. A path the pusher
    /// substitutes again is served under the name and compression its own
    /// narinfo says, and that name goes once GC finds the NAR gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipeline_nix_copy_to_then_substitute_and_verify(version: NixVersion) {
        let server = server_with(IngestConfig::default()).await;
        for compression in ["xz", "zstd", "none"] {
            let cache = format!("own-{compression}");
            server.create_cache(&cache, false).await;
            let token = server
                .mint(
                    "pusher",
                    HOUR,
                    &[(&cache, &[Permission::Pull, Permission::Push])],
                )
                .await;
            let (env, root, paths) = pushing_env(version, 6, token.clone()).await;
            // A current Nix (2.33 on) also compresses the narinfo and the `.ls`
            // listing it uploads (sent with a `Content-Encoding`), each in its
            // own way here.
            let extra = match (version, compression) {
                (NixVersion::Current, "xz") => {
                    "&narinfo-compression=xz&ls-compression=br&write-nar-listing=true"
                }
                (NixVersion::Current, "zstd") => {
                    "&narinfo-compression=zstd&ls-compression=gzip&write-nar-listing=true"
                }
                _ => "",
            };
            let url = format!(
                "{}?compression={compression}{extra}",
                server.cache_url(&cache)
            );
            let public_key = public_key_of(&server, &token, &cache).await;
            let cache_url = server.cache_url(&cache);
            let paths = blocking(move || {
                nix_copy_to(&env, &root, &url, &paths);
                // The narinfos Nix cached are the ones it wrote, with its own
                // signature (the pusher's key) and not the cache's: a machine
                // trusts the key it signs its builds with.
                let pusher_key = env
                    .public_key(&env.path("pusher-1.secret"))
                    .expect("the pusher's public key");
                let trusted = format!("{public_key} {pusher_key}");
                let destination = env.path("destination");
                env.copy_from(&cache_url, &destination, &trusted, &paths)
                    .unwrap_or_else(|error| {
                        panic!("{compression}: the pusher substituting its own push: {error}")
                    });
                // A fresh narinfo cache: Larder's own narinfos and NAR names.
                let mut verifier = NixEnv::with_version(version).expect("a Nix environment");
                verifier.use_netrc("127.0.0.1", &token).expect("a netrc");
                let verified = verifier
                    .store_verify(&cache_url, &public_key, &paths)
                    .expect("nix store verify");
                assert!(verified.status.success(), "{compression}: {verified:?}");
                paths
            })
            .await;
            // The names the pusher gave its NAR files are Larder's to serve
            // only while the cache serves the NARs.
            let names: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM nar_file_names n JOIN caches c ON c.id = n.cache_id \
                 WHERE c.name = $1",
            )
            .bind(&cache)
            .fetch_one(server.database().pool())
            .await
            .expect("counting names");
            assert_eq!(names as usize, paths.len(), "{compression}");
        }
        // The paths gone from a cache, GC (a day on: a name is kept that long,
        // since it is recorded before its path's object exists) deletes their
        // names there and only there.
        let gone = server
            .database()
            .cache_by_name(&"own-xz".parse().expect("a name"))
            .await
            .expect("the cache")
            .expect("it exists");
        let hashes: Vec<StorePathHash> =
            sqlx::query_scalar::<_, String>("SELECT store_path_hash FROM objects WHERE cache_id = $1")
                .bind(gone.id.0)
                .fetch_all(server.database().pool())
                .await
                .expect("the cache's paths")
                .iter()
                .map(|hash| StorePathHash::parse(hash).expect("a path hash"))
                .collect();
        server
            .database()
            .delete_objects(gone.id, &hashes)
            .await
            .expect("deleting the paths");
        let report = crate::server::gc_two_days_on(&server).await;
        assert_eq!(report.nar_file_names, hashes.len() as u64, "{report:?}");
        let left: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT cache_id, COUNT(*) FROM nar_file_names GROUP BY cache_id ORDER BY cache_id",
        )
        .fetch_all(server.database().pool())
        .await
        .expect("counting names");
        assert!(
            left.iter().all(|(cache_id, _)| *cache_id != gone.id.0) && left.len() == 2,
            "{left:?}"
        );
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipeline_attic_push_then_substitute(version: NixVersion) {
        let server = server_with(IngestConfig::default()).await;
        let token = push_token(&server).await;
        let (env, root, paths) = pushing_env(version, 5, token.clone()).await;
        let (env, root, closure) = blocking(move || {
            let closure = env.closure(&root, &paths).expect("the closure");
            (env, root, closure)
        })
        .await;
        let sources = source_paths(&env, &root, &closure);
        // Dependencies first, as a client pushes them.
        attic_push(&server, &token, CACHE, &sources).await;
        pipeline_settles(&server).await;
        let public_key = public_key_of(&server, &token, CACHE).await;
        let cache_url = server.cache_url(CACHE);
        blocking(move || {
            let destination = env.path("destination");
            env.copy_from(&cache_url, &destination, &public_key, &closure)
                .expect("substituting what was pushed");
        })
        .await;
    }
}

tests::under_each_nix! {
    /// Issue #4's end-to-end acceptance: a closure of 20 referencing paths
    /// plus a 50 MiB path, pushed by the real `nix copy --to` with zstd and
    /// with none, and through Attic's API, each into its own cache; a fresh
    /// store substitutes the whole closure from each cache trusting only that
    /// cache's key, and `nix store verify` passes against each. Every push
    /// after the first stores no new chunk object: the dedup is global.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heavy_pipeline_a_closure_with_a_large_path_through_both_protocols(version: NixVersion) {
        let server = server_with(IngestConfig::default()).await;
        let caches = ["via-zstd", "via-none", "via-attic", "via-attic-again"];
        for cache in caches {
            server.create_cache(cache, false).await;
        }
        let grants: Vec<(&str, &[Permission])> = caches
            .iter()
            .map(|cache| (*cache, &[Permission::Pull, Permission::Push][..]))
            .collect();
        let token = server.mint("pusher", HOUR, &grants).await;

        let (env, root, paths) = pushing_env(version, 20, token.clone()).await;
        let (mut env, root, closure) = blocking(move || {
            // 50 MiB of text-like bytes (words from a small alphabet), so the
            // NAR is cut into many chunks and compresses like real data.
            let large = env.path("large-input");
            std::fs::create_dir_all(&large).expect("a directory");
            let words: Vec<u8> = tests::server::pseudo_random(50 << 20, 0x1a29e)
                .into_iter()
                .map(|byte| b"abcdefgh ijklmnop\n"[usize::from(byte) % 18])
                .collect();
            std::fs::write(large.join("data.txt"), &words).expect("writing the large file");
            let large_path = env.add_path(&root, &large).expect("adding the large path");
            let mut paths = paths;
            paths.push(large_path.trim().to_owned());
            let closure = env.closure(&root, &paths).expect("the closure");
            (env, root, closure)
        })
        .await;
        assert!(closure.len() >= 21, "{closure:?}");

        // Nix's own protocol: zstd first (all chunks new), then none.
        let mut stored_after_first_push = 0;
        for (cache, compression) in [("via-zstd", "zstd"), ("via-none", "none")] {
            let url = format!("{}?compression={compression}", server.cache_url(cache));
            let (root_copy, closure_copy) = (root.clone(), closure.clone());
            env = blocking(move || {
                nix_copy_to(&env, &root_copy, &url, &closure_copy);
                env
            })
            .await;
            pipeline_settles(&server).await;
            if stored_after_first_push == 0 {
                stored_after_first_push = packs_stored(&server);
                let chunks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chunks")
                    .fetch_one(server.database().pool())
                    .await
                    .expect("counting chunks");
                assert!(chunks > 100, "{chunks} chunks");
                assert!(stored_after_first_push > 0, "the chunks are in packs");
            } else {
                assert_eq!(packs_stored(&server), stored_after_first_push, "{cache}");
            }
        }
        // Attic's API, to two more caches.
        let sources = {
            let (root, closure) = (root.clone(), closure.clone());
            let (env_back, sources) = blocking(move || {
                let sources = source_paths(&env, &root, &closure);
                (env, sources)
            })
            .await;
            env = env_back;
            sources
        };
        for cache in ["via-attic", "via-attic-again"] {
            attic_push(&server, &token, cache, &sources).await;
            assert_eq!(packs_stored(&server), stored_after_first_push, "{cache}");
        }

        // The pushing Nix cached the narinfos it wrote (with its own URLs):
        // substitutions must ask the server.
        env.add_config("narinfo-cache-positive-ttl", "0");
        for cache in caches {
            let public_key = public_key_of(&server, &token, cache).await;
            let cache_url = server.cache_url(cache);
            let closure = closure.clone();
            env = blocking(move || {
                let destination = env.path(&format!("substituted-{cache}"));
                env.copy_from(&cache_url, &destination, &public_key, &closure)
                    .unwrap_or_else(|error| panic!("substituting from {cache}: {error}"));
                let verified = env
                    .store_verify(&cache_url, &public_key, &closure)
                    .expect("nix store verify");
                assert!(verified.status.success(), "{cache}: {verified:?}");
                env
            })
            .await;
        }
    }
}
