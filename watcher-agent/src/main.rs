//! The `watcher-agent` binary: a thin shell around the `watcher_agent` library.

fn main() -> std::process::ExitCode {
    eprintln!("watcher-agent: not built yet (issue #6)");
    std::process::ExitCode::from(2)
}
