//! S3 over HTTPS, through the TLS terminator in front of Garage, and the
//! AWS SDK's credentials chain. The conformance suite over HTTPS with the
//! right CA is `storage::s3_https::…`.

use std::path::Path;

use larder_config::{S3Config, StorageConfig};
use larder_storage::{S3Storage, Storage};
use tests::process::{service_command, ServerProcess};
use tests::services::{self, S3Settings};

use super::{one_line_failure, write_server_config};

/// Opens S3 storage over HTTPS with `ca_file` and asks the bucket for a
/// `HeadBucket`; returns the error the check gave.
async fn https_check_error(ca_file: Option<&Path>) -> String {
    let config = S3Config {
        ca_file: ca_file.map(Path::to_owned),
        ..S3Settings::from_env().tls_storage_config(&services::unique_name("tls"))
    };
    let storage = S3Storage::new(&config)
        .await
        .unwrap_or_else(|error| panic!("opening S3 storage: {error}"));
    storage
        .check()
        .await
        .expect_err("the terminator's certificate is not trusted")
        .to_string()
}

/// Without the CA the terminator's certificate is not trusted: the error
/// names the certificate problem and the setting that fixes it. (Were the
/// endpoint not TLS, or the CA trusted anyway, the check would pass.)
#[tokio::test]
async fn s3_over_https_without_the_ca_fails_saying_why() {
    let message = https_check_error(None).await;
    assert!(message.starts_with("S3 HeadBucket of bucket "), "{message}");
    assert!(
        message.contains("invalid peer certificate: UnknownIssuer"),
        "{message}"
    );
    assert!(message.contains("[storage] ca-file"), "{message}");
}

/// A CA file with another CA in it is no better.
#[tokio::test]
async fn s3_over_https_with_the_wrong_ca_fails_saying_why() {
    let message = https_check_error(Some(&services::tls_other_ca_file())).await;
    assert!(
        message.contains("invalid peer certificate: UnknownIssuer"),
        "{message}"
    );
}

/// The CA given through `SSL_CERT_FILE` instead of `ca-file` works too, for
/// a process whose environment names it (the system's roots are replaced,
/// as for every rustls-native-certs client): `ingest-api` on S3 over HTTPS
/// answers `/readyz` once its `HeadBucket` passed.
#[tokio::test]
async fn s3_over_https_trusts_ssl_cert_file() {
    let dir = tempfile::tempdir().expect("a directory");
    let settings = S3Settings::from_env();
    let storage = S3Config {
        ca_file: None,
        ..settings.tls_storage_config(&services::unique_name("tls"))
    };
    let config = write_server_config(dir.path(), StorageConfig::S3(storage));
    let ca = services::tls_ca_file();
    let server =
        ServerProcess::start_with(&config, &[("SSL_CERT_FILE", ca.to_str().expect("UTF-8"))]);
    assert_ready(server).await;
}

/// Waits for the server's "serving" line, then checks that `/readyz`
/// answers 200: the database, the queue and the storage (a `HeadBucket`
/// with the credentials it found) all answer.
async fn assert_ready(mut server: ServerProcess) {
    let address = server.serving_address();
    let response = reqwest::get(format!("http://{address}/readyz"))
        .await
        .expect("GET /readyz");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{body}");
    server.stop();
}

/// The environment of an `ingest-api` that finds no AWS credentials or
/// region anywhere but where a test puts them: no profile files, no
/// instance metadata.
fn isolated_aws_environment(dir: &Path) -> Vec<(String, String)> {
    vec![
        (
            "AWS_CONFIG_FILE".to_owned(),
            dir.join("no-config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".to_owned(),
            dir.join("no-credentials").display().to_string(),
        ),
        ("AWS_EC2_METADATA_DISABLED".to_owned(), "true".to_owned()),
    ]
}

/// With no key in the config, credentials come from the AWS SDK's chain:
/// from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, and from a profile's
/// `credential_process` (the region from `AWS_REGION`). Garage refuses a
/// request signed with anything but its key, so `/readyz` passing means
/// the chain's credentials signed it.
#[tokio::test]
async fn s3_credentials_come_from_the_sdk_chain_without_a_configured_key() {
    let dir = tempfile::tempdir().expect("a directory");
    let settings = S3Settings::from_env();
    let storage = S3Config {
        region: None,
        access_key_id: None,
        secret_access_key: None,
        ..settings.tls_storage_config(&services::unique_name("chain"))
    };
    let config = write_server_config(dir.path(), StorageConfig::S3(storage));
    let mut environment = isolated_aws_environment(dir.path());
    environment.push(("AWS_REGION".to_owned(), settings.region.clone()));

    let mut from_variables = environment.clone();
    from_variables.push((
        "AWS_ACCESS_KEY_ID".to_owned(),
        settings.access_key_id.clone(),
    ));
    from_variables.push((
        "AWS_SECRET_ACCESS_KEY".to_owned(),
        settings.secret_access_key.clone(),
    ));
    assert_ready(start(&config, &from_variables)).await;

    let process = dir.path().join("credentials.sh");
    std::fs::write(
        &process,
        format!(
            "#!/bin/sh\necho '{{\"Version\": 1, \"AccessKeyId\": \"{}\", \"SecretAccessKey\": \"{}\"}}'\n",
            settings.access_key_id, settings.secret_access_key
        ),
    )
    .expect("writing the credential process");
    std::fs::set_permissions(
        &process,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("making it executable");
    let profile = dir.path().join("aws-config");
    std::fs::write(
        &profile,
        format!("[default]\ncredential_process = {}\n", process.display()),
    )
    .expect("writing the profile");
    let mut from_profile = environment;
    from_profile[0].1 = profile.display().to_string();
    assert_ready(start(&config, &from_profile)).await;
}

fn start(config: &Path, environment: &[(String, String)]) -> ServerProcess {
    let environment: Vec<(&str, &str)> = environment
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    ServerProcess::start_with(config, &environment)
}

/// No key configured and none in the chain: the server does not start,
/// and says why in one line on stderr. (If the chain were not consulted at
/// start, it would start and fail on its first upload.)
#[tokio::test]
async fn s3_without_any_credentials_stops_at_start_saying_why() {
    let dir = tempfile::tempdir().expect("a directory");
    let storage = S3Config {
        access_key_id: None,
        secret_access_key: None,
        ..S3Settings::from_env().tls_storage_config(&services::unique_name("chain"))
    };
    let config = write_server_config(dir.path(), StorageConfig::S3(storage));
    let mut command = service_command("ingest-api");
    command
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .envs(isolated_aws_environment(dir.path()))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE");
    let line = one_line_failure(command, "ingest-api: storage: ");
    assert!(
        line.contains("no credentials: [storage] access-key-id and secret-access-key are unset"),
        "{line}"
    );
    // What the chain tried, so the operator sees which source to fix.
    assert!(line.contains("Environment: "), "{line}");
}
