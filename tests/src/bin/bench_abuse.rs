//! Drives the abuse benchmark (`ops/bench-abuse.sh`, issue #12): one
//! hostile tenant attacks a running single-machine `ingest-api` while
//! another tenant's narinfo and NAR requests are timed, scenario after
//! scenario, with the server's peak memory and writes read from `/proc`.
//!
//! ```text
//! bench_abuse --url URL --server-pid PID --storage DIR
//!             --victim-token T --victim-cache C --hostile-token T --hostile-cache C
//!             [--seconds N] [--bomb-mib N] [--stalled N] [--uploads N]
//! ```
//!
//! Setup (not timed): the victim gets one 4 MiB path, the hostile tenant a
//! NAR of `--bomb-mib` MiB of zeros (its `.ls` and NAR are what two of the
//! attacks fetch; FastCDC cuts zeros into maximal chunks that are all the
//! same chunk). Then each scenario runs its attack, waits a second for it
//! to build up, and times the victim's requests for `--seconds` while the
//! attack goes on:
//!
//! - `none`: no attack, the baseline;
//! - `zstd-bomb`, `xz-bomb`: `PUT nar/<FileHash>.nar.zst|xz` of a NAR of
//!   `--bomb-mib` MiB of zeros, compressed (a few dozen KiB), two at a time,
//!   over and over;
//! - `ls-loop`: `GET <hash>.ls` of the zeros NAR, four at a time;
//! - `nar-repeated`: `GET nar/…` of the zeros NAR, four at a time;
//! - `uploads`: `--uploads` concurrent `upload-path`s of fresh 1 MiB NARs;
//! - `stalled`: `--stalled` uploads that send their headers and 64 bytes,
//!   then nothing, held open (last: on a server without defences they may
//!   leave it unable to serve).
//!
//! The victim's two loops (narinfo, NAR) each send one request at a time,
//! each with a 15 s timeout; a failure or timeout is counted, and its time
//! is in the percentiles too. An attack request that is refused (any
//! status, a closed connection) is counted, never an error of this program.
//!
//! Output on stdout: `KEY=VALUE` lines, `<SCENARIO>_<FIGURE>` (scenario in
//! upper case, `-` as `_`); progress on stderr.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use larder_api::v1::{NAR_INFO_HEADER, WAIT_HEADER};
use larder_nix::nar::NarEncoder;
use larder_nix::Sha256Hash;
use tests::bench::{single_file_nar, store_path_hash_for, upload_info, Pusher, Result};
use tests::server::pseudo_random;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one victim request may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an attack runs before the victim's requests are timed.
const RAMP_UP: Duration = Duration::from_secs(1);
/// The victim's path.
const VICTIM_NAME: &str = "bench-abuse-victim";
const VICTIM_BYTES: usize = 4 << 20;
/// The hostile tenant's NAR of zeros.
const ZEROS_NAME: &str = "bench-abuse-zeros";

const SCENARIOS: [&str; 7] = [
    "none",
    "zstd-bomb",
    "xz-bomb",
    "ls-loop",
    "nar-repeated",
    "uploads",
    "stalled",
];

struct Options {
    url: String,
    server_pid: u32,
    storage: PathBuf,
    victim_token: String,
    victim_cache: String,
    hostile_token: String,
    hostile_cache: String,
    seconds: u64,
    bomb_mib: u64,
    stalled: usize,
    uploads: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_abuse --url URL --server-pid PID --storage DIR \
         --victim-token T --victim-cache C --hostile-token T --hostile-cache C \
         [--seconds N] [--bomb-mib N] [--stalled N] [--uploads N]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut values: HashMap<String, String> = HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let (Some(name), Some(value)) = (flag.strip_prefix("--"), args.next()) else {
            usage()
        };
        values.insert(name.to_owned(), value);
    }
    let text = |name: &str| values.get(name).cloned().unwrap_or_else(|| usage());
    let number = |name: &str, default: u64| match values.get(name) {
        None => default,
        Some(value) => value.parse().unwrap_or_else(|_| usage()),
    };
    Options {
        url: text("url").trim_end_matches('/').to_owned(),
        server_pid: text("server-pid").parse().unwrap_or_else(|_| usage()),
        storage: PathBuf::from(text("storage")),
        victim_token: text("victim-token"),
        victim_cache: text("victim-cache"),
        hostile_token: text("hostile-token"),
        hostile_cache: text("hostile-cache"),
        seconds: number("seconds", 20),
        bomb_mib: number("bomb-mib", 1024),
        stalled: number("stalled", 600) as usize,
        uploads: number("uploads", 64) as usize,
    }
}

