//! GetLoadDistribution, RebalanceLoad, TriggerScaling.

use std::collections::HashMap;
use std::time::Duration;

use shared_types::pb::{self, ModuleType};
use shared_types::time::now;
use tonic::{Code, Status};

use super::ControlService;
use crate::registry::{ForcedRebalance, Registry, Strategy};

impl ControlService {
    pub(super) async fn get_load_distribution(
        &self,
        req: pb::GetLoadDistributionRequest,
    ) -> Result<pb::GetLoadDistributionResponse, Status> {
        let filter = ModuleType::from_wire(req.module_type_filter).ok_or_else(|| {
            Status::invalid_argument(format!(
                "module_type_filter: {} is not a module type",
                req.module_type_filter
            ))
        })?;
        let mut loads = Vec::new();
        let mut distribution = HashMap::new();
        for v in self.nlb.registry.list() {
            if filter != ModuleType::Unspecified && v.module_type != filter {
                continue;
            }
            let mut load = v.load.clone();
            if req.include_historical {
                // Averages over the heartbeat samples retained for the instance.
                let id = &v.instance.instance_id;
                let avg = |name: &str| {
                    let pts = self.nlb.series.query(id, &[name.to_string()], 0, u64::MAX);
                    (!pts.is_empty())
                        .then(|| pts.iter().map(|p| p.value).sum::<f64>() / pts.len() as f64)
                };
                if let Some(c) = avg("cpu_usage_percent") {
                    load.cpu_usage_percent = c;
                }
                if let Some(m) = avg("memory_usage_mb") {
                    load.memory_usage_mb = m;
                }
                if let Some(l) = avg("avg_latency_ms") {
                    load.avg_latency_ms = l;
                }
            }
            if v.details.get("takes_traffic").is_some_and(|t| t == "true") {
                loads.push(load.clone());
            }
            distribution.insert(v.instance.instance_id.clone(), load);
        }
        Ok(pb::GetLoadDistributionResponse {
            distribution,
            balance_score: Registry::balance_score(&loads),
            measured_at: Some(now()),
        })
    }

