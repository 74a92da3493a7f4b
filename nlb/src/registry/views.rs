//! Read views of the registry (what `ListModules`, `GetModuleInfo` and
//! `GetLoadDistribution` show) and load rebalancing.

use std::collections::HashMap;
use std::time::SystemTime;

use shared_types::pb::{self, ModuleType};
use shared_types::time::from_system;

use super::instance::{Instance, Instruction};
use super::{Inner, Registry};
use crate::routing::{balance::balance_score, endpoint::DEFAULT_CAPACITY, EndpointState};

/// One instance as the NLB shows it.
#[derive(Debug, Clone)]
pub struct InstanceView {
    /// As registered, with the NLB's view of health, connections and weight.
    pub instance: pb::ModuleInstance,
    pub module_type: ModuleType,
    pub routes: Vec<pb::Route>,
    pub stats: Option<pb::ModuleStats>,
    pub deployment: pb::BlueGreenConfig,
    pub details: HashMap<String, String>,
    pub load: pb::LoadInfo,
    /// Whether it takes new connections (also `details["state"]`).
    pub state: EndpointState,
}

/// One instance in brief: the fields of its [`InstanceView`] that counts
/// and gauges use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub module_type: ModuleType,
    /// Whether it takes new connections.
    pub state: EndpointState,
    /// As `InstanceView::instance.health_status` shows it.
    pub health_status: pb::HealthStatus,
    /// As `InstanceView::instance.current_connections` shows it.
    pub current_connections: i32,
}

impl InstanceView {
    pub fn summary(&self) -> Summary {
        Summary {
            module_type: self.module_type,
            state: self.state,
            health_status: pb::HealthStatus::from_wire(self.instance.health_status)
                .unwrap_or_default(),
            current_connections: self.instance.current_connections,
        }
    }
}

/// A forced `RebalanceLoad` being followed up: its arguments and the
/// rounds it has looked again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForcedRebalance {
    pub strategy: Strategy,
    pub targets: Vec<String>,
    pub rounds: u32,
}

/// How `RebalanceLoad` sets capacity factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// From each instance's latest CPU report: factor = 1 - cpu/100, at least 0.1.
    LeastConnections,
    /// Every instance the same factor (1.0).
    Even,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "least_connections" => Ok(Strategy::LeastConnections),
            "even" => Ok(Strategy::Even),
            other => Err(format!(
                "strategy: {other:?} is not a strategy (least_connections, even)"
            )),
        }
    }
}

/// What `RebalanceLoad` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rebalanced {
    /// Active connections per instance before.
    pub previous: HashMap<String, i32>,
    /// The connections each instance is steered toward (its share of the
    /// total by effective capacity).
    pub target: HashMap<String, i32>,
    /// Instances told to shed, with how many connections.
    pub shed: Vec<(String, u32)>,
}

/// Instances above their target by more than this share (and one connection)
/// are overloaded, and `force` tells them to shed.
pub const OVERLOAD_TOLERANCE: f64 = 0.10;

fn weight_of(inner: &Inner, inst: &Instance) -> i32 {
    inner
        .weights_of(inst.module_type)
        .and_then(|w| w.iter().find(|(v, _)| *v == inst.info.version))
        .map_or(0, |(_, w)| *w as i32)
}

fn deployment(inner: &Inner, inst: &Instance) -> pb::BlueGreenConfig {
    let mut versions: Vec<(String, u32)> = inner
        .weights_of(inst.module_type)
        .cloned()
        .unwrap_or_else(|| vec![(inst.info.version.clone(), 100)]);
    versions.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let blue = versions.first().cloned().unwrap_or_default();
    let green = versions.get(1).cloned().unwrap_or_default();
    pb::BlueGreenConfig {
        blue_version: blue.0.clone(),
        green_version: green.0,
        blue_weight: blue.1 as i32,
        green_weight: green.1 as i32,
        active_version: blue.0,
        canary_enabled: green.1 > 0,
        canary_percent: green.1 as i32,
        deployment_started: inner
            .weights_since
            .get(&inst.module_type)
            .map(|t| from_system(*t)),
    }
}

