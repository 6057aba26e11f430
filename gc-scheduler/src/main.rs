//! The `gc-scheduler` binary: a thin shell around the `gc_scheduler` library.

fn main() -> std::process::ExitCode {
    eprintln!("gc-scheduler: not built yet (issue #7)");
    std::process::ExitCode::from(2)
}
