//! The `ingest-api` binary: a thin shell around the `ingest_api` library.

fn main() -> std::process::ExitCode {
    eprintln!("ingest-api: not built yet (issue #3)");
    std::process::ExitCode::from(2)
}
