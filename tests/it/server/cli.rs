//! The real `ingest-api` binary: first start (config written, root token
//! printed once), `--mode check-config` and `--mode migrate`, and the
//! operator's `make-token` (also `--dump-claims`) and `list-tokens`.
//!
//! The binary is found by `tests::server::binary` (built by
//! `cargo build --workspace --bins`, which ops/test.sh runs first).

use std::process::{Command, Output};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use larder_api::v1::CacheConfig;
use larder_db::Database;
use reqwest::{Method, StatusCode};
use tests::process::{ingest_api_command, ServerProcess};
use tests::server::TestServer;

use super::{api_error, fake_store_path, file_nar, get, ok_bytes, ok_json, plain_metadata, send};

fn run(command: &mut Command) -> Output {
    command.output().expect("running ingest-api")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_writes_a_config_and_prints_a_working_root_token_once() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("etc").join("server.toml");

    let mut first = ServerProcess::start(&config);
    let (endpoint, token) = first.wait_for(|line| {
        let rest = line.trim().strip_prefix("larder login local ")?;
        let (endpoint, token) = rest.split_once(' ')?;
        Some((endpoint.to_owned(), token.trim().to_owned()))
    });
    let address = first.serving_address();
    assert_eq!(endpoint, format!("http://{address}/"));

    // The config is private and names SQLite and storage beside it.
    let mode = std::fs::metadata(&config)
        .expect("the config file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let written = std::fs::read_to_string(&config).expect("reading the config");
    assert!(written.contains("sqlite://"), "{written}");
    assert!(written.contains("hs256-secret-base64"), "{written}");
    assert!(dir.path().join("etc/server.db").exists());
    assert!(dir.path().join("etc/storage").is_dir());

    // The root token works: create a cache and read it back.
    let http = reqwest::Client::new();
    let url = format!("{endpoint}_api/v1/cache-config/first");
    let created: CacheConfig = ok_json(
        http.post(&url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"keypair": "Generate"}))
            .send()
            .await
            .expect("creating a cache"),
    )
    .await;
    assert_eq!(
        created.substituter_endpoint,
        Some(format!("{endpoint}first"))
    );
    let printed = first.stop();
    assert_eq!(
        printed.iter().filter(|line| line.contains(&token)).count(),
        1,
        "the token is printed exactly once"
    );

    // The second start reuses the config: no new secret, no token printed,
    // and the first token still works.
    let before = std::fs::read_to_string(&config).expect("reading the config");
    let mut second = ServerProcess::start(&config);
    let address = second.serving_address();
    let read: CacheConfig = ok_json(
        http.get(format!("http://{address}/_api/v1/cache-config/first"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("reading the cache"),
    )
    .await;
    assert_eq!(read.public_key, created.public_key);
    let printed = second.stop();
    assert!(
        !printed
            .iter()
            .any(|line| line.contains("larder login") || line.contains("eyJ")),
        "a second start prints no token:\n{}",
        printed.join("\n")
    );
    assert_eq!(
        std::fs::read_to_string(&config).expect("reading the config"),
        before
    );
}

/// Behind a reverse proxy, `api-endpoint` (here from the environment) is
/// what the login line and the cache answers name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_names_the_configured_api_endpoint() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("server.toml");
    let mut server = ServerProcess::start_with(
        &config,
        &[("LARDER_API_ENDPOINT", "https://cache.example.org/larder")],
    );
    let (endpoint, token) = server.wait_for(|line| {
        let rest = line.trim().strip_prefix("larder login local ")?;
        let (endpoint, token) = rest.split_once(' ')?;
        Some((endpoint.to_owned(), token.trim().to_owned()))
    });
    assert_eq!(endpoint, "https://cache.example.org/larder/");
    let address = server.serving_address();
    let created: CacheConfig = ok_json(
        reqwest::Client::new()
            .post(format!("http://{address}/_api/v1/cache-config/proxied"))
            .bearer_auth(&token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("creating a cache"),
    )
    .await;
    assert_eq!(
        created.substituter_endpoint.as_deref(),
        Some("https://cache.example.org/larder/proxied")
    );
    server.stop();
}

#[test]
fn check_config_accepts_a_good_config_and_explains_a_broken_one() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let good = format!(
        "[database]\nurl = \"sqlite://{}/server.db\"\n[storage]\ntype = \"local\"\npath = \"{}/storage\"\n\
         [auth]\nhs256-secret-base64 = \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\"\n",
        dir.path().display(),
        dir.path().display()
    );
    let path = dir.path().join("server.toml");
    std::fs::write(&path, &good).expect("writing the config");
    let output = run(ingest_api_command()
        .arg("--config")
        .arg(&path)
        .args(["--mode", "check-config"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("is valid"),
        "{}",
        text(&output.stdout)
    );
    assert!(
        !dir.path().join("server.db").exists(),
        "checking touches no database"
    );

    let broken = [
        (good.replace("[storage]", "[storage]\npaht = \"x\""), "paht"),
        (good.replace("[database]", "[database"), "not valid TOML"),
        (
            good.replace("hs256-secret-base64", "# no key"),
            "hs256-secret-base64",
        ),
        (
            format!("api-endpoint = \"cache.example.org\"\n{good}"),
            "api-endpoint",
        ),
        (
            good.replace("type = \"local\"", "type = \"floppy\""),
            "floppy",
        ),
        // Well-formed TOML naming things the server cannot use: caught by
        // the check, not at the first start.
        (
            good.replace(
                "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=",
                "c2hvcnQ=",
            ),
            "HS256 token secret is 5 bytes long",
        ),
        (
            good.replace(
                "hs256-secret-base64 = \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\"",
                "rs256-private-key-pem = \"-----BEGIN PRIVATE KEY-----\\nnonsense\\n-----END PRIVATE KEY-----\\n\"",
            ),
            "not an RSA private key in PEM format",
        ),
        (
            good.replace("sqlite://", "mysql://"),
            "unsupported database url scheme \"mysql\"",
        ),
    ];
    for (config, expected) in broken {
        std::fs::write(&path, &config).expect("writing the config");
        let output = run(ingest_api_command()
            .arg("--config")
            .arg(&path)
            .args(["--mode", "check-config"]));
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "accepted:\n{config}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr:?}");
        assert!(stderr.starts_with("ingest-api: "), "{stderr}");
        // Each cause once: a message that repeats its cause hides it.
        assert_eq!(
            stderr.matches(expected).count(),
            1,
            "{expected:?} repeated in {stderr:?}"
        );
        assert!(
            !stderr.contains("c2VjcmV0"),
            "no secret in errors: {stderr}"
        );
    }

    // Checking a config that does not exist is an error, and writes none.
    let missing = dir.path().join("missing").join("server.toml");
    let output = run(ingest_api_command()
        .arg("--config")
        .arg(&missing)
        .args(["--mode", "check-config"]));
    assert!(!output.status.success(), "{}", text(&output.stdout));
    assert!(
        text(&output.stderr).contains("no config file at"),
        "{}",
        text(&output.stderr)
    );
    assert!(!missing.exists(), "check-config created a config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_mode_creates_the_schema_and_exits() {
    let url = tests::services::fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{url}\"\n[storage]\ntype = \"local\"\npath = \"{}/storage\"\n\
             [auth]\nhs256-secret-base64 = \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\"\n",
            dir.path().display()
        ),
    )
    .expect("writing the config");
    let database = Database::connect(&url).await.expect("connecting");
    assert!(
        database.list_tokens(None).await.is_err(),
        "no schema before migrating"
    );
    for _ in 0..2 {
        let output = run(ingest_api_command()
            .arg("--config")
            .arg(&path)
            .args(["--mode", "migrate"]));
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(
            text(&output.stdout).contains("migrations applied"),
            "{}",
            text(&output.stdout)
        );
    }
    assert_eq!(
        database
            .list_tokens(None)
            .await
            .expect("the tokens table")
            .len(),
        0
    );
    assert!(database
        .list_cache_names()
        .await
        .expect("the caches table")
        .is_empty());
}

