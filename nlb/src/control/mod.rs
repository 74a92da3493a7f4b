//! The control API: `NLBService` over the registry, config and metrics store,
//! and the clients the NLB uses to drive modules' `ModuleService`.

mod load;
pub mod module_client;
mod modules;
mod rollouts;
mod routes;
mod status;
mod telemetry;

use std::sync::Arc;

use shared_types::pb::{self, nlb_service_server::NlbService};
use tonic::{Request, Response, Status};

pub use status::sha256_hex;

use crate::app::Nlb;
use crate::audit::{self, Caller, Outcome};
use crate::auth::{Principal, Role};
use crate::registry::RegistryError;

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::InvalidArgument(m) => Status::invalid_argument(m),
            RegistryError::NotFound(m) => Status::not_found(m),
            RegistryError::AlreadyExists(m) => Status::already_exists(m),
            RegistryError::PermissionDenied(m) => Status::permission_denied(m),
            RegistryError::ResourceExhausted(m) => Status::resource_exhausted(m),
        }
    }
}

/// The `NLBService` implementation.
#[derive(Clone)]
pub struct ControlService {
    nlb: Arc<Nlb>,
}

impl ControlService {
    pub fn new(nlb: Arc<Nlb>) -> Self {
        ControlService { nlb }
    }
}

type Reply<T> = Result<Response<T>, Status>;

impl ControlService {
    /// A module token acts only for the instances it registered.
    fn check_owner(&self, caller: &Principal, instance_id: &str) -> Result<(), Status> {
        if caller.role != Role::Module {
            return Ok(());
        }
        match self.nlb.registry.owner_of(instance_id) {
            // Not registered: the handler answers that.
            None => Ok(()),
            Some(owner) => caller.check_owns(&format!("instance {instance_id}"), owner.as_deref()),
        }
    }

    /// Records an operator change in the audit trail and hands back its result.
    fn audited<T>(
        &self,
        caller: &Caller,
        method: &str,
        what: &str,
        result: Result<T, Status>,
        ok: impl Fn(&T) -> Result<(), String>,
    ) -> Reply<T> {
        audit::record(
            &self.nlb.metrics.audit_events,
            caller,
            method,
            what,
            &Outcome::of(&result, ok),
        );
        result.map(Response::new)
    }
}

/// A short list of ids for audit lines.
fn id_list<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let ids: Vec<&str> = ids.collect();
    let shown: Vec<&str> = ids.iter().take(10).copied().collect();
    let more = ids.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(","))
    } else {
        shown.join(",")
    }
}

fn type_name(wire: i32) -> String {
    pb::ModuleType::from_wire(wire).map_or_else(|| wire.to_string(), |t| t.short_name().to_string())
}

fn success(ok: bool, message: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(message.to_string())
    }
}

