//! The server-side configuration shared by `ingest-api`, the workers and
//! `gc-scheduler`: a TOML file, then `LARDER_…` environment variables.
//!
//! Environment variables name a key path with `__` between sections and
//! `_` for `-` inside a key: `LARDER_DATABASE__URL` sets `[database] url`,
//! `LARDER_API_ENDPOINT` sets `api-endpoint`. Only variables whose first
//! segment is a known top-level key are read, so unrelated `LARDER_…`
//! variables (the client's `LARDER_TOKEN`, test settings) are left alone.
//!
//! Secrets (database URLs with passwords, token-signing keys) are wrapped in
//! [`Secret`], whose `Debug` never shows them, so a config can be logged.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use larder_api::byte_size::ByteSize;
use larder_api::duration::HumanDuration;

/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "LARDER_";

/// Top-level keys that environment variables may set.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "api-endpoint",
    "database",
    "storage",
    "auth",
    "ingest",
    "http",
    "pipeline",
    "gc",
    "queue",
    "quota",
    "log",
    "ops",
];

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("environment variable {name} is not valid UTF-8")]
    EnvNotUnicode { name: String },
    #[error("environment variable {name} sets {key}, but {section} is not a table")]
    EnvConflict {
        name: String,
        key: String,
        section: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A secret string: serialised as itself (the config file must hold it),
/// but never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server binds.
    #[serde(default = "ServerConfig::default_listen")]
    pub listen: SocketAddr,
    /// The public base URL clients reach this server at, when it sits behind
    /// a reverse proxy; used in the login line and in cache-config answers.
    /// Without it, URLs are derived from each request's `Host` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<String>,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub gc: GcConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub quota: QuotaConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default, skip_serializing_if = "OpsConfig::is_default")]
    pub ops: OpsConfig,
}

/// `[ops]`: where `ingest-api` serves its operations endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OpsConfig {
    /// A second address on which `ingest-api` serves `/metrics`, `/healthz`
    /// and `/readyz`; `/metrics` and `/readyz` then leave the public port
    /// (`/healthz` stays there too, for load balancers). Unset, all three
    /// are served on the public port. The workers and gc-scheduler serve
    /// nothing else and use their `listen` for these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

impl OpsConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `[quota]`: per-cache storage quotas, and the room pushes must leave on
/// local storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// The quota of caches that set none (in logical bytes: the NarSize of
    /// their paths, uploads in flight and staged NAR files). Absent:
    /// unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_cache_quota: Option<ByteSize>,
    /// Local storage only: a push is refused with 507 when it would leave
    /// less than this free on the storage directory's file system (which,
    /// in the single-machine layout, the SQLite database shares).
    pub min_free_space: ByteSize,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            default_cache_quota: None,
            min_free_space: ByteSize::new(1 << 30),
        }
    }
}

/// The default `[ingest] max-decompression-ratio`; README "Upload limits"
/// says why.
pub const DEFAULT_MAX_DECOMPRESSION_RATIO: u32 = 1000;

/// Limits and behaviour of the push endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct IngestConfig {
    /// The largest NAR (uncompressed bytes) a push may carry.
    pub max_nar_size: u64,
    /// The largest JSON preamble of Attic's `upload-path` preamble form.
    pub max_preamble_size: u64,
    /// The largest narinfo accepted by `PUT /{cache}/{hash}.narinfo`.
    pub max_narinfo_size: u64,
    /// The largest build log (decoded bytes) accepted by
    /// `PUT /{cache}/log/<drv>`, and the largest decoded `.ls` listing a
    /// compressed `PUT <hash>.ls` may carry; more is refused with a 413 and
    /// nothing is stored.
    pub max_log_size: u64,
    /// Whether attaching a NAR that is already stored to another cache
    /// requires the client to stream it (and the server to verify its
    /// hash). Without it, knowing a NAR's hash and size would be enough to
    /// link another tenant's data into one's own cache, and a push of a
    /// stored NAR answers at once without reading its body, which tells the
    /// pusher that some cache holds those bytes: only for servers whose
    /// tenants trust each other.
    pub require_proof_of_possession: bool,
    /// How long a push request waits for its path to become visible before
    /// answering with the upload still in flight; `0 seconds` answers as
    /// soon as the upload is acknowledged (spooled and verified).
    pub wait_for_visible: HumanDuration,
    /// How long a waiting push goes without reading its upload's row. A
    /// push is woken when its upload leaves the pipeline (by the process
    /// that finishes it, or through PostgreSQL's notifications from another
    /// process), so this is only the safety net for a lost wake-up.
    pub wait_recheck_interval: HumanDuration,
    /// The most NAR bytes a compressed upload (`nix copy` with
    /// `compression=zstd` or `xz`) may decode to per byte of its body read
    /// so far, beyond a fixed first MiB: a decompression bomb is refused
    /// (413) once it passes this. Plain NARs (`larder push`, Attic) are
    /// their own size and unaffected.
    pub max_decompression_ratio: u32,
    /// How many uploads may decompress, hash and check their bytes at the
    /// same moment (each such job is short; the uploads themselves wait for
    /// the network without a thread). Absent: one per core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_threads: Option<u32>,
}

