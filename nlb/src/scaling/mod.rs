//! The NLB's autoscaler: every `autoscaling.evaluation_interval_seconds`,
//! for each module with a policy (`autoscaling.modules`), it observes the
//! module's instances, decides ([`decide`]) and sends a change to one
//! instance's `ModuleService.Scale`, whose scaler (Docker, Kubernetes, or
//! none) adds or removes instances; new ones register by themselves.
//!
//! Every decision is a metric (`nlb_scaling_decisions_total`) and an event
//! (a log line with target `scaling`, and the latest ones in `/status`).
//!
//! A module's `Scale` call runs as a task beside the loop, so a slow module
//! delays no other module's evaluation; while it runs, that module is not
//! evaluated again. A module type with a rollout running (or paused) is
//! not scaled: a scale-down could remove the canary, a scale-up would
//! change the split under the analysis.

pub mod decide;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use shared_types::pb;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::app::Nlb;
use crate::config::TypeScaling;
use crate::routing::EndpointState;
use decide::{recommend, Decision, Observation, TypeState};

/// Events kept for `/status`.
const KEPT_EVENTS: usize = 50;
/// Deadline of one `Scale` call.
const SCALE_DEADLINE: Duration = Duration::from_secs(30);

/// One autoscaling event.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingEvent {
    pub at_unix_ms: u64,
    pub module: String,
    pub from: u32,
    pub to: u32,
    /// `ok`, or `failed` with the reason in `message`.
    pub result: &'static str,
    pub reason: String,
    pub message: String,
}

/// The latest autoscaling events.
#[derive(Default)]
pub struct ScalingLog {
    events: Mutex<VecDeque<ScalingEvent>>,
}

impl ScalingLog {
    fn push(&self, e: ScalingEvent) {
        let mut events = self.events.lock();
        events.push_back(e);
        while events.len() > KEPT_EVENTS {
            events.pop_front();
        }
    }

    /// Oldest first.
    pub fn recent(&self) -> Vec<ScalingEvent> {
        self.events.lock().iter().cloned().collect()
    }
}

/// What the type's instances carry, and who can be asked to scale it.
/// Whether an instance belongs to a policy's key: its module's name
/// (`metadata["module"]`, set by SDK modules), else its module type's.
fn belongs(key: &str, module_type: pb::ModuleType, metadata: &HashMap<String, String>) -> bool {
    match metadata.get("module").filter(|m| !m.is_empty()) {
        Some(m) => m == key,
        None => module_type.short_name() == key,
    }
}

/// What one evaluation saw of a module.
struct Seen {
    observation: Observation,
    /// Instances present (not draining), taking traffic or not yet: the
    /// count a decision starts from, as the scaler counts them.
    present: u32,
    /// Who to ask, in order.
    targets: Vec<(String, String)>,
    /// The module types its instances register as.
    types: HashSet<pb::ModuleType>,
}

