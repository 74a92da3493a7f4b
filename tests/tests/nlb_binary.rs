//! The real `nlb` binary: defaults and environment overrides, persistence of
//! operator changes across a restart, SIGHUP reloads, start failures, garbage
//! on the gRPC port and SIGTERM.

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::time::{Duration, Instant};

use e2e::{free_addr, free_port, metric_value, run_nlb, Launch, NlbProcess, Sandbox};
use serde_yaml_ng::Value;
use shared_types::pb::{self, nlb_service_client::NlbServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

type Client = NlbServiceClient<Channel>;

/// One section from `GetNLBConfig`: its YAML value and its `source` metadata.
async fn section(client: &mut Client, name: &str) -> (Value, String) {
    let resp = client
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: name.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("GetNLBConfig {name}: {e}"))
        .into_inner();
    assert_eq!(resp.configs.len(), 1, "one section asked, one returned");
    let c = &resp.configs[0];
    assert_eq!(c.config_type, name);
    let text = std::str::from_utf8(&c.config_data).expect("config_data is UTF-8");
    let value = serde_yaml_ng::from_str(text)
        .unwrap_or_else(|e| panic!("section {name} is not YAML ({e}): {text}"));
    let source = c.metadata.get("source").cloned().unwrap_or_default();
    (value, source)
}

/// Every section from `GetNLBConfig`, as raw bytes (to compare snapshots).
async fn all_sections(client: &mut Client) -> HashMap<String, Vec<u8>> {
    client
        .get_nlb_config(pb::GetNlbConfigRequest::default())
        .await
        .expect("GetNLBConfig")
        .into_inner()
        .configs
        .into_iter()
        .map(|c| (c.config_type, c.config_data))
        .collect()
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("test YAML")
}

/// The route ids in `GetRoutingTable`.
async fn table_route_ids(client: &mut Client) -> Vec<String> {
    client
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .expect("GetRoutingTable")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.route.map(|r| r.route_id))
        .collect()
}

async fn status(client: &mut Client) -> pb::GetNlbStatusResponse {
    client
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .expect("GetNLBStatus")
        .into_inner()
}

async fn set_section(client: &mut Client, name: &str, data: &str) -> pb::UpdateNlbConfigResponse {
    client
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            config: Some(pb::ConfigUpdate {
                config_type: name.to_string(),
                config_data: data.as_bytes().to_vec(),
                ..Default::default()
            }),
            validate_only: false,
            restart_required: false,
        })
        .await
        .unwrap_or_else(|e| panic!("UpdateNLBConfig {name}: {e}"))
        .into_inner()
}

/// Stops with SIGTERM and asserts a clean exit (status 0).
async fn terminate(nlb: &mut NlbProcess) {
    nlb.signal("TERM");
    let status = nlb.wait_exit().await;
    assert!(
        status.success(),
        "SIGTERM must exit 0, got {status}; stderr:\n{}",
        nlb.stderr()
    );
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn runs_on_defaults_without_a_config_file() {
    let sb = Sandbox::new();
    let nlb = sb
        .start_with(Launch {
            use_config_file: false,
            ..Launch::default()
        })
        .await;
    let mut client = nlb.client().await;

    let st = status(&mut client).await;
    assert_eq!(st.status, pb::HealthStatus::Healthy as i32, "{st:?}");
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.registered_modules, 0);
    assert_eq!(st.details["grpc_listen"], nlb.grpc_addr);
    assert_eq!(st.details["admin_listen"], nlb.admin_addr);
    assert_eq!(st.details["config_file"], "(none: defaults)");

    // The environment overrides show in the merged config...
    let (grpc, _) = section(&mut client, "grpc").await;
    assert_eq!(grpc["listen"].as_str(), Some(nlb.grpc_addr.as_str()));
    let (admin, _) = section(&mut client, "admin").await;
    assert_eq!(admin["listen"].as_str(), Some(nlb.admin_addr.as_str()));
    let (state_file, _) = section(&mut client, "state_file").await;
    assert_eq!(
        state_file.as_str(),
        Some(sb.state_path().to_str().unwrap()),
        "NLB_STATE_FILE"
    );
    // ...and everything else is the documented default.
    assert_eq!(grpc["max_message_bytes"].as_u64(), Some(4 * 1024 * 1024));
    assert_eq!(grpc["keepalive_interval_seconds"].as_u64(), Some(30));
    assert_eq!(grpc["keepalive_timeout_seconds"].as_u64(), Some(10));
    assert_eq!(grpc["max_concurrent_streams"].as_u64(), Some(256));
    let (registry, _) = section(&mut client, "registry").await;
    assert_eq!(registry["drain_timeout_seconds"].as_u64(), Some(30));
    assert_eq!(registry["removal_grace_seconds"].as_u64(), Some(30));
    assert_eq!(registry["max_instances"].as_u64(), Some(100_000));
    let (health, _) = section(&mut client, "health").await;
    assert_eq!(health["active_checks"].as_bool(), Some(true));
    let (routing, _) = section(&mut client, "routing").await;
    assert_eq!(routing["sticky"].as_bool(), Some(false));
    assert_eq!(routing["validate_timeout_ms"].as_u64(), Some(500));
    assert_eq!(routing["module_call_timeout_ms"].as_u64(), Some(2000));
    let (metrics, _) = section(&mut client, "metrics").await;
    assert_eq!(metrics["retention_points"].as_u64(), Some(360));
    assert_eq!(metrics["sample_interval_seconds"].as_u64(), Some(10));
    let (routes, source) = section(&mut client, "routes").await;
    assert_eq!(routes.as_sequence().map(Vec::len), Some(0));
    assert_eq!(source, "file", "nothing was changed through the API");
    assert!(table_route_ids(&mut client).await.is_empty());

    // The admin port answers too.
    assert_eq!(nlb.get("/healthz").await.status, 200);
    let st = nlb.get("/status").await;
    assert_eq!(st.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&st.body).expect("/status is JSON");
    assert_eq!(doc["grpc_listen"], nlb.grpc_addr.as_str());
    // Nothing was changed, so nothing was written.
    assert!(!sb.state_path().exists());
}

