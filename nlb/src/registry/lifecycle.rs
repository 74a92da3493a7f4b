//! Register, heartbeat, unregister, and the timed parts of liveness: leases,
//! drain deadlines, removal, and active health check results.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shared_types::pb::{self, HealthStatus, ModuleType};
use tokio::time::Instant;

use super::instance::{Drain, HealthTimings, Instance, Instruction};
use super::{Inner, Registry, RegistryError};
use crate::config::check_host_port;
use crate::routing::{EndpointCounters, EndpointState, RouteSpec};

/// A successful registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub registration_id: String,
    pub registered_at: SystemTime,
    /// False when the instance has no `data_address` (registered, managed,
    /// but routed no traffic).
    pub takes_traffic: bool,
    /// True when this was a re-registration of a live instance.
    pub renewed: bool,
    /// The ModuleService address of a registration this one replaced.
    pub replaced_address: Option<String>,
    pub message: String,
}

/// The result of an unregister.
#[derive(Debug, Clone, PartialEq)]
pub struct Unregistered {
    /// Active connections at the time of the call (drained gracefully, or cut).
    pub active_connections: i64,
    pub graceful: bool,
    pub deadline: Option<SystemTime>,
    pub message: String,
}

/// What a heartbeat is answered with.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeartbeatOutcome {
    pub acknowledged: bool,
    pub message: String,
    pub should_reload: bool,
    pub should_scale: bool,
    pub instructions: HashMap<String, String>,
    /// The instance id and the beat's stats when they are due in its time
    /// series (at most one sample per `metrics.sample_interval_seconds`).
    pub stats_to_record: Option<(String, pb::ModuleStats)>,
}

/// An active health check to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueCheck {
    pub instance_id: String,
    /// The registration checked; a result for another one is dropped.
    pub registration_id: String,
    /// The instance's ModuleService address.
    pub address: String,
    pub timeout: Duration,
}

/// What a reaper tick did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tick {
    /// Instances whose lease lapsed (now unhealthy).
    pub lapsed: Vec<String>,
    /// Instances removed at their drain deadline.
    pub drained: Vec<String>,
    /// Instances removed after staying silent past the removal grace.
    pub expired: Vec<String>,
    /// The ModuleService addresses of the removed instances.
    pub removed_addresses: Vec<String>,
}

/// Limits on what one registration may carry, so no client grows the
/// registry without bound.
pub const MAX_MAP_ENTRIES: usize = 64;
pub const MAX_KEY_LEN: usize = 128;
pub const MAX_VALUE_LEN: usize = 1024;
pub const MAX_ROUTES: usize = 1000;

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// A registration that passed validation.
struct Checked {
    module_type: ModuleType,
    routes: Vec<RouteSpec>,
    timings: HealthTimings,
    data_address: Option<String>,
    proxy_protocol: bool,
}

