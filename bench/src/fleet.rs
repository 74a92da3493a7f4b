//! A fleet of module instances, each registering then heartbeating at its
//! interval like a real module, their beats spread evenly over the interval.
//! Once every instance is registered (and a settle period has passed), the
//! NLB's CPU is measured over a window from `/proc/<pid>/stat`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};

use crate::client::{Auth, Client};
use crate::load::status_kind;
use crate::proc_stat::{rss_mib, CpuMark};
use crate::report::{new_histogram, record, Errors};
use crate::scenario;

#[derive(Debug, Clone, Copy)]
pub struct FleetPlan {
    pub instances: usize,
    /// Heartbeat interval of every instance (promised in its registration).
    pub interval_seconds: u32,
    /// Registrations in flight at once.
    pub register_concurrency: usize,
    /// Pause between the last registration and the measured window.
    pub settle: Duration,
    pub window: Duration,
    /// Registration of the whole fleet must end within this, or the run stops.
    pub register_deadline: Duration,
    /// Beat over one `HeartbeatStream` per instance instead of unary calls.
    pub stream: bool,
}

#[derive(Debug)]
pub struct FleetOutcome {
    pub registered: usize,
    pub registration_time: Duration,
    pub register_latency: Histogram<u64>,
    pub register_errors: Errors,
    /// Heartbeats sent and answered inside the window.
    pub beats_ok: u64,
    pub beat_errors: Errors,
    pub beat_latency: Histogram<u64>,
    /// Beats the schedule called for inside the window.
    pub beats_expected: u64,
    pub nlb_cpu_percent: f64,
    pub client_cpu_percent: f64,
    pub window: Duration,
    /// The NLB's resident memory at the end of the window.
    pub nlb_rss_mib: f64,
}

#[derive(Default)]
struct Shared {
    register_latency: Option<Histogram<u64>>,
    register_errors: Errors,
    beat_latency: Option<Histogram<u64>>,
    beat_errors: Errors,
    beats_ok: u64,
}

