//! The command line: global connection flags and one subcommand per job.
//! Every command maps onto one control API call (see `docs/nlbctl.md`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};

/// nlbctl: the operator CLI of Switchyard's NLB, over its gRPC control API.
#[derive(Parser, Debug)]
#[command(
    name = "nlbctl",
    version,
    about = "Operate a Switchyard NLB over its gRPC control API",
    after_help = "Exit codes: 0 ok, 1 other failure, 2 usage, 3 NLB unreachable, \
                  4 not authorized, 5 not found, 6 invalid input, 7 negative answer \
                  (dry run not routed, health not healthy, watched rollout rolled back). \
                  See docs/nlbctl.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The NLB's control API: host:port, http://host:port or https://host:port.
    #[arg(
        long,
        global = true,
        env = "NLBCTL_ADDR",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR"
    )]
    pub addr: String,
    /// Token sent as `authorization: Bearer TOKEN` on every call
    /// [env: NLBCTL_TOKEN]. Prefer the variable or --token-file: a flag
    /// shows in the process list.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the token (surrounding whitespace ignored)
    /// [env: NLBCTL_TOKEN_FILE].
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate to trust: connects with TLS.
    #[arg(long, global = true, env = "NLBCTL_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS (with --key).
    #[arg(long, global = true, env = "NLBCTL_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, env = "NLBCTL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Name to verify the NLB's certificate against (default: the host of --addr).
    #[arg(
        long,
        global = true,
        env = "NLBCTL_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    pub tls_server_name: Option<String>,
    /// Deadline of each call, and of connecting, in seconds (0 = none;
    /// `metrics --watch` and `rollout watch` streams have none after connecting).
    #[arg(
        long,
        global = true,
        env = "NLBCTL_TIMEOUT",
        default_value = "10",
        value_name = "SECONDS",
        value_parser = parse_seconds
    )]
    pub timeout: Deadline,
    /// Print machine-readable JSON (one document per call; one line per
    /// update with `metrics --watch`, per event with `rollout watch`).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Registered module instances (ListModules, GetModuleInfo).
    #[command(subcommand)]
    Modules(ModulesCmd),
    /// The routing table, route updates and dry runs (GetRoutingTable,
    /// UpdateRouting, RouteRequest).
    #[command(subcommand)]
    Routes(RoutesCmd),
    /// The NLB's status (GetNLBStatus).
    Status(StatusArgs),
    /// The NLB's health and its view of each instance (CheckHealth); exit 7 unless healthy.
    Health(HealthArgs),
    /// Time series: the NLB's and every instance's (GetNLBMetrics), one
    /// instance's (--module: GetModuleMetrics), or live (--watch: StreamNLBMetrics).
    Metrics(MetricsArgs),
    /// Load per instance and the balance score (GetLoadDistribution).
    Load(LoadArgs),
    /// Refresh capacity factors from the latest load reports (RebalanceLoad).
    Rebalance(RebalanceArgs),
    /// Ask a module type to scale (TriggerScaling).
    Scale(ScaleArgs),
    /// Config sections: show, validate, apply (GetNLBConfig, UpdateNLBConfig).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Canary and blue/green rollouts of a module type: start, status, list,
    /// promote, pause, resume, rollback, watch (StartRollout, GetRollout, ...).
    #[command(subcommand)]
    Rollout(RolloutCmd),
}

#[derive(Subcommand, Debug)]
pub enum ModulesCmd {
    /// List instances (sorted by id unless --sort).
    List(ModulesListArgs),
    /// One instance: registration, routes, stats, deployment and details.
    Show {
        /// Instance id.
        id: String,
    },
}

