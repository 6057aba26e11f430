//! TLS to the services Larder uses and in front of it (issue #13), against
//! the suite's real services with the throwaway CA `ops/services.sh` mints:
//!
//! - `s3`: S3 over HTTPS through the TLS terminator in front of Garage —
//!   refused without the CA and with the wrong one, with a message saying
//!   why — and the AWS SDK's credentials chain when no key is configured;
//!   the storage conformance suite also runs over HTTPS
//!   (`storage::s3_https::…`);
//! - `postgres`: `sslmode=verify-full` (and `require`, `verify-ca`) against
//!   the suite's PostgreSQL, proved to be TLS by `pg_stat_ssl`; a wrong CA
//!   is a clear error from `ingest-api`;
//! - `amqp`: `amqps://` with a CA file, proved to be TLS by RabbitMQ's own
//!   view of the connection; the queue conformance suite also runs over
//!   TLS (`queue::amqps::…`);
//! - `proxy`: nginx with `ops/nginx/larder.conf` in front of a real server:
//!   `nix copy --to https://…`, substitution over https with signatures
//!   required, `larder login/push/use` with the CA given only through
//!   `SSL_CERT_FILE`, and a 100 MiB NAR through the proxy.
//!
//! The whole distributed topology over TLS is `distributed::tls`.

mod amqp;
mod postgres;
mod proxy;
mod s3;

use std::path::Path;
use std::process::{Command, Stdio};

use larder_config::{
    AuthConfig, DatabaseConfig, LogConfig, QueueConfig, Secret, ServerConfig, StorageConfig,
};

/// A single-machine server's config (SQLite in `dir`, embedded queue) on
/// `storage`, written to `dir/server.toml`, whose path is returned.
fn write_server_config(dir: &Path, storage: StorageConfig) -> std::path::PathBuf {
    let config = ServerConfig {
        listen: ServerConfig::default_listen(),
        api_endpoint: None,
        database: DatabaseConfig {
            url: Secret::new(format!(
                "sqlite://{}?mode=rwc",
                dir.join("server.db").display()
            )),
        },
        storage,
        auth: AuthConfig {
            hs256_secret_base64: Some(Secret::new("c2VjcmV0LWZvci10ZXN0cy1vZi10bHMtMTIzNDU2Nzg=")),
            rs256_private_key_pem: None,
        },
        ingest: Default::default(),
        http: Default::default(),
        pipeline: Default::default(),
        gc: Default::default(),
        queue: QueueConfig::Embedded,
        quota: Default::default(),
        ops: Default::default(),
        log: LogConfig::default(),
    };
    let path = dir.join("server.toml");
    std::fs::write(&path, config.to_toml()).expect("writing the server's config");
    path
}

/// Runs `ingest-api` (`command`, stdout discarded), which must stop with
/// exit status 1 and one line on stderr starting with `prefix` (what an
/// operator sees of a failed start); returns that line.
fn one_line_failure(mut command: Command, prefix: &str) -> String {
    let output = command
        .stdout(Stdio::null())
        .output()
        .expect("running ingest-api");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with(prefix), "{stderr}");
    lines[0].to_owned()
}
