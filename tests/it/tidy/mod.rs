//! The source tree's own rules, checked over its files as text, as
//! rust-analyzer's tidy test does:
//!
//! - here: every Rust module opens with a `//!` paragraph saying what it
//!   is and why, which is where a reader starts;
//! - [`cycles`]: sibling modules depend on each other one way only, so
//!   that each directory of modules has layers that can be read, and split
//!   off, from the bottom up;
//! - [`layers`]: what cargo cannot check by itself about the crate graph,
//!   that the pure layers and the client link only what they may.

mod cycles;
mod layers;

use std::path::{Path, PathBuf};

/// The workspace's root folder.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
}

/// The crates whose modules are checked, as folders of the workspace.
const CRATES: &[&str] = &[
    "common",
    "ingest-api",
    "chunker-worker",
    "compressor-worker",
    "gc-scheduler",
    "watcher-agent",
    "tests",
    "fuzz",
];

/// Every `.rs` file under `dir`, build output left out.
fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name != "target") {
                rust_files(&path, found);
            }
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn every_module_opens_with_a_doc_comment() {
    let workspace = workspace();
    let mut files = Vec::new();
    for name in CRATES {
        rust_files(&workspace.join(name), &mut files);
    }
    assert!(files.len() > 100, "found only {} Rust files", files.len());
    let missing = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|error| panic!("reading {}: {error}", file.display()));
            !text
                .lines()
                .find(|line| !line.trim().is_empty())
                .is_some_and(|line| line.starts_with("//!"))
        })
        .map(|file| {
            file.strip_prefix(workspace)
                .unwrap_or(file)
                .display()
                .to_string()
        })
        .collect::<Vec<_>>();
    assert!(
        missing.is_empty(),
        "these modules do not open with a `//!` doc comment saying what they are:\n{}",
        missing.join("\n")
    );
}
