//! The `compressor-worker` binary: a thin shell around the `compressor_worker` library.

fn main() -> std::process::ExitCode {
    eprintln!("compressor-worker: not built yet (issue #4)");
    std::process::ExitCode::from(2)
}