/// Checks a `RegisterModuleRequest`; every problem in one message.
fn validate(req: &pb::RegisterModuleRequest) -> Result<Checked, RegistryError> {
    let Some(inst) = req.instance.as_ref() else {
        return Err(RegistryError::InvalidArgument(
            "instance: is required".into(),
        ));
    };
    let mut errors = Vec::new();
    if !valid_id(&inst.instance_id) {
        errors.push(format!(
            "instance.instance_id: {:?} must be 1 to 128 characters of letters, digits, '-', '_', '.', ':'",
            inst.instance_id
        ));
    }
    let module_type = match ModuleType::from_wire(inst.module_type) {
        Some(ModuleType::Unspecified) | None => {
            errors.push(format!(
                "instance.module_type: {} is not a module type (alb, dblb, ailb, rtmp, nlb)",
                inst.module_type
            ));
            ModuleType::Unspecified
        }
        Some(t) => t,
    };
    if let Err(m) = check_host_port(&inst.address) {
        errors.push(format!("instance.address (its ModuleService address): {m}"));
    }
    let data_address = inst
        .metadata
        .get("data_address")
        .filter(|a| !a.trim().is_empty())
        .cloned();
    if let Some(addr) = &data_address {
        if let Err(m) = check_host_port(addr) {
            errors.push(format!("instance.metadata[\"data_address\"]: {m}"));
        }
    }
    for (what, map) in [
        ("instance.metadata", &inst.metadata),
        ("capabilities", &req.capabilities),
    ] {
        if map.len() > MAX_MAP_ENTRIES {
            errors.push(format!(
                "{what}: {} entries, at most {MAX_MAP_ENTRIES}",
                map.len()
            ));
        }
        if let Some((k, v)) = map
            .iter()
            .find(|(k, v)| k.len() > MAX_KEY_LEN || v.len() > MAX_VALUE_LEN)
        {
            errors.push(format!(
                "{what}[{:?}]: too long (keys at most {MAX_KEY_LEN} bytes, values {MAX_VALUE_LEN}; value is {} bytes)",
                k.chars().take(40).collect::<String>(),
                v.len()
            ));
        }
    }
    if req.initial_routes.len() > MAX_ROUTES {
        errors.push(format!(
            "initial_routes: {} routes, at most {MAX_ROUTES}",
            req.initial_routes.len()
        ));
    }
    if inst.max_connections < 0 {
        errors.push(format!(
            "instance.max_connections: {} is negative (0 = unlimited)",
            inst.max_connections
        ));
    }
    if inst.version.len() > 128 {
        errors.push("instance.version: longer than 128 characters".into());
    }
    let proxy_protocol = match req.capabilities.get("proxy_protocol").map(String::as_str) {
        None | Some("") | Some("none") => false,
        Some(v) if v.eq_ignore_ascii_case("v2") => true,
        Some(other) => {
            errors.push(format!(
                "capabilities[\"proxy_protocol\"]: {other:?} is not supported (use \"v2\")"
            ));
            false
        }
    };
    let timings = HealthTimings::from_proto(req.health_config.as_ref()).unwrap_or_else(|m| {
        errors.push(m);
        HealthTimings::default()
    });
    let mut routes = Vec::new();
    errors.extend(
        crate::routing::route::duplicate_ids(&req.initial_routes)
            .iter()
            .map(|e| format!("initial_routes: {e}")),
    );
    for route in &req.initial_routes {
        match RouteSpec::announced(route, module_type) {
            Ok(spec) => routes.push(spec),
            Err(es) => errors.extend(es.iter().map(|e| format!("initial_routes: {e}"))),
        }
    }
    if errors.is_empty() {
        Ok(Checked {
            module_type,
            routes,
            timings,
            data_address,
            proxy_protocol,
        })
    } else {
        Err(RegistryError::InvalidArgument(errors.join("; ")))
    }
}

impl Registry {
    /// Registers an instance. Re-registering a live instance from the same
    /// address is idempotent: same registration id, lease renewed, fields
    /// updated.
    pub fn register(&self, req: &pb::RegisterModuleRequest) -> Result<Registered, RegistryError> {
        self.register_as(req, None, true)
    }