#[tokio::test]
async fn environment_beats_the_config_file() {
    let sb = Sandbox::new();
    // Hold the file's gRPC address: if the NLB tried to listen there it would
    // fail to start.
    let held = StdListener::bind("127.0.0.1:0").unwrap();
    let file_grpc = held.local_addr().unwrap().to_string();
    let file_admin = free_addr();
    sb.write_config(&format!(
        "grpc:\n  listen: \"{file_grpc}\"\n  max_concurrent_streams: 64\nadmin:\n  listen: \"{file_admin}\"\n"
    ));
    let nlb = sb.start().await;
    assert_ne!(nlb.grpc_addr, file_grpc);
    let mut client = nlb.client().await;
    let st = status(&mut client).await;
    assert_eq!(st.details["grpc_listen"], nlb.grpc_addr);
    assert_eq!(
        st.details["config_file"],
        sb.config_path().display().to_string()
    );
    let (grpc, _) = section(&mut client, "grpc").await;
    assert_eq!(grpc["listen"].as_str(), Some(nlb.grpc_addr.as_str()));
    // The rest of the file's section still applies.
    assert_eq!(grpc["max_concurrent_streams"].as_u64(), Some(64));
    let (admin, _) = section(&mut client, "admin").await;
    assert_eq!(admin["listen"].as_str(), Some(nlb.admin_addr.as_str()));
    drop(held);
}

fn pool_config(backend: &str) -> String {
    format!(
        r#"
backends:
  web: ["{backend}"]
registry:
  removal_grace_seconds: 45
"#
    )
}

