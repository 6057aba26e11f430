//! The `chunker-worker` binary: a thin shell around the `chunker_worker` library.

fn main() -> std::process::ExitCode {
    eprintln!("chunker-worker: not built yet (issue #4)");
    std::process::ExitCode::from(2)
}