    /// Registers on behalf of `owner` (the caller's token; none when the API
    /// is open). Unless `may_take_over` (an operator), an instance another
    /// token registered cannot be renewed or replaced by this one.
    pub fn register_as(
        &self,
        req: &pb::RegisterModuleRequest,
        owner: Option<&str>,
        may_take_over: bool,
    ) -> Result<Registered, RegistryError> {
        let Checked {
            module_type,
            mut routes,
            timings,
            data_address,
            proxy_protocol,
        } = validate(req)?;
        let inst = req.instance.clone().unwrap_or_default();
        let id = inst.instance_id.clone();
        let now = Instant::now();
        let wall = SystemTime::now();
        self.with(|inner| {
            for spec in &mut routes {
                inner.route_keys.intern(spec);
            }
            let existing = inner.instances.get(&id);
            if let Some(theirs) = existing.and_then(|old| old.owner.as_deref()) {
                if !may_take_over && Some(theirs) != owner {
                    let err = RegistryError::PermissionDenied(format!(
                        "instance {id} was registered by another token; only that token or an operator may register it again"
                    ));
                    return (Err(err), false);
                }
            }
            let renew = match existing {
                Some(old) if old.info.address == inst.address => true,
                Some(old) if old.draining.is_none() && old.lease_ok => {
                    let err = RegistryError::AlreadyExists(format!(
                        "instance {id} is already registered from {} and is alive; unregister it or use another instance_id",
                        old.info.address
                    ));
                    return (Err(err), false);
                }
                _ => false,
            };
            if existing.is_none() && inner.instances.len() >= inner.settings.max_instances {
                let err = RegistryError::ResourceExhausted(format!(
                    "the registry holds its maximum of {} instances",
                    inner.settings.max_instances
                ));
                return (Err(err), false);
            }
            let mut replaced_address = None;
            let (registration_id, registered_at, counters) = match inner.instances.remove(&id) {
                Some(old) if renew => {
                    // A restarted instance at the same address starts afresh.
                    old.counters.clear_ejection();
                    old.counters.restart_warming();
                    (old.registration_id, old.registered_at, old.counters)
                }
                Some(old) => {
                    inner.by_registration.remove(&old.registration_id);
                    replaced_address = Some(old.info.address);
                    (
                        uuid::Uuid::new_v4().to_string(),
                        wall,
                        Arc::new(EndpointCounters::warming()),
                    )
                }
                None => (
                    uuid::Uuid::new_v4().to_string(),
                    wall,
                    Arc::new(EndpointCounters::warming()),
                ),
            };
            let takes_traffic = data_address.is_some();
            let instance = Instance {
                module_type,
                registration_id: registration_id.clone(),
                owner: owner.map(str::to_string),
                routes,
                capabilities: req.capabilities.clone(),
                timings,
                registered_at,
                data_address,
                proxy_protocol,
                counters,
                capacity_factor: 1.0,
                last_beat: now,
                last_beat_wall: wall,
                reported: HealthStatus::from_wire(inst.health_status).unwrap_or_default(),
                lease_ok: true,
                recovering_beats: 0,
                check_ok: true,
                check_failures: 0,
                check_successes: 0,
                last_check: None,
                next_check: now + timings.interval,
                draining: None,
                stats: None,
                stats_at: None,
                series_at: None,
                pending: None,
                endpoint: None,
                info: inst,
            };
            inner
                .by_registration
                .insert(registration_id.clone(), id.clone());
            inner.instances.insert(id.clone(), instance);
            let mut message = format!(
                "{} {module_type} instance {id}",
                if renew { "renewed" } else { "registered" }
            );
            if !takes_traffic {
                message.push_str(
                    "; it has no metadata[\"data_address\"], so it is managed but routed no traffic",
                );
            }
            let out = Registered {
                registration_id,
                registered_at,
                takes_traffic,
                renewed: renew,
                replaced_address,
                message,
            };
            (Ok(out), true)
        })
    }

