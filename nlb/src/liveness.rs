//! Background loops: the lease reaper (lapses, drain deadlines, removals),
//! active `HealthCheck` calls, and sampling of the NLB's own metrics.

use std::sync::Arc;
use std::time::Duration;

use shared_types::pb::{self, HealthStatus};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;

use crate::app::Nlb;
use crate::control::module_client::request;
use crate::registry::DueCheck;

/// How often leases and deadlines are checked.
pub const REAPER_PERIOD: Duration = Duration::from_millis(250);
/// Most active health checks in flight at once.
pub const MAX_CONCURRENT_CHECKS: usize = 64;

fn every(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// One reaper pass.
pub fn reap(nlb: &Nlb) {
    let tick = nlb.registry.tick(Instant::now());
    for id in &tick.lapsed {
        nlb.metrics.lease_lapses.inc();
        tracing::warn!(instance = %id, "heartbeat lease lapsed: no new connections until it heartbeats again");
    }
    for (ids, reason) in [(&tick.drained, "unregistered"), (&tick.expired, "expired")] {
        for id in ids {
            nlb.metrics.removals.with_label_values(&[reason]).inc();
            nlb.series.remove_owner(id);
            tracing::info!(instance = %id, reason, "instance removed from the registry");
        }
    }
    for addr in &tick.removed_addresses {
        nlb.modules.forget(addr);
    }
    if !(tick.lapsed.is_empty() && tick.drained.is_empty() && tick.expired.is_empty()) {
        nlb.refresh_gauges();
    }
}

/// Runs one active health check and records it.
async fn check(nlb: Arc<Nlb>, due: DueCheck) {
    let (id, timeout) = (&due.instance_id, due.timeout);
    let msg = pb::HealthCheckRequest {
        instance_id: id.clone(),
        deep_check: false,
    };
    let result = nlb
        .modules
        .call(id, &due.address, timeout, |mut c| async move {
            c.health_check(request(msg, timeout)).await
        })
        .await;
    let (passed, message) = match result {
        Ok(h) => {
            let s = HealthStatus::from_wire(h.status).unwrap_or_default();
            (
                matches!(
                    s,
                    HealthStatus::Healthy | HealthStatus::Degraded | HealthStatus::Unspecified
                ),
                format!("{s}: {}", h.message),
            )
        }
        // A module without active checks relies on its heartbeats alone.
        Err(e) if e.code() == Code::Unimplemented => {
            (true, "HealthCheck not implemented; heartbeats only".into())
        }
        Err(e) => (false, e.message().to_string()),
    };
    nlb.metrics
        .health_checks
        .with_label_values(&[if passed { "pass" } else { "fail" }])
        .inc();
    if !passed {
        tracing::debug!(instance = %id, %message, "health check failed");
    }
    nlb.registry.record_check(&due, passed, message);
}

/// Spawns the loops; they end when `stop` turns true.
pub fn spawn_loops(nlb: Arc<Nlb>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    let until_stop = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };

    let n = Arc::clone(&nlb);
    let s = stop.clone();
    handles.push(tokio::spawn(async move {
        let mut t = every(REAPER_PERIOD);
        tokio::select! {
            _ = async { loop { t.tick().await; reap(&n); } } => {}
            _ = until_stop(s) => {}
        }
    }));

    let n = Arc::clone(&nlb);
    let s = stop.clone();
    handles.push(tokio::spawn(async move {
        let limit = Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS));
        let mut t = every(Duration::from_millis(200));
        tokio::select! {
            _ = async {
                loop {
                    t.tick().await;
                    if !n.config.current().health.active_checks {
                        continue;
                    }
                    for due in n.registry.due_checks(Instant::now()) {
                        // All permits busy (slow modules): this instance is
                        // checked at its next interval instead of stalling the rest.
                        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                            tracing::debug!(instance = %due.instance_id, "health check skipped: {MAX_CONCURRENT_CHECKS} checks already in flight");
                            continue;
                        };
                        let n = Arc::clone(&n);
                        tokio::spawn(async move {
                            check(n, due).await;
                            drop(permit);
                        });
                    }
                }
            } => {}
            _ = until_stop(s) => {}
        }
    }));

    let n = Arc::clone(&nlb);
    handles.push(tokio::spawn(async move {
        // The interval is read every round, so a config change applies live.
        tokio::select! {
            _ = async {
                loop {
                    n.sample_own_metrics();
                    // Series of instances that left (a report can race a removal).
                    let registry = &n.registry;
                    n.series.retain_owners(|o| registry.module_type_of(o).is_some());
                    n.refresh_gauges();
                    let secs = n.config.current().metrics.sample_interval_seconds.max(1);
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
            } => {}
            _ = until_stop(stop) => {}
        }
    }));
    handles
}