    pub(super) async fn rebalance_load(
        &self,
        req: pb::RebalanceLoadRequest,
    ) -> Result<pb::RebalanceLoadResponse, Status> {
        let strategy = Strategy::parse(&req.strategy).map_err(Status::invalid_argument)?;
        let unknown: Vec<&String> = req
            .target_instances
            .iter()
            .filter(|id| self.nlb.registry.module_type_of(id).is_none())
            .collect();
        if !unknown.is_empty() {
            return Err(Status::invalid_argument(format!(
                "target_instances: not registered: {}",
                unknown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let out = self
            .nlb
            .registry
            .rebalance(strategy, req.force, &req.target_instances);
        let mut message = format!(
            "load scores refreshed ({}) for {} instances",
            if strategy == Strategy::Even {
                "even"
            } else {
                "least_connections"
            },
            out.previous.len()
        );
        if req.force {
            if out.shed.is_empty() {
                message.push_str("; no instance is overloaded");
            } else {
                let list: Vec<String> = out
                    .shed
                    .iter()
                    .map(|(id, n)| format!("{id} sheds {n}"))
                    .collect();
                message.push_str(&format!("; told to shed: {}", list.join(", ")));
            }
        }
        tracing::info!(force = req.force, shed = out.shed.len(), "{message}");
        if req.force && !out.shed.is_empty() {
            let job = ForcedRebalance {
                strategy,
                targets: req.target_instances.clone(),
                rounds: 0,
            };
            let running = self.nlb.rebalancing.lock().replace(job).is_some();
            if running {
                message.push_str(&format!(
                    "; the forced rebalance already running goes on with these arguments, up to {REBALANCE_ROUNDS} times again"
                ));
            } else {
                message.push_str(&format!(
                    "; checked again every {} s, up to {} times, until every instance is within its bound",
                    REBALANCE_PERIOD.as_secs(),
                    REBALANCE_ROUNDS
                ));
                let nlb = std::sync::Arc::clone(&self.nlb);
                tokio::spawn(async move { follow_up(&nlb).await });
            }
        }
        Ok(pb::RebalanceLoadResponse {
            success: true,
            message,
            previous_distribution: out.previous,
            new_distribution: out.target,
            error: None,
        })
    }

    /// `TriggerScaling` with `scaling_action: autoscale`: the request's
    /// `ScalingConfig` becomes the autoscaling policy of the module type
    /// (`autoscaling.modules.<type>`, through the API layer, persisted like
    /// `UpdateNLBConfig`). `auto_scaling_enabled: false` with nothing else
    /// set stops a type's policy and keeps its settings; with settings, it
    /// sets them, stopped.
    fn set_autoscaling(
        &self,
        module_type: ModuleType,
        req: &pb::TriggerScalingRequest,
    ) -> Result<pb::TriggerScalingResponse, Status> {
        let c = req.config.ok_or_else(|| {
            Status::invalid_argument("config: autoscale needs a ScalingConfig (the policy)")
        })?;
        let key = module_type.short_name().to_string();
        let mut stored = None;
        let change = self.nlb.config.modify_section("autoscaling", false, |now| {
            let mut a = now.autoscaling.clone();
            let defaults = crate::config::TypeScaling::default();
            let seconds = |s: i32, d: u64| if s > 0 { s as u64 } else { d };
            let policy = crate::config::TypeScaling {
                enabled: c.auto_scaling_enabled,
                min_instances: c.min_instances.max(0) as u32,
                max_instances: if c.max_instances > 0 {
                    c.max_instances as u32
                } else {
                    defaults.max_instances
                },
                target_connections: c.target_connections.max(0) as u32,
                target_cpu_percent: c.target_cpu_percent.max(0) as u32,
                scale_up_cooldown_seconds: seconds(
                    c.cooldown_seconds,
                    defaults.scale_up_cooldown_seconds,
                ),
                scale_down_cooldown_seconds: seconds(
                    c.cooldown_seconds,
                    defaults.scale_down_cooldown_seconds,
                ),
                ..a.modules.get(&key).cloned().unwrap_or(defaults)
            };
            let only_off = !c.auto_scaling_enabled
                && c.min_instances == 0
                && c.max_instances == 0
                && c.target_connections == 0
                && c.target_cpu_percent == 0
                && c.cooldown_seconds == 0;
            if only_off && !a.modules.contains_key(&key) {
                return Err(crate::config::UpdateError::Invalid(vec![
                    crate::config::ConfigError::new(
                        format!("autoscaling.modules.{key}"),
                        "no autoscaling policy to stop".to_string(),
                    ),
                ]));
            }
            let policy = match a.modules.get(&key) {
                Some(existing) if only_off => crate::config::TypeScaling {
                    enabled: false,
                    ..existing.clone()
                },
                _ => policy,
            };
            stored = Some(policy.clone());
            a.modules.insert(key.clone(), policy);
            serde_yaml_ng::to_value(&a).map_err(|e| {
                crate::config::UpdateError::Invalid(vec![crate::config::ConfigError::new(
                    "autoscaling",
                    e.to_string(),
                )])
            })
        });
        match change {
            Ok(_) => {
                self.nlb.apply_config();
                let p = stored.unwrap_or_default();
                Ok(pb::TriggerScalingResponse {
                    success: true,
                    message: format!(
                        "autoscaling policy of {key} set: {} to {} instances, {} connections and {}% CPU per instance, cooldowns {} s up and {} s down ({})",
                        p.min_instances,
                        p.max_instances,
                        p.target_connections,
                        p.target_cpu_percent,
                        p.scale_up_cooldown_seconds,
                        p.scale_down_cooldown_seconds,
                        if p.enabled { "enabled" } else { "disabled" }
                    ),
                    current_instances: self.nlb.module_addresses(module_type).len() as i32,
                    target_instances: 0,
                    scaling_action: "autoscale".into(),
                    error: None,
                })
            }
            Err(crate::config::UpdateError::Invalid(errors)) => Err(Status::invalid_argument(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
            Err(crate::config::UpdateError::Persist(e)) => {
                Err(Status::unavailable(format!("section autoscaling: {e}")))
            }
        }
    }

    pub(super) async fn trigger_scaling(
        &self,
        req: pb::TriggerScalingRequest,
    ) -> Result<pb::TriggerScalingResponse, Status> {
        let requested_type = ModuleType::from_wire(req.module_type).ok_or_else(|| {
            Status::invalid_argument(format!(
                "module_type: {} is not a module type",
                req.module_type
            ))
        })?;
        let module_type = if !req.instance_id.is_empty() {
            let t = self
                .nlb
                .registry
                .module_type_of(&req.instance_id)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "instance_id: no instance {} is registered",
                        req.instance_id
                    ))
                })?;
            if requested_type != ModuleType::Unspecified && requested_type != t {
                return Err(Status::invalid_argument(format!(
                    "instance {} is a {t} instance, not {requested_type}",
                    req.instance_id
                )));
            }
            t
        } else if requested_type == ModuleType::Unspecified {
            return Err(Status::invalid_argument(
                "name the module type (module_type) or an instance (instance_id) to scale",
            ));
        } else {
            requested_type
        };
        if req.scaling_action.trim() == "autoscale" {
            return self.set_autoscaling(module_type, &req);
        }
        let instances = self.nlb.module_addresses(module_type);
        let current = instances.len() as i32;
        let target = match req.scaling_action.trim() {
            "scale_up" => current + 1,
            "scale_down" => (current - 1).max(0),
            "scale_to" if req.target_instances >= 0 => req.target_instances,
            "scale_to" => {
                return Err(Status::invalid_argument(format!(
                    "target_instances: {} is negative",
                    req.target_instances
                )))
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "scaling_action: {other:?} is not an action (scale_up, scale_down, scale_to, autoscale)"
                )))
            }
        };
        // The instance asked to carry out the scaling: the one named, else the
        // first of the type by id.
        let (id, addr, _) = instances
            .iter()
            .find(|(id, _, _)| req.instance_id.is_empty() || *id == req.instance_id)
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no live {module_type} instance is registered to carry out {}",
                    req.scaling_action
                ))
            })?;
        let mut config = req.config.unwrap_or_default();
        // Exactly the target: scalers keep the count within min..=max, so a
        // larger max would leave a scale-down undone.
        config.min_instances = target;
        config.max_instances = target;
        let deadline =
            Duration::from_millis(self.nlb.config.current().routing.module_call_timeout_ms);
        let msg = pb::ScaleRequest {
            instance_id: id.clone(),
            config: Some(config),
            immediate: true,
        };
        let msg = self.nlb.modules.changing(msg, deadline);
        let answer = self
            .nlb
            .modules
            .call(
                &id,
                &addr,
                deadline,
                |mut c| async move { c.scale(msg).await },
            )
            .await;
        let answer = match answer {
            Ok(a) if a.success => a,
            Ok(a) => {
                let why = a
                    .error
                    .as_ref()
                    .map_or(a.message.as_str(), |e| e.message.as_str());
                return Err(Status::failed_precondition(format!(
                    "{module_type} instance {id} cannot scale: {why}"
                )));
            }
            Err(s) if matches!(s.code(), Code::Unimplemented | Code::FailedPrecondition) => {
                return Err(Status::failed_precondition(format!(
                    "{module_type} instance {id} cannot scale: {}",
                    s.message()
                )));
            }
            Err(s) => return Err(s),
        };
        self.nlb.registry.set_scaling_target(module_type, target);
        tracing::info!(%module_type, current, target, instance = %id, "scaling requested");
        Ok(pb::TriggerScalingResponse {
            success: true,
            message: format!(
                "{module_type}: {} from {current} to {target} instances, carried out by {id}: {}",
                req.scaling_action.trim(),
                answer.message
            ),
            current_instances: if answer.current_instances > 0 {
                answer.current_instances
            } else {
                current
            },
            target_instances: if answer.desired_instances > 0 {
                answer.desired_instances
            } else {
                target
            },
            scaling_action: req.scaling_action.trim().to_string(),
            error: None,
        })
    }
}