    /// Unregisters an instance. Graceful: it takes no new traffic at once and
    /// is removed at the drain deadline. Otherwise it is removed now. An empty
    /// `registration_id` is an operator acting on the instance.
    pub fn unregister(
        &self,
        instance_id: &str,
        registration_id: &str,
        graceful: bool,
        drain_timeout_seconds: i32,
    ) -> Result<Unregistered, RegistryError> {
        if instance_id.is_empty() {
            return Err(RegistryError::InvalidArgument(
                "instance_id: is empty".into(),
            ));
        }
        if !(0..=86_400).contains(&drain_timeout_seconds) {
            return Err(RegistryError::InvalidArgument(format!(
                "drain_timeout_seconds: {drain_timeout_seconds} is out of range (0 to 86400; 0 = the configured default)"
            )));
        }
        self.with(|inner| {
            let default_drain = inner.settings.drain_timeout;
            let Some(inst) = inner.instances.get_mut(instance_id) else {
                return (
                    Err(RegistryError::NotFound(format!(
                        "no instance {instance_id} is registered"
                    ))),
                    false,
                );
            };
            if !registration_id.is_empty() && inst.registration_id != registration_id {
                return (
                    Err(RegistryError::PermissionDenied(format!(
                        "registration id does not belong to instance {instance_id}"
                    ))),
                    false,
                );
            }
            let active = inst.active_connections();
            if graceful {
                let timeout = if drain_timeout_seconds > 0 {
                    Duration::from_secs(drain_timeout_seconds as u64)
                } else {
                    default_drain
                };
                let already = inst.draining.is_some();
                // A drain already under way keeps its (earlier) deadline: a
                // repeated unregister cannot extend it.
                let drain = match inst.draining {
                    Some(d) if d.deadline <= Instant::now() + timeout => d,
                    _ => Drain {
                        deadline: Instant::now() + timeout,
                        deadline_wall: SystemTime::now() + timeout,
                        connections_at_start: active,
                    },
                };
                inst.draining = Some(drain);
                let deadline_wall = drain.deadline_wall;
                let left = drain
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
                    .ceil() as u64;
                let out = Unregistered {
                    active_connections: active,
                    graceful: true,
                    deadline: Some(deadline_wall),
                    message: format!(
                        "instance {instance_id} is draining: no new traffic, {active} active connections finish within {left}s, then it is removed"
                    ),
                };
                (Ok(out), !already)
            } else {
                let inst = inner.instances.remove(instance_id).expect("present");
                inner.by_registration.remove(&inst.registration_id);
                let out = Unregistered {
                    active_connections: active,
                    graceful: false,
                    deadline: None,
                    message: format!(
                        "instance {instance_id} removed; {active} active connections were not drained"
                    ),
                };
                (Ok(out), true)
            }
        })
    }

    /// Renews a lease. An unknown or mismatched registration is answered
    /// `acknowledged = false` with `action = reregister`.
    pub fn heartbeat(
        &self,
        mut req: pb::HeartbeatRequest,
    ) -> Result<HeartbeatOutcome, RegistryError> {
        if req.instance_id.is_empty() {
            return Err(RegistryError::InvalidArgument(
                "instance_id: is empty".into(),
            ));
        }
        let now = Instant::now();
        Ok(self.with(|inner| {
            let known = inner
                .by_registration
                .get(&req.registration_id)
                .is_some_and(|id| *id == req.instance_id);
            let Some(inst) = inner.instances.get_mut(&req.instance_id).filter(|_| known) else {
                let mut instructions = HashMap::new();
                instructions.insert("action".to_string(), "reregister".to_string());
                let out = HeartbeatOutcome {
                    acknowledged: false,
                    message: format!(
                        "registration {:?} of instance {} is unknown to this NLB; register again",
                        req.registration_id, req.instance_id
                    ),
                    instructions,
                    ..HeartbeatOutcome::default()
                };
                return (out, false);
            };
            let before = inst.state();
            inst.last_beat = now;
            inst.last_beat_wall = SystemTime::now();
            if let Some(status) = HealthStatus::from_wire(req.status) {
                if status != HealthStatus::Unspecified {
                    inst.reported = status;
                }
            }
            // A connect-failure ejection lasts until a heartbeat finds the
            // instance healthy again.
            if inst.state().0 == EndpointState::Healthy {
                inst.counters.clear_ejection();
            }
            // The stats move into the instance (no copy per beat); a copy
            // is made only when they are due in the series.
            let mut stats_to_record = None;
            if let Some(stats) = req.current_stats.take() {
                inst.stats_at = Some(SystemTime::now());
                let interval = inner.settings.series_interval;
                if inst
                    .series_at
                    .is_none_or(|at| now.duration_since(at) >= interval)
                {
                    inst.series_at = Some(now);
                    stats_to_record = Some((req.instance_id.clone(), stats.clone()));
                }
                inst.stats = Some(stats);
            }
            if !inst.lease_ok {
                inst.recovering_beats += 1;
                if inst.recovering_beats >= inst.timings.healthy_threshold {
                    inst.lease_ok = true;
                    inst.recovering_beats = 0;
                }
            }
            let mut out = HeartbeatOutcome {
                acknowledged: true,
                message: format!("lease renewed for {}s", inst.timings.lease().as_secs()),
                stats_to_record,
                ..HeartbeatOutcome::default()
            };
            if let Some(drain) = inst.draining {
                let left = drain.deadline.saturating_duration_since(now).as_secs();
                out.instructions.insert("action".into(), "drain".into());
                out.instructions
                    .insert("drain_deadline_seconds".into(), left.to_string());
                out.message = format!("draining: finish open connections within {left}s");
            } else {
                match inst.pending.take() {
                    Some(Instruction::Reload) => {
                        out.instructions.insert("action".into(), "reload".into());
                        out.should_reload = true;
                    }
                    Some(Instruction::Shed(n)) => {
                        out.instructions.insert("action".into(), "shed".into());
                        out.instructions
                            .insert("shed_connections".into(), n.to_string());
                    }
                    None => {}
                }
            }
            let module_type = inst.module_type;
            let changed = inst.state() != before;
            // Cleared by the reaper once met, so a heartbeat only looks it up.
            if let Some(target) = inner.scaling_targets.get(&module_type) {
                out.should_scale = true;
                out.instructions
                    .insert("desired_instances".into(), target.to_string());
            }
            (out, changed)
        }))
    }