fn observe(nlb: &Nlb, t: &str) -> Seen {
    let mut views = nlb.registry.list();
    // The longest registered first: a scaler never removes its own
    // instance and removes the newest first, so asking the oldest removes
    // the newest.
    views.sort_by_key(|v| {
        v.details
            .get("registered_at")
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    // Instances that announced a scaler (`capabilities["scaler"]`).
    let with_scaler: std::collections::HashSet<String> = nlb.registry.read(|inner| {
        inner
            .instances
            .values()
            .filter(|i| belongs(t, i.module_type, &i.info.metadata))
            .filter(|i| {
                i.capabilities
                    .get("scaler")
                    .is_some_and(|s| !s.is_empty() && s != "none")
            })
            .map(|i| i.info.instance_id.clone())
            .collect()
    });
    let mut taking = 0u32;
    let mut present = 0u32;
    let mut types = HashSet::new();
    let mut connections = 0.0;
    let (mut cpu_sum, mut cpu_n) = (0.0, 0u32);
    let mut scalers = Vec::new();
    let mut others = Vec::new();
    for v in views
        .iter()
        .filter(|v| belongs(t, v.module_type, &v.instance.metadata))
    {
        types.insert(v.module_type);
        if v.state == EndpointState::Draining {
            continue;
        }
        present += 1;
        let target = (v.instance.instance_id.clone(), v.instance.address.clone());
        if with_scaler.contains(&v.instance.instance_id) {
            scalers.push(target);
        } else {
            others.push(target);
        }
        if v.state != EndpointState::Healthy {
            continue;
        }
        taking += 1;
        connections += f64::from(v.instance.current_connections.max(0));
        if let Some(s) = &v.stats {
            if s.cpu_usage_percent.is_finite() && s.cpu_usage_percent >= 0.0 {
                cpu_sum += s.cpu_usage_percent;
                cpu_n += 1;
            }
        }
    }
    scalers.extend(others);
    Seen {
        observation: Observation {
            instances: taking,
            present,
            connections,
            cpu_percent: (cpu_n > 0).then(|| cpu_sum / f64::from(cpu_n)),
        },
        present,
        targets: scalers,
        types,
    }
}

/// A decision on its way to a module.
struct Call {
    module: String,
    at_ms: u64,
    from: u32,
    to: u32,
    reason: String,
    result: Result<String, String>,
}

/// The autoscaler's memory: per module, its policy and decision state, and
/// the modules with a `Scale` call under way.
#[derive(Default)]
pub struct Autoscaler {
    states: HashMap<String, (TypeScaling, TypeState)>,
    calling: HashSet<String>,
    calls: JoinSet<Call>,
}

/// Starts the autoscaler; it ends when `stop` turns true (a `Scale` call
/// under way is dropped with it).
pub fn spawn(nlb: Arc<Nlb>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut a = Autoscaler::default();
        loop {
            let interval = nlb
                .config
                .current()
                .autoscaling
                .evaluation_interval_seconds
                .max(1);
            let next = tokio::time::Instant::now() + Duration::from_secs(interval);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    Some(done) = a.calls.join_next(), if !a.calls.is_empty() => {
                        if let Ok(call) = done {
                            a.calling.remove(&call.module);
                            record(&nlb, call);
                        }
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            a.evaluate(&nlb);
        }
    })
}

fn now_ms() -> u64 {
    shared_types::time::unix_millis(std::time::SystemTime::now())
}

impl Autoscaler {
    /// One evaluation of every module with a policy; each decision's
    /// `Scale` call starts as a task.
    fn evaluate(&mut self, nlb: &Arc<Nlb>) {
        let config = nlb.config.current();
        let policies: Vec<(String, TypeScaling)> = config
            .autoscaling
            .modules
            .iter()
            .filter(|(_, p)| p.enabled)
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        self.states
            .retain(|t, _| policies.iter().any(|(pt, _)| pt == t));
        for (t, policy) in policies {
            if self.calling.contains(&t) {
                continue;
            }
            let seen = observe(nlb, &t);
            let (recommended, why) = recommend(&policy, &seen.observation);
            nlb.metrics
                .scaling_recommended
                .with_label_values(&[t.as_str()])
                .set(i64::from(recommended));
            if let Some(r) = seen
                .types
                .iter()
                .find_map(|ty| nlb.rollouts.list(*ty, true).into_iter().next())
            {
                tracing::debug!(target: "scaling", module = %t, rollout = %r.rollout_id, "not scaled while its rollout is active");
                // Its window starts afresh once the rollout ends: a stale
                // one would let a single sample decide a scale-down.
                self.states.remove(&t);
                continue;
            }
            // A changed policy starts its window afresh.
            let entry = self
                .states
                .entry(t.clone())
                .or_insert_with(|| (policy.clone(), TypeState::default()));
            if entry.0 != policy {
                *entry = (policy.clone(), TypeState::default());
            }
            let now = now_ms();
            let current = seen.present;
            let Decision::Scale(to, reason) =
                entry.1.decide(&policy, now, current, recommended, &why)
            else {
                continue;
            };
            // Asked for, whatever the answer: the cooldowns start now, so a
            // failing scaler is not called at every evaluation.
            entry.1.changed(now);
            self.calling.insert(t.clone());
            let nlb = Arc::clone(nlb);
            self.calls.spawn(async move {
                let result = scale(&nlb, &t, &seen.targets, to, &policy).await;
                Call {
                    module: t,
                    at_ms: now,
                    from: current,
                    to,
                    reason,
                    result,
                }
            });
        }
    }
}

/// A decision's outcome: its metric, log line and `/status` event.
fn record(nlb: &Nlb, call: Call) {
    let name = call.module.as_str();
    let (current, to, reason) = (call.from, call.to, &call.reason);
    let direction = if to > current { "up" } else { "down" };
    let (label, message) = match &call.result {
        Ok(m) => ("ok", m.clone()),
        Err(m) => ("failed", m.clone()),
    };
    nlb.metrics
        .scaling_decisions
        .with_label_values(&[name, direction, label])
        .inc();
    match &call.result {
        Ok(_) => {
            tracing::info!(target: "scaling", module = name, from = current, to, reason = %reason, "scaling {direction}: {message}")
        }
        Err(_) => {
            tracing::warn!(target: "scaling", module = name, from = current, to, reason = %reason, "scaling {direction} failed: {message}")
        }
    }
    nlb.scaling.push(ScalingEvent {
        at_unix_ms: call.at_ms,
        module: name.to_string(),
        from: current,
        to,
        result: label,
        reason: call.reason,
        message,
    });
}

/// Sends the count to the first instance that answers (those announcing a
/// scaler first).
async fn scale(
    nlb: &Nlb,
    t: &str,
    targets: &[(String, String)],
    to: u32,
    policy: &TypeScaling,
) -> Result<String, String> {
    if targets.is_empty() {
        return Err(format!(
            "no live {} instance to ask: a type with no instance cannot be scaled from zero by the NLB",
            t
        ));
    }
    let mut refusals = Vec::new();
    for (id, address) in targets.iter().take(3) {
        let config = pb::ScalingConfig {
            min_instances: to as i32,
            max_instances: to as i32,
            target_cpu_percent: policy.target_cpu_percent as i32,
            target_connections: policy.target_connections as i32,
            cooldown_seconds: policy.scale_down_cooldown_seconds.min(i32::MAX as u64) as i32,
            auto_scaling_enabled: true,
            ..Default::default()
        };
        let req = nlb.modules.changing(
            pb::ScaleRequest {
                instance_id: id.clone(),
                config: Some(config),
                immediate: true,
            },
            SCALE_DEADLINE,
        );
        match nlb
            .modules
            .call(id, address, SCALE_DEADLINE, |mut c| async move {
                c.scale(req).await
            })
            .await
        {
            Ok(r) if r.success => {
                return Ok(format!(
                    "{id} scaled {}: {} now, {} desired",
                    t, r.current_instances, r.desired_instances
                ))
            }
            Ok(r) => refusals.push(format!("{id}: {}", r.message)),
            Err(e) => refusals.push(e.message().to_string()),
        }
    }
    Err(refusals.join("; "))
}
