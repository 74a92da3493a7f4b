//! The Switchyard module SDK.
//!
//! A module describes itself and serves data connections ([`Module`]); the
//! SDK runs everything else:
//!
//! - the data listener, with PROXY v2 parsing when the module asks the NLB
//!   for it ([`data`]), counting connections and bytes ([`stats`]);
//! - `marchproxy.ModuleService`, all 22 RPCs ([`service`]), with token
//!   checks on the changing ones ([`auth`]), rate limits ([`ratelimit`]) and
//!   version and weight state ([`versions`]);
//! - registration with the NLB (retried with backoff until it answers),
//!   heartbeats with live stats, `ReportMetrics`, and the heartbeat
//!   instructions `reregister`, `reload`, `drain` and `shed` ([`agent`]);
//! - the admin port: `/healthz`, `/readyz`, `/metrics`, `/status` ([`admin`]);
//! - SIGTERM: unregister gracefully, stop accepting, drain until the
//!   deadline, exit 0 ([`runtime`]).
//!
//! ```no_run
//! use switchyard_sdk::{Connection, Descriptor, Module};
//! use switchyard_sdk::pb::{ModuleType, Protocol};
//!
//! struct Echo;
//!
//! #[switchyard_sdk::async_trait]
//! impl Module for Echo {
//!     fn descriptor(&self) -> Descriptor {
//!         Descriptor {
//!             module_type: ModuleType::Alb,
//!             name: "echo",
//!             version: env!("CARGO_PKG_VERSION").into(),
//!             protocols: vec![Protocol::Tcp],
//!             capabilities: Default::default(),
//!         }
//!     }
//!
//!     async fn serve(&self, mut conn: Connection) {
//!         let (mut r, mut w) = tokio::io::split(conn.stream);
//!         let _ = tokio::io::copy(&mut r, &mut w).await;
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     switchyard_sdk::main("echo", |_section| Ok(Echo))
//! }
//! ```
//!
//! `docs/modules.md` is the guide.

#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod auth;
pub mod config;
pub mod context;
pub mod data;
pub mod module;
pub mod procinfo;
pub mod ratelimit;
pub mod runtime;
pub mod scale;
pub mod service;
pub mod stats;
pub mod telemetry;
pub mod versions;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

pub use config::SdkConfig;
pub use context::Context;
pub use data::Connection;
pub use module::{CanHandle, ConfigSection, Descriptor, Health, Module, ModuleError, RouteStore};
pub use runtime::{Phase, Runner, Running, StopReason};
pub use scale::{ScaleOutcome, Scaler};
pub use shared_types::pb;
pub use tonic::async_trait;

/// `docs/modules.md`: its Rust examples compile as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/modules.md")]
pub struct ModulesGuide;

/// The flags every module binary takes.
#[derive(Parser, Debug)]
struct Args {
    /// YAML config file (without one, the documented defaults apply).
    #[arg(long, env = "MODULE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate a config file (with the environment overrides) and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "MODULE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MODULE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Loads the config and builds the module from its `module:` section;
/// every problem is returned.
fn load<M, B>(path: Option<&std::path::Path>, build: &B) -> Result<(SdkConfig, M), Vec<String>>
where
    B: Fn(serde_yaml_ng::Value) -> Result<M, Vec<String>>,
{
    let env = |k: &str| std::env::var(k).ok();
    let config = SdkConfig::load(path, &env)
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let module = build(config.module.clone()).map_err(|errs| {
        errs.into_iter()
            .map(|e| format!("module: {e}"))
            .collect::<Vec<_>>()
    })?;
    auth::load_tokens(config.auth.tokens_file.as_deref(), &env).map_err(|e| vec![e])?;
    Ok((config, module))
}

/// The whole `main` of a module binary: flags (`--config`,
/// `--check-config`), logs, the config, signals (SIGTERM and SIGINT stop
/// gracefully; SIGHUP reloads). `build` makes the module from its `module:`
/// config section (`Null` when absent).
pub fn main<M, B>(name: &'static str, build: B) -> ExitCode
where
    M: Module,
    B: Fn(serde_yaml_ng::Value) -> Result<M, Vec<String>>,
{
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return match load(Some(path), &build) {
            Ok(_) => {
                println!("{}: valid", path.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors {
                    eprintln!("{}: {e}", path.display());
                }
                eprintln!("{}: {} problem(s)", path.display(), errors.len());
                ExitCode::from(2)
            }
        };
    }
    init_logs(&args.log_format);
    let (config, module) = match load(args.config.as_deref(), &build) {
        Ok(x) => x,
        Err(errors) => {
            for e in &errors {
                tracing::error!("config: {e}");
            }
            eprintln!(
                "{name}: the config has {} problem(s); not starting",
                errors.len()
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match Runner::new(module, config)
            .config_path(args.config.clone())
            .start()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("{name}: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let shared = running.shared.clone();
        tokio::spawn(async move {
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => {
                        tracing::info!("SIGTERM: stopping gracefully");
                        shared.request_stop(StopReason::Signal);
                    }
                    _ = int.recv() => {
                        tracing::info!("SIGINT: stopping gracefully");
                        shared.request_stop(StopReason::Signal);
                    }
                    _ = hup.recv() => {
                        // On its own task: a slow reload must not hold up SIGTERM.
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            match shared.reload_detached().await {
                                Ok(m) => tracing::info!(result = %m, "SIGHUP: reloaded"),
                                Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed; the config in force stays"),
                            }
                        });
                    }
                }
            }
        });
        match running.wait().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
