//! In-process harness for the control API tests: a real NLB on loopback
//! (gRPC and admin ports on 127.0.0.1:0, its own state file in a temp dir), a
//! tonic client to it, builders for the contract's messages, and a fake module:
//! a real `ModuleService` gRPC server whose `CanHandle`, `HealthCheck` and
//! `Scale` answers each test sets, and which counts the calls it gets.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nlb::routing::ConnectionGuard;
use nlb::{Nlb, Running};
use parking_lot::Mutex;
use serde_yaml_ng::{Mapping, Value};
use shared_types::pb::{
    self, module_service_server::ModuleService, module_service_server::ModuleServiceServer,
    nlb_service_client::NlbServiceClient, HealthStatus, ModuleType, Protocol,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// A generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The NLB under test
// ---------------------------------------------------------------------------

/// A running NLB with a connected client. Dropping it leaves the NLB's tasks
/// to the test's runtime, which ends with the test.
pub struct TestNlb {
    pub running: Option<Running>,
    pub nlb: Arc<Nlb>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub client: NlbServiceClient<Channel>,
    pub state_file: PathBuf,
    pub config_file: PathBuf,
    /// Keeps the temp dir (config and state file) alive.
    pub dir: tempfile::TempDir,
}

/// Merges `extra` (YAML sections) over `base`: a section given as a mapping
/// in both is merged key by key, anything else replaces.
fn merge_sections(base: &mut Mapping, extra: Mapping) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(Value::Mapping(b)), Value::Mapping(e)) => {
                for (ek, ev) in e {
                    b.insert(ek, ev);
                }
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl TestNlb {
    /// An NLB with the harness defaults (loopback ports, its own state file,
    /// active health checks off).
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// An NLB with `extra` YAML sections merged over the harness defaults.
    pub async fn start_with(extra: &str) -> Self {
        Self::start_with_env(extra, &[]).await
    }

    /// Like [`TestNlb::start_with`], with environment variables as the NLB
    /// would read them (the process environment is not touched).
    pub async fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Self {
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let state_file = dir.path().join("state.json");
        let config_file = dir.path().join("nlb.yaml");
        let mut base: Mapping = serde_yaml_ng::from_str(&format!(
            "grpc: {{listen: \"127.0.0.1:0\"}}\n\
             admin: {{listen: \"127.0.0.1:0\"}}\n\
             state_file: {:?}\n\
             health: {{active_checks: false}}\n",
            state_file.display().to_string()
        ))
        .expect("base config");
        if !extra.trim().is_empty() {
            let extra: Mapping = serde_yaml_ng::from_str(extra).expect("test config is YAML");
            merge_sections(&mut base, extra);
        }
        std::fs::write(
            &config_file,
            serde_yaml_ng::to_string(&base).expect("config serializes"),
        )
        .expect("write config");
        let store = nlb::config::ConfigStore::load(
            Some(config_file.clone()),
            Box::new(move |k| env.get(k).cloned()),
        )
        .unwrap_or_else(|e| panic!("test config refused: {e:?}"));
        let running = nlb::start(Nlb::new(store)).await.expect("NLB starts");
        let client = connect(running.grpc_addr).await;
        TestNlb {
            nlb: Arc::clone(&running.nlb),
            grpc_addr: running.grpc_addr,
            admin_addr: running.admin_addr,
            running: Some(running),
            client,
            state_file,
            config_file,
            dir,
        }
    }

    /// A fresh client on its own connection.
    pub async fn new_client(&self) -> NlbServiceClient<Channel> {
        connect(self.grpc_addr).await
    }

    /// Registers, expecting success.
    pub async fn register(&self, req: pb::RegisterModuleRequest) -> pb::RegisterModuleResponse {
        let id = req
            .instance
            .as_ref()
            .map(|i| i.instance_id.clone())
            .unwrap_or_default();
        let resp = self
            .client
            .clone()
            .register_module(req)
            .await
            .unwrap_or_else(|s| panic!("register {id}: {s:?}"))
            .into_inner();
        assert!(resp.success, "register {id}: {resp:?}");
        resp
    }

    /// Registers a simple instance: `version`, a data address, announcing
    /// `routes`. Returns the registration id.
    pub async fn register_simple(
        &self,
        id: &str,
        module_type: ModuleType,
        version: &str,
        routes: Vec<pb::Route>,
    ) -> String {
        let inst = instance(id, module_type, "127.0.0.1:1", Some(&data_addr_for(id)));
        let inst = pb::ModuleInstance {
            version: version.into(),
            ..inst
        };
        self.register(register_req(inst, routes))
            .await
            .registration_id
    }

    /// Opens `n` connections on an instance's (or backend address's) live
    /// counters, as the data plane would; dropping the guards closes them.
    /// The endpoint must serve some route so the snapshot holds it.
    pub fn hold(&self, endpoint_id: &str, n: usize) -> Vec<ConnectionGuard> {
        let snapshot = self.nlb.registry.router().load();
        let endpoint = snapshot
            .routes()
            .flat_map(|r| r.servers.iter())
            .find(|e| e.id == endpoint_id)
            .unwrap_or_else(|| panic!("{endpoint_id} serves no route in the snapshot"))
            .clone();
        (0..n)
            .map(|_| endpoint.counters.open_connection(0))
            .collect()
    }

    pub async fn module_info(&self, id: &str) -> Result<pb::GetModuleInfoResponse, Status> {
        self.client
            .clone()
            .get_module_info(pb::GetModuleInfoRequest {
                instance_id: id.into(),
            })
            .await
            .map(Response::into_inner)
    }

    /// `RouteRequest` for a connection described by protocol, port and name.
    pub async fn route(
        &self,
        protocol: Protocol,
        port: i32,
        name: &str,
        dry_run: bool,
    ) -> pb::RouteRequestResponse {
        self.client
            .clone()
            .route_request(pb::RouteRequestRequest {
                route: Some(pb::Route {
                    protocol: protocol as i32,
                    destination_port: port,
                    destination_pattern: name.into(),
                    ..Default::default()
                }),
                context: Default::default(),
                dry_run,
            })
            .await
            .expect("RouteRequest answers")
            .into_inner()
    }

    pub async fn status(&self) -> pb::GetNlbStatusResponse {
        self.client
            .clone()
            .get_nlb_status(pb::GetNlbStatusRequest {
                include_modules: true,
            })
            .await
            .expect("GetNLBStatus answers")
            .into_inner()
    }

    pub async fn heartbeat(&self, id: &str, registration_id: &str) -> pb::HeartbeatResponse {
        self.client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                instance_id: id.into(),
                registration_id: registration_id.into(),
                status: HealthStatus::Healthy as i32,
                current_stats: None,
                timestamp: Some(shared_types::time::now()),
            })
            .await
            .expect("Heartbeat answers")
            .into_inner()
    }

    pub async fn list(
        &self,
        req: pb::ListModulesRequest,
    ) -> Result<pb::ListModulesResponse, Status> {
        self.client
            .clone()
            .list_modules(req)
            .await
            .map(Response::into_inner)
    }

    pub async fn shutdown(self) {
        self.shutdown_with(Duration::from_secs(5)).await;
    }

    /// Shuts down, letting calls in flight finish until `grace`.
    pub async fn shutdown_with(mut self, grace: Duration) {
        if let Some(r) = self.running.take() {
            r.shutdown(grace).await;
        }
    }
}

