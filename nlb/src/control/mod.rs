//! The control API: `NLBService` over the registry, config and metrics store,
//! and the clients the NLB uses to drive modules' `ModuleService`.

mod load;
pub mod module_client;
mod modules;
pub mod query;
mod routes;
mod status;
mod telemetry;

use std::sync::Arc;

use shared_types::pb::{self, nlb_service_server::NlbService};
use tonic::{Request, Response, Status};

pub use status::sha256_hex;

use crate::app::Nlb;
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

#[tonic::async_trait]
impl NlbService for ControlService {
    async fn register_module(
        &self,
        r: Request<pb::RegisterModuleRequest>,
    ) -> Reply<pb::RegisterModuleResponse> {
        self.register_module(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn unregister_module(
        &self,
        r: Request<pb::UnregisterModuleRequest>,
    ) -> Reply<pb::UnregisterModuleResponse> {
        self.unregister_module(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatResponse> {
        self.heartbeat(r.into_inner()).await.map(Response::new)
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
        self.update_routing(r.into_inner()).await.map(Response::new)
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
        self.route_request(r.into_inner()).await.map(Response::new)
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
        self.report_metrics(r.into_inner()).await.map(Response::new)
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
        self.update_nlb_config(r.into_inner())
            .await
            .map(Response::new)
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
        self.rebalance_load(r.into_inner()).await.map(Response::new)
    }
    async fn get_load_distribution(
        &self,
        r: Request<pb::GetLoadDistributionRequest>,
    ) -> Reply<pb::GetLoadDistributionResponse> {
        self.get_load_distribution(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn trigger_scaling(
        &self,
        r: Request<pb::TriggerScalingRequest>,
    ) -> Reply<pb::TriggerScalingResponse> {
        self.trigger_scaling(r.into_inner())
            .await
            .map(Response::new)
    }
}