/// `Query` flags shared by the listings.
#[derive(Args, Debug, Clone, Default)]
pub struct QueryArgs {
    /// Filter rows: FIELD=VALUE (eq), or FIELD:OP:VALUE with OP one of eq, ne,
    /// gt, lt, in (comma-separated values), contains. Repeat to combine (and).
    #[arg(long = "filter", value_name = "EXPR", value_parser = parse_filter)]
    pub filters: Vec<pb::Filter>,
    /// Sort by a field (any filterable field).
    #[arg(long, value_name = "FIELD")]
    pub sort: Option<String>,
    /// Sort descending.
    #[arg(long, requires = "sort")]
    pub desc: bool,
    /// Page to show (1-based).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub page: Option<i32>,
    /// Rows per page (default 50, at most 1000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: Option<i32>,
}

#[derive(Args, Debug, Clone)]
pub struct ModulesListArgs {
    /// Only instances of this module type (alb, dblb, ailb, rtmp, nlb).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_module_type)]
    pub module_type: Option<ModuleType>,
    /// Only instances in this health status (healthy, degraded, unhealthy,
    /// starting, stopping, stopped).
    #[arg(long, value_name = "STATUS", value_parser = parse_health)]
    pub status: Option<HealthStatus>,
    #[command(flatten)]
    pub query: QueryArgs,
}

#[derive(Subcommand, Debug)]
pub enum RoutesCmd {
    /// The routing table: one row per (route, serving instance), in precedence order.
    Show(RoutesShowArgs),
    /// Add or replace operator routes from a YAML file (a list of routes as in
    /// the config's `routes:`, or a mapping with a `routes:` key; `-` = stdin).
    Apply(RoutesApplyArgs),
    /// Where would a connection go? Asks RouteRequest with dry_run (nothing
    /// is counted); exit 7 when it would not be routed.
    DryRun(DryRunArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RoutesShowArgs {
    /// Only routes whose destination pattern is, or matches, this name.
    #[arg(long, value_name = "NAME")]
    pub destination: Option<String>,
    /// Only routes of this protocol.
    #[arg(long, value_name = "PROTOCOL", value_parser = parse_protocol)]
    pub protocol: Option<Protocol>,
    #[command(flatten)]
    pub query: QueryArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RoutesApplyArgs {
    /// YAML (or JSON) file of routes; `-` reads stdin.
    pub file: PathBuf,
    /// Replace every operator route with the file's routes.
    #[arg(long)]
    pub replace_all: bool,
    /// Only validate, on the NLB, changing nothing.
    #[arg(long, visible_alias = "dry-run")]
    pub validate_only: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DryRunArgs {
    /// The connection's protocol as the NLB would detect it (http, https,
    /// http2, grpc, postgres, mysql, redis, tcp, ...).
    #[arg(long, value_name = "PROTOCOL", value_parser = parse_protocol)]
    pub protocol: Protocol,
    /// The listener port the connection arrives on (0 = none given).
    #[arg(long, default_value_t = 0, value_name = "PORT")]
    pub port: u16,
    /// The TLS SNI or HTTP/1 Host the client sends.
    #[arg(long, visible_alias = "sni", value_name = "NAME")]
    pub host: Option<String>,
    /// The client's address (IP or IP:port).
    #[arg(long, value_name = "ADDR")]
    pub client: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Also list every instance.
    #[arg(long)]
    pub modules: bool,
}

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Call every instance's HealthCheck with deep_check.
    #[arg(long)]
    pub deep: bool,
    /// Call every instance's HealthCheck (an unreachable one is unhealthy).
    #[arg(long)]
    pub modules: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// One instance's series (GetModuleMetrics).
    #[arg(long, value_name = "ID", conflicts_with_all = ["watch", "aggregate"])]
    pub module: Option<String>,
    /// Only these series names (repeat for more).
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Only points from this long ago until now: 90s, 15m, 2h, 1d (bare number = seconds).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "watch")]
    pub since: Option<Duration>,
    /// Five points per series (avg, min, max, sum, count) instead of every point.
    #[arg(long, conflicts_with = "watch")]
    pub aggregate: bool,
    /// Stream the NLB's current values until Ctrl-C (StreamNLBMetrics).
    #[arg(long)]
    pub watch: bool,
    /// Seconds between updates with --watch (default: the NLB's, 5 s).
    #[arg(long, requires = "watch", value_name = "SECONDS",
          value_parser = clap::value_parser!(i32).range(1..=3600))]
    pub interval: Option<i32>,
    /// With --watch, also each instance's latest points.
    #[arg(long, requires = "watch")]
    pub include_modules: bool,
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Only instances of this module type.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_module_type)]
    pub module_type: Option<ModuleType>,
    /// CPU, memory and latency averaged over the retained heartbeat samples.
    #[arg(long)]
    pub historical: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RebalanceArgs {
    /// How capacity factors are set.
    #[arg(long, value_name = "STRATEGY", value_parser = ["least_connections", "even"])]
    pub strategy: Option<String>,
    /// Tell overloaded instances to shed connections.
    #[arg(long)]
    pub force: bool,
    /// Only the instances of this module type (listed first, then named in
    /// the request; none registered is exit 5).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_module_type,
          conflicts_with = "instances")]
    pub module_type: Option<ModuleType>,
    /// Only these instances (repeat for more).
    #[arg(long = "instance", value_name = "ID")]
    pub instances: Vec<String>,
}