/// A client to `addr`, connecting with retries for a few seconds.
pub async fn connect(addr: SocketAddr) -> NlbServiceClient<Channel> {
    NlbServiceClient::new(channel(addr).await)
}

/// `msg` as a request carrying `header: value` (a token).
pub fn with_header<T>(msg: T, header: &'static str, value: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(header, value.parse().expect("ASCII header value"));
    req
}

/// `msg` with `authorization: Bearer <token>`.
pub fn bearer<T>(msg: T, token: &str) -> Request<T> {
    with_header(msg, "authorization", &format!("Bearer {token}"))
}

/// The admin port's `/metrics` text.
pub async fn scrape(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.body
}

/// The value of one sample line of Prometheus text (`name{labels}`), or 0.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// A channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5));
    let mut last = None;
    for _ in 0..50 {
        match endpoint.connect().await {
            Ok(ch) => return ch,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot connect to {addr}: {last:?}");
}

/// Polls `check` every 100 ms until it holds, or panics naming `what` after
/// `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not true within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts an error status with `code` whose message contains every fragment.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    fragments: &[&str],
) -> Status {
    let status = match result {
        Ok(v) => panic!("expected {code:?}, got a success: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        code,
        "wrong code; message: {}",
        status.message()
    );
    for f in fragments {
        assert!(
            status.message().contains(f),
            "message {:?} does not contain {f:?}",
            status.message()
        );
    }
    status
}

// ---------------------------------------------------------------------------
// Message builders
// ---------------------------------------------------------------------------

/// A distinct, unused data address per instance id (nothing listens there;
/// the control API never connects to data addresses).
pub fn data_addr_for(id: &str) -> String {
    let h = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    format!("127.0.0.1:{}", 20000 + h % 20000)
}

/// A HEALTHY `ModuleInstance` of version `v1`, with `data_address` in its
/// metadata when given.
pub fn instance(
    id: &str,
    module_type: ModuleType,
    address: &str,
    data_address: Option<&str>,
) -> pb::ModuleInstance {
    let mut metadata = std::collections::HashMap::new();
    if let Some(d) = data_address {
        metadata.insert("data_address".to_string(), d.to_string());
    }
    pb::ModuleInstance {
        instance_id: id.into(),
        module_type: module_type as i32,
        address: address.into(),
        health_status: HealthStatus::Healthy as i32,
        metadata,
        started_at: None,
        current_connections: 0,
        max_connections: 0,
        version: "v1".into(),
        traffic_weight: 0,
    }
}

pub fn register_req(inst: pb::ModuleInstance, routes: Vec<pb::Route>) -> pb::RegisterModuleRequest {
    pb::RegisterModuleRequest {
        instance: Some(inst),
        initial_routes: routes,
        health_config: None,
        capabilities: Default::default(),
    }
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

/// An operator route served by every instance of `module_type`.
pub fn type_route(id: &str, protocol: Protocol, port: i32, module_type: &str) -> pb::Route {
    let mut r = route(id, protocol, port);
    r.metadata
        .insert("module_type".to_string(), module_type.to_string());
    r
}

/// An operator route served by the static backend pool `pool`.
pub fn backend_route(id: &str, protocol: Protocol, port: i32, pool: &str) -> pb::Route {
    let mut r = route(id, protocol, port);
    r.metadata.insert("backend".to_string(), pool.to_string());
    r
}

pub fn filter(field: &str, operator: &str, value: &str) -> pb::Filter {
    pb::Filter {
        field: field.into(),
        operator: operator.into(),
        value: value.into(),
    }
}

pub fn query(filters: Vec<pb::Filter>, sort_by: &str, sort_desc: bool) -> pb::Query {
    pb::Query {
        filters,
        sort_by: sort_by.into(),
        sort_desc,
        pagination: None,
    }
}

pub fn paged(mut q: pb::Query, page: i32, page_size: i32) -> pb::Query {
    q.pagination = Some(pb::Pagination {
        page,
        page_size,
        total_items: 0,
        total_pages: 0,
    });
    q
}

pub fn point(name: &str, value: f64, at_ms: u64) -> pb::MetricDataPoint {
    pb::MetricDataPoint {
        name: name.into(),
        value,
        labels: Default::default(),
        timestamp: Some(shared_types::time::from_unix_millis(at_ms)),
    }
}

pub fn now_ms() -> u64 {
    shared_types::time::unix_millis(std::time::SystemTime::now())
}

/// An address on loopback where nothing listens.
pub fn closed_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr.to_string()
}

// ---------------------------------------------------------------------------
// Fixtures and calls shared by several test files
// ---------------------------------------------------------------------------

/// Four static backend pools (pool-d has two addresses), as YAML for
/// `TestNlb::start_with`.
pub const POOLS: &str = "backends:\n  pool-a: [\"127.0.0.1:9101\"]\n  pool-b: [\"127.0.0.1:9102\"]\n  pool-c: [\"127.0.0.1:9103\"]\n  pool-d: [\"127.0.0.1:9104\", \"127.0.0.1:9105\"]\n";

/// The instance ids of `modules`, in order.
pub fn ids(modules: &[pb::ModuleInstance]) -> Vec<&str> {
    modules.iter().map(|m| m.instance_id.as_str()).collect()
}

/// `UpdateRouting` with operator routes (no source instance).
pub async fn update_routing(
    t: &TestNlb,
    routes: Vec<pb::Route>,
    replace_all: bool,
    validate_only: bool,
) -> Result<pb::UpdateRoutingResponse, tonic::Status> {
    t.client
        .clone()
        .update_routing(pb::UpdateRoutingRequest {
            routes,
            replace_all,
            source_instance_id: String::new(),
            validate_only,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `ReportMetrics` for instance `id` (as an ALB) with `points`.
pub async fn report(
    t: &TestNlb,
    id: &str,
    points: Vec<pb::MetricDataPoint>,
) -> Result<pb::ReportMetricsResponse, tonic::Status> {
    t.client
        .clone()
        .report_metrics(pb::ReportMetricsRequest {
            instance_id: id.into(),
            metrics: Some(pb::ModuleMetrics {
                instance_id: id.into(),
                module_type: ModuleType::Alb as i32,
                metrics: points,
                collected_at: None,
            }),
            reported_at: Some(shared_types::time::now()),
        })
        .await
        .map(tonic::Response::into_inner)
}

// ---------------------------------------------------------------------------
// Fake module
// ---------------------------------------------------------------------------

/// How the fake answers `CanHandle`.
#[derive(Debug, Clone)]
pub struct CanHandleAnswer {
    pub can_handle: bool,
    pub priority: i32,
    pub reason: String,
    /// Sleep this long before answering.
    pub delay: Duration,
}

/// How the fake answers `Scale`.
#[derive(Debug, Clone)]
pub enum ScaleAnswer {
    /// success = true; `desired_instances` echoes `config.min_instances`.
    Accept { message: String },
    /// success = false with this message.
    Refuse(String),
}

/// The fake's configurable answers and what it was asked.
#[derive(Debug)]
pub struct FakeState {
    pub can_handle: Mutex<CanHandleAnswer>,
    pub health: Mutex<(HealthStatus, String)>,
    pub scale: Mutex<ScaleAnswer>,
    pub can_handle_calls: AtomicUsize,
    pub health_calls: AtomicUsize,
    pub scale_calls: AtomicUsize,
    pub last_can_handle: Mutex<Option<pb::CanHandleRequest>>,
    pub last_health: Mutex<Option<pb::HealthCheckRequest>>,
    pub last_scale: Mutex<Option<pb::ScaleRequest>>,
    /// Each call's method and `authorization` header, in order.
    pub authorizations: Mutex<Vec<(&'static str, Option<String>)>>,
}

impl FakeState {
    fn saw<T>(&self, method: &'static str, r: &Request<T>) {
        let auth = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.authorizations.lock().push((method, auth));
    }
}

impl Default for FakeState {
    fn default() -> Self {
        FakeState {
            can_handle: Mutex::new(CanHandleAnswer {
                can_handle: true,
                priority: 0,
                reason: String::new(),
                delay: Duration::ZERO,
            }),
            health: Mutex::new((HealthStatus::Healthy, "fake is fine".into())),
            scale: Mutex::new(ScaleAnswer::Accept {
                message: "fake scaling".into(),
            }),
            can_handle_calls: AtomicUsize::new(0),
            health_calls: AtomicUsize::new(0),
            scale_calls: AtomicUsize::new(0),
            last_can_handle: Mutex::new(None),
            last_health: Mutex::new(None),
            last_scale: Mutex::new(None),
            authorizations: Mutex::new(Vec::new()),
        }
    }
}

#[derive(Clone, Default)]
struct FakeService(Arc<FakeState>);

#[tonic::async_trait]
impl ModuleService for FakeService {
    async fn can_handle(
        &self,
        r: Request<pb::CanHandleRequest>,
    ) -> Result<Response<pb::CanHandleResponse>, Status> {
        self.0.can_handle_calls.fetch_add(1, Ordering::SeqCst);
        self.0.saw("CanHandle", &r);
        *self.0.last_can_handle.lock() = Some(r.into_inner());
        let a = self.0.can_handle.lock().clone();
        if !a.delay.is_zero() {
            tokio::time::sleep(a.delay).await;
        }
        Ok(Response::new(pb::CanHandleResponse {
            can_handle: a.can_handle,
            priority: a.priority,
            reason: a.reason,
            metadata: Default::default(),
        }))
    }

    async fn health_check(
        &self,
        r: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        self.0.health_calls.fetch_add(1, Ordering::SeqCst);
        self.0.saw("HealthCheck", &r);
        *self.0.last_health.lock() = Some(r.into_inner());
        let (status, message) = self.0.health.lock().clone();
        Ok(Response::new(pb::HealthCheckResponse {
            status: status as i32,
            message,
            checks: Default::default(),
            checked_at: Some(shared_types::time::now()),
        }))
    }

    async fn scale(
        &self,
        r: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::ScaleResponse>, Status> {
        self.0.scale_calls.fetch_add(1, Ordering::SeqCst);
        self.0.saw("Scale", &r);
        let req = r.into_inner();
        let desired = req.config.as_ref().map_or(0, |c| c.min_instances);
        *self.0.last_scale.lock() = Some(req);
        let answer = self.0.scale.lock().clone();
        Ok(Response::new(match answer {
            ScaleAnswer::Accept { message } => pb::ScaleResponse {
                success: true,
                message,
                current_instances: 0,
                desired_instances: desired,
                error: None,
            },
            ScaleAnswer::Refuse(message) => pb::ScaleResponse {
                success: false,
                message,
                current_instances: 0,
                desired_instances: 0,
                error: None,
            },
        }))
    }
}

/// A module that implements nothing: every RPC is the generated default stub
/// (UNIMPLEMENTED), like a third-party module that serves few RPCs.
#[derive(Clone, Default)]
struct StubService;

#[tonic::async_trait]
impl ModuleService for StubService {}

/// A fake module's gRPC server on loopback.
pub struct FakeModule {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn serve_module<S: ModuleService>(
    svc: S,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
    let addr = listener.local_addr().expect("fake addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ModuleServiceServer::new(svc))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    (addr, stop, task)
}

impl FakeModule {
    /// A fake that can handle every route, is healthy, and accepts Scale.
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let (addr, stop, task) = serve_module(FakeService(Arc::clone(&state))).await;
        FakeModule {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    /// A module serving only default stubs (every RPC UNIMPLEMENTED).
    pub async fn start_stub() -> Self {
        let state = Arc::new(FakeState::default());
        let (addr, stop, task) = serve_module(StubService).await;
        FakeModule {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    /// Its ModuleService address, as it registers it.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_can_handle(&self, can_handle: bool, reason: &str, delay: Duration) {
        *self.state.can_handle.lock() = CanHandleAnswer {
            can_handle,
            priority: 7,
            reason: reason.into(),
            delay,
        };
    }

    pub fn set_health(&self, status: HealthStatus, message: &str) {
        *self.state.health.lock() = (status, message.into());
    }

    pub fn set_scale(&self, answer: ScaleAnswer) {
        *self.state.scale.lock() = answer;
    }

    pub fn can_handle_calls(&self) -> usize {
        self.state.can_handle_calls.load(Ordering::SeqCst)
    }

    pub fn health_calls(&self) -> usize {
        self.state.health_calls.load(Ordering::SeqCst)
    }

    pub fn scale_calls(&self) -> usize {
        self.state.scale_calls.load(Ordering::SeqCst)
    }

    pub fn last_scale(&self) -> Option<pb::ScaleRequest> {
        self.state.last_scale.lock().clone()
    }

    pub fn last_health(&self) -> Option<pb::HealthCheckRequest> {
        self.state.last_health.lock().clone()
    }

    pub fn last_can_handle(&self) -> Option<pb::CanHandleRequest> {
        self.state.last_can_handle.lock().clone()
    }

    /// Stops serving (later calls to it fail).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(SOON, &mut self.task).await;
    }
}

impl Drop for FakeModule {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 to the admin port
// ---------------------------------------------------------------------------

/// A raw HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// `GET path` over a fresh TCP connection with `Connection: close`.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    let mut s = tokio::time::timeout(SOON, TcpStream::connect(addr))
        .await
        .expect("admin connect in time")
        .expect("admin connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut buf))
        .await
        .expect("admin answers in time")
        .expect("read response");
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}
