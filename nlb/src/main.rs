//! `nlb`: Switchyard's network load balancer.
//!
//! `nlb --config FILE` runs it; `nlb --check-config FILE` validates a config
//! and exits non-zero naming each bad key. SIGHUP re-reads the config file;
//! SIGTERM or SIGINT stop it gracefully.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nlb::config::{self, ConfigStore};
use tokio::signal::unix::{signal, SignalKind};

// The data plane allocates per connection; mimalloc does that cheaper than
// glibc (its aligned allocations especially).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "nlb", version, about = "Switchyard network load balancer")]
struct Args {
    /// YAML config file (without one, the documented defaults apply).
    #[arg(long, env = "NLB_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate a config file (with the environment overrides) and exit;
    /// `--config` and `NLB_CONFIG` are then ignored.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "NLB_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// How long calls in flight may finish after SIGTERM.
    #[arg(long, env = "NLB_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    shutdown_grace_seconds: u64,
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NLB_LOG")
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

fn check_config(path: &Path) -> ExitCode {
    let result = config::read_file(path)
        .and_then(|file| config::merge(&file, &config::Sections::new(), &config::process_env));
    // The files the config names must load too: tokens and certificates.
    let result = result.and_then(|c| {
        nlb::security::check_files(&c, &config::process_env)
            .map_err(|e| vec![config::ConfigError::new("", e.to_string())])
    });
    match result {
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
    }
}

fn main() -> ExitCode {
    // Before any other thread starts: mimalloc's options are plain fields.
    shared_types::allocator::keep_freed_memory();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("nlb: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return check_config(path);
    }
    init_logs(&args.log_format);
    let store = match ConfigStore::load(args.config.clone(), Box::new(config::process_env)) {
        Ok(s) => s,
        Err(errors) => {
            let source = args
                .config
                .as_ref()
                .map_or_else(|| "the defaults".to_string(), |p| p.display().to_string());
            for e in &errors {
                eprintln!("nlb: config {source}: {e}");
            }
            return ExitCode::from(2);
        }
    };
    if args.config.is_none() {
        tracing::info!("no --config given: running on the documented defaults");
    }
    // Signal handlers first: once `/readyz` says ready, a SIGHUP or SIGTERM
    // must reach the loop below, not the default action (which kills).
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("nlb: cannot install signal handlers");
        return ExitCode::from(1);
    };
    // Each proxied connection holds two descriptors: take the most the
    // system allows (the soft limit up to the hard one).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "file-descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file-descriptor limit"),
    }
    let nlb = nlb::Nlb::new(store);
    let running = match nlb::start(nlb).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nlb: {e}");
            return ExitCode::from(1);
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config file");
                let _ = running.nlb.reload();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping");
    running
        .shutdown(Duration::from_secs(args.shutdown_grace_seconds))
        .await;
    ExitCode::SUCCESS
}
