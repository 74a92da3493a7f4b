//! The real `nlbctl` against the real `nlb`: every command's table and
//! `--json` output (counts, ids, order) and exit codes. Client-side matters
//! that need no NLB (usage errors, the token, TLS) are in `nlbctl_client.rs`.
//!
//! Instances are registered through the gRPC API with a one-hour heartbeat
//! interval, so no lease lapses while a test runs; the NLB's active health
//! checks are off, so only `health --modules` calls the modules.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::control::{data_addr, register_instance as register, route, serve_fake_module};
use e2e::nlbctl::{ctl, ctl_json, first_column, ids, keys, spawn_ctl, value_of};
use e2e::{free_addr, NlbProcess, Sandbox};
use serde_json::Value;
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};

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
    let run = ctl(at, "modules list").await;
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
    let j = ctl_json(at, "modules list", 0).await;
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
    let j = ctl_json(at, "modules list --type alb", 0).await;
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-1", "alb-2"]);
    let j = ctl_json(at, "modules list --status healthy", 0).await;
    assert_eq!(j["total_modules"], 3);
    let run = ctl(at, "modules list --status stopping").await;
    run.expect_code(0);
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "only the header: {}",
        run.stdout
    );

    // --filter, --sort and pagination are the request's Query.
    let j = ctl_json(at, "modules list --filter version=v2", 0).await;
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-2"]);
    let j = ctl_json(
        at,
        "modules list --filter instance_id:in:alb-1,dblb-1 --sort instance_id --desc",
        0,
    )
    .await;
    assert_eq!(ids(&j["modules"], "instance_id"), ["dblb-1", "alb-1"]);
    let j = ctl_json(at, "modules list --page-size 1 --page 2", 0).await;
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-2"]);
    assert_eq!(
        j["pagination"],
        serde_json::json!({"page": 2, "page_size": 1, "total_items": 3, "total_pages": 3})
    );
    let run = ctl(at, "modules list --page-size 1 --page 2").await;
    assert_eq!(first_column(&run.stdout), ["alb-2"]);
    assert!(
        run.stderr.contains("page 2 of 3") && run.stderr.contains("--page 3"),
        "{}",
        run.stderr
    );

    // A field the NLB does not know: invalid input, with the NLB's message.
    let run = ctl(at, "modules list --filter colour=red").await;
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
    ctl(at, "modules list --filter colour").await.expect_code(2);
    ctl(at, "modules list --type nginx").await.expect_code(2);

    // One instance.
    let run = ctl(at, "modules show alb-1").await;
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
    let j = ctl_json(at, "modules show alb-1", 0).await;
    assert_eq!(j["instance"]["instance_id"], "alb-1");
    assert_eq!(j["instance"]["module_type"], "alb");
    assert_eq!(ids(&j["routes"], "route_id"), ["web"]);
    assert_eq!(j["routes"][0]["protocol"], "http");
    assert_eq!(j["details"]["state"], "healthy");
    assert_eq!(j["deployment_config"]["blue_version"], "v1");

    // An unknown instance: exit 5, the server's message, nothing on stdout.
    let run = ctl(at, "modules show alb-9").await;
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
    let run = ctl(at, &format!("routes apply --validate-only {routes}")).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        "2 routes are valid; 3 operator routes in force\n"
    );
    let j = ctl_json(at, "routes show", 0).await;
    assert_eq!(table_ids(&j), ["pg-file"]);
    // --dry-run is the same flag.
    ctl(at, &format!("routes apply --dry-run {routes}"))
        .await
        .expect_code(0);

    let run = ctl(at, &format!("routes apply {routes}")).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "2 routes applied; 3 operator routes in force\n");

    // One entry per (route, serving instance), in precedence order.
    let j = ctl_json(at, "routes show", 0).await;
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
    let run = ctl(at, "routes show").await;
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
    let j = ctl_json(at, "routes show --destination shop.example.com", 0).await;
    assert_eq!(table_ids(&j), ["web", "web"]);
    let j = ctl_json(at, "routes show --protocol postgres", 0).await;
    assert_eq!(table_ids(&j), ["pg-file"]);
    let j = ctl_json(at, "routes show --filter target_instance_id=alb-2", 0).await;
    assert_eq!(table_ids(&j), ["api", "web"]);

    // Dry runs: where a connection would go.
    let run = ctl(
        at,
        "routes dry-run --protocol http --port 8080 --host shop.example.com --client 10.0.0.7",
    )
    .await;
    run.expect_code(0);
    assert!(run.stdout.starts_with("routed to alb-"), "{}", run.stdout);
    assert!(
        run.stdout.contains("route priority 10") && run.stdout.contains("\"web\""),
        "{}",
        run.stdout
    );
    let j = ctl_json(
        at,
        "routes dry-run --protocol https --sni api.example.com",
        0,
    )
    .await;
    assert_eq!(j["routed"], true);
    assert_eq!(j["target_module_type"], "alb");
    assert_eq!(j["priority"], 20);
    assert!(
        ["alb-1", "alb-2"].contains(&j["target_instance_id"].as_str().unwrap()),
        "{j}"
    );
    let j = ctl_json(at, "routes dry-run --protocol postgres --port 5432", 0).await;
    assert_eq!(j["target_instance_id"], "pg/127.0.0.1:5432");
    assert_eq!(j["target_address"], "127.0.0.1:5432");
    // Nothing matches: a negative answer, exit 7, said on stdout.
    let run = ctl(
        at,
        "routes dry-run --protocol http --port 9090 --host shop.example.com",
    )
    .await;
    run.expect_code(7);
    assert!(
        run.stdout.starts_with("not routed: NOT_FOUND: "),
        "{}",
        run.stdout
    );
    let j = ctl_json(at, "routes dry-run --protocol redis", 7).await;
    assert_eq!(j["routed"], false);
    assert_eq!(j["error"]["code"], "not_found");
    // A pattern is not a name a client sends: invalid input.
    let run = ctl(at, "routes dry-run --protocol http --host *.example.com").await;
    run.expect_code(6);
    assert!(
        run.stderr.contains("routes dry-run: INVALID_ARGUMENT"),
        "{}",
        run.stderr
    );
    // Dry runs count nothing.
    let j = ctl_json(at, "status", 0).await;
    assert_eq!(j["total_requests"], 0);

    // Bad files are refused before any call, naming the file, entry and field.
    let bad = file(
        "bad.yaml",
        "- route_id: x\n  protocol: htp\n  metadata: {module_type: alb}\n",
    );
    let run = ctl(at, &format!("routes apply {bad}")).await;
    run.expect_code(6);
    assert!(
        run.stderr.starts_with(&format!(
            "nlbctl: {bad}: routes[0].protocol: unknown protocol \"htp\""
        )),
        "{}",
        run.stderr
    );
    let typo = file("typo.yaml", "- route_id: x\n  protocl: http\n");
    let run = ctl(at, &format!("routes apply {typo}")).await;
    run.expect_code(6);
    assert!(
        run.stderr
            .contains(&format!("{typo}: routes[0]: unknown field `protocl`")),
        "{}",
        run.stderr
    );
    let broken = file("broken.yaml", "routes: [\n");
    let run = ctl(at, &format!("routes apply {broken}")).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains(&format!("{broken}: not valid YAML")),
        "{}",
        run.stderr
    );
    let missing = sb.path().join("missing.yaml").display().to_string();
    let run = ctl(at, &format!("routes apply {missing}")).await;
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
    let run = ctl(at, &format!("routes apply --validate-only {nopool}")).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains("no backend pool named \"nope\""),
        "{}",
        run.stderr
    );
    let j = ctl(at, &format!("routes apply --validate-only --json {nopool}"))
        .await
        .expect_code(6)
        .json();
    assert_eq!(j["success"], false);
    assert_eq!(j["validation_errors"].as_array().unwrap().len(), 1);
    let run = ctl(at, &format!("routes apply {nopool}")).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains("INVALID_ARGUMENT") && run.stderr.contains("\"nope\""),
        "{}",
        run.stderr
    );

    // --replace-all: the file's routes become every operator route.
    let only = file("only.yaml", "routes:\n  - {route_id: only, protocol: tcp, destination_port: 7000, metadata: {module_type: dblb}}\n");
    let run = ctl(at, &format!("routes apply --replace-all {only}")).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "1 routes applied; 1 operator routes in force\n");
    let j = ctl_json(at, "routes show", 0).await;
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
    let module = serve_fake_module().await;
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

    let run = ctl(at, "status").await;
    run.expect_code(0);
    assert_eq!(value_of(&run.stdout, "status"), "healthy");
    assert_eq!(value_of(&run.stdout, "modules"), "2 (alb 1, dblb 1)");
    assert_eq!(value_of(&run.stdout, "grpc_address"), nlb.grpc_addr);
    let j = ctl_json(at, "status", 0).await;
    assert_eq!(j["status"], "healthy");
    assert_eq!(j["registered_modules"], 2);
    assert_eq!(
        j["modules_by_type"],
        serde_json::json!({"alb": 1, "dblb": 1})
    );
    assert_eq!(j["modules"], serde_json::json!([]));
    assert_eq!(j["details"]["admin_address"], nlb.admin_addr);
    let j = ctl_json(at, "status --modules", 0).await;
    assert_eq!(ids(&j["modules"], "instance_id"), ["alb-1", "dblb-1"]);
    let run = ctl(at, "status --modules").await;
    assert!(
        run.stdout.lines().any(|l| l.starts_with("dblb-1 ")),
        "{}",
        run.stdout
    );

    // The NLB's own view: healthy.
    let run = ctl(at, "health").await;
    run.expect_code(0);
    assert_eq!(value_of(&run.stdout, "status"), "healthy");
    let j = ctl_json(at, "health", 0).await;
    assert_eq!(
        j["module_health"],
        serde_json::json!({"alb-1": "healthy", "dblb-1": "healthy"})
    );
    assert!(keys(&j["checks"]).contains(&"registry".to_string()), "{j}");
    // Asking the modules: dblb-1 does not answer, so the NLB is degraded: exit 7.
    let run = ctl(at, "health --modules").await;
    run.expect_code(7);
    assert_eq!(value_of(&run.stdout, "status"), "degraded");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["dblb-1", "unhealthy"]),
        "{}",
        run.stdout
    );
    let j = ctl_json(at, "health --deep", 7).await;
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
    let run = ctl(at, "config show routing").await;
    run.expect_code(0);
    assert!(
        run.stdout.starts_with("# routing (source: file, updated "),
        "{}",
        run.stdout
    );
    let routing: serde_yaml_ng::Value = serde_yaml_ng::from_str(&run.stdout).expect("YAML");
    assert_eq!(routing["sticky"].as_bool(), Some(false));
    // Every section: a valid config file.
    let run = ctl(at, "config show").await;
    let all: serde_yaml_ng::Mapping = serde_yaml_ng::from_str(&run.stdout).expect("a YAML mapping");
    assert_eq!(all.len(), 15, "{}", run.stdout);
    assert_eq!(all["backends"]["pg"][0].as_str(), Some("127.0.0.1:5432"));
    let j = ctl_json(at, "config show", 0).await;
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
            "metrics",
            "tls",
            "auth",
            "listeners",
            "dataplane",
            "autoscaling",
        ]
    );
    assert_eq!(j["configs"][6]["data"]["pg"][0], "127.0.0.1:5432");

    let section = |name: &str, text: &str| {
        let p = sb.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let good = section("routing.yaml", "sticky: true\nvalidate_timeout_ms: 700\n");
    let run = ctl(at, &format!("config validate routing {good}")).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "section routing is valid\n");
    let j = ctl_json(at, "config show routing", 0).await;
    assert_eq!(
        j["configs"][0]["data"]["sticky"], false,
        "validate changes nothing"
    );
    // apply sends the data's SHA-256: the NLB refuses a mismatch, so success
    // shows it matched.
    let run = ctl(at, &format!("config apply routing {good}")).await;
    run.expect_code(0);
    assert_eq!(run.stdout, "section routing applied\n");
    let j = ctl_json(at, "config show routing", 0).await;
    assert_eq!(j["configs"][0]["data"]["sticky"], true);
    assert_eq!(j["configs"][0]["data"]["validate_timeout_ms"], 700);
    assert_eq!(j["configs"][0]["metadata"]["source"], "api");
    let j = ctl_json(at, &format!("config apply routing {good}"), 0).await;
    assert_eq!(j["message"], "section routing unchanged");

    let bad = section("bad-routing.yaml", "sticky: 7\n");
    let run = ctl(at, &format!("config validate routing {bad}")).await;
    run.expect_code(6);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: config validate routing {bad}: routing: "))
            && run.stderr.contains("boolean"),
        "{}",
        run.stderr
    );
    let j = ctl_json(at, &format!("config validate routing {bad}"), 6).await;
    assert_eq!(j["validation_passed"], false);
    let run = ctl(at, &format!("config apply routing {bad}")).await;
    run.expect_code(6);
    assert!(run.stderr.contains("INVALID_ARGUMENT"), "{}", run.stderr);
    let broken = section("broken.yaml", "sticky: [\n");
    let run = ctl(at, &format!("config apply routing {broken}")).await;
    run.expect_code(6);
    assert!(
        run.stderr.contains(&format!("{broken}: not valid YAML")),
        "{}",
        run.stderr
    );
    ctl(at, "config show nosuch").await.expect_code(6);
    ctl(at, &format!("config apply nosuch {good}"))
        .await
        .expect_code(6);
}