fn web_route() -> pb::Route {
    pb::Route {
        route_id: "web-route".into(),
        protocol: pb::Protocol::Http as i32,
        destination_pattern: "www.example.com".into(),
        destination_port: 8080,
        priority: 5,
        metadata: [("backend".to_string(), "web".to_string())].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn operator_changes_survive_a_restart() {
    let sb = Sandbox::new();
    let backend = format!("127.0.0.1:{}", free_port());
    sb.write_config(&pool_config(&backend));

    let mut first = sb.start().await;
    let mut client = first.client().await;
    let resp = client
        .update_routing(pb::UpdateRoutingRequest {
            routes: vec![web_route()],
            ..Default::default()
        })
        .await
        .expect("UpdateRouting")
        .into_inner();
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.routes_updated, 1);
    let resp = set_section(&mut client, "traffic_weights", "alb: {v1: 70, v2: 30}").await;
    assert!(resp.success, "{resp:?}");
    assert!(!resp.requires_restart, "{resp:?}");
    drop(client);
    terminate(&mut first).await;
    drop(first);

    // The state file on disk is JSON and holds the route.
    let text = std::fs::read_to_string(sb.state_path()).expect("the state file exists");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("the state file is JSON");
    let routes = doc["sections"]["routes"]
        .as_array()
        .unwrap_or_else(|| panic!("sections.routes in {text}"));
    assert_eq!(routes.len(), 1, "{text}");
    assert_eq!(routes[0]["route_id"], "web-route");
    assert_eq!(routes[0]["metadata"]["backend"], "web");
    assert_eq!(doc["sections"]["traffic_weights"]["alb"]["v1"], 70);

    // Same config file and state file, new ports.
    let second = sb.start().await;
    let mut client = second.client().await;
    let (routes, source) = section(&mut client, "routes").await;
    assert_eq!(source, "api");
    let routes = routes.as_sequence().expect("routes is a list");
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["route_id"].as_str(), Some("web-route"));
    assert_eq!(routes[0]["destination_port"].as_u64(), Some(8080));
    assert_eq!(routes[0]["metadata"]["backend"].as_str(), Some("web"));
    let (weights, source) = section(&mut client, "traffic_weights").await;
    assert_eq!(source, "api");
    assert_eq!(weights, yaml("alb: {v1: 70, v2: 30}"));
    // The file's sections are still in force beside the API layer.
    let (registry, source) = section(&mut client, "registry").await;
    assert_eq!(source, "file");
    assert_eq!(registry["removal_grace_seconds"].as_u64(), Some(45));

    assert_eq!(table_route_ids(&mut client).await, vec!["web-route"]);
    let resp = client
        .route_request(pb::RouteRequestRequest {
            route: Some(pb::Route {
                protocol: pb::Protocol::Http as i32,
                destination_pattern: "WWW.example.com".into(),
                destination_port: 8080,
                ..Default::default()
            }),
            context: [("client_address".to_string(), "10.1.2.3:5555".to_string())].into(),
            dry_run: false,
        })
        .await
        .expect("RouteRequest")
        .into_inner();
    assert!(resp.routed, "{resp:?}");
    assert_eq!(resp.target_address, backend);
    assert_eq!(resp.target_instance_id, format!("web/{backend}"));
    assert!(resp.message.contains("web-route"), "{}", resp.message);
    // A connection the route does not match is not routed.
    let resp = client
        .route_request(pb::RouteRequestRequest {
            route: Some(pb::Route {
                protocol: pb::Protocol::Http as i32,
                destination_pattern: "other.example.com".into(),
                destination_port: 8080,
                ..Default::default()
            }),
            context: HashMap::new(),
            dry_run: true,
        })
        .await
        .expect("RouteRequest")
        .into_inner();
    assert!(!resp.routed, "{resp:?}");
}