#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("action").required(true).args(["up", "down", "to", "autoscale", "no_autoscale"])))]
pub struct ScaleArgs {
    /// Module type to scale (alb, dblb, ailb, rtmp, nlb).
    #[arg(value_name = "TYPE", value_parser = parse_module_type)]
    pub module_type: ModuleType,
    /// One instance more (scale_up).
    #[arg(long)]
    pub up: bool,
    /// One instance fewer (scale_down).
    #[arg(long)]
    pub down: bool,
    /// Exactly N instances (scale_to).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..))]
    pub to: Option<i32>,
    /// Set the type's autoscaling policy and turn it on (autoscale); give
    /// --max and a target.
    #[arg(long, requires = "max", conflicts_with = "instance")]
    pub autoscale: bool,
    /// Turn the type's autoscaling policy off, keeping its settings.
    #[arg(long, conflicts_with_all = ["instance", "min", "max", "target_connections", "target_cpu", "cooldown"])]
    pub no_autoscale: bool,
    /// Autoscaling: at least N instances.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(i32).range(0..))]
    pub min: Option<i32>,
    /// Autoscaling: at most N instances.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(i32).range(1..))]
    pub max: Option<i32>,
    /// Autoscaling: target connections per instance.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(i32).range(1..))]
    pub target_connections: Option<i32>,
    /// Autoscaling: target CPU percent per instance.
    #[arg(long, value_name = "PERCENT",
          value_parser = clap::value_parser!(i32).range(1..=100))]
    pub target_cpu: Option<i32>,
    /// Autoscaling: seconds between scale-ups and between scale-downs.
    #[arg(long, value_name = "SECONDS",
          value_parser = clap::value_parser!(i32).range(1..))]
    pub cooldown: Option<i32>,
    /// The instance that carries out the scaling (default: the NLB picks one of the type).
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// The config in force, as YAML: one section, or all of them (a valid config file).
    Show {
        /// A top-level section (grpc, admin, state_file, registry, health,
        /// routing, backends, routes, traffic_weights, metrics).
        section: Option<String>,
    },
    /// Ask the NLB whether FILE is a valid SECTION, changing nothing.
    Validate {
        section: String,
        /// The section's value as YAML or JSON; `-` reads stdin.
        file: PathBuf,
    },
    /// Replace SECTION with FILE (sent with its SHA-256 checksum). An empty
    /// file gives the section back to the config file.
    Apply {
        section: String,
        /// The section's value as YAML or JSON; `-` reads stdin.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Start moving a module type's traffic to a canary version, step by
    /// step with analysis, or at once with --blue-green (StartRollout).
    Start(RolloutStartArgs),
    /// One rollout: versions, state, step and its recent events (GetRollout).
    Status {
        /// Rollout id.
        id: String,
    },
    /// Rollouts, oldest first (ListRollouts).
    List(RolloutListArgs),
    /// Move on to the next step now, or to 100% with --full (PromoteRollout).
    Promote {
        /// Rollout id.
        id: String,
        /// All the way to 100 percent, finishing the rollout.
        #[arg(long)]
        full: bool,
    },
    /// Hold the canary at its current weight (PauseRollout).
    Pause {
        /// Rollout id.
        id: String,
        /// Why, kept with the rollout.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Carry on from the current step (ResumeRollout).
    Resume {
        /// Rollout id.
        id: String,
    },
    /// Send all traffic back to the baseline (RollbackRollout).
    Rollback {
        /// Rollout id.
        id: String,
        /// Why, kept with the rollout.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Print the rollout's events as they happen until it finishes (WatchRollout):
    /// exit 0 when it succeeds, 7 when it is rolled back.
    Watch {
        /// Rollout id.
        id: String,
        /// Only events after this sequence number (default: every kept event).
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
    },
}

#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("thresholds").multiple(true).args([
    "max_error_rate", "max_error_rate_increase", "max_p99_ms", "max_p99_ratio",
])))]
pub struct RolloutStartArgs {
    /// Module type whose traffic moves (alb, dblb, ailb, rtmp).
    #[arg(value_name = "TYPE", value_parser = parse_module_type)]
    pub module_type: ModuleType,
    /// The version traffic moves to (with --blue-green: green).
    #[arg(long, value_name = "VERSION")]
    pub canary: String,
    /// The version traffic moves from (with --blue-green: blue). Default: the
    /// only version now taking the type's traffic.
    #[arg(long, value_name = "VERSION")]
    pub baseline: Option<String>,
    /// The canary's steps as WEIGHT:HOLD,... with WEIGHT a percent (1 to 100,
    /// rising) and HOLD seconds (or 90s, 15m, 2h; at most 1d; 0 = move on at
    /// the first passing analysis). Default: the NLB's, 10:60,25:60,50:60,100:60.
    #[arg(long, value_name = "STEPS", value_parser = parse_steps)]
    pub steps: Option<Steps>,
    /// Seconds of each analysis window, at most 3600 (default: the NLB's, 10).
    /// Needs a threshold (--max-*).
    #[arg(long, value_name = "SECONDS", requires = "thresholds",
          value_parser = clap::value_parser!(i32).range(1..=3600))]
    pub interval: Option<i32>,
    /// Canary requests (or connections) a window needs to be judged
    /// (default: the NLB's, 20). Needs a threshold (--max-*).
    #[arg(long, value_name = "N", requires = "thresholds",
          value_parser = clap::value_parser!(i64).range(1..))]
    pub min_requests: Option<i64>,
    /// Roll back when the canary's error rate in a window is above this:
    /// a fraction (0.05) or a percent (5%); 0 = not checked. Without any
    /// --max-* flag the NLB checks an error rate above 5% alone; with one,
    /// only the thresholds given are checked.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_error_rate: Option<f64>,
    /// Roll back when the canary's error rate is this much above the
    /// baseline's: a fraction (0.01) or a percent (1%).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_error_rate_increase: Option<f64>,
    /// Roll back when the canary's p99 latency is above this many milliseconds.
    #[arg(long = "max-p99-ms", value_name = "MS", value_parser = parse_positive)]
    pub max_p99_ms: Option<f64>,
    /// Roll back when the canary's p99 is above this multiple of the baseline's (e.g. 1.5).
    #[arg(long = "max-p99-ratio", value_name = "RATIO", value_parser = parse_positive)]
    pub max_p99_ratio: Option<f64>,
    /// A client that reached the canary stays there as its weight rises.
    #[arg(long)]
    pub sticky: bool,
    /// The rollout's id (default: the NLB makes one).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Switch at once, without steps or analysis: --canary is green,
    /// --baseline blue, and green gets --weight percent.
    #[arg(long, conflicts_with_all = [
        "steps", "interval", "min_requests", "max_error_rate",
        "max_error_rate_increase", "max_p99_ms", "max_p99_ratio", "sticky",
    ])]
    pub blue_green: bool,
    /// With --blue-green: green's share in percent, 1 to 100 (blue gets the rest).
    #[arg(long, value_name = "PERCENT", requires = "blue_green", default_value_t = 100,
          value_parser = clap::value_parser!(i32).range(1..=100))]
    pub weight: i32,
}

