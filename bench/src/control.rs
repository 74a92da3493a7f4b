//! The `control` benchmark's runs: RouteRequest and Heartbeat closed loops
//! and the fleet, each printing what it measured and a `RESULT` line.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use shared_types::pb;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{connect, Auth, Client};
use crate::fleet::{self, FleetPlan};
use crate::load::{closed_loop, status_kind, Outcome, Plan};
use crate::proc_stat::CpuMark;
use crate::report::{ms, percentiles, result_line};
use crate::scenario;

/// Where the NLB is, the credentials to send, and over how many connections.
#[derive(Args, Clone)]
pub struct Target {
    /// The NLB's gRPC address (loopback).
    #[arg(long)]
    pub addr: String,
    /// Sent as `authorization: Bearer` by module calls (register, heartbeat).
    #[arg(long, env = "BENCH_MODULE_TOKEN", hide_env_values = true)]
    pub module_token: Option<String>,
    /// Sent as `authorization: Bearer` by operator calls (RouteRequest).
    #[arg(long, env = "BENCH_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

/// A closed-loop run (`route`, `heartbeat`).
#[derive(Args, Clone)]
pub struct LoadArgs {
    #[command(flatten)]
    pub target: Target,
    /// Calls in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Upper bound on calls sent (warm-up included).
    #[arg(long, default_value_t = 20_000_000)]
    pub max_calls: u64,
    /// Instances registered first (RouteRequest: the servers of the routes;
    /// Heartbeat: the instances beating, in rotation).
    #[arg(long)]
    pub instances: Option<usize>,
    /// The NLB's process id: also report its CPU over the measured window.
    #[arg(long)]
    pub nlb_pid: Option<u32>,
}

/// A fleet run.
#[derive(Args, Clone)]
pub struct FleetArgs {
    #[command(flatten)]
    pub target: Target,
    /// The NLB's process id, for its CPU time.
    #[arg(long)]
    pub nlb_pid: u32,
    #[arg(long, default_value_t = 10_000)]
    pub instances: usize,
    /// Heartbeat interval of each instance, in seconds.
    #[arg(long, default_value_t = 1)]
    pub interval_secs: u32,
    #[arg(long, default_value_t = 64)]
    pub register_concurrency: usize,
    #[arg(long, default_value_t = 3)]
    pub settle_secs: u64,
    #[arg(long, default_value_t = 30)]
    pub window_secs: u64,
    /// The whole fleet must be registered within this many seconds.
    #[arg(long, default_value_t = 600)]
    pub register_deadline_secs: u64,
    /// Heartbeat over one `HeartbeatStream` per instance (the Switchyard
    /// extension) instead of unary `Heartbeat` calls.
    #[arg(long)]
    pub stream: bool,
}

/// `off`, `on`, or `on-not-enforced` when tokens are sent but a call without
/// one is still served (an NLB build without auth ignores the tokens).
async fn auth_label(client: &Client, t: &Target) -> &'static str {
    if t.module_token.is_none() && t.operator_token.is_none() {
        return "off";
    }
    let probe = pb::ListModulesRequest {
        query: Some(pb::Query {
            pagination: Some(pb::Pagination {
                page: 1,
                page_size: 1,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    match client.clone().list_modules(probe).await {
        Ok(_) => "on-not-enforced",
        Err(_) => "on",
    }
}

/// Registers `n` instances (`prefix-0` ...) and returns (id, registration id).
async fn register_all(
    clients: &[Client],
    auth: &Auth,
    prefix: &str,
    n: usize,
    interval_seconds: i32,
) -> Result<(Vec<(String, String)>, Duration)> {
    let begin = Instant::now();
    let limit = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = clients[i % clients.len()].clone();
        let auth = auth.clone();
        let limit = Arc::clone(&limit);
        let req = scenario::registration(prefix, i, interval_seconds);
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.expect("semaphore open");
            let id = req
                .instance
                .as_ref()
                .map(|i| i.instance_id.clone())
                .unwrap_or_default();
            let r = client.register_module(auth.request(req)).await;
            r.map(|r| (id, r.into_inner().registration_id))
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        match t.await? {
            Ok(pair) => out.push(pair),
            Err(e) => bail!("RegisterModule failed: {}", status_kind(&e).1),
        }
    }
    Ok((out, begin.elapsed()))
}

fn plan(a: &LoadArgs) -> Plan {
    Plan {
        concurrency: a.concurrency,
        warmup: Duration::from_secs(a.warmup_secs),
        duration: Duration::from_secs(a.duration_secs),
        max_calls: a.max_calls,
    }
}

/// CPU of the NLB and of this client over the measured window (which
/// starts after the warm-up), as percentages of one core.
#[derive(Debug, Clone, Copy)]
struct WindowCpu {
    nlb: f64,
    client: f64,
}

/// Starts measuring CPU over the window a load with `a`'s timings measures.
fn measure_cpu(a: &LoadArgs) -> Option<tokio::task::JoinHandle<Result<WindowCpu>>> {
    let pid = a.nlb_pid?;
    let (warmup, duration) = (
        Duration::from_secs(a.warmup_secs),
        Duration::from_secs(a.duration_secs),
    );
    Some(tokio::spawn(async move {
        tokio::time::sleep(warmup).await;
        let (nlb0, me0) = (CpuMark::now(pid)?, CpuMark::now(std::process::id())?);
        tokio::time::sleep(duration).await;
        let (nlb1, me1) = (CpuMark::now(pid)?, CpuMark::now(std::process::id())?);
        Ok(WindowCpu {
            nlb: nlb0.percent_of_one_core_until(&nlb1).0,
            client: me0.percent_of_one_core_until(&me1).0,
        })
    }))
}

async fn window_cpu(h: Option<tokio::task::JoinHandle<Result<WindowCpu>>>) -> Option<WindowCpu> {
    match h?.await {
        Ok(Ok(cpu)) => Some(cpu),
        Ok(Err(e)) => {
            eprintln!("CPU not measured: {e:#}");
            None
        }
        Err(e) => {
            eprintln!("CPU not measured: {e}");
            None
        }
    }
}

fn print_outcome(bench: &str, auth: &str, a: &LoadArgs, o: &Outcome, cpu: Option<WindowCpu>) {
    let (p50, p99) = percentiles(&o.latency);
    println!(
        "{bench} (auth {auth}): {:.0} calls/s over {:.1}s, {} in flight on {} connections; \
         latency p50 {p50} ms, p99 {p99} ms, max {} ms; {} ok, {} errors{}",
        o.per_second(),
        o.window.as_secs_f64(),
        a.concurrency,
        a.target.connections,
        ms(o.latency.max()),
        o.ok,
        o.errors.total(),
        if o.hit_max_calls {
            " (stopped by --max-calls)"
        } else {
            ""
        }
    );
    if o.errors.total() > 0 {
        print!("{}", o.errors.describe());
    }
    let mut fields = vec![
        ("rps", format!("{:.0}", o.per_second())),
        ("p50_ms", p50),
        ("p99_ms", p99),
        ("errors", o.errors.total().to_string()),
        ("concurrency", a.concurrency.to_string()),
        ("connections", a.target.connections.to_string()),
        ("seconds", format!("{:.1}", o.window.as_secs_f64())),
    ];
    if let Some(cpu) = cpu {
        // CPU time per answered call: comparable across loads and machines
        // busy with other work, unlike calls per second.
        let per_call_us = |pct: f64| pct / 100.0 * 1e6 / o.per_second().max(1e-9);
        println!(
            "{bench} (auth {auth}): NLB CPU {:.0}% of one core ({:.1} us per call); load client {:.0}% ({:.1} us per call)",
            cpu.nlb,
            per_call_us(cpu.nlb),
            cpu.client,
            per_call_us(cpu.client),
        );
        fields.push(("nlb_cpu_pct", format!("{:.0}", cpu.nlb)));
        fields.push(("nlb_us_per_call", format!("{:.1}", per_call_us(cpu.nlb))));
        fields.push((
            "client_us_per_call",
            format!("{:.1}", per_call_us(cpu.client)),
        ));
    }
    result_line(bench, auth, &fields);
}

pub async fn route(a: LoadArgs) -> Result<()> {
    let clients = connect(&a.target.addr, a.target.connections).await?;
    let label = auth_label(&clients[0], &a.target).await;
    let module_auth = Auth::bearer(a.target.module_token.as_deref())?;
    let operator_auth = Auth::bearer(a.target.operator_token.as_deref())?;
    let n = a.instances.unwrap_or(12);
    let (_, took) = register_all(&clients, &module_auth, "route", n, 3600).await?;
    println!(
        "route: {n} instances registered in {:.2}s; routing table: the config's 5 routes and 3 announced",
        took.as_secs_f64()
    );
    let requests = Arc::new(scenario::route_requests());
    let clients = Arc::new(clients);
    let cpu = measure_cpu(&a);
    let outcome = closed_loop(plan(&a), move |w, seq| {
        let mut client = clients[w % clients.len()].clone();
        let msg = requests[(w + seq as usize) % requests.len()].clone();
        let req = operator_auth.request(msg);
        async move {
            match client.route_request(req).await {
                Ok(r) if r.get_ref().routed => Ok(()),
                Ok(r) => Err(("not routed".to_string(), r.into_inner().message)),
                Err(e) => Err(status_kind(&e)),
            }
        }
    })
    .await;
    print_outcome("route_request", label, &a, &outcome, window_cpu(cpu).await);
    Ok(())
}

pub async fn heartbeat(a: LoadArgs) -> Result<()> {
    let clients = connect(&a.target.addr, a.target.connections).await?;
    let label = auth_label(&clients[0], &a.target).await;
    let auth = Auth::bearer(a.target.module_token.as_deref())?;
    let n = a.instances.unwrap_or(1000).max(1);
    // A long interval: the instances stay healthy whatever the beat order.
    let (ids, took) = register_all(&clients, &auth, "hb", n, 60).await?;
    println!(
        "heartbeat: {n} instances registered in {:.2}s",
        took.as_secs_f64()
    );
    let ids = Arc::new(ids);
    let clients = Arc::new(clients);
    let concurrency = a.concurrency.max(1);
    let cpu = measure_cpu(&a);
    let outcome = closed_loop(plan(&a), move |w, seq| {
        let mut client = clients[w % clients.len()].clone();
        let (id, reg) = &ids[(w + seq as usize * concurrency) % ids.len()];
        let req = auth.request(scenario::heartbeat(id, reg, seq));
        async move {
            match client.heartbeat(req).await {
                Ok(r) if r.get_ref().acknowledged => Ok(()),
                Ok(r) => Err(("not acknowledged".to_string(), r.into_inner().message)),
                Err(e) => Err(status_kind(&e)),
            }
        }
    })
    .await;
    print_outcome("heartbeat", label, &a, &outcome, window_cpu(cpu).await);
    Ok(())
}

pub async fn fleet_run(a: FleetArgs) -> Result<()> {
    let clients = connect(&a.target.addr, a.target.connections).await?;
    let label = auth_label(&clients[0], &a.target).await;
    let auth = Auth::bearer(a.target.module_token.as_deref())?;
    let plan = FleetPlan {
        instances: a.instances,
        interval_seconds: a.interval_secs,
        register_concurrency: a.register_concurrency,
        settle: Duration::from_secs(a.settle_secs),
        window: Duration::from_secs(a.window_secs),
        register_deadline: Duration::from_secs(a.register_deadline_secs),
        stream: a.stream,
    };
    let name = if a.stream { "fleet-stream" } else { "fleet" };
    let o = fleet::run(clients, auth, a.nlb_pid, plan).await?;
    let (reg_p50, reg_p99) = percentiles(&o.register_latency);
    let (p50, p99) = percentiles(&o.beat_latency);
    println!(
        "{name} (auth {label}): {} of {} instances registered in {:.2}s ({:.0}/s; {} in flight; \
         latency p50 {reg_p50} ms, p99 {reg_p99} ms, max {} ms; {} errors)",
        o.registered,
        a.instances,
        o.registration_time.as_secs_f64(),
        o.registered as f64 / o.registration_time.as_secs_f64().max(1e-9),
        a.register_concurrency,
        ms(o.register_latency.max()),
        o.register_errors.total(),
    );
    print!("{}", o.register_errors.describe());
    println!(
        "{name} (auth {label}): over {:.1}s, heartbeats every {}s each: {} answered of {} scheduled \
         (latency p50 {p50} ms, p99 {p99} ms; {} errors); NLB CPU {:.1}% of one core \
         (load client {:.1}%)",
        o.window.as_secs_f64(),
        a.interval_secs,
        o.beats_ok,
        o.beats_expected,
        o.beat_errors.total(),
        o.nlb_cpu_percent,
        o.client_cpu_percent,
    );
    print!("{}", o.beat_errors.describe());
    let beats_per_s = o.beats_ok as f64 / o.window.as_secs_f64().max(1e-9);
    let us_per_beat = o.nlb_cpu_percent / 100.0 * 1e6 / beats_per_s.max(1e-9);
    println!(
        "{name} (auth {label}): NLB CPU per heartbeat {us_per_beat:.1} us; NLB resident memory {:.0} MiB",
        o.nlb_rss_mib
    );
    result_line(
        name,
        label,
        &[
            ("instances", o.registered.to_string()),
            (
                "register_s",
                format!("{:.2}", o.registration_time.as_secs_f64()),
            ),
            ("register_p99_ms", reg_p99),
            ("beats_per_s", format!("{beats_per_s:.0}")),
            ("beat_p99_ms", p99),
            (
                "errors",
                (o.register_errors.total() + o.beat_errors.total()).to_string(),
            ),
            ("nlb_cpu_pct", format!("{:.1}", o.nlb_cpu_percent)),
            ("nlb_us_per_beat", format!("{us_per_beat:.1}")),
            ("nlb_rss_mib", format!("{:.0}", o.nlb_rss_mib)),
            ("window_s", format!("{:.1}", o.window.as_secs_f64())),
        ],
    );
    Ok(())
}
