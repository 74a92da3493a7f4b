//! Control API tests of the NLB's own health, status and config:
//! `CheckHealth` (shallow and deep, modules with and without `HealthCheck`),
//! `GetNLBStatus`, and `GetNLBConfig` / `UpdateNLBConfig` (checksums,
//! validation, persistence, live and restart-only sections).

#[allow(dead_code)]
mod common;

use std::collections::HashMap;

use common::*;
use sha2::{Digest, Sha256};
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tonic::Code;

// ===========================================================================
// CheckHealth
// ===========================================================================

#[tokio::test]
async fn check_health_deep_calls_modules_and_flags_unreachable_ones() {
    let t = TestNlb::start().await;
    let fake = FakeModule::start().await;
    fake.set_health(HealthStatus::Healthy, "all good");
    t.register(register_req(
        instance(
            "alb-1",
            ModuleType::Alb,
            &fake.address(),
            Some("127.0.0.1:8081"),
        ),
        vec![],
    ))
    .await;

    // Shallow: the registry's view only; no module is called.
    let resp = t
        .client
        .clone()
        .check_health(pb::CheckHealthRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status, HealthStatus::Healthy as i32);
    assert_eq!(resp.module_health["alb-1"], HealthStatus::Healthy as i32);
    assert_eq!(fake.health_calls(), 0);
    for k in ["registry", "routing", "state_file"] {
        assert!(resp.checks.contains_key(k), "{k}: {:?}", resp.checks);
    }
    assert!(resp.checks["state_file"].contains("writable"));

    let resp = t
        .client
        .clone()
        .check_health(pb::CheckHealthRequest {
            deep_check: true,
            check_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fake.health_calls(), 1);
    let asked = fake.last_health().unwrap();
    assert!(asked.deep_check);
    assert_eq!(asked.instance_id, "alb-1");
    assert_eq!(resp.status, HealthStatus::Healthy as i32, "{resp:?}");
    assert_eq!(resp.module_health["alb-1"], HealthStatus::Healthy as i32);
    assert!(
        resp.checks["module.alb-1"].contains("all good"),
        "{:?}",
        resp.checks
    );

    // An instance nothing answers for.
    t.register(register_req(
        instance(
            "alb-dead",
            ModuleType::Alb,
            &closed_addr(),
            Some("127.0.0.1:8082"),
        ),
        vec![],
    ))
    .await;
    let resp = t
        .client
        .clone()
        .check_health(pb::CheckHealthRequest {
            deep_check: true,
            check_modules: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fake.health_calls(), 2);
    assert_eq!(resp.module_health["alb-1"], HealthStatus::Healthy as i32);
    assert_eq!(
        resp.module_health["alb-dead"],
        HealthStatus::Unhealthy as i32
    );
    assert!(
        resp.checks["module.alb-dead"].contains("unreachable")
            && resp.checks["module.alb-dead"].contains("alb-dead"),
        "{:?}",
        resp.checks
    );
    assert_eq!(resp.status, HealthStatus::Degraded as i32);
    assert!(
        resp.message.contains("some instances are unhealthy"),
        "{}",
        resp.message
    );

    // A module reporting itself unhealthy also degrades the NLB.
    let dead_free = TestNlb::start().await;
    let sick = FakeModule::start().await;
    sick.set_health(HealthStatus::Unhealthy, "disk full");
    dead_free
        .register(register_req(
            instance("alb-sick", ModuleType::Alb, &sick.address(), None),
            vec![],
        ))
        .await;
    let resp = dead_free
        .client
        .clone()
        .check_health(pb::CheckHealthRequest {
            deep_check: false,
            check_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.module_health["alb-sick"],
        HealthStatus::Unhealthy as i32
    );
    assert!(resp.checks["module.alb-sick"].contains("disk full"));
    assert_eq!(resp.status, HealthStatus::Degraded as i32);
    assert!(!sick.last_health().unwrap().deep_check);
}

#[tokio::test]
async fn check_health_treats_a_module_without_health_check_by_its_heartbeats() {
    let t = TestNlb::start().await;
    let stub = FakeModule::start_stub().await;
    t.register(register_req(
        instance("third-party", ModuleType::Alb, &stub.address(), None),
        vec![],
    ))
    .await;
    let resp = t
        .client
        .clone()
        .check_health(pb::CheckHealthRequest {
            deep_check: true,
            check_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.module_health["third-party"],
        HealthStatus::Healthy as i32,
        "{resp:?}"
    );
    assert!(
        resp.checks["module.third-party"].contains("not implemented"),
        "{:?}",
        resp.checks
    );
    assert_eq!(resp.status, HealthStatus::Healthy as i32, "{resp:?}");
}

// ===========================================================================
// GetNLBStatus
// ===========================================================================

#[tokio::test]
async fn nlb_status_reports_version_modules_and_counts() {
    let t = TestNlb::start().await;
    let web = || vec![route("web", Protocol::Http, 80)];
    t.register_simple("alb-1", ModuleType::Alb, "v1", web())
        .await;
    t.register_simple("alb-2", ModuleType::Alb, "v1", web())
        .await;
    t.register_simple("dblb-1", ModuleType::Dblb, "v1", vec![])
        .await;
    let _g = t.hold("alb-1", 4);

    let s = t
        .client
        .clone()
        .get_nlb_status(pb::GetNlbStatusRequest {
            include_modules: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.status, HealthStatus::Healthy as i32);
    assert!(s.started_at.is_some());
    assert_eq!(s.registered_modules, 3);
    assert_eq!(
        s.modules_by_type,
        HashMap::from([("alb".to_string(), 2), ("dblb".to_string(), 1)])
    );
    assert!(s.modules.is_empty());
    assert_eq!(s.active_connections, 4);
    assert_eq!(s.total_requests, 0);
    assert_eq!(s.details["grpc_listen"], "127.0.0.1:0");
    assert!(s.details["config_file"].ends_with("nlb.yaml"));

    let s = t.status().await;
    assert_eq!(ids(&s.modules), vec!["alb-1", "alb-2", "dblb-1"]);
    assert_eq!(s.modules[0].current_connections, 4);
}

// ===========================================================================
// UpdateNLBConfig / GetNLBConfig
// ===========================================================================

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn config_update(section: &str, data: &str, checksum: Option<String>) -> pb::ConfigUpdate {
    pb::ConfigUpdate {
        config_id: String::new(),
        config_type: section.into(),
        config_data: data.as_bytes().to_vec(),
        checksum: checksum.unwrap_or_default(),
        updated_at: None,
        metadata: Default::default(),
    }
}

async fn update_config(
    t: &TestNlb,
    section: &str,
    data: &str,
    checksum: Option<String>,
    validate_only: bool,
) -> Result<pb::UpdateNlbConfigResponse, tonic::Status> {
    t.client
        .clone()
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            config: Some(config_update(section, data, checksum)),
            validate_only,
            restart_required: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn section(t: &TestNlb, name: &str) -> pb::ConfigUpdate {
    let mut c = t
        .client
        .clone()
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: name.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.configs.len(), 1);
    c.configs.remove(0)
}

fn yaml_of(c: &pb::ConfigUpdate) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_slice(&c.config_data).expect("config_data is YAML")
}

#[tokio::test]
async fn get_nlb_config_returns_every_section_with_its_checksum() {
    let t = TestNlb::start_with(POOLS).await;
    let resp = t
        .client
        .clone()
        .get_nlb_config(pb::GetNlbConfigRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = resp
        .configs
        .iter()
        .map(|c| c.config_type.as_str())
        .collect();
    assert_eq!(
        names,
        vec![
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
    for c in &resp.configs {
        assert_eq!(c.checksum, sha256_hex(&c.config_data), "{}", c.config_type);
        assert_eq!(c.config_id, c.config_type);
        assert_eq!(c.metadata["source"], "file");
        assert_eq!(c.metadata["format"], "yaml");
        let restart = ["grpc", "admin", "state_file"].contains(&c.config_type.as_str());
        assert_eq!(c.metadata["requires_restart"], restart.to_string());
    }
    assert!(resp.last_updated.is_some());
    let backends = yaml_of(&resp.configs[6]);
    assert_eq!(backends["pool-a"][0], "127.0.0.1:9101");
    let grpc = yaml_of(&resp.configs[0]);
    assert_eq!(grpc["listen"], "127.0.0.1:0");
    assert_eq!(grpc["max_message_bytes"], 4_194_304);
    let health = yaml_of(&resp.configs[4]);
    assert_eq!(health["active_checks"], false);

    assert_status(
        t.client
            .clone()
            .get_nlb_config(pb::GetNlbConfigRequest {
                config_type: "bogus".into(),
            })
            .await,
        Code::InvalidArgument,
        &["unknown section \"bogus\"", "traffic_weights"],
    );
}

#[tokio::test]
async fn update_nlb_config_applies_a_section_and_persists_it() {
    let t = TestNlb::start_with(POOLS).await;
    let data = "pool-new: [\"127.0.0.1:9200\", \"127.0.0.1:9201\"]\n";
    let resp = update_config(&t, "backends", data, None, false)
        .await
        .unwrap();
    assert!(resp.success);
    assert!(resp.validation_passed);
    assert!(!resp.requires_restart);
    assert_eq!(resp.message, "section backends applied");

    let s = section(&t, "backends").await;
    assert_eq!(s.metadata["source"], "api");
    let v = yaml_of(&s);
    assert_eq!(v["pool-new"][1], "127.0.0.1:9201");
    assert!(v.get("pool-a").is_none(), "a section is replaced whole");
    assert_eq!(s.checksum, sha256_hex(&s.config_data));
    // It is in force: a route may now use the pool.
    update_routing(
        &t,
        vec![backend_route("n", Protocol::Tcp, 7000, "pool-new")],
        false,
        false,
    )
    .await
    .unwrap();
    let r = t.route(Protocol::Tcp, 7000, "", true).await;
    assert!(r.target_instance_id.starts_with("pool-new/"), "{r:?}");
    // And persisted.
    let disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&t.state_file).unwrap()).unwrap();
    assert_eq!(
        disk["sections"]["backends"]["pool-new"][0],
        "127.0.0.1:9200"
    );

    // The same data again changes nothing.
    let resp = update_config(&t, "backends", data, None, false)
        .await
        .unwrap();
    assert_eq!(resp.message, "section backends unchanged");
}

#[tokio::test]
async fn update_nlb_config_traffic_weights_apply_without_restart() {
    let t = TestNlb::start().await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let data = r#"{"alb": {"v1": 70, "v2": 30}}"#;
    let resp = update_config(
        &t,
        "traffic_weights",
        data,
        Some(sha256_hex(data.as_bytes())),
        false,
    )
    .await
    .unwrap();
    assert!(resp.success, "{resp:?}");
    assert!(!resp.requires_restart);
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.instance.unwrap().traffic_weight, 70);
    let d = info.deployment_config.unwrap();
    assert_eq!(
        (d.blue_weight, d.green_version.as_str(), d.green_weight),
        (70, "v2", 30)
    );
}

#[tokio::test]
async fn update_nlb_config_checks_checksum_validity_and_section() {
    let t = TestNlb::start_with(POOLS).await;
    let before = section(&t, "backends").await;
    let data = "pool-x: [\"127.0.0.1:9300\"]\n";

    // Wrong checksum.
    let r = update_config(&t, "backends", data, Some("00ff".repeat(16)), false).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["config.checksum", &sha256_hex(data.as_bytes())],
    );
    // validate_only: valid, nothing changes.
    let resp = update_config(
        &t,
        "backends",
        data,
        Some(sha256_hex(data.as_bytes())),
        true,
    )
    .await
    .unwrap();
    assert!(resp.success && resp.validation_passed, "{resp:?}");
    assert_eq!(resp.message, "section backends is valid");
    assert_eq!(section(&t, "backends").await, before);
    assert!(!t.state_file.exists(), "validate_only writes no state file");
    // validate_only: invalid, errors listed, nothing changes.
    let bad = "pool-x: [\"127.0.0.1:99999\"]\n";
    let resp = update_config(&t, "backends", bad, None, true)
        .await
        .unwrap();
    assert!(!resp.success && !resp.validation_passed);
    assert!(
        resp.validation_errors
            .iter()
            .any(|e| e.contains("backends.pool-x[0]") && e.contains("99999")),
        "{:?}",
        resp.validation_errors
    );
    assert_eq!(section(&t, "backends").await, before);
    // Invalid without validate_only: INVALID_ARGUMENT naming the key.
    let r = update_config(&t, "backends", bad, None, false).await;
    assert_status(r, Code::InvalidArgument, &["backends.pool-x[0]", "99999"]);
    let r = update_config(&t, "traffic_weights", "alb: {v1: 60, v2: 30}", None, false).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["traffic_weights.alb", "sum to 90"],
    );
    let r = update_config(&t, "metrics", "colour: blue", None, false).await;
    assert_status(r, Code::InvalidArgument, &["metrics", "colour"]);
    // Not YAML.
    let r = update_config(&t, "backends", "pool: [unclosed", None, false).await;
    assert_status(r, Code::InvalidArgument, &["config.config_data"]);
    // Unknown or missing section.
    let r = update_config(&t, "bogus", "a: 1", None, false).await;
    assert_status(r, Code::InvalidArgument, &["bogus", "unknown section"]);
    let r = update_config(&t, "", "a: 1", None, false).await;
    assert_status(r, Code::InvalidArgument, &["config.config_type: is empty"]);
    let r = t
        .client
        .clone()
        .update_nlb_config(pb::UpdateNlbConfigRequest::default())
        .await;
    assert_status(r, Code::InvalidArgument, &["config: is required"]);
    assert_eq!(section(&t, "backends").await, before);
    assert!(!t.state_file.exists());

    // The right checksum (either case) is accepted.
    let resp = update_config(
        &t,
        "backends",
        data,
        Some(sha256_hex(data.as_bytes()).to_uppercase()),
        false,
    )
    .await
    .unwrap();
    assert!(resp.success);
    assert_eq!(
        yaml_of(&section(&t, "backends").await)["pool-x"][0],
        "127.0.0.1:9300"
    );
}

#[tokio::test]
async fn update_nlb_config_grpc_section_requires_restart() {
    let t = TestNlb::start().await;
    let data = "listen: \"127.0.0.1:0\"\nmax_message_bytes: 2097152\n";
    let resp = update_config(&t, "grpc", data, None, false).await.unwrap();
    assert!(resp.success);
    assert!(resp.requires_restart);
    assert!(
        resp.message.contains("takes effect after a restart"),
        "{}",
        resp.message
    );
    let s = section(&t, "grpc").await;
    assert_eq!(yaml_of(&s)["max_message_bytes"], 2_097_152);
    assert_eq!(s.metadata["source"], "api");
    // The server in force still answers.
    assert_eq!(t.status().await.status, HealthStatus::Healthy as i32);
    // Back to the boot value: no restart needed.
    let resp = update_config(&t, "grpc", "listen: \"127.0.0.1:0\"\n", None, false)
        .await
        .unwrap();
    assert!(!resp.requires_restart, "{resp:?}");
    // traffic_weights never needs one.
    let resp = update_config(&t, "traffic_weights", "alb: {v1: 100}", None, false)
        .await
        .unwrap();
    assert!(!resp.requires_restart);
}

#[tokio::test]
async fn registry_section_update_applies_to_the_live_registry() {
    let t = TestNlb::start().await;
    let resp = update_config(&t, "registry", "drain_timeout_seconds: 1", None, false)
        .await
        .unwrap();
    assert!(resp.success && !resp.requires_restart, "{resp:?}");
    let reg = t
        .register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let resp = t
        .client
        .clone()
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: reg,
            graceful: true,
            drain_timeout_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.message.contains("within 1s"), "{}", resp.message);
    eventually("alb-1 removed after the configured drain", SOON, || async {
        t.module_info("alb-1").await.is_err()
    })
    .await;
}

#[tokio::test]
async fn a_backends_change_that_strands_a_route_is_refused() {
    let t = TestNlb::start_with(POOLS).await;
    update_routing(
        &t,
        vec![backend_route("db", Protocol::Postgres, 5432, "pool-a")],
        false,
        false,
    )
    .await
    .unwrap();
    let r = update_config(&t, "backends", "pool-b: [\"127.0.0.1:9102\"]", None, false).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["routes[0].metadata.backend", "pool-a"],
    );
    let r = t.route(Protocol::Postgres, 5432, "", true).await;
    assert_eq!(
        r.target_instance_id, "pool-a/127.0.0.1:9101",
        "unchanged: {r:?}"
    );
}