#[derive(Args, Debug, Clone)]
pub struct RolloutListArgs {
    /// Only rollouts of this module type.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_module_type)]
    pub module_type: Option<ModuleType>,
    /// Only rollouts that have not finished (running or paused).
    #[arg(long)]
    pub active: bool,
}

/// The steps of `rollout start --steps`, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Steps(pub Vec<pb::RolloutStep>);

/// The longest hold of one step (the contract's limit).
const MAX_HOLD_SECONDS: u64 = 86_400;

/// `WEIGHT:HOLD,WEIGHT:HOLD,...`: weights are whole percents, 1 to 100,
/// rising strictly; holds are [`parse_duration`]s up to a day. An error
/// names the step (counted from 1) and what is wrong with it.
pub fn parse_steps(s: &str) -> Result<Steps, String> {
    if s.trim().is_empty() {
        return Err("no steps: write WEIGHT:HOLD,... (e.g. 10:60,50:120,100:0)".into());
    }
    let mut steps: Vec<pb::RolloutStep> = Vec::new();
    for (i, item) in s.split(',').enumerate() {
        let n = i + 1;
        let item = item.trim();
        let Some((weight, hold)) = item.split_once(':') else {
            return Err(format!(
                "step {n} {item:?} is not WEIGHT:HOLD (e.g. 25:60, 25 percent for 60 seconds)"
            ));
        };
        let weight: i32 = weight
            .trim()
            .parse()
            .ok()
            .filter(|w| (1..=100).contains(w))
            .ok_or_else(|| {
                format!("step {n} {item:?}: the weight {weight:?} is not a percent from 1 to 100")
            })?;
        let hold = parse_duration(hold)
            .ok()
            .filter(|d| d.as_secs() <= MAX_HOLD_SECONDS)
            .ok_or_else(|| {
                format!(
                    "step {n} {item:?}: the hold {hold:?} is not seconds (or 90s, 15m, 2h) \
                     from 0 to 1d"
                )
            })?;
        if let Some(prev) = steps.last() {
            if weight <= prev.canary_weight {
                return Err(format!(
                    "step {n} {item:?}: weights must rise, and {weight} is not above the \
                     previous step's {}",
                    prev.canary_weight
                ));
            }
        }
        steps.push(pb::RolloutStep {
            canary_weight: weight,
            hold_seconds: i32::try_from(hold.as_secs()).unwrap_or(i32::MAX),
        });
    }
    Ok(Steps(steps))
}