impl IngestConfig {
    /// The number of verification jobs that may run at once.
    pub fn verify_threads(&self) -> usize {
        match self.verify_threads {
            Some(threads) => usize::try_from(threads).unwrap_or(usize::MAX),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_decompression_ratio == 0 {
            return Err(ConfigError::Invalid(
                "ingest.max-decompression-ratio must be at least 1".into(),
            ));
        }
        if self.wait_recheck_interval.as_duration().is_zero() {
            return Err(ConfigError::Invalid(
                "ingest.wait-recheck-interval must be longer than 0 seconds".into(),
            ));
        }
        if self.verify_threads == Some(0) {
            return Err(ConfigError::Invalid(
                "ingest.verify-threads must be at least 1 (or absent: one per core)".into(),
            ));
        }
        Ok(())
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_nar_size: 64 << 30,
            max_preamble_size: 1 << 20,
            max_narinfo_size: 1 << 20,
            max_log_size: 64 << 20,
            require_proof_of_possession: true,
            wait_for_visible: HumanDuration::from_secs(120),
            wait_recheck_interval: HumanDuration::from_secs(5),
            max_decompression_ratio: DEFAULT_MAX_DECOMPRESSION_RATIO,
            verify_threads: None,
        }
    }
}

/// `[http]`: how the HTTP server treats connections and concurrent
/// uploads, so that no client can hold its resources for free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct HttpConfig {
    /// How long a client may take to send a request's headers; also how
    /// long an idle keep-alive connection stays open.
    pub header_read_timeout: HumanDuration,
    /// A request body that delivers no bytes for this long, while the
    /// server waits for them, fails (a stalled upload is dropped).
    pub body_idle_timeout: HumanDuration,
    /// Connections open at once; at the limit no more are accepted until
    /// one closes (new ones wait in the kernel's listen queue).
    pub max_connections: u32,
    /// On shutdown, how long requests in flight may go on; then their
    /// bodies are cut off and, shortly after, their connections closed.
    pub shutdown_grace: HumanDuration,
    /// NAR uploads (`upload-path`, `PUT nar/…`) receiving at once, over
    /// all tokens.
    pub max_concurrent_uploads: u32,
    /// NAR uploads receiving at once with one token (its `jti`).
    pub max_concurrent_uploads_per_token: u32,
    /// How long a `PUT nar/…` from Nix waits for an upload slot, without
    /// reading its body, before it is refused with 429 (Nix 2.8 cannot
    /// retry a PUT whose body it began to send). `upload-path` is refused
    /// at once: `larder push` and the agent wait and retry.
    pub upload_slot_wait: HumanDuration,
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let zero = |key: &str| {
            Err(ConfigError::Invalid(format!(
                "http.{key} must be greater than zero"
            )))
        };
        if self.header_read_timeout.as_secs() == 0 {
            return zero("header-read-timeout");
        }
        if self.body_idle_timeout.as_secs() == 0 {
            return zero("body-idle-timeout");
        }
        if self.max_connections == 0 {
            return zero("max-connections");
        }
        if self.max_concurrent_uploads == 0 {
            return zero("max-concurrent-uploads");
        }
        if self.max_concurrent_uploads_per_token == 0 {
            return zero("max-concurrent-uploads-per-token");
        }
        Ok(())
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: HumanDuration::from_secs(30),
            body_idle_timeout: HumanDuration::from_secs(60),
            max_connections: 1024,
            shutdown_grace: HumanDuration::from_secs(20),
            max_concurrent_uploads: 64,
            max_concurrent_uploads_per_token: 8,
            upload_slot_wait: HumanDuration::from_secs(120),
        }
    }
}

/// The chunker and compressor, wherever they run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Chunk jobs one process works on at once; 0 takes none (they wait
    /// for another process). Several, since a chunk job of a small NAR
    /// (which the chunker stores itself) mostly waits for storage and the
    /// database to sync.
    pub chunk_concurrency: u32,
    /// Compress jobs one process works on at once; 0 takes none. Two per
    /// core by default: a job waits for storage and the database to sync
    /// about as long as it compresses, and another job's compression fills
    /// that wait.
    pub compress_concurrency: u32,
    /// The zstd level of each stored chunk.
    pub compression_level: i32,
    /// How much new chunk data (uncompressed) one compress job, and so one
    /// pack object, holds: fewer, larger packs cost fewer storage
    /// requests; smaller ones spread a NAR over more compressors and bound
    /// what a compressor buffers for S3 (one pack per job in progress).
    pub pack_size: ByteSize,
    /// Deliveries of a job that fails for a passing reason (database,
    /// storage or queue unreachable) before its uploads are marked failed;
    /// the waits between them double from one second up to a minute.
    pub job_attempts: u32,
    /// An upload still in flight after this long without progress has its
    /// chunk job published again by the reconciler.
    pub stuck_after: HumanDuration,
    /// How often the reconciler publishes an upload's job again before it
    /// marks the upload failed.
    pub max_upload_attempts: u32,
    /// How often the reconciler looks for stuck uploads.
    pub reconcile_interval: HumanDuration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            chunk_concurrency: 4,
            compress_concurrency: u32::try_from(cores.saturating_mul(2)).unwrap_or(2),
            compression_level: 3,
            pack_size: ByteSize::new(32 << 20),
            job_attempts: 8,
            stuck_after: HumanDuration::from_secs(10 * 60),
            max_upload_attempts: 5,
            reconcile_interval: HumanDuration::from_secs(60),
        }
    }
}

