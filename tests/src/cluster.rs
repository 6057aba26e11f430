//! The distributed topology from the real binaries: API servers
//! (`ingest-api --mode api`), chunkers, compressors and `gc-scheduler` as
//! child processes on one config, against RabbitMQ, PostgreSQL and Garage —
//! what `ops/cluster.sh` runs for people and benchmarks.
//!
//! Each [`Cluster`] has its own PostgreSQL database, its own RabbitMQ
//! virtual host (so clusters sharing a broker never take each other's
//! jobs) and its own key prefix in the bucket, so tests on the shared
//! services run side by side. Fault tests point some of it at a
//! [`PrivateServices`] set ([`ClusterServices::with_private`]).
//!
//! Single processes can be SIGKILLed and started again by name
//! (`chunker-worker-1`, …); an API server comes back on its address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use larder_api::byte_size::ByteSize;
use larder_api::duration::HumanDuration;
use larder_config::{
    AuthConfig, DatabaseConfig, GcConfig, HttpConfig, IngestConfig, LogConfig, OpsConfig,
    PipelineConfig, QueueConfig, QuotaConfig, S3Config, Secret, ServerConfig, StorageConfig,
};
use larder_db::{Cache, Database, Timestamp, Upload, UploadPhase};
use larder_token::{Permission, TokenSigningKey};

use crate::process::{service_command, ServerProcess};
use crate::server::{create_cache, record_token, token_builder, HttpApi};
use crate::services::{
    self, add_rabbitmq_vhost, amqp_connect_to, fresh_postgres_database_on,
    rabbitmq_connections_over_tls, services_ctl_in, unique_name, PrivateServices, S3Settings,
};

/// A random HS256 secret for a cluster's tokens (base64 of 32 bytes).
const TOKEN_SECRET_BYTES: usize = 32;

/// Where a cluster's processes find RabbitMQ, PostgreSQL and Garage.
#[derive(Debug, Clone)]
pub struct ClusterServices {
    /// The broker's URL on its default virtual host (`…/%2f`).
    amqp_url: String,
    /// The `[queue] ca-file` for an `amqps://` URL.
    amqp_ca_file: Option<PathBuf>,
    /// The services directory whose `ops/services.sh rabbitmqctl` reaches
    /// that broker.
    rabbitmq_dir: PathBuf,
    /// A PostgreSQL superuser's URL (with `sslmode` and `sslrootcert` for
    /// TLS).
    postgres_url: String,
    s3: S3Settings,
    /// Whether the processes reach S3 through the TLS terminator.
    s3_over_tls: bool,
}

impl ClusterServices {
    /// The services `ops/test.sh` started for the whole suite.
    pub fn shared() -> Self {
        Self {
            amqp_url: services::amqp_url(),
            amqp_ca_file: None,
            rabbitmq_dir: services::services_dir(),
            postgres_url: services::postgres_url(),
            s3: S3Settings::from_env(),
            s3_over_tls: false,
        }
    }

    /// The shared services, each over TLS with the throwaway CA: RabbitMQ's
    /// AMQPS listener (the CA as `[queue] ca-file`), PostgreSQL with
    /// `sslmode=verify-full` (the CA as `sslrootcert`), and S3 through the
    /// TLS terminator (the CA as `[storage] ca-file`).
    pub fn shared_over_tls() -> Self {
        Self {
            amqp_url: services::amqps_url(),
            amqp_ca_file: Some(services::tls_ca_file()),
            postgres_url: services::postgres_tls_url(),
            s3_over_tls: true,
            ..Self::shared()
        }
    }

    /// These services, with those `private` runs taken from it instead
    /// (over plain connections).
    pub fn with_private(mut self, private: &PrivateServices) -> Self {
        if private.runs("rabbitmq") {
            self.amqp_url = private.amqp_url();
            self.amqp_ca_file = None;
            self.rabbitmq_dir = private.dir().to_owned();
        }
        if private.runs("postgres") {
            self.postgres_url = private.postgres_url();
        }
        if private.runs("garage") {
            self.s3 = private.s3_settings();
            self.s3_over_tls = false;
        }
        self
    }

