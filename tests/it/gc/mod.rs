//! Garbage collection (issue #7): the GC queries on both backends,
//! including their races with the pipeline (`db`), and GC end to end
//! through the server and the real `gc-scheduler` binary: retention,
//! access times and path deletion (`end_to_end`), GC racing real `nix
//! copy` pushes (`stress`) and a collector killed mid-run (`fault`).

mod db;
mod end_to_end;
mod fault;
mod stress;

use std::time::Duration;

use common::config::GcConfig;
use common::db::ObjectMetadata;
use common::duration::HumanDuration;
use common::nix::nar::NarEncoder;
use common::nix::StorePathHash;

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

/// A made-up store path, `/nix/store/<random hash>-<name>`.
fn fake_store_path(name: &str) -> String {
    let hash = StorePathHash::from_bytes(&rand::random());
    format!("/nix/store/{hash}-{name}")
}

/// A NAR of one regular file with `contents`.
fn file_nar(contents: &[u8]) -> Vec<u8> {
    let mut encoder = NarEncoder::new(Vec::new()).expect("writing to a Vec");
    encoder.regular(false, contents).expect("a regular file");
    encoder.finish().expect("a complete NAR")
}

fn plain_metadata(store_path: &str) -> ObjectMetadata {
    ObjectMetadata {
        store_path: store_path.to_owned(),
        references: Vec::new(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        ca: None,
    }
}

const HOUR: Duration = Duration::from_secs(3600);