/// `[gc]`: garbage collection (`gc-scheduler`, and in-process in the
/// single-machine server) and the read path's access-time flushing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct GcConfig {
    /// How often a GC run starts.
    pub interval: HumanDuration,
    /// The retention period of caches that set none: an object not fetched
    /// for this long is removed from its cache. Absent: keep forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_retention: Option<HumanDuration>,
    /// Uploads that ended (`done`, `failed`) are deleted, with whatever
    /// staged NAR they left, this long after their last change.
    pub finished_upload_deadline: HumanDuration,
    /// Uploads still in flight but not updated for this long are failed
    /// and deleted with their staged NAR. Longer than the reconciler's
    /// `stuck-after` times `max-upload-attempts`, so the reconciler has
    /// given up on them first. Also how old an object under `staging/`
    /// that no upload or staged file names must be before GC deletes it:
    /// an upload may take that long before its row names its object.
    pub stuck_upload_deadline: HumanDuration,
    /// NAR files received with `PUT nar/…` that no narinfo claimed within
    /// this long are deleted. Nix PUTs a path's narinfo right after its
    /// NAR file, so minutes are plenty; an unclaimed file counts against
    /// its cache until then.
    pub staged_file_deadline: HumanDuration,
    /// How often the reaping step alone runs (uploads and staged files past
    /// their deadlines, and their staged NARs), between full GC runs: cheap
    /// queries on indexed deadlines, so that unclaimed NAR files go within
    /// `staged-file-deadline` plus this, not at the next GC run.
    pub reap_interval: HumanDuration,
    /// Unreferenced chunks (rows, and objects under `chunks/` in storage)
    /// younger than this are kept: a chunker may be about to list them, a
    /// compressor may have just written them.
    pub orphan_grace: HumanDuration,
    /// How often the read path writes the access times it collected.
    pub access_flush_interval: HumanDuration,
    /// A pack whose live chunks fill less than this percentage of it is
    /// compacted: its live chunks are copied into a new pack and the old
    /// one deleted after `orphan-grace`. 0 turns compaction of sparse packs
    /// off (small packs are still merged).
    pub compact_below_percent: u32,
    /// The most live chunk bytes one GC run copies while compacting and
    /// merging packs (and repacking per-chunk objects of an older store),
    /// so that a run's storage traffic stays bounded; the rest waits for
    /// the next run. `gc-scheduler --repack` has no such bound.
    pub compact_bytes_per_run: ByteSize,
    /// Rows handled per database round trip.
    pub page_size: u32,
    /// Storage deletes in flight at once.
    pub delete_concurrency: u32,
    /// How often a scrub pass (every stored chunk read back, decompressed
    /// and checked against its hash; damaged ones withdrawn) starts on its
    /// own. Absent (the default): only `gc-scheduler --scrub` scrubs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub_interval: Option<HumanDuration>,
    /// The most stored bytes a scrub reads per second, averaged over its
    /// pass, so that it cannot starve serving of disk or network; `0`: no
    /// limit.
    pub scrub_bytes_per_second: ByteSize,
    /// How long the audit log keeps an event (who pushed, deleted,
    /// configured or minted what); older events are deleted by GC runs.
    pub audit_retention: HumanDuration,
}

impl GcConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let zero = |key: &str| {
            Err(ConfigError::Invalid(format!(
                "gc.{key} must be greater than zero"
            )))
        };
        if self.interval.as_secs() == 0 {
            return zero("interval");
        }
        if self.reap_interval.as_secs() == 0 {
            return zero("reap-interval");
        }
        if self.access_flush_interval.as_secs() == 0 {
            return zero("access-flush-interval");
        }
        if self.page_size == 0 {
            return zero("page-size");
        }
        if self.delete_concurrency == 0 {
            return zero("delete-concurrency");
        }
        if self
            .scrub_interval
            .is_some_and(|interval| interval.as_secs() == 0)
        {
            return zero("scrub-interval");
        }
        if self.compact_below_percent > 100 {
            return Err(ConfigError::Invalid(
                "gc.compact-below-percent must be at most 100".to_owned(),
            ));
        }
        Ok(())
    }
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::from_secs(60 * 60),
            default_retention: None,
            finished_upload_deadline: HumanDuration::from_secs(24 * 60 * 60),
            stuck_upload_deadline: HumanDuration::from_secs(24 * 60 * 60),
            staged_file_deadline: HumanDuration::from_secs(5 * 60),
            reap_interval: HumanDuration::from_secs(60),
            orphan_grace: HumanDuration::from_secs(60 * 60),
            access_flush_interval: HumanDuration::from_secs(5),
            compact_below_percent: 50,
            compact_bytes_per_run: ByteSize::new(1 << 30),
            page_size: 1000,
            delete_concurrency: 16,
            scrub_interval: None,
            scrub_bytes_per_second: ByteSize::new(64 << 20),
            audit_retention: HumanDuration::from_secs(365 * 24 * 60 * 60),
        }
    }
}

/// Where the pipeline's jobs travel between `ingest-api` and the workers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type", deny_unknown_fields)]
pub enum QueueConfig {
    /// Inside one process: the single-machine server runs the workers
    /// itself. Nothing is kept across a restart (the server republishes
    /// every upload in flight when it starts).
    #[default]
    Embedded,
    /// A RabbitMQ broker, shared by separately running API servers and
    /// workers.
    #[serde(rename_all = "kebab-case")]
    Amqp {
        /// `amqp://USER:PASSWORD@HOST:PORT/VHOST`, or `amqps://…` for TLS.
        url: Secret,
        /// PEM certificates trusted for `amqps://` beside the system's
        /// roots: a private CA's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<PathBuf>,
    },
}

