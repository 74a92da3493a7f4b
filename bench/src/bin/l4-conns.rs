//! `l4-conns`: many TCP connections through a proxy on loopback, one small
//! HTTP/1.1 request each, then held idle or closed. Driven by
//! `scripts/bench.sh l4` (memory per idle connection, instructions per
//! connection); see `switchyard_bench::conns`.

use anyhow::Result;
use clap::Parser;
use switchyard_bench::conns::{self, ConnsArgs};

#[derive(Parser)]
#[command(
    name = "l4-conns",
    about = "Open many loopback TCP connections, one HTTP/1.1 request each, then hold them idle or close them"
)]
struct Cli {
    #[command(flatten)]
    args: ConnsArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // One thread: the connections are idle, and the proxy under test should
    // get the cores.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(conns::run(cli.args))
}
