//! Finding and using the real services that `ops/services.sh` started:
//! RabbitMQ, PostgreSQL and Garage (S3).
//!
//! `ops/test.sh` starts the services, exports the environment variables named
//! here and then runs the suite. A test that needs a service and finds its
//! variable unset panics with a message that says so: a missing service is a
//! failure, never a skip.
//!
//! Fault tests (restart RabbitMQ, stop Garage for a while, ...) must not
//! disturb the shared services every other test is using at the same moment:
//! they start a [`PrivateServices`] set of their own, and their names start
//! with `fault_` so that nextest runs them one at a time
//! (`.config/nextest.toml`). The shared-set helpers ([`restart_rabbitmq`],
//! [`stop_garage`], ...) are for a suite run on its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use larder_config::{S3Config, Secret};
use rand::Rng;
use sqlx::Connection;

/// AMQP URL of the RabbitMQ node, e.g. `amqp://guest:guest@127.0.0.1:PORT/%2f`.
pub const AMQP_URL: &str = "LARDER_TEST_AMQP_URL";
/// PostgreSQL server URL with a superuser, e.g.
/// `postgres://postgres@127.0.0.1:PORT/postgres`. Tests do not use its
/// database: they create their own with [`fresh_postgres_database`].
pub const POSTGRES_URL: &str = "LARDER_TEST_POSTGRES_URL";
/// Garage's S3 endpoint, e.g. `http://127.0.0.1:PORT` (path-style addressing).
pub const S3_ENDPOINT: &str = "LARDER_TEST_S3_ENDPOINT";
/// Garage's S3 region (`garage`).
pub const S3_REGION: &str = "LARDER_TEST_S3_REGION";
/// A bucket the key below may read, write and own.
pub const S3_BUCKET: &str = "LARDER_TEST_S3_BUCKET";
/// The access key id of that key.
pub const S3_ACCESS_KEY_ID: &str = "LARDER_TEST_S3_ACCESS_KEY_ID";
/// The secret of that key.
pub const S3_SECRET_ACCESS_KEY: &str = "LARDER_TEST_S3_SECRET_ACCESS_KEY";
/// The directory `ops/services.sh` keeps the services' data, logs and its
/// `env` file in; the fault subcommands take it as their argument.
pub const SERVICES_DIR: &str = "LARDER_TEST_SERVICES_DIR";

/// The throwaway CA `ops/services.sh` minted (PEM): it signed the
/// certificate every TLS listener below presents.
pub const TLS_CA_FILE: &str = "LARDER_TEST_TLS_CA_FILE";
/// A CA that signed nothing the services present: the wrong CA.
pub const TLS_OTHER_CA_FILE: &str = "LARDER_TEST_TLS_OTHER_CA_FILE";
/// The services' certificate (PEM), for `127.0.0.1` and `localhost`, signed
/// by [`TLS_CA_FILE`]; a test's own TLS listener may present it too.
pub const TLS_CERT_FILE: &str = "LARDER_TEST_TLS_CERT_FILE";
/// The private key of [`TLS_CERT_FILE`] (PEM).
pub const TLS_KEY_FILE: &str = "LARDER_TEST_TLS_KEY_FILE";
/// RabbitMQ's AMQPS listener, e.g. `amqps://guest:guest@127.0.0.1:PORT/%2f`.
pub const AMQPS_URL: &str = "LARDER_TEST_AMQPS_URL";
/// [`POSTGRES_URL`] over TLS, with `sslmode=verify-full` and
/// `sslrootcert=` [`TLS_CA_FILE`].
pub const POSTGRES_TLS_URL: &str = "LARDER_TEST_POSTGRES_TLS_URL";
/// Garage's S3 port behind a TLS terminator, e.g. `https://127.0.0.1:PORT`.
pub const S3_HTTPS_ENDPOINT: &str = "LARDER_TEST_S3_HTTPS_ENDPOINT";

/// The value of a harness environment variable.
///
/// # Panics
///
/// When the variable is unset or empty: the suite was not started through
/// `ops/test.sh`, or the service it names failed to start.
pub fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: run the suite through ops/test.sh"),
    }
}

/// [`AMQP_URL`].
pub fn amqp_url() -> String {
    required_env(AMQP_URL)
}

/// [`POSTGRES_URL`].
pub fn postgres_url() -> String {
    required_env(POSTGRES_URL)
}

/// [`AMQPS_URL`].
pub fn amqps_url() -> String {
    required_env(AMQPS_URL)
}