#[tokio::test]
async fn metrics_load_rebalance_and_scale() {
    let sb = Sandbox::new();
    let nlb = start(&sb).await;
    let mut c = nlb.client().await;
    let module = serve_fake_module().await;
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
    let run = ctl(at, "modules show alb-1").await;
    assert_eq!(value_of(&run.stdout, "cpu"), "40%");
    assert_eq!(value_of(&run.stdout, "memory"), "128 MB");
    assert_eq!(value_of(&run.stdout, "custom"), "requests_per_second=12");
    let j = ctl_json(at, "modules show alb-1", 0).await;
    assert_eq!(j["stats"]["cpu_usage_percent"], 40.0);
    assert_eq!(j["stats"]["custom_stats"]["requests_per_second"], "12");

    // Every series: the NLB's own and alb-1's from its heartbeat.
    let j = ctl_json(at, "metrics", 0).await;
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
    let run = ctl(at, "metrics").await;
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
    let j = ctl_json(at, "metrics --name nlb_routes --since 1h", 0).await;
    assert!(
        ids(&j["metrics"], "name").iter().all(|n| n == "nlb_routes"),
        "{j}"
    );
    let j = ctl_json(at, "metrics --name nlb_routes --aggregate", 0).await;
    let aggs: BTreeSet<&str> = j["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["labels"]["agg"].as_str().unwrap())
        .collect();
    assert_eq!(aggs, BTreeSet::from(["avg", "count", "max", "min", "sum"]));
    // One instance.
    let j = ctl_json(at, "metrics --module alb-1", 0).await;
    assert_eq!(j["metrics"]["instance_id"], "alb-1");
    assert_eq!(j["metrics"]["module_type"], "alb");
    assert!(
        ids(&j["metrics"]["metrics"], "name").contains(&"memory_usage_mb".to_string()),
        "{j}"
    );
    let run = ctl(at, "metrics --module alb-1 --name memory_usage_mb").await;
    assert_eq!(first_column(&run.stdout), ["alb-1"]);
    ctl(at, "metrics --module nope").await.expect_code(5);

    // Load per instance.
    let j = ctl_json(at, "load", 0).await;
    assert_eq!(keys(&j["distribution"]), ["alb-1", "alb-2", "dblb-1"]);
    assert_eq!(j["distribution"]["alb-1"]["cpu_usage_percent"], 40.0);
    assert_eq!(j["distribution"]["alb-1"]["requests_per_second"], 12);
    assert_eq!(j["balance_score"], 1.0, "idle instances are even");
    let j = ctl_json(at, "load --type dblb", 0).await;
    assert_eq!(keys(&j["distribution"]), ["dblb-1"]);
    let run = ctl(at, "load").await;
    run.expect_code(0);
    assert_eq!(
        &first_column(&run.stdout)[..3],
        ["alb-1", "alb-2", "dblb-1"]
    );
    assert!(run.stdout.contains("balance score: 1 "), "{}", run.stdout);

    // Rebalance: all, one type, an unknown type.
    let j = ctl_json(at, "rebalance --strategy even --force", 0).await;
    assert_eq!(j["success"], true);
    assert_eq!(
        keys(&j["previous_distribution"]),
        ["alb-1", "alb-2", "dblb-1"]
    );
    assert!(j["message"].as_str().unwrap().contains("(even)"), "{j}");
    let j = ctl_json(at, "rebalance --type alb", 0).await;
    assert_eq!(keys(&j["previous_distribution"]), ["alb-1", "alb-2"]);
    let run = ctl(at, "rebalance --instance dblb-1").await;
    run.expect_code(0);
    assert_eq!(
        first_column(&run.stdout),
        ["INSTANCE", "dblb-1"],
        "message line, then the table"
    );
    let run = ctl(at, "rebalance --type rtmp").await;
    run.expect_code(5);
    assert_eq!(
        run.stderr,
        "nlbctl: rebalance: NOT_FOUND: no rtmp instance is registered\n"
    );
    ctl(at, "rebalance --instance nope").await.expect_code(6);
    ctl(at, "rebalance --strategy random").await.expect_code(2);

    // Scale: the NLB asks alb-1 (the first alb by id), a fake that agrees.
    let j = ctl_json(at, "scale alb --to 3", 0).await;
    assert_eq!(j["success"], true);
    assert_eq!(j["scaling_action"], "scale_to");
    assert_eq!(j["target_instances"], 3);
    assert_eq!(j["current_instances"], 2);
    let run = ctl(at, "scale alb --up").await;
    run.expect_code(0);
    assert_eq!(value_of(&run.stdout, "action"), "scale_up");
    assert_eq!(value_of(&run.stdout, "target"), "3");
    let j = ctl_json(at, "scale alb --down --instance alb-2", 0).await;
    assert_eq!(j["target_instances"], 1);
    // No rtmp instance to carry it out: FAILED_PRECONDITION, exit 1.
    let run = ctl(at, "scale rtmp --up").await;
    run.expect_code(1);
    assert!(
        run.stderr
            .starts_with("nlbctl: scale rtmp: FAILED_PRECONDITION: "),
        "{}",
        run.stderr
    );
    // dblb-1's ModuleService does not answer: UNAVAILABLE, exit 3.
    let run = ctl(at, "scale dblb --up").await;
    run.expect_code(3);
    assert!(
        run.stderr.starts_with("nlbctl: scale dblb: UNAVAILABLE"),
        "{}",
        run.stderr
    );
    ctl(at, "scale alb").await.expect_code(2);
    ctl(at, "scale alb --instance nope --up")
        .await
        .expect_code(5);

    // Autoscale: the type's policy set and on, then off with its settings
    // kept; usage errors before any call.
    let run = ctl(
        at,
        "scale alb --autoscale --min 2 --max 5 --target-connections 40 --cooldown 20",
    )
    .await;
    run.expect_code(0);
    assert_eq!(value_of(&run.stdout, "action"), "autoscale");
    assert_eq!(
        value_of(&run.stdout, "message"),
        "autoscaling policy of alb set: 2 to 5 instances, 40 connections and 0% CPU per \
         instance, cooldowns 20 s up and 20 s down (enabled)"
    );
    let policy = |stdout: &str| {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(stdout).expect("YAML");
        let p = &v["modules"]["alb"];
        (
            p["enabled"].as_bool(),
            p["min_instances"].as_u64(),
            p["max_instances"].as_u64(),
            p["target_connections"].as_u64(),
            p["scale_down_cooldown_seconds"].as_u64(),
        )
    };
    let run = ctl(at, "config show autoscaling").await;
    run.expect_code(0);
    assert_eq!(
        policy(&run.stdout),
        (Some(true), Some(2), Some(5), Some(40), Some(20)),
        "{}",
        run.stdout
    );
    let j = ctl_json(at, "scale alb --no-autoscale", 0).await;
    assert_eq!(j["scaling_action"], "autoscale");
    let run = ctl(at, "config show autoscaling").await;
    assert_eq!(
        policy(&run.stdout),
        (Some(false), Some(2), Some(5), Some(40), Some(20)),
        "{}",
        run.stdout
    );
    // A policy needs a target, and --min at most --max; its flags need
    // --autoscale.
    let run = ctl(at, "scale alb --up --max 3").await;
    run.expect_code(2);
    assert!(run.stderr.contains("go with --autoscale"), "{}", run.stderr);
    let run = ctl(at, "scale alb --autoscale --max 3").await;
    run.expect_code(2);
    assert!(
        run.stderr.contains("--target-connections"),
        "{}",
        run.stderr
    );
    let run = ctl(at, "scale alb --autoscale --min 4 --max 3 --target-cpu 60").await;
    run.expect_code(2);
    assert!(
        run.stderr.contains("--min 4 is over --max 3"),
        "{}",
        run.stderr
    );
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

    let mut watch = spawn_ctl(at, "metrics --watch --interval 1 --json");
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
    let mut watch = spawn_ctl(at, "metrics --watch --interval 1 --name nlb_routes");
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
    let mut watch = spawn_ctl(&nlb.grpc_addr, "metrics --watch --interval 1 --json");
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
