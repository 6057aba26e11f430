//! Driving the real Nix client from tests, fully isolated from the
//! machine's Nix configuration and from `/nix`: Debian 12's `nix-bin` 2.8
//! ([`NixVersion::Debian`]), or a current one ([`NixVersion::Current`],
//! Debian sid's, which `ops/install.sh` puts in a chroot with wrappers that
//! run it on host paths under /tmp).
//!
//! Every command runs with its own `HOME`, XDG directories, an empty
//! `NIX_CONF_DIR`, no `NIX_REMOTE`, and a `NIX_CONFIG` that names a default
//! store inside the environment: as root, any Nix command that opens the
//! default store would otherwise create `/nix/store`. Stores are chroot
//! stores (`--store DIR`): paths are logically `/nix/store/…` and physically
//! `DIR/nix/store/…`, so caches made from them are usable by any client.
//!
//! A machine without `nix` makes every helper fail with a clear message;
//! tests never skip.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The logical store directory of every chroot store made here.
pub const STORE_DIR: &str = "/nix/store";

/// How long one Nix command may take before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// A failed Nix command or test-support step, with what it said.
#[derive(Debug)]
pub struct NixError(String);

impl fmt::Display for NixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NixError {}

pub type Result<T, E = NixError> = std::result::Result<T, E>;

fn error(message: impl Into<String>) -> NixError {
    NixError(message.into())
}

fn io_error(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> NixError {
    move |source| error(format!("{what}: {source}"))
}

/// Which Nix client a test drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NixVersion {
    /// Debian 12's `nix-bin`, 2.8, found on `PATH`.
    Debian,
    /// A current Nix (2.3x): the programs in `$LARDER_TEST_NIX_CURRENT`,
    /// by default `$LARDER_CACHE_DIR/nix-current/bin` (or
    /// `~/.cache/larder/nix-current/bin`), where `ops/install.sh` puts it.
    /// They run in a root of their own that shares the host's /tmp, where
    /// every environment and store of these tests is.
    Current,
}

impl NixVersion {
    /// Where this version's programs are; `None` for the ones on `PATH`.
    pub fn bin_dir(self) -> Option<PathBuf> {
        match self {
            Self::Debian => None,
            Self::Current => Some(match std::env::var_os("LARDER_TEST_NIX_CURRENT") {
                Some(dir) => PathBuf::from(dir),
                None => std::env::var_os("LARDER_CACHE_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                            .join(".cache/larder")
                    })
                    .join("nix-current/bin"),
            }),
        }
    }
}

impl NixVersion {
    /// `extra-sandbox-paths` under which test derivations' builders (`/bin/sh`,
    /// programs on `PATH=/usr/bin:/bin`) run in the build sandbox. Nix 2.8
    /// has no `/bin/sh` of its own there: the host's `/usr/bin` stands in
    /// for `/bin`. A current Nix brings `/bin/sh` by default (Debian sets
    /// `sandbox-paths = /bin/sh=/usr/bin/bash-static`), and must not be
    /// given `/bin` as well: it would create its `/bin/sh` mount point
    /// inside that bind mount, through the `sh` symlink, emptying the
    /// root's `dash`.
    pub fn extra_sandbox_paths(self) -> &'static str {
        match self {
            Self::Debian => "/bin=/usr/bin /lib=/usr/lib /lib64=/usr/lib64 /usr",
            Self::Current => "/lib=/usr/lib /lib64=/usr/lib64 /usr",
        }
    }

    /// `PATH` for a program that runs `nix` itself (the `larder` client,
    /// the agent): this version's programs first. Panics when they are
    /// missing, rather than let 2.8 further on the path stand in for them.
    pub fn path_variable(self) -> String {
        let inherited = std::env::var("PATH").unwrap_or_default();
        match self.bin_dir() {
            None => inherited,
            Some(dir) => {
                assert!(
                    dir.join("nix").exists(),
                    "no current Nix at {} (ops/install.sh installs it)",
                    dir.display()
                );
                format!("{}:{inherited}", dir.display())
            }
        }
    }
}