/// What the attack and the victim need to address.
struct Targets {
    options: Options,
    /// The hostile tenant's client (the victim's are made per scenario).
    http: reqwest::Client,
    victim_narinfo: String,
    victim_nar: String,
    zeros_ls: String,
    zeros_nar: String,
}

/// The NAR URL a narinfo names (`URL: nar/…`, relative to the cache), as
/// an absolute URL.
async fn nar_url_of(http: &reqwest::Client, narinfo: &str, token: &str) -> Result<String> {
    let text = http
        .get(narinfo)
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("URL: "))
        .ok_or_else(|| format!("no URL line in {narinfo}: {text}"))?;
    let cache_url = narinfo
        .rsplit_once('/')
        .ok_or_else(|| format!("{narinfo} has no cache segment"))?
        .0;
    Ok(format!("{cache_url}/{relative}"))
}

async fn setup(options: Options) -> Result<Targets> {
    let http = reqwest::Client::builder().build()?;
    let base = &options.url;
    eprintln!("bench_abuse: pushing the victim's path and the hostile tenant's NAR of zeros");
    let victim = Pusher::new(base, &options.victim_token, &options.victim_cache)?;
    victim
        .push(
            VICTIM_NAME,
            single_file_nar(&pseudo_random(VICTIM_BYTES, 0xab05e))?,
        )
        .await?;
    let hostile = Pusher::new(base, &options.hostile_token, &options.hostile_cache)?;
    let zeros = vec![0u8; usize::try_from(options.bomb_mib << 20)?];
    hostile.push(ZEROS_NAME, single_file_nar(&zeros)?).await?;
    drop(zeros);
    let victim_narinfo = format!(
        "{base}/{}/{}.narinfo",
        options.victim_cache,
        store_path_hash_for(VICTIM_NAME)
    );
    let zeros_narinfo = format!(
        "{base}/{}/{}.narinfo",
        options.hostile_cache,
        store_path_hash_for(ZEROS_NAME)
    );
    let victim_nar = nar_url_of(&http, &victim_narinfo, &options.victim_token).await?;
    let zeros_nar = nar_url_of(&http, &zeros_narinfo, &options.hostile_token).await?;
    // Both must answer before anything is timed: a wrong URL would only
    // show as failures.
    for (url, token) in [
        (&victim_nar, &options.victim_token),
        (&zeros_nar, &options.hostile_token),
    ] {
        http.get(url.as_str())
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
    }
    Ok(Targets {
        zeros_ls: zeros_narinfo.replace(".narinfo", ".ls"),
        victim_narinfo,
        victim_nar,
        zeros_nar,
        http,
        options,
    })
}

/// Attack requests and how they ended.
#[derive(Debug, Default)]
struct Tally {
    /// Requests started.
    requests: AtomicU64,
    /// Request body bytes of the requests started (what the attacker
    /// pays; a request still in flight at the end may not have sent all).
    body_bytes: AtomicU64,
    success: AtomicU64,
    client_error: AtomicU64,
    server_error: AtomicU64,
    /// No answer: the connection failed or was closed.
    closed: AtomicU64,
}

impl Tally {
    fn start(&self, body_bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.body_bytes.fetch_add(body_bytes, Ordering::Relaxed);
    }

