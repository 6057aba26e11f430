//! The `gc-scheduler` binary: a thin shell around the `gc_scheduler` library.

use std::process::ExitCode;

use clap::Parser;

use common::service::{run_service, ServiceArgs};

#[derive(Debug, Parser)]
#[command(
    name = "gc-scheduler",
    version,
    about = "Larder's scheduler: publishes the jobs of uploads stuck in the pipeline again"
)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,

    /// Run one pass now, print what it did, and exit.
    #[arg(long)]
    once: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.once {
        return run_service(
            "gc-scheduler",
            &cli.service,
            |config, _shutdown| async move {
                let report = gc_scheduler::reconcile_once(&config).await?;
                println!(
                    "reconciled: {} uploads published again, {} failed",
                    report.republished, report.failed
                );
                Ok::<(), gc_scheduler::Error>(())
            },
        );
    }
    run_service("gc-scheduler", &cli.service, gc_scheduler::run)
}
