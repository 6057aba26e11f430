//! The schema migrations, embedded in the binary, one list per backend.
//!
//! The SQL lives in `common/db/migrations/{sqlite,postgres}/NNNN_*.sql` (see
//! the README there). It is embedded with `include_str!` and handed to
//! sqlx's [`Migrator`] through a [`MigrationSource`], rather than with
//! `sqlx::migrate!`, so that common needs no sqlx macros and a server binary
//! needs no migrations directory at run time.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use super::Backend;

/// One migration in both dialects.
struct Embedded {
    version: i64,
    description: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

/// Every migration, oldest first. A new migration is a new entry here and a
/// new file in each directory; merged files are never edited, since sqlx
/// checks their checksums.
const MIGRATIONS: &[Embedded] = &[
    Embedded {
        version: 1,
        description: "initial",
        sqlite: include_str!("../migrations/sqlite/0001_initial.sql"),
        postgres: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Embedded {
        version: 2,
        description: "staged_files",
        sqlite: include_str!("../migrations/sqlite/0002_staged_files.sql"),
        postgres: include_str!("../migrations/postgres/0002_staged_files.sql"),
    },
    Embedded {
        version: 3,
        description: "gc",
        sqlite: include_str!("../migrations/sqlite/0003_gc.sql"),
        postgres: include_str!("../migrations/postgres/0003_gc.sql"),
    },
    Embedded {
        version: 4,
        description: "quota",
        sqlite: include_str!("../migrations/sqlite/0004_quota.sql"),
        postgres: include_str!("../migrations/postgres/0004_quota.sql"),
    },
    Embedded {
        version: 5,
        description: "nar_listings",
        sqlite: include_str!("../migrations/sqlite/0005_nar_listings.sql"),
        postgres: include_str!("../migrations/postgres/0005_nar_listings.sql"),
    },
    Embedded {
        version: 6,
        description: "packs",
        sqlite: include_str!("../migrations/sqlite/0006_packs.sql"),
        postgres: include_str!("../migrations/postgres/0006_packs.sql"),
    },
    Embedded {
        version: 7,
        description: "next_use",
        sqlite: include_str!("../migrations/sqlite/0007_next_use.sql"),
        postgres: include_str!("../migrations/postgres/0007_next_use.sql"),
    },
    Embedded {
        version: 8,
        description: "build_logs",
        sqlite: include_str!("../migrations/sqlite/0008_build_logs.sql"),
        postgres: include_str!("../migrations/postgres/0008_build_logs.sql"),
    },
    Embedded {
        version: 9,
        description: "nar_file_names",
        sqlite: include_str!("../migrations/sqlite/0009_nar_file_names.sql"),
        postgres: include_str!("../migrations/postgres/0009_nar_file_names.sql"),
    },
    Embedded {
        version: 10,
        description: "realisations",
        sqlite: include_str!("../migrations/sqlite/0010_realisations.sql"),
        postgres: include_str!("../migrations/postgres/0010_realisations.sql"),
    },
    Embedded {
        version: 11,
        description: "staged_crc32",
        sqlite: include_str!("../migrations/sqlite/0011_staged_crc32.sql"),
        postgres: include_str!("../migrations/postgres/0011_staged_crc32.sql"),
    },
    Embedded {
        version: 12,
        description: "next_keypair",
        sqlite: include_str!("../migrations/sqlite/0012_next_keypair.sql"),
        postgres: include_str!("../migrations/postgres/0012_next_keypair.sql"),
    },
    Embedded {
        version: 13,
        description: "audit",
        sqlite: include_str!("../migrations/sqlite/0013_audit.sql"),
        postgres: include_str!("../migrations/postgres/0013_audit.sql"),
    },
    Embedded {
        version: 14,
        description: "pins",
        sqlite: include_str!("../migrations/sqlite/0014_pins.sql"),
        postgres: include_str!("../migrations/postgres/0014_pins.sql"),
    },
];

/// The file names the embedded list stands for, per backend directory, so
/// that a test can check the list against the directories.
pub fn embedded_file_names() -> Vec<String> {
    MIGRATIONS
        .iter()
        .map(|m| format!("{:04}_{}.sql", m.version, m.description))
        .collect()
}

/// The embedded migrations of one backend.
#[derive(Debug, Clone, Copy)]
struct EmbeddedSource(Backend);

impl MigrationSource<'static> for EmbeddedSource {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async move {
            Ok(MIGRATIONS
                .iter()
                .map(|m| {
                    let sql = match self.0 {
                        Backend::Sqlite => m.sqlite,
                        Backend::Postgres => m.postgres,
                    };
                    Migration::new(
                        m.version,
                        Cow::Borrowed(m.description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// The migrator for `backend`.
pub(crate) async fn migrator(backend: Backend) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(EmbeddedSource(backend)).await
}
