//! The real `larder` binary against an in-process server
//! (`tests::server::TestServer`) and the real Nix client: login, cache
//! management, `use`, and every error case of issue #6, each run with its
//! own XDG directories.
//!
//! `push` is in its own module: it needs the push endpoints and pipeline;
//! so is the `watcher-agent` with `larder queue` and `watch-store`, and
//! the agent run as an unprivileged user beside root's post-build-hook;
//! and `keys`, signing-key import and rotation (issue #18).

mod agent;
mod agent_user;
mod keys;
mod pins;
mod push;
mod tokens;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use larder_api::cache_name::CacheName;
use larder_api::v1::{CacheConfig, CacheQuota, QuotaPolicy, RetentionPeriodConfig};
use larder_db::ObjectMetadata;
use larder_token::Permission;
use tests::nix::{NixEnv, NixVersion};
use tests::server::{binary, expired_token, TestServer};

use crate::server::store_with_a_built_path;

const HOUR: Duration = Duration::from_secs(3600);

/// A user of the `larder` binary with their own home and config.
pub(crate) struct Larder {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Larder {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("larder-client-")
            .tempdir()
            .expect("a temporary home");
        for sub in ["home", "nix-conf-dir"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("creating a directory");
        }
        // Nix as `larder` runs it: no system config, and a store of its
        // own (as root, opening the default store would create /nix/store).
        let nix_config = format!(
            "store = {}\nsubstituters =",
            dir.path().join("store").display()
        );
        let nix_conf_dir = dir.path().join("nix-conf-dir").display().to_string();
        Self {
            dir,
            env: vec![
                ("NIX_CONF_DIR".to_owned(), nix_conf_dir),
                ("NIX_CONFIG".to_owned(), nix_config),
            ],
        }
    }

    /// A user whose `larder` (and agent) run `version`'s `nix`.
    pub(crate) fn with_nix(version: NixVersion) -> Self {
        let mut larder = Self::new();
        larder.set_env("PATH", &version.path_variable());
        larder
    }

    fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn config_file(&self) -> PathBuf {
        self.config_home().join("larder/config.toml")
    }

    pub(crate) fn nix_conf(&self) -> PathBuf {
        self.config_home().join("nix/nix.conf")
    }

    fn netrc(&self) -> PathBuf {
        self.config_home().join("nix/netrc")
    }

    /// Sets an environment variable for later runs.
    pub(crate) fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `program` (`larder`, `watcher-agent`) with this user's environment
    /// and nothing else.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home())
            .env("XDG_CONFIG_HOME", self.config_home())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// Runs `larder ARGS` with `stdin` as its input; does not wait on the
    /// test's runtime, so the in-process server keeps serving.
    async fn run_with_input(&self, args: &[&str], stdin: &str) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .command(binary("larder"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting larder");
        let mut input = child.stdin.take().expect("stdin was piped");
        input
            .write_all(stdin.as_bytes())
            .await
            .expect("writing stdin");
        drop(input);
        tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("larder {args:?} did not finish"))
            .expect("running larder")
    }

    pub(crate) async fn run(&self, args: &[&str]) -> Output {
        self.run_with_input(args, "").await
    }

    /// Runs a command that must succeed; returns its stdout.
    pub(crate) async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(
            output.status.success(),
            "larder {args:?} failed ({}): {}{}",
            output.status,
            text(&output.stdout),
            text(&output.stderr)
        );
        text(&output.stdout)
    }

    /// Runs a command that must fail with exit status 1 and one line on
    /// stderr, `error: …` with no panic or backtrace; returns that line.
    pub(crate) async fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert_error_output(args, &output)
    }
}

/// `NIX_CONFIG` for `larder` so that its `nix` commands read the chroot
/// store at `root`, as a user's `store` setting would.
pub(crate) fn store_config(root: &Path) -> String {
    format!(
        "store = {}\nsubstituters =",
        root.to_str().expect("a UTF-8 store root")
    )
}

