//! Driving the NLB's control API from tests: registering instances as a
//! module would, and a fake module (a real `ModuleService` gRPC server) for
//! the calls the NLB makes to modules.

use std::collections::HashMap;

use shared_types::pb::{
    self,
    module_service_server::{ModuleService, ModuleServiceServer},
    nlb_service_client::NlbServiceClient,
    HealthStatus, ModuleType, Protocol,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

/// A distinct data address per instance id (nothing listens there: the
/// control API never connects to data addresses).
pub fn data_addr(id: &str) -> String {
    let h = id
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    format!("127.0.0.1:{}", 20000 + h % 20000)
}

/// A route matching `protocol` on `port` (0 = any).
pub fn route(id: &str, protocol: Protocol, port: i32) -> pb::Route {
    pb::Route {
        route_id: id.into(),
        protocol: protocol as i32,
        destination_port: port,
        ..Default::default()
    }
}

/// Registers a HEALTHY instance (max 100 connections, data address
/// [`data_addr`]) whose ModuleService is at `address`, with a one-hour
/// heartbeat interval so its lease does not lapse while a test runs.
/// Returns the registration id.
pub async fn register_instance(
    client: &mut NlbServiceClient<Channel>,
    id: &str,
    module_type: ModuleType,
    version: &str,
    address: &str,
    routes: Vec<pb::Route>,
) -> String {
    let metadata: HashMap<String, String> = [("data_address".to_string(), data_addr(id))].into();
    let resp = client
        .register_module(pb::RegisterModuleRequest {
            instance: Some(pb::ModuleInstance {
                instance_id: id.into(),
                module_type: module_type as i32,
                address: address.into(),
                health_status: HealthStatus::Healthy as i32,
                metadata,
                version: version.into(),
                max_connections: 100,
                ..Default::default()
            }),
            initial_routes: routes,
            health_config: Some(pb::HealthCheckConfig {
                interval_seconds: 3600,
                ..Default::default()
            }),
            capabilities: Default::default(),
        })
        .await
        .unwrap_or_else(|s| panic!("register {id}: {s:?}"))
        .into_inner();
    assert!(resp.success, "register {id}: {resp:?}");
    resp.registration_id
}

/// A fake module: `HealthCheck` answers HEALTHY ("fine") and `Scale`
/// succeeds, desiring `config.min_instances`. Everything else is
/// UNIMPLEMENTED.
#[derive(Clone, Default)]
pub struct FakeModule;

#[tonic::async_trait]
impl ModuleService for FakeModule {
    async fn health_check(
        &self,
        _: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        Ok(Response::new(pb::HealthCheckResponse {
            status: HealthStatus::Healthy as i32,
            message: "fine".into(),
            ..Default::default()
        }))
    }

    async fn scale(
        &self,
        r: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::ScaleResponse>, Status> {
        let target = r.into_inner().config.unwrap_or_default().min_instances;
        Ok(Response::new(pb::ScaleResponse {
            success: true,
            message: format!("scaling to {target}"),
            current_instances: 0,
            desired_instances: target,
            error: None,
        }))
    }
}

/// Serves a [`FakeModule`] on a loopback port (on the test's runtime);
/// returns its address.
pub async fn serve_fake_module() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    tokio::spawn(
        Server::builder()
            .add_service(ModuleServiceServer::new(FakeModule))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}
