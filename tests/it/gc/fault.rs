//! `gc-scheduler` killed with SIGKILL in the middle of a run: the next run
//! completes the work and leaves database and storage consistent.

use std::time::Duration;

use sqlx::Row;

use larder_api::duration::HumanDuration;
use larder_config::GcConfig;
use tests::server::{binary, TestServer, TestServerOptions};

use super::end_to_end::{age_objects, chunk_objects, run_gc_once, set_retention};
use super::{fake_store_path, file_nar, plain_metadata};

/// Paths to collect: enough, one row per round trip, for the run to last.
const PATHS: i64 = 1500;

async fn count(server: &TestServer, sql: &str) -> i64 {
    let mut connection = server
        .database()
        .pool()
        .acquire()
        .await
        .expect("a connection");
    count_on(&mut connection, sql).await
}

async fn count_on(connection: &mut sqlx::pool::PoolConnection<sqlx::Any>, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(&mut **connection)
        .await
        .expect("counting rows")
        .try_get::<i64, _>(0)
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_gc_killed_mid_run_leaves_a_state_the_next_run_completes() {
    let server = TestServer::start(TestServerOptions {
        gc: GcConfig {
            orphan_grace: HumanDuration::from_secs(0),
            page_size: 1,
            delete_concurrency: 1,
            ..GcConfig::default()
        },
        ..TestServerOptions::default()
    })
    .await;
    server.create_cache("mass", false).await;
    for n in 0..PATHS {
        let path = fake_store_path(&format!("p{n}"));
        let nar = file_nar(format!("contents of path {n}").as_bytes());
        server.seed_path("mass", plain_metadata(&path), &nar).await;
    }
    assert_eq!(count(&server, "SELECT COUNT(*) FROM chunks").await, PATHS);
    set_retention(server.database(), "mass", Duration::from_secs(1)).await;
    age_objects(server.database(), "mass").await;

    let mut collector = tokio::process::Command::new(binary("gc-scheduler"))
        .arg("--config")
        .arg(server.config_path())
        .arg("--once")
        .kill_on_drop(true)
        .spawn()
        .expect("starting gc-scheduler");
    // Aim at the middle of the last level: chunks claimed, some of them
    // deleted from storage and database, the rest not yet. Each look is
    // taken holding SQLite's write lock, which stops the collector at its
    // next write: it moves only in the gaps between looks (a few rows of
    // 750), so the kill lands in the window however fast it runs, and the
    // state seen is the state killed.
    let mut lock = server
        .database()
        .pool()
        .acquire()
        .await
        .expect("a connection");
    loop {
        if let Some(status) = collector.try_wait().expect("polling gc-scheduler") {
            panic!("gc-scheduler finished ({status}) before it could be killed mid-run");
        }
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *lock)
            .await
            .expect("taking the write lock");
        let chunks = count_on(&mut lock, "SELECT COUNT(*) FROM chunks").await;
        let claimed = count_on(
            &mut lock,
            "SELECT COUNT(*) FROM chunks WHERE state = 'deleting'",
        )
        .await;
        let aimed = chunks < PATHS / 2 && claimed > 0;
        if aimed {
            collector.start_kill().expect("SIGKILL");
            collector.wait().await.expect("reaping gc-scheduler");
        }
        sqlx::query("ROLLBACK")
            .execute(&mut *lock)
            .await
            .expect("releasing the write lock");
        if aimed {
            break;
        }
        assert!(chunks > 0, "the run was past its chunks when seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(lock);
    let claimed = count(
        &server,
        "SELECT COUNT(*) FROM chunks WHERE state = 'deleting'",
    )
    .await;
    assert!(claimed > 0, "the kill left claimed chunks for the next run");

    run_gc_once(server.config_path()).await;
    assert_eq!(count(&server, "SELECT COUNT(*) FROM objects").await, 0);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM nars").await, 0);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM chunks").await, 0);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM nar_chunks").await, 0);
    assert!(chunk_objects(server.storage()).await.is_empty());
    server.stop().await;
}