impl QueueConfig {
    /// Whether processes can share this queue (an embedded one lives and
    /// dies inside one process).
    pub fn is_shared(&self) -> bool {
        matches!(self, QueueConfig::Amqp { .. })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH?mode=rwc` or `postgres://USER:PASSWORD@HOST/DB`.
    pub url: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type", deny_unknown_fields)]
pub enum StorageConfig {
    /// A directory on this machine.
    Local { path: PathBuf },
    /// An S3 bucket (AWS, R2, Garage, MinIO, ...), for the distributed
    /// topology.
    S3(S3Config),
}

/// `[storage] type = "s3"`: where the bucket is and how to reach it.
/// Unset optional keys follow the AWS SDK's conventions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct S3Config {
    /// The service's base URL, `https://HOST[:PORT]` (or `http://`).
    /// Unset: AWS S3's own endpoint for the region (`AWS_ENDPOINT_URL`
    /// and profiles may set one, as in every AWS SDK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region requests are signed for (`us-east-1`, `auto` for R2,
    /// `garage` for Garage). Unset: `AWS_REGION`, the profile, or instance
    /// metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub bucket: String,
    /// A static key; with [`secret_access_key`](Self::secret_access_key),
    /// or neither: then the SDK's credentials chain (environment
    /// variables, the profile's `credential_process` or keys, web identity,
    /// container or instance credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// Prepended to every key (`larder/`), so several uses can share
    /// one bucket; empty for the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// Path-style addressing (`https://HOST/BUCKET/KEY`) rather than
    /// virtual-hosted (`https://BUCKET.HOST/KEY`). Unset: path-style when
    /// an `endpoint` is set (self-hosted services are reached by one host
    /// name, and R2 takes both), virtual-hosted on AWS itself (its
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_path_style: Option<bool>,
    /// PEM certificates trusted for an `https://` endpoint beside the
    /// system's roots (which `SSL_CERT_FILE` replaces): a private CA's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A local directory for staged NARs (pushes between the door and the
    /// pipeline) instead of the bucket: every pushed byte is then uploaded
    /// to S3 once, in packs, rather than three times more (staged, read
    /// back twice). Only for the single-machine server: workers on other
    /// machines read what the door staged, so a shared queue refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_path: Option<PathBuf>,
    /// How long one request may wait for the service's answer, beyond the
    /// time its body takes to send at 1 MiB/s, before it is given up and
    /// retried (the SDK's standard retries). Unset: 30 seconds. Without a
    /// bound, one request the service never answers holds its push (or
    /// GC run) forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<HumanDuration>,
}

impl S3Config {
    /// Whether requests name the bucket in the path (see
    /// [`force_path_style`](Self::force_path_style)).
    pub fn path_style(&self) -> bool {
        self.force_path_style.unwrap_or(self.endpoint.is_some())
    }

    /// The configured static key, if any.
    pub fn static_key(&self) -> Option<(&str, &Secret)> {
        self.access_key_id
            .as_deref()
            .zip(self.secret_access_key.as_ref())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(ConfigError::Invalid(
                "set both storage.access-key-id and storage.secret-access-key, or neither \
                 (then the AWS SDK's credentials chain applies)"
                    .into(),
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            let https = endpoint.starts_with("https://");
            if !https && !endpoint.starts_with("http://") {
                return Err(ConfigError::Invalid(format!(
                    "storage.endpoint {endpoint:?} must start with https:// or http://"
                )));
            }
            if self.ca_file.is_some() && !https {
                return Err(ConfigError::Invalid(format!(
                    "storage.ca-file is set but storage.endpoint {endpoint:?} is plain http://: \
                     use https://"
                )));
            }
        }
        Ok(())
    }
}

/// How API tokens are signed. Exactly one of the two keys is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256: the shared secret, base64-encoded (at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_base64: Option<Secret>,
    /// RS256: the PEM-encoded RSA private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rs256_private_key_pem: Option<Secret>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

impl ServerConfig {
    /// `[::]:8080`: every address, the port binary caches usually take.
    pub fn default_listen() -> SocketAddr {
        SocketAddr::from(([0u16; 8], 8080))
    }

    /// Loads `path` and applies the process's `LARDER_…` variables.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_and_env(&text, path, std::env::vars_os())
    }