/// How often a forced rebalance looks again.
pub const REBALANCE_PERIOD: std::time::Duration = std::time::Duration::from_secs(3);
/// How many times it looks again at most.
pub const REBALANCE_ROUNDS: u32 = 20;

/// After a forced `RebalanceLoad`: while an instance is still above its
/// bound (its target plus 10% and one connection), tell it again to shed
/// the excess in its next heartbeat, every [`REBALANCE_PERIOD`], at most
/// [`REBALANCE_ROUNDS`] times; stop once every instance is within it. Each
/// round takes the latest forced call's arguments (`nlb.rebalancing`); a
/// newer call starts the count again. Ends with `nlb.rebalancing` empty.
async fn follow_up(nlb: &crate::app::Nlb) {
    loop {
        tokio::time::sleep(REBALANCE_PERIOD).await;
        let (strategy, targets, round) = {
            let mut job = nlb.rebalancing.lock();
            let Some(j) = job.as_mut() else { return };
            j.rounds += 1;
            if j.rounds > REBALANCE_ROUNDS
                || nlb.shutting_down.load(std::sync::atomic::Ordering::Relaxed)
            {
                let gave_up = j.rounds > REBALANCE_ROUNDS;
                *job = None;
                if gave_up {
                    tracing::warn!(
                        rounds = REBALANCE_ROUNDS,
                        "forced rebalance gave up: some instance is still above its bound (its connections may not be idle)"
                    );
                }
                return;
            }
            (j.strategy, j.targets.clone(), j.rounds)
        };
        let out = nlb.registry.rebalance(strategy, true, &targets);
        if out.shed.is_empty() {
            let mut job = nlb.rebalancing.lock();
            // Unless a newer call came meanwhile: it is looked at next round.
            if job.as_ref().is_some_and(|j| j.rounds == round) {
                *job = None;
                tracing::info!(
                    round,
                    "forced rebalance done: every instance is within its bound"
                );
                return;
            }
            continue;
        }
        let list: Vec<String> = out
            .shed
            .iter()
            .map(|(id, n)| format!("{id} sheds {n}"))
            .collect();
        tracing::info!(round, "forced rebalance, still over: {}", list.join(", "));
    }
}