    /// The `[storage]` of a cluster under `prefix`.
    fn storage_config(&self, prefix: &str) -> S3Config {
        if self.s3_over_tls {
            self.s3.tls_storage_config(prefix)
        } else {
            self.s3.storage_config(prefix)
        }
    }
}

/// How many of each process, and their settings.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub apis: usize,
    pub chunkers: usize,
    pub compressors: usize,
    pub gc_scheduler: bool,
    pub pipeline: PipelineConfig,
    pub ingest: IngestConfig,
}

impl Default for ClusterOptions {
    /// The topology of issue #5's acceptance: 2 APIs, 2 chunkers, 2
    /// compressors and the scheduler. Stuck uploads are noticed after 15 s
    /// (not 10 minutes) and looked for every second, so that a test sees a
    /// job lost with a killed process come back.
    fn default() -> Self {
        Self {
            apis: 2,
            chunkers: 2,
            compressors: 2,
            gc_scheduler: true,
            pipeline: PipelineConfig {
                chunk_concurrency: 1,
                compress_concurrency: 2,
                stuck_after: HumanDuration::from_secs(15),
                max_upload_attempts: 20,
                reconcile_interval: HumanDuration::from_secs(1),
                // Several compress jobs per pushed path, so that a fault
                // test finds compressors in the middle of one.
                pack_size: ByteSize::new(4 << 20),
                ..PipelineConfig::default()
            },
            ingest: IngestConfig::default(),
        }
    }
}

/// One process of the cluster, running or not.
struct Member {
    binary: &'static str,
    /// The message of the log line that says it is ready.
    ready: &'static str,
    args: Vec<String>,
    process: Option<ServerProcess>,
}

/// An API server of a [`Cluster`], as a client reaches it.
#[derive(Debug, Clone)]
pub struct ApiEndpoint {
    url: String,
    http: reqwest::Client,
}

impl HttpApi for ApiEndpoint {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

/// The distributed topology, running.
pub struct Cluster {
    members: BTreeMap<String, Member>,
    apis: Vec<ApiEndpoint>,
    config: ServerConfig,
    config_path: PathBuf,
    amqp_url: String,
    vhost: String,
    rabbitmq_dir: PathBuf,
    s3: S3Settings,
    prefix: String,
    database: Database,
    signing_key: TokenSigningKey,
    // Holds the config file; removed last.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Creates the cluster's database, virtual host and key prefix, writes
    /// its config and starts every process, returning once each is ready.
    pub async fn start(services: &ClusterServices, options: ClusterOptions) -> Self {
        let database_url = fresh_postgres_database_on(&services.postgres_url).await;
        let vhost = unique_name("larder");
        add_rabbitmq_vhost(&services.rabbitmq_dir, &vhost).await;
        let amqp_url = with_vhost(&services.amqp_url, &vhost);
        let prefix = format!("{}/", unique_name("cluster"));
        let secret: [u8; TOKEN_SECRET_BYTES] = std::array::from_fn(|_| rand::random());
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().expect("a socket address"),
            api_endpoint: None,
            database: DatabaseConfig {
                url: Secret::new(database_url.clone()),
            },
            storage: StorageConfig::S3(services.storage_config(&prefix)),
            auth: AuthConfig {
                hs256_secret_base64: Some(Secret::new(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    secret,
                ))),
                rs256_private_key_pem: None,
            },
            ingest: options.ingest.clone(),
            http: HttpConfig::default(),
            pipeline: options.pipeline.clone(),
            gc: GcConfig::default(),
            queue: QueueConfig::Amqp {
                url: Secret::new(amqp_url.clone()),
                ca_file: services.amqp_ca_file.clone(),
            },
            quota: QuotaConfig::default(),
            log: LogConfig::default(),
            ops: OpsConfig::default(),
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config_path = dir.path().join("larder.toml");
        std::fs::write(&config_path, config.to_toml()).expect("writing the cluster's config");
        let signing_key = ingest_api::signing_key(&config).expect("the cluster's signing key");