#[tokio::test]
async fn sighup_reloads_the_file_and_keeps_the_old_config_on_errors() {
    let sb = Sandbox::new();
    let a = format!("127.0.0.1:{}", free_port());
    let b = format!("127.0.0.1:{}", free_port());
    sb.write_config(&format!(
        "backends:\n  a: [\"{a}\"]\ntraffic_weights:\n  alb: {{blue: 50, green: 50}}\n"
    ));
    let mut nlb = sb.start().await;
    let mut client = nlb.client().await;
    assert!(table_route_ids(&mut client).await.is_empty());
    // An API-layer section, which must keep winning over the file.
    let resp = set_section(&mut client, "traffic_weights", "{alb: {v1: 100}}").await;
    assert!(resp.success, "{resp:?}");

    sb.write_config(&format!(
        r#"
backends:
  a: ["{a}"]
  b: ["{b}"]
routes:
  - route_id: to-b
    protocol: tcp
    destination_port: 9000
    metadata: {{ backend: b }}
traffic_weights:
  alb: {{blue: 10, green: 90}}
"#
    ));
    nlb.signal("HUP");
    nlb.eventually("route to-b after SIGHUP", || {
        let mut c = client.clone();
        async move {
            let ids = table_route_ids(&mut c).await;
            (ids == ["to-b"]).then_some(())
        }
    })
    .await;
    let (backends, source) = section(&mut client, "backends").await;
    assert_eq!(source, "file");
    assert_eq!(backends["b"][0].as_str(), Some(b.as_str()));
    let (routes, _) = section(&mut client, "routes").await;
    assert_eq!(routes[0]["route_id"].as_str(), Some("to-b"));
    let (weights, source) = section(&mut client, "traffic_weights").await;
    assert_eq!(source, "api", "the API layer wins over the reloaded file");
    assert_eq!(weights, yaml("alb: {v1: 100}"));
    let resp = client
        .route_request(pb::RouteRequestRequest {
            route: Some(pb::Route {
                protocol: pb::Protocol::Tcp as i32,
                destination_port: 9000,
                ..Default::default()
            }),
            context: HashMap::new(),
            dry_run: true,
        })
        .await
        .expect("RouteRequest")
        .into_inner();
    assert!(resp.routed, "{resp:?}");
    assert_eq!(resp.target_address, b);
    let metrics = nlb.get("/metrics").await.body;
    assert_eq!(
        metric_value(&metrics, r#"nlb_config_reloads_total{result="ok"}"#),
        Some(1.0),
        "{metrics}"
    );

    // An invalid file: refused, counted, and the config in force is unchanged.
    let before = all_sections(&mut client).await;
    sb.write_config(&format!(
        "backends:\n  a: [\"{a}\"]\nadmin:\n  listen: nope\nroutes: []\n"
    ));
    nlb.signal("HUP");
    let metrics = nlb
        .eventually("a failed reload in /metrics", || async {
            let m = nlb.try_get("/metrics").await.ok()?.body;
            // Counters start at 0: wait for the count, not the series.
            (metric_value(&m, r#"nlb_config_reloads_total{result="failed"}"#) >= Some(1.0))
                .then_some(m)
        })
        .await;
    assert_eq!(
        metric_value(&metrics, r#"nlb_config_reloads_total{result="failed"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, r#"nlb_config_reloads_total{result="ok"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(all_sections(&mut client).await, before);
    assert_eq!(table_route_ids(&mut client).await, vec!["to-b"]);
    assert_eq!(
        status(&mut client).await.status,
        pb::HealthStatus::Healthy as i32
    );
    let logs = nlb.stderr();
    assert!(
        logs.contains("admin.listen"),
        "the log names the bad key; stderr:\n{logs}"
    );
    assert!(nlb.try_exit().is_none(), "the NLB must keep running");
}

#[test]
fn a_bad_config_at_start_is_refused_naming_the_key() {
    let sb = Sandbox::new();
    sb.write_config("grpc:\n  max_message_bytes: 12\nregistry:\n  max_instanses: 5\n");
    let grpc = free_addr();
    let admin = free_addr();
    let state = sb.state_path();
    let out = run_nlb(
        &["--config", sb.config_path().to_str().unwrap()],
        &[
            ("NLB_GRPC_LISTEN", &grpc),
            ("NLB_ADMIN_LISTEN", &admin),
            ("NLB_STATE_FILE", state.to_str().unwrap()),
        ],
        sb.path(),
    );
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains("grpc.max_message_bytes: 12 is out of range"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("registry: ") && stderr.contains("max_instanses"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&sb.config_path().display().to_string()),
        "names the file; stderr:\n{stderr}"
    );
    // A bad environment override is named the same way.
    sb.write_config("{}\n");
    let out = run_nlb(
        &["--config", sb.config_path().to_str().unwrap()],
        &[
            ("NLB_GRPC_LISTEN", "localhost"),
            ("NLB_ADMIN_LISTEN", &admin),
            ("NLB_STATE_FILE", state.to_str().unwrap()),
        ],
        sb.path(),
    );
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains("NLB_GRPC_LISTEN") && stderr.contains("\"localhost\""),
        "stderr:\n{stderr}"
    );
}

#[test]
fn a_missing_config_file_or_a_corrupt_state_file_is_refused_naming_the_path() {
    let sb = Sandbox::new();
    let state = sb.state_path();
    let missing = sb.path().join("missing.yaml");
    let (grpc, admin) = (free_addr(), free_addr());
    let vars = [
        ("NLB_GRPC_LISTEN", grpc.as_str()),
        ("NLB_ADMIN_LISTEN", admin.as_str()),
        ("NLB_STATE_FILE", state.to_str().unwrap()),
    ];

    let out = run_nlb(&["--config", missing.to_str().unwrap()], &vars, sb.path());
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("cannot read {}", missing.display())),
        "stderr:\n{stderr}"
    );

    sb.write_config("{}\n");
    std::fs::create_dir_all(state.parent().unwrap()).unwrap();
    std::fs::write(&state, "{ not json").unwrap();
    let out = run_nlb(
        &["--config", sb.config_path().to_str().unwrap()],
        &vars,
        sb.path(),
    );
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("state file {} is not valid", state.display())),
        "stderr:\n{stderr}"
    );
}

