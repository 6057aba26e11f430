//! The `watcher-agent` daemon, `larder queue`, `larder watch-store` and the
//! post-build-hook in `ops/agent/` (issue #6): the real binaries, a real
//! chroot Nix store and a real server (in-process, or the `ingest-api`
//! binary where it must go down and come back on the same port).
//!
//! Progress is read the way a user reads it, from `larder queue status`,
//! and uploads are checked on the server: narinfos served, upload rows
//! counted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::nix::{write_file, NixEnv, NixVersion};
use tests::process::ServerProcess;
use tests::server::{binary, TestServer};

use super::{assert_error_output, blocking, store_config, text, Larder};

/// How long the agent may take to drain its queue.
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

/// Retries every second or two, so that a test sees the server come back
/// quickly; never gives up on an unreachable server within a test.
const FAST_RETRIES: &str = "retry-delay = \"1s\"\nmax-retry-delay = \"2s\"\nmax-attempts = 1000\n";

/// A running `watcher-agent` (or `larder watch-store`) of a [`Larder`]
/// user; killed when dropped.
pub(super) struct Agent {
    child: tokio::process::Child,
}

impl Agent {
    /// Starts `watcher-agent` and waits until it answers on its socket.
    async fn start(larder: &Larder) -> Self {
        Self::spawn(larder, "watcher-agent", &[], &[]).await
    }

    /// Starts `program ARGS` and waits until `larder queue status ARGS2`
    /// reports an agent on the queue.
    async fn spawn(larder: &Larder, program: &str, args: &[&str], status_args: &[&str]) -> Self {
        let mut command = larder.command(binary(program));
        command
            .args(args)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        Self::spawn_command(larder, command, status_args, None).await
    }

