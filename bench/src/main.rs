//! `control-bench`: load generator for the NLB's gRPC control API, driven by
//! `scripts/bench.sh control`. Each subcommand prints what it measured and
//! one `RESULT` line for the script's summary.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use switchyard_bench::control::{self, FleetArgs, LoadArgs};
use switchyard_bench::scenario;

#[derive(Parser)]
#[command(
    name = "control-bench",
    about = "Load generator for the NLB control API (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the NLB config the benchmarks run against.
    Config,
    /// Print a loopback port that is free now.
    FreePort,
    /// RouteRequest throughput at a fixed number of calls in flight.
    Route(LoadArgs),
    /// Heartbeat throughput at a fixed number of calls in flight, over many instances.
    Heartbeat(LoadArgs),
    /// Many instances heartbeating at their interval; the NLB's CPU meanwhile.
    Fleet(FleetArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Config => {
            print!("{}", scenario::NLB_CONFIG);
            Ok(())
        }
        Command::FreePort => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            Ok(())
        }
        command => {
            // The load client gets the machine's cores like the NLB does.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                match command {
                    Command::Route(a) => control::route(a).await,
                    Command::Heartbeat(a) => control::heartbeat(a).await,
                    Command::Fleet(a) => control::fleet_run(a).await,
                    Command::Config | Command::FreePort => unreachable!(),
                }
            })
        }
    }
}