/// [`POSTGRES_TLS_URL`].
pub fn postgres_tls_url() -> String {
    required_env(POSTGRES_TLS_URL)
}

/// [`TLS_CA_FILE`].
pub fn tls_ca_file() -> PathBuf {
    PathBuf::from(required_env(TLS_CA_FILE))
}

/// [`TLS_OTHER_CA_FILE`].
pub fn tls_other_ca_file() -> PathBuf {
    PathBuf::from(required_env(TLS_OTHER_CA_FILE))
}

/// [`SERVICES_DIR`].
pub fn services_dir() -> PathBuf {
    PathBuf::from(required_env(SERVICES_DIR))
}

/// A name no other test (nor an earlier run) uses: `{prefix}-{16 hex digits}`.
/// For queues, object keys and the like, so tests sharing a service never meet.
pub fn unique_name(prefix: &str) -> String {
    let suffix: u64 = rand::thread_rng().gen();
    format!("{prefix}-{suffix:016x}")
}

/// Creates an empty PostgreSQL database with a random name and returns its URL.
///
/// Every test gets its own database, so tests run in parallel without seeing
/// each other's rows. The databases are not dropped: the whole cluster is
/// thrown away when `ops/test.sh` stops the services.
pub async fn fresh_postgres_database() -> String {
    fresh_postgres_database_on(&postgres_url()).await
}

/// [`fresh_postgres_database`] on the server behind `admin_url` (a superuser's
/// URL, e.g. [`PrivateServices::postgres_url`]).
pub async fn fresh_postgres_database_on(admin_url: &str) -> String {
    // Letters, digits and underscores only, so the name needs no quoting rules
    // beyond the double quotes below.
    let name = unique_name("larder_test").replace('-', "_");
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|error| panic!("connecting to PostgreSQL at {admin_url}: {error}"));
    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|error| panic!("creating database {name}: {error}"));
    // A failed close only leaks one connection of a throwaway server.
    let _ = admin.close().await;
    url_with_database(admin_url, &name)
}

/// `url` with its database (the path) replaced by `database`; the query
/// string, if any, is kept.
fn url_with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |index| index + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// Opens a connection to the harness's RabbitMQ node.
///
/// lapin's own executor and reactor drive the connection, so this works under
/// any async runtime.
pub async fn amqp_connect() -> lapin::Connection {
    amqp_connect_to(&amqp_url()).await
}

/// [`amqp_connect`] to the broker at `url`; an `amqps://` URL trusts the
/// throwaway CA ([`TLS_CA_FILE`]).
pub async fn amqp_connect_to(url: &str) -> lapin::Connection {
    let properties = lapin::ConnectionProperties::default()
        .with_connection_name("larder-tests".to_owned().into());
    let mut tls = lapin::tcp::OwnedTLSConfig::default();
    if url.starts_with("amqps://") {
        larder_tls::install_crypto_provider();
        let ca = tls_ca_file();
        tls.cert_chain = Some(
            std::fs::read_to_string(&ca)
                .unwrap_or_else(|error| panic!("reading {}: {error}", ca.display())),
        );
    }
    lapin::Connection::connect_with_config(url, properties, tls)
        .await
        .unwrap_or_else(|error| panic!("connecting to RabbitMQ at {url}: {error}"))
}

/// Whether each connection RabbitMQ has open to virtual host `vhost` is
/// over TLS, by `rabbitmqctl list_connections` on the set in `dir`.
pub async fn rabbitmq_connections_over_tls(dir: &Path, vhost: &str) -> Vec<bool> {
    let listed = services_ctl_in(
        dir,
        &[
            "rabbitmqctl",
            "list_connections",
            "--no-table-headers",
            "vhost",
            "ssl",
        ],
    )
    .await;
    listed
        .lines()
        .filter_map(|line| line.rsplit_once('\t'))
        .filter(|(listed_vhost, _)| *listed_vhost == vhost)
        .map(|(_, ssl)| ssl == "true")
        .collect()
}

/// Creates virtual host `vhost` on the set in `dir`, open to `guest`.
pub async fn add_rabbitmq_vhost(dir: &Path, vhost: &str) {
    services_ctl_in(dir, &["rabbitmqctl", "add_vhost", vhost]).await;
    services_ctl_in(
        dir,
        &[
            "rabbitmqctl",
            "set_permissions",
            "-p",
            vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ],
    )
    .await;
}

