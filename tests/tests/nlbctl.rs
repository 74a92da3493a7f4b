//! The real `nlbctl` against the real `nlb` (and, for the token and TLS,
//! against small in-test gRPC servers): every command's table and `--json`
//! output, and the exit codes scripts rely on.
//!
//! Modules are registered through the gRPC API with a one-hour heartbeat
//! interval, so no lease lapses while a test runs; active health checks are
//! off unless a test asks the NLB to call its modules.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::nlbctl::{nlbctl, nlbctl_at, spawn_nlbctl, CtlRun};
use e2e::{free_addr, NlbProcess, Sandbox};
use serde_json::Value;
use shared_types::pb::{
    self,
    module_service_server::{ModuleService, ModuleServiceServer},
    nlb_service_client::NlbServiceClient,
    nlb_service_server::{NlbService, NlbServiceServer},
    HealthStatus, ModuleType, Protocol,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Channel, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

type Client = NlbServiceClient<Channel>;

/// How long `--watch` may take to print a line (the interval is 1 s).
const LINE_DEADLINE: Duration = Duration::from_secs(30);

const BASE_CONFIG: &str = r#"
health:
  active_checks: false
backends:
  pg: ["127.0.0.1:5432"]
routes:
  - route_id: pg-file
    protocol: postgres
    destination_port: 5432
    metadata: {backend: pg}
"#;

async fn start(sb: &Sandbox) -> NlbProcess {
    sb.write_config(BASE_CONFIG);
    sb.start().await
}

/// A distinct data address per instance id (nothing listens there: the
/// control API never connects to data addresses).
fn data_addr(id: &str) -> String {
    let h = id
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    format!("127.0.0.1:{}", 20000 + h % 20000)
}

fn route(id: &str, protocol: Protocol, port: i32) -> pb::Route {
    pb::Route {
        route_id: id.into(),
        protocol: protocol as i32,
        destination_port: port,
        ..Default::default()
    }
}

/// Registers a HEALTHY instance whose ModuleService is at `address`.
async fn register(
    client: &mut Client,
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
            // No lease lapses while the test runs.
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

/// A fake module: its `HealthCheck` answers HEALTHY and its `Scale` succeeds.
#[derive(Clone, Default)]
struct FakeModule;

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

/// Serves a fake module on a loopback port; returns its address.
async fn serve_module() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    tokio::spawn(
        Server::builder()
            .add_service(ModuleServiceServer::new(FakeModule))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

fn ids(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v[key].as_str().unwrap_or_default().to_string())
        .collect()
}

fn keys(obj: &Value) -> Vec<String> {
    obj.as_object()
        .unwrap_or_else(|| panic!("not an object: {obj}"))
        .keys()
        .cloned()
        .collect()
}

/// The first column of a table's rows (the header left out).
fn first_column(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// The value of a `key: value` line.
fn value_of(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{text}"))
        .trim()
        .to_string()
}

#[tokio::test]
async fn modules_list_and_show() {
    let sb = Sandbox::new();
    let nlb = start(&sb).await;
    let mut c = nlb.client().await;
    let web = || vec![route("web", Protocol::Http, 8080)];
    register(
        &mut c,
        "dblb-1",
        ModuleType::Dblb,
        "v1",
        "127.0.0.1:1",
        vec![],
    )
    .await;
    register(&mut c, "alb-2", ModuleType::Alb, "v2", "127.0.0.1:1", web()).await;
    register(&mut c, "alb-1", ModuleType::Alb, "v1", "127.0.0.1:1", web()).await;
    let at = nlb.grpc_addr.as_str();

    // The table: one row per instance, by id.
    let run = nlbctl_at(at, &["modules", "list"]).await;
    run.expect_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("ID "), "{}", run.stdout);
    assert_eq!(first_column(&run.stdout), ["alb-1", "alb-2", "dblb-1"]);
    let alb2: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        alb2,
        [
            "alb-2",
            "alb",
            "v2",
            "healthy",
            "127.0.0.1:1",
            &data_addr("alb-2"),
            "0",
            "100",
            "-"
        ]
    );

    // The same as JSON.
    let j = nlbctl_at(at, &["modules", "list", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(
        ids(&j["modules"], "instance_id"),
        ["alb-1", "alb-2", "dblb-1"]
    );
    assert_eq!(j["total_modules"], 3);
    assert_eq!(j["modules"][2]["module_type"], "dblb");
    assert_eq!(j["modules"][0]["health_status"], "healthy");
    assert_eq!(j["modules"][1]["version"], "v2");
    assert_eq!(
        j["modules"][0]["metadata"]["data_address"],
        data_addr("alb-1")
    );

    // --type and --status are the request's type and status filters.
    let j = nlbctl_at(at, &["modules", "list", "--type", "alb", "--json"])
        .await
        .json();
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-1", "alb-2"]);
    let j = nlbctl_at(at, &["modules", "list", "--status", "healthy", "--json"])
        .await
        .json();
    assert_eq!(j["total_modules"], 3);
    let run = nlbctl_at(at, &["modules", "list", "--status", "stopping"]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "only the header: {}",
        run.stdout
    );

    // --filter, --sort and pagination are the request's Query.
    let j = nlbctl_at(at, &["modules", "list", "--filter", "version=v2", "--json"])
        .await
        .json();
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-2"]);
    let j = nlbctl_at(
        at,
        &[
            "modules",
            "list",
            "--filter",
            "instance_id:in:alb-1,dblb-1",
            "--sort",
            "instance_id",
            "--desc",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(ids(&j["modules"], "instance_id"), ["dblb-1", "alb-1"]);
    let j = nlbctl_at(
        at,
        &[
            "modules",
            "list",
            "--page-size",
            "1",
            "--page",
            "2",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-2"]);
    assert_eq!(
        j["pagination"],
        serde_json::json!({"page": 2, "page_size": 1, "total_items": 3, "total_pages": 3})
    );
    let run = nlbctl_at(at, &["modules", "list", "--page-size", "1", "--page", "2"]).await;
    assert_eq!(first_column(&run.stdout), ["alb-2"]);
    assert!(
        run.stderr.contains("page 2 of 3") && run.stderr.contains("--page 3"),
        "{}",
        run.stderr
    );

    // A field the NLB does not know: invalid input, with the NLB's message.
    let run = nlbctl_at(at, &["modules", "list", "--filter", "colour=red"]).await;
    run.expect_code(6);
    assert!(
        run.stderr
            .starts_with("nlbctl: modules list: INVALID_ARGUMENT: ")
            && run.stderr.contains("\"colour\""),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    // A filter without an operator, or an unknown type: usage errors.
    nlbctl_at(at, &["modules", "list", "--filter", "colour"])
        .await
        .expect_code(2);
    nlbctl_at(at, &["modules", "list", "--type", "nginx"])
        .await
        .expect_code(2);

    // One instance.
    let run = nlbctl_at(at, &["modules", "show", "alb-1"]).await;
    run.expect_code(0);
    let out = &run.stdout;
    assert_eq!(value_of(out, "instance"), "alb-1");
    assert_eq!(value_of(out, "type"), "alb");
    assert_eq!(value_of(out, "connections"), "0 of 100");
    assert_eq!(value_of(out, "takes_traffic"), "true");
    assert_eq!(value_of(out, "data_address"), data_addr("alb-1"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains("http") && l.contains("8080")),
        "{out}"
    );
    let j = nlbctl_at(at, &["modules", "show", "alb-1", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(j["instance"]["instance_id"], "alb-1");
    assert_eq!(j["instance"]["module_type"], "alb");
    assert_eq!(ids(&j["routes"], "route_id"), ["web"]);
    assert_eq!(j["routes"][0]["protocol"], "http");
    assert_eq!(j["details"]["state"], "healthy");
    assert_eq!(j["deployment_config"]["blue_version"], "v1");

    // An unknown instance: exit 5, the server's message, nothing on stdout.
    let run = nlbctl_at(at, &["modules", "show", "alb-9"]).await;
    run.expect_code(5);
    assert_eq!(
        run.stderr,
        "nlbctl: modules show alb-9: NOT_FOUND: no instance alb-9 is registered\n"
    );
    assert!(run.stdout.is_empty());
}

#[tokio::test]
async fn routes_show_apply_and_dry_run() {
    let sb = Sandbox::new();
    let nlb = start(&sb).await;
    let mut c = nlb.client().await;
    register(
        &mut c,
        "alb-1",
        ModuleType::Alb,
        "v1",
        "127.0.0.1:1",
        vec![],
    )
    .await;
    register(
        &mut c,
        "alb-2",
        ModuleType::Alb,
        "v1",
        "127.0.0.1:1",
        vec![],
    )
    .await;
    let at = nlb.grpc_addr.as_str();
    let file = |name: &str, text: &str| {
        let p = sb.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let table_ids = |j: &Value| -> Vec<String> {
        j["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["route"]["route_id"].as_str().unwrap().to_string())
            .collect()
    };
    let routes = file(
        "routes.yaml",
        r#"
- route_id: web
  protocol: http
  destination_port: 8080
  destination_pattern: "*.example.com"
  priority: 10
  metadata: {module_type: alb}
- route_id: api
  protocol: https
  destination_pattern: api.example.com
  priority: 20
  metadata: {module_type: alb}
"#,
    );

    // Validate only: the NLB checks, nothing changes.
    let run = nlbctl_at(at, &["routes", "apply", "--validate-only", &routes]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        "2 routes are valid; 3 operator routes in force\n"
    );
    let j = nlbctl_at(at, &["routes", "show", "--json"]).await.json();
    assert_eq!(table_ids(&j), ["pg-file"]);
    // --dry-run is the same flag.
    nlbctl_at(at, &["routes", "apply", "--dry-run", &routes])
        .await
        .expect_code(0);

    let run = nlbctl_at(at, &["routes", "apply", &routes]).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "2 routes applied; 3 operator routes in force\n");

    // One entry per (route, serving instance), in precedence order.
    let j = nlbctl_at(at, &["routes", "show", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(table_ids(&j), ["api", "api", "web", "web", "pg-file"]);
    assert_eq!(j["total_entries"], 5);
    let servers: BTreeSet<&str> = j["entries"].as_array().unwrap()[..2]
        .iter()
        .map(|e| e["target_instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(servers, BTreeSet::from(["alb-1", "alb-2"]));
    assert_eq!(
        j["entries"][2]["route"]["destination_pattern"],
        "*.example.com"
    );
    assert_eq!(j["entries"][2]["route"]["priority"], 10);
    assert_eq!(j["entries"][2]["target_module_type"], "alb");
    assert_eq!(j["entries"][4]["target_instance_id"], "pg/127.0.0.1:5432");
    let run = nlbctl_at(at, &["routes", "show"]).await;
    run.expect_code(0);
    assert_eq!(
        first_column(&run.stdout),
        ["api", "api", "web", "web", "pg-file"]
    );
    let web_row: Vec<&str> = run
        .stdout
        .lines()
        .nth(3)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &web_row[..9],
        [
            "web",
            "http",
            "8080",
            "-",
            "*.example.com",
            "10",
            "type:alb",
            "alb-1",
            "alb"
        ]
    );
    // Filters.
    let j = nlbctl_at(
        at,
        &[
            "routes",
            "show",
            "--destination",
            "shop.example.com",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(table_ids(&j), ["web", "web"]);
    let j = nlbctl_at(at, &["routes", "show", "--protocol", "postgres", "--json"])
        .await
        .json();
    assert_eq!(table_ids(&j), ["pg-file"]);
    let j = nlbctl_at(
        at,
        &[
            "routes",
            "show",
            "--filter",
            "target_instance_id=alb-2",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(table_ids(&j), ["api", "web"]);

    // Dry runs: where a connection would go.
    let run = nlbctl_at(
        at,
        &[
            "routes",
            "dry-run",
            "--protocol",
            "http",
            "--port",
            "8080",
            "--host",
            "shop.example.com",
            "--client",
            "10.0.0.7",
        ],
    )
    .await;
    run.expect_code(0);
    assert!(run.stdout.starts_with("routed to alb-"), "{}", run.stdout);
    assert!(
        run.stdout.contains("route priority 10") && run.stdout.contains("\"web\""),
        "{}",
        run.stdout
    );
    let j = nlbctl_at(
        at,
        &[
            "routes",
            "dry-run",
            "--protocol",
            "https",
            "--sni",
            "api.example.com",
            "--json",
        ],
    )
    .await
    .expect_code(0)
    .json();
    assert_eq!(j["routed"], true);
    assert_eq!(j["target_module_type"], "alb");
    assert_eq!(j["priority"], 20);
    assert!(
        ["alb-1", "alb-2"].contains(&j["target_instance_id"].as_str().unwrap()),
        "{j}"
    );
    let j = nlbctl_at(
        at,
        &[
            "routes",
            "dry-run",
            "--protocol",
            "postgres",
            "--port",
            "5432",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(j["target_instance_id"], "pg/127.0.0.1:5432");
    assert_eq!(j["target_address"], "127.0.0.1:5432");
    // Nothing matches: a negative answer, exit 7, said on stdout.
    let run = nlbctl_at(
        at,
        &[
            "routes",
            "dry-run",
            "--protocol",
            "http",
            "--port",
            "9090",
            "--host",
            "shop.example.com",
        ],
    )
    .await;
    run.expect_code(7);
    assert!(
        run.stdout.starts_with("not routed: NOT_FOUND: "),
        "{}",
        run.stdout
    );
    let j = nlbctl_at(at, &["routes", "dry-run", "--protocol", "redis", "--json"])
        .await
        .expect_code(7)
        .json();
    assert_eq!(j["routed"], false);
    assert_eq!(j["error"]["code"], "not_found");
    // A pattern is not a name a client sends: invalid input.
    let run = nlbctl_at(
        at,
        &[
            "routes",
            "dry-run",
            "--protocol",
            "http",
            "--host",
            "*.example.com",
        ],
    )
    .await;
    run.expect_code(6);
    assert!(
        run.stderr.contains("routes dry-run: INVALID_ARGUMENT"),
        "{}",
        run.stderr
    );
    // Dry runs count nothing.
    let j = nlbctl_at(at, &["status", "--json"]).await.json();
    assert_eq!(j["total_requests"], 0);

    // Bad files are refused before any call, naming the file, entry and field.
    let bad = file(
        "bad.yaml",
        "- route_id: x\n  protocol: htp\n  metadata: {module_type: alb}\n",
    );
    let run = nlbctl_at(at, &["routes", "apply", &bad]).await;
    run.expect_code(6);
    assert!(
        run.stderr.starts_with(&format!(
            "nlbctl: {bad}: routes[0].protocol: unknown protocol \"htp\""
        )),
        "{}",
        run.stderr
    );
    let typo = file("typo.yaml", "- route_id: x\n  protocl: http\n");
    let run = nlbctl_at(at, &["routes", "apply", &typo]).await;
    run.expect_code(6);
    assert!(
        run.stderr
            .contains(&format!("{typo}: routes[0]: unknown field `protocl`")),
        "{}",
        run.stderr
    );
    let broken = file("broken.yaml", "routes: [\n");
    let run = nlbctl_at(at, &["routes", "apply", &broken]).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains(&format!("{broken}: not valid YAML")),
        "{}",
        run.stderr
    );
    let missing = sb.path().join("missing.yaml").display().to_string();
    let run = nlbctl_at(at, &["routes", "apply", &missing]).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains(&format!("{missing}: cannot read it")),
        "{}",
        run.stderr
    );

    // What only the NLB can check (its pools) comes back as validation errors.
    let nopool = file(
        "nopool.yaml",
        "- {route_id: db, protocol: postgres, metadata: {backend: nope}}\n",
    );
    let run = nlbctl_at(at, &["routes", "apply", "--validate-only", &nopool]).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains("no backend pool named \"nope\""),
        "{}",
        run.stderr
    );
    let j = nlbctl_at(
        at,
        &["routes", "apply", "--validate-only", "--json", &nopool],
    )
    .await
    .expect_code(6)
    .json();
    assert_eq!(j["success"], false);
    assert_eq!(j["validation_errors"].as_array().unwrap().len(), 1);
    let run = nlbctl_at(at, &["routes", "apply", &nopool]).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains("INVALID_ARGUMENT") && run.stderr.contains("\"nope\""),
        "{}",
        run.stderr
    );

    // --replace-all: the file's routes become every operator route.
    let only = file("only.yaml", "routes:\n  - {route_id: only, protocol: tcp, destination_port: 7000, metadata: {module_type: dblb}}\n");
    let run = nlbctl_at(at, &["routes", "apply", "--replace-all", &only]).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "1 routes applied; 1 operator routes in force\n");
    let j = nlbctl_at(at, &["routes", "show", "--json"]).await.json();
    assert_eq!(table_ids(&j), ["only"]);
    assert_eq!(
        j["entries"][0]["target_instance_id"], "",
        "no dblb instance serves it"
    );
}

#[tokio::test]
async fn status_health_and_config() {
    let sb = Sandbox::new();
    let nlb = start(&sb).await;
    let mut c = nlb.client().await;
    let module = serve_module().await;
    register(&mut c, "alb-1", ModuleType::Alb, "v1", &module, vec![]).await;
    // Nothing listens at this one's ModuleService address.
    register(
        &mut c,
        "dblb-1",
        ModuleType::Dblb,
        "v1",
        &free_addr(),
        vec![],
    )
    .await;
    let at = nlb.grpc_addr.as_str();

    let run = nlbctl_at(at, &["status"]).await;
    run.expect_code(0);
    assert_eq!(value_of(&run.stdout, "status"), "healthy");
    assert_eq!(value_of(&run.stdout, "modules"), "2 (alb 1, dblb 1)");
    assert_eq!(value_of(&run.stdout, "grpc_address"), nlb.grpc_addr);
    let j = nlbctl_at(at, &["status", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(j["status"], "healthy");
    assert_eq!(j["registered_modules"], 2);
    assert_eq!(
        j["modules_by_type"],
        serde_json::json!({"alb": 1, "dblb": 1})
    );
    assert_eq!(j["modules"], serde_json::json!([]));
    assert_eq!(j["details"]["admin_address"], nlb.admin_addr);
    let j = nlbctl_at(at, &["status", "--modules", "--json"])
        .await
        .json();
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-1", "dblb-1"]);
    let run = nlbctl_at(at, &["status", "--modules"]).await;
    assert!(
        run.stdout.lines().any(|l| l.starts_with("dblb-1 ")),
        "{}",
        run.stdout
    );

    // The NLB's own view: healthy.
    let run = nlbctl_at(at, &["health"]).await;
    run.expect_code(0);
    assert_eq!(value_of(&run.stdout, "status"), "healthy");
    let j = nlbctl_at(at, &["health", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(
        j["module_health"],
        serde_json::json!({"alb-1": "healthy", "dblb-1": "healthy"})
    );
    assert!(keys(&j["checks"]).contains(&"registry".to_string()), "{j}");
    // Asking the modules: dblb-1 does not answer, so the NLB is degraded: exit 7.
    let run = nlbctl_at(at, &["health", "--modules"]).await;
    run.expect_code(7);
    assert_eq!(value_of(&run.stdout, "status"), "degraded");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["dblb-1", "unhealthy"]),
        "{}",
        run.stdout
    );
    let j = nlbctl_at(at, &["health", "--deep", "--json"])
        .await
        .expect_code(7)
        .json();
    assert_eq!(j["status"], "degraded");
    assert_eq!(
        j["module_health"],
        serde_json::json!({"alb-1": "healthy", "dblb-1": "unhealthy"})
    );
    assert!(
        j["checks"]["module.dblb-1"]
            .as_str()
            .unwrap()
            .starts_with("unreachable"),
        "{j}"
    );

    // One section, as YAML under a comment line.
    let run = nlbctl_at(at, &["config", "show", "routing"]).await;
    run.expect_code(0);
    assert!(
        run.stdout.starts_with("# routing (source: file, updated "),
        "{}",
        run.stdout
    );
    let routing: serde_yaml_ng::Value = serde_yaml_ng::from_str(&run.stdout).expect("YAML");
    assert_eq!(routing["sticky"].as_bool(), Some(false));
    // Every section: a valid config file.
    let run = nlbctl_at(at, &["config", "show"]).await;
    let all: serde_yaml_ng::Mapping = serde_yaml_ng::from_str(&run.stdout).expect("a YAML mapping");
    assert_eq!(all.len(), 10, "{}", run.stdout);
    assert_eq!(all["backends"]["pg"][0].as_str(), Some("127.0.0.1:5432"));
    let j = nlbctl_at(at, &["config", "show", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(
        ids(&j["configs"], "config_type"),
        [
            "grpc",
            "admin",
            "state_file",
            "registry",
            "health",
            "routing",
            "backends",
            "routes",
            "traffic_weights",
            "metrics"
        ]
    );
    assert_eq!(j["configs"][6]["data"]["pg"][0], "127.0.0.1:5432");

    let section = |name: &str, text: &str| {
        let p = sb.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let good = section("routing.yaml", "sticky: true\nvalidate_timeout_ms: 700\n");
    let run = nlbctl_at(at, &["config", "validate", "routing", &good]).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "section routing is valid\n");
    let j = nlbctl_at(at, &["config", "show", "routing", "--json"])
        .await
        .json();
    assert_eq!(
        j["configs"][0]["data"]["sticky"], false,
        "validate changes nothing"
    );
    // apply sends the data's SHA-256: the NLB refuses a mismatch, so success
    // shows it matched.
    let run = nlbctl_at(at, &["config", "apply", "routing", &good]).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "section routing applied\n");
    let j = nlbctl_at(at, &["config", "show", "routing", "--json"])
        .await
        .json();
    assert_eq!(j["configs"][0]["data"]["sticky"], true);
    assert_eq!(j["configs"][0]["data"]["validate_timeout_ms"], 700);
    assert_eq!(j["configs"][0]["metadata"]["source"], "api");
    let j = nlbctl_at(at, &["config", "apply", "routing", &good, "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(j["message"], "section routing unchanged");

    let bad = section("bad-routing.yaml", "sticky: 7\n");
    let run = nlbctl_at(at, &["config", "validate", "routing", &bad]).await;
    run.expect_code(6);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: config validate routing {bad}: routing: "))
            && run.stderr.contains("boolean"),
        "{}",
        run.stderr
    );
    let j = nlbctl_at(at, &["config", "validate", "routing", &bad, "--json"])
        .await
        .expect_code(6)
        .json();
    assert_eq!(j["validation_passed"], false);
    let run = nlbctl_at(at, &["config", "apply", "routing", &bad]).await;
    run.expect_code(6);
    assert!(run.stderr.contains("INVALID_ARGUMENT"), "{}", run.stderr);
    let broken = section("broken.yaml", "sticky: [\n");
    let run = nlbctl_at(at, &["config", "apply", "routing", &broken]).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains(&format!("{broken}: not valid YAML")),
        "{}",
        run.stderr
    );
    nlbctl_at(at, &["config", "show", "nosuch"])
        .await
        .expect_code(6);
    nlbctl_at(at, &["config", "apply", "nosuch", &good])
        .await
        .expect_code(6);
}

#[tokio::test]
async fn metrics_load_rebalance_and_scale() {
    let sb = Sandbox::new();
    let nlb = start(&sb).await;
    let mut c = nlb.client().await;
    let module = serve_module().await;
    let reg = register(&mut c, "alb-1", ModuleType::Alb, "v1", &module, vec![]).await;
    register(&mut c, "alb-2", ModuleType::Alb, "v1", &module, vec![]).await;
    register(
        &mut c,
        "dblb-1",
        ModuleType::Dblb,
        "v1",
        &free_addr(),
        vec![],
    )
    .await;
    let hb = c
        .heartbeat(pb::HeartbeatRequest {
            instance_id: "alb-1".into(),
            registration_id: reg,
            status: HealthStatus::Healthy as i32,
            current_stats: Some(pb::ModuleStats {
                cpu_usage_percent: 40.0,
                memory_usage_mb: 128.0,
                custom_stats: [("requests_per_second".to_string(), "12".to_string())].into(),
                ..Default::default()
            }),
            timestamp: None,
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(hb.acknowledged, "{hb:?}");
    let at = nlb.grpc_addr.as_str();

    // The heartbeat's stats, as GetModuleInfo shows them.
    let run = nlbctl_at(at, &["modules", "show", "alb-1"]).await;
    assert_eq!(value_of(&run.stdout, "cpu"), "40%");
    assert_eq!(value_of(&run.stdout, "memory"), "128 MB");
    assert_eq!(value_of(&run.stdout, "custom"), "requests_per_second=12");
    let j = nlbctl_at(at, &["modules", "show", "alb-1", "--json"])
        .await
        .json();
    assert_eq!(j["stats"]["cpu_usage_percent"], 40.0);
    assert_eq!(j["stats"]["custom_stats"]["requests_per_second"], "12");

    // Every series: the NLB's own and alb-1's from its heartbeat.
    let j = nlbctl_at(at, &["metrics", "--json"])
        .await
        .expect_code(0)
        .json();
    let names: BTreeSet<String> = ids(&j["metrics"], "name").into_iter().collect();
    assert!(
        names.contains("nlb_registered_instances") && names.contains("nlb_uptime_seconds"),
        "{names:?}"
    );
    assert_eq!(keys(&j["module_metrics"]), ["alb-1"]);
    let cpu: Vec<&Value> = j["module_metrics"]["alb-1"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "cpu_usage_percent")
        .collect();
    assert_eq!(cpu.len(), 1, "{j}");
    assert_eq!(cpu[0]["value"], 40.0);
    assert_eq!(cpu[0]["labels"]["source"], "heartbeat");
    let run = nlbctl_at(at, &["metrics"]).await;
    run.expect_code(0);
    let row = |owner: &str, name: &str| -> Vec<String> {
        run.stdout
            .lines()
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .find(|cols| cols[0] == owner && cols[1] == name)
            .unwrap_or_else(|| panic!("no {owner} {name} row in:\n{}", run.stdout))
    };
    assert_eq!(row("nlb", "nlb_registered_instances")[4], "3");
    assert_eq!(
        &row("alb-1", "cpu_usage_percent")[2..5],
        ["source=heartbeat", "1", "40"]
    );
    assert_eq!(
        first_column(&run.stdout)[0],
        "nlb",
        "the NLB's series first"
    );
    let j = nlbctl_at(
        at,
        &["metrics", "--name", "nlb_routes", "--since", "1h", "--json"],
    )
    .await
    .expect_code(0)
    .json();
    assert!(
        ids(&j["metrics"], "name").iter().all(|n| n == "nlb_routes"),
        "{j}"
    );
    let j = nlbctl_at(
        at,
        &["metrics", "--name", "nlb_routes", "--aggregate", "--json"],
    )
    .await
    .json();
    let aggs: BTreeSet<&str> = j["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["labels"]["agg"].as_str().unwrap())
        .collect();
    assert_eq!(aggs, BTreeSet::from(["avg", "count", "max", "min", "sum"]));
    // One instance.
    let j = nlbctl_at(at, &["metrics", "--module", "alb-1", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(j["metrics"]["instance_id"], "alb-1");
    assert_eq!(j["metrics"]["module_type"], "alb");
    assert!(
        ids(&j["metrics"]["metrics"], "name").contains(&"memory_usage_mb".to_string()),
        "{j}"
    );
    let run = nlbctl_at(
        at,
        &["metrics", "--module", "alb-1", "--name", "memory_usage_mb"],
    )
    .await;
    assert_eq!(first_column(&run.stdout), ["alb-1"]);
    nlbctl_at(at, &["metrics", "--module", "nope"])
        .await
        .expect_code(5);

    // Load per instance.
    let j = nlbctl_at(at, &["load", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(keys(&j["distribution"]), ["alb-1", "alb-2", "dblb-1"]);
    assert_eq!(j["distribution"]["alb-1"]["cpu_usage_percent"], 40.0);
    assert_eq!(j["distribution"]["alb-1"]["requests_per_second"], 12);
    assert_eq!(j["balance_score"], 1.0, "idle instances are even");
    let j = nlbctl_at(at, &["load", "--type", "dblb", "--json"])
        .await
        .json();
    assert_eq!(keys(&j["distribution"]), ["dblb-1"]);
    let run = nlbctl_at(at, &["load"]).await;
    run.expect_code(0);
    assert_eq!(
        &first_column(&run.stdout)[..3],
        ["alb-1", "alb-2", "dblb-1"]
    );
    assert!(run.stdout.contains("balance score: 1 "), "{}", run.stdout);

    // Rebalance: all, one type, an unknown type.
    let j = nlbctl_at(
        at,
        &["rebalance", "--strategy", "even", "--force", "--json"],
    )
    .await
    .expect_code(0)
    .json();
    assert_eq!(j["success"], true);
    assert_eq!(
        keys(&j["previous_distribution"]),
        ["alb-1", "alb-2", "dblb-1"]
    );
    assert!(j["message"].as_str().unwrap().contains("(even)"), "{j}");
    let j = nlbctl_at(at, &["rebalance", "--type", "alb", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(keys(&j["previous_distribution"]), ["alb-1", "alb-2"]);
    let run = nlbctl_at(at, &["rebalance", "--instance", "dblb-1"]).await;
    run.expect_code(0);
    assert_eq!(
        first_column(&run.stdout),
        ["INSTANCE", "dblb-1"],
        "message line, then the table"
    );
    let run = nlbctl_at(at, &["rebalance", "--type", "rtmp"]).await;
    run.expect_code(5);
    assert_eq!(
        run.stderr,
        "nlbctl: rebalance: NOT_FOUND: no rtmp instance is registered\n"
    );
    nlbctl_at(at, &["rebalance", "--instance", "nope"])
        .await
        .expect_code(6);
    nlbctl_at(at, &["rebalance", "--strategy", "random"])
        .await
        .expect_code(2);

    // Scale: the NLB asks alb-1 (the first alb by id), a fake that agrees.
    let j = nlbctl_at(at, &["scale", "alb", "--to", "3", "--json"])
        .await
        .expect_code(0)
        .json();
    assert_eq!(j["success"], true);
    assert_eq!(j["scaling_action"], "scale_to");
    assert_eq!(j["target_instances"], 3);
    assert_eq!(j["current_instances"], 2);
    let run = nlbctl_at(at, &["scale", "alb", "--up"]).await;
    run.expect_code(0);
    assert_eq!(value_of(&run.stdout, "action"), "scale_up");
    assert_eq!(value_of(&run.stdout, "target"), "3");
    let j = nlbctl_at(
        at,
        &["scale", "alb", "--down", "--instance", "alb-2", "--json"],
    )
    .await
    .expect_code(0)
    .json();
    assert_eq!(j["target_instances"], 1);
    // No rtmp instance to carry it out: FAILED_PRECONDITION, exit 1.
    let run = nlbctl_at(at, &["scale", "rtmp", "--up"]).await;
    run.expect_code(1);
    assert!(
        run.stderr
            .starts_with("nlbctl: scale rtmp: FAILED_PRECONDITION: "),
        "{}",
        run.stderr
    );
    // dblb-1's ModuleService does not answer: UNAVAILABLE, exit 3.
    let run = nlbctl_at(at, &["scale", "dblb", "--up"]).await;
    run.expect_code(3);
    assert!(
        run.stderr.starts_with("nlbctl: scale dblb: UNAVAILABLE"),
        "{}",
        run.stderr
    );
    nlbctl_at(at, &["scale", "alb"]).await.expect_code(2);
    nlbctl_at(at, &["scale", "alb", "--instance", "nope", "--up"])
        .await
        .expect_code(5);
}

fn parse_update(line: &str) -> Value {
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"))
}

#[tokio::test]
async fn metrics_watch_prints_updates_until_ctrl_c() {
    let sb = Sandbox::new();
    let nlb = start(&sb).await;
    let at = nlb.grpc_addr.as_str();

    let mut watch = spawn_nlbctl(
        &[
            "--addr",
            at,
            "metrics",
            "--watch",
            "--interval",
            "1",
            "--json",
        ],
        &[],
    );
    let first = parse_update(
        &watch
            .next_line(LINE_DEADLINE)
            .await
            .expect("a first update"),
    );
    let second = parse_update(
        &watch
            .next_line(LINE_DEADLINE)
            .await
            .expect("a second update"),
    );
    for u in [&first, &second] {
        let names = ids(&u["metrics"], "name");
        assert!(names.contains(&"nlb_uptime_seconds".to_string()), "{u}");
        assert_eq!(u["module_metrics"], serde_json::json!({}));
    }
    assert!(
        second["timestamp"].as_str() > first["timestamp"].as_str(),
        "{first} then {second}"
    );
    watch.signal("INT");
    let status = watch.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "Ctrl-C ends a watch cleanly: {status}"
    );

    // The table form: a block per update.
    let mut watch = spawn_nlbctl(
        &[
            "--addr",
            at,
            "metrics",
            "--watch",
            "--interval",
            "1",
            "--name",
            "nlb_routes",
        ],
        &[],
    );
    let mut headers = 0;
    while headers < 2 {
        let line = watch.next_line(LINE_DEADLINE).await.expect("more updates");
        if line.starts_with("== ") {
            headers += 1;
        } else if !line.is_empty() && !line.starts_with("NAME") {
            assert_eq!(
                line.split_whitespace().collect::<Vec<_>>(),
                ["nlb_routes", "1"]
            );
        }
    }
    watch.signal("INT");
    assert_eq!(watch.wait_exit().await.code(), Some(0));
}

#[tokio::test]
async fn metrics_watch_ends_when_the_nlb_stops() {
    let sb = Sandbox::new();
    let mut nlb = start(&sb).await;
    let mut watch = spawn_nlbctl(
        &[
            "--addr",
            &nlb.grpc_addr,
            "metrics",
            "--watch",
            "--interval",
            "1",
            "--json",
        ],
        &[],
    );
    watch
        .next_line(LINE_DEADLINE)
        .await
        .expect("a first update");
    nlb.signal("TERM");
    // The NLB ends the stream as it shuts down: the watch prints what is
    // left and exits 0.
    while watch.next_line(LINE_DEADLINE).await.is_some() {}
    assert_eq!(watch.wait_exit().await.code(), Some(0));
    nlb.wait_exit().await;
}

#[tokio::test]
async fn exit_codes_without_an_nlb() {
    let nowhere = free_addr();
    let run = nlbctl_at(&nowhere, &["status"]).await;
    run.expect_code(3);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: cannot reach the NLB at {nowhere}: ")),
        "{}",
        run.stderr
    );
    nlbctl_at(&nowhere, &["modules", "list", "--json"])
        .await
        .expect_code(3);
    nlbctl_at(&nowhere, &["metrics", "--watch"])
        .await
        .expect_code(3);
    // Files are checked before connecting.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("routes.yaml");
    std::fs::write(&bad, "- {route_id: x, protocol: tcp}\n").unwrap();
    let run = nlbctl_at(&nowhere, &["routes", "apply", bad.to_str().unwrap()]).await;
    run.expect_code(6);
    assert!(run.stderr.contains("routes[0].metadata"), "{}", run.stderr);

    // Usage errors: exit 2.
    for args in [
        &[][..],
        &["bogus"],
        &["modules"],
        &["modules", "show"],
        &["scale", "alb"],
        &["scale", "alb", "--up", "--to", "2"],
        &["routes", "dry-run", "--port", "80"],
        &["metrics", "--interval", "2"],
        &["--addr", "not an address", "status"],
        &["--addr", "https://127.0.0.1:1", "status"],
        &["--cert", "c.pem", "--key", "k.pem", "status"],
        &["--ca-cert", "/nonexistent/ca.pem", "status"],
        &["--token-file", "/nonexistent/token", "status"],
        &["--token", "a", "--token-file", "b", "status"],
        &["--timeout", "-1", "status"],
    ] {
        let run = nlbctl(args, &[]).await;
        assert_eq!(run.code, Some(2), "nlbctl {args:?}: {}", run.stderr);
        assert!(!run.stderr.is_empty(), "nlbctl {args:?} says why");
    }
    let run = nlbctl(&["--addr", "https://127.0.0.1:1", "status"], &[]).await;
    assert!(run.stderr.contains("--ca-cert"), "{}", run.stderr);
    let run = nlbctl(
        &["status"],
        &[("NLBCTL_TOKEN", "a"), ("NLBCTL_TOKEN_FILE", "b")],
    )
    .await;
    run.expect_code(2);
    // Help and version are not errors.
    let run = nlbctl(&["--help"], &[]).await;
    run.expect_code(0);
    assert!(run.stdout.contains("Usage: nlbctl"), "{}", run.stdout);
    nlbctl(&["routes", "apply", "--help"], &[])
        .await
        .expect_code(0);
    let run = nlbctl(&["--version"], &[]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        format!("nlbctl {}\n", env!("CARGO_PKG_VERSION"))
    );
    let run = nlbctl(&["status"], &[("NLBCTL_TIMEOUT", "soon")]).await;
    run.expect_code(2);
    assert!(
        run.stderr.contains("\"soon\" is not a number of seconds"),
        "{}",
        run.stderr
    );
    // NLBCTL_ADDR is the default address.
    let run = nlbctl(&["status"], &[("NLBCTL_ADDR", &nowhere)]).await;
    run.expect_code(3);
    assert!(run.stderr.contains(&nowhere), "{}", run.stderr);
}

/// Calls seen by the recorder: (RPC, `authorization` header).
type Seen = Vec<(String, Option<String>)>;

/// Records the `authorization` header of every call; answers
/// UNAUTHENTICATED without one and PERMISSION_DENIED to `Bearer denied`.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
}

impl Recorder {
    fn check<T>(&self, call: &str, r: &Request<T>) -> Result<(), Status> {
        let auth = r
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().expect("ASCII").to_string());
        self.seen
            .lock()
            .unwrap()
            .push((call.to_string(), auth.clone()));
        match auth.as_deref() {
            None => Err(Status::unauthenticated("a bearer token is required")),
            Some("Bearer denied") => {
                Err(Status::permission_denied("viewer tokens may not do that"))
            }
            Some(_) => Ok(()),
        }
    }

    fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

#[tonic::async_trait]
impl NlbService for Recorder {
    async fn get_nlb_status(
        &self,
        r: Request<pb::GetNlbStatusRequest>,
    ) -> Result<Response<pb::GetNlbStatusResponse>, Status> {
        self.check("GetNLBStatus", &r)?;
        Ok(Response::new(pb::GetNlbStatusResponse {
            status: HealthStatus::Healthy as i32,
            version: "recorder".into(),
            ..Default::default()
        }))
    }

    async fn list_modules(
        &self,
        r: Request<pb::ListModulesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        self.check("ListModules", &r)?;
        Ok(Response::new(pb::ListModulesResponse::default()))
    }

    async fn stream_nlb_metrics(
        &self,
        r: Request<pb::StreamNlbMetricsRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::StreamNlbMetricsResponse>>, Status> {
        self.check("StreamNLBMetrics", &r)?;
        // One update, then the server ends the stream.
        let update = pb::StreamNlbMetricsResponse {
            timestamp: Some(shared_types::time::now()),
            ..Default::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(update)]))))
    }
}

/// Serves the recorder on a loopback port, with TLS if given.
async fn serve_recorder(tls: Option<ServerTlsConfig>) -> (Recorder, String) {
    let recorder = Recorder::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).expect("server TLS config");
    }
    tokio::spawn(
        builder
            .add_service(NlbServiceServer::new(recorder.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (recorder, addr)
}

fn assert_secret_kept(run: &CtlRun, secret: &str) {
    assert!(
        !run.stdout.contains(secret) && !run.stderr.contains(secret),
        "the token was printed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
}

#[tokio::test]
async fn the_token_goes_on_every_call_and_is_never_printed() {
    let (recorder, at) = serve_recorder(None).await;
    let secret = "s3cret-operator-token";
    let bearer = Some(format!("Bearer {secret}"));

    let run = nlbctl(&["--addr", &at, "--token", secret, "status"], &[]).await;
    run.expect_code(0);
    assert_secret_kept(&run, secret);
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), bearer.clone())]
    );

    let run = nlbctl(
        &["--addr", &at, "modules", "list"],
        &[("NLBCTL_TOKEN", secret)],
    )
    .await;
    run.expect_code(0);
    assert_secret_kept(&run, secret);
    assert_eq!(
        recorder.take(),
        [("ListModules".to_string(), bearer.clone())]
    );

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let token_path = token_file.to_str().unwrap();
    let run = nlbctl(
        &[
            "--addr",
            &at,
            "--token-file",
            token_path,
            "status",
            "--json",
        ],
        &[],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.json()["version"], "recorder");
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), bearer.clone())]
    );

    // Streams carry it too; a stream the server ends is a clean exit.
    let run = nlbctl(
        &["--addr", &at, "metrics", "--watch", "--json"],
        &[("NLBCTL_TOKEN_FILE", token_path)],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("the NLB ended the stream"),
        "{}",
        run.stderr
    );
    assert_eq!(
        recorder.take(),
        [("StreamNLBMetrics".to_string(), bearer.clone())]
    );

    // A flag beats the environment.
    nlbctl(
        &["--addr", &at, "--token", "other", "status"],
        &[("NLBCTL_TOKEN", secret)],
    )
    .await
    .expect_code(0);
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), Some("Bearer other".to_string()))]
    );

    // No token, or one without the right: exit 4 with the server's message.
    let run = nlbctl(&["--addr", &at, "status"], &[]).await;
    run.expect_code(4);
    assert_eq!(
        run.stderr,
        "nlbctl: status: UNAUTHENTICATED: a bearer token is required\n"
    );
    assert_eq!(recorder.take(), [("GetNLBStatus".to_string(), None)]);
    let run = nlbctl(
        &["--addr", &at, "--token", "denied", "modules", "list"],
        &[],
    )
    .await;
    run.expect_code(4);
    assert!(
        run.stderr
            .starts_with("nlbctl: modules list: PERMISSION_DENIED: "),
        "{}",
        run.stderr
    );
    assert_eq!(
        recorder.take(),
        [("ListModules".to_string(), Some("Bearer denied".to_string()))]
    );

    // Never printed: not by --help, not in a refusal.
    let run = nlbctl(&["--help"], &[("NLBCTL_TOKEN", secret)]).await;
    run.expect_code(0);
    assert_secret_kept(&run, secret);
    let bad = format!("{secret}\u{7f}");
    let run = nlbctl(&["--addr", &at, "status"], &[("NLBCTL_TOKEN", &bad)]).await;
    run.expect_code(2);
    assert_secret_kept(&run, secret);
    assert!(
        recorder.take().is_empty(),
        "a bad token is refused before any call"
    );
}

/// A CA, a server certificate for `nlb.test` and a client certificate, PEM.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "nlbctl test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("nlb.test", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("operator", ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

#[tokio::test]
async fn tls_and_mutual_tls_on_the_client_side() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca = write("ca.pem", &pki.ca);
    let cert = write("client.pem", &pki.client_cert);
    let key = write("client.key", &pki.client_key);
    let other_ca = write("other-ca.pem", &make_pki().ca);

    // Server TLS only.
    let (recorder, at) = serve_recorder(Some(
        ServerTlsConfig::new().identity(Identity::from_pem(&pki.server_cert, &pki.server_key)),
    ))
    .await;
    let run = nlbctl(
        &[
            "--addr",
            &at,
            "--ca-cert",
            &ca,
            "--tls-server-name",
            "nlb.test",
            "--token",
            "t",
            "status",
        ],
        &[],
    )
    .await;
    run.expect_code(0);
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), Some("Bearer t".to_string()))]
    );
    let https = format!("https://{at}");
    let env = [
        ("NLBCTL_CA_CERT", ca.as_str()),
        ("NLBCTL_TLS_SERVER_NAME", "nlb.test"),
        ("NLBCTL_TOKEN", "t"),
    ];
    nlbctl(&["--addr", &https, "status"], &env)
        .await
        .expect_code(0);
    // The certificate names nlb.test, not 127.0.0.1; another CA signed nothing here.
    let run = nlbctl(&["--addr", &at, "--ca-cert", &ca, "status"], &[]).await;
    run.expect_code(3);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: cannot reach the NLB at {at}: ")),
        "{}",
        run.stderr
    );
    nlbctl(
        &[
            "--addr",
            &at,
            "--ca-cert",
            &other_ca,
            "--tls-server-name",
            "nlb.test",
            "status",
        ],
        &[],
    )
    .await
    .expect_code(3);

    // Mutual TLS: the server requires a client certificate signed by the CA.
    let (recorder, at) = serve_recorder(Some(
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&pki.server_cert, &pki.server_key))
            .client_ca_root(Certificate::from_pem(&pki.ca)),
    ))
    .await;
    let mtls = [
        "--addr",
        &at,
        "--ca-cert",
        &ca,
        "--tls-server-name",
        "nlb.test",
        "--token",
        "t",
    ];
    let run = nlbctl(
        &[
            &mtls[..],
            &["--cert", &cert, "--key", &key, "modules", "list", "--json"],
        ]
        .concat(),
        &[],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.json()["total_modules"], 0);
    assert_eq!(
        recorder.take(),
        [("ListModules".to_string(), Some("Bearer t".to_string()))]
    );
    let env = [("NLBCTL_CERT", cert.as_str()), ("NLBCTL_KEY", key.as_str())];
    nlbctl(&[&mtls[..], &["status"]].concat(), &env)
        .await
        .expect_code(0);
    assert_eq!(recorder.take().len(), 1);
    // Without a client certificate the server refuses the connection.
    // Without a client certificate the server refuses the connection (with
    // TLS 1.3 after the handshake, so the first call fails): exit 3, with a
    // hint.
    let run = nlbctl(&[&mtls[..], &["status"]].concat(), &[]).await;
    run.expect_code(3);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: cannot reach the NLB at {at}: "))
            && run.stderr.contains("give --cert and --key"),
        "{}",
        run.stderr
    );
    assert!(
        recorder.take().is_empty(),
        "no call got through without a client certificate"
    );
}
