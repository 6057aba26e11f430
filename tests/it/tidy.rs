//! The source tree's own rules, checked over its files as text, as
//! rust-analyzer's tidy test does: every Rust module opens with a `//!`
//! paragraph saying what it is and why, which is where a reader starts.

use std::path::{Path, PathBuf};

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
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
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

/// Every package `root` depends on, directly or not, through its normal
/// (not dev or build) dependencies, by name, from `cargo metadata`.
fn normal_dependencies_of(
    metadata: &serde_json::Value,
    root: &str,
) -> std::collections::BTreeSet<String> {
    let packages = metadata["packages"]
        .as_array()
        .expect("cargo metadata lists packages");
    let name_of = |id: &str| {
        packages
            .iter()
            .find(|package| package["id"] == id)
            .and_then(|package| package["name"].as_str())
            .unwrap_or_else(|| panic!("package {id} has no name"))
            .to_owned()
    };
    let nodes = metadata["resolve"]["nodes"]
        .as_array()
        .expect("cargo metadata resolves");
    let root_id = packages
        .iter()
        .find(|package| package["name"] == root)
        .and_then(|package| package["id"].as_str())
        .unwrap_or_else(|| panic!("no package {root} in the workspace"));
    let mut seen = std::collections::BTreeSet::new();
    let mut names = std::collections::BTreeSet::new();
    let mut to_visit = vec![root_id.to_owned()];
    while let Some(id) = to_visit.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let node = nodes
            .iter()
            .find(|node| node["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is not in the resolve graph"));
        for dependency in node["deps"].as_array().into_iter().flatten() {
            let normal = dependency["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|kind| kind["kind"].is_null());
            if normal {
                let id = dependency["pkg"]
                    .as_str()
                    .expect("a dependency's package id");
                names.insert(name_of(id));
                to_visit.push(id.to_owned());
            }
        }
    }
    names
}

/// What cargo cannot check by itself: the pure layers link no async
/// runtime, database, storage or HTTP stack, and the `larder` client none
/// of the server's layers (ARCHITECTURE.md, "common/: the layers").
#[test]
fn the_layers_link_only_what_they_may() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // This machine's platform only: the others' dependencies (wasm's, for
    // one) were never downloaded, and what links here is what matters.
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("running rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host, "--manifest-path"])
        .arg(workspace.join("Cargo.toml"))
        .output()
        .expect("running cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata's JSON");

    let runtime_io_or_http = |name: &str| {
        [
            "tokio",
            "mio",
            "async-std",
            "hyper",
            "http",
            "axum",
            "reqwest",
            "lapin",
            "rustls",
        ]
        .contains(&name)
            || name.starts_with("sqlx")
            || name.starts_with("aws-")
    };
    let mut broken = Vec::new();
    for pure in ["larder-nix", "larder-api", "larder-token"] {
        let dependencies = normal_dependencies_of(&metadata, pure);
        assert!(
            dependencies.contains("serde"),
            "{pure}'s dependencies were not found"
        );
        for name in dependencies.iter().filter(|name| runtime_io_or_http(name)) {
            broken.push(format!("{pure} links {name}"));
        }
    }
    let client = normal_dependencies_of(&metadata, "watcher-agent");
    assert!(
        client.contains("larder-api"),
        "the client's dependencies were not found"
    );
    let server_side = |name: &str| {
        (name.starts_with("larder-") && !["larder-api", "larder-nix"].contains(&name))
            || name.starts_with("sqlx")
            || name.starts_with("aws-")
            || name == "lapin"
    };
    for name in client.iter().filter(|name| server_side(name)) {
        broken.push(format!("the client (watcher-agent) links {name}"));
    }
    assert!(
        broken.is_empty(),
        "layers link what they must not:\n{}",
        broken.join("\n")
    );
}
