//! The harness's real services: RabbitMQ, PostgreSQL and Garage (S3).
//!
//! These tests prove that `ops/services.sh` started each service, that the
//! environment contract in `tests::services` reaches it, and that the client
//! libraries Larder builds on speak to it the way Larder will: persistent
//! messages with publisher confirms, a fresh database per test, and
//! path-style S3 with multipart uploads.

use std::time::Duration;

use anyhow::{ensure, Context};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tests::services;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// S3's smallest part size (except for the last part of an upload).
const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn rabbitmq_confirms_a_persistent_message_and_delivers_it() -> anyhow::Result<()> {
    let connection = services::amqp_connect().await;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let queue = services::unique_name("larder-it-services");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(&queue, durable, FieldTable::default())
        .await?;

    let payload = b"larder harness: persistent, confirmed".to_vec();
    let confirmation = channel
        .basic_publish(
            "",
            &queue,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &payload,
            BasicProperties::default().with_delivery_mode(PERSISTENT),
        )
        .await?
        .await?;
    ensure!(
        confirmation.is_ack(),
        "the broker did not ack the publish: {confirmation:?}"
    );
    // A mandatory message the broker could not route comes back inside the ack.
    ensure!(
        confirmation.take_message().is_none(),
        "the broker returned the message as unroutable"
    );

    let mut consumer = channel
        .basic_consume(
            &queue,
            "larder-it-services",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .context("no delivery within 30 s")?
        .context("the consumer stream ended")??;
    assert_eq!(delivery.data, payload);
    assert_eq!(delivery.properties.delivery_mode(), &Some(PERSISTENT));
    assert!(!delivery.redelivered);
    delivery.ack(BasicAckOptions::default()).await?;

    // The ack removed the message: deleting the queue reports it empty.
    let remaining = channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await?;
    assert_eq!(remaining, 0, "messages left in {queue} after the ack");
    connection.close(200, "done").await?;
    Ok(())
}

#[tokio::test]
async fn postgres_gives_each_test_a_fresh_database() -> anyhow::Result<()> {
    let url = services::fresh_postgres_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;

    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(tables, 0, "a fresh database already has tables");

    sqlx::query("CREATE TABLE harness_check (id BIGINT PRIMARY KEY, name TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    for (id, name) in [(1_i64, "one"), (2, "two")] {
        sqlx::query("INSERT INTO harness_check (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(name)
            .execute(&pool)
            .await?;
    }
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, name FROM harness_check ORDER BY id")
        .fetch_all(&pool)
        .await?;
    assert_eq!(rows, [(1, "one".to_owned()), (2, "two".to_owned())]);

    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await?;
    assert!(
        url.ends_with(&format!("/{database}")),
        "connected to {database}, not the database in {url}"
    );
    pool.close().await;
    Ok(())
}

#[tokio::test]
async fn garage_puts_gets_lists_and_deletes_an_object() -> anyhow::Result<()> {
    let settings = services::S3Settings::from_env();
    let s3 = settings.client();
    let bucket = settings.bucket.as_str();
    let prefix = services::unique_name("it-services");
    let key = format!("{prefix}/hello.txt");
    let body = b"hello from the larder harness".to_vec();

    s3.put_object()
        .bucket(bucket)
        .key(&key)
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .with_context(|| format!("PUT {key} to {}", settings.endpoint))?;

    let object = s3.get_object().bucket(bucket).key(&key).send().await?;
    assert_eq!(object.content_length(), Some(body.len() as i64));
    assert_eq!(object.body.collect().await?.into_bytes().as_ref(), body);

    let listing = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(format!("{prefix}/"))
        .send()
        .await?;
    let keys: Vec<&str> = listing.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, [key.as_str()]);

    s3.delete_object().bucket(bucket).key(&key).send().await?;
    let missing = s3.get_object().bucket(bucket).key(&key).send().await;
    let error = missing.expect_err("the object is still there after DELETE");
    assert!(
        error
            .as_service_error()
            .is_some_and(|error| error.is_no_such_key()),
        "expected NoSuchKey, got {error:?}"
    );
    Ok(())
}

#[tokio::test]
async fn garage_assembles_a_multipart_upload() -> anyhow::Result<()> {
    let settings = services::S3Settings::from_env();
    let s3 = settings.client();
    let bucket = settings.bucket.as_str();
    let key = format!("{}/multipart.bin", services::unique_name("it-services"));

    // Two full 5 MiB parts and a short last one; distinct contents so a
    // misordered assembly cannot compare equal.
    let parts: Vec<Vec<u8>> = [(5 * MIB, 1_u64), (5 * MIB, 2), (MIB + 7, 3)]
        .into_iter()
        .map(|(len, seed)| pseudo_random_bytes(len, seed))
        .collect();

    let upload = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(&key)
        .send()
        .await?;
    let upload_id = upload.upload_id().context("no upload id")?;
    let mut completed = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        let part_number = i32::try_from(index + 1)?;
        let uploaded = s3
            .upload_part()
            .bucket(bucket)
            .key(&key)
            .upload_id(upload_id)
            .part_number(part_number)
            .body(ByteStream::from(part.clone()))
            .send()
            .await
            .with_context(|| format!("uploading part {part_number}"))?;
        completed.push(
            CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(uploaded.e_tag().map(str::to_owned))
                .build(),
        );
    }
    s3.complete_multipart_upload()
        .bucket(bucket)
        .key(&key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send()
        .await?;

    let expected = parts.concat();
    let object = s3.get_object().bucket(bucket).key(&key).send().await?;
    assert_eq!(object.content_length(), Some(expected.len() as i64));
    let read_back = object.body.collect().await?.into_bytes();
    assert!(
        read_back.as_ref() == expected.as_slice(),
        "the assembled object differs from its parts ({} bytes read, {} expected)",
        read_back.len(),
        expected.len()
    );

    s3.delete_object().bucket(bucket).key(&key).send().await?;
    Ok(())
}

/// The fault machinery later fault tests build on: a private set of services
/// that survives `restart-*` with its data, and is gone after `stop`.
#[tokio::test]
async fn fault_private_services_keep_their_data_across_restarts() -> anyhow::Result<()> {
    let private = services::PrivateServices::start(&["rabbitmq", "postgres", "garage"]).await;

    // Before: a persistent message in a durable queue, a row, an object.
    let queue = services::unique_name("larder-it-fault");
    let connection = services::amqp_connect_to(&private.amqp_url()).await;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(&queue, durable, FieldTable::default())
        .await?;
    let confirmation = channel
        .basic_publish(
            "",
            &queue,
            BasicPublishOptions::default(),
            b"survives a restart",
            BasicProperties::default().with_delivery_mode(PERSISTENT),
        )
        .await?
        .await?;
    ensure!(confirmation.is_ack(), "publish not acked: {confirmation:?}");
    // The broker is about to go away; the error of closing is of no interest.
    let _ = connection.close(200, "restarting").await;

    let database_url = services::fresh_postgres_database_on(&private.postgres_url()).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url)
        .await?;
    sqlx::query("CREATE TABLE kept (id BIGINT PRIMARY KEY)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO kept (id) VALUES (42)")
        .execute(&pool)
        .await?;
    pool.close().await;

    let s3_settings = private.s3_settings();
    let key = services::unique_name("it-fault");
    s3_settings
        .client()
        .put_object()
        .bucket(&s3_settings.bucket)
        .key(&key)
        .body(ByteStream::from_static(b"kept"))
        .send()
        .await?;

    private.ctl("restart-rabbitmq").await;
    private.ctl("restart-postgres").await;
    private.ctl("stop-garage").await;
    // Without retries: the SDK would otherwise back off and retry the refused
    // connection for seconds before giving up.
    let no_retries = s3_settings
        .client()
        .config()
        .to_builder()
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    let refused = aws_sdk_s3::Client::from_conf(no_retries)
        .get_object()
        .bucket(&s3_settings.bucket)
        .key(&key)
        .send()
        .await;
    ensure!(refused.is_err(), "Garage answered while stopped");
    private.ctl("start-garage").await;

    // After: everything is still there, on the same addresses.
    let connection = services::amqp_connect_to(&private.amqp_url()).await;
    let channel = connection.create_channel().await?;
    let message = channel
        .basic_get(&queue, lapin::options::BasicGetOptions { no_ack: true })
        .await?
        .context("the persistent message did not survive the restart")?;
    assert_eq!(message.delivery.data, b"survives a restart");
    connection.close(200, "done").await?;

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url)
        .await?;
    let id: i64 = sqlx::query_scalar("SELECT id FROM kept")
        .fetch_one(&pool)
        .await?;
    assert_eq!(id, 42);
    pool.close().await;

    let object = s3_settings
        .client()
        .get_object()
        .bucket(&s3_settings.bucket)
        .key(&key)
        .send()
        .await?;
    assert_eq!(object.body.collect().await?.into_bytes().as_ref(), b"kept");

    // Stopping the set stops its services: nothing answers any more.
    let amqp_port = private.var("LARDER_TEST_RABBITMQ_PORT");
    private.stop().await;
    let listener = tokio::net::TcpStream::connect(format!("127.0.0.1:{amqp_port}")).await;
    ensure!(listener.is_err(), "RabbitMQ still listens after the stop");
    Ok(())
}

