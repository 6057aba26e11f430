//! `larder push`: from store paths to visible objects in a cache.
//!
//! 1. The closure (unless `--no-closure`) comes from `nix path-info`.
//! 2. Paths signed by one of the cache's upstream keys (e.g.
//!    `cache.nixos.org-1`) are skipped: anyone can fetch them upstream.
//! 3. The server says which of the rest it is missing.
//! 4. Those are uploaded, each only after the references it has in the same
//!    push, with up to `jobs` uploads at once. Small NARs (at most
//!    [`EXPORT_MAX_NAR`]) are read ahead, many to one `nix-store --export`
//!    in batches of bounded size; a larger NAR streams from its own
//!    `nix store dump-path` to the socket through a small buffer, so memory
//!    does not grow with the NAR. Transient failures (unreachable, 5xx)
//!    are retried with exponential backoff; a 429 (the server's limit on
//!    concurrent uploads) is retried after the `Retry-After` it names, for
//!    up to [`BUSY_RETRY_LIMIT`] without counting as a failed attempt;
//!    anything else stops the push.
//! 5. Unless `--no-wait`, each upload waits until its path is visible: the
//!    server holds the answer until then (up to its `wait-for-visible`),
//!    and the client polls the upload's status past that.
//! 6. With `--logs`, the build log of each path uploaded (its deriver's,
//!    from the local store's `nix log`) goes to `{cache}/log/<drv>`; a path
//!    without a deriver or a log is skipped quietly, and a log the server
//!    refuses is reported and skipped: the paths are pushed by then.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use larder_api::cache_name::CacheName;
use larder_api::v1::{
    GetMissingPathsRequest, GetMissingPathsResponse, UploadPathNarInfo, UploadPathResult,
    UploadStatus, NAR_INFO_HEADER, PHASE_DONE, PHASE_FAILED, WAIT_HEADER,
};
use larder_nix::{StoreDir, StorePath, StorePathHash};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Method;
use tokio::task::JoinSet;
use tokio_util::io::ReaderStream;

use crate::api::{ApiClient, ApiError};
use crate::nix::{self, NixError, PathInfo};
use crate::progress::Progress;

/// Attempts per upload before a transient failure is final.
const MAX_ATTEMPTS: u32 = 5;
/// The first retry's delay; each later one doubles it.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long one upload keeps retrying while the server refuses it for
/// being busy (429) before the push fails (transiently: the agent tries
/// again later).
const BUSY_RETRY_LIMIT: Duration = Duration::from_secs(30 * 60);
/// The longest `Retry-After` honoured; a longer one is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How many hashes one `get-missing-paths` request carries.
const MISSING_PATHS_BATCH: usize = 1000;
/// The read buffer between `nix store dump-path` and the socket.
const STREAM_BUFFER: usize = 64 * 1024;
/// How often an upload that is not visible yet is polled, at most.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long the client waits past the server's own wait for a path to
/// become visible.
const VISIBILITY_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error("uploading {path}: {source}")]
    Upload { path: String, source: ApiError },
    #[error("uploading {path}: {source}")]
    Dump { path: String, source: NixError },
    #[error("{path} was uploaded but the server could not store it: {message}")]
    Pipeline { path: String, message: String },
    #[error("{path} was uploaded but is not visible after {limit:?} (upload {upload_id})")]
    NotVisible {
        path: String,
        upload_id: String,
        limit: Duration,
    },
    #[error("an upload task stopped unexpectedly: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl PushError {
    /// Worth trying again later: the server could not be reached or was
    /// briefly unable to answer, or `nix` could not be started. Anything
    /// else (a missing cache, a refused token, an invalid path) needs
    /// someone to act first.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api(error) | Self::Upload { source: error, .. } => error.is_transient(),
            Self::Nix(NixError::NotRunnable(_))
            | Self::Dump {
                source: NixError::NotRunnable(_),
                ..
            }
            | Self::NotVisible { .. }
            | Self::Task(_) => true,
            Self::Nix(_) | Self::Dump { .. } | Self::Pipeline { .. } => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Push the closure of the paths, not just the paths.
    pub closure: bool,
    /// Push paths signed by the cache's upstream keys too.
    pub ignore_upstream_filter: bool,
    /// Uploads at once (at least 1).
    pub jobs: usize,
    /// Wait until every pushed path is visible.
    pub wait: bool,
    /// Also upload the build logs of the paths uploaded.
    pub logs: bool,
}