/// A fraction from 0 to 1 (`0.05`), or a percent (`5%`).
fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (number, scale) = match t.strip_suffix('%') {
        Some(p) => (p.trim(), 100.0),
        None => (t, 1.0),
    };
    number
        .parse::<f64>()
        .ok()
        .map(|v| v / scale)
        .filter(|v| (0.0..=1.0).contains(v))
        .ok_or_else(|| {
            format!("{s:?} is not a rate: a fraction from 0 to 1 (0.05) or a percent (5%)")
        })
}

/// A number above 0.
fn parse_positive(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("{s:?} is not a number above 0"))
}

fn parse_module_type(s: &str) -> Result<ModuleType, String> {
    ModuleType::parse_name(s).map_err(|e| e.to_string())
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::parse_name(s).map_err(|e| e.to_string())
}

fn parse_health(s: &str) -> Result<HealthStatus, String> {
    HealthStatus::parse_name(s).map_err(|e| e.to_string())
}

/// Operators of `Filter.operator`.
const OPERATORS: &[&str] = &["eq", "ne", "gt", "lt", "in", "contains"];

/// `FIELD=VALUE` or `FIELD:OP:VALUE`.
pub fn parse_filter(s: &str) -> Result<pb::Filter, String> {
    let filter = |field: &str, op: &str, value: &str| pb::Filter {
        field: field.trim().to_string(),
        operator: op.to_string(),
        value: value.to_string(),
    };
    if let Some((field, rest)) = s.split_once(':') {
        if let Some((op, value)) = rest.split_once(':') {
            if OPERATORS.contains(&op) && !field.trim().is_empty() && !field.contains('=') {
                return Ok(filter(field, op, value));
            }
        }
    }
    match s.split_once('=') {
        Some((field, value)) if !field.trim().is_empty() => Ok(filter(field, "eq", value)),
        _ => Err(format!(
            "{s:?} is not a filter: write FIELD=VALUE or FIELD:OP:VALUE (OP: {})",
            OPERATORS.join(", ")
        )),
    }
}

