//! The documented system-wide setup (issue #12): Nix's post-build-hook
//! runs as root and queues paths, while `watcher-agent` runs as an
//! unprivileged user (`nobody`, which a fresh Debian has) and reads the
//! store through a real `nix-daemon`, as on a multi-user Nix install.
//!
//! The tests run as root. The agent's user gets what a system service
//! would have: its own home and client config, and a state directory (as
//! systemd's `StateDirectory=` makes it) holding the queue, named in the
//! config's `[agent] spool-dir`, which root's hook reads too. The binaries
//! are copied where that user can run them (the build directory is under
//! root's home), and so is the current Nix reached (bind-mounted).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::nix::NixVersion;
use tests::server::{binary, TestServer};

use super::agent::{
    assert_served, drained, hook_script, queue_view, set_agent_settings, Agent, Setup,
};
use super::{text, Larder};

/// The unprivileged user the agent runs as.
const AGENT_UID: u32 = 65534;
const AGENT_GID: u32 = 65534;

/// Gives `path` (and everything under it) to the agent's user.
fn give_to_agent_user(path: &Path) {
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{AGENT_UID}:{AGENT_GID}")])
        .arg(path)
        .status()
        .expect("running chown");
    assert!(status.success(), "chown {}", path.display());
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("chmod {}: {error}", path.display()));
}

/// A `nix-daemon` serving the test's chroot store on a socket the agent's
/// user can reach; killed when dropped.
struct NixDaemon {
    child: tokio::process::Child,
    socket: PathBuf,
    /// The chroot store's directory, readable by the agent's user.
    store_root: PathBuf,
}

impl NixDaemon {
    async fn start(setup: &Setup, socket: PathBuf) -> Self {
        // The store's files are world-readable; the directory holding the
        // chroot is made so too.
        set_mode(setup.env.root(), 0o755);
        let mut command: tokio::process::Command = setup.env.command("nix-daemon").into();
        // The daemon serves the store its `store` setting names, the
        // chroot store the test's paths were added to.
        let config = format!(
            "store = {}\nsubstituters =\nbuild-users-group =",
            setup.root.display()
        );
        let child = command
            .env("NIX_CONFIG", config)
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting nix-daemon");
        let mut daemon = Self {
            child,
            socket,
            store_root: setup.root.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("nix-daemon exited with {status}");
            }
            assert!(Instant::now() < deadline, "nix-daemon never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon
    }
}

/// Where the agent's user runs a version's Nix from: Debian's, on `PATH`;
/// the current one's directory (under root's home, which that user cannot
/// enter) bind-mounted into a directory it can, until dropped.
struct NixForAgentUser {
    /// `PATH` for the agent.
    path: String,
    /// The directory holding the mount, and the mount point.
    mount: Option<(tempfile::TempDir, PathBuf)>,
}

impl NixForAgentUser {
    fn new(version: NixVersion) -> Self {
        let inherited = std::env::var("PATH").unwrap_or_default();
        let Some(bin_dir) = version.bin_dir() else {
            return Self {
                path: inherited,
                mount: None,
            };
        };
        let nix_dir = bin_dir.parent().expect("the current Nix's directory");
        let dir = tempfile::Builder::new()
            .prefix("larder-nix-for-agent-")
            .tempdir()
            .expect("a directory");
        set_mode(dir.path(), 0o755);
        let mount_point = dir.path().join("nix-current");
        std::fs::create_dir(&mount_point).expect("a mount point");
        let status = std::process::Command::new("mount")
            .arg("--bind")
            .arg(nix_dir)
            .arg(&mount_point)
            .status()
            .expect("running mount");
        assert!(status.success(), "mount --bind {}", nix_dir.display());
        Self {
            path: format!("{}:{inherited}", mount_point.join("bin").display()),
            mount: Some((dir, mount_point)),
        }
    }
}

impl Drop for NixForAgentUser {
    fn drop(&mut self) {
        if let Some((_, mount_point)) = &self.mount {
            let _ = std::process::Command::new("umount")
                .arg("--lazy")
                .arg(mount_point)
                .status();
        }
    }
}

/// The agent's side of the setup: its user's directories and the
/// binaries it runs, inside the [`Larder`] user's directory.
struct AgentUser {
    /// What systemd's `StateDirectory=` would be (`/var/lib/larder`).
    state_dir: PathBuf,
    /// The queue, `[agent] spool-dir`: not created beforehand.
    spool_dir: PathBuf,
    bin_dir: PathBuf,
    /// `/etc/larder/hook.env` of the documented setup.
    hook_env: PathBuf,
}

impl AgentUser {
    /// Logs `larder` in (as root, who then hands the files over), creates
    /// the cache, and lays out what the agent's user owns.
    async fn new(larder: &Larder, server: &TestServer, token: &str, cache: &str) -> Self {
        larder.ok(&["login", "local", &server.url(), token]).await;
        larder.ok(&["cache", "create", cache]).await;
        let base = larder.dir.path();
        // Reachable by the agent's user; what it owns is below.
        set_mode(base, 0o755);
        let state_dir = base.join("state");
        let spool_dir = state_dir.join("agent");
        let bin_dir = base.join("bin");
        std::fs::create_dir_all(&state_dir).expect("creating the state directory");
        std::fs::create_dir_all(&bin_dir).expect("creating the bin directory");
        for program in ["larder", "watcher-agent"] {
            std::fs::copy(binary(program), bin_dir.join(program)).expect("copying a binary");
        }
        set_agent_settings(
            larder,
            &format!("spool-dir = \"{}\"\n", spool_dir.display()),
        );
        for owned in ["home", "config", "nix-conf-dir", "state"] {
            give_to_agent_user(&base.join(owned));
        }
        let hook_env = base.join("hook.env");
        std::fs::write(
            &hook_env,
            format!(
                "LARDER_HOOK_CACHE=local:{cache}\nXDG_CONFIG_HOME={}\n",
                larder.config_home().display()
            ),
        )
        .expect("writing hook.env");
        Self {
            state_dir,
            spool_dir,
            bin_dir,
            hook_env,
        }
    }