fn capacity(inst: &Instance) -> f64 {
    let nominal = if inst.info.max_connections > 0 {
        f64::from(inst.info.max_connections)
    } else {
        DEFAULT_CAPACITY
    };
    nominal * inst.capacity_factor
}

fn load_info(inst: &Instance) -> pb::LoadInfo {
    let stats = inst.stats.clone().unwrap_or_default();
    let active = inst.active_connections();
    pb::LoadInfo {
        instance_id: inst.info.instance_id.clone(),
        active_connections: i32::try_from(active).unwrap_or(i32::MAX),
        cpu_usage_percent: stats.cpu_usage_percent,
        memory_usage_mb: stats.memory_usage_mb,
        requests_per_second: stats
            .custom_stats
            .get("requests_per_second")
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v.round() as i64),
        avg_latency_ms: stats.avg_latency_ms,
        queue_depth: stats
            .custom_stats
            .get("queue_depth")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        load_score: active as f64 / capacity(inst).max(f64::EPSILON),
    }
}

fn view(inner: &Inner, inst: &Instance) -> InstanceView {
    let mut instance = inst.info.clone();
    instance.health_status = inst.effective_status() as i32;
    instance.current_connections = i32::try_from(inst.active_connections()).unwrap_or(i32::MAX);
    instance.traffic_weight = weight_of(inner, inst);
    if instance.started_at.is_none() {
        instance.started_at = Some(from_system(inst.registered_at));
    }
    let (state, reason) = inst.state();
    let mut details = HashMap::new();
    details.insert("state".to_string(), state.name().to_string());
    details.insert("reason".into(), reason.into());
    details.insert(
        "takes_traffic".into(),
        (state == EndpointState::Healthy && inst.data_address.is_some()).to_string(),
    );
    details.insert(
        "data_address".into(),
        inst.data_address.clone().unwrap_or_default(),
    );
    details.insert(
        "registered_at".into(),
        shared_types::time::unix_millis(inst.registered_at).to_string(),
    );
    details.insert(
        "last_heartbeat_ms_ago".into(),
        SystemTime::now()
            .duration_since(inst.last_beat_wall)
            .map_or(0, |d| d.as_millis())
            .to_string(),
    );
    details.insert(
        "heartbeat_interval_seconds".into(),
        inst.timings.interval.as_secs().to_string(),
    );
    details.insert(
        "lease_seconds".into(),
        inst.timings.lease().as_secs().to_string(),
    );
    details.insert("total_routed".into(), inst.counters.total().to_string());
    details.insert(
        "capacity_factor".into(),
        format!("{:.3}", inst.capacity_factor),
    );
    details.insert(
        "proxy_protocol".into(),
        if inst.proxy_protocol { "v2" } else { "none" }.into(),
    );
    if let Some((at, msg)) = &inst.last_check {
        details.insert("last_health_check".into(), msg.clone());
        details.insert(
            "last_health_check_at".into(),
            shared_types::time::unix_millis(*at).to_string(),
        );
    }
    if let Some(d) = &inst.draining {
        details.insert(
            "drain_deadline".into(),
            shared_types::time::unix_millis(d.deadline_wall).to_string(),
        );
        details.insert(
            "connections_at_drain_start".into(),
            d.connections_at_start.to_string(),
        );
    }
    for (k, v) in &inst.capabilities {
        details.insert(format!("capability.{k}"), v.clone());
    }
    InstanceView {
        instance,
        module_type: inst.module_type,
        routes: inst.routes.iter().map(|r| r.route.clone()).collect(),
        stats: inst.stats.clone(),
        deployment: deployment(inner, inst),
        details,
        load: load_info(inst),
        state,
    }
}

impl Registry {
    /// Every instance, sorted by instance id.
    pub fn list(&self) -> Vec<InstanceView> {
        self.read(|inner| {
            let mut out: Vec<InstanceView> =
                inner.instances.values().map(|i| view(inner, i)).collect();
            out.sort_by(|a, b| a.instance.instance_id.cmp(&b.instance.instance_id));
            out
        })
    }