fn assert_error_output(args: &[&str], output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "larder {args:?}: {stderr}{}",
        text(&output.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one error line from larder {args:?}: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    lines[0].to_owned()
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn cache_name(name: &str) -> CacheName {
    name.parse().expect("a valid cache name")
}

/// The cache's configuration as the server reports it to `token`.
async fn server_view(server: &TestServer, cache: &str, token: &str) -> CacheConfig {
    let response = server
        .http()
        .get(server.url_of(&format!("/_api/v1/cache-config/{cache}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET cache-config");
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.expect("cache-config JSON")
}

/// Runs a blocking Nix step off the runtime's workers, so the in-process
/// server keeps answering while Nix talks to it.
pub(crate) async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(step)
        .await
        .expect("the Nix step panicked")
}

#[tokio::test]
async fn login_writes_a_private_config_with_a_default_server() {
    let server = TestServer::sqlite().await;
    let token = server.root_token().await;
    let larder = Larder::new();

    let out = larder.ok(&["login", "first", &server.url(), &token]).await;
    assert!(out.contains("default server"), "{out}");
    larder
        .ok(&[
            "login",
            "second",
            "http://127.0.0.1:9/prefix",
            "other-token",
        ])
        .await;
    let mode = std::fs::metadata(larder.config_file())
        .expect("the config file exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the config holds tokens");
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(larder.config_file()).expect("read"))
            .expect("TOML");
    assert_eq!(config["default-server"].as_str(), Some("first"));
    assert_eq!(
        config["servers"]["second"]["endpoint"].as_str(),
        Some("http://127.0.0.1:9/prefix/")
    );
    assert_eq!(
        config["servers"]["first"]["token"].as_str(),
        Some(token.as_str())
    );

    // A bare cache name goes to the default server, `server:cache` to the
    // one named.
    server.create_cache("hello", false).await;
    let info = larder.ok(&["cache", "info", "hello"]).await;
    assert!(info.contains("hello-1:"), "{info}");
    let info = larder.ok(&["cache", "info", "first:hello"]).await;
    assert!(info.contains("private"), "{info}");

    // --set-default moves the default: the second server is unreachable.
    let closed = tests::ports::HeldPort::new();
    larder
        .ok(&[
            "login",
            "second",
            &format!("http://{}/", closed.address()),
            "other-token",
            "--set-default",
        ])
        .await;
    let line = larder.fails(&["cache", "info", "hello"]).await;
    assert!(line.contains("cannot reach server \"second\""), "{line}");
    larder.ok(&["cache", "info", "first:hello"]).await;
}

#[tokio::test]
async fn larder_token_overrides_the_stored_token() {
    let server = TestServer::sqlite().await;
    server.create_cache("override", false).await;
    let mut larder = Larder::new();
    larder
        .ok(&["login", "local", &server.url(), "not-a-valid-token"])
        .await;
    let line = larder.fails(&["cache", "info", "override"]).await;
    assert!(line.contains("server \"local\""), "{line}");

    let token = server
        .mint("ci", HOUR, &[("override", &[Permission::Pull])])
        .await;
    larder.set_env("LARDER_TOKEN", &token);
    let info = larder.ok(&["cache", "info", "override"]).await;
    assert!(info.contains("override-1:"), "{info}");
    // The stored token is left as it was.
    let stored = std::fs::read_to_string(larder.config_file()).expect("read");
    assert!(stored.contains("not-a-valid-token") && !stored.contains(&token));
}

#[tokio::test]
async fn cache_create_configure_info_destroy_round_trip() {
    let server = TestServer::sqlite().await;
    let root = server.root_token().await;
    let larder = Larder::new();
    larder.ok(&["login", "local", &server.url(), &root]).await;

    let out = larder
        .ok(&[
            "cache",
            "create",
            "round",
            "--priority",
            "35",
            "--upstream-cache-key-name",
            "up-a-1",
            "--upstream-cache-key-name",
            "up-b-1",
        ])
        .await;
    let created = server_view(&server, "round", &root).await;
    assert_eq!(created.is_public, Some(false));
    assert_eq!(created.priority, Some(35));
    assert_eq!(
        created.upstream_cache_key_names,
        Some(vec!["up-a-1".to_owned(), "up-b-1".to_owned()])
    );
    let public_key = created.public_key.clone().expect("a public key");
    assert!(out.contains(&public_key), "{out}");

    let info = larder.ok(&["cache", "info", "round"]).await;
    for expected in [
        public_key.as_str(),
        &format!("{}/round", server.url()),
        &format!("{}/", server.url()),
        "35",
        "private",
        "the server's default",
    ] {
        assert!(info.contains(expected), "{expected:?} in {info}");
    }

    // Only what is asked changes.
    larder
        .ok(&[
            "cache",
            "configure",
            "round",
            "--public",
            "--retention-period",
            "30 days",
        ])
        .await;
    let configured = server_view(&server, "round", &root).await;
    assert_eq!(configured.is_public, Some(true));
    assert_eq!(
        configured.retention_period,
        Some(RetentionPeriodConfig::Period(30 * 24 * 3600))
    );
    assert_eq!(configured.priority, Some(35));
    assert_eq!(configured.public_key, created.public_key);
    let info = larder.ok(&["cache", "info", "round"]).await;
    assert!(
        info.contains("public") && info.contains("1 month"),
        "{info}"
    );

    larder
        .ok(&[
            "cache",
            "configure",
            "round",
            "--private",
            "--priority",
            "50",
            "--reset-retention-period",
            "--regenerate-keypair",
        ])
        .await;
    let reconfigured = server_view(&server, "round", &root).await;
    assert_eq!(reconfigured.is_public, Some(false));
    assert_eq!(reconfigured.priority, Some(50));
    assert_eq!(
        reconfigured.retention_period,
        Some(RetentionPeriodConfig::Global)
    );
    assert!(
        reconfigured
            .public_key
            .as_deref()
            .is_some_and(|key| key.starts_with("round-2:")),
        "{reconfigured:?}"
    );

    // Changing visibility needs no retention permission.
    let configurer = server
        .mint(
            "configurer",
            HOUR,
            &[("round", &[Permission::ConfigureCache])],
        )
        .await;
    let limited = Larder::new();
    limited
        .ok(&["login", "local", &server.url(), &configurer])
        .await;
    limited
        .ok(&["cache", "configure", "round", "--public"])
        .await;
    let line = limited
        .fails(&["cache", "configure", "round", "--retention-period", "1d"])
        .await;
    assert!(line.contains("retention"), "{line}");

    // Destroy asks for the name; a wrong answer keeps the cache.
    let output = larder
        .run_with_input(&["cache", "destroy", "round"], "wrong\n")
        .await;
    // The prompt comes first on stderr, then the error.
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("Destroying cache round deletes every path"),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(
            "error: not destroying cache round: the confirmation did not match its name\n"
        ),
        "{stderr}"
    );
    assert!(server
        .database()
        .cache_by_name(&cache_name("round"))
        .await
        .expect("lookup")
        .is_some());
    let output = larder
        .run_with_input(&["cache", "destroy", "round"], "round\n")
        .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(server
        .database()
        .cache_by_name(&cache_name("round"))
        .await
        .expect("lookup")
        .is_none());

    larder.ok(&["cache", "create", "gone", "--public"]).await;
    assert_eq!(
        server_view(&server, "gone", &root).await.is_public,
        Some(true)
    );
    larder
        .ok(&["cache", "destroy", "gone", "--no-confirm"])
        .await;
    let line = larder.fails(&["cache", "info", "gone"]).await;
    assert!(line.contains("no such cache"), "{line}");
}

/// `--quota` and `--quota-policy` on create and configure, and `cache
/// info` showing usage against the quota; only a token with the quota
/// permission may set a quota.
#[tokio::test]
async fn quotas_are_set_with_flags_and_info_shows_usage_against_them() {
    let server = TestServer::sqlite().await;
    let root = server.root_token().await;
    let larder = Larder::new();
    larder.ok(&["login", "local", &server.url(), &root]).await;

    larder
        .ok(&[
            "cache",
            "create",
            "capped",
            "--quota",
            "1 MiB",
            "--quota-policy",
            "evict-lru",
        ])
        .await;
    let created = server_view(&server, "capped", &root).await;
    assert_eq!(created.storage_quota, Some(CacheQuota::Bytes(1 << 20)));
    assert_eq!(created.quota_policy, Some(QuotaPolicy::EvictLru));

    // A path of 256 KiB and a little: a quarter of the quota, rounded down.
    let nar = {
        let mut encoder = larder_nix::nar::NarEncoder::new(Vec::new()).expect("a NAR");
        encoder
            .regular(false, &vec![7u8; 256 << 10])
            .expect("a file");
        encoder.finish().expect("a complete NAR")
    };
    server
        .seed_path(
            "capped",
            ObjectMetadata {
                store_path: "/nix/store/00000000000000000000000000000000-quarter".to_owned(),
                references: Vec::new(),
                deriver: None,
                system: None,
                sigs: Vec::new(),
                ca: None,
            },
            &nar,
        )
        .await;
    let info = larder.ok(&["cache", "info", "capped"]).await;
    for expected in [
        "Storage quota: 1.0 MiB",
        "Storage used: 256.1 KiB of 1.0 MiB (25%): 256.1 KiB in paths, 0 B in flight",
        "When full: evict the least recently used paths",
    ] {
        assert!(info.contains(expected), "{expected:?} in {info}");
    }

    larder
        .ok(&[
            "cache",
            "configure",
            "capped",
            "--quota",
            "unlimited",
            "--quota-policy",
            "refuse",
        ])
        .await;
    let configured = server_view(&server, "capped", &root).await;
    assert_eq!(configured.storage_quota, Some(CacheQuota::Unlimited));
    assert_eq!(configured.quota_policy, Some(QuotaPolicy::Refuse));
    let info = larder.ok(&["cache", "info", "capped"]).await;
    assert!(info.contains("Storage quota: unlimited"), "{info}");
    assert!(info.contains("Storage used: 256.1 KiB: "), "{info}");
    assert!(info.contains("When full: refuse pushes"), "{info}");
    larder
        .ok(&["cache", "configure", "capped", "--reset-quota"])
        .await;
    assert_eq!(
        server_view(&server, "capped", &root).await.storage_quota,
        Some(CacheQuota::Global)
    );
    let info = larder.ok(&["cache", "info", "capped"]).await;
    assert!(
        info.contains("Storage quota: unlimited (the server's default)"),
        "{info}"
    );

    // Ambiguous or unknown sizes never reach the server.
    for bad in ["50G", "lots", "5 GibiBytes"] {
        let output = larder
            .run(&["cache", "configure", "capped", "--quota", bad])
            .await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{bad}: {}",
            text(&output.stderr)
        );
        assert!(
            text(&output.stderr).contains("byte size"),
            "{}",
            text(&output.stderr)
        );
    }

    // A tenant's token: the policy yes, the quota no.
    let tenant = server
        .mint("tenant", HOUR, &[("capped", &[Permission::ConfigureCache])])
        .await;
    let limited = Larder::new();
    limited
        .ok(&["login", "local", &server.url(), &tenant])
        .await;
    limited
        .ok(&[
            "cache",
            "configure",
            "capped",
            "--quota-policy",
            "evict-lru",
        ])
        .await;
    let line = limited
        .fails(&["cache", "configure", "capped", "--quota", "1 TiB"])
        .await;
    assert!(line.contains("configure_cache_quota"), "{line}");
    assert_eq!(
        server_view(&server, "capped", &root).await.storage_quota,
        Some(CacheQuota::Global)
    );
}