/// Runs the fleet against the NLB at `clients` (process `nlb_pid`).
pub async fn run(
    clients: Vec<Client>,
    auth: Auth,
    nlb_pid: u32,
    plan: FleetPlan,
) -> Result<FleetOutcome> {
    let n = plan.instances.max(1);
    let interval = Duration::from_secs(u64::from(plan.interval_seconds.max(1)));
    let begin = Instant::now();
    let hard_stop = begin + plan.register_deadline + plan.settle + plan.window;
    let window: Arc<OnceLock<(Instant, Instant)>> = Arc::new(OnceLock::new());
    let shared = Arc::new(Mutex::new(Shared {
        register_latency: Some(new_histogram()),
        beat_latency: Some(new_histogram()),
        ..Shared::default()
    }));
    let registered = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(Semaphore::new(plan.register_concurrency.max(1)));

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = clients[i % clients.len()].clone();
        let (auth, window, shared) = (auth.clone(), Arc::clone(&window), Arc::clone(&shared));
        let (registered, finished, limit) = (
            Arc::clone(&registered),
            Arc::clone(&finished),
            Arc::clone(&limit),
        );
        let req = scenario::registration("fleet", i, plan.interval_seconds as i32);
        // This instance's place in the interval: beats spread evenly.
        let phase = interval.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            let permit = limit.acquire().await.expect("semaphore open");
            let id = req
                .instance
                .as_ref()
                .map(|i| i.instance_id.clone())
                .unwrap_or_default();
            let sent = Instant::now();
            let answer = client.register_module(auth.request(req)).await;
            drop(permit);
            let reg_id = {
                let mut s = shared.lock().expect("not poisoned");
                match answer {
                    Ok(r) => {
                        record(s.register_latency.as_mut().expect("set"), sent.elapsed());
                        Some(r.into_inner().registration_id)
                    }
                    Err(e) => {
                        let (kind, msg) = status_kind(&e);
                        s.register_errors.add(&kind, || msg);
                        None
                    }
                }
            };
            finished.fetch_add(1, Ordering::Relaxed);
            let Some(reg_id) = reg_id else { return };
            registered.fetch_add(1, Ordering::Relaxed);
            // With `stream`, one HeartbeatStream for the instance's life.
            let mut stream = None;
            if plan.stream {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let inbound = tokio_stream::wrappers::ReceiverStream::new(rx);
                match client.heartbeat_stream(auth.request(inbound)).await {
                    Ok(answers) => stream = Some((tx, answers.into_inner())),
                    Err(e) => {
                        let (kind, msg) = status_kind(&e);
                        shared
                            .lock()
                            .expect("not poisoned")
                            .beat_errors
                            .add(&kind, || msg);
                        return;
                    }
                }
            }

            // The first beat at this instance's phase, one interval after
            // the fleet began at the earliest and never in the past.
            let mut first = begin + phase;
            while first <= Instant::now() {
                first += interval;
            }
            let mut ticks = tokio::time::interval_at(first, interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
            let mut seq = 0u64;
            loop {
                let at = ticks.tick().await;
                let w = window.get().copied();
                if at >= hard_stop || w.is_some_and(|(_, end)| at >= end) {
                    break;
                }
                let msg = scenario::heartbeat(&id, &reg_id, seq);
                seq += 1;
                let sent = Instant::now();
                let answer = match &mut stream {
                    Some((tx, answers)) => match tx.send(msg).await {
                        Err(_) => Err(tonic::Status::unavailable("the heartbeat stream closed")),
                        Ok(()) => match answers.message().await {
                            Ok(Some(r)) => Ok(r),
                            Ok(None) => {
                                Err(tonic::Status::unavailable("the heartbeat stream ended"))
                            }
                            Err(e) => Err(e),
                        },
                    },
                    None => client
                        .heartbeat(auth.request(msg))
                        .await
                        .map(|r| r.into_inner()),
                };
                let done = Instant::now();
                let Some((start, end)) = w else { continue };
                if sent < start || done >= end {
                    continue;
                }
                let mut s = shared.lock().expect("not poisoned");
                match answer {
                    Ok(r) if r.acknowledged => {
                        s.beats_ok += 1;
                        record(s.beat_latency.as_mut().expect("set"), done - sent);
                    }
                    Ok(r) => {
                        s.beat_errors.add("not acknowledged", || r.message);
                    }
                    Err(e) => {
                        let (kind, msg) = status_kind(&e);
                        s.beat_errors.add(&kind, || msg);
                    }
                }
            }
        }));
    }

    // Every registration answered (or the deadline).
    let register_until = begin + plan.register_deadline;
    while finished.load(Ordering::Relaxed) < n {
        if Instant::now() >= register_until {
            for t in &tasks {
                t.abort();
            }
            bail!(
                "registration of {n} instances did not finish within {:?} ({} answered)",
                plan.register_deadline,
                finished.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registration_time = begin.elapsed();

    let start = Instant::now() + plan.settle;
    let end = start + plan.window;
    let _ = window.set((start, end));
    tokio::time::sleep_until(start).await;
    let nlb0 = CpuMark::now(nlb_pid)?;
    let me0 = CpuMark::now(std::process::id())?;
    tokio::time::sleep_until(end).await;
    let nlb1 = CpuMark::now(nlb_pid)?;
    let me1 = CpuMark::now(std::process::id())?;
    let (nlb_cpu_percent, measured) = nlb0.percent_of_one_core_until(&nlb1);
    let (client_cpu_percent, _) = me0.percent_of_one_core_until(&me1);
    let nlb_rss_mib = rss_mib(nlb_pid)?;

    // Each task ends at its first tick past the window.
    let join = futures_join(tasks);
    if tokio::time::timeout(interval * 2 + Duration::from_secs(10), join)
        .await
        .is_err()
    {
        eprintln!("fleet: some instances were still in a call after the window; left behind");
    }

    let registered = registered.load(Ordering::Relaxed);
    let mut s = shared.lock().expect("not poisoned");
    Ok(FleetOutcome {
        registered,
        registration_time,
        register_latency: s.register_latency.take().expect("set"),
        register_errors: std::mem::take(&mut s.register_errors),
        beats_ok: s.beats_ok,
        beat_errors: std::mem::take(&mut s.beat_errors),
        beat_latency: s.beat_latency.take().expect("set"),
        beats_expected: (registered as f64 * plan.window.as_secs_f64() / interval.as_secs_f64())
            .round() as u64,
        nlb_cpu_percent,
        client_cpu_percent,
        window: measured,
        nlb_rss_mib,
    })
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
