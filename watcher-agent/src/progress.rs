//! `larder push`'s progress display on stderr.
//!
//! Every finished path gets a line with its size and speed, `[k/N] pushed
//! NAME (SIZE in S s, RATE/s)`, `k` counting the paths finished up to `N`,
//! the number to upload, in the order the lines come.
//!
//! On a terminal, below those lines, the [`indicatif`] crate draws one bar
//! per path in flight (its name without the hash, bytes sent of its size,
//! speed, time left) and an overall line (paths finished of the total).
//! indicatif measures the speed and time left, redraws at most 20 times a
//! second, fits the bars to the terminal's width, and prints the finished
//! lines and [`Progress::note`]s above the bars rather than through them.
//! No timer redraws them: a bar moves as its bytes are counted, so one
//! whose body is all sent stays full until the server answers (once the
//! path is visible, unless `--no-wait`). When stderr is not a terminal (a
//! file or a pipe: CI logs) or `TERM` is unset or `dumb`, indicatif draws
//! nothing, and the finished lines and notes are printed as plain lines,
//! nothing else.
//!
//! What we still decide: the finished line's wording and format (sizes by
//! [`human_bytes`], kept as it was for logs that are read or parsed), that
//! lines come in the order of their counts, that a failed or retried
//! attempt ends without a line, and what a bar shows.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// A path in flight: name, bar, bytes sent of its size, speed, time left.
/// The name takes what the rest leaves of the terminal's width (cut short
/// if need be), so that a bar fits on one line of 80 columns.
const PATH_TEMPLATE: &str = "{wide_msg} {bar:20} {binary_bytes:>10}/{binary_total_bytes:<10} \
                             {binary_bytes_per_sec:>12} {eta:>3} left";
/// The overall line, below the paths' bars.
const OVERALL_TEMPLATE: &str = "[{pos}/{len}] paths pushed";

/// The shared display; cheap to clone into upload tasks.
#[derive(Clone)]
pub struct Progress {
    /// The bars on stderr, or `None` where indicatif would not draw them.
    bars: Option<MultiProgress>,
    path_style: ProgressStyle,
    /// Paths finished of the total, on screen.
    overall: ProgressBar,
    /// Paths finished, counted while their lines are printed so that the
    /// lines come in the order of their counts.
    done: Arc<Mutex<usize>>,
    total: usize,
}

/// A handle on one upload: count the bytes sent through
/// [`counter`](Self::counter), then hand it to [`Progress::finished`] for
/// its line. Dropped without that (the attempt failed or is retried), it
/// ends without a line.
#[derive(Debug)]
pub struct Upload {
    name: String,
    size: u64,
    bar: ProgressBar,
}

impl Upload {
    /// Counts bytes sent, for the bar; it can be moved into the request
    /// body.
    pub fn counter(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let bar = self.bar.clone();
        move |bytes| bar.inc(bytes)
    }
}

impl Drop for Upload {
    /// Takes the bar off the screen, even while the request body that
    /// counts into it is still held somewhere.
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

impl Progress {
    /// A display for `total` uploads.
    pub fn new(total: usize) -> Self {
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let bars = (!bars.is_hidden()).then_some(bars);
        let overall =
            ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::hidden())
                .with_style(style(OVERALL_TEMPLATE))
                .with_finish(ProgressFinish::AndClear);
        if let Some(bars) = &bars {
            bars.add(overall.clone());
            overall.tick();
        }
        Self {
            bars,
            path_style: style(PATH_TEMPLATE),
            overall,
            done: Arc::new(Mutex::new(0)),
            total,
        }
    }

    /// Starts an upload of `size` bytes; its bar goes above the overall
    /// line.
    pub fn started(&self, name: &str, size: u64) -> Upload {
        let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::hidden())
            .with_style(self.path_style.clone())
            .with_message(short_name(name).to_owned());
        if let Some(bars) = &self.bars {
            bars.insert_before(&self.overall, bar.clone());
            bar.tick();
        }
        Upload {
            name: name.to_owned(),
            size,
            bar,
        }
    }

    /// Ends an upload with its line. It says "pushed" whether or not the
    /// server stored the bytes before: the server does not tell (that
    /// would depend on other tenants' data), and the bytes were sent.
    pub fn finished(&self, upload: Upload) {
        let elapsed = upload.bar.elapsed();
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        *done += 1;
        let line = format!(
            "[{}/{}] pushed {} ({} in {:.1} s, {}/s)",
            *done,
            self.total,
            upload.name,
            human_bytes(upload.size),
            elapsed.as_secs_f64(),
            human_bytes(rate(upload.size, elapsed)),
        );
        drop(upload);
        self.note(&line);
        self.overall.set_position(*done as u64);
    }

    /// A line above the bars (retries, waits).
    pub fn note(&self, line: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants, parsed in a unit test.
    ProgressStyle::with_template(template).expect("progress template")
}

/// A store path's base name without its hash, for its bar.
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

    #[test]
    fn templates_parse() {
        for template in [PATH_TEMPLATE, OVERALL_TEMPLATE] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }
}