/// The metadata and NAR of a path in the chroot store at `root`, as the
/// push pipeline would record them.
fn path_for_seeding(env: &NixEnv, root: &Path, path: &str) -> (ObjectMetadata, Vec<u8>) {
    let infos = env
        .path_infos(root, &[path.to_owned()])
        .expect("nix path-info");
    let info = &infos[0];
    let base = |full: &str| full.trim_start_matches("/nix/store/").to_owned();
    let list = |key: &str| -> Vec<String> {
        info[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let metadata = ObjectMetadata {
        store_path: path.to_owned(),
        references: list("references").iter().map(|r| base(r)).collect(),
        deriver: info["deriver"].as_str().map(base),
        system: None,
        sigs: list("signatures"),
        ca: info["ca"].as_str().map(str::to_owned),
    };
    let nar = env
        .dump(&tests::nix::physical_path(root, path))
        .expect("nix-store --dump");
    (metadata, nar)
}

tests::under_each_nix! {
    #[tokio::test]
    async fn use_writes_nix_conf_and_netrc_once_and_nix_substitutes_with_them(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let (env, store) = store_with_a_built_path(version, "use").await;
        let root = server.root_token().await;
        let mut larder = Larder::with_nix(version);
        larder.ok(&["login", "local", &server.url(), &root]).await;
        larder.ok(&["cache", "create", "usable"]).await;
        for path in &store.paths {
            let (metadata, nar) = path_for_seeding(&env, &store.root, path);
            server.seed_path("usable", metadata, &nar).await;
        }

        // The user's own nix.conf: no cache.nixos.org (offline tests).
        std::fs::create_dir_all(larder.nix_conf().parent().expect("a directory")).expect("mkdir");
        std::fs::write(larder.nix_conf(), "substituters =\n").expect("writing nix.conf");
        // Nix is given a pull-only token, as a user would be.
        let pull = server
            .mint("puller", HOUR, &[("usable", &[Permission::Pull])])
            .await;
        larder.set_env("LARDER_TOKEN", &pull);

        let out = larder.ok(&["use", "usable"]).await;
        let public_key = server_view(&server, "usable", &root)
            .await
            .public_key
            .expect("a key");
        let substituter = format!("{}/usable", server.url());
        assert!(
            out.contains(&substituter) && out.contains(&public_key),
            "{out}"
        );
        let nix_conf = std::fs::read_to_string(larder.nix_conf()).expect("nix.conf");
        assert_eq!(
            nix_conf,
            format!(
                "substituters =\nextra-substituters = {substituter}\n\
                 extra-trusted-public-keys = {public_key}\nnetrc-file = {}\n",
                larder.netrc().display()
            )
        );
        let netrc = std::fs::read_to_string(larder.netrc()).expect("netrc");
        assert_eq!(netrc, format!("machine 127.0.0.1 password {pull}\n"));
        let mode = std::fs::metadata(larder.netrc())
            .expect("netrc")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Twice changes nothing.
        let again = larder.ok(&["use", "usable"]).await;
        assert!(again.contains("nothing changed"), "{again}");
        assert_eq!(
            std::fs::read_to_string(larder.nix_conf()).expect("nix.conf"),
            nix_conf
        );
        assert_eq!(
            std::fs::read_to_string(larder.netrc()).expect("netrc"),
            netrc
        );

        // Nix, reading only that nix.conf, substitutes the closure into a fresh
        // store: the substituter, the key (the built path needs a signature)
        // and the netrc (the cache is private) all come from what `use` wrote.
        let nix_conf_path = larder.nix_conf();
        let top = store.built[0].clone();
        let destination = env.path("destination");
        let (shown, realised) = blocking(move || {
            let shown = nix_with_user_conf(&env, &nix_conf_path)
                .args(["show-config"])
                .output()
                .expect("nix show-config");
            let realised = nix_with_user_conf(&env, &nix_conf_path)
                .arg("--store")
                .arg(&destination)
                .args(["build", "--no-link", &top])
                .output()
                .expect("nix build");
            let valid = env
                .output(
                    "nix-store",
                    &[
                        "--store",
                        destination.to_str().expect("UTF-8"),
                        "--check-validity",
                        &top,
                    ],
                )
                .expect("nix-store --check-validity");
            (shown, (realised, valid))
        })
        .await;
        let shown = text(&shown.stdout);
        assert!(
            shown
                .lines()
                .any(|line| line.starts_with("substituters = ") && line.contains(&substituter)),
            "{shown}"
        );
        assert!(shown.contains(&public_key), "{shown}");
        let (realised, valid) = realised;
        assert!(realised.status.success(), "{}", text(&realised.stderr));
        assert!(valid.status.success(), "{}", text(&valid.stderr));

        // A new token replaces the old netrc entry rather than adding one.
        let newer = server
            .mint("puller-2", HOUR, &[("usable", &[Permission::Pull])])
            .await;
        larder.set_env("LARDER_TOKEN", &newer);
        larder.ok(&["use", "usable"]).await;
        assert_eq!(
            std::fs::read_to_string(larder.netrc()).expect("netrc"),
            format!("machine 127.0.0.1 password {newer}\n")
        );
    }
}

/// A `nix` command of `env` whose only configuration, apart from the
/// store and the experimental features, is the user file `nix_conf`.
pub(crate) fn nix_with_user_conf(env: &NixEnv, nix_conf: &Path) -> std::process::Command {
    let mut command = env.command("nix");
    command
        .env("NIX_USER_CONF_FILES", nix_conf)
        .env(
            "NIX_CONFIG",
            format!(
                "experimental-features = nix-command\nstore = {}\nbuild-users-group =\n\
                 narinfo-cache-negative-ttl = 0\nconnect-timeout = 5",
                env.path("default-store").display()
            ),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Has `puller`'s Nix build `wanted` into the store at `destination` with
/// the user config `nix_conf` alone (what `larder use` wrote), so only the
/// substituters there can provide them, and checks that every path of
/// their closure arrived with the NAR it has in `source`'s store at
/// `source_root`.
pub(crate) fn assert_substitutes_the_same_nars(
    puller: &NixEnv,
    nix_conf: &Path,
    destination: &Path,
    source: &NixEnv,
    source_root: &Path,
    wanted: &[String],
) {
    let built = nix_with_user_conf(puller, nix_conf)
        .arg("--store")
        .arg(destination)
        .args(["build", "--no-link"])
        .args(wanted)
        .output()
        .expect("nix build");
    assert!(built.status.success(), "{}", text(&built.stderr));
    for path in source.closure(source_root, wanted).expect("closure") {
        assert_eq!(
            source.nar_hash(source_root, &path).expect("source hash"),
            puller.nar_hash(destination, &path).unwrap_or_default(),
            "{path} substituted with the same NAR"
        );
    }
}

#[tokio::test]
async fn use_of_a_public_cache_writes_no_netrc() {
    let server = TestServer::sqlite().await;
    server.create_cache("open", true).await;
    let larder = Larder::new();
    // No token at all: a public cache needs none.
    larder.ok(&["login", "local", &server.url()]).await;
    larder.ok(&["use", "open"]).await;
    let nix_conf = std::fs::read_to_string(larder.nix_conf()).expect("nix.conf");
    assert!(nix_conf.contains(&format!("extra-substituters = {}/open", server.url())));
    assert!(!nix_conf.contains("netrc-file"), "{nix_conf}");
    assert!(!larder.netrc().exists());
}

tests::under_each_nix! {
    #[tokio::test]
    async fn errors_are_one_clear_line_and_exit_status_1(version: NixVersion) {
        let server = TestServer::sqlite().await;
        server.create_cache("exists", false).await;
        let root = server.root_token().await;
        let larder = Larder::with_nix(version);

        // No server configured yet.
        let line = larder.fails(&["cache", "info", "exists"]).await;
        assert!(line.contains("no server is configured"), "{line}");
        larder.ok(&["login", "local", &server.url(), &root]).await;

        // Unknown server.
        let line = larder.fails(&["cache", "info", "elsewhere:exists"]).await;
        assert_eq!(
            line,
            "error: no server named \"elsewhere\" is configured (add it with `larder login elsewhere URL TOKEN`)"
        );

        // Missing cache (the server's message, shown as is).
        let line = larder.fails(&["cache", "info", "missing"]).await;
        assert_eq!(
            line,
            "error: server \"local\": no such cache, or you are not allowed to see it"
        );
        let line = larder.fails(&["use", "missing"]).await;
        assert!(line.contains("no such cache"), "{line}");

        // Bad token.
        let mut bad = Larder::with_nix(version);
        bad.ok(&["login", "local", &server.url(), "garbage"]).await;
        let line = bad.fails(&["cache", "info", "exists"]).await;
        assert!(line.starts_with("error: server \"local\": "), "{line}");
        assert!(line.to_lowercase().contains("token"), "{line}");

        // Expired token.
        let expired = expired_token(server.signing_key(), &[("*", &Permission::ALL)]);
        bad.set_env("LARDER_TOKEN", &expired);
        let line = bad.fails(&["cache", "info", "exists"]).await;
        assert!(line.to_lowercase().contains("expired"), "{line}");

        // Server unreachable: a port nothing listens on (held so, for the
        // whole test).
        let closed = tests::ports::HeldPort::new();
        let address = closed.address();
        let mut offline = Larder::with_nix(version);
        offline
            .ok(&["login", "down", &format!("http://{address}/"), "t"])
            .await;
        let line = offline.fails(&["cache", "info", "exists"]).await;
        assert!(
            line.starts_with(&format!(
                "error: cannot reach server \"down\" at http://{address}/: "
            )),
            "{line}"
        );
        assert!(line.to_lowercase().contains("refused"), "{line}");
        offline.set_env("LARDER_TOKEN", "t");
        let line = offline.fails(&["push", "exists", "/nix/store/x"]).await;
        assert!(line.contains("cannot reach server"), "{line}");

        // Pushing to a missing cache, or a path the store does not have.
        let line = larder.fails(&["push", "missing", "/nix/store/x"]).await;
        assert!(line.contains("no such cache"), "{line}");
        let line = larder
            .fails(&[
                "push",
                "exists",
                "/nix/store/00000000000000000000000000000000-absent",
            ])
            .await;
        assert!(line.contains("nix path-info"), "{line}");

        // Bad input never reaches the server.
        let line = larder.fails(&["login", "bad", "ftp://x/"]).await;
        assert!(line.contains("scheme"), "{line}");
        let output = larder.run(&["cache", "info", "_api"]).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "clap rejects bad cache names"
        );
        assert!(text(&output.stderr).contains("must start with a letter"));
    }
}

/// A hostile (or broken) Larder server, for `larder use`: real HTTP on a
/// real socket, answering every cache-config request with whatever JSON
/// the test last set.
struct FakeServer {
    url: String,
    answer: std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    async fn start() -> Self {
        use axum::extract::State;
        type Answer = std::sync::Arc<std::sync::Mutex<serde_json::Value>>;
        async fn cache_config(State(answer): State<Answer>) -> axum::Json<serde_json::Value> {
            let value = answer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            axum::Json(value)
        }
        let answer: Answer = Default::default();
        let router = axum::Router::new()
            .route(
                "/_api/v1/cache-config/{cache}",
                axum::routing::get(cache_config),
            )
            .with_state(answer.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake server");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("the fake server runs");
        });
        Self { url, answer, task }
    }

    fn answer_with(&self, value: serde_json::Value) {
        *self
            .answer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_refuses_server_values_that_would_inject_configuration_and_writes_nothing() {
    let fake = FakeServer::start().await;
    let larder = Larder::new();
    larder
        .ok(&["login", "evil", &fake.url, "the-users-token"])
        .await;
    let mine = "# the user's own\nsandbox = true\n";
    std::fs::create_dir_all(larder.nix_conf().parent().expect("a parent")).expect("mkdir");
    std::fs::write(larder.nix_conf(), mine).expect("writing nix.conf");

    let key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    let substituter = format!("{}/hello", fake.url);
    let sane = serde_json::json!({
        "substituter_endpoint": substituter,
        "api_endpoint": format!("{}/", fake.url),
        "public_key": key,
        "is_public": false,
        "priority": 41,
    });
    let evil_key = "evil-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    let hostile = [
        (
            "substituter_endpoint",
            format!("{substituter}\npost-build-hook = /tmp/evil"),
            "substituter endpoint",
            "control character",
        ),
        (
            "substituter_endpoint",
            format!("{substituter}\rmachine evil password x"),
            "substituter endpoint",
            "control character",
        ),
        (
            "substituter_endpoint",
            format!("{substituter} https://evil.example/"),
            "substituter endpoint",
            "whitespace",
        ),
        (
            "substituter_endpoint",
            format!("{substituter}#"),
            "substituter endpoint",
            "comment",
        ),
        (
            "substituter_endpoint",
            "file:///tmp/evil-store".to_owned(),
            "substituter endpoint",
            "not http or https",
        ),
        (
            "substituter_endpoint",
            "no-url-at-all".to_owned(),
            "substituter endpoint",
            "not a URL",
        ),
        (
            "public_key",
            format!("{key}\npost-build-hook = /tmp/evil"),
            "public key",
            "control character",
        ),
        (
            "public_key",
            format!("{key} {evil_key}"),
            "public key",
            "whitespace",
        ),
        (
            "public_key",
            "evil-1:AAAA".to_owned(),
            "public key",
            "expected 32",
        ),
        // The next key of a rotation is checked like the current one.
        (
            "next_public_key",
            format!("{evil_key}\ntrusted-users = evil"),
            "public key",
            "control character",
        ),
    ];
    for (field, value, what, reason) in hostile {
        let mut answer = sane.clone();
        answer[field] = value.clone().into();
        fake.answer_with(answer);
        let line = larder.fails(&["use", "evil:hello"]).await;
        assert!(
            line.contains(&format!("the server sent a {what}")) && line.contains(reason),
            "{value:?}: {line}"
        );
        assert_eq!(
            std::fs::read_to_string(larder.nix_conf()).expect("nix.conf"),
            mine,
            "{value:?} changed nix.conf"
        );
        assert!(!larder.netrc().exists(), "{value:?} wrote netrc");
    }

    // The same server with sane values: accepted and written, so the
    // refusals above are the checks', not a fake server that never worked.
    fake.answer_with(sane);
    larder.ok(&["use", "evil:hello"]).await;
    let conf = std::fs::read_to_string(larder.nix_conf()).expect("nix.conf");
    assert!(conf.starts_with(mine), "{conf}");
    assert!(
        conf.contains(&format!("extra-substituters = {substituter}\n"))
            && conf.contains(&format!("extra-trusted-public-keys = {key}\n")),
        "{conf}"
    );
    let netrc = std::fs::read_to_string(larder.netrc()).expect("netrc");
    assert_eq!(netrc, "machine 127.0.0.1 password the-users-token\n");
}
