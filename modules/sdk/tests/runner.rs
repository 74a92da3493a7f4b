//! The SDK in process, through `Runner`: a module with a scaler against a
//! real NLB (in process too), and a module against an NLB that has no
//! `HeartbeatStream` (a MarchProxy-only NLB), which must fall back to unary
//! heartbeats.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use shared_types::pb::module_service_client::ModuleServiceClient;
use shared_types::pb::nlb_service_server::{NlbService, NlbServiceServer};
use shared_types::pb::{
    GetInstancesRequest, HeartbeatRequest, HeartbeatResponse, ModuleInstance, ModuleType, Protocol,
    RegisterModuleRequest, RegisterModuleResponse, ScaleRequest, ScalingConfig,
    TriggerScalingRequest,
};
use switchyard_sdk::config::{HeartbeatConfig, Listen, NlbLink};
use switchyard_sdk::{
    Connection, Descriptor, Module, ModuleError, Runner, Running, ScaleOutcome, Scaler, SdkConfig,
    StopReason,
};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const SOON: Duration = Duration::from_secs(20);

struct Quiet;

#[switchyard_sdk::async_trait]
impl Module for Quiet {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            module_type: ModuleType::Alb,
            name: "quiet",
            version: "1.0.0".into(),
            protocols: vec![Protocol::Http],
            capabilities: Default::default(),
        }
    }

    async fn serve(&self, _conn: Connection) {}
}

/// Records what it is asked.
#[derive(Default, Clone)]
struct RecordingScaler {
    configs: Arc<Mutex<Vec<(ScalingConfig, bool)>>>,
    desired: Arc<Mutex<Vec<i32>>>,
}

#[switchyard_sdk::async_trait]
impl Scaler for RecordingScaler {
    async fn scale(
        &self,
        config: &ScalingConfig,
        immediate: bool,
    ) -> Result<ScaleOutcome, ModuleError> {
        self.configs.lock().push((*config, immediate));
        Ok(ScaleOutcome {
            current_instances: 1,
            desired_instances: config.min_instances,
        })
    }

    async fn instances(&self) -> Vec<ModuleInstance> {
        vec![ModuleInstance {
            instance_id: "quiet-sibling".into(),
            module_type: ModuleType::Alb as i32,
            ..ModuleInstance::default()
        }]
    }

    async fn desired(&self, n: i32) {
        self.desired.lock().push(n);
    }
}