    fn answered(&self, result: &reqwest::Result<reqwest::Response>) {
        let counter = match result {
            Ok(response) if response.status().is_success() => &self.success,
            Ok(response) if response.status().is_client_error() => &self.client_error,
            Ok(_) => &self.server_error,
            Err(_) => &self.closed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests started and not answered (still in flight at the end).
    fn unanswered(&self) -> u64 {
        let answered = [
            &self.success,
            &self.client_error,
            &self.server_error,
            &self.closed,
        ]
        .iter()
        .map(|counter| counter.load(Ordering::Relaxed))
        .sum::<u64>();
        self.requests
            .load(Ordering::Relaxed)
            .saturating_sub(answered)
    }
}

/// A running attack: its tasks stop when `stop` is set.
struct Attack {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    tasks: tokio::task::JoinSet<()>,
    /// Connections held open by the stalled uploads, checked at the end.
    held: Arc<tokio::sync::Mutex<Vec<tokio::net::TcpStream>>>,
}

/// A NAR of `mib` MiB of zeros, written to `out` (a compressor).
fn bomb<W: std::io::Write>(mib: u64, out: W) -> Result<W> {
    let mut encoder = NarEncoder::new(out)?;
    encoder.regular_from_reader(false, mib << 20, &mut std::io::repeat(0))?;
    Ok(encoder.finish()?)
}

/// The body of a `PUT nar/<FileHash>.nar.<extension>` and its URL.
fn bomb_request(targets: &Targets, extension: &str) -> Result<(String, Vec<u8>)> {
    let mib = targets.options.bomb_mib;
    let body = match extension {
        "zst" => bomb(mib, zstd::Encoder::new(Vec::new(), 3)?)?.finish()?,
        _ => bomb(mib, liblzma::write::XzEncoder::new(Vec::new(), 1))?.finish()?,
    };
    let file_hash = Sha256Hash::digest(&body).to_base32();
    let url = format!(
        "{}/{}/nar/{file_hash}.nar.{extension}",
        targets.options.url, targets.options.hostile_cache
    );
    Ok((url, body))
}

/// A random base-32 string of `len` characters.
fn random_base32(len: usize, seed: u64) -> String {
    let bytes = pseudo_random(len, seed);
    let digest = Sha256Hash::digest(&bytes);
    let mut text = larder_nix::base32::encode(digest.as_bytes());
    text.truncate(len);
    text
}

impl Attack {
    fn start(name: &str, targets: &Arc<Targets>) -> Result<Self> {
        let mut attack = Self {
            stop: Arc::new(AtomicBool::new(false)),
            tally: Arc::new(Tally::default()),
            tasks: tokio::task::JoinSet::new(),
            held: Arc::default(),
        };
        match name {
            "none" => {}
            "zstd-bomb" | "xz-bomb" => {
                let extension = if name == "zstd-bomb" { "zst" } else { "xz" };
                let started = Instant::now();
                let (url, body) = bomb_request(targets, extension)?;
                eprintln!(
                    "bench_abuse: {name}: {} bytes decompressing to a {} MiB NAR (made in {:.1} s)",
                    body.len(),
                    targets.options.bomb_mib,
                    started.elapsed().as_secs_f64()
                );
                let body = bytes::Bytes::from(body);
                for _ in 0..2 {
                    let request = {
                        let targets = targets.clone();
                        let (url, body) = (url.clone(), body.clone());
                        move || {
                            targets
                                .http
                                .put(&url)
                                .bearer_auth(&targets.options.hostile_token)
                                .body(body.clone())
                        }
                    };
                    attack.repeat(request, body.len() as u64);
                }
            }
            "ls-loop" | "nar-repeated" => {
                let url = if name == "ls-loop" {
                    targets.zeros_ls.clone()
                } else {
                    targets.zeros_nar.clone()
                };
                for _ in 0..4 {
                    let targets = targets.clone();
                    let url = url.clone();
                    attack.repeat(
                        move || {
                            targets
                                .http
                                .get(&url)
                                .bearer_auth(&targets.options.hostile_token)
                        },
                        0,
                    );
                }
            }
            "uploads" => {
                for task in 0..targets.options.uploads {
                    attack.upload_loop(targets.clone(), task as u64);
                }
            }
            "stalled" => {
                for index in 0..targets.options.stalled {
                    attack.stall(targets.clone(), index as u64);
                }
            }
            other => return Err(format!("unknown attack {other}").into()),
        }
        Ok(attack)
    }

    /// Sends the request `make` builds over and over, reading each answer
    /// to its end, until the attack stops.
    fn repeat(
        &mut self,
        make: impl Fn() -> reqwest::RequestBuilder + Send + 'static,
        body_bytes: u64,
    ) {
        let (stop, tally) = (self.stop.clone(), self.tally.clone());
        self.tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tally.start(body_bytes);
                let result = make().send().await;
                tally.answered(&result);
                if let Ok(response) = result {
                    // The whole answer, as a client would read it.
                    let _ = response.bytes().await;
                } else {
                    // A refused connection: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }

    /// Pushes fresh 1 MiB NARs through `upload-path`, one after the other,
    /// answered as soon as they are acknowledged.
    fn upload_loop(&mut self, targets: Arc<Targets>, task: u64) {
        let (stop, tally) = (self.stop.clone(), self.tally.clone());
        self.tasks.spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let name = format!("bench-abuse-upload-{task}-{round}");
                let Ok(nar) = single_file_nar(&pseudo_random(1 << 20, (task << 32) ^ round)) else {
                    return;
                };
                let info = upload_info(&targets.options.hostile_cache, &name, &nar);
                let Ok(header) = serde_json::to_string(&info) else {
                    return;
                };
                tally.start(nar.len() as u64);
                let result = targets
                    .http
                    .put(format!("{}/_api/v1/upload-path", targets.options.url))
                    .bearer_auth(&targets.options.hostile_token)
                    .header(NAR_INFO_HEADER, header)
                    .header(WAIT_HEADER, "0")
                    .body(nar)
                    .send()
                    .await;
                tally.answered(&result);
                match result {
                    Ok(response) => drop(response.bytes().await),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }

    /// Opens an upload that sends its headers and 64 bytes of a NAR, then
    /// nothing; the connection is held until the attack ends.
    fn stall(&mut self, targets: Arc<Targets>, index: u64) {
        let (tally, held) = (self.tally.clone(), self.held.clone());
        self.tasks.spawn(async move {
            tally.start(64);
            let address = targets.options.url.trim_start_matches("http://").to_owned();
            let Ok(mut stream) = tokio::net::TcpStream::connect(&address).await else {
                tally.closed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            // The start of a NAR, so that the server reads on.
            let Ok(nar) = single_file_nar(&[0; 64]) else {
                return;
            };
            let file = random_base32(52, index + 1);
            let head = format!(
                "PUT /{}/nar/{file}.nar HTTP/1.1\r\nHost: {address}\r\n\
                 Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
                targets.options.hostile_cache,
                targets.options.hostile_token,
                1u64 << 30
            );
            let mut request = head.into_bytes();
            request.extend_from_slice(&nar[..64]);
            if stream.write_all(&request).await.is_err() {
                tally.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            held.lock().await.push(stream);
        });
    }

    /// Stops the attack; returns how many stalled uploads the server had
    /// answered or closed by then, and how many were still open.
    async fn stop(mut self) -> (Arc<Tally>, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut open = 0;
        let mut dropped = 0;
        for stream in self.held.lock().await.iter_mut() {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await {
                // Still waiting for the rest of the body.
                Err(_) => open += 1,
                // An answer (a 4xx, a timeout) or a closed connection.
                Ok(_) => dropped += 1,
            }
        }
        self.held.lock().await.clear();
        // Requests in flight are abandoned (dropping them closes their
        // connections), so that one slow answer does not hold up the next
        // scenario.
        self.tasks.shutdown().await;
        (self.tally, open, dropped)
    }
}

/// Times the victim's requests to `url`, one at a time, until `until`.
async fn probe(
    http: reqwest::Client,
    url: String,
    token: String,
    until: Instant,
) -> (Vec<f64>, u64) {
    let mut times = Vec::new();
    let mut failed = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let request = async {
            let response = http.get(&url).bearer_auth(&token).send().await?;
            let status = response.status();
            response.bytes().await?;
            Ok::<_, reqwest::Error>(status)
        };
        let ok = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, request).await,
            Ok(Ok(status)) if status.is_success()
        );
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if !ok {
            failed += 1;
        }
    }
    (times, failed)
}

/// The `q`-quantile (nearest rank) of `values`, sorted in place.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// A number from `/proc/PID/<file>`, the value after `label`.
fn proc_value(pid: u32, file: &str, label: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(label))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes in the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => bytes_under(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn run_scenario(name: &str, targets: &Arc<Targets>) -> Result<()> {
    let options = &targets.options;
    let pid = options.server_pid;
    let storage = &options.storage;
    let key = name.to_uppercase().replace('-', "_");
    // Peak RSS from here on (VmHWM is reset by writing 5 to clear_refs).
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let written_before = proc_value(pid, "io", "write_bytes:").unwrap_or(0);
    let storage_before = bytes_under(storage);
    eprintln!("bench_abuse: scenario {name}");
    let attack = Attack::start(name, targets)?;
    tokio::time::sleep(RAMP_UP).await;
    let until = Instant::now() + Duration::from_secs(options.seconds);
    // The victim's own client, as another tenant's Nix would have.
    let victim_http = reqwest::Client::builder().build()?;
    let narinfo = tokio::spawn(probe(
        victim_http.clone(),
        targets.victim_narinfo.clone(),
        options.victim_token.clone(),
        until,
    ));
    let nar = tokio::spawn(probe(
        victim_http,
        targets.victim_nar.clone(),
        options.victim_token.clone(),
        until,
    ));
    let mut storage_peak = storage_before;
    let mut rss_peak = 0;
    while Instant::now() < until {
        storage_peak = storage_peak.max(bytes_under(storage));
        rss_peak = rss_peak.max(proc_value(pid, "status", "VmRSS:").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (mut narinfo_times, narinfo_failed) = narinfo.await?;
    let (mut nar_times, nar_failed) = nar.await?;
    let (tally, stalled_open, stalled_dropped) = attack.stop().await;
    let hwm = proc_value(pid, "status", "VmHWM:").unwrap_or(0);
    let written = proc_value(pid, "io", "write_bytes:")
        .unwrap_or(0)
        .saturating_sub(written_before);
    let figures = [
        ("NARINFO_N", narinfo_times.len().to_string()),
        ("NARINFO_FAILED", narinfo_failed.to_string()),
        (
            "NARINFO_P50_MS",
            format!("{:.1}", quantile(&mut narinfo_times, 0.50)),
        ),
        (
            "NARINFO_P99_MS",
            format!("{:.1}", quantile(&mut narinfo_times, 0.99)),
        ),
        ("NAR_N", nar_times.len().to_string()),
        ("NAR_FAILED", nar_failed.to_string()),
        (
            "NAR_P50_MS",
            format!("{:.1}", quantile(&mut nar_times, 0.50)),
        ),
        (
            "NAR_P99_MS",
            format!("{:.1}", quantile(&mut nar_times, 0.99)),
        ),
        // VmHWM since the reset; without one (not root), the sampled peak.
        (
            "PEAK_RSS_KIB",
            if reset { hwm } else { rss_peak }.to_string(),
        ),
        ("WRITE_BYTES", written.to_string()),
        // The storage directory (staging and chunk objects) beyond what it
        // held before: at its largest, and at the end.
        (
            "STORAGE_GROWTH_PEAK",
            storage_peak.saturating_sub(storage_before).to_string(),
        ),
        (
            "STORAGE_GROWTH_END",
            bytes_under(storage)
                .saturating_sub(storage_before)
                .to_string(),
        ),
        (
            "ATTACK_REQUESTS",
            tally.requests.load(Ordering::Relaxed).to_string(),
        ),
        (
            "ATTACK_BODY_BYTES",
            tally.body_bytes.load(Ordering::Relaxed).to_string(),
        ),
        (
            "ATTACK_2XX",
            tally.success.load(Ordering::Relaxed).to_string(),
        ),
        (
            "ATTACK_4XX",
            tally.client_error.load(Ordering::Relaxed).to_string(),
        ),
        (
            "ATTACK_5XX",
            tally.server_error.load(Ordering::Relaxed).to_string(),
        ),
        (
            "ATTACK_CLOSED",
            tally.closed.load(Ordering::Relaxed).to_string(),
        ),
        // Stalled uploads held open are among these.
        ("ATTACK_UNANSWERED", tally.unanswered().to_string()),
        ("STALLED_OPEN", stalled_open.to_string()),
        ("STALLED_DROPPED", stalled_dropped.to_string()),
    ];
    for (figure, value) in figures {
        println!("{key}_{figure}={value}");
    }
    settle(targets).await;
    Ok(())
}

/// Lets the server settle before the next scenario measures: a few
/// seconds (abandoned uploads end, writes are flushed), then until its
/// pipeline queues are empty (`larder_queue_depth` on `/metrics`, where it
/// is served; at most a minute).
async fn settle(targets: &Targets) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let depth = async {
            let text = targets
                .http
                .get(format!("{}/metrics", targets.options.url))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            Some(
                text.lines()
                    .filter(|line| line.starts_with("larder_queue_depth{"))
                    .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>(),
            )
        };
        match tokio::time::timeout(Duration::from_secs(5), depth).await {
            Ok(Some(depth)) if depth > 0.0 => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => return,
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = parse_options();
    let targets = Arc::new(setup(options).await?);
    for name in SCENARIOS {
        run_scenario(name, &targets).await?;
    }
    Ok(())
}