/// What a push did, for the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushSummary {
    pub pushed: usize,
    pub already_cached: usize,
    pub from_upstream: usize,
    /// Build logs uploaded (`--logs`), if asked for.
    pub logs: Option<usize>,
}

impl std::fmt::Display for PushSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pushed {} paths, {} already cached, {} from upstream",
            self.pushed, self.already_cached, self.from_upstream
        )?;
        if let Some(logs) = self.logs {
            write!(f, ", {logs} build logs")?;
        }
        Ok(())
    }
}

/// Pushes `paths` (and their closure) to `cache`.
pub async fn push(
    client: &ApiClient,
    cache: &CacheName,
    paths: &[String],
    options: &PushOptions,
) -> Result<PushSummary, PushError> {
    let config = client.cache_config(cache).await?;
    let store_dir = match config.store_dir.as_deref() {
        Some(dir) => StoreDir::new(dir).map_err(|error| {
            PushError::Nix(NixError::BadOutput {
                command: format!("the cache's store directory {dir:?}"),
                reason: error.to_string(),
            })
        })?,
        None => StoreDir::default(),
    };
    let infos = nix::path_infos(&store_dir, paths, options.closure).await?;

    let upstream_keys: HashSet<String> = if options.ignore_upstream_filter {
        HashSet::new()
    } else {
        config
            .upstream_cache_key_names
            .unwrap_or_default()
            .into_iter()
            .collect()
    };
    let (from_upstream, candidates): (Vec<PathInfo>, Vec<PathInfo>) =
        infos.into_iter().partition(|info| {
            info.signing_key_names()
                .any(|name| upstream_keys.contains(name))
        });

    let missing = missing_paths(client, cache, &candidates).await?;
    let (to_upload, cached): (Vec<PathInfo>, Vec<PathInfo>) = candidates
        .into_iter()
        .partition(|info| missing.contains(info.hash()));
    let mut summary = PushSummary {
        pushed: to_upload.len(),
        already_cached: cached.len(),
        from_upstream: from_upstream.len(),
        logs: options.logs.then_some(0),
    };
    if !to_upload.is_empty() {
        eprintln!(
            "pushing {} paths to {cache} ({} already cached, {} from upstream)",
            to_upload.len(),
            summary.already_cached,
            summary.from_upstream
        );
        let derivers: Vec<StorePath> = to_upload
            .iter()
            .filter_map(|info| info.deriver.clone())
            .collect();
        summary.pushed =
            upload_in_dependency_order(client, cache, &store_dir, to_upload, options).await?;
        if options.logs {
            summary.logs = Some(upload_logs(client, cache, &store_dir, &derivers).await?);
        }
    }
    Ok(summary)
}

/// Uploads the build log of each derivation that has one in the local
/// store; returns how many went. Several outputs of one derivation share
/// its log, which goes once.
async fn upload_logs(
    client: &ApiClient,
    cache: &CacheName,
    store_dir: &StoreDir,
    derivers: &[StorePath],
) -> Result<usize, PushError> {
    let unique: std::collections::BTreeSet<&StorePath> = derivers.iter().collect();
    let mut uploaded = 0;
    for drv in unique {
        let full_path = store_dir.display_path(drv);
        let Some(log) = nix::read_log(&full_path).await? else {
            continue;
        };
        let base_name = drv.to_base_name();
        let request = client
            .request(Method::PUT, &format!("{cache}/log/{base_name}"))
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(log);
        match client
            .send(request, &format!("uploading the build log of {full_path}"))
            .await
        {
            Ok(_) => uploaded += 1,
            Err(error) => eprintln!("warning: {error}; the log is skipped"),
        }
    }
    Ok(uploaded)
}