        // Migrated here, so that caches and tokens can be made before any
        // process has started (each migrates too, which is safe at once).
        let database = Database::connect(&database_url)
            .await
            .expect("connecting to the cluster's database");
        database.migrate().await.expect("migrating");

        let mut members = BTreeMap::new();
        let mut add = |kind: &'static str, count: usize, ready: &'static str, extra: &[&str]| {
            for n in 1..=count {
                let mut args = vec![
                    "--config".to_owned(),
                    config_path.display().to_string(),
                    "--listen".to_owned(),
                    "127.0.0.1:0".to_owned(),
                ];
                args.extend(extra.iter().map(|arg| (*arg).to_owned()));
                members.insert(
                    format!("{kind}-{n}"),
                    Member {
                        binary: kind,
                        ready,
                        args,
                        process: None,
                    },
                );
            }
        };
        add("ingest-api", options.apis, "serving", &["--mode", "api"]);
        add("chunker-worker", options.chunkers, "taking jobs", &[]);
        add("compressor-worker", options.compressors, "taking jobs", &[]);
        add(
            "gc-scheduler",
            usize::from(options.gc_scheduler),
            "reconciling stuck uploads",
            &[],
        );
        let mut cluster = Self {
            members,
            apis: Vec::new(),
            config,
            config_path,
            amqp_url,
            vhost,
            rabbitmq_dir: services.rabbitmq_dir.clone(),
            s3: services.s3.clone(),
            prefix,
            database,
            signing_key,
            _dir: dir,
        };
        let names: Vec<String> = cluster.members.keys().cloned().collect();
        for name in &names {
            cluster.spawn(name);
        }
        for name in &names {
            let address = cluster.wait_until_ready(name);
            if let Some(address) = address {
                // An API server comes back on the same address.
                let member = cluster.members.get_mut(name).expect("a member");
                let listen = member
                    .args
                    .iter()
                    .position(|arg| arg == "--listen")
                    .expect("a --listen flag");
                member.args[listen + 1] = address.clone();
                cluster.apis.push(ApiEndpoint {
                    url: format!("http://{address}"),
                    http: reqwest::Client::new(),
                });
            }
        }
        cluster
    }

    /// Starts member `name`'s process (not waiting for it).
    fn spawn(&mut self, name: &str) {
        let member = self
            .members
            .get_mut(name)
            .unwrap_or_else(|| panic!("no process {name} in the cluster"));
        assert!(member.process.is_none(), "{name} is already running");
        let mut command = service_command(member.binary);
        command.args(&member.args);
        member.process = Some(ServerProcess::spawn(name, command));
    }

    /// Waits for member `name`'s ready line; returns an API server's address.
    fn wait_until_ready(&mut self, name: &str) -> Option<String> {
        let member = self.members.get_mut(name).expect("a member");
        let process = member.process.as_mut().expect("a running process");
        let line = process.wait_for_message(member.ready);
        line["fields"]["address"].as_str().map(str::to_owned)
    }

