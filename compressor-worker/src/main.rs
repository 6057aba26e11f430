//! The `compressor-worker` binary: a thin shell around the `compressor_worker` library.

use clap::Parser;

use larder_service::service::{run_service, ServiceArgs};

#[derive(Debug, Parser)]
#[command(
    name = "compressor-worker",
    version,
    about = "Larder's compressor: compresses and stores new chunks, and makes complete NARs visible"
)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    run_service("compressor-worker", &cli.service, compressor_worker::run)
}