    /// Runs the post-build-hook as Nix's daemon does (as root, with the
    /// outputs in `OUT_PATHS`), with hook.env as documented.
    async fn hook(&self, paths: &[String]) {
        let output = tokio::process::Command::new("sh")
            .arg(hook_script())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", "/root")
            .env("OUT_PATHS", paths.join(" "))
            .env(
                "DRV_PATH",
                "/nix/store/00000000000000000000000000000000-unused.drv",
            )
            .env("LARDER_HOOK_ENV", &self.hook_env)
            .env("LARDER_BIN", self.bin_dir.join("larder"))
            .output()
            .await
            .expect("running the hook");
        let said = text(&output.stderr);
        assert!(output.status.success(), "{said}");
        assert!(text(&output.stdout).contains("queued"), "{said}");
        assert!(!said.contains("not queued"), "{said}");
    }

    /// Starts the agent as the unprivileged user (setpriv execs it, so the
    /// pid is the agent's own) with `version`'s Nix, talking to the store
    /// of `setup` through a `nix-daemon` of that version, its log going to
    /// `agent.log` in the user's directory.
    async fn start_agent(&self, setup: &Setup, version: NixVersion) -> RunningAgent {
        let larder = &setup.larder;
        let daemon_dir = larder.dir.path().join("daemon");
        std::fs::create_dir(&daemon_dir).expect("a directory for the daemon's socket");
        let daemon = NixDaemon::start(setup, daemon_dir.join("socket")).await;
        let nix = NixForAgentUser::new(version);
        let log = larder.dir.path().join("agent.log");
        let mut command = larder.command("setpriv");
        command
            .args([
                &format!("--reuid={AGENT_UID}"),
                &format!("--regid={AGENT_GID}"),
                "--clear-groups",
                "--",
            ])
            .arg(self.bin_dir.join("watcher-agent"))
            .env("PATH", &nix.path)
            // Through the daemon, reading the store's files directly as on
            // a real install (here they are under the chroot's root).
            .env(
                "NIX_CONFIG",
                format!(
                    "store = unix://{}?root={}\nsubstituters =",
                    daemon.socket.display(),
                    daemon.store_root.display()
                ),
            )
            .stdout(Stdio::inherit())
            .stderr(std::fs::File::create(&log).expect("creating the agent's log"));
        let agent = Agent::spawn_command(larder, command, &[], Some(&log)).await;
        RunningAgent {
            agent,
            log,
            _daemon: daemon,
            _nix: nix,
        }
    }
}

/// The agent running as its user, with what it needs while it runs
/// (dropped after it, in field order).
struct RunningAgent {
    agent: Agent,
    log: PathBuf,
    _daemon: NixDaemon,
    _nix: NixForAgentUser,
}

/// The owner and group of a path (not following a symlink).
fn owner(path: &Path) -> (u32, u32) {
    let metadata = std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    (metadata.uid(), metadata.gid())
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_running_as_a_user_uploads_what_roots_hook_queued(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        let user = AgentUser::new(larder, &server, &token, "shared").await;
        let paths = setup.add_paths("shared", 3, 0).await;

        // Root's hook runs first, before the agent ever did: it creates the
        // queue, for the agent's user.
        user.hook(&paths[..2]).await;
        let pending = user.spool_dir.join("pending");
        let entries: Vec<PathBuf> = std::fs::read_dir(&pending)
            .expect("the queue root made")
            .map(|entry| entry.expect("listing").path())
            .collect();
        assert_eq!(entries.len(), 2, "{entries:?}");
        // Root's files, given to the state directory's owner: without that the
        // agent could not read them (mode 0600) nor even list the queue.
        for path in [&user.spool_dir, &pending, &user.spool_dir.join("failed")]
            .into_iter()
            .chain(&entries)
        {
            assert_eq!(owner(path), (AGENT_UID, AGENT_GID), "{}", path.display());
        }
        assert_eq!(owner(&user.state_dir), (AGENT_UID, AGENT_GID));

        let running = user.start_agent(&setup, version).await;
        // Queued while the agent runs, too.
        user.hook(&paths[2..]).await;
        let view = drained(larder, &[]).await;
        let logged = std::fs::read_to_string(&running.log).unwrap_or_default();
        assert_eq!(view.failed, 0, "{}\nagent log:\n{logged}", view.text);
        assert_served(&server.url(), "shared", &token, &paths).await;
        running.agent.stop().await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_that_cannot_change_its_queue_logs_each_entry_once_and_goes_on(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let setup = Setup::with_version(version).await;
        let larder = &setup.larder;
        let user = AgentUser::new(larder, &server, &token, "stuck").await;
        let paths = setup.add_paths("stuck", 3, 0).await;
        let running = user.start_agent(&setup, version).await;

        // pending/ is the agent's user's but not writable to it: nothing in it
        // can be moved or removed by the agent (root still writes there).
        let pending = user.spool_dir.join("pending");
        set_mode(&pending, 0o555);
        let garbage = pending.join("garbage.json");
        std::fs::write(&garbage, b"not JSON").expect("an unusable entry");
        // Each hook call wakes the agent for a round; each path being served
        // shows that a round went by with the unusable file still there and
        // the earlier paths uploaded but still pending.
        for path in &paths {
            user.hook(std::slice::from_ref(path)).await;
            assert_served(&server.url(), "stuck", &token, std::slice::from_ref(path)).await;
        }
        let view = queue_view(larder, &[]).await;
        assert_eq!(view.failed, 1, "{}", view.text);
        assert!(
            view.text.contains("garbage.json") && view.text.contains("not a queue entry"),
            "{}",
            view.text
        );
        running.agent.stop().await;

        // Once per file, not once per round: without that, every round logs the
        // unusable file again, and re-pushes the unremovable paths at once, in
        // a tight loop that logs each failed removal again.
        let logged = std::fs::read_to_string(&running.log).expect("the agent's log");
        let count = |needle: &str| logged.lines().filter(|line| line.contains(needle)).count();
        assert_eq!(
            count("cannot move an unusable queue entry to failed/"),
            1,
            "{logged}"
        );
        assert_eq!(count("garbage.json"), 1, "{logged}");
        assert_eq!(
            count("removing an uploaded path from the queue"),
            paths.len(),
            "{logged}"
        );
        // The entries stay for an agent that can remove them.
        let view = queue_view(larder, &[]).await;
        assert_eq!(view.pending, paths.len(), "{}", view.text);
    }
}