    /// Parses TOML text, then overlays the given environment. `path` is only
    /// used in error messages.
    pub fn from_toml_and_env(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|source| ConfigError::Syntax {
                path: path.to_owned(),
                source,
            })?;
        overlay_env(&mut table, env)?;
        let config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|error: toml::de::Error| ConfigError::Invalid(error.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: one signing key, a usable endpoint URL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (
            &self.auth.hs256_secret_base64,
            &self.auth.rs256_private_key_pem,
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "set only one of auth.hs256-secret-base64 and auth.rs256-private-key-pem"
                        .into(),
                ))
            }
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "set auth.hs256-secret-base64 or auth.rs256-private-key-pem".into(),
                ))
            }
            _ => {}
        }
        if let StorageConfig::S3(s3) = &self.storage {
            s3.validate()?;
            if s3.staging_path.is_some() && self.queue.is_shared() {
                return Err(ConfigError::Invalid(
                    "storage.staging-path keeps staged NARs on this machine, where workers of \
                     a shared queue cannot read them: use it only with the embedded queue \
                     (the single-machine server)"
                        .into(),
                ));
            }
        }
        self.gc.validate()?;
        let pack_size = self.pipeline.pack_size.bytes();
        if !(1 << 20..=1 << 30).contains(&pack_size) {
            return Err(ConfigError::Invalid(format!(
                "pipeline.pack-size must be between 1 MiB and 1 GiB, not {}",
                self.pipeline.pack_size
            )));
        }
        self.http.validate()?;
        self.ingest.validate()?;
        if let QueueConfig::Amqp { url, ca_file } = &self.queue {
            // Only the scheme may show: the URL holds a password.
            let url = url.expose();
            let tls = url.starts_with("amqps://");
            if !tls && !url.starts_with("amqp://") {
                return Err(ConfigError::Invalid(
                    "queue.url must start with amqps:// or amqp://".into(),
                ));
            }
            if ca_file.is_some() && !tls {
                return Err(ConfigError::Invalid(
                    "queue.ca-file is set but queue.url is plain amqp://: use amqps://".into(),
                ));
            }
        }
        if let Some(endpoint) = &self.api_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "api-endpoint {endpoint:?} must start with http:// or https://"
                )));
            }
        }
        Ok(())
    }

    /// The config as TOML, secrets included: for writing the file.
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of strings, paths and numbers to TOML
        // cannot fail.
        toml::to_string_pretty(self).expect("server config serialises to TOML")
    }
}

/// Whether the environment variable `name` is one the config reads
/// (`LARDER_` and a known top-level key): for checking deployment files,
/// since other `LARDER_…` variables are ignored without a word.
pub fn is_config_variable(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX).is_some_and(|rest| {
        let top = rest.split("__").next().unwrap_or_default();
        TOP_LEVEL_KEYS.contains(&top.to_ascii_lowercase().replace('_', "-").as_str())
    })
}

/// Sets `table` keys from `LARDER_…` variables (see the module docs).
fn overlay_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<(), ConfigError> {
    for (name, value) in env {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest
            .split("__")
            .map(|segment| segment.to_ascii_lowercase().replace('_', "-"))
            .collect();
        if !TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| ConfigError::EnvNotUnicode {
                name: name.to_owned(),
            })?;
        let (leaf, sections) = path
            .split_last()
            .expect("split yields at least one segment");
        let mut current = &mut *table;
        for section in sections {
            let entry = current
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::EnvConflict {
                    name: name.to_owned(),
                    key: path.join("."),
                    section: section.clone(),
                })?;
        }
        current.insert(leaf.clone(), env_value(&value));
    }
    Ok(())
}

