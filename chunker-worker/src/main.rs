//! The `chunker-worker` binary: a thin shell around the `chunker_worker` library.

use clap::Parser;

use larder_service::service::{run_service, ServiceArgs};

#[derive(Debug, Parser)]
#[command(
    name = "chunker-worker",
    version,
    about = "Larder's chunker: cuts spooled uploads into chunks (FastCDC), deduplicates them globally and hands new chunks to the compressors"
)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    run_service("chunker-worker", &cli.service, chunker_worker::run)
}
