//! The `gc-scheduler` binary: a thin shell around the `gc_scheduler`
//! library. `--once` runs one pass and exits (for cron and tests);
//! `--repack` moves chunks into packs (see the library) and exits;
//! `--scrub` runs one scrub pass and exits;
//! otherwise it reconciles and collects on their intervals until SIGINT or
//! SIGTERM.

use std::process::ExitCode;

use clap::Parser;

use larder_service::service::{run_service, ServiceArgs};

#[derive(Debug, Parser)]
#[command(
    name = "gc-scheduler",
    version,
    about = "Larder's scheduler: garbage collection, and publishing the jobs of uploads stuck in \
             the pipeline again"
)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,

    /// Run one pass now (reconcile, then collect garbage), print what it
    /// did, and exit.
    #[arg(long, conflicts_with_all = ["repack", "scrub"])]
    once: bool,

    /// Move the chunks of every one-chunk object (a store written before
    /// packs) and of every sparse or small pack into new packs, print what
    /// it did, and exit. The old objects are deleted by later GC runs.
    #[arg(long, conflicts_with = "scrub")]
    repack: bool,

    /// Run one scrub pass now (read every stored chunk back and check it
    /// against its hash; withdraw the NARs of damaged ones until their
    /// paths are pushed again), print what it found, and exit.
    #[arg(long)]
    scrub: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.once {
        return run_service(
            "gc-scheduler",
            &cli.service,
            |config, _shutdown| async move {
                println!("{}", gc_scheduler::run_once(&config).await?);
                Ok::<(), gc_scheduler::Error>(())
            },
        );
    }
    if cli.repack {
        return run_service(
            "gc-scheduler",
            &cli.service,
            |config, _shutdown| async move {
                println!("{}", gc_scheduler::run_repack(&config).await?);
                Ok::<(), gc_scheduler::Error>(())
            },
        );
    }
    if cli.scrub {
        return run_service(
            "gc-scheduler",
            &cli.service,
            |config, _shutdown| async move {
                match gc_scheduler::run_scrub(&config).await? {
                    Some(report) => println!("{report}"),
                    None => println!("scrubbed: nothing (another gc-scheduler is scrubbing)"),
                }
                Ok::<(), gc_scheduler::Error>(())
            },
        );
    }
    run_service("gc-scheduler", &cli.service, gc_scheduler::run)
}
