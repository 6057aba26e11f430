//! Garbage collection (issue #7): the GC queries on both backends,
//! including their races with the pipeline (`db`), and GC end to end
//! through the server and the real `gc-scheduler` binary: retention,
//! access times and path deletion (`end_to_end`), GC racing real `nix
//! copy` pushes (`stress`), a collector killed mid-run (`fault`), and packs:
//! compaction beside uploads and downloads, repacking (`packs`).

mod db;
mod end_to_end;
mod fault;
mod packs;
mod stress;

use std::time::Duration;

use crate::server::{fake_store_path, file_nar, plain_metadata};
use larder_api::duration::HumanDuration;
use larder_config::GcConfig;

/// GC settings for tests: no grace for unreferenced chunks, so one run
/// collects everything collectable; access times flushed every second.
fn eager_gc() -> GcConfig {
    GcConfig {
        orphan_grace: HumanDuration::from_secs(0),
        access_flush_interval: HumanDuration::from_secs(1),
        page_size: 2,
        delete_concurrency: 2,
        ..GcConfig::default()
    }
}

const HOUR: Duration = Duration::from_secs(3600);