    /// Every instance as counts and gauges see it, sorted by instance id:
    /// what [`Registry::list`] would show of each, without building the
    /// views (the periodic samplers call this with thousands of instances).
    pub fn summaries(&self) -> Vec<Summary> {
        self.read(|inner| {
            inner
                .instances
                .values()
                .map(|i| Summary {
                    module_type: i.module_type,
                    state: i.state().0,
                    health_status: i.effective_status(),
                    current_connections: i32::try_from(i.active_connections()).unwrap_or(i32::MAX),
                })
                .collect()
        })
    }

    /// One instance.
    pub fn get(&self, instance_id: &str) -> Option<InstanceView> {
        self.read(|inner| inner.instances.get(instance_id).map(|i| view(inner, i)))
    }

    /// Refreshes capacity factors (and with `force`, tells overloaded
    /// instances to shed). `targets` limits it to those instances; empty = all.
    pub fn rebalance(&self, strategy: Strategy, force: bool, targets: &[String]) -> Rebalanced {
        self.with(|inner| {
            let mut out = Rebalanced::default();
            let chosen = |id: &str| targets.is_empty() || targets.iter().any(|t| t == id);
            let mut factors_changed = false;
            for inst in inner.instances.values_mut() {
                if !chosen(&inst.info.instance_id) {
                    continue;
                }
                let before = inst.capacity_factor;
                inst.capacity_factor = match strategy {
                    Strategy::Even => 1.0,
                    Strategy::LeastConnections => inst
                        .stats
                        .as_ref()
                        .filter(|s| s.cpu_usage_percent > 0.0)
                        .map_or(1.0, |s| (1.0 - s.cpu_usage_percent / 100.0).clamp(0.1, 1.0)),
                };
                factors_changed |= inst.capacity_factor != before;
            }
            // Targets per module type: the total spread by effective capacity
            // over the instances that take traffic.
            let mut by_type: HashMap<ModuleType, Vec<&Instance>> = HashMap::new();
            for inst in inner.instances.values() {
                if chosen(&inst.info.instance_id) {
                    by_type.entry(inst.module_type).or_default().push(inst);
                }
            }
            let mut shed = Vec::new();
            for group in by_type.values() {
                let live: Vec<&&Instance> = group
                    .iter()
                    .filter(|i| i.state().0 == EndpointState::Healthy && i.data_address.is_some())
                    .collect();
                let total: i64 = group.iter().map(|i| i.active_connections()).sum();
                let cap: f64 = live.iter().map(|i| capacity(i)).sum();
                for inst in group {
                    let active = inst.active_connections();
                    let id = inst.info.instance_id.clone();
                    out.previous
                        .insert(id.clone(), i32::try_from(active).unwrap_or(i32::MAX));
                    let is_live = live.iter().any(|l| l.info.instance_id == id);
                    let target = if is_live && cap > 0.0 {
                        (total as f64 * capacity(inst) / cap).round() as i64
                    } else {
                        0
                    };
                    out.target
                        .insert(id.clone(), i32::try_from(target).unwrap_or(i32::MAX));
                    let bound = (target as f64 * (1.0 + OVERLOAD_TOLERANCE)).floor() as i64 + 1;
                    if force && is_live && active > bound {
                        shed.push((id, u32::try_from(active - target).unwrap_or(u32::MAX)));
                    }
                }
            }
            for (id, n) in &shed {
                if let Some(inst) = inner.instances.get_mut(id) {
                    inst.pending = Some(Instruction::Shed(*n));
                }
            }
            shed.sort();
            out.shed = shed;
            (out, factors_changed)
        })
    }

    /// The balance score over the given load scores (see
    /// [`crate::routing::balance::balance_score`]).
    pub fn balance_score(loads: &[pb::LoadInfo]) -> f64 {
        let scores: Vec<f64> = loads.iter().map(|l| l.load_score).collect();
        balance_score(&scores)
    }
}