/// `len` bytes from a xorshift generator: cheap, deterministic per `seed`, and
/// incompressible enough that no layer can shortcut the comparison.
fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// `ops/test.sh` refuses to run when a phase it should run has no script,
/// before anything starts: a full run without `ops/fuzz.sh`, any run
/// without `ops/services.sh`. Run on a copy of `ops/` whose `install.sh`
/// is a stub exiting 99, so a check that let the run go on shows as that
/// status (and never starts a second suite).
#[test]
fn the_test_command_fails_when_a_phase_script_is_missing() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = |present: &[&str], args: &[&str]| {
        let dir = tempfile::tempdir().expect("a directory");
        let ops = dir.path().join("ops");
        std::fs::create_dir(&ops).expect("ops/");
        std::fs::copy(repo.join("ops/test.sh"), ops.join("test.sh")).expect("copying test.sh");
        for script in present {
            std::fs::write(ops.join(script), "exit 99\n").expect("a stub script");
        }
        let output = std::process::Command::new("bash")
            .arg(ops.join("test.sh"))
            .args(args)
            .output()
            .expect("running ops/test.sh");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (status, stderr) = run(&["install.sh", "services.sh"], &[]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("ops/fuzz.sh is missing"), "{stderr}");
    let (status, stderr) = run(&["install.sh", "fuzz.sh"], &["-E", "test(x)"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("ops/services.sh is missing"), "{stderr}");
    // With every script there, the run goes on (to the stub install).
    let (status, stderr) = run(&["install.sh", "services.sh", "fuzz.sh"], &[]);
    assert_eq!(status, Some(99), "{stderr}");
    // A subset needs no fuzz run.
    let (status, stderr) = run(&["install.sh", "services.sh"], &["-E", "test(x)"]);
    assert_eq!(status, Some(99), "{stderr}");
}
