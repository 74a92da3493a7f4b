//! `nlbctl`: operate a Switchyard NLB over its gRPC control API.
//!
//! Parses the command line, runs the command (see `nlb::ctl`) and exits with
//! its code: 0 ok, 1 other failure, 2 usage, 3 unreachable, 4 not authorized,
//! 5 not found, 6 invalid input, 7 negative answer (`docs/nlbctl.md`).

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use nlb::ctl::{self, Cli, Exit};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            }
            .into();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nlbctl: cannot start the async runtime: {e}");
            return Exit::Failure.into();
        }
    };
    runtime.block_on(ctl::run(cli, &ctl::process_env)).into()
}
