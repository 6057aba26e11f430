//! `larder push`'s progress display on stderr.
//!
//! Every finished path gets a line with its size and speed. On a terminal,
//! a status line below them is redrawn a few times a second with the
//! paths in flight (bytes sent, speed); when stderr is a file or a pipe
//! (CI logs) there is no status line, only the finished lines.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

const REDRAW_INTERVAL: Duration = Duration::from_millis(250);
const MAX_STATUS_WIDTH: usize = 160;

/// One upload in flight.
#[derive(Debug)]
struct InFlight {
    id: u64,
    name: String,
    size: u64,
    sent: Arc<AtomicU64>,
    started: Instant,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    in_flight: Vec<InFlight>,
    done: usize,
    total: usize,
    status_shown: bool,
}

/// The shared display; cheap to clone into upload tasks.
#[derive(Debug, Clone)]
pub struct Progress {
    terminal: bool,
    state: Arc<Mutex<State>>,
}

/// A handle on one upload: count bytes into [`sent`](Self::sent), then
/// call [`Progress::finished`] or drop it.
#[derive(Debug)]
pub struct Upload {
    id: u64,
    pub sent: Arc<AtomicU64>,
}

impl Progress {
    /// A display for `total` uploads; on a terminal it starts redrawing.
    pub fn new(total: usize) -> Self {
        let progress = Self {
            terminal: std::io::stderr().is_terminal(),
            state: Arc::new(Mutex::new(State {
                total,
                ..State::default()
            })),
        };
        if progress.terminal {
            let ticker = progress.clone();
            tokio::spawn(async move {
                // Stops when every other handle is gone.
                while Arc::strong_count(&ticker.state) > 1 {
                    ticker.redraw();
                    tokio::time::sleep(REDRAW_INTERVAL).await;
                }
            });
        }
        progress
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn started(&self, name: &str, size: u64) -> Upload {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let sent = Arc::new(AtomicU64::new(0));
        state.in_flight.push(InFlight {
            id,
            name: name.to_owned(),
            size,
            sent: sent.clone(),
            started: Instant::now(),
        });
        Upload { id, sent }
    }

    /// Ends an attempt without a result line (it failed or is retried).
    pub fn abandoned(&self, upload: Upload) {
        self.lock()
            .in_flight
            .retain(|flight| flight.id != upload.id);
    }

    /// Ends an upload with its line. It says "pushed" whether or not the
    /// server stored the bytes before: the server does not tell (that
    /// would depend on other tenants' data), and the bytes were sent.
    pub fn finished(&self, upload: Upload) {
        let mut state = self.lock();
        let Some(position) = state.in_flight.iter().position(|f| f.id == upload.id) else {
            return;
        };
        let flight = state.in_flight.remove(position);
        state.done += 1;
        let elapsed = flight.started.elapsed();
        let line = format!(
            "[{}/{}] pushed {} ({} in {:.1} s, {}/s)",
            state.done,
            state.total,
            flight.name,
            human_bytes(flight.size),
            elapsed.as_secs_f64(),
            human_bytes(rate(flight.size, elapsed)),
        );
        self.print_locked(&mut state, &line);
    }

    /// A line above the status line (retries, waits).
    pub fn note(&self, line: &str) {
        let mut state = self.lock();
        self.print_locked(&mut state, line);
    }

    fn print_locked(&self, state: &mut State, line: &str) {
        let mut stderr = std::io::stderr().lock();
        if state.status_shown {
            let _ = write!(stderr, "\r\x1b[K");
            state.status_shown = false;
        }
        let _ = writeln!(stderr, "{line}");
    }

    fn redraw(&self) {
        let mut state = self.lock();
        if state.in_flight.is_empty() {
            if state.status_shown {
                let _ = write!(std::io::stderr(), "\r\x1b[K");
                state.status_shown = false;
            }
            return;
        }
        let parts: Vec<String> = state
            .in_flight
            .iter()
            .map(|flight| {
                let sent = flight.sent.load(Ordering::Relaxed);
                let percent = (sent * 100).checked_div(flight.size).unwrap_or(100);
                format!(
                    "{} {percent}% {}/s",
                    short_name(&flight.name),
                    human_bytes(rate(sent, flight.started.elapsed()))
                )
            })
            .collect();
        let mut line = format!("[{}/{}] {}", state.done, state.total, parts.join(" | "));
        if line.chars().count() > MAX_STATUS_WIDTH {
            line = line.chars().take(MAX_STATUS_WIDTH - 1).collect::<String>() + "…";
        }
        let _ = write!(std::io::stderr(), "\r\x1b[K{line}");
        state.status_shown = true;
    }
}

/// A store path's base name without its hash, for the status line.
fn short_name(name: &str) -> &str {
    name.split_once('-').map_or(name, |(_, rest)| rest)
}

fn rate(bytes: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64().max(0.001);
    (bytes as f64 / seconds) as u64
}

/// `1.5 MiB`, `312 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_readable() {
        assert_eq!(human_bytes(312), "312 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(
            short_name("0vlfq2frv35f2ckxvcmjrlklygj8g3g3-hello-2.12"),
            "hello-2.12"
        );
    }
}
