//! PostgreSQL over TLS: `sslmode` and `sslrootcert` in the database URL,
//! against the suite's PostgreSQL (`ssl = on`, a certificate from the
//! throwaway CA for 127.0.0.1 and localhost).

use larder_config::StorageConfig;
use larder_db::Database;
use tests::process::service_command;
use tests::services;

use super::{one_line_failure, write_server_config};

/// `url` with its query string replaced by `query`.
fn with_query(url: &str, query: &str) -> String {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    format!("{base}?{query}")
}

/// Whether the pool's connection to the server is encrypted, by the
/// server's own account (`pg_stat_ssl` of this backend).
async fn connection_is_tls(database: &Database) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(database.pool())
        .await
        .expect("reading pg_stat_ssl")
}

/// `verify-full` with the throwaway CA as `sslrootcert`: the store layer
/// connects, migrates and works over TLS, as the server itself says. With
/// TLS off on either side it would fail to connect (verify-full never falls
/// back to plain) or `pg_stat_ssl` would say false.
#[tokio::test]
async fn postgres_verify_full_with_the_ca_connects_over_tls() {
    let url = services::fresh_postgres_database_on(&services::postgres_tls_url()).await;
    assert!(url.contains("sslmode=verify-full"), "{url}");
    let database = Database::connect(&url)
        .await
        .expect("connecting with verify-full");
    database.migrate().await.expect("migrating over TLS");
    assert!(
        connection_is_tls(&database).await,
        "the connection is encrypted"
    );
    database.ping().await.expect("a query over TLS");
}

/// The weaker modes work too: `require` (encrypted, certificate not
/// checked, as libpq does without a root certificate) and `verify-ca` (the
/// chain checked, not the host name).
#[tokio::test]
async fn postgres_require_and_verify_ca_connect_over_tls() {
    let admin = services::postgres_tls_url();
    let ca = services::tls_ca_file();
    for query in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    ] {
        let url = with_query(&admin, &query);
        let database = Database::connect(&url)
            .await
            .unwrap_or_else(|error| panic!("connecting with {query}: {error}"));
        assert!(connection_is_tls(&database).await, "{query}: encrypted");
    }
}

/// `verify-full` against a CA that did not sign the server's certificate:
/// `ingest-api --mode migrate` fails with one line naming the certificate
/// problem, and no plain connection is made instead.
#[tokio::test]
async fn postgres_with_the_wrong_ca_fails_with_a_clear_error() {
    let url = with_query(
        &services::postgres_tls_url(),
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            services::tls_other_ca_file().display()
        ),
    );
    let error = Database::connect(&url)
        .await
        .expect_err("an unknown issuer");
    let shown = larder_service::service::error_chain(&error);
    assert!(
        shown.contains("invalid peer certificate: UnknownIssuer"),
        "{shown}"
    );

    let dir = tempfile::tempdir().expect("a directory");
    let config = write_server_config(
        dir.path(),
        StorageConfig::Local {
            path: dir.path().join("storage"),
        },
    );
    let mut command = service_command("ingest-api");
    command
        .arg("--config")
        .arg(&config)
        .args(["--mode", "migrate"])
        .env("LARDER_DATABASE__URL", &url);
    let line = one_line_failure(command, "ingest-api: database: ");
    assert!(
        line.contains("invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
}
