//! The real service binaries as child processes: for tests of what only a
//! process shows (its first-start output, a graceful stop on SIGTERM), for
//! crash tests, which SIGKILL `ingest-api` and start it again on the same
//! config, and for the distributed topology ([`crate::cluster`]).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::server::binary;

/// An `ingest-api` command with a clean environment for its settings:
/// nothing from the caller's `LARDER_CONFIG` or `RUST_LOG`.
pub fn ingest_api_command() -> Command {
    service_command("ingest-api")
}

/// A command running the workspace binary `name` with a clean environment
/// for its settings: nothing from the caller's `LARDER_CONFIG` or
/// `RUST_LOG`.
pub fn service_command(name: &str) -> Command {
    let mut command = Command::new(binary(name));
    command
        .env_remove("LARDER_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

/// A service process whose stdout lines arrive on a channel.
pub struct ServerProcess {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ServerProcess {
    /// Starts `ingest-api --config CONFIG --listen 127.0.0.1:0` with JSON
    /// logs, so that the "serving" line names the address.
    pub fn start(config: &Path) -> Self {
        Self::start_with(config, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub fn start_with(config: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_listening(config, "127.0.0.1:0", env)
    }

    /// [`start_with`](Self::start_with) on a given address, e.g. to bring a
    /// server back where its clients expect it.
    pub fn start_listening(config: &Path, listen: &str, env: &[(&str, &str)]) -> Self {
        let mut command = ingest_api_command();
        command
            .arg("--config")
            .arg(config)
            .args(["--listen", listen])
            .envs(env.iter().copied());
        Self::spawn("ingest-api", command)
    }

    /// Spawns `command` (from [`service_command`]), naming it `name` in
    /// failure messages, with JSON logs on a piped stdout.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .env("LARDER_LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("starting {name}: {error}"));
        let stdout = child.stdout.take().expect("stdout was piped");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line `pick` accepts; fails after 60 s or when
    /// the process exits.
    pub fn wait_for<T>(&mut self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = pick(&line);
                    self.seen.push(line);
                    if let Some(found) = found {
                        return found;
                    }
                }
                Err(_) => panic!(
                    "{} did not print the expected line; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The address from the JSON "serving" log line.
    pub fn serving_address(&mut self) -> String {
        let line = self.wait_for_message("serving");
        line["fields"]["address"]
            .as_str()
            .expect("the serving line names the address")
            .to_owned()
    }

    /// Waits for the JSON log line whose message is `message`, and returns it.
    pub fn wait_for_message(&mut self, message: &str) -> serde_json::Value {
        self.wait_for(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            (value["fields"]["message"] == message).then_some(value)
        })
    }

    /// Every stdout line printed so far.
    pub fn lines(&mut self) -> &[String] {
        self.seen.extend(self.lines.try_iter());
        &self.seen
    }

    /// The process id, for signals.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server with SIGTERM (graceful shutdown) and returns
    /// everything it printed on stdout.
    pub fn stop(mut self) -> Vec<String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        let exit = self.child.wait().expect("waiting for the process");
        assert!(
            exit.success(),
            "{} exited with {exit} after SIGTERM",
            self.name
        );
        self.seen.extend(self.lines.iter());
        std::mem::take(&mut self.seen)
    }
}

impl ServerProcess {
    /// Kills the server with SIGKILL, as a crash or the OOM killer would:
    /// no graceful shutdown, nothing flushed.
    pub fn kill(mut self) {
        self.child.kill().expect("sending SIGKILL");
        self.child.wait().expect("waiting for the killed process");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A failed test must not leave its server running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
