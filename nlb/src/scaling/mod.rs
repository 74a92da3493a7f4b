//! The NLB's autoscaler: every `autoscaling.evaluation_interval_seconds`,
//! for each module with a policy (`autoscaling.modules`), it observes the
//! module's instances, decides ([`decide`]) and sends a change to one
//! instance's `ModuleService.Scale`, whose scaler (Docker, Kubernetes, or
//! none) adds or removes instances; new ones register by themselves.
//!
//! Every decision is a metric (`nlb_scaling_decisions_total`) and an event
//! (a log line with target `scaling`, and the latest ones in `/status`).

pub mod decide;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use shared_types::pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

fn observe(nlb: &Nlb, t: &str) -> (Observation, Vec<(String, String)>) {
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
    let mut connections = 0.0;
    let (mut cpu_sum, mut cpu_n) = (0.0, 0u32);
    let mut scalers = Vec::new();
    let mut others = Vec::new();
    for v in views
        .iter()
        .filter(|v| belongs(t, v.module_type, &v.instance.metadata))
    {
        if v.state == EndpointState::Draining {
            continue;
        }
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
    (
        Observation {
            instances: taking,
            connections,
            cpu_percent: (cpu_n > 0).then(|| cpu_sum / f64::from(cpu_n)),
        },
        scalers,
    )
}

/// Starts the autoscaler; it ends when `stop` turns true.
pub fn spawn(nlb: Arc<Nlb>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut states: HashMap<String, (TypeScaling, TypeState)> = HashMap::new();
        loop {
            let interval = nlb
                .config
                .current()
                .autoscaling
                .evaluation_interval_seconds
                .max(1);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            evaluate(&nlb, &mut states).await;
        }
    })
}

fn now_ms() -> u64 {
    shared_types::time::unix_millis(std::time::SystemTime::now())
}

/// One evaluation of every type with a policy.
pub async fn evaluate(nlb: &Nlb, states: &mut HashMap<String, (TypeScaling, TypeState)>) {
    let config = nlb.config.current();
    let policies: Vec<(String, TypeScaling)> = config
        .autoscaling
        .modules
        .iter()
        .filter(|(_, p)| p.enabled)
        .map(|(t, p)| (t.clone(), p.clone()))
        .collect();
    states.retain(|t, _| policies.iter().any(|(pt, _)| pt == t));
    for (t, policy) in policies {
        let name = t.as_str();
        let (observation, targets) = observe(nlb, &t);
        let (recommended, why) = recommend(&policy, &observation);
        // A changed policy starts its window afresh.
        let entry = states
            .entry(t.clone())
            .or_insert_with(|| (policy.clone(), TypeState::default()));
        if entry.0 != policy {
            *entry = (policy.clone(), TypeState::default());
        }
        nlb.metrics
            .scaling_recommended
            .with_label_values(&[name])
            .set(i64::from(recommended));
        let now = now_ms();
        let current = observation.instances;
        let Decision::Scale(to, reason) = entry.1.decide(&policy, now, current, recommended, &why)
        else {
            continue;
        };
        // Asked for, whatever the answer: the cooldowns start now, so a
        // failing scaler is not called at every evaluation.
        entry.1.changed(now);
        let direction = if to > current { "up" } else { "down" };
        let result = scale(nlb, &t, &targets, to, &policy).await;
        let (label, message) = match &result {
            Ok(m) => ("ok", m.clone()),
            Err(m) => ("failed", m.clone()),
        };
        nlb.metrics
            .scaling_decisions
            .with_label_values(&[name, direction, label])
            .inc();
        match &result {
            Ok(_) => {
                tracing::info!(target: "scaling", module = name, from = current, to, reason = %reason, "scaling {direction}: {message}")
            }
            Err(_) => {
                tracing::warn!(target: "scaling", module = name, from = current, to, reason = %reason, "scaling {direction} failed: {message}")
            }
        }
        nlb.scaling.push(ScalingEvent {
            at_unix_ms: now,
            module: name.to_string(),
            from: current,
            to,
            result: label,
            reason,
            message,
        });
    }
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
