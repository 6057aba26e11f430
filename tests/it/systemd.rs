//! The shipped systemd unit files, loaded by systemd itself: `systemd-analyze
//! verify` parses each unit as systemd would and reports unknown keys,
//! bad values and missing executables. The agent's two units
//! (`ops/agent/`) and the servers' template (`ops/systemd/larder@.service`,
//! as two of its instances) are checked.
//!
//! Each unit is verified from a copy whose `ExecStart` binary is the one
//! built for the tests (the installed path does not exist here); every
//! other line is the shipped one. `--man=no`: whether the `Documentation=`
//! man pages are installed on this machine says nothing about the unit.

use std::path::{Path, PathBuf};

use tests::server::binary;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Copies unit `shipped` into `dir` as `name`, with `installed` (the binary
/// path in its `ExecStart`, which must be there) replaced by `built`.
fn unit_copy(dir: &Path, shipped: &str, name: &str, installed: &str, built: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo_file(shipped))
        .unwrap_or_else(|error| panic!("reading {shipped}: {error}"));
    let exec_start = format!("ExecStart={installed}");
    assert!(text.contains(&exec_start), "{shipped} has no {exec_start}");
    let copy = dir.join(name);
    std::fs::write(
        &copy,
        text.replace(&exec_start, &format!("ExecStart={built}")),
    )
    .expect("writing the unit's copy");
    copy
}

/// Runs `systemd-analyze verify` on `units`; returns whether it succeeded
/// and what it printed.
fn verify(units: &[PathBuf]) -> (bool, String) {
    let output = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .expect("running systemd-analyze (ops/install.sh installs systemd)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

#[test]
fn the_shipped_unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("a directory for the units");
    let agent = binary("watcher-agent");
    let agent = agent.to_str().expect("a UTF-8 path");
    let servers = binary("ingest-api");
    let servers = servers
        .parent()
        .and_then(Path::to_str)
        .expect("the binaries' directory");
    let units = [
        unit_copy(
            dir.path(),
            "ops/agent/larder-agent-system.service",
            "larder-agent.service",
            "/usr/local/bin/watcher-agent",
            agent,
        ),
        // The user unit, verified as a system unit: its keys are valid in
        // both, and systemd's user mode needs a user session.
        unit_copy(
            dir.path(),
            "ops/agent/larder-agent.service",
            "larder-agent-user.service",
            "%h/.local/bin/watcher-agent",
            agent,
        ),
    ];
    unit_copy(
        dir.path(),
        "ops/systemd/larder@.service",
        "larder@.service",
        "/usr/local/bin/%i",
        &format!("{servers}/%i"),
    );
    let instances = ["ingest-api", "gc-scheduler"]
        .map(|instance| dir.path().join(format!("larder@{instance}.service")));
    let mut all = units.to_vec();
    all.extend(instances);
    // Unknown keys and bad values are warnings, with exit status 0: the
    // units must also print nothing.
    let (succeeded, printed) = verify(&all);
    assert!(
        succeeded && printed.trim().is_empty(),
        "systemd-analyze verify {all:?}:\n{printed}"
    );
}

/// The check above would see a broken unit: a key systemd does not know.
#[test]
fn systemd_analyze_verify_reports_an_unknown_key() {
    let dir = tempfile::tempdir().expect("a directory for the unit");
    let unit = dir.path().join("broken.service");
    std::fs::write(&unit, "[Service]\nExecStart=/bin/true\nRestartSecs=5\n").expect("writing");
    let (_, printed) = verify(&[unit]);
    assert!(printed.contains("Unknown key"), "{printed}");
}