async fn missing_paths(
    client: &ApiClient,
    cache: &CacheName,
    candidates: &[PathInfo],
) -> Result<HashSet<StorePathHash>, ApiError> {
    let mut missing = HashSet::new();
    for batch in candidates.chunks(MISSING_PATHS_BATCH) {
        let request = GetMissingPathsRequest {
            cache: cache.to_string(),
            store_path_hashes: batch.iter().map(|info| info.hash().to_string()).collect(),
        };
        let response: GetMissingPathsResponse = client
            .post_json(
                "_api/v1/get-missing-paths",
                &request,
                "asking which paths are missing",
            )
            .await?;
        for hash in &response.missing_paths {
            let hash = StorePathHash::parse(hash).map_err(|error| ApiError::Unexpected {
                server: client.server().name.clone(),
                status: reqwest::StatusCode::OK,
                what: "asking which paths are missing".to_owned(),
                excerpt: error.to_string(),
            })?;
            missing.insert(hash);
        }
    }
    Ok(missing)
}

/// Uploads every path after the references it has among `paths`, with at
/// most `options.jobs` uploads at once. Returns how many were uploaded.
///
/// A path of at most [`EXPORT_MAX_NAR`] bytes is read ahead with others
/// from one `nix-store --export` ([`nix::export_nars`]), one batch at a
/// time while uploads run; a larger one streams from its own
/// `nix store dump-path` as it uploads.
async fn upload_in_dependency_order(
    client: &ApiClient,
    cache: &CacheName,
    store_dir: &StoreDir,
    paths: Vec<PathInfo>,
    options: &PushOptions,
) -> Result<usize, PushError> {
    let index: HashMap<StorePathHash, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, info)| (*info.hash(), i))
        .collect();
    let mut unfinished_references = vec![0usize; paths.len()];
    let mut dependents = vec![Vec::new(); paths.len()];
    for (i, info) in paths.iter().enumerate() {
        for reference in &info.references {
            // A path may refer to itself; that is no ordering constraint.
            if let Some(&j) = index.get(reference.hash()).filter(|&&j| j != i) {
                unfinished_references[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut ready = Ready::default();
    for i in (0..paths.len()).filter(|&i| unfinished_references[i] == 0) {
        ready.push(i, &paths[i]);
    }
    let progress = Progress::new(paths.len());
    let jobs = options.jobs.max(1);
    let mut running = JoinSet::new();
    let mut exports = JoinSet::new();
    let mut uploaded = 0;
    let outcome = async {
        while uploaded < paths.len() {
            if exports.is_empty() && ready.exported.len() < jobs && !ready.small.is_empty() {
                let batch = ready.export_batch(&paths);
                let asked: Vec<(String, u64)> = batch
                    .iter()
                    .map(|&i| (store_dir.display_path(&paths[i].path), paths[i].nar_size))
                    .collect();
                exports.spawn(async move {
                    let nars = nix::export_nars(&asked).await?;
                    Ok::<_, PushError>(batch.into_iter().zip(nars).collect::<Vec<_>>())
                });
            }
            while running.len() < jobs {
                let Some((i, exported)) = ready.next_upload() else {
                    break;
                };
                let upload = UploadTask {
                    client: client.clone(),
                    cache: cache.clone(),
                    full_path: store_dir.display_path(&paths[i].path),
                    info: paths[i].clone(),
                    exported,
                    wait: options.wait,
                    progress: progress.clone(),
                };
                running.spawn(async move { upload.run().await.map(|()| i) });
            }
            // The references form a DAG (Nix guarantees it), so while paths
            // remain something is running, exporting or ready.
            tokio::select! {
                Some(finished) = running.join_next() => {
                    let i = finished??;
                    uploaded += 1;
                    for &dependent in &dependents[i] {
                        unfinished_references[dependent] -= 1;
                        if unfinished_references[dependent] == 0 {
                            ready.push(dependent, &paths[dependent]);
                        }
                    }
                }
                Some(exported) = exports.join_next() => ready.exported.extend(exported??),
                else => break,
            }
        }
        Ok(uploaded)
    }
    .await;
    if outcome.is_err() {
        // Uploads still running stop before the error is reported, so that
        // their bars are off the screen by then.
        running.shutdown().await;
        exports.shutdown().await;
    }
    outcome
}

/// The largest NAR read ahead by `nix-store --export` rather than streamed
/// from `nix store dump-path`.
const EXPORT_MAX_NAR: u64 = 1 << 20;
/// At most this many NAR bytes, and this many paths, in one export.
const EXPORT_BATCH_BYTES: u64 = 8 << 20;
const EXPORT_BATCH_PATHS: usize = 256;

/// Paths whose references are all uploaded.
#[derive(Default)]
struct Ready {
    /// Small ones still to export.
    small: VecDeque<usize>,
    /// Small ones exported, with their NARs.
    exported: VecDeque<(usize, Bytes)>,
    /// Large ones, streamed as they upload.
    large: VecDeque<usize>,
}

impl Ready {
    fn push(&mut self, i: usize, info: &PathInfo) {
        if info.nar_size <= EXPORT_MAX_NAR {
            self.small.push_back(i);
        } else {
            self.large.push_back(i);
        }
    }

    /// The next small paths to export: at least one, and no more than the
    /// batch bounds allow.
    fn export_batch(&mut self, paths: &[PathInfo]) -> Vec<usize> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(&i) = self.small.front() {
            let size = paths[i].nar_size;
            if !batch.is_empty()
                && (bytes + size > EXPORT_BATCH_BYTES || batch.len() == EXPORT_BATCH_PATHS)
            {
                break;
            }
            bytes += size;
            batch.push(i);
            self.small.pop_front();
        }
        batch
    }

    /// The next path to upload: an exported one first (its NAR is held in
    /// memory), then a large one.
    fn next_upload(&mut self) -> Option<(usize, Option<Bytes>)> {
        if let Some((i, nar)) = self.exported.pop_front() {
            return Some((i, Some(nar)));
        }
        self.large.pop_front().map(|i| (i, None))
    }
}

/// `wait` plus up to half of it again, chosen at random, so that uploads
/// refused together do not all come back at the same moment.
fn with_jitter(wait: Duration) -> Duration {
    use std::hash::BuildHasher;
    // A fresh `RandomState` is seeded differently each time: randomness
    // enough for spreading retries, without a random-number crate.
    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
    let fraction = (random % 1000) as f64 / 2000.0;
    wait + wait.mul_f64(fraction)
}

/// One path's upload, retried, and its wait for visibility.
struct UploadTask {
    client: ApiClient,
    cache: CacheName,
    full_path: String,
    info: PathInfo,
    /// Its NAR, when exported ahead; `None` to stream it from
    /// `nix store dump-path`.
    exported: Option<Bytes>,
    wait: bool,
    progress: Progress,
}

impl UploadTask {
    async fn run(self) -> Result<(), PushError> {
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempt = 1;
        let busy_since = Instant::now();
        let result = loop {
            match self.attempt().await {
                Ok(result) => break result,
                Err(PushError::Upload { source, .. })
                    if source.is_busy() && busy_since.elapsed() < BUSY_RETRY_LIMIT =>
                {
                    let wait =
                        with_jitter(source.retry_after().unwrap_or(delay).min(MAX_RETRY_AFTER));
                    self.progress.note(&format!(
                        "retrying {} in {:.1} s (the server is busy: {source})",
                        self.full_path,
                        wait.as_secs_f64()
                    ));
                    tokio::time::sleep(wait).await;
                }
                Err(PushError::Upload { source, .. })
                    if source.is_transient() && attempt < MAX_ATTEMPTS =>
                {
                    self.progress.note(&format!(
                        "retrying {} in {:.1} s (attempt {attempt} of {MAX_ATTEMPTS} failed: {source})",
                        self.full_path,
                        delay.as_secs_f64()
                    ));
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };
        if self.wait && result.phase != PHASE_DONE {
            if let Some(upload_id) = &result.upload_id {
                self.wait_until_visible(upload_id).await?;
            }
        }
        Ok(())
    }

    async fn attempt(&self) -> Result<UploadPathResult, PushError> {
        let upload_error = |source| PushError::Upload {
            path: self.full_path.clone(),
            source,
        };
        let dump_error = |source| PushError::Dump {
            path: self.full_path.clone(),
            source,
        };
        // References and the deriver go as base names, as Attic's client
        // sends them (and as a narinfo lists them).
        let nar_info = UploadPathNarInfo {
            cache: self.cache.to_string(),
            store_path_hash: self.info.hash().to_string(),
            store_path: self.full_path.clone(),
            references: self
                .info
                .references
                .iter()
                .map(StorePath::to_base_name)
                .collect(),
            system: None,
            deriver: self.info.deriver.as_ref().map(StorePath::to_base_name),
            sigs: self.info.signatures.clone(),
            ca: self.info.ca.clone(),
            nar_hash: format!("sha256:{}", self.info.nar_hash.to_hex()),
            nar_size: self.info.nar_size,
        };
        let nar_info = serde_json::to_string(&nar_info).map_err(|error| {
            dump_error(NixError::BadOutput {
                command: "nix path-info".to_owned(),
                reason: error.to_string(),
            })
        })?;

        let upload = self
            .progress
            .started(&self.info.path.to_string(), self.info.nar_size);
        let count_sent = upload.counter();
        let (body, dump) = match &self.exported {
            Some(nar) => {
                count_sent(nar.len() as u64);
                (reqwest::Body::from(nar.clone()), None)
            }
            None => {
                let mut child = nix::spawn_dump(&self.full_path).map_err(dump_error)?;
                let Some(stdout) = child.stdout.take() else {
                    return Err(dump_error(NixError::BadOutput {
                        command: format!("nix store dump-path {}", self.full_path),
                        reason: "no output pipe".to_owned(),
                    }));
                };
                let body =
                    ReaderStream::with_capacity(stdout, STREAM_BUFFER).inspect_ok(move |bytes| {
                        count_sent(bytes.len() as u64);
                    });
                (reqwest::Body::wrap_stream(body), Some(child))
            }
        };
        let mut request = self
            .client
            .request(Method::PUT, "_api/v1/upload-path")
            .header(NAR_INFO_HEADER, nar_info)
            .header(CONTENT_TYPE, "application/x-nix-nar")
            .header(CONTENT_LENGTH, self.info.nar_size)
            .body(body);
        if !self.wait {
            request = request.header(WAIT_HEADER, "0");
        }
        let what = format!("uploading {}", self.full_path);
        let answer = match self.client.send(request, &what).await {
            Ok(response) => {
                response
                    .json::<UploadPathResult>()
                    .await
                    .map_err(|_| ApiError::Unexpected {
                        server: self.client.server().name.clone(),
                        status: reqwest::StatusCode::OK,
                        what,
                        excerpt: String::new(),
                    })
            }
            Err(error) => Err(error),
        };
        let dumped = match dump {
            Some(child) => nix::finish_dump(child, &self.full_path).await,
            None => Ok(()),
        };
        // A failed attempt's `upload` is dropped: no line for it.
        match (answer, dumped) {
            (Ok(result), Ok(())) => {
                self.progress.finished(upload);
                Ok(result)
            }
            // The server's own answer explains a refused upload best (the
            // dump then only failed because the connection closed early)…
            (Err(error @ (ApiError::Server { .. } | ApiError::Unexpected { .. })), _) => {
                Err(upload_error(error))
            }
            // …but a dump that failed on its own explains a body cut short.
            (_, Err(nix_error)) => Err(dump_error(nix_error)),
            (Err(error), Ok(())) => Err(upload_error(error)),
        }
    }

    /// Polls the upload until it is `done`, with growing intervals.
    async fn wait_until_visible(&self, upload_id: &str) -> Result<(), PushError> {
        let started = Instant::now();
        let mut interval = Duration::from_millis(200);
        loop {
            let status: UploadStatus = match self
                .client
                .get_json(
                    &format!("_api/v1/uploads/{upload_id}"),
                    &format!("reading the status of upload {upload_id}"),
                )
                .await
            {
                Ok(status) => status,
                Err(error) if error.is_transient() => {
                    self.progress
                        .note(&format!("waiting for {}: {error}", self.full_path));
                    tokio::time::sleep(MAX_POLL_INTERVAL).await;
                    continue;
                }
                Err(error) => return Err(PushError::Api(error)),
            };
            match status.phase.as_str() {
                PHASE_DONE => return Ok(()),
                PHASE_FAILED => {
                    return Err(PushError::Pipeline {
                        path: self.full_path.clone(),
                        message: status.error.unwrap_or_else(|| "no reason given".to_owned()),
                    })
                }
                _ if started.elapsed() > VISIBILITY_LIMIT => {
                    return Err(PushError::NotVisible {
                        path: self.full_path.clone(),
                        upload_id: upload_id.to_owned(),
                        limit: VISIBILITY_LIMIT,
                    })
                }
                _ => {
                    tokio::time::sleep(interval).await;
                    interval = (interval * 2).min(MAX_POLL_INTERVAL);
                }
            }
        }
    }
}