/// Declares a test that drives Nix once under each version the suite
/// tests: a module named as the test, with the tests `under_nix_2_8` and
/// `under_current_nix`, which run the body with `version` set. Every
/// attribute given (`#[tokio::test(…)]` or `#[test]`, doc comments) is put
/// on both. The body sees the enclosing module's items through
/// `use super::*`.
///
/// ```ignore
/// tests::under_each_nix! {
///     #[tokio::test]
///     async fn nix_substitutes(version: NixVersion) {
///         let env = NixEnv::with_version(version).expect("a Nix environment");
///     }
/// }
/// ```
#[macro_export]
macro_rules! under_each_nix {
    ($(#[$attribute:meta])* async fn $name:ident($version:ident: NixVersion) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($version: $crate::nix::NixVersion) $body

            $(#[$attribute])*
            async fn under_nix_2_8() {
                body($crate::nix::NixVersion::Debian).await
            }

            $(#[$attribute])*
            async fn under_current_nix() {
                body($crate::nix::NixVersion::Current).await
            }
        }
    };
    ($(#[$attribute:meta])* fn $name:ident($version:ident: NixVersion) -> $output:ty $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($version: $crate::nix::NixVersion) -> $output $body

            $(#[$attribute])*
            fn under_nix_2_8() -> $output {
                body($crate::nix::NixVersion::Debian)
            }

            $(#[$attribute])*
            fn under_current_nix() -> $output {
                body($crate::nix::NixVersion::Current)
            }
        }
    };
}

/// An isolated Nix environment in its own temporary directory, deleted on
/// drop (set `LARDER_KEEP_NIX_ENV=1` to keep it for debugging).
#[derive(Debug)]
pub struct NixEnv {
    version: NixVersion,
    dir: tempfile::TempDir,
    nix_config: String,
    /// Extra environment variables of every command (`set_env`).
    variables: Vec<(String, String)>,
    keep: bool,
}

impl Drop for NixEnv {
    /// Store paths are read-only; make them writable so the temporary
    /// directory can be removed also when the tests do not run as root.
    fn drop(&mut self) {
        fn make_writable(path: &Path) {
            use std::os::unix::fs::PermissionsExt;
            let Ok(metadata) = std::fs::symlink_metadata(path) else {
                return;
            };
            if metadata.is_dir() {
                let mode = metadata.permissions().mode();
                let _ =
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o700));
                if let Ok(entries) = std::fs::read_dir(path) {
                    for entry in entries.flatten() {
                        make_writable(&entry.path());
                    }
                }
            }
        }
        if !self.keep {
            make_writable(self.dir.path());
        }
    }
}

/// A key pair made by `nix key generate-secret`.
#[derive(Debug, Clone)]
pub struct NixKeyPair {
    pub secret_key_file: PathBuf,
    /// `name:base64(seed || public)`.
    pub secret_key: String,
    /// `name:base64(public)`, as in `trusted-public-keys`.
    pub public_key: String,
}

/// A chroot store filled by [`NixEnv::make_store`].
#[derive(Debug, Clone)]
pub struct TestStore {
    /// The chroot directory, for `--store`.
    pub root: PathBuf,
    /// The generated paths, in creation order (full logical paths).
    pub paths: Vec<String>,
    /// The subset of `paths` built by a derivation (input-addressed, with a
    /// deriver: the ones that need signatures).
    pub built: Vec<String>,
    /// Source directories added with `builtins.path` (content-addressed).
    pub sources: Vec<String>,
    /// `builtins.toFile` texts (content-addressed, with references).
    pub texts: Vec<String>,
}

impl TestStore {
    /// Where a logical `/nix/store/…` path lives on disk.
    pub fn physical_path(&self, store_path: &str) -> PathBuf {
        physical_path(&self.root, store_path)
    }

    /// The `--store` argument for this store.
    pub fn store_arg(&self) -> Result<&str> {
        utf8(&self.root)
    }
}

/// Where a logical `/nix/store/…` path of the chroot store `root` lives.
pub fn physical_path(root: &Path, store_path: &str) -> PathBuf {
    root.join(store_path.trim_start_matches('/'))
}

impl NixEnv {
    /// An environment driving `version`, checked to run.
    pub fn with_version(version: NixVersion) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("larder-nix-")
            .tempdir()
            .map_err(io_error("creating a temporary directory for Nix"))?;
        let root = dir.path();
        for sub in ["home", "conf", "cache", "config", "data", "state"] {
            std::fs::create_dir_all(root.join(sub))
                .map_err(io_error(format!("creating {}", root.join(sub).display())))?;
        }
        std::fs::write(root.join("conf/nix.conf"), "")
            .map_err(io_error("writing an empty nix.conf"))?;
        // - store: without it a command that opens the default store creates
        //   /nix/store (as root).
        // - substituters empty: otherwise every build first spends seconds
        //   trying to reach cache.nixos.org.
        // - build-users-group empty: build as the calling user.
        // - A chroot store forces the sandbox: bring the programs in (see
        //   NixVersion::extra_sandbox_paths).
        // - narinfo-cache-negative-ttl 0: a 404 is otherwise remembered for
        //   an hour, across tests that share nothing else.
        let nix_config = format!(
            "experimental-features = nix-command\n\
             store = {}\n\
             substituters =\n\
             build-users-group =\n\
             sandbox = true\n\
             extra-sandbox-paths = {}\n\
             narinfo-cache-negative-ttl = 0\n\
             connect-timeout = 5\n\
             fsync-metadata = false\n\
             warn-dirty = false",
            root.join("default-store").display(),
            version.extra_sandbox_paths()
        );
        let mut dir = dir;
        let keep = std::env::var_os("LARDER_KEEP_NIX_ENV").is_some();
        if keep {
            dir.disable_cleanup(true);
            eprintln!("keeping Nix environment {}", dir.path().display());
        }
        let env = Self {
            version,
            dir,
            nix_config,
            variables: Vec::new(),
            keep,
        };
        env.check_nix()?;
        Ok(env)
    }

    /// The environment's directory; put stores and caches under it.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh path under [`root`](Self::root) (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// The Nix this environment drives.
    pub fn version(&self) -> NixVersion {
        self.version
    }

    fn check_nix(&self) -> Result<()> {
        let output = self
            .command("nix")
            .arg("--version")
            .output()
            .map_err(|source| {
                error(format!(
                    "the real Nix client ({:?}) is required but `nix --version` could not run \
                     ({source}); ops/install.sh installs both versions",
                    self.version
                ))
            })?;
        let version = String::from_utf8_lossy(&output.stdout);
        // "nix (Nix) 2.34.8": the minor version, so that a test meant for a
        // current Nix cannot pass on 2.8 through a misplaced wrapper.
        let minor = version
            .trim()
            .strip_prefix("nix (Nix) 2.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|minor| minor.parse::<u32>().ok());
        let expected = match self.version {
            NixVersion::Debian => minor.is_some(),
            NixVersion::Current => minor.is_some_and(|minor| minor >= 20),
        };
        if !output.status.success() || !expected {
            return Err(error(format!(
                "`nix --version` of {:?} did not report the Nix expected: {} {}",
                self.version,
                version.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// A command for a Nix program with the isolated environment set.
    pub fn command(&self, program: &str) -> Command {
        let root = self.root();
        let mut command = match self.version.bin_dir() {
            None => Command::new(program),
            Some(dir) => Command::new(dir.join(program)),
        };
        command
            .env("HOME", root.join("home"))
            .env("XDG_CACHE_HOME", root.join("cache"))
            .env("XDG_CONFIG_HOME", root.join("config"))
            .env("XDG_DATA_HOME", root.join("data"))
            .env("XDG_STATE_HOME", root.join("state"))
            .env("NIX_CONF_DIR", root.join("conf"))
            .env("NIX_USER_CONF_FILES", root.join("conf/nix.conf"))
            .env("NIX_CONFIG", &self.nix_config)
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_PATH")
            .envs(self.variables.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null());
        command
    }

    /// Runs a Nix command to completion (killing it after a generous
    /// timeout) and fails with its stderr unless it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Vec<u8>> {
        let output = self.output(program, args)?;
        if !output.status.success() {
            return Err(error(format!(
                "`{program} {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(output.stdout)
    }

    /// Like [`run`](Self::run), returning stdout as trimmed text.
    pub fn run_text(&self, program: &str, args: &[&str]) -> Result<String> {
        let stdout = self.run(program, args)?;
        String::from_utf8(stdout)
            .map(|text| text.trim().to_owned())
            .map_err(|_| error(format!("`{program} {}` printed non-UTF-8", args.join(" "))))
    }

    /// Runs a Nix command and returns its output whatever its status, for
    /// tests that expect a failure.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut child = self
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error(format!("starting `{program}`")))?;
        // Read both pipes on threads so a chatty command cannot block. Both
        // were set to `Stdio::piped()` above, so `take` returns them.
        let mut stdout = child.stdout.take().expect("stdout was piped");
        let mut stderr = child.stderr.take().expect("stderr was piped");
        let out_thread = std::thread::spawn(move || {
            let mut buffer = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut buffer).map(|_| buffer)
        });
        let err_thread = std::thread::spawn(move || {
            let mut buffer = Vec::new();
            std::io::Read::read_to_end(&mut stderr, &mut buffer).map(|_| buffer)
        });
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            match child
                .try_wait()
                .map_err(io_error(format!("waiting for `{program}`")))?
            {
                Some(status) => break status,
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(error(format!(
                        "`{program} {}` did not finish within {COMMAND_TIMEOUT:?}",
                        args.join(" ")
                    )));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let join = |thread: std::thread::JoinHandle<std::io::Result<Vec<u8>>>| {
            thread
                .join()
                .map_err(|_| error("output reader thread panicked"))?
                .map_err(io_error(format!("reading the output of `{program}`")))
        };
        Ok(Output {
            status,
            stdout: join(out_thread)?,
            stderr: join(err_thread)?,
        })
    }

    /// `nix path-info --json` of `paths` in the chroot store at `root`, as
    /// one object per path with its `path` field, in the order Nix prints
    /// them: Nix 2.8 prints such a list; a current Nix is asked for format 1
    /// (an object keyed by path), made into that list here.
    pub fn path_infos(&self, root: &Path, paths: &[String]) -> Result<Vec<serde_json::Value>> {
        let mut args = vec!["path-info", "--json"];
        if self.version == NixVersion::Current {
            args.extend(["--json-format", "1"]);
        }
        args.extend(["--store", utf8(root)?]);
        args.extend(paths.iter().map(String::as_str));
        let json = self.run_text("nix", &args)?;
        let parsed: serde_json::Value = serde_json::from_str(&json)
            .map_err(|cause| error(format!("nix path-info printed {json}: {cause}")))?;
        match parsed {
            serde_json::Value::Array(infos) => Ok(infos),
            serde_json::Value::Object(by_path) => by_path
                .into_iter()
                .map(|(path, mut info)| match info.as_object_mut() {
                    Some(fields) => {
                        fields.insert("path".to_owned(), serde_json::Value::String(path));
                        Ok(info)
                    }
                    None => Err(error(format!("nix path-info: {path} is not valid: {json}"))),
                })
                .collect(),
            _ => Err(error(format!("nix path-info printed {json}"))),
        }
    }

    /// The public key of the secret key in `secret_key_file`
    /// (`nix key convert-secret-to-public`).
    pub fn public_key(&self, secret_key_file: &Path) -> Result<String> {
        let file = std::fs::File::open(secret_key_file)
            .map_err(io_error(format!("opening {}", secret_key_file.display())))?;
        let output = self
            .command("nix")
            .args(["key", "convert-secret-to-public"])
            .stdin(file)
            .output()
            .map_err(io_error("running `nix key convert-secret-to-public`"))?;
        if !output.status.success() {
            return Err(error(format!(
                "`nix key convert-secret-to-public` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    pub fn keygen(&self, key_name: &str) -> Result<NixKeyPair> {
        let secret_key =
            self.run_text("nix", &["key", "generate-secret", "--key-name", key_name])?;
        let secret_key_file = self.path(&format!("{key_name}.secret"));
        std::fs::write(&secret_key_file, &secret_key)
            .map_err(io_error(format!("writing {}", secret_key_file.display())))?;
        let public_key = self.public_key(&secret_key_file)?;
        Ok(NixKeyPair {
            secret_key_file,
            secret_key,
            public_key,
        })
    }

    /// A key pair made by `nix-store --generate-binary-cache-key`, the
    /// files a cache operator has (the secret one written without a final
    /// newline), as Nix 2.8 and a current Nix both write them.
    pub fn generate_binary_cache_key(&self, key_name: &str) -> Result<NixKeyPair> {
        let secret_key_file = self.path(&format!("{key_name}.sk"));
        let public_key_file = self.path(&format!("{key_name}.pk"));
        self.run(
            "nix-store",
            &[
                "--generate-binary-cache-key",
                key_name,
                utf8(&secret_key_file)?,
                utf8(&public_key_file)?,
            ],
        )?;
        let read = |file: &Path| {
            std::fs::read_to_string(file)
                .map(|text| text.trim().to_owned())
                .map_err(io_error(format!("reading {}", file.display())))
        };
        Ok(NixKeyPair {
            secret_key: read(&secret_key_file)?,
            public_key: read(&public_key_file)?,
            secret_key_file,
        })
    }

    /// `nix-store --realise` of `paths` into the chroot store at
    /// `destination`, substituting from `cache_url` only, with signatures
    /// required and only `public_keys` trusted. Returns the raw output:
    /// tests assert on success and on failure.
    pub fn substitute_trusting(
        &self,
        destination: &Path,
        cache_url: &str,
        public_keys: &[&str],
        paths: &[String],
    ) -> Result<Output> {
        let trusted = public_keys.join(" ");
        let mut args = vec![
            "--store",
            utf8(destination)?,
            "--realise",
            "--option",
            "require-sigs",
            "true",
            "--option",
            "substituters",
            cache_url,
            "--option",
            "trusted-public-keys",
            trusted.as_str(),
        ];
        args.extend(paths.iter().map(String::as_str));
        self.output("nix-store", &args)
    }

    /// `nix-store --dump` of a filesystem path (for a store path, pass its
    /// physical path: `--store` does not apply to `--dump`).
    pub fn dump(&self, path: &Path) -> Result<Vec<u8>> {
        let path = path
            .to_str()
            .ok_or_else(|| error(format!("{} is not UTF-8", path.display())))?;
        self.run("nix-store", &["--dump", path])
    }

    /// Adds a file or directory tree to the chroot store at `store` and
    /// returns its store path.
    pub fn add_path(&self, store: &Path, path: &Path) -> Result<String> {
        self.run_text(
            "nix-store",
            &["--store", utf8(store)?, "--add", utf8(path)?],
        )
    }

    /// `nix copy` of `paths` (and their closure) from the chroot store at
    /// `store` to a binary cache URL such as `file:///dir?compression=zstd`.
    pub fn copy_to(&self, store: &Path, url: &str, paths: &[String]) -> Result<()> {
        let mut args = vec!["copy", "--store", utf8(store)?, "--to", url];
        args.extend(paths.iter().map(String::as_str));
        self.run("nix", &args).map(|_| ())
    }

    /// Builds, in the chroot store at `store`, a derivation whose builder
    /// prints `building SALT` to stdout and `to stderr SALT` to stderr (its
    /// build log); returns the derivation's path and its output's.
    pub fn build_logging_derivation(&self, store: &Path, salt: &str) -> Result<(String, String)> {
        if salt.contains(['"', '\\', '$', '\'', '\n', ' ']) {
            return Err(error(format!("salt {salt:?} must not need quoting")));
        }
        let file = store.with_extension(format!("logging-{salt}.nix"));
        let nix = format!(
            "derivation {{ name = \"logging\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; \
             args = [ \"-c\" \"echo building {salt}; echo to stderr {salt} >&2; echo {salt} > $out\" ]; }}\n"
        );
        write_file(&file, nix.as_bytes(), false)?;
        let (store_arg, file_arg) = (utf8(store)?, utf8(&file)?);
        let drv = self.run_text("nix-instantiate", &["--store", store_arg, file_arg])?;
        let output = self.run_text(
            "nix-build",
            &["--store", store_arg, file_arg, "--no-out-link"],
        )?;
        Ok((drv, output))
    }

    /// `nix copy` of `paths` (and their closure) from a binary cache URL
    /// into the chroot store at `destination`, trusting only
    /// `trusted_public_key` (signatures are required, as for any client).
    pub fn copy_from(
        &self,
        url: &str,
        destination: &Path,
        trusted_public_key: &str,
        paths: &[String],
    ) -> Result<()> {
        let mut args = vec![
            "copy",
            "--from",
            url,
            "--to",
            utf8(destination)?,
            "--option",
            "trusted-public-keys",
            trusted_public_key,
        ];
        args.extend(paths.iter().map(String::as_str));
        self.run("nix", &args).map(|_| ())
    }

    /// Signs `paths` and their closures in the chroot store at `store`
    /// (`nix store sign -r`), so later copies carry the signatures.
    pub fn sign(&self, store: &Path, secret_key_file: &Path, paths: &[String]) -> Result<()> {
        let mut args = vec![
            "store",
            "sign",
            "--store",
            utf8(store)?,
            "--key-file",
            utf8(secret_key_file)?,
            "--recursive",
        ];
        args.extend(paths.iter().map(String::as_str));
        self.run("nix", &args).map(|_| ())
    }

    /// `nix store verify --sigs-needed 1` of `paths` in the store at `url`
    /// (a binary cache or a chroot store), trusting only `public_key`.
    /// Returns the raw output: tests assert on success and on failure.
    pub fn store_verify(&self, url: &str, public_key: &str, paths: &[String]) -> Result<Output> {
        let mut args = vec![
            "store",
            "verify",
            "--store",
            url,
            "--sigs-needed",
            "1",
            "--option",
            "trusted-public-keys",
            public_key,
        ];
        args.extend(paths.iter().map(String::as_str));
        self.output("nix", &args)
    }

    /// Writes a netrc file that sends `password` (an API token) as HTTP
    /// Basic credentials to `machine` (a host name, no port) and makes every
    /// later command use it. Nix 2.8 has no bearer tokens; this is how it
    /// authenticates to a binary cache.
    pub fn use_netrc(&mut self, machine: &str, password: &str) -> Result<PathBuf> {
        let netrc = self.path("netrc");
        std::fs::write(&netrc, format!("machine {machine} password {password}\n"))
            .map_err(io_error(format!("writing {}", netrc.display())))?;
        self.add_config("netrc-file", utf8(&netrc)?);
        Ok(netrc)
    }

    /// Sets an environment variable for every later command, e.g.
    /// `NIX_SSL_CERT_FILE` (Nix 2.8 has no setting for a CA file).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.variables.push((key.to_owned(), value.to_owned()));
    }

    /// Adds `key = value` to the configuration of every later command.
    pub fn add_config(&mut self, key: &str, value: &str) {
        self.nix_config.push_str(&format!("\n{key} = {value}"));
    }

    /// The full closure of `paths` in `store`, sorted.
    pub fn closure(&self, store: &Path, paths: &[String]) -> Result<Vec<String>> {
        let mut args = vec!["--store", utf8(store)?, "--query", "--requisites"];
        args.extend(paths.iter().map(String::as_str));
        let mut closure: Vec<String> = self
            .run_text("nix-store", &args)?
            .lines()
            .map(str::to_owned)
            .collect();
        closure.sort();
        Ok(closure)
    }

    /// The direct references of `path` in `store` (full paths, sorted).
    pub fn references(&self, store: &Path, path: &str) -> Result<Vec<String>> {
        let text = self.run_text(
            "nix-store",
            &["--store", utf8(store)?, "--query", "--references", path],
        )?;
        let mut references: Vec<String> = text.lines().map(str::to_owned).collect();
        references.sort();
        Ok(references)
    }

    /// The NAR hash Nix recorded for `path` (`sha256:<base32>`).
    pub fn nar_hash(&self, store: &Path, path: &str) -> Result<String> {
        self.run_text(
            "nix-store",
            &["--store", utf8(store)?, "--query", "--hash", path],
        )
    }

    /// The NAR size Nix recorded for `path`.
    pub fn nar_size(&self, store: &Path, path: &str) -> Result<u64> {
        let text = self.run_text(
            "nix-store",
            &["--store", utf8(store)?, "--query", "--size", path],
        )?;
        text.parse()
            .map_err(|_| error(format!("`nix-store --query --size` printed {text:?}")))
    }

    /// Fills a chroot store at `store` with `n` paths that reference each
    /// other, like a small real-world closure:
    ///
    /// - sources (`builtins.path` of a directory with a text file, an
    ///   executable and a relative symlink; `fixed:r:sha256`, no references),
    /// - `builtins.toFile` texts naming two earlier paths (`text:sha256`),
    /// - outputs of real `/bin/sh` derivations that reference earlier paths
    ///   by content and by symlink (input-addressed, with a deriver).
    ///
    /// `salt` goes into every path's contents, so different salts give
    /// disjoint paths (use a unique salt per test when sharing a cache).
    /// The first path is a source, the second (if `n >= 2`) a text, the
    /// third (if `n >= 3`) a built output.
    ///
    /// Nix 2.8 makes the store whatever this environment's version: in
    /// full-suite runs, builds by the current Nix in its sandbox were now
    /// and then SIGKILLed (3 tests of about 60, the cause not found), and
    /// the tests using these stores are about what a Nix does with them
    /// (copy, push, substitute, verify), not about building. Builds by the
    /// current Nix are tested where the build is the point: the
    /// post-build-hook, build logs and content-addressed derivations.
    pub fn make_store(&self, store: &Path, n: usize, salt: &str) -> Result<TestStore> {
        let nix_2_8;
        let maker = match self.version {
            NixVersion::Debian => self,
            NixVersion::Current => {
                nix_2_8 = Self::with_version(NixVersion::Debian)?;
                &nix_2_8
            }
        };
        if salt.contains(['"', '\\', '$', '\'', '\n']) {
            return Err(error(format!("salt {salt:?} must not need quoting in Nix")));
        }
        // One generator directory per salt: several stores may be made
        // beside one store directory.
        let generated = store.with_extension(format!(
            "gen-{}",
            &larder_nix::Sha256Hash::digest(salt.as_bytes()).to_hex()[..16]
        ));
        std::fs::create_dir_all(&generated)
            .map_err(io_error("creating the generator directory"))?;
        let mut nix = String::from(
            "let\n  mk = name: script: derivation {\n    inherit name;\n    \
             system = builtins.currentSystem;\n    builder = \"/bin/sh\";\n    \
             PATH = \"/usr/bin:/bin\";\n    args = [ \"-c\" script ];\n  };\n",
        );
        let (mut sources, mut texts, mut built) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let previous = i.saturating_sub(1);
            let other = if i > 1 { (i * 7 + 3) % (i - 1) } else { 0 };
            match i % 3 {
                0 => {
                    let leaf = generated.join(format!("leaf-{i}"));
                    std::fs::create_dir_all(leaf.join("bin"))
                        .and_then(|()| std::fs::create_dir_all(leaf.join("share")))
                        .map_err(io_error("creating a source directory"))?;
                    let data: String = (0..50)
                        .map(|line| format!("salt={salt} leaf={i} line={line} lorem ipsum\n"))
                        .collect();
                    write_file(&leaf.join("share/data.txt"), data.as_bytes(), false)?;
                    write_file(
                        &leaf.join(format!("bin/tool-{i}")),
                        format!("#!/bin/sh\necho leaf {i} {salt}\n").as_bytes(),
                        true,
                    )?;
                    symlink("../share/data.txt", &leaf.join("bin/data-link"))?;
                    nix.push_str(&format!(
                        "  p{i} = builtins.path {{ path = {}; name = \"leaf-{i}\"; }};\n",
                        leaf.display()
                    ));
                    sources.push(i);
                }
                1 => {
                    nix.push_str(&format!(
                        "  p{i} = builtins.toFile \"text-{i}\" \"salt={salt} node={i} uses ${{p{previous}}} and ${{p{other}}}\\n\";\n"
                    ));
                    texts.push(i);
                }
                _ => {
                    nix.push_str(&format!(
                        "  p{i} = mk \"built-{i}\" ''mkdir -p $out/bin; echo salt={salt} node={i} > $out/id; \
                         echo ${{p{previous}}} > $out/dep1; ln -s ${{p{other}}} $out/dep2; \
                         printf '#!/bin/sh\\necho {i}\\n' > $out/bin/b{i}; chmod +x $out/bin/b{i}'';\n"
                    ));
                    built.push(i);
                }
            }
        }
        let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        let built_names: Vec<String> = built.iter().map(|i| format!("p{i}")).collect();
        nix.push_str(&format!(
            "in {{\n  all = map toString [ {} ];\n  drvs = [ {} ];\n}}\n",
            names.join(" "),
            built_names.join(" ")
        ));
        let nix_file = generated.join("default.nix");
        write_file(&nix_file, nix.as_bytes(), false)?;

        // Building realises every derivation; evaluating `all` with
        // --read-write-mode adds the sources and texts and prints all paths.
        let store_arg = utf8(store)?;
        let nix_file_arg = utf8(&nix_file)?;
        if !built.is_empty() {
            maker.run(
                "nix-build",
                &[
                    "--store",
                    store_arg,
                    nix_file_arg,
                    "-A",
                    "drvs",
                    "--no-out-link",
                ],
            )?;
        }
        let json = maker.run_text(
            "nix-instantiate",
            &[
                "--store",
                store_arg,
                "--eval",
                "--strict",
                "--json",
                "--read-write-mode",
                nix_file_arg,
                "-A",
                "all",
            ],
        )?;
        let paths = parse_json_string_list(&json)?;
        if paths.len() != n {
            return Err(error(format!(
                "expected {n} store paths, Nix printed {json}"
            )));
        }
        let pick = |indices: &[usize]| indices.iter().map(|&i| paths[i].clone()).collect();
        Ok(TestStore {
            root: store.to_owned(),
            sources: pick(&sources),
            texts: pick(&texts),
            built: pick(&built),
            paths,
        })
    }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| error(format!("{} is not UTF-8", path.display())))
}

/// Whether `ours` is the `.ls` listing `nix_wrote`, written by `version`:
/// byte for byte against Nix 2.8, whose key order Larder's listings follow;
/// as JSON documents against a current Nix, which sorts the keys.
pub fn same_listing(version: NixVersion, ours: &[u8], nix_wrote: &[u8]) -> bool {
    match version {
        NixVersion::Debian => ours == nix_wrote,
        NixVersion::Current => {
            let parse = |bytes| serde_json::from_slice::<serde_json::Value>(bytes).ok();
            parse(ours).is_some() && parse(ours) == parse(nix_wrote)
        }
    }
}

/// Writes a file, optionally executable (mode 0755).
pub fn write_file(path: &Path, contents: &[u8], executable: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).map_err(io_error(format!("writing {}", path.display())))?;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_error(format!("setting the mode of {}", path.display())))
}

/// Makes a symlink at `link` pointing to `target`.
pub fn symlink(target: &str, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .map_err(io_error(format!("creating the symlink {}", link.display())))
}

/// Parses `["a","b"]` as printed by `nix-instantiate --json` for a list of
/// store paths (which never need escapes).
fn parse_json_string_list(json: &str) -> Result<Vec<String>> {
    let bad = || error(format!("not a JSON list of plain strings: {json}"));
    let inner = json
        .trim()
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(bad)?;
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split(',')
        .map(|item| {
            let item = item.trim();
            item.strip_prefix('"')
                .and_then(|rest| rest.strip_suffix('"'))
                .filter(|text| !text.contains(['"', '\\']))
                .map(str::to_owned)
                .ok_or_else(bad)
        })
        .collect()
}

/// The files of a `file://` binary cache directory with the given suffix
/// (e.g. `.narinfo`, `.ls`), sorted by name.
pub fn cache_files(cache_dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cache_dir)
        .map_err(io_error(format!("listing {}", cache_dir.display())))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(suffix))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A `file://` URL for a cache directory, with query parameters.
pub fn file_cache_url(cache_dir: &Path, query: &str) -> String {
    if query.is_empty() {
        format!("file://{}", cache_dir.display())
    } else {
        format!("file://{}?{query}", cache_dir.display())
    }
}
