//! A fresh, migrated database of either backend for query tests, and
//! `both_backends!`, which runs each listed test function (taking the
//! `Database`) once on SQLite and once on PostgreSQL.

use larder_db::{Backend, Database};
use tempfile::TempDir;
use tests::services;

pub(crate) struct TestDb {
    pub(crate) db: Database,
    _dir: Option<TempDir>,
}

pub(crate) async fn open(backend: Backend) -> TestDb {
    let (url, dir) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("creating a temporary directory");
            let url = format!("sqlite:{}", dir.path().join("test.sqlite").display());
            (url, Some(dir))
        }
        Backend::Postgres => (services::fresh_postgres_database().await, None),
    };
    let db = Database::connect(&url).await.expect("connecting");
    db.migrate().await.expect("migrating");
    TestDb { db, _dir: dir }
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(
                        crate::fresh_db::open(larder_db::Backend::Sqlite).await.db,
                    )
                    .await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(
                        crate::fresh_db::open(larder_db::Backend::Postgres).await.db,
                    )
                    .await;
                }
            )*
        }
    };
}
pub(crate) use both_backends;