    /// Records a `TriggerScaling` target: heartbeats of the type carry
    /// `should_scale` until the reaper sees it met.
    pub fn set_scaling_target(&self, module_type: ModuleType, target: i32) {
        self.with(|inner| {
            inner.scaling_targets.insert(module_type, target);
            ((), false)
        });
    }

    /// Queues an instruction for an instance's next heartbeat response.
    pub fn instruct(&self, instance_id: &str, instruction: Instruction) -> bool {
        self.with(|inner| match inner.instances.get_mut(instance_id) {
            Some(inst) => {
                inst.pending = Some(instruction);
                (true, false)
            }
            None => (false, false),
        })
    }

    /// Applies leases and deadlines as of `now`: lapsed leases stop new
    /// traffic; drains past their deadline and instances silent past the
    /// removal grace are removed.
    pub fn tick(&self, now: Instant) -> Tick {
        self.with(|inner| {
            let grace = inner.settings.removal_grace;
            let mut tick = Tick::default();
            for inst in inner.instances.values_mut() {
                let silent = now.saturating_duration_since(inst.last_beat);
                if inst.draining.is_some_and(|d| now >= d.deadline) {
                    tick.drained.push(inst.info.instance_id.clone());
                } else if silent > inst.timings.lease() + grace {
                    tick.expired.push(inst.info.instance_id.clone());
                } else if inst.lease_ok && silent > inst.timings.lease() {
                    inst.lease_ok = false;
                    inst.recovering_beats = 0;
                    tick.lapsed.push(inst.info.instance_id.clone());
                }
            }
            for id in tick.drained.iter().chain(&tick.expired) {
                if let Some(addr) = remove(inner, id) {
                    tick.removed_addresses.push(addr);
                }
            }
            // Scaling targets that are met stop being announced.
            if !inner.scaling_targets.is_empty() {
                let mut live: HashMap<ModuleType, i32> = HashMap::new();
                for i in inner.instances.values().filter(|i| i.draining.is_none()) {
                    *live.entry(i.module_type).or_insert(0) += 1;
                }
                inner
                    .scaling_targets
                    .retain(|t, target| live.get(t).copied().unwrap_or(0) != *target);
            }
            let changed =
                !tick.lapsed.is_empty() || !tick.drained.is_empty() || !tick.expired.is_empty();
            (tick, changed)
        })
    }