#[tonic::async_trait]
impl NlbService for ControlService {
    async fn register_module(
        &self,
        r: Request<pb::RegisterModuleRequest>,
    ) -> Reply<pb::RegisterModuleResponse> {
        let caller = Principal::of(&r);
        let req = r.into_inner();
        if let Some(t) = req
            .instance
            .as_ref()
            .and_then(|i| pb::ModuleType::from_wire(i.module_type))
        {
            caller.check_module_type(t)?;
        }
        self.register_module(req, caller.owner(), caller.role != Role::Module)
            .await
            .map(Response::new)
    }
    async fn unregister_module(
        &self,
        r: Request<pb::UnregisterModuleRequest>,
    ) -> Reply<pb::UnregisterModuleResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        if caller.principal.role == Role::Module {
            self.check_owner(&caller.principal, &req.instance_id)?;
            return self.unregister_module(req).await.map(Response::new);
        }
        // An operator removing an instance is an operator change.
        let what = format!(
            "instance {} graceful={} drain_timeout_seconds={}",
            req.instance_id, req.graceful, req.drain_timeout_seconds
        );
        let result = self.unregister_module(req).await;
        self.audited(&caller, "UnregisterModule", &what, result, |r| {
            success(r.success, &r.message)
        })
    }
    async fn heartbeat_stream(
        &self,
        r: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Reply<tonic::codegen::BoxStream<pb::HeartbeatResponse>> {
        use futures::StreamExt;
        let caller = Principal::of(&r);
        let inbound = r.into_inner();
        // Each answer is computed as the response stream is polled: no task
        // or channel between the beat and its answer.
        let answers =
            futures::stream::unfold(Some((inbound, self.clone(), caller)), |state| async move {
                let (mut inbound, this, caller) = state?;
                // The client ended the stream, or it broke.
                let Ok(Some(req)) = inbound.message().await else {
                    return None;
                };
                let answer = match this.check_owner(&caller, &req.instance_id) {
                    Ok(()) => this.heartbeat(req).await,
                    Err(denied) => Err(denied),
                };
                // An error ends the stream, as it ends a unary call.
                let next = answer.is_ok().then_some((inbound, this, caller));
                Some((answer, next))
            });
        let mut stopping = self.nlb.shutdown_signal.subscribe();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        Ok(Response::new(Box::pin(answers.take_until(stopped))))
    }
    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatResponse> {
        let caller = Principal::of(&r);
        let req = r.into_inner();
        self.check_owner(&caller, &req.instance_id)?;
        self.heartbeat(req).await.map(Response::new)
    }
    async fn list_modules(
        &self,
        r: Request<pb::ListModulesRequest>,
    ) -> Reply<pb::ListModulesResponse> {
        self.list_modules(r.into_inner()).await.map(Response::new)
    }
    async fn get_module_info(
        &self,
        r: Request<pb::GetModuleInfoRequest>,
    ) -> Reply<pb::GetModuleInfoResponse> {
        self.get_module_info(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn update_routing(
        &self,
        r: Request<pb::UpdateRoutingRequest>,
    ) -> Reply<pb::UpdateRoutingResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!(
            "{} routes [{}] replace_all={} validate_only={}{}",
            req.routes.len(),
            id_list(req.routes.iter().map(|r| r.route_id.as_str())),
            req.replace_all,
            req.validate_only,
            if req.source_instance_id.is_empty() {
                String::new()
            } else {
                format!(" source_instance_id={}", req.source_instance_id)
            }
        );
        let result = match caller.principal.check_may_change(
            "UpdateRouting",
            req.validate_only,
            "validate_only",
        ) {
            Ok(()) => self.update_routing(req).await,
            Err(denied) => Err(denied),
        };
        self.audited(&caller, "UpdateRouting", &what, result, |r| {
            success(r.success, &r.message)
        })
    }
    async fn get_routing_table(
        &self,
        r: Request<pb::GetRoutingTableRequest>,
    ) -> Reply<pb::GetRoutingTableResponse> {
        self.get_routing_table(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn route_request(
        &self,
        r: Request<pb::RouteRequestRequest>,
    ) -> Reply<pb::RouteRequestResponse> {
        let caller = Principal::of(&r);
        let req = r.into_inner();
        caller.check_may_change("RouteRequest", req.dry_run, "dry_run")?;
        self.route_request(req).await.map(Response::new)
    }
    async fn validate_route(
        &self,
        r: Request<pb::ValidateRouteRequest>,
    ) -> Reply<pb::ValidateRouteResponse> {
        self.validate_route(r.into_inner()).await.map(Response::new)
    }
    async fn report_metrics(
        &self,
        r: Request<pb::ReportMetricsRequest>,
    ) -> Reply<pb::ReportMetricsResponse> {
        let caller = Principal::of(&r);
        let req = r.into_inner();
        self.check_owner(&caller, &req.instance_id)?;
        self.report_metrics(req).await.map(Response::new)
    }
    async fn get_nlb_metrics(
        &self,
        r: Request<pb::GetNlbMetricsRequest>,
    ) -> Reply<pb::GetNlbMetricsResponse> {
        self.get_nlb_metrics(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn get_module_metrics(
        &self,
        r: Request<pb::GetModuleMetricsRequest>,
    ) -> Reply<pb::GetModuleMetricsResponse> {
        self.get_module_metrics(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn stream_nlb_metrics(
        &self,
        r: Request<pb::StreamNlbMetricsRequest>,
    ) -> Reply<tonic::codegen::BoxStream<pb::StreamNlbMetricsResponse>> {
        self.stream_nlb_metrics(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn check_health(
        &self,
        r: Request<pb::CheckHealthRequest>,
    ) -> Reply<pb::CheckHealthResponse> {
        self.check_health(r.into_inner()).await.map(Response::new)
    }
    async fn get_nlb_status(
        &self,
        r: Request<pb::GetNlbStatusRequest>,
    ) -> Reply<pb::GetNlbStatusResponse> {
        self.get_nlb_status(r.into_inner()).await.map(Response::new)
    }
    async fn update_nlb_config(
        &self,
        r: Request<pb::UpdateNlbConfigRequest>,
    ) -> Reply<pb::UpdateNlbConfigResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = match &req.config {
            Some(c) => format!(
                "section {} ({} bytes) validate_only={}",
                c.config_type,
                c.config_data.len(),
                req.validate_only
            ),
            None => format!("no config validate_only={}", req.validate_only),
        };
        let result = match caller.principal.check_may_change(
            "UpdateNLBConfig",
            req.validate_only,
            "validate_only",
        ) {
            Ok(()) => self.update_nlb_config(req).await,
            Err(denied) => Err(denied),
        };
        self.audited(&caller, "UpdateNLBConfig", &what, result, |r| {
            success(r.success, &r.message)
        })
    }
    async fn get_nlb_config(
        &self,
        r: Request<pb::GetNlbConfigRequest>,
    ) -> Reply<pb::GetNlbConfigResponse> {
        self.get_nlb_config(r.into_inner()).await.map(Response::new)
    }
    async fn rebalance_load(
        &self,
        r: Request<pb::RebalanceLoadRequest>,
    ) -> Reply<pb::RebalanceLoadResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!(
            "strategy={:?} force={} instances=[{}]",
            req.strategy,
            req.force,
            id_list(req.target_instances.iter().map(String::as_str))
        );
        let result = self.rebalance_load(req).await;
        self.audited(&caller, "RebalanceLoad", &what, result, |r| {
            success(r.success, &r.message)
        })
    }
    async fn get_load_distribution(
        &self,
        r: Request<pb::GetLoadDistributionRequest>,
    ) -> Reply<pb::GetLoadDistributionResponse> {
        self.get_load_distribution(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn start_rollout(
        &self,
        r: Request<pb::StartRolloutRequest>,
    ) -> Reply<pb::StartRolloutResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!(
            "module_type={} baseline={:?} canary={:?} steps={} blue_green={}",
            type_name(req.module_type),
            req.baseline_version,
            req.canary_version,
            req.steps.len(),
            req.blue_green.is_some()
        );
        let result = self.start_rollout(req);
        self.audited(&caller, "StartRollout", &what, result, |_| Ok(()))
    }
    async fn get_rollout(
        &self,
        r: Request<pb::GetRolloutRequest>,
    ) -> Reply<pb::GetRolloutResponse> {
        self.get_rollout(r.into_inner()).map(Response::new)
    }
    async fn list_rollouts(
        &self,
        r: Request<pb::ListRolloutsRequest>,
    ) -> Reply<pb::ListRolloutsResponse> {
        self.list_rollouts(r.into_inner()).map(Response::new)
    }
    async fn promote_rollout(
        &self,
        r: Request<pb::PromoteRolloutRequest>,
    ) -> Reply<pb::PromoteRolloutResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!("rollout={:?} full={}", req.rollout_id, req.full);
        let result = self
            .nlb
            .rollouts
            .promote(req.rollout_id.trim(), req.full)
            .map(|r| pb::PromoteRolloutResponse { rollout: Some(r) })
            .map_err(Status::from);
        self.audited(&caller, "PromoteRollout", &what, result, |_| Ok(()))
    }
    async fn pause_rollout(
        &self,
        r: Request<pb::PauseRolloutRequest>,
    ) -> Reply<pb::PauseRolloutResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!("rollout={:?} reason={:?}", req.rollout_id, req.reason);
        let result = self
            .nlb
            .rollouts
            .pause(req.rollout_id.trim(), &req.reason)
            .map(|r| pb::PauseRolloutResponse { rollout: Some(r) })
            .map_err(Status::from);
        self.audited(&caller, "PauseRollout", &what, result, |_| Ok(()))
    }
    async fn resume_rollout(
        &self,
        r: Request<pb::ResumeRolloutRequest>,
    ) -> Reply<pb::ResumeRolloutResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!("rollout={:?}", req.rollout_id);
        let result = self
            .nlb
            .rollouts
            .resume(req.rollout_id.trim())
            .map(|r| pb::ResumeRolloutResponse { rollout: Some(r) })
            .map_err(Status::from);
        self.audited(&caller, "ResumeRollout", &what, result, |_| Ok(()))
    }
    async fn rollback_rollout(
        &self,
        r: Request<pb::RollbackRolloutRequest>,
    ) -> Reply<pb::RollbackRolloutResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!("rollout={:?} reason={:?}", req.rollout_id, req.reason);
        let result = self
            .nlb
            .rollouts
            .rollback(req.rollout_id.trim(), &req.reason)
            .map(|r| pb::RollbackRolloutResponse { rollout: Some(r) })
            .map_err(Status::from);
        self.audited(&caller, "RollbackRollout", &what, result, |_| Ok(()))
    }
    async fn watch_rollout(
        &self,
        r: Request<pb::WatchRolloutRequest>,
    ) -> Reply<tonic::codegen::BoxStream<pb::RolloutEvent>> {
        self.watch_rollout(r.into_inner()).map(Response::new)
    }
    async fn trigger_scaling(
        &self,
        r: Request<pb::TriggerScalingRequest>,
    ) -> Reply<pb::TriggerScalingResponse> {
        let caller = Caller::of(&r);
        let req = r.into_inner();
        let what = format!(
            "module_type={} instance={:?} action={:?} target_instances={}",
            type_name(req.module_type),
            req.instance_id,
            req.scaling_action,
            req.target_instances
        );
        let result = self.trigger_scaling(req).await;
        self.audited(&caller, "TriggerScaling", &what, result, |r| {
            success(r.success, &r.message)
        })
    }
}
