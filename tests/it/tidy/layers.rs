//! The crate graph's rules that cargo cannot check by itself, read from
//! `cargo metadata`: the pure layers link no async runtime, database,
//! storage or HTTP stack, and the `larder` client none of the server's
//! layers (ARCHITECTURE.md, "common/: the layers").

use std::collections::BTreeSet;

use super::workspace;

/// Every package `root` depends on, directly or not, through its normal
/// (not dev or build) dependencies, by name, from `cargo metadata`.
fn normal_dependencies_of(metadata: &serde_json::Value, root: &str) -> BTreeSet<String> {
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
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
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
    let workspace = workspace();
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