/// Everything needed to reach the harness's Garage bucket.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub endpoint: String,
    /// The same S3 port behind the TLS terminator.
    pub https_endpoint: String,
    /// The CA that signed the terminator's certificate.
    pub ca_file: PathBuf,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl S3Settings {
    /// Reads the `LARDER_TEST_S3_*` variables, panicking on a missing one.
    pub fn from_env() -> Self {
        Self::from_lookup(required_env)
    }

    fn from_lookup(get: impl Fn(&str) -> String) -> Self {
        Self {
            endpoint: get(S3_ENDPOINT),
            https_endpoint: get(S3_HTTPS_ENDPOINT),
            ca_file: PathBuf::from(get(TLS_CA_FILE)),
            region: get(S3_REGION),
            bucket: get(S3_BUCKET),
            access_key_id: get(S3_ACCESS_KEY_ID),
            secret_access_key: get(S3_SECRET_ACCESS_KEY),
        }
    }

    /// An S3 client for these settings: path-style addressing, static
    /// credentials and a plain-HTTP hyper client (Garage here speaks no TLS).
    pub fn client(&self) -> aws_sdk_s3::Client {
        let credentials = Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "larder-tests",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new(self.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(true)
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }
}

impl S3Settings {
    /// Larder's `[storage]` for this bucket under `prefix`, over plain HTTP
    /// (path-style, the key in the config).
    pub fn storage_config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: Some(self.region.clone()),
            bucket: self.bucket.clone(),
            access_key_id: Some(self.access_key_id.clone()),
            secret_access_key: Some(Secret::new(self.secret_access_key.clone())),
            prefix: prefix.to_owned(),
            force_path_style: None,
            ca_file: None,
            staging_path: None,
            request_timeout: None,
        }
    }

    /// [`storage_config`](Self::storage_config) over HTTPS through the TLS
    /// terminator, trusting the throwaway CA through `ca-file`.
    pub fn tls_storage_config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.https_endpoint.clone()),
            ca_file: Some(self.ca_file.clone()),
            ..self.storage_config(prefix)
        }
    }
}

/// An S3 client for the harness's Garage, from the environment; the bucket to
/// use is [`S3Settings::from_env`]`().bucket`.
pub fn s3_client() -> aws_sdk_s3::Client {
    S3Settings::from_env().client()
}

/// The path of `ops/services.sh` in the checkout this crate was built from.
pub fn services_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/services.sh")
}

/// Runs `ops/services.sh SUBCOMMAND DIR` on the shared services and panics,
/// with the script's output, if it fails. Subcommands: `restart-rabbitmq`,
/// `stop-rabbitmq`, `start-rabbitmq`, the same three for `postgres` and
/// `garage`, and `status`.
///
/// A service comes back on the same port with the same data, so URLs and
/// clients made before stay valid (after their reconnects).
pub async fn services_ctl(subcommand: &str) {
    services_ctl_in(&services_dir(), &[subcommand]).await;
}