#[test]
fn a_port_in_use_is_refused_naming_the_address() {
    let sb = Sandbox::new();
    let held = StdListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let state = sb.state_path();
    for (grpc, admin, what) in [
        (taken.clone(), free_addr(), "gRPC"),
        (free_addr(), taken.clone(), "admin"),
    ] {
        let out = run_nlb(
            &[],
            &[
                ("NLB_GRPC_LISTEN", &grpc),
                ("NLB_ADMIN_LISTEN", &admin),
                ("NLB_STATE_FILE", state.to_str().unwrap()),
            ],
            sb.path(),
        );
        let stderr = stderr_of(&out);
        assert!(!out.status.success(), "stderr:\n{stderr}");
        assert!(
            stderr.contains(&format!("cannot listen on {what} address {taken}")),
            "names the {what} address; stderr:\n{stderr}"
        );
    }
    drop(held);
}

/// Writes `bytes` to the gRPC port and asserts the NLB closes the connection.
async fn garbage(addr: &str, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to gRPC port");
    s.write_all(bytes).await.expect("write garbage");
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => sink.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the NLB kept a connection that sent {:?} open",
        String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
    );
}

#[tokio::test]
async fn garbage_on_the_grpc_port_is_closed_and_harms_nothing() {
    let sb = Sandbox::new();
    sb.write_config("{}\n");
    let mut nlb = sb.start().await;
    let mut client = nlb.client().await;
    assert_eq!(
        status(&mut client).await.status,
        pb::HealthStatus::Healthy as i32
    );

    garbage(
        &nlb.grpc_addr,
        b"GET / HTTP/1.1\r\nHost: nlb\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    let mut noise = vec![0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    garbage(&nlb.grpc_addr, &noise).await;
    // A valid HTTP/2 preface followed by a garbage frame.
    let mut bad_frame = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad_frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x42, 0xff, 0xff, 0xff, 0xff, 0xff]);
    bad_frame.extend_from_slice(&noise[..512]);
    garbage(&nlb.grpc_addr, &bad_frame).await;

    // The NLB still answers, on the old connection and a new one.
    assert_eq!(
        status(&mut client).await.status,
        pb::HealthStatus::Healthy as i32
    );
    let mut fresh = nlb.client().await;
    assert_eq!(
        status(&mut fresh).await.status,
        pb::HealthStatus::Healthy as i32
    );
    assert!(nlb.try_exit().is_none(), "the NLB must keep running");
    let logs = nlb.stderr();
    assert!(!logs.contains("panicked"), "stderr:\n{logs}");
}

#[tokio::test]
async fn sigterm_stops_ready_and_exits_zero() {
    let sb = Sandbox::new();
    sb.write_config("{}\n");
    let mut nlb = sb.start().await;
    // An open control connection must not hold the shutdown up.
    let mut client = nlb.client().await;
    status(&mut client).await;
    assert_eq!(nlb.get("/readyz").await.status, 200);

    nlb.signal("TERM");
    let until = Instant::now() + e2e::EXIT_DEADLINE;
    let mut seen = None;
    while seen.is_none() {
        if nlb.try_exit().is_some() {
            seen = Some("exited".to_string());
        } else {
            match nlb.try_get("/readyz").await {
                Ok(r) if r.status == 503 => seen = Some("503".to_string()),
                Ok(r) => assert_eq!(r.status, 200, "/readyz during shutdown: {r:?}"),
                // The admin port closed: the process is on its way out.
                Err(_) => {}
            }
        }
        assert!(
            Instant::now() < until,
            "after SIGTERM /readyz kept saying ready; stderr:\n{}",
            nlb.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = nlb.wait_exit().await;
    assert!(
        status.success(),
        "SIGTERM must exit 0 (saw {seen:?}), got {status}; stderr:\n{}",
        nlb.stderr()
    );
    drop(client);
}

#[tokio::test]
async fn a_silent_connection_does_not_hold_shutdown_up() {
    let sb = Sandbox::new();
    sb.write_config("grpc: {handshake_timeout_seconds: 2}\n");
    // A grace far beyond the exit deadline: only draining what is really in
    // flight may delay the exit.
    let mut nlb = sb
        .start_with(Launch {
            env: vec![("NLB_SHUTDOWN_GRACE_SECONDS".into(), "600".into())],
            ..Launch::default()
        })
        .await;
    // Half a preface, then silence: never admitted to the gRPC server, and
    // closed at the handshake deadline.
    let mut silent = TcpStream::connect(&nlb.grpc_addr).await.unwrap();
    silent.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
        .await
        .expect("closed by the handshake deadline");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Another silent one is open while the NLB stops.
    let mut second = TcpStream::connect(&nlb.grpc_addr).await.unwrap();
    second.write_all(b"PRI").await.unwrap();
    terminate(&mut nlb).await;
    let logs = nlb.stderr();
    assert!(
        !logs.contains("calls still in flight"),
        "no call was in flight; stderr:\n{logs}"
    );
}