fn config(nlb_addr: &str, id: &str) -> SdkConfig {
    SdkConfig {
        nlb: NlbLink {
            addr: nlb_addr.into(),
            ..NlbLink::default()
        },
        listen: Listen {
            grpc: "127.0.0.1:0".into(),
            data: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
        },
        instance_id: id.into(),
        heartbeat: HeartbeatConfig {
            interval_seconds: 1,
            ..HeartbeatConfig::default()
        },
        ..SdkConfig::default()
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn module_client(r: &Running) -> ModuleServiceClient<Channel> {
    ModuleServiceClient::connect(format!("http://{}", r.grpc_addr))
        .await
        .expect("connect to ModuleService")
}

/// An in-process NLB on loopback with `env`.
async fn nlb(env: &[(&str, &str)]) -> (nlb::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nlb.yaml");
    std::fs::write(
        &file,
        format!(
            "grpc: {{listen: '127.0.0.1:0'}}\nadmin: {{listen: '127.0.0.1:0'}}\nstate_file: {:?}\nhealth: {{active_checks: false}}\n",
            dir.path().join("state.json").display().to_string()
        ),
    )
    .unwrap();
    let env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let store = nlb::config::ConfigStore::load(Some(file), Box::new(move |k| env.get(k).cloned()))
        .expect("config");
    let running = nlb::start(nlb::Nlb::new(store)).await.expect("NLB starts");
    (running, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_goes_to_the_scaler_and_the_nlb_target_reaches_it() {
    let (nlb, _dir) = nlb(&[("NLB_MODULE_CALL_TOKEN", "nlb-calls-modules-0001")]).await;
    let scaler = RecordingScaler::default();
    let running = Runner::new(Quiet, config(&nlb.grpc_addr.to_string(), "quiet-1"))
        .scaler(scaler.clone())
        .env(|k| (k == "MODULE_NLB_TOKEN").then(|| "nlb-calls-modules-0001".to_string()))
        .start()
        .await
        .unwrap();
    let shared = running.shared.clone();
    // A scaler the module's main gives is announced as `custom`.
    assert_eq!(shared.capabilities()["scaler"], "custom");
    until("registered", || shared.link.lock().registration_id.clone()).await;

    // The operator asks the NLB; the NLB asks the module (with its token);
    // the module asks its scaler.
    let mut c = shared_types::pb::nlb_service_client::NlbServiceClient::connect(format!(
        "http://{}",
        nlb.grpc_addr
    ))
    .await
    .unwrap();
    let r = c
        .trigger_scaling(TriggerScalingRequest {
            module_type: ModuleType::Alb as i32,
            scaling_action: "scale_to".into(),
            target_instances: 3,
            ..TriggerScalingRequest::default()
        })
        .await
        .expect("TriggerScaling")
        .into_inner();
    assert!(r.success, "{}", r.message);
    assert_eq!(r.target_instances, 3);
    assert!(r.message.contains("scaling from 1 to 3"), "{}", r.message);
    {
        let configs = scaler.configs.lock();
        assert_eq!(configs.len(), 1);
        assert_eq!(configs[0].0.min_instances, 3);
        assert!(configs[0].1, "immediate");
    }
    // The target rides on the heartbeats until met: the scaler hears it.
    let desired = until("the scaler heard should_scale", || {
        scaler.desired.lock().first().copied()
    })
    .await;
    assert_eq!(desired, 3);

    // GetInstances lists the scaler's other instances too.
    let mut m = module_client(&running).await;
    let ids: Vec<String> = m
        .get_instances(GetInstancesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(ids, ["quiet-1", "quiet-sibling"]);

    // A bad config never reaches the scaler.
    let mut req = Request::new(ScaleRequest {
        instance_id: String::new(),
        config: Some(ScalingConfig {
            min_instances: 5,
            max_instances: 2,
            ..ScalingConfig::default()
        }),
        immediate: false,
    });
    req.metadata_mut()
        .insert("x-api-key", "nlb-calls-modules-0001".parse().unwrap());
    let e = m.scale(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("above max_instances"),
        "{}",
        e.message()
    );
    assert_eq!(scaler.configs.lock().len(), 1);

    running.stop(StopReason::Shutdown {
        graceful: false,
        timeout: Duration::ZERO,
    });
    running
        .wait()
        .await
        .expect("the module stops by its shutdown sequence");
}

/// Asks the module's ModuleService to scale to two instances.
async fn scale_to_two(
    running: &Running,
) -> Result<tonic::Response<switchyard_sdk::pb::ScaleResponse>, Status> {
    module_client(running)
        .await
        .scale(ScaleRequest {
            instance_id: String::new(),
            config: Some(ScalingConfig {
                min_instances: 2,
                max_instances: 2,
                ..ScalingConfig::default()
            }),
            immediate: true,
        })
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_scaler_scale_says_how_to_configure_one() {
    // No NLB needed: the module answers ModuleService while it retries.
    let running = Runner::new(Quiet, config("127.0.0.1:1", "quiet-none"))
        .env(|_| None)
        .start()
        .await
        .unwrap();
    assert_eq!(running.shared.capabilities()["scaler"], "none");
    let e = scale_to_two(&running).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    for said in [
        "no scaler",
        "scaling.backend",
        "MODULE_SCALING_BACKEND",
        "docker",
        "kubernetes",
    ] {
        assert!(e.message().contains(said), "{said}: {}", e.message());
    }
    running.stop(StopReason::Shutdown {
        graceful: false,
        timeout: Duration::ZERO,
    });
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_configured_scaler_is_installed_and_announced() {
    let mut c = config("127.0.0.1:1", "quiet-docker");
    c.scaling.backend = "docker".into();
    c.scaling.docker.socket = "/nonexistent/docker.sock".into();
    let running = Runner::new(Quiet, c).env(|_| None).start().await.unwrap();
    assert_eq!(running.shared.capabilities()["scaler"], "docker");
    // Scale reaches it: the socket is not there, and the answer names it.
    let e = scale_to_two(&running).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().contains("/nonexistent/docker.sock"),
        "{}",
        e.message()
    );
    running.stop(StopReason::Shutdown {
        graceful: false,
        timeout: Duration::ZERO,
    });
    running.wait().await.unwrap();

    // Kubernetes outside a pod, with no API address: the module does not
    // start, and says which key to set.
    let mut c = config("127.0.0.1:1", "quiet-k8s");
    c.scaling.backend = "kubernetes".into();
    c.scaling.kubernetes.deployment = "quiet".into();
    c.scaling.kubernetes.namespace = "edge".into();
    let e = Runner::new(Quiet, c)
        .env(|_| None)
        .start()
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("scaling.kubernetes.api"), "{e}");
}

/// An NLB that knows only the reference RPCs: no `HeartbeatStream`.
#[derive(Default, Clone)]
struct ReferenceNlb {
    registrations: Arc<AtomicUsize>,
    beats: Arc<Mutex<Vec<HeartbeatRequest>>>,
}

#[tonic::async_trait]
impl NlbService for ReferenceNlb {
    async fn register_module(
        &self,
        _req: Request<RegisterModuleRequest>,
    ) -> Result<Response<RegisterModuleResponse>, Status> {
        self.registrations.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(RegisterModuleResponse {
            success: true,
            registration_id: "reg-1".into(),
            ..RegisterModuleResponse::default()
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.beats.lock().push(req.into_inner());
        Ok(Response::new(HeartbeatResponse {
            acknowledged: true,
            ..HeartbeatResponse::default()
        }))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_fall_back_to_unary_against_an_nlb_without_the_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = ReferenceNlb::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NlbServiceServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let running = Runner::new(Quiet, config(&addr.to_string(), "quiet-ref"))
        .env(|_| None)
        .start()
        .await
        .unwrap();
    until("two unary heartbeats", || {
        (fake.beats.lock().len() >= 2).then_some(())
    })
    .await;
    let beats = fake.beats.lock().clone();
    assert!(beats
        .iter()
        .all(|b| b.registration_id == "reg-1" && b.instance_id == "quiet-ref"));
    assert!(beats.iter().all(|b| b.current_stats.is_some()));
    assert_eq!(fake.registrations.load(Ordering::SeqCst), 1);
    assert_eq!(running.shared.link.lock().heartbeat_mode, "Heartbeat");
    running.stop(StopReason::Signal);
    running
        .wait()
        .await
        .expect("the module stops by its shutdown sequence");
}

/// Writes which data thread serves the connection, then closes it.
struct WhichThread;

#[switchyard_sdk::async_trait]
impl Module for WhichThread {
    fn descriptor(&self) -> Descriptor {
        Quiet.descriptor()
    }

    async fn serve(&self, mut conn: Connection) {
        use tokio::io::AsyncWriteExt;
        let worker = switchyard_sdk::data::worker();
        let name = std::thread::current().name().unwrap_or("").to_string();
        let line = format!("{worker:?} {name}\n");
        let _ = conn.stream.write_all(line.as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_served_on_the_configured_data_threads() {
    use tokio::io::AsyncReadExt;
    let mut cfg = config("127.0.0.1:1", "threads-1");
    cfg.data.threads = 3;
    let running = Runner::new(WhichThread, cfg).start().await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let mut s = tokio::net::TcpStream::connect(running.data_addr)
            .await
            .unwrap();
        let mut line = String::new();
        s.read_to_string(&mut line).await.unwrap();
        seen.insert(line.trim().to_string());
    }
    // Every connection ran on a data thread (never the control runtime),
    // and the worker index names the thread.
    assert!(!seen.is_empty());
    for line in &seen {
        let ok = (0..3).any(|i| line == &format!("Some({i}) data-{i}"));
        assert!(ok, "served off the data threads: {line:?}");
    }
    // Three data threads run (other tests in this process may run theirs
    // too, so at least one of each name).
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("data-"))
        .collect();
    for i in 0..3 {
        assert!(names.contains(&format!("data-{i}")), "{names:?}");
    }
    running.stop(StopReason::Signal);
    tokio::time::timeout(SOON, running.wait())
        .await
        .unwrap()
        .unwrap();
}

/// Writes whether Nagle is off on the connection's socket, then closes it.
struct Nodelay;

#[switchyard_sdk::async_trait]
impl Module for Nodelay {
    fn descriptor(&self) -> Descriptor {
        Quiet.descriptor()
    }

    async fn serve(&self, mut conn: Connection) {
        use tokio::io::AsyncWriteExt;
        let line = format!("{:?}\n", conn.stream.get_ref().nodelay());
        let _ = conn.stream.write_all(line.as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn data_connections_have_nagle_off_on_every_thread() {
    use tokio::io::AsyncReadExt;
    let mut cfg = config("127.0.0.1:1", "nodelay-1");
    cfg.data.threads = 2;
    let running = Runner::new(Nodelay, cfg).start().await.unwrap();
    // Opened at once, so that some are handed to the other thread.
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let addr = running.data_addr;
        connecting.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut line = String::new();
            s.read_to_string(&mut line).await.unwrap();
            line
        });
    }
    let lines = connecting.join_all().await;
    assert_eq!(lines.len(), 32);
    for line in lines {
        assert_eq!(line.trim(), "Ok(true)");
    }
    running.stop(StopReason::Signal);
    tokio::time::timeout(SOON, running.wait())
        .await
        .unwrap()
        .unwrap();
}

/// Writes which data thread serves the connection, then holds it until the
/// client closes.
struct Holds;

#[switchyard_sdk::async_trait]
impl Module for Holds {
    fn descriptor(&self) -> Descriptor {
        Quiet.descriptor()
    }

    async fn serve(&self, mut conn: Connection) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let line = format!("{:?}\n", switchyard_sdk::data::worker());
        let _ = conn.stream.write_all(line.as_bytes()).await;
        let mut rest = Vec::new();
        let _ = conn.stream.read_to_end(&mut rest).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_opened_at_once_are_spread_over_the_data_threads() {
    use tokio::io::AsyncReadExt;
    let mut cfg = config("127.0.0.1:1", "spread-1");
    cfg.data.threads = 2;
    let running = Runner::new(Holds, cfg).start().await.unwrap();
    // 64 connections opened at once and held, as a client pool opens
    // them: whichever thread is awake would take them all.
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..64 {
        connecting.spawn(tokio::net::TcpStream::connect(running.data_addr));
    }
    let mut held = Vec::new();
    while let Some(c) = connecting.join_next().await {
        held.push(c.unwrap().unwrap());
    }
    let mut per_thread = [0usize; 2];
    for s in &mut held {
        let mut line = [0u8; 8];
        tokio::time::timeout(SOON, s.read_exact(&mut line))
            .await
            .expect("each connection says its thread in time")
            .unwrap();
        match &line[..] {
            b"Some(0)\n" => per_thread[0] += 1,
            b"Some(1)\n" => per_thread[1] += 1,
            other => panic!("served off the data threads: {other:?}"),
        }
    }
    assert_eq!(per_thread[0] + per_thread[1], 64);
    // Within the spread's slack: 4 and an eighth of the lighter thread.
    assert!(
        per_thread.iter().all(|&n| n >= 26),
        "64 connections were served {per_thread:?} by the two data threads"
    );
    drop(held);
    running.stop(StopReason::Signal);
    tokio::time::timeout(SOON, running.wait())
        .await
        .unwrap()
        .unwrap();
}