/// The claims part of a JWT, decoded.
fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_token_prints_a_token_with_exactly_its_grants_and_list_tokens_shows_it() {
    let server = TestServer::sqlite().await;
    for cache in ["cli-main", "cli-other", "elsewhere"] {
        server.create_cache(cache, false).await;
    }
    let seeded = server
        .seed_path(
            "cli-main",
            plain_metadata(&fake_store_path("cli")),
            &file_nar(b"cli"),
        )
        .await;
    let output = run(ingest_api_command()
        .arg("make-token")
        .arg("--config")
        .arg(server.config_path())
        .args(["--sub", "ci@example", "--validity", "3 months"])
        // An exact name replaces the patterns for that cache, so cli-main
        // gets pull again beside its retention grant.
        .args([
            "--pull",
            "cli-*",
            "--configure-cache-retention",
            "cli-main",
            "--pull",
            "cli-main",
        ]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let token = stdout.lines().last().expect("a last line").to_owned();
    assert_eq!(token.split('.').count(), 3, "{stdout:?}");
    assert!(
        !token.contains(' '),
        "the last line is the token alone: {token:?}"
    );
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], "ci@example");
    let validity = claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat");
    assert!(
        (88 * 86_400..=93 * 86_400).contains(&validity),
        "{validity} s"
    );
    let jti = claims["jti"].as_str().expect("jti").to_owned();

    // Exactly what was granted: pull on cli-*, retention on cli-main.
    let narinfo = format!("/cli-main/{}.narinfo", seeded.store_path_hash);
    ok_bytes(get(&server, &narinfo, Some(&token)).await).await;
    ok_bytes(get(&server, "/cli-other/nix-cache-info", Some(&token)).await).await;
    let (error, _) = api_error(
        get(&server, "/elsewhere/nix-cache-info", Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(error.error, "NoSuchCache");
    let retention = serde_json::json!({"retention_period": {"Period": 600}});
    ok_json::<CacheConfig>(
        send(
            &server,
            Method::PATCH,
            "/_api/v1/cache-config/cli-main",
            Some(&token),
            Some(retention.clone()),
        )
        .await,
    )
    .await;
    for (method, path, body) in [
        (
            Method::PATCH,
            "/_api/v1/cache-config/cli-other",
            Some(retention),
        ),
        (
            Method::PATCH,
            "/_api/v1/cache-config/cli-main",
            Some(serde_json::json!({"is_public": true})),
        ),
        (Method::DELETE, "/_api/v1/cache-config/cli-main", None),
        (
            Method::POST,
            "/_api/v1/cache-config/cli-new",
            Some(serde_json::json!({})),
        ),
    ] {
        let (error, _) = api_error(
            send(&server, method.clone(), path, Some(&token), body).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert_eq!(error.error, "Forbidden", "{method} {path}");
    }

    // list-tokens shows it, valid; after revoke-token, revoked.
    let listing = text(
        &run(ingest_api_command()
            .arg("--config")
            .arg(server.config_path())
            .arg("list-tokens"))
        .stdout,
    );
    let line = listing
        .lines()
        .find(|line| line.contains(&jti))
        .unwrap_or_else(|| panic!("{jti} not listed:\n{listing}"));
    assert!(
        line.contains("ci@example") && line.trim_end().ends_with("valid"),
        "{line}"
    );
    assert!(!listing.contains(&token), "list-tokens never shows a token");
    let output = run(ingest_api_command()
        .arg("--config")
        .arg(server.config_path())
        .args(["revoke-token", &jti]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let listing = text(
        &run(ingest_api_command()
            .arg("--config")
            .arg(server.config_path())
            .arg("list-tokens"))
        .stdout,
    );
    let line = listing
        .lines()
        .find(|line| line.contains(&jti))
        .expect("still listed");
    assert!(line.contains("revoked"), "{line}");
    // Revoking a token nobody minted is an error.
    let output = run(ingest_api_command()
        .arg("--config")
        .arg(server.config_path())
        .args(["revoke-token", "no-such-jti"]));
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("no-such-jti"),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_token_dump_claims_prints_the_claims_unsigned() {
    let server = TestServer::sqlite().await;
    let output = run(ingest_api_command()
        .arg("make-token")
        .arg("--config")
        .arg(server.config_path())
        .args(["--sub", "preview", "--validity", "30d", "--dump-claims"])
        .args([
            "--pull",
            "alice-*",
            "--push",
            "alice-*",
            "--destroy-cache",
            "alice-tmp",
        ]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let claims: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("the whole output is the claims JSON ({error}): {stdout}"));
    assert_eq!(claims["sub"], "preview");
    assert_eq!(
        claims["caches"]["alice-*"],
        serde_json::json!(["pull", "push"])
    );
    assert_eq!(
        claims["caches"]["alice-tmp"],
        serde_json::json!(["destroy_cache"])
    );
    assert_eq!(
        claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
        30 * 86_400
    );
    assert_eq!(claims["jti"].as_str().map(str::len), Some(32));
    // No token, no signature: nothing that looks like a JWT.
    assert!(!stdout.contains("eyJ"), "{stdout}");
    assert!(
        stdout
            .lines()
            .all(|line| line.split('.').count() < 3 || line.contains(' ')),
        "{stdout}"
    );
    // Nothing was minted, so nothing was recorded.
    assert!(server
        .database()
        .list_tokens(None)
        .await
        .expect("listing tokens")
        .is_empty());

    // Bad arguments are refused with a message, not minted.
    for (args, expected) in [
        (
            vec!["--sub", "x", "--validity", "forever", "--pull", "a"],
            "forever",
        ),
        (
            vec!["--sub", "x", "--validity", "1d", "--pull", "../etc"],
            "../etc",
        ),
        (vec!["--sub", "x", "--validity", "1d"], "no permission"),
    ] {
        let output = run(ingest_api_command()
            .arg("make-token")
            .arg("--config")
            .arg(server.config_path())
            .args(&args));
        assert!(!output.status.success(), "{args:?}");
        assert!(
            text(&output.stderr).contains(expected),
            "{args:?}: {}",
            text(&output.stderr)
        );
    }
    assert!(server
        .database()
        .list_tokens(None)
        .await
        .expect("listing tokens")
        .is_empty());
}

/// `ingest-api` commands other than the server refuse to invent a config.
#[test]
fn admin_commands_need_an_existing_config() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("none.toml");
    for args in [
        vec!["list-tokens"],
        vec!["revoke-token", "x"],
        vec![
            "make-token",
            "--sub",
            "x",
            "--validity",
            "1d",
            "--pull",
            "a",
        ],
    ] {
        let output = run(ingest_api_command()
            .arg("--config")
            .arg(&missing)
            .args(&args));
        assert!(!output.status.success(), "{args:?}");
        assert!(
            text(&output.stderr).contains("start the server once"),
            "{}",
            text(&output.stderr)
        );
        assert!(!missing.exists(), "{args:?} created a config");
    }
}

/// The environment of the running process `pid`, as `NAME=value` strings.
fn environment_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .expect("reading the process's environment")
        .split(|&byte| byte == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

/// glibc reads its malloc settings only at start, so the server runs
/// itself again (the same process) with at most two malloc arenas, unless
/// its operator chose `GLIBC_TUNABLES` already.
#[test]
fn the_server_runs_with_two_malloc_arenas_unless_its_operator_chose() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("server.toml");
    for (given, expected) in [
        (None, "GLIBC_TUNABLES=glibc.malloc.arena_max=2"),
        (
            Some("glibc.malloc.arena_max=4"),
            "GLIBC_TUNABLES=glibc.malloc.arena_max=4",
        ),
    ] {
        let mut command = ingest_api_command();
        command
            .env_remove("GLIBC_TUNABLES")
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0"]);
        if let Some(tunables) = given {
            command.env("GLIBC_TUNABLES", tunables);
        }
        let mut server = ServerProcess::spawn("ingest-api", command);
        server.serving_address();
        let tunables: Vec<String> = environment_of(server.id())
            .into_iter()
            .filter(|entry| entry.starts_with("GLIBC_TUNABLES="))
            .collect();
        assert_eq!(tunables, [expected], "started with {given:?}");
        server.stop();
    }
}