    /// Instances due an active health check at `now`: (id, ModuleService
    /// address, timeout). Their next check is scheduled one interval on.
    pub fn due_checks(&self, now: Instant) -> Vec<DueCheck> {
        self.with(|inner| {
            let mut due = Vec::new();
            for inst in inner.instances.values_mut() {
                if inst.draining.is_none() && inst.next_check <= now {
                    inst.next_check = now + inst.timings.interval;
                    due.push(DueCheck {
                        instance_id: inst.info.instance_id.clone(),
                        registration_id: inst.registration_id.clone(),
                        address: inst.info.address.clone(),
                        timeout: inst.timings.timeout,
                    });
                }
            }
            (due, false)
        })
    }

    /// Records an active health check result: `unhealthy_threshold`
    /// consecutive failures stop new traffic, `healthy_threshold` consecutive
    /// passes restore it. A result for an earlier registration of the same
    /// instance id (it re-registered while the check ran) is dropped.
    pub fn record_check(&self, check: &DueCheck, passed: bool, message: String) {
        self.with(|inner| {
            let Some(inst) = inner
                .instances
                .get_mut(&check.instance_id)
                .filter(|i| i.registration_id == check.registration_id)
            else {
                return ((), false);
            };
            let before = inst.check_ok;
            inst.last_check = Some((SystemTime::now(), message));
            if passed {
                inst.check_failures = 0;
                inst.check_successes += 1;
                if inst.check_successes >= inst.timings.healthy_threshold {
                    inst.check_ok = true;
                }
            } else {
                inst.check_successes = 0;
                inst.check_failures += 1;
                if inst.check_failures >= inst.timings.unhealthy_threshold {
                    inst.check_ok = false;
                }
            }
            ((), inst.check_ok != before)
        });
    }

    /// Forgets every active-check failure (active checks were turned off).
    pub fn clear_check_failures(&self) {
        self.with(|inner| {
            let mut changed = false;
            for inst in inner.instances.values_mut() {
                changed |= !inst.check_ok;
                inst.check_ok = true;
                inst.check_failures = 0;
                inst.check_successes = 0;
            }
            ((), changed)
        });
    }

    /// Replaces (or extends) the routes an instance announces.
    pub fn set_instance_routes(
        &self,
        instance_id: &str,
        mut routes: Vec<RouteSpec>,
        replace_all: bool,
    ) -> Result<usize, RegistryError> {
        self.with(|inner| {
            for spec in &mut routes {
                inner.route_keys.intern(spec);
            }
            let Some(inst) = inner.instances.get_mut(instance_id) else {
                return (
                    Err(RegistryError::NotFound(format!(
                        "no instance {instance_id} is registered"
                    ))),
                    false,
                );
            };
            let n = routes.len();
            if replace_all {
                inst.routes = routes;
            } else {
                for spec in routes {
                    inst.routes.retain(|r| r.route_id() != spec.route_id());
                    inst.routes.push(spec);
                }
            }
            inst.pending = Some(Instruction::Reload);
            (Ok(n), true)
        })
    }

    /// The module type an instance registered as.
    /// Who registered an instance: `None` if it is not registered,
    /// `Some(None)` if it was registered while the API was open.
    pub fn owner_of(&self, instance_id: &str) -> Option<Option<String>> {
        self.inner
            .lock()
            .instances
            .get(instance_id)
            .map(|i| i.owner.clone())
    }

    pub fn module_type_of(&self, instance_id: &str) -> Option<ModuleType> {
        self.read(|inner| inner.instances.get(instance_id).map(|i| i.module_type))
    }
}

/// Removes an instance; returns its ModuleService address.
fn remove(inner: &mut Inner, id: &str) -> Option<String> {
    let inst = inner.instances.remove(id)?;
    inner.by_registration.remove(&inst.registration_id);
    Some(inst.info.address)
}
