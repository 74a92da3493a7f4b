//! RegisterModule, UnregisterModule, Heartbeat, ListModules, GetModuleInfo.

use shared_types::pb::{self, HealthStatus, ModuleType};
use shared_types::time::{from_system, now};
use tonic::Status;

use super::ControlService;
use crate::registry::InstanceView;
use shared_types::query::{self, Fields, Queryable, Value};

/// Fields `ListModules` queries may name.
const MODULE_FIELDS: Fields = Fields {
    names: &[
        "instance_id",
        "module_type",
        "address",
        "health_status",
        "version",
        "current_connections",
        "max_connections",
        "traffic_weight",
        "started_at",
    ],
    map_prefixes: &["metadata"],
};

impl Queryable for InstanceView {
    fn field(&self, name: &str) -> Option<Value> {
        let i = &self.instance;
        let num = |n: i32| Some(Value::Num(f64::from(n)));
        match name {
            "instance_id" => Some(Value::Str(i.instance_id.clone())),
            "module_type" => Some(Value::Str(self.module_type.short_name().into())),
            "address" => Some(Value::Str(i.address.clone())),
            "health_status" => {
                HealthStatus::from_wire(i.health_status).map(|s| Value::Str(s.short_name().into()))
            }
            "version" => Some(Value::Str(i.version.clone())),
            "current_connections" => num(i.current_connections),
            "max_connections" => num(i.max_connections),
            "traffic_weight" => num(i.traffic_weight),
            "started_at" => i.started_at.as_ref().map(|t| Value::Num(t.seconds as f64)),
            other => other
                .strip_prefix("metadata.")
                .and_then(|k| i.metadata.get(k))
                .map(|v| Value::Str(v.clone())),
        }
    }
}

impl ControlService {
    pub(super) async fn register_module(
        &self,
        req: pb::RegisterModuleRequest,
        owner: Option<&str>,
        may_take_over: bool,
    ) -> Result<pb::RegisterModuleResponse, Status> {
        let metrics = &self.nlb.metrics;
        match self.nlb.registry.register_as(&req, owner, may_take_over) {
            Ok(r) => {
                if let Some(old) = &r.replaced_address {
                    self.nlb.modules.forget(old);
                }
                metrics
                    .registrations
                    .with_label_values(&[if r.renewed { "renewed" } else { "registered" }])
                    .inc();
                tracing::info!(
                    instance = req.instance.as_ref().map_or("", |i| i.instance_id.as_str()),
                    takes_traffic = r.takes_traffic,
                    "{}",
                    r.message
                );
                Ok(pb::RegisterModuleResponse {
                    success: true,
                    message: r.message,
                    registration_id: r.registration_id,
                    registered_at: Some(from_system(r.registered_at)),
                    error: None,
                })
            }
            Err(e) => {
                metrics.registrations.with_label_values(&["refused"]).inc();
                Err(e.into())
            }
        }
    }

    pub(super) async fn unregister_module(
        &self,
        req: pb::UnregisterModuleRequest,
    ) -> Result<pb::UnregisterModuleResponse, Status> {
        let address = self
            .nlb
            .registry
            .get(&req.instance_id)
            .map(|v| v.instance.address);
        let out = self.nlb.registry.unregister(
            &req.instance_id,
            &req.registration_id,
            req.graceful,
            req.drain_timeout_seconds,
        )?;
        let mode = if out.graceful {
            "graceful"
        } else {
            "immediate"
        };
        self.nlb
            .metrics
            .unregistrations
            .with_label_values(&[mode])
            .inc();
        if !out.graceful {
            self.nlb
                .metrics
                .removals
                .with_label_values(&["unregistered"])
                .inc();
            self.nlb.series.remove_owner(&req.instance_id);
            if let Some(a) = address {
                self.nlb.modules.forget(&a);
            }
        }
        tracing::info!(instance = %req.instance_id, mode, "{}", out.message);
        Ok(pb::UnregisterModuleResponse {
            success: true,
            message: out.message,
            active_connections_drained: if out.graceful {
                i32::try_from(out.active_connections).unwrap_or(i32::MAX)
            } else {
                0
            },
            error: None,
        })
    }

    pub(super) async fn heartbeat(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, Status> {
        let mut out = self.nlb.registry.heartbeat(req)?;
        let result = if out.acknowledged { "ok" } else { "reregister" };
        self.nlb
            .metrics
            .heartbeats
            .with_label_values(&[result])
            .inc();
        if let Some((instance_id, stats)) = out.stats_to_record.take() {
            self.nlb.record_heartbeat_stats(&instance_id, &stats);
        }
        Ok(pb::HeartbeatResponse {
            acknowledged: out.acknowledged,
            message: out.message,
            server_time: Some(now()),
            should_reload: out.should_reload,
            should_scale: out.should_scale,
            instructions: out.instructions,
        })
    }

    pub(super) async fn list_modules(
        &self,
        req: pb::ListModulesRequest,
    ) -> Result<pb::ListModulesResponse, Status> {
        let type_filter = ModuleType::from_wire(req.module_type_filter).ok_or_else(|| {
            Status::invalid_argument(format!(
                "module_type_filter: {} is not a module type",
                req.module_type_filter
            ))
        })?;
        let status_filter = HealthStatus::from_wire(req.status_filter).ok_or_else(|| {
            Status::invalid_argument(format!(
                "status_filter: {} is not a health status",
                req.status_filter
            ))
        })?;
        let views: Vec<InstanceView> = self
            .nlb
            .registry
            .list()
            .into_iter()
            .filter(|v| type_filter == ModuleType::Unspecified || v.module_type == type_filter)
            .filter(|v| {
                status_filter == HealthStatus::Unspecified
                    || v.instance.health_status == status_filter as i32
            })
            .collect();
        let (page, pagination) = query::apply(views, req.query.as_ref(), &MODULE_FIELDS)?;
        Ok(pb::ListModulesResponse {
            modules: page.into_iter().map(|v| v.instance).collect(),
            total_modules: pagination.total_items,
            pagination: Some(pagination),
        })
    }

    pub(super) async fn get_module_info(
        &self,
        req: pb::GetModuleInfoRequest,
    ) -> Result<pb::GetModuleInfoResponse, Status> {
        if req.instance_id.is_empty() {
            return Err(Status::invalid_argument("instance_id: is empty"));
        }
        let v = self.nlb.registry.get(&req.instance_id).ok_or_else(|| {
            Status::not_found(format!("no instance {} is registered", req.instance_id))
        })?;
        Ok(pb::GetModuleInfoResponse {
            instance: Some(v.instance),
            routes: v.routes,
            stats: v.stats,
            deployment_config: Some(v.deployment),
            details: v.details,
        })
    }
}