    /// Starts `command` (an agent, however it is run) and waits until
    /// `larder queue status ARGS2` reports an agent on the queue. If it
    /// exits first, the panic shows `log` (where its stderr went), if any.
    pub(super) async fn spawn_command(
        larder: &Larder,
        mut command: tokio::process::Command,
        status_args: &[&str],
        log: Option<&std::path::Path>,
    ) -> Self {
        let program = format!("{:?}", command.as_std().get_program());
        let child = command
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {program}: {error}"));
        let mut agent = Self { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut arguments = vec!["queue", "status"];
        arguments.extend_from_slice(status_args);
        loop {
            if larder.run(&arguments).await.status.success() {
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                let logged = log
                    .map(|log| std::fs::read_to_string(log).unwrap_or_default())
                    .unwrap_or_default();
                panic!("{program} exited with {status} before it was ready\n{logged}");
            }
            assert!(Instant::now() < deadline, "{program} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, nothing flushed.
    async fn kill(mut self) {
        self.child.kill().await.expect("killing the agent");
    }

    /// SIGTERM, which must end it gracefully.
    pub(super) async fn stop(mut self) {
        let pid = self.child.id().expect("the agent runs");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the agent stops within 30 s of SIGTERM")
            .expect("waiting for the agent");
        assert!(exit.success(), "the agent exited with {exit} after SIGTERM");
    }
}

/// `larder queue status`, parsed.
#[derive(Debug)]
pub(super) struct QueueView {
    pub(super) running: bool,
    pub(super) in_flight: usize,
    pub(super) pending: usize,
    pub(super) failed: usize,
    pub(super) text: String,
}

pub(super) async fn queue_view(larder: &Larder, extra: &[&str]) -> QueueView {
    let mut arguments = vec!["queue", "status"];
    arguments.extend_from_slice(extra);
    let output = larder.run(&arguments).await;
    let text = text(&output.stdout);
    let count = |label: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} line in {text}"))
    };
    QueueView {
        running: output.status.success(),
        in_flight: count("in flight:"),
        pending: count("pending:"),
        failed: count("failed:"),
        text,
    }
}

/// Waits until nothing is pending or in flight.
pub(super) async fn drained(larder: &Larder, extra: &[&str]) -> QueueView {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let view = queue_view(larder, extra).await;
        if view.pending == 0 && view.in_flight == 0 {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not drain: {}",
            view.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Appends an `[agent]` section to the user's config.
pub(super) fn set_agent_settings(larder: &Larder, settings: &str) {
    let path = larder.config_file();
    let mut config = std::fs::read_to_string(&path).expect("the config exists after login");
    config.push_str(&format!("\n[agent]\n{settings}"));
    std::fs::write(&path, config).expect("writing the config");
}

/// The HTTP status of a path's narinfo in a cache.
async fn narinfo_status(base_url: &str, cache: &str, token: &str, path: &str) -> u16 {
    let hash = &path["/nix/store/".len()..][..32];
    reqwest::Client::new()
        .get(format!("{base_url}/{cache}/{hash}.narinfo"))
        .bearer_auth(token)
        .send()
        .await
        .expect("fetching a narinfo")
        .status()
        .as_u16()
}

/// Waits until every path is served from the cache. The agent pushes
/// without waiting for visibility: an acknowledged upload becomes visible
/// once the server's pipeline is through with it.
pub(super) async fn assert_served(base_url: &str, cache: &str, token: &str, paths: &[String]) {
    let deadline = Instant::now() + DRAIN_LIMIT;
    for path in paths {
        loop {
            let status = narinfo_status(base_url, cache, token, path).await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{path} is not in {cache}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many uploads the server recorded for a store path.
async fn upload_count(server: &TestServer, path: &str) -> i64 {
    let hash = &path["/nix/store/".len()..][..32];
    sqlx::query_scalar("SELECT COUNT(*) FROM uploads WHERE store_path_hash = $1")
        .bind(hash.to_owned())
        .fetch_one(server.database().pool())
        .await
        .expect("counting uploads")
}

/// Writes `nix` and `nix-store` wrappers into `bin` (made here), first on
/// `larder`'s `PATH`, that run the shell `script` before each NAR dump
/// (`nix store dump-path`, `nix-store --export`; its arguments are `$*`),
/// then the real program.
pub(super) fn wrap_nar_dumps(larder: &mut Larder, bin: &Path, script: &str) {
    std::fs::create_dir_all(bin).expect("a directory for the wrappers");
    for (program, dumping) in [("nix", "store dump-path"), ("nix-store", "--export")] {
        let real = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .unwrap_or_else(|error| panic!("finding {program}: {error}"));
        let real = String::from_utf8(real.stdout).expect("a UTF-8 path");
        let wrapper = bin.join(program);
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\ncase \" $* \" in *' {dumping} '*)\n{script}\n;;\nesac\nexec '{real}' \"$@\"\n",
                real = real.trim(),
            ),
        )
        .expect("writing a wrapper");
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("making a wrapper executable");
    }
    let path = std::env::var("PATH").unwrap_or_default();
    larder.set_env("PATH", &format!("{}:{path}", bin.display()));
}

/// A Nix environment with a chroot store, and a `larder` user whose `nix`
/// uses that store.
pub(super) struct Setup {
    pub(super) env: NixEnv,
    pub(super) root: PathBuf,
    pub(super) larder: Larder,
    salt: String,
}

impl Setup {
    /// A setup whose paths are added, and whose `larder` (and agent) read
    /// the store, with `version`'s `nix`.
    pub(super) async fn with_version(version: NixVersion) -> Self {
        let env = blocking(move || NixEnv::with_version(version).expect("a Nix environment")).await;
        let root = env.path("store");
        let mut larder = Larder::with_nix(version);
        larder.set_env("NIX_CONFIG", &store_config(&root));
        Self {
            env,
            root,
            larder,
            salt: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// Adds `count` small source paths (`nix-store --add`); the first gets
    /// `extra_bytes` more of pseudo-random content.
    pub(super) async fn add_paths(
        &self,
        name: &str,
        count: usize,
        extra_bytes: usize,
    ) -> Vec<String> {
        let dir = self.env.path(&format!("sources-{name}"));
        let root = self.root.clone();
        let salt = self.salt.clone();
        let name = name.to_owned();
        let version = self.env.version();
        blocking(move || {
            let env = NixEnv::with_version(version).expect("a Nix environment");
            (0..count)
                .map(|i| {
                    let source = dir.join(format!("{name}-{i}"));
                    let mut contents = format!("{salt} {name} {i}\n").into_bytes();
                    if i == 0 {
                        contents.extend(tests::server::pseudo_random(extra_bytes, i as u64 + 7));
                    }
                    std::fs::create_dir_all(&source).expect("creating a source directory");
                    write_file(&source.join("data"), &contents, false).expect("writing a source");
                    env.add_path(&root, &source).expect("nix-store --add")
                })
                .collect()
        })
        .await
    }
}

tests::under_each_nix! {
    /// The agent, reading the store through `version`, uploads a path queued
    /// twice once; `queue status` shows the queue before it runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_path_queued_twice_is_uploaded_once_and_status_shows_the_queue(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        larder.ok(&["cache", "create", "twice"]).await;
        let paths = setup.add_paths("twice", 2, 0).await;

        // No agent yet: the paths are queued all the same, with a warning.
        let first = larder.run(&["queue", "twice", &paths[0], &paths[1]]).await;
        assert!(first.status.success(), "{}", text(&first.stderr));
        assert!(text(&first.stdout).contains("queued 2 paths for local:twice"));
        assert!(
            text(&first.stderr).contains("no watcher-agent is running"),
            "{}",
            text(&first.stderr)
        );
        let again = larder.ok(&["queue", "local:twice", &paths[0]]).await;
        assert!(again.contains("already queued"), "{again}");
        // A cache the server does not have: found out by the agent.
        larder.ok(&["queue", "nosuch", &paths[0]]).await;

        let arguments = ["queue", "status"];
        let output = larder.run(&arguments).await;
        let line = assert_error_output(&arguments, &output);
        assert!(line.contains("no watcher-agent is running"), "{line}");
        let listed = text(&output.stdout);
        assert!(listed.contains("agent: not running"), "{listed}");
        assert!(listed.contains("pending: 3"), "{listed}");
        assert!(
            listed.contains(&format!("local:twice {}", paths[1])),
            "{listed}"
        );

        let agent = Agent::start(larder).await;
        let view = drained(larder, &[]).await;
        assert!(view.running);
        assert_eq!(view.failed, 1, "{}", view.text);
        assert!(
            view.text.contains(&format!("local:nosuch {}", paths[0]))
                && view.text.contains("after 1 attempt:"),
            "{}",
            view.text
        );
        assert_served(&server.url(), "twice", &token, &paths).await;
        assert_eq!(upload_count(&server, &paths[0]).await, 1);

        // Queued again once uploaded: offered, found cached, not uploaded.
        larder.ok(&["queue", "twice", &paths[0]]).await;
        drained(larder, &[]).await;
        assert_eq!(upload_count(&server, &paths[0]).await, 1);
        assert_eq!(upload_count(&server, &paths[1]).await, 1);
        agent.stop().await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unusable_queue_entries_are_set_aside_and_the_rest_of_the_queue_flows(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        larder.ok(&["cache", "create", "flows"]).await;
        let paths = setup.add_paths("flows", 5, 0).await;
        let (good, spoiled) = paths.split_at(3);
        let mut arguments = vec!["queue", "flows"];
        arguments.extend(paths.iter().map(String::as_str));
        larder.ok(&arguments).await;

        // Spoil the entries of the last two paths, among the good ones, and add
        // files that were never entries, as a crash, a full disk or a careless
        // hand would leave them.
        let pending = larder.home().join(".local/state/larder/agent/pending");
        let entry_of = |path: &str| -> PathBuf {
            let hash = &path["/nix/store/".len()..][..32];
            pending.join(format!("{hash}+flows+local.json"))
        };
        let truncated = entry_of(&spoiled[0]);
        let whole = std::fs::read(&truncated).expect("the queued entry");
        std::fs::write(&truncated, &whole[..whole.len() / 2]).expect("truncating an entry");
        let garbage = entry_of(&spoiled[1]);
        std::fs::write(&garbage, b"\x00\xff not JSON").expect("spoiling an entry");
        let directory = pending.join("0000000000000000000000000000000a+flows+local.json");
        std::fs::create_dir(&directory).expect("a directory named like an entry");
        let fifo = pending.join("0000000000000000000000000000000b+flows+local.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("running mkfifo");
        assert!(made.success());

        let agent = Agent::start(larder).await;
        // Without the setting aside, the agent stops at the first unusable
        // file (the queue never drains) or skips them forever (they stay
        // pending and are not counted as failed).
        let view = drained(larder, &[]).await;
        assert_served(&server.url(), "flows", &token, good).await;
        assert_eq!(view.failed, 4, "{}", view.text);
        for (file, reason) in [
            (&truncated, "not a queue entry: EOF while parsing"),
            (&garbage, "not a queue entry: expected value"),
            (&directory, "cannot read it: it is a directory"),
            (&fifo, "cannot read it: it is not a regular file"),
        ] {
            let name = file
                .file_name()
                .and_then(|name| name.to_str())
                .expect("UTF-8");
            let line = view
                .text
                .lines()
                .find(|line| line.contains(name))
                .unwrap_or_else(|| panic!("{name} in {}", view.text));
            assert!(
                line.contains("unusable queue entry") && line.contains(reason),
                "{reason:?} in {line}"
            );
            // Moved as it was, the reason beside it.
            let failed = pending.with_file_name("failed").join(name);
            assert!(
                !file.exists() && failed.symlink_metadata().is_ok(),
                "{name}"
            );
            let recorded = std::fs::read_to_string(failed.with_file_name(format!("{name}.reason")))
                .expect("the reason file");
            assert!(recorded.starts_with(reason), "{recorded}");
        }
        assert_eq!(
            std::fs::read(
                pending
                    .with_file_name("failed")
                    .join(truncated.file_name().expect("a name"))
            )
            .expect("the truncated entry, kept"),
            &whole[..whole.len() / 2]
        );

        // Queued again, a spoiled path is a fresh entry: uploaded, and no
        // longer listed as failed.
        larder.ok(&["queue", "flows", &spoiled[0]]).await;
        let view = drained(larder, &[]).await;
        assert_eq!(view.failed, 3, "{}", view.text);
        assert_served(&server.url(), "flows", &token, &spoiled[..1]).await;
        agent.stop().await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paths_queued_while_the_server_is_down_are_uploaded_when_it_is_back(version: NixVersion) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("server.toml");
        // Held for the whole test: refused while the server is down, and the
        // server's again when it comes back.
        let port = tests::ports::HeldPort::new();
        let address = port.address().to_string();
        let mut server = ServerProcess::start_listening(&config, &address, &[]);
        let token = server.wait_for(|line| {
            let rest = line.trim().strip_prefix("larder login local ")?;
            Some(rest.split_once(' ')?.1.trim().to_owned())
        });
        let url = format!("http://{}", server.serving_address());

        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &url, &token]).await;
        larder.ok(&["cache", "create", "downtime"]).await;
        set_agent_settings(larder, FAST_RETRIES);
        server.stop();

        let paths = setup.add_paths("downtime", 3, 0).await;
        let agent = Agent::start(larder).await;
        let mut arguments = vec!["queue", "downtime"];
        arguments.extend(paths.iter().map(String::as_str));
        larder.ok(&arguments).await;
        // The agent tries, fails, and keeps the paths with the reason.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let view = queue_view(larder, &[]).await;
            if view.text.contains("attempt 2 failed") {
                assert!(view.text.contains("cannot reach server"), "{}", view.text);
                assert_eq!(view.failed, 0, "{}", view.text);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no failed attempt: {}",
                view.text
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let server = ServerProcess::start_listening(&config, &address, &[]);
        let view = drained(larder, &[]).await;
        assert_eq!(view.failed, 0, "{}", view.text);
        assert_served(&url, "downtime", &token, &paths).await;
        agent.stop().await;
        server.stop();
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_killed_with_a_backlog_completes_it_after_a_restart(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let mut setup = Setup::with_version(version).await;
        // The agent's NAR dumps wait at a gate the test opens after the
        // kill: the agent is killed in the middle of its first upload
        // however fast it would be, with the whole backlog queued.
        let gate = tempfile::tempdir().expect("a directory for the gate");
        wrap_nar_dumps(
            &mut setup.larder,
            &gate.path().join("bin"),
            &format!(
                ": > '{gate}/dumping'\n\
                 while [ ! -e '{gate}/open' ]; do sleep 0.05; done",
                gate = gate.path().display()
            ),
        );

        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        larder.ok(&["cache", "create", "backlog"]).await;
        set_agent_settings(larder, "jobs = 1\n");
        let paths = setup.add_paths("backlog", 25, 0).await;
        let mut arguments = vec!["queue", "backlog"];
        arguments.extend(paths.iter().map(String::as_str));
        larder.ok(&arguments).await;

        let agent = Agent::start(larder).await;
        let mut polls = 0;
        while !gate.path().join("dumping").exists() {
            polls += 1;
            assert!(polls < 600, "the agent never started an upload");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        agent.kill().await;
        let view = queue_view(larder, &[]).await;
        assert!(!view.running);
        assert_eq!(view.pending, paths.len(), "{}", view.text);
        std::fs::write(gate.path().join("open"), b"").expect("opening the gate");

        // The killed agent's socket file is stale; a new agent replaces it.
        let agent = Agent::start(larder).await;
        let view = drained(larder, &[]).await;
        assert_eq!(view.failed, 0, "{}", view.text);
        assert_served(&server.url(), "backlog", &token, &paths).await;
        for path in &paths {
            assert_eq!(upload_count(&server, path).await, 1, "{path}");
        }
        agent.stop().await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agent_pushes_paths_added_to_and_built_in_the_watched_store(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        larder.ok(&["cache", "create", "watched"]).await;
        // The store directory comes from Nix's `store` setting (NIX_CONFIG).
        set_agent_settings(larder, "watch-store = [\"watched\"]\n");
        // The store exists before the agent watches it.
        let before = setup.add_paths("before", 1, 0).await;

        let agent = Agent::start(larder).await;
        let added = setup.add_paths("added", 2, 0).await;
        let (root, salt) = (setup.root.clone(), setup.salt.clone());
        let built = blocking(move || {
            let env = NixEnv::with_version(version).expect("a Nix environment");
            env.make_store(&root, 3, &format!("watched-{salt}"))
                .expect("building paths")
                .built
        })
        .await;
        assert!(!built.is_empty());
        let mut expected = added.clone();
        expected.extend(built);
        assert_served(&server.url(), "watched", &token, &expected).await;
        // Only new paths are watched, not the store as it was.
        assert_eq!(
            narinfo_status(&server.url(), "watched", &token, &before[0]).await,
            404
        );
        agent.stop().await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_store_pushes_new_paths_in_the_foreground(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        larder.ok(&["cache", "create", "foreground"]).await;
        setup.add_paths("before", 1, 0).await;
        let spool = larder.home().join("watch-spool");
        let spool_arg = spool.to_str().expect("UTF-8");
        let store_dir = setup.root.join("nix/store");
        let watcher = Agent::spawn(
            larder,
            "larder",
            &[
                "watch-store",
                "foreground",
                "--spool-dir",
                spool_arg,
                "--store-dir",
                store_dir.to_str().expect("UTF-8"),
            ],
            &["--spool-dir", spool_arg],
        )
        .await;
        let added = setup.add_paths("added", 2, 0).await;
        assert_served(&server.url(), "foreground", &token, &added).await;
        watcher.stop().await;
    }
}

/// The post-build-hook script in `ops/agent/`.
pub(super) fn hook_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/agent/post-build-hook.sh")
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_real_build_with_the_post_build_hook_queues_its_output(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        larder.ok(&["cache", "create", "hooked"]).await;

        // nix-build runs the hook as Nix does, with the caller's environment:
        // the user's config, a fresh state directory, the cache to use.
        let nix_file = setup.env.path("hooked.nix");
        std::fs::write(
            &nix_file,
            format!(
                "derivation {{ name = \"hooked\"; system = builtins.currentSystem; \
                 builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; \
                 args = [ \"-c\" \"echo {} > $out\" ]; }}\n",
                setup.salt
            ),
        )
        .expect("writing the derivation");
        let larder_bin = binary("larder");
        // The hook, behind a script that writes down the OUT_PATHS Nix gave.
        let out_paths_seen = setup.env.path("out-paths-seen");
        let recording_hook = setup.env.path("recording-hook.sh");
        std::fs::write(
            &recording_hook,
            format!(
                "#!/bin/sh\nprintf '%s' \"${{OUT_PATHS:-}}\" > '{}'\nexec sh '{}'\n",
                out_paths_seen.display(),
                hook_script().canonicalize().expect("the hook").display()
            ),
        )
        .expect("writing the recording hook");
        std::fs::set_permissions(
            &recording_hook,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
            .expect("making the hook executable");
        // A current Nix runs in a root of its own (tests::nix): it sees
        // the hook script and the `larder` it runs only where they are
        // shared into it.
        let shared = [hook_script(), larder_bin.clone()]
            .iter()
            .map(|file| {
                let file = file.canonicalize().expect("an existing file");
                file.parent().expect("a directory").display().to_string()
            })
            .collect::<Vec<_>>()
            .join(":");
        let build = |cache: Option<&str>| {
            let mut command = setup.env.command("nix-build");
            command
                .arg("--store")
                .arg(&setup.root)
                .arg(&nix_file)
                .args(["--no-out-link", "--option", "post-build-hook"])
                .arg(&recording_hook)
                .env("NIX_CHROOT_SHARE", &shared)
                // The user's Nix uses the chroot store (as `store = …` in
                // nix.conf would say), and so do the hook's `nix-store` calls.
                .env(
                    "NIX_CONFIG",
                    format!(
                        "{}\nbuild-users-group =\nextra-sandbox-paths = {}",
                        store_config(&setup.root),
                        version.extra_sandbox_paths()
                    ),
                )
                .env("HOME", larder.home())
                .env("XDG_CONFIG_HOME", larder.config_home())
                .env("XDG_STATE_HOME", larder.home().join(".local/state"))
                .env("LARDER_BIN", &larder_bin)
                .env("LARDER_HOOK_ENV", "/nonexistent")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(cache) = cache {
                command.env("LARDER_HOOK_CACHE", cache);
            }
            command
        };
        let output = blocking({
            let mut command = build(Some("hooked"));
            move || command.output().expect("running nix-build")
        })
        .await;
        let said = text(&output.stderr);
        assert!(output.status.success(), "{said}");
        // What the hook said, shown by Nix in the build's output.
        assert!(said.contains("queued 1 path for local:hooked"), "{said}");
        let built = text(&output.stdout).trim().to_owned();
        assert!(built.starts_with("/nix/store/"), "{built}");

        // Nix 2.8 gives the hook no OUT_PATHS (it found the output from
        // DRV_PATH); a current Nix gives them.
        let seen = std::fs::read_to_string(&out_paths_seen).expect("the hook ran");
        match version {
            NixVersion::Debian => assert_eq!(seen, ""),
            NixVersion::Current => assert_eq!(seen, built),
        }
        let view = queue_view(larder, &[]).await;
        assert!(
            view.pending == 1 && view.text.contains(&format!("local:hooked {built}")),
            "{}\nnix-build said: {said}",
            view.text
        );
        let agent = Agent::start(larder).await;
        drained(larder, &[]).await;
        assert_served(
            &server.url(),
            "hooked",
            &token,
            std::slice::from_ref(&built),
        )
        .await;
        agent.stop().await;

        // A hook that cannot queue says why and still lets the build pass:
        // run as Nix runs it (DRV_PATH, empty OUT_PATHS), without a cache and
        // with an unknown server.
        let drv = blocking({
            let root = setup.root.clone();
            let built = built.clone();
            move || {
                let env = NixEnv::with_version(version).expect("a Nix environment");
                env.run_text(
                    "nix-store",
                    &[
                        "--store",
                        root.to_str().expect("UTF-8"),
                        "--query",
                        "--deriver",
                        &built,
                    ],
                )
                .expect("the deriver")
            }
        })
        .await;
        for (cache, expected) in [
            (None, "LARDER_HOOK_CACHE is not set"),
            (Some("nowhere:hooked"), "no server named \"nowhere\""),
        ] {
            let mut command = larder.command("sh");
            command
                .arg(hook_script())
                .env("DRV_PATH", &drv)
                .env("OUT_PATHS", "")
                .env("LARDER_BIN", &larder_bin)
                .env("LARDER_HOOK_ENV", "/nonexistent");
            if let Some(cache) = cache {
                command.env("LARDER_HOOK_CACHE", cache);
            }
            let output = command.output().await.expect("running the hook");
            assert!(
                output.status.success(),
                "the hook must never fail the build"
            );
            assert!(
                text(&output.stderr).contains(expected),
                "{expected:?} in {}",
                text(&output.stderr)
            );
        }
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_and_queue_errors_are_one_clear_line_and_exit_status_1(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        let path = "/nix/store/0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello";

        let line = larder.fails(&["queue", "elsewhere:c", path]).await;
        assert!(line.contains("no server named \"elsewhere\""), "{line}");
        let line = larder.fails(&["queue", "c", "not-a-store-path"]).await;
        assert!(
            line.contains("\"not-a-store-path\" is not a store path"),
            "{line}"
        );
        let line = larder.fails(&["queue", "status"]).await;
        assert!(line.contains("no watcher-agent is running"), "{line}");
        let line = larder.fails(&["watch-store", "nosuch"]).await;
        assert!(
            line.contains("server \"local\"") && line.contains("no such cache"),
            "{line}"
        );

        let agent = Agent::start(larder).await;
        let second = larder
            .command(binary("watcher-agent"))
            .output()
            .await
            .expect("a second agent");
        let line = assert_error_output(&["(watcher-agent)"], &second);
        assert!(line.contains("already running"), "{line}");
        agent.stop().await;

        let closed = tests::ports::HeldPort::new();
        larder
            .ok(&[
                "login",
                "down",
                &format!("http://{}/", closed.address()),
                "token",
            ])
            .await;
        let line = larder.fails(&["watch-store", "down:c"]).await;
        assert!(line.contains("cannot reach server \"down\""), "{line}");
    }
}
