//! `nlbctl`, the operator CLI, as a library: the binary parses flags, calls
//! [`run`] and exits with what it returns.
//!
//! - [`cli`]: the command line (clap).
//! - [`client`]: address, TLS, token and deadlines; the connection.
//! - [`commands`]: one function per command, each one control API call.
//! - [`input`]: routes and config section files, checked before any call.
//! - [`output`], [`json`]: tables for people, JSON for scripts.
//! - [`exit`]: the exit codes scripts rely on (documented in `docs/nlbctl.md`).

pub mod cli;
pub mod client;
mod commands;
pub mod exit;
pub mod input;
pub mod json;
pub mod output;

pub use cli::Cli;
pub use exit::{CtlError, Exit};

use client::{ClientOptions, Ctl};
use output::Out;

/// Runs a parsed command line, printing results on stdout and errors on
/// stderr. `env` reads `NLBCTL_TOKEN` and `NLBCTL_TOKEN_FILE` (the other
/// variables are read by clap).
pub async fn run(cli: Cli, env: &dyn Fn(&str) -> Option<String>) -> Exit {
    let mut out = Out::stdout(cli.global.json);
    let result = async {
        let opts = ClientOptions::resolve(&cli.global, env)?;
        let ctl = Ctl::new(opts);
        commands::dispatch(&cli.command, &ctl, &mut out).await
    }
    .await;
    match result {
        Ok(exit) => exit,
        Err(e) => {
            report(&e);
            e.exit()
        }
    }
}

/// Prints an error on stderr, each line prefixed with `nlbctl: `. A closed
/// output is not an error worth a line.
pub fn report(e: &CtlError) {
    if matches!(e, CtlError::OutputClosed) {
        return;
    }
    for line in e.to_string().lines() {
        eprintln!("nlbctl: {line}");
    }
}

/// The process environment, for [`run`].
pub fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}
