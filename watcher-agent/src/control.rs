//! The running agent's control socket (`SPOOL/agent.sock`), and the
//! client side the CLI uses.
//!
//! The queue itself is the spool directory; the socket only carries what
//! is not on disk. A request is one line, the answer one line:
//!
//! - `wake` → `ok`: look at the spool now (`larder queue` sends it after
//!   writing its entries; without it the agent still finds them on its
//!   next periodic scan).
//! - `status` → an [`AgentStatus`] as JSON: the uploads in flight.
//!
//! A connection that succeeds is the sign that an agent runs; a refused
//! one (or no socket file) that none does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const WAKE: &str = "wake";
pub const STATUS: &str = "status";
pub const OK: &str = "ok";

/// How long the CLI waits for a status answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// What a running agent reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    /// Queue keys (see [`crate::spool::QueuedPath::key`]) being uploaded,
    /// with when their attempt started (Unix milliseconds).
    pub in_flight: Vec<InFlight>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub key: String,
    pub started_at: u64,
}

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no watcher-agent is running on the queue in {spool} ({reason}); start it with `watcher-agent` or `systemctl --user start larder-agent`")]
    NotRunning { spool: PathBuf, reason: String },
    #[error("the watcher-agent on {socket} did not answer properly: {reason}")]
    BadAnswer { socket: PathBuf, reason: String },
}

fn connect(socket: &Path) -> Result<UnixStream, ControlError> {
    UnixStream::connect(socket).map_err(|error| ControlError::NotRunning {
        spool: socket.parent().unwrap_or(socket).to_owned(),
        reason: match error.kind() {
            std::io::ErrorKind::NotFound => "it has no control socket".to_owned(),
            std::io::ErrorKind::ConnectionRefused => "its control socket is stale".to_owned(),
            _ => error.to_string(),
        },
    })
}

/// Tells the agent to look at the spool; does not wait for it. Fails only
/// when no agent is listening.
pub fn wake(socket: &Path) -> Result<(), ControlError> {
    let mut stream = connect(socket)?;
    // The agent may be gone between connect and write; the entries are on
    // disk either way, so only the connection counts.
    let _ = stream.write_all(format!("{WAKE}\n").as_bytes());
    Ok(())
}

/// Asks the agent what it is uploading.
pub fn status(socket: &Path) -> Result<AgentStatus, ControlError> {
    let bad = |reason: String| ControlError::BadAnswer {
        socket: socket.to_owned(),
        reason,
    };
    let mut stream = connect(socket)?;
    stream
        .set_read_timeout(Some(STATUS_TIMEOUT))
        .map_err(|error| bad(error.to_string()))?;
    stream
        .write_all(format!("{STATUS}\n").as_bytes())
        .map_err(|error| bad(error.to_string()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|error| bad(error.to_string()))?;
    serde_json::from_str(&line).map_err(|error| bad(format!("{error} in {:?}", line.trim())))
}