    /// The messages of the log lines that the running process `name` has
    /// printed so far.
    pub fn log_messages(&mut self, name: &str) -> Vec<String> {
        let process = self
            .members
            .get_mut(name)
            .and_then(|member| member.process.as_mut())
            .unwrap_or_else(|| panic!("no running process {name} in the cluster"));
        process
            .lines()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line["fields"]["message"].as_str().map(str::to_owned))
            .collect()
    }

    /// The names of the cluster's processes, e.g. `chunker-worker-1`.
    pub fn process_names(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    /// SIGKILLs process `name`, as a crash or the OOM killer would.
    pub fn kill(&mut self, name: &str) {
        let member = self
            .members
            .get_mut(name)
            .unwrap_or_else(|| panic!("no process {name} in the cluster"));
        member
            .process
            .take()
            .unwrap_or_else(|| panic!("{name} is not running"))
            .kill();
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) process `name`: while
    /// frozen it finishes nothing, so what RabbitMQ says it holds stays
    /// true until it is thawed or killed.
    pub fn freeze(&self, name: &str, frozen: bool) {
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &self.pid(name).to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {name}");
    }

    fn pid(&self, name: &str) -> u32 {
        self.members
            .get(name)
            .and_then(|member| member.process.as_ref())
            .unwrap_or_else(|| panic!("no running process {name} in the cluster"))
            .id()
    }

    /// The deliveries that process `name` holds unacknowledged now, as
    /// RabbitMQ counts them on the channels of that process's connections
    /// (each service names its connections with its pid). A worker that
    /// holds one is in the middle of a job. Takes a second or two
    /// (`rabbitmqctl`): freeze the process first for an answer that stays
    /// true.
    pub async fn unacknowledged_deliveries(&self, name: &str) -> u64 {
        let marker = format!("(pid {})", self.pid(name));
        let connections: Vec<String> = self
            .rabbitmqctl_json("list_connections", &["pid", "client_properties"])
            .await
            .into_iter()
            .filter(|connection| {
                connection["client_properties"]
                    .to_string()
                    .contains(&marker)
            })
            .filter_map(|connection| connection["pid"].as_str().map(str::to_owned))
            .collect();
        assert!(
            !connections.is_empty(),
            "{name} has no connection to RabbitMQ"
        );
        self.rabbitmqctl_json("list_channels", &["connection", "messages_unacknowledged"])
            .await
            .into_iter()
            .filter(|channel| {
                channel["connection"]
                    .as_str()
                    .is_some_and(|connection| connections.iter().any(|ours| ours == connection))
            })
            .map(|channel| {
                channel["messages_unacknowledged"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("an unacknowledged count in {channel}"))
            })
            .sum()
    }

    /// `rabbitmqctl LIST COLUMNS… --formatter json` on the cluster's broker.
    async fn rabbitmqctl_json(&self, list: &str, columns: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["rabbitmqctl", list];
        args.extend(columns);
        args.extend(["--formatter", "json"]);
        let text = services_ctl_in(&self.rabbitmq_dir, &args).await;
        serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("rabbitmqctl {list}: {error}: {text}"))
    }

    /// Starts process `name` again (after [`kill`](Self::kill)) and waits
    /// until it is ready.
    pub fn start_again(&mut self, name: &str) {
        self.spawn(name);
        self.wait_until_ready(name);
    }

    /// API server `n` (from 0).
    pub fn api(&self, n: usize) -> &ApiEndpoint {
        &self.apis[n]
    }

    /// The config every process runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The config file every process is started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The cluster's database, for assertions.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// The AMQP URL of the cluster's virtual host.
    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    /// Creates a cache with a generated key.
    pub async fn create_cache(&self, name: &str, is_public: bool) -> Cache {
        create_cache(&self.database, name, is_public).await
    }

    /// Mints and records a token valid for an hour.
    pub async fn mint(&self, subject: &str, grants: &[(&str, &[Permission])]) -> String {
        let minted = token_builder(subject, Duration::from_secs(3600), grants)
            .mint(&self.signing_key)
            .expect("minting a token");
        record_token(&self.database, &minted).await;
        minted.token
    }

    /// Every upload, in any phase.
    pub async fn uploads(&self) -> Vec<Upload> {
        self.database
            .stuck_uploads(
                &UploadPhase::ALL,
                Timestamp::now().saturating_add(Duration::from_secs(3600)),
                100_000,
            )
            .await
            .expect("listing uploads")
    }

    /// Waits until no upload is in flight (each is done or failed), for at
    /// most `limit`, and returns them all.
    pub async fn settled_uploads(&self, limit: Duration) -> Vec<Upload> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let uploads = self.uploads().await;
            if uploads.iter().all(|upload| upload.phase.is_terminal()) {
                return uploads;
            }
            if tokio::time::Instant::now() > deadline {
                let stuck: Vec<String> = uploads
                    .iter()
                    .filter(|upload| !upload.phase.is_terminal())
                    .map(|upload| format!("{} ({})", upload.metadata.store_path, upload.phase))
                    .collect();
                panic!("uploads still in flight after {limit:?}: {stuck:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether each connection to the cluster's database is over TLS, by
    /// PostgreSQL's own account (`pg_stat_ssl`).
    pub async fn postgres_connections_over_tls(&self) -> Vec<bool> {
        sqlx::query_scalar(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database()",
        )
        .fetch_all(self.database.pool())
        .await
        .expect("reading pg_stat_ssl")
    }

    /// Whether each connection to the cluster's RabbitMQ virtual host is
    /// over TLS, by RabbitMQ's own account.
    pub async fn rabbitmq_connections_over_tls(&self) -> Vec<bool> {
        rabbitmq_connections_over_tls(&self.rabbitmq_dir, &self.vhost).await
    }

    /// The number of rows in `table` (a name from the schema).
    pub async fn count_rows(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(self.database.pool())
            .await
            .unwrap_or_else(|error| panic!("counting the rows of {table}: {error}"))
    }

    /// The keys of the cluster's objects in the bucket under `under`
    /// (`chunks/`, `staging/`), without the cluster's prefix.
    pub async fn object_keys(&self, under: &str) -> Vec<String> {
        let client = self.s3.client();
        let prefix = format!("{}{under}", self.prefix);
        let mut keys = Vec::new();
        let mut pages = client
            .list_objects_v2()
            .bucket(&self.s3.bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.unwrap_or_else(|error| panic!("listing {prefix}: {error:?}"));
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|object| object.key())
                    .map(|key| key[self.prefix.len()..].to_owned()),
            );
        }
        keys
    }

    /// Deletes one of the cluster's objects (a key from
    /// [`object_keys`](Self::object_keys)).
    pub async fn delete_object(&self, key: &str) {
        self.s3
            .client()
            .delete_object()
            .bucket(&self.s3.bucket)
            .key(format!("{}{key}", self.prefix))
            .send()
            .await
            .unwrap_or_else(|error| panic!("deleting {key}: {error:?}"));
    }

    /// The number of messages waiting in `queue` of the cluster's virtual
    /// host. Fails when the broker cannot say, including when the queue does
    /// not exist: the workers declare each work queue with its dead-letter
    /// queue, so a missing one is a fault, never "no messages".
    pub async fn queue_length(&self, queue: &str) -> u32 {
        let connection = amqp_connect_to(&self.amqp_url).await;
        let channel = connection.create_channel().await.expect("a channel");
        let declared = channel
            .queue_declare(
                queue,
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        let _ = connection.close(200, "done").await;
        declared
            .unwrap_or_else(|error| panic!("reading the length of queue {queue}: {error}"))
            .message_count()
    }

    /// Stops every process with SIGTERM and checks that each exits cleanly
    /// (running jobs finish or go back to the queue).
    pub fn stop(mut self) {
        for member in self.members.values_mut() {
            if let Some(process) = member.process.take() {
                process.stop();
            }
        }
    }
}

impl Drop for Cluster {
    /// After a failure, shows what each process logged, then (through each
    /// [`ServerProcess`]'s drop) kills it.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (name, member) in &mut self.members {
            if let Some(process) = member.process.as_mut() {
                let lines = process.lines();
                let shown = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "--- {name}: last {} log lines\n{}",
                    shown.len(),
                    shown.join("\n")
                );
            }
        }
    }
}

/// `url` (`amqp://…/%2f`) on virtual host `vhost` instead.
pub fn with_vhost(url: &str, vhost: &str) -> String {
    let authority_start = url.find("://").map_or(0, |index| index + 3);
    let base = match url[authority_start..].find('/') {
        Some(slash) => &url[..authority_start + slash],
        None => url,
    };
    format!("{base}/{vhost}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_virtual_host_replaces_the_default_one() {
        assert_eq!(
            super::with_vhost("amqp://guest:guest@127.0.0.1:5672/%2f", "larder-1"),
            "amqp://guest:guest@127.0.0.1:5672/larder-1"
        );
        assert_eq!(
            super::with_vhost("amqp://127.0.0.1:5672", "v"),
            "amqp://127.0.0.1:5672/v"
        );
    }
}