/// Runs `ops/services.sh ARGS[0] DIR ARGS[1..]` on the set in `dir` (the
/// shared one is [`services_dir`]) and panics, with the script's output, if
/// it fails; e.g. `["rabbitmqctl", "add_vhost", NAME]`. Returns what it
/// printed on stdout.
pub async fn services_ctl_in(dir: &Path, args: &[&str]) -> String {
    let script = services_script();
    let mut command = tokio::process::Command::new("bash");
    command.arg(&script).arg(args[0]).arg(dir).args(&args[1..]);
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|error| panic!("running {}: {error}", script.display()));
    assert!(
        output.status.success(),
        "ops/services.sh {} {} {} failed ({}):\n{}{}",
        args[0],
        dir.display(),
        args[1..].join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Stops the RabbitMQ node cleanly and starts it again; returns once it
/// accepts AMQP connections again.
pub async fn restart_rabbitmq() {
    services_ctl("restart-rabbitmq").await;
}

/// Stops PostgreSQL (fast shutdown: open connections are cut) and starts it
/// again; returns once it accepts connections.
pub async fn restart_postgres() {
    services_ctl("restart-postgres").await;
}

/// Stops Garage: S3 requests fail until [`start_garage`].
pub async fn stop_garage() {
    services_ctl("stop-garage").await;
}

/// Starts Garage again after [`stop_garage`]; returns once it serves S3.
pub async fn start_garage() {
    services_ctl("start-garage").await;
}

/// A set of services started for one test alone, in a temporary directory:
/// what a fault test restarts or stops without disturbing the tests that share
/// the harness's services.
///
/// End the test with [`PrivateServices::stop`]. Dropping the set stops it too,
/// but blocks the runtime meanwhile, so the clients' connections cannot close
/// and Garage, which waits for them, takes seconds longer to stop.
///
/// Starting RabbitMQ takes seconds (more on a busy machine); PostgreSQL and
/// Garage take about one each. Name the test `fault_*` so nextest runs such
/// tests one at a time.
pub struct PrivateServices {
    vars: HashMap<String, String>,
    stopped: bool,
    // Dropped after `Drop::drop` has stopped the services.
    dir: tempfile::TempDir,
}

impl PrivateServices {
    /// Starts the named services (`"rabbitmq"`, `"postgres"`, `"garage"`)
    /// and returns once each one answers.
    pub async fn start(services: &[&str]) -> Self {
        // Inside the shared set's directory when there is one: stopping the
        // shared set (as ops/test.sh does on any exit) then also stops a
        // private set whose test was killed before it could stop it.
        let parent = match std::env::var_os(SERVICES_DIR) {
            Some(shared) => PathBuf::from(shared).join("private"),
            None => std::env::temp_dir(),
        };
        std::fs::create_dir_all(&parent)
            .unwrap_or_else(|error| panic!("creating {}: {error}", parent.display()));
        let dir = tempfile::Builder::new()
            .prefix("larder-private-services.")
            .tempdir_in(&parent)
            .unwrap_or_else(|error| {
                panic!("creating a directory in {}: {error}", parent.display())
            });
        let mut args = vec!["start"];
        args.extend_from_slice(services);
        services_ctl_in(dir.path(), &args).await;
        let vars_file = dir.path().join("vars");
        let text = std::fs::read_to_string(&vars_file)
            .unwrap_or_else(|error| panic!("reading {}: {error}", vars_file.display()));
        let vars = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        Self {
            vars,
            stopped: false,
            dir,
        }
    }

    /// The directory holding the services' data, logs and `env` file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// One of the `LARDER_TEST_*` variables of this set (the constants in this
    /// module name them), e.g. `LARDER_TEST_RABBITMQ_PORT`.
    ///
    /// # Panics
    ///
    /// When the set does not have it: the service was not started.
    pub fn var(&self, name: &str) -> String {
        self.vars
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not set: was its service started in this set?"))
    }

    /// Whether this set runs `service` (`"rabbitmq"`, `"postgres"`, `"garage"`).
    pub fn runs(&self, service: &str) -> bool {
        let variable = match service {
            "rabbitmq" => AMQP_URL,
            "postgres" => POSTGRES_URL,
            "garage" => S3_ENDPOINT,
            other => panic!("no service {other:?} in a private set"),
        };
        self.vars.contains_key(variable)
    }

    /// The AMQP URL of this set's RabbitMQ.
    pub fn amqp_url(&self) -> String {
        self.var(AMQP_URL)
    }

    /// The superuser URL of this set's PostgreSQL.
    pub fn postgres_url(&self) -> String {
        self.var(POSTGRES_URL)
    }

    /// The settings of this set's Garage bucket.
    pub fn s3_settings(&self) -> S3Settings {
        S3Settings::from_lookup(|name| self.var(name))
    }

    /// Runs an `ops/services.sh` subcommand on this set, e.g.
    /// `restart-rabbitmq`, `stop-garage`, `start-garage`.
    pub async fn ctl(&self, subcommand: &str) {
        services_ctl_in(self.dir(), &[subcommand]).await;
    }

    /// Stops every service of the set and removes its directory.
    pub async fn stop(mut self) {
        services_ctl_in(self.dir(), &["stop"]).await;
        self.stopped = true;
    }
}

impl Drop for PrivateServices {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // Blocking, and best effort: a drop cannot await, and a failed stop
        // (its stragglers are killed anyway) must not hide the test's result.
        let status = std::process::Command::new("bash")
            .arg(services_script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
        if !matches!(status, Ok(status) if status.success()) {
            eprintln!(
                "stopping the private services in {} failed: {status:?}",
                self.dir.path().display()
            );
        }
    }
}

#[cfg(test)]
mod test {
    use super::url_with_database;

    #[test]
    fn url_with_database_replaces_only_the_path() {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            url_with_database("postgres://u:p@host:1/db?sslmode=disable", "t2"),
            "postgres://u:p@host:1/t2?sslmode=disable"
        );
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432", "t3"),
            "postgres://postgres@127.0.0.1:5432/t3"
        );
    }
}