/// A per-call deadline; `None` = no deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Option<Duration>);

/// Seconds as a decimal number; 0 = no deadline.
fn parse_seconds(s: &str) -> Result<Deadline, String> {
    let n: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&n) {
        return Err(format!("{s:?} must be 0 (no deadline) to 86400 seconds"));
    }
    Ok(Deadline((n > 0.0).then(|| Duration::from_secs_f64(n))))
}

/// `90`, `90s`, `15m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (digits, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| t.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 15m, 2h, 1d)"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn filters_parse_both_forms() {
        let f = parse_filter("version=v2").unwrap();
        assert_eq!(
            (f.field.as_str(), f.operator.as_str(), f.value.as_str()),
            ("version", "eq", "v2")
        );
        let f = parse_filter("instance_id:in:alb-1,alb-2").unwrap();
        assert_eq!(
            (f.field.as_str(), f.operator.as_str(), f.value.as_str()),
            ("instance_id", "in", "alb-1,alb-2")
        );
        let f = parse_filter("current_connections:gt:5").unwrap();
        assert_eq!(f.operator, "gt");
        // A colon in the value of an eq filter stays in the value.
        let f = parse_filter("metadata.data_address=127.0.0.1:80").unwrap();
        assert_eq!(
            (f.field.as_str(), f.value.as_str()),
            ("metadata.data_address", "127.0.0.1:80")
        );
        assert!(parse_filter("version").is_err());
        assert!(parse_filter("=v1").is_err());
    }

    #[test]
    fn durations_and_seconds_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(parse_seconds("0"), Ok(Deadline(None)));
        assert_eq!(
            parse_seconds("2.5"),
            Ok(Deadline(Some(Duration::from_millis(2500))))
        );
        assert!(parse_seconds("-1").is_err());
    }

    fn steps(s: &str) -> Vec<(i32, i32)> {
        parse_steps(s)
            .unwrap()
            .0
            .iter()
            .map(|s| (s.canary_weight, s.hold_seconds))
            .collect()
    }

    #[test]
    fn rollout_steps_parse() {
        assert_eq!(
            steps("10:60,25:60,50:120,100:0"),
            [(10, 60), (25, 60), (50, 120), (100, 0)]
        );
        assert_eq!(
            steps(" 5:90s, 50 : 15m ,100:1d"),
            [(5, 90), (50, 900), (100, 86_400)]
        );
        assert_eq!(steps("100:0"), [(100, 0)]);
    }

    #[test]
    fn bad_rollout_steps_are_named() {
        let e = |s: &str| parse_steps(s).unwrap_err();
        assert!(e("").contains("no steps"), "{}", e(""));
        let m = e("10:60,25");
        assert!(m.starts_with("step 2 \"25\" is not WEIGHT:HOLD"), "{m}");
        let m = e("10:60,0:60");
        assert!(m.starts_with("step 2 \"0:60\": the weight \"0\""), "{m}");
        let m = e("101:60");
        assert!(m.starts_with("step 1 \"101:60\": the weight"), "{m}");
        let m = e("ten:60");
        assert!(m.contains("\"ten\" is not a percent"), "{m}");
        let m = e("10:60,50:soon");
        assert!(
            m.starts_with("step 2 \"50:soon\": the hold \"soon\""),
            "{m}"
        );
        let m = e("10:2d");
        assert!(m.contains("from 0 to 1d"), "{m}");
        let m = e("10:-5");
        assert!(m.contains("the hold \"-5\""), "{m}");
        let m = e("10:60,50:60,50:60");
        assert!(
            m.starts_with("step 3 \"50:60\": weights must rise")
                && m.contains("previous step's 50"),
            "{m}"
        );
        let m = e("50:60,25:60");
        assert!(m.contains("25 is not above the previous step's 50"), "{m}");
        let m = e("10:60,");
        assert!(m.starts_with("step 2 \"\" is not WEIGHT:HOLD"), "{m}");
        // Through clap: a usage error naming the step.
        let err = Cli::try_parse_from([
            "nlbctl", "rollout", "start", "alb", "--canary", "v2", "--steps", "10:60,x",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("step 2 \"x\""), "{err}");
    }

    fn rollout_start(args: &[&str]) -> Result<RolloutStartArgs, clap::Error> {
        let mut all = vec!["nlbctl", "rollout", "start"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.command {
            Command::Rollout(RolloutCmd::Start(a)) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn rollout_start_takes_a_canary_form_and_a_blue_green_form() {
        let a = rollout_start(&[
            "DBLB",
            "--canary",
            "v2",
            "--baseline",
            "v1",
            "--steps",
            "20:30,100:0",
            "--interval",
            "15",
            "--min-requests",
            "50",
            "--max-error-rate",
            "5%",
            "--max-error-rate-increase",
            "0.01",
            "--max-p99-ms",
            "250",
            "--max-p99-ratio",
            "1.5",
            "--sticky",
            "--id",
            "r-7",
        ])
        .unwrap();
        assert_eq!(a.module_type, ModuleType::Dblb);
        assert_eq!(
            (a.canary.as_str(), a.baseline.as_deref()),
            ("v2", Some("v1"))
        );
        assert_eq!(a.steps.unwrap().0.len(), 2);
        assert_eq!((a.interval, a.min_requests), (Some(15), Some(50)));
        assert_eq!(a.max_error_rate, Some(0.05));
        assert_eq!(a.max_error_rate_increase, Some(0.01));
        assert_eq!((a.max_p99_ms, a.max_p99_ratio), (Some(250.0), Some(1.5)));
        assert!(a.sticky && !a.blue_green);
        assert_eq!(a.id.as_deref(), Some("r-7"));

        let a = rollout_start(&["alb", "--blue-green", "--canary", "v2"]).unwrap();
        assert!(a.blue_green);
        assert_eq!(a.weight, 100, "all of it by default");
        let a =
            rollout_start(&["alb", "--blue-green", "--canary", "v2", "--weight", "30"]).unwrap();
        assert_eq!(a.weight, 30);

        // Usage errors.
        let usage = |args: &[&str]| {
            let e = rollout_start(args).unwrap_err();
            assert!(e.use_stderr(), "{args:?}");
            e.kind()
        };
        use clap::error::ErrorKind::*;
        assert_eq!(
            usage(&["alb"]),
            MissingRequiredArgument,
            "--canary is required"
        );
        assert_eq!(usage(&["nginx", "--canary", "v2"]), ValueValidation);
        assert_eq!(
            usage(&["alb", "--canary", "v2", "--weight", "30"]),
            MissingRequiredArgument
        );
        for with in [
            &["--steps", "100:0"][..],
            &["--sticky"],
            &["--interval", "5"],
            &["--max-error-rate", "0.1"],
        ] {
            let mut args = vec!["alb", "--blue-green", "--canary", "v2"];
            args.extend_from_slice(with);
            assert_eq!(usage(&args), ArgumentConflict, "{with:?}");
        }
        for bad in [
            &["--max-error-rate", "1.5"][..],
            &["--max-error-rate", "120%"],
            &["--max-p99-ms", "0"],
            &["--max-p99-ratio=-1"],
            &["--interval", "0"],
            &["--interval", "3601", "--max-p99-ms", "300"],
            &["--min-requests", "0"],
        ] {
            let mut args = vec!["alb", "--canary", "v2"];
            args.extend_from_slice(bad);
            assert_eq!(usage(&args), ValueValidation, "{bad:?}");
        }
        // The window alone would check nothing: a threshold is needed (0 = off).
        for alone in [&["--interval", "30"][..], &["--min-requests", "50"]] {
            let mut args = vec!["alb", "--canary", "v2"];
            args.extend_from_slice(alone);
            assert_eq!(usage(&args), MissingRequiredArgument, "{alone:?}");
            args.extend_from_slice(&["--max-error-rate", "0"]);
            assert_eq!(rollout_start(&args).unwrap().max_error_rate, Some(0.0));
        }
        let mut args = vec!["alb", "--blue-green", "--canary", "v2", "--weight"];
        for w in ["0", "101"] {
            args.push(w);
            assert_eq!(usage(&args), ValueValidation, "--weight {w}");
            args.pop();
        }
    }

    #[test]
    fn rollout_commands_take_an_id() {
        let cli =
            Cli::try_parse_from(["nlbctl", "rollout", "watch", "r-1", "--after", "7"]).unwrap();
        assert!(
            matches!(cli.command, Command::Rollout(RolloutCmd::Watch { ref id, after: 7 }) if id == "r-1")
        );
        let cli = Cli::try_parse_from(["nlbctl", "rollout", "pause", "r-1", "--reason", "lunch"])
            .unwrap();
        assert!(
            matches!(cli.command, Command::Rollout(RolloutCmd::Pause { reason: Some(ref r), .. }) if r == "lunch")
        );
        for args in [
            &["rollout", "status"][..],
            &["rollout", "promote"],
            &["rollout", "watch", "r-1", "--after", "-1"],
            &["rollout", "list", "--type", "nginx"],
            &["rollout", "resume", "r-1", "--reason", "x"],
        ] {
            let mut all = vec!["nlbctl"];
            all.extend_from_slice(args);
            assert!(Cli::try_parse_from(all).is_err(), "{args:?}");
        }
    }

    #[test]
    fn global_flags_go_anywhere_and_usage_errors_are_caught() {
        let cli =
            Cli::try_parse_from(["nlbctl", "modules", "list", "--json", "--type", "alb"]).unwrap();
        assert!(cli.global.json);
        let cli = Cli::try_parse_from(["nlbctl", "--addr", "h:1", "status"]).unwrap();
        assert_eq!(cli.global.addr, "h:1");
        assert!(Cli::try_parse_from(["nlbctl", "modules", "list", "--type", "nginx"]).is_err());
        assert!(
            Cli::try_parse_from(["nlbctl", "scale", "alb"]).is_err(),
            "an action is required"
        );
        assert!(Cli::try_parse_from(["nlbctl", "scale", "alb", "--up", "--to", "3"]).is_err());
        assert!(
            Cli::try_parse_from(["nlbctl", "scale", "alb", "--autoscale"]).is_err(),
            "a policy needs --max"
        );
        assert!(
            Cli::try_parse_from(["nlbctl", "scale", "alb", "--no-autoscale", "--max", "3"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "nlbctl",
            "scale",
            "alb",
            "--autoscale",
            "--max",
            "4",
            "--target-connections",
            "100"
        ])
        .is_ok());
        assert!(Cli::try_parse_from(["nlbctl", "metrics", "--interval", "5"]).is_err());
        assert!(Cli::try_parse_from(["nlbctl", "metrics", "--watch", "--module", "a"]).is_err());
    }
}