/// Environment values are strings; whole numbers and booleans become TOML
/// numbers and booleans so that numeric and boolean keys can be set too.
fn env_value(value: &str) -> toml::Value {
    if let Ok(number) = value.parse::<i64>() {
        toml::Value::Integer(number)
    } else if let Ok(boolean) = value.parse::<bool>() {
        toml::Value::Boolean(boolean)
    } else {
        toml::Value::String(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    const MINIMAL: &str = r#"
        [database]
        url = "sqlite:///var/lib/larder/server.db?mode=rwc"
        [storage]
        type = "local"
        path = "/var/lib/larder/storage"
        [auth]
        hs256-secret-base64 = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="
    "#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<ServerConfig, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        ServerConfig::from_toml_and_env(text, Path::new("test.toml"), env)
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(config.listen, "[::]:8080".parse().expect("addr"));
        assert_eq!(config.log.format, LogFormat::Pretty);
        assert!(config.api_endpoint.is_none());
    }

    #[test]
    fn environment_overrides_the_file_and_ignores_unrelated_variables() {
        let config = load(
            MINIMAL,
            &[
                ("LARDER_DATABASE__URL", "postgres://larder@db/larder"),
                ("LARDER_API_ENDPOINT", "https://cache.example.org/"),
                ("LARDER_LISTEN", "127.0.0.1:9000"),
                ("LARDER_LOG__FORMAT", "json"),
                ("LARDER_TOKEN", "a client setting"),
                ("LARDER_TEST_POSTGRES_URL", "a test setting"),
            ],
        )
        .expect("valid config");
        assert_eq!(config.database.url.expose(), "postgres://larder@db/larder");
        assert_eq!(
            config.api_endpoint.as_deref(),
            Some("https://cache.example.org/")
        );
        assert_eq!(config.listen, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn gc_keeps_forever_by_default_and_reads_its_section() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(config.gc, GcConfig::default());
        assert!(config.gc.default_retention.is_none());

        let text = format!("{MINIMAL}\n[gc]\ndefault-retention = \"30d\"\npage-size = 10\n");
        let config = load(&text, &[("LARDER_GC__INTERVAL", "5min")]).expect("valid config");
        assert_eq!(
            config.gc.default_retention,
            Some(HumanDuration::from_secs(30 * 24 * 60 * 60))
        );
        assert_eq!(config.gc.page_size, 10);
        assert_eq!(config.gc.interval, HumanDuration::from_secs(5 * 60));

        let error = load(MINIMAL, &[("LARDER_GC__DELETE_CONCURRENCY", "0")]).expect_err("zero");
        assert!(
            error.to_string().contains("gc.delete-concurrency"),
            "{error}"
        );
    }

    #[test]
    fn scrubbing_is_off_by_default_paced_and_refuses_a_zero_interval() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(config.gc.scrub_interval, None);
        assert_eq!(config.gc.scrub_bytes_per_second, ByteSize::new(64 << 20));

        let text = format!(
            "{MINIMAL}\n[gc]\nscrub-interval = \"7 days\"\nscrub-bytes-per-second = \"200 MiB\"\n"
        );
        let config = load(&text, &[]).expect("valid config");
        assert_eq!(
            config.gc.scrub_interval,
            Some(HumanDuration::from_secs(7 * 24 * 60 * 60))
        );
        assert_eq!(config.gc.scrub_bytes_per_second, ByteSize::new(200 << 20));
        let unlimited = load(MINIMAL, &[("LARDER_GC__SCRUB_BYTES_PER_SECOND", "0")])
            .expect("no limit is a valid choice");
        assert_eq!(unlimited.gc.scrub_bytes_per_second.bytes(), 0);

        let error = load(MINIMAL, &[("LARDER_GC__SCRUB_INTERVAL", "0s")]).expect_err("zero");
        assert!(error.to_string().contains("gc.scrub-interval"), "{error}");
    }

    #[test]
    fn http_limits_have_defaults_and_refuse_zero() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(config.http, HttpConfig::default());

        let text = format!("{MINIMAL}\n[http]\nmax-connections = 10\nupload-slot-wait = \"0s\"\n");
        let config = load(
            &text,
            &[("LARDER_HTTP__MAX_CONCURRENT_UPLOADS_PER_TOKEN", "2")],
        )
        .expect("valid config");
        assert_eq!(config.http.max_connections, 10);
        assert_eq!(config.http.max_concurrent_uploads_per_token, 2);
        assert_eq!(config.http.upload_slot_wait, HumanDuration::from_secs(0));

        let error = load(MINIMAL, &[("LARDER_HTTP__BODY_IDLE_TIMEOUT", "0s")]).expect_err("zero");
        assert!(
            error.to_string().contains("http.body-idle-timeout"),
            "{error}"
        );
    }

    #[test]
    fn quotas_are_unlimited_by_default_and_read_with_units() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(config.quota, QuotaConfig::default());
        assert_eq!(config.quota.default_cache_quota, None);
        assert_eq!(config.quota.min_free_space.bytes(), 1 << 30);

        let text = format!("{MINIMAL}\n[quota]\ndefault-cache-quota = \"50 GiB\"\n");
        let config = load(&text, &[("LARDER_QUOTA__MIN_FREE_SPACE", "500MB")]).expect("valid");
        assert_eq!(
            config.quota.default_cache_quota.map(ByteSize::bytes),
            Some(50 << 30)
        );
        assert_eq!(config.quota.min_free_space.bytes(), 500_000_000);
        let again = load(&config.to_toml(), &[]).expect("re-read");
        assert_eq!(again.quota, config.quota);

        // Digits alone, as an environment variable gives them, are bytes.
        let config = load(MINIMAL, &[("LARDER_QUOTA__DEFAULT_CACHE_QUOTA", "1048576")])
            .expect("valid config");
        assert_eq!(
            config.quota.default_cache_quota.map(ByteSize::bytes),
            Some(1 << 20)
        );

        let error = load(MINIMAL, &[("LARDER_QUOTA__DEFAULT_CACHE_QUOTA", "50G")])
            .expect_err("an ambiguous unit");
        assert!(error.to_string().contains("ambiguous"), "{error}");
    }

    #[test]
    fn unclaimed_nar_files_are_reaped_within_minutes_by_default() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(
            config.gc.staged_file_deadline,
            HumanDuration::from_secs(5 * 60)
        );
        assert_eq!(config.gc.reap_interval, HumanDuration::from_secs(60));
        let text = format!("{MINIMAL}\n[gc]\nreap-interval = \"10s\"\n");
        let config = load(&text, &[("LARDER_GC__STAGED_FILE_DEADLINE", "2min")]).expect("valid");
        assert_eq!(config.gc.reap_interval, HumanDuration::from_secs(10));
        assert_eq!(
            config.gc.staged_file_deadline,
            HumanDuration::from_secs(120)
        );
        let error = load(MINIMAL, &[("LARDER_GC__REAP_INTERVAL", "0s")]).expect_err("zero");
        assert!(error.to_string().contains("gc.reap-interval"), "{error}");
    }

    #[test]
    fn the_ops_listener_is_optional_and_read_from_file_and_environment() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(config.ops.listen, None);
        assert!(!config.to_toml().contains("[ops]"), "{}", config.to_toml());

        let text = format!("{MINIMAL}\n[ops]\nlisten = \"127.0.0.1:9090\"\n");
        let config = load(&text, &[]).expect("valid config");
        assert_eq!(
            config.ops.listen,
            Some("127.0.0.1:9090".parse().expect("addr"))
        );
        let again = load(&config.to_toml(), &[]).expect("re-read");
        assert_eq!(again.ops, config.ops);

        let config = load(MINIMAL, &[("LARDER_OPS__LISTEN", "[::1]:9100")]).expect("valid config");
        assert_eq!(config.ops.listen, Some("[::1]:9100".parse().expect("addr")));
        assert!(is_config_variable("LARDER_OPS__LISTEN"));
        let error = load(MINIMAL, &[("LARDER_OPS__LISTEN", "localhost")]).expect_err("no port");
        assert!(error.to_string().contains("address"), "{error}");
    }

    #[test]
    fn ingest_reads_the_door_limits_and_refuses_zero() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(
            config.ingest.max_decompression_ratio,
            DEFAULT_MAX_DECOMPRESSION_RATIO
        );
        assert_eq!(config.ingest.verify_threads, None);
        assert!(config.ingest.verify_threads() >= 1);
        // Absent stays absent in a written file, so that the default
        // follows the machine the file moves to.
        assert!(!config.to_toml().contains("verify-threads"));

        let text = format!("{MINIMAL}\n[ingest]\nmax-decompression-ratio = 50\n");
        let config = load(&text, &[("LARDER_INGEST__VERIFY_THREADS", "3")]).expect("valid config");
        assert_eq!(config.ingest.max_decompression_ratio, 50);
        assert_eq!(config.ingest.verify_threads(), 3);

        for (variable, key) in [
            ("LARDER_INGEST__VERIFY_THREADS", "ingest.verify-threads"),
            (
                "LARDER_INGEST__MAX_DECOMPRESSION_RATIO",
                "ingest.max-decompression-ratio",
            ),
        ] {
            let error = load(MINIMAL, &[(variable, "0")]).expect_err("zero");
            assert!(error.to_string().contains(key), "{error}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let config = load(MINIMAL, &[]).expect("valid config");
        let shown = format!("{config:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(!shown.contains("server.db"), "{shown}");
    }

    #[test]
    fn round_trips_through_toml() {
        let config = load(MINIMAL, &[]).expect("valid config");
        let again = load(&config.to_toml(), &[]).expect("re-read");
        assert_eq!(again.to_toml(), config.to_toml());
    }

    #[test]
    fn mistakes_are_reported_clearly() {
        let typo = MINIMAL.replace("[storage]", "[storage]\npaht = \"x\"");
        let error = load(&typo, &[]).expect_err("unknown key");
        assert!(error.to_string().contains("paht"), "{error}");

        let no_key = MINIMAL.replace("hs256-secret-base64", "# no key");
        let error = load(&no_key, &[]).expect_err("no signing key");
        assert!(error.to_string().contains("hs256-secret-base64"), "{error}");

        let bad_endpoint = load(MINIMAL, &[("LARDER_API_ENDPOINT", "cache.example.org")]);
        assert!(bad_endpoint.is_err());

        let syntax = load("[database", &[]).expect_err("bad TOML");
        assert!(matches!(syntax, ConfigError::Syntax { .. }));

        let with_listen = format!("listen = \"127.0.0.1:1\"\n{MINIMAL}");
        let conflict =
            load(&with_listen, &[("LARDER_LISTEN__PORT", "1")]).expect_err("listen is not a table");
        assert!(matches!(conflict, ConfigError::EnvConflict { .. }));
    }

    #[test]
    fn config_variables_are_told_from_other_larder_variables() {
        assert!(is_config_variable("LARDER_QUEUE__URL"));
        assert!(is_config_variable("LARDER_API_ENDPOINT"));
        assert!(!is_config_variable("LARDER_QUEU__URL"));
        assert!(!is_config_variable("LARDER_TOKEN"));
        assert!(!is_config_variable("DATABASE__URL"));
    }

    #[test]
    fn the_queue_is_embedded_unless_amqp_is_configured() {
        let config = load(MINIMAL, &[]).expect("valid config");
        assert_eq!(config.queue, QueueConfig::Embedded);
        assert!(!config.queue.is_shared());

        let config = load(
            MINIMAL,
            &[
                ("LARDER_QUEUE__TYPE", "amqp"),
                ("LARDER_QUEUE__URL", "amqp://larder:hunter2@mq:5672/%2f"),
            ],
        )
        .expect("valid config");
        let QueueConfig::Amqp { url, ca_file } = &config.queue else {
            panic!("expected an AMQP queue: {:?}", config.queue);
        };
        assert_eq!(url.expose(), "amqp://larder:hunter2@mq:5672/%2f");
        assert_eq!(ca_file, &None);
        assert!(config.queue.is_shared());
        assert!(!format!("{config:?}").contains("hunter2"));
        let again = load(&config.to_toml(), &[]).expect("re-read");
        assert_eq!(again.queue, config.queue);

        let missing_url = load(MINIMAL, &[("LARDER_QUEUE__TYPE", "amqp")]);
        assert!(missing_url.is_err());
        let tls = load(
            MINIMAL,
            &[
                ("LARDER_QUEUE__TYPE", "amqp"),
                ("LARDER_QUEUE__URL", "amqps://larder:hunter2@mq:5671/%2f"),
                ("LARDER_QUEUE__CA_FILE", "/etc/larder/mq-ca.pem"),
            ],
        )
        .expect("amqps with a CA file");
        assert_eq!(
            tls.queue,
            QueueConfig::Amqp {
                url: Secret::new("amqps://larder:hunter2@mq:5671/%2f"),
                ca_file: Some(PathBuf::from("/etc/larder/mq-ca.pem")),
            }
        );
        for (url, expected) in [
            ("http://mq:5671", "amqps:// or amqp://"),
            ("amqp://larder:hunter2@mq:5672/%2f", "use amqps://"),
        ] {
            let error = load(
                MINIMAL,
                &[
                    ("LARDER_QUEUE__TYPE", "amqp"),
                    ("LARDER_QUEUE__URL", url),
                    ("LARDER_QUEUE__CA_FILE", "/etc/larder/mq-ca.pem"),
                ],
            )
            .expect_err(url);
            assert!(error.to_string().contains(expected), "{error}");
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn pack_size_is_bounded() {
        let config = load(MINIMAL, &[("LARDER_PIPELINE__PACK_SIZE", "4 MiB")]).expect("4 MiB");
        assert_eq!(config.pipeline.pack_size.bytes(), 4 << 20);
        for bad in ["512 KiB", "2 GiB"] {
            let error = load(MINIMAL, &[("LARDER_PIPELINE__PACK_SIZE", bad)]).expect_err(bad);
            assert!(error.to_string().contains("pipeline.pack-size"), "{error}");
        }
    }

    /// Local staging works only where the door and the workers share a
    /// machine: with the embedded queue, not a shared one.
    #[test]
    fn local_staging_needs_the_embedded_queue() {
        let text = MINIMAL.replace(
            "type = \"local\"\n        path = \"/var/lib/larder/storage\"",
            "type = \"s3\"\n        bucket = \"larder\"\n        \
             staging-path = \"/var/lib/larder/staging\"",
        );
        let config = load(&text, &[]).expect("with the embedded queue");
        let StorageConfig::S3(s3) = &config.storage else {
            panic!("expected S3 storage: {:?}", config.storage);
        };
        assert_eq!(
            s3.staging_path.as_deref(),
            Some(Path::new("/var/lib/larder/staging"))
        );
        let error = load(
            &text,
            &[
                ("LARDER_QUEUE__TYPE", "amqp"),
                ("LARDER_QUEUE__URL", "amqp://mq:5672/%2f"),
            ],
        )
        .expect_err("a shared queue");
        assert!(error.to_string().contains("staging-path"), "{error}");
    }

    #[test]
    fn s3_storage_is_read_from_the_file_and_environment() {
        let text = MINIMAL.replace(
            "type = \"local\"\n        path = \"/var/lib/larder/storage\"",
            "type = \"s3\"\n        endpoint = \"http://127.0.0.1:3900\"\n        \
             region = \"garage\"\n        bucket = \"larder\"\n        \
             access-key-id = \"GK1\"",
        );
        let config = load(
            &text,
            &[("LARDER_STORAGE__SECRET_ACCESS_KEY", "from-the-environment")],
        )
        .expect("valid config");
        let StorageConfig::S3(s3) = &config.storage else {
            panic!("expected S3 storage: {:?}", config.storage);
        };
        assert_eq!(
            s3,
            &S3Config {
                endpoint: Some("http://127.0.0.1:3900".to_owned()),
                region: Some("garage".to_owned()),
                bucket: "larder".to_owned(),
                access_key_id: Some("GK1".to_owned()),
                secret_access_key: Some(Secret::new("from-the-environment")),
                prefix: String::new(),
                force_path_style: None,
                ca_file: None,
                staging_path: None,
                request_timeout: None,
            }
        );
        assert!(s3.path_style(), "an endpoint means path-style by default");
        assert!(!format!("{config:?}").contains("from-the-environment"));

        let https = text.replace("http://127.0.0.1:3900", "https://s3.example.com");
        let config = load(
            &https,
            &[
                ("LARDER_STORAGE__SECRET_ACCESS_KEY", "from-the-environment"),
                ("LARDER_STORAGE__CA_FILE", "/etc/larder/s3-ca.pem"),
                ("LARDER_STORAGE__FORCE_PATH_STYLE", "false"),
            ],
        )
        .expect("https with a CA file");
        let StorageConfig::S3(s3) = &config.storage else {
            panic!("expected S3 storage: {:?}", config.storage);
        };
        assert_eq!(
            s3.ca_file.as_deref(),
            Some(Path::new("/etc/larder/s3-ca.pem"))
        );
        assert!(!s3.path_style());
        let again = load(&config.to_toml(), &[]).expect("re-read");
        assert_eq!(again.to_toml(), config.to_toml());

        let ca_on_plain_http = load(
            &text,
            &[
                ("LARDER_STORAGE__SECRET_ACCESS_KEY", "from-the-environment"),
                ("LARDER_STORAGE__CA_FILE", "/etc/larder/s3-ca.pem"),
            ],
        )
        .expect_err("a CA file with http://");
        assert!(
            ca_on_plain_http.to_string().contains("use https://"),
            "{ca_on_plain_http}"
        );
        let half_a_key = load(&text, &[]).expect_err("an access key without its secret");
        assert!(
            half_a_key.to_string().contains("or neither"),
            "{half_a_key}"
        );
        let not_a_url = load(
            &text.replace("http://127.0.0.1:3900", "s3.example.com"),
            &[("LARDER_STORAGE__SECRET_ACCESS_KEY", "x")],
        )
        .expect_err("no scheme");
        assert!(not_a_url.to_string().contains("https://"), "{not_a_url}");
    }

    #[test]
    fn s3_on_aws_needs_only_a_bucket() {
        let text = MINIMAL.replace(
            "type = \"local\"\n        path = \"/var/lib/larder/storage\"",
            "type = \"s3\"\n        bucket = \"larder\"",
        );
        let config = load(&text, &[]).expect("valid config");
        let StorageConfig::S3(s3) = &config.storage else {
            panic!("expected S3 storage: {:?}", config.storage);
        };
        assert_eq!(
            (&s3.endpoint, &s3.region, s3.static_key()),
            (&None, &None, None)
        );
        assert!(!s3.path_style(), "virtual-hosted on AWS by default");
        let again = load(&config.to_toml(), &[]).expect("re-read");
        assert_eq!(again.to_toml(), config.to_toml());
    }
}
