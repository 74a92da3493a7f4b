//! Integration tests of the NLB's control API (`marchproxy.NLBService`):
//! each test starts its own NLB in-process, talks to it over real gRPC on
//! loopback, and asserts what a user would check: the exact fields, counts,
//! order, error codes, and error messages that name the bad thing.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn ids(modules: &[pb::ModuleInstance]) -> Vec<&str> {
    modules.iter().map(|m| m.instance_id.as_str()).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ===========================================================================
// RegisterModule
// ===========================================================================

#[tokio::test]
async fn register_returns_a_registration_id_and_lists_the_instance() {
    let t = TestNlb::start().await;
    let inst = instance(
        "alb-1",
        ModuleType::Alb,
        "127.0.0.1:5001",
        Some("127.0.0.1:8081"),
    );
    let resp = t
        .register(register_req(inst, vec![route("web", Protocol::Http, 80)]))
        .await;
    assert!(
        uuid::Uuid::parse_str(&resp.registration_id).is_ok(),
        "registration id {:?} is a UUID",
        resp.registration_id
    );
    assert!(resp.registered_at.is_some());
    assert!(resp.error.is_none());
    assert!(
        resp.message.contains("registered alb instance alb-1"),
        "{}",
        resp.message
    );
    assert!(!resp.message.contains("no traffic"), "{}", resp.message);

    let list = t.list(pb::ListModulesRequest::default()).await.unwrap();
    assert_eq!(ids(&list.modules), vec!["alb-1"]);
    assert_eq!(list.total_modules, 1);
    let m = &list.modules[0];
    assert_eq!(m.module_type, ModuleType::Alb as i32);
    assert_eq!(m.address, "127.0.0.1:5001");
    assert_eq!(m.health_status, HealthStatus::Healthy as i32);
    assert_eq!(m.metadata["data_address"], "127.0.0.1:8081");
    assert!(m.started_at.is_some());
}

#[tokio::test]
async fn register_refuses_bad_ids_types_and_addresses_naming_the_field() {
    let t = TestNlb::start().await;
    let mut c = t.client.clone();
    let ok = || {
        instance(
            "alb-1",
            ModuleType::Alb,
            "127.0.0.1:5001",
            Some("127.0.0.1:8081"),
        )
    };
    let cases: Vec<(pb::ModuleInstance, &[&str])> = vec![
        (
            pb::ModuleInstance {
                instance_id: String::new(),
                ..ok()
            },
            &["instance.instance_id", "\"\""],
        ),
        (
            pb::ModuleInstance {
                instance_id: "alb 1!".into(),
                ..ok()
            },
            &["instance.instance_id", "\"alb 1!\""],
        ),
        (
            pb::ModuleInstance {
                instance_id: "x".repeat(129),
                ..ok()
            },
            &["instance.instance_id", "1 to 128 characters"],
        ),
        (
            pb::ModuleInstance {
                module_type: ModuleType::Unspecified as i32,
                ..ok()
            },
            &["instance.module_type", "is not a module type"],
        ),
        (
            pb::ModuleInstance {
                module_type: 42,
                ..ok()
            },
            &["instance.module_type", "42"],
        ),
        (
            pb::ModuleInstance {
                address: "127.0.0.1".into(),
                ..ok()
            },
            &["instance.address", "\"127.0.0.1\" is not host:port"],
        ),
        (
            pb::ModuleInstance {
                address: "127.0.0.1:70000".into(),
                ..ok()
            },
            &["instance.address", "70000", "expected 1 to 65535"],
        ),
        (
            pb::ModuleInstance {
                address: String::new(),
                ..ok()
            },
            &["instance.address"],
        ),
        (
            instance(
                "alb-1",
                ModuleType::Alb,
                "127.0.0.1:5001",
                Some("no-port-here"),
            ),
            &["instance.metadata[\"data_address\"]", "no-port-here"],
        ),
        (
            instance(
                "alb-1",
                ModuleType::Alb,
                "127.0.0.1:5001",
                Some("127.0.0.1:0"),
            ),
            &["instance.metadata[\"data_address\"]", "expected 1 to 65535"],
        ),
        (
            pb::ModuleInstance {
                max_connections: -1,
                ..ok()
            },
            &["instance.max_connections", "-1"],
        ),
    ];
    for (inst, fragments) in cases {
        let r = c.register_module(register_req(inst.clone(), vec![])).await;
        assert_status(r, Code::InvalidArgument, fragments);
    }
    // Several problems at once are all named.
    let r = c
        .register_module(register_req(
            pb::ModuleInstance {
                instance_id: String::new(),
                module_type: 0,
                address: "nowhere".into(),
                ..ok()
            },
            vec![],
        ))
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &[
            "instance.instance_id",
            "instance.module_type",
            "instance.address",
        ],
    );
    // A missing instance.
    let r = c
        .register_module(pb::RegisterModuleRequest::default())
        .await;
    assert_status(r, Code::InvalidArgument, &["instance: is required"]);
    // Bad health config.
    let mut req = register_req(ok(), vec![]);
    req.health_config = Some(pb::HealthCheckConfig {
        interval_seconds: -1,
        ..Default::default()
    });
    assert_status(
        c.register_module(req).await,
        Code::InvalidArgument,
        &["health_config.interval_seconds", "-1"],
    );
    // Bad proxy_protocol capability.
    let mut req = register_req(ok(), vec![]);
    req.capabilities
        .insert("proxy_protocol".into(), "v1".into());
    assert_status(
        c.register_module(req).await,
        Code::InvalidArgument,
        &["capabilities[\"proxy_protocol\"]", "\"v1\""],
    );
    // Nothing was registered.
    let list = t.list(pb::ListModulesRequest::default()).await.unwrap();
    assert!(list.modules.is_empty(), "{:?}", list.modules);
    assert_eq!(t.nlb.registry.list().len(), 0);
}

#[tokio::test]
async fn register_refuses_bad_initial_routes_naming_route_and_field() {
    let t = TestNlb::start().await;
    let mut c = t.client.clone();
    let inst = || {
        instance(
            "alb-1",
            ModuleType::Alb,
            "127.0.0.1:5001",
            Some("127.0.0.1:8081"),
        )
    };
    let mut bad_cidr = route("cidr", Protocol::Http, 80);
    bad_cidr.source_pattern = "10.0.0.0/33".into();
    let mut bad_name = route("name", Protocol::Https, 443);
    bad_name.destination_pattern = "a..b".into();
    let cases: Vec<(pb::Route, &[&str])> = vec![
        (
            route("bigport", Protocol::Http, 70000),
            &[
                "initial_routes",
                "route \"bigport\"",
                "destination_port",
                "70000",
            ],
        ),
        (
            bad_cidr,
            &["initial_routes", "route \"cidr\"", "source_pattern"],
        ),
        (
            route("udp", Protocol::Udp, 53),
            &[
                "initial_routes",
                "route \"udp\"",
                "protocol",
                "cannot be carried by the NLB's TCP listeners",
            ],
        ),
        (
            route("h3", Protocol::Http3, 443),
            &["route \"h3\"", "protocol"],
        ),
        (
            route("none", Protocol::Unspecified, 80),
            &["route \"none\"", "protocol"],
        ),
        (
            route("", Protocol::Http, 80),
            &["route \"\"", "route_id: is empty"],
        ),
        (
            pb::Route {
                priority: -1,
                ..route("neg", Protocol::Http, 80)
            },
            &["route \"neg\"", "priority"],
        ),
        (bad_name, &["route \"name\"", "destination_pattern"]),
    ];
    for (r, fragments) in cases {
        let resp = c.register_module(register_req(inst(), vec![r])).await;
        assert_status(resp, Code::InvalidArgument, fragments);
    }
    assert!(t.nlb.registry.list().is_empty());
}

#[tokio::test]
async fn re_register_from_the_same_address_is_idempotent_another_address_is_refused() {
    let t = TestNlb::start().await;
    let inst = instance(
        "alb-1",
        ModuleType::Alb,
        "127.0.0.1:5001",
        Some("127.0.0.1:8081"),
    );
    let first = t.register(register_req(inst.clone(), vec![])).await;
    let again = t
        .register(register_req(
            pb::ModuleInstance {
                version: "v2".into(),
                ..inst.clone()
            },
            vec![],
        ))
        .await;
    assert_eq!(first.registration_id, again.registration_id);
    assert_eq!(first.registered_at, again.registered_at);
    assert!(
        again.message.contains("renewed alb instance alb-1"),
        "{}",
        again.message
    );
    let list = t.list(pb::ListModulesRequest::default()).await.unwrap();
    assert_eq!(ids(&list.modules), vec!["alb-1"]);
    assert_eq!(list.modules[0].version, "v2", "fields are updated");

    let other = pb::ModuleInstance {
        address: "127.0.0.1:5999".into(),
        ..inst
    };
    let r = t
        .client
        .clone()
        .register_module(register_req(other, vec![]))
        .await;
    assert_status(
        r,
        Code::AlreadyExists,
        &["alb-1", "already registered from 127.0.0.1:5001"],
    );
    // The original registration still stands.
    let hb = t.heartbeat("alb-1", &first.registration_id).await;
    assert!(hb.acknowledged, "{hb:?}");
}

#[tokio::test]
async fn instance_without_data_address_is_registered_but_never_routed() {
    let t = TestNlb::start().await;
    let no_data = instance("alb-a", ModuleType::Alb, "127.0.0.1:5001", None);
    let resp = t
        .register(register_req(
            no_data,
            vec![route("web", Protocol::Http, 80)],
        ))
        .await;
    assert!(!resp.registration_id.is_empty());
    assert!(
        resp.message.contains("no metadata[\"data_address\"]")
            && resp.message.contains("routed no traffic"),
        "the message says it takes no traffic: {}",
        resp.message
    );
    let info = t.module_info("alb-a").await.unwrap();
    assert_eq!(info.details["takes_traffic"], "false");

    // Alone, it cannot serve the route.
    let r = t.route(Protocol::Http, 80, "", true).await;
    assert!(!r.routed, "{r:?}");
    assert_eq!(
        r.error.as_ref().unwrap().code,
        pb::StatusCode::Unavailable as i32
    );

    // With a routable peer, every request goes to the peer.
    let with_data = instance(
        "alb-b",
        ModuleType::Alb,
        "127.0.0.1:5002",
        Some("127.0.0.1:8082"),
    );
    let resp = t
        .register(register_req(
            with_data,
            vec![route("web", Protocol::Http, 80)],
        ))
        .await;
    assert!(!resp.message.contains("no traffic"), "{}", resp.message);
    for _ in 0..30 {
        let r = t.route(Protocol::Http, 80, "", false).await;
        assert!(r.routed, "{r:?}");
        assert_eq!(r.target_instance_id, "alb-b");
        assert_eq!(r.target_address, "127.0.0.1:8082");
    }
    let info = t.module_info("alb-a").await.unwrap();
    assert_eq!(info.details["total_routed"], "0");
}

// ===========================================================================
// UnregisterModule
// ===========================================================================

#[tokio::test]
async fn graceful_unregister_drains_then_removes_at_the_deadline() {
    let t = TestNlb::start().await;
    let reg1 = t
        .register_simple(
            "alb-1",
            ModuleType::Alb,
            "v1",
            vec![route("web", Protocol::Http, 80)],
        )
        .await;
    t.register_simple(
        "alb-2",
        ModuleType::Alb,
        "v1",
        vec![route("web", Protocol::Http, 80)],
    )
    .await;
    let guards = t.hold("alb-1", 3);

    let resp = t
        .client
        .clone()
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: reg1.clone(),
            graceful: true,
            drain_timeout_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success);
    assert_eq!(resp.active_connections_drained, 3);
    assert!(
        resp.message.contains("alb-1 is draining") && resp.message.contains("within 1s"),
        "{}",
        resp.message
    );

    // Still listed, as STOPPING, draining; its connections still counted.
    let list = t.list(pb::ListModulesRequest::default()).await.unwrap();
    assert_eq!(ids(&list.modules), vec!["alb-1", "alb-2"]);
    assert_eq!(list.modules[0].health_status, HealthStatus::Stopping as i32);
    assert_eq!(list.modules[0].current_connections, 3);
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.details["state"], "draining");
    assert_eq!(info.details["connections_at_drain_start"], "3");

    // Never picked for new traffic.
    for _ in 0..30 {
        let r = t.route(Protocol::Http, 80, "", true).await;
        assert_eq!(r.target_instance_id, "alb-2", "{r:?}");
    }

    // Removed once the deadline passes, connections or not.
    eventually("alb-1 removed after its drain deadline", SOON, || async {
        matches!(t.module_info("alb-1").await, Err(s) if s.code() == Code::NotFound)
    })
    .await;
    let list = t.list(pb::ListModulesRequest::default()).await.unwrap();
    assert_eq!(ids(&list.modules), vec!["alb-2"]);
    // Its registration is gone.
    let hb = t.heartbeat("alb-1", &reg1).await;
    assert!(!hb.acknowledged);
    assert_eq!(hb.instructions["action"], "reregister");
    drop(guards);
}

#[tokio::test]
async fn immediate_unregister_removes_at_once() {
    let t = TestNlb::start().await;
    let reg = t
        .register_simple(
            "alb-1",
            ModuleType::Alb,
            "v1",
            vec![route("web", Protocol::Http, 80)],
        )
        .await;
    let guards = t.hold("alb-1", 2);
    let resp = t
        .client
        .clone()
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: reg,
            graceful: false,
            drain_timeout_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success);
    assert_eq!(resp.active_connections_drained, 0, "nothing was drained");
    assert!(
        resp.message.contains("alb-1 removed") && resp.message.contains("2 active connections"),
        "{}",
        resp.message
    );
    assert_status(
        t.module_info("alb-1").await,
        Code::NotFound,
        &["no instance alb-1"],
    );
    let r = t.route(Protocol::Http, 80, "", true).await;
    assert!(!r.routed);
    assert_eq!(
        r.error.as_ref().unwrap().code,
        pb::StatusCode::NotFound as i32,
        "its announced route left with it: {r:?}"
    );
    drop(guards);
}

#[tokio::test]
async fn unregister_checks_registration_id_and_instance() {
    let t = TestNlb::start().await;
    let reg = t
        .register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let mut c = t.client.clone();
    let r = c
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: "not-the-right-one".into(),
            graceful: false,
            drain_timeout_seconds: 0,
        })
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        &["registration id does not belong to instance alb-1"],
    );
    assert!(t.module_info("alb-1").await.is_ok(), "still registered");

    let r = c
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "ghost".into(),
            registration_id: reg.clone(),
            graceful: true,
            drain_timeout_seconds: 0,
        })
        .await;
    assert_status(r, Code::NotFound, &["no instance ghost"]);

    let r = c
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: String::new(),
            registration_id: reg.clone(),
            graceful: true,
            drain_timeout_seconds: 0,
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["instance_id: is empty"]);

    let r = c
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: reg,
            graceful: true,
            drain_timeout_seconds: -5,
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["drain_timeout_seconds", "-5"]);
}

// ===========================================================================
// Heartbeat
// ===========================================================================

#[tokio::test]
async fn heartbeat_renews_the_lease_and_stats_show_in_module_info() {
    let t = TestNlb::start().await;
    let reg = t
        .register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let stats = pb::ModuleStats {
        instance_id: "alb-1".into(),
        total_requests: 1234,
        successful_requests: 1200,
        failed_requests: 34,
        active_connections: 17,
        total_connections: 99,
        avg_latency_ms: 12.5,
        p99_latency_ms: 80.0,
        cpu_usage_percent: 42.0,
        memory_usage_mb: 256.0,
        custom_stats: [("queue_depth".to_string(), "4".to_string())].into(),
        ..Default::default()
    };
    let resp = t
        .client
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            instance_id: "alb-1".into(),
            registration_id: reg,
            status: HealthStatus::Healthy as i32,
            current_stats: Some(stats.clone()),
            timestamp: Some(shared_types::time::now()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.acknowledged, "{resp:?}");
    assert!(
        resp.message.contains("lease renewed for 6s"),
        "{}",
        resp.message
    );
    assert!(resp.server_time.is_some());
    assert!(!resp.should_reload && !resp.should_scale);
    assert!(resp.instructions.is_empty(), "{:?}", resp.instructions);

    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.stats.as_ref(), Some(&stats));
    assert_eq!(info.details["state"], "healthy");
    // Heartbeat stats are also kept as the instance's series.
    let m = t
        .client
        .clone()
        .get_module_metrics(pb::GetModuleMetricsRequest {
            instance_id: "alb-1".into(),
            metric_names: vec!["cpu_usage_percent".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let pts = &m.metrics.unwrap().metrics;
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert_eq!(pts[0].value, 42.0);
    assert_eq!(pts[0].labels["source"], "heartbeat");
}

#[tokio::test]
async fn heartbeat_from_unknown_registration_is_told_to_reregister() {
    let t = TestNlb::start().await;
    let reg = t
        .register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    for (id, reg_id) in [
        ("alb-1", "some-other-registration"),
        ("alb-9", reg.as_str()),
        ("alb-9", "nothing"),
    ] {
        let hb = t.heartbeat(id, reg_id).await;
        assert!(!hb.acknowledged, "{id}/{reg_id}: {hb:?}");
        assert_eq!(hb.instructions["action"], "reregister");
        assert!(hb.message.contains("register again"), "{}", hb.message);
    }
    let r = t
        .client
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            instance_id: String::new(),
            registration_id: reg,
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["instance_id: is empty"]);
}

#[tokio::test]
async fn heartbeat_during_a_drain_says_drain() {
    let t = TestNlb::start().await;
    let reg = t
        .register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    t.client
        .clone()
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: reg.clone(),
            graceful: true,
            drain_timeout_seconds: 300,
        })
        .await
        .unwrap();
    let hb = t.heartbeat("alb-1", &reg).await;
    assert!(hb.acknowledged);
    assert_eq!(hb.instructions["action"], "drain");
    let left: u64 = hb.instructions["drain_deadline_seconds"].parse().unwrap();
    assert!((200..=300).contains(&left), "{left}");
    // The heartbeat did not end the drain.
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(
        info.instance.unwrap().health_status,
        HealthStatus::Stopping as i32
    );
}

#[tokio::test]
async fn heartbeat_after_forced_rebalance_tells_the_overloaded_instance_to_shed() {
    let t = TestNlb::start().await;
    let web = || vec![route("web", Protocol::Http, 80)];
    let reg1 = t
        .register_simple("alb-1", ModuleType::Alb, "v1", web())
        .await;
    let reg2 = t
        .register_simple("alb-2", ModuleType::Alb, "v1", web())
        .await;
    let _guards = t.hold("alb-1", 10);
    let resp = t
        .client
        .clone()
        .rebalance_load(pb::RebalanceLoadRequest {
            force: true,
            target_instances: vec![],
            strategy: "least_connections".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success);
    assert!(
        resp.message.contains("told to shed: alb-1 sheds 5"),
        "{}",
        resp.message
    );
    let hb = t.heartbeat("alb-1", &reg1).await;
    assert!(hb.acknowledged);
    assert_eq!(hb.instructions["action"], "shed");
    assert_eq!(hb.instructions["shed_connections"], "5");
    // Told once.
    let hb = t.heartbeat("alb-1", &reg1).await;
    assert!(!hb.instructions.contains_key("action"), "{hb:?}");
    // The underloaded one is not told anything.
    let hb = t.heartbeat("alb-2", &reg2).await;
    assert!(hb.instructions.is_empty(), "{hb:?}");
}

#[tokio::test]
async fn heartbeat_after_routes_announced_for_the_instance_says_reload() {
    let t = TestNlb::start().await;
    let reg = t
        .register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let resp = t
        .client
        .clone()
        .update_routing(pb::UpdateRoutingRequest {
            routes: vec![route("web", Protocol::Http, 80)],
            replace_all: false,
            source_instance_id: "alb-1".into(),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.routes_updated, 1);
    let hb = t.heartbeat("alb-1", &reg).await;
    assert!(hb.acknowledged);
    assert!(hb.should_reload);
    assert_eq!(hb.instructions["action"], "reload");
    // The announced route is served by the instance.
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.routes.len(), 1);
    assert_eq!(info.routes[0].route_id, "web");
    let r = t.route(Protocol::Http, 80, "", true).await;
    assert_eq!(r.target_instance_id, "alb-1", "{r:?}");
    // An unknown source instance is NOT_FOUND.
    let r = t
        .client
        .clone()
        .update_routing(pb::UpdateRoutingRequest {
            routes: vec![route("web", Protocol::Http, 80)],
            source_instance_id: "ghost".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::NotFound, &["source_instance_id", "ghost"]);
}

#[tokio::test]
async fn lapsed_lease_makes_the_instance_unhealthy_and_a_heartbeat_restores_it() {
    let t = TestNlb::start().await;
    let mut req = register_req(
        instance(
            "alb-1",
            ModuleType::Alb,
            "127.0.0.1:1",
            Some("127.0.0.1:8081"),
        ),
        vec![route("web", Protocol::Http, 80)],
    );
    req.health_config = Some(pb::HealthCheckConfig {
        interval_seconds: 1,
        unhealthy_threshold: 1,
        ..Default::default()
    });
    let reg = t.register(req).await.registration_id;
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.details["lease_seconds"], "1");

    eventually("alb-1 unhealthy after its lease lapsed", SOON, || async {
        t.module_info("alb-1")
            .await
            .is_ok_and(|i| i.instance.unwrap().health_status == HealthStatus::Unhealthy as i32)
    })
    .await;
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.details["state"], "unhealthy");
    assert_eq!(info.details["reason"], "missed heartbeats");
    let r = t.route(Protocol::Http, 80, "", true).await;
    assert!(!r.routed);
    assert_eq!(
        r.error.as_ref().unwrap().code,
        pb::StatusCode::Unavailable as i32,
        "{r:?}"
    );

    // A heartbeat restores it. The lease is only 1 s, so on a very slow
    // machine it may lapse again between the heartbeat and the check: retry
    // the pair a few times rather than assume a timing.
    let mut restored = false;
    for _ in 0..5 {
        let hb = t.heartbeat("alb-1", &reg).await;
        assert!(hb.acknowledged, "{hb:?}");
        let r = t.route(Protocol::Http, 80, "", true).await;
        if r.routed {
            assert_eq!(r.target_instance_id, "alb-1");
            restored = true;
            break;
        }
    }
    assert!(restored, "a heartbeat made alb-1 routable again");
}

// ===========================================================================
// ListModules
// ===========================================================================

/// alb-1 (v1, zone a, max 100), alb-2 (v2, zone b, max 200),
/// dblb-1 (v1, zone a, max 50), ailb-1 (v3, max 10).
async fn four_modules(t: &TestNlb) -> HashMap<String, String> {
    let mut regs = HashMap::new();
    for (id, ty, version, zone, max) in [
        ("alb-1", ModuleType::Alb, "v1", Some("a"), 100),
        ("alb-2", ModuleType::Alb, "v2", Some("b"), 200),
        ("dblb-1", ModuleType::Dblb, "v1", Some("a"), 50),
        ("ailb-1", ModuleType::Ailb, "v3", None, 10),
    ] {
        let mut inst = instance(id, ty, "127.0.0.1:1", Some(&data_addr_for(id)));
        inst.version = version.into();
        inst.max_connections = max;
        if let Some(z) = zone {
            inst.metadata.insert("zone".into(), z.into());
        }
        let reg = t.register(register_req(inst, vec![])).await;
        regs.insert(id.to_string(), reg.registration_id);
    }
    regs
}

#[tokio::test]
async fn list_modules_filters_by_type_and_status() {
    let t = TestNlb::start().await;
    let regs = four_modules(&t).await;
    let r = t
        .list(pb::ListModulesRequest {
            module_type_filter: ModuleType::Alb as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r.modules), vec!["alb-1", "alb-2"]);
    assert_eq!(r.total_modules, 2);

    t.client
        .clone()
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-2".into(),
            registration_id: regs["alb-2"].clone(),
            graceful: true,
            drain_timeout_seconds: 300,
        })
        .await
        .unwrap();
    let r = t
        .list(pb::ListModulesRequest {
            status_filter: HealthStatus::Stopping as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r.modules), vec!["alb-2"]);
    let r = t
        .list(pb::ListModulesRequest {
            status_filter: HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r.modules), vec!["ailb-1", "alb-1", "dblb-1"]);
    let r = t
        .list(pb::ListModulesRequest {
            module_type_filter: ModuleType::Alb as i32,
            status_filter: HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r.modules), vec!["alb-1"]);
    let r = t
        .list(pb::ListModulesRequest {
            module_type_filter: 77,
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["module_type_filter", "77"]);
    let r = t
        .list(pb::ListModulesRequest {
            status_filter: 99,
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["status_filter", "99"]);
}

#[tokio::test]
async fn list_modules_query_filters_sort_and_pages() {
    let t = TestNlb::start().await;
    four_modules(&t).await;
    let q = |filters: Vec<pb::Filter>| pb::ListModulesRequest {
        query: Some(query(filters, "", false)),
        ..Default::default()
    };
    let cases: Vec<(Vec<pb::Filter>, Vec<&str>)> = vec![
        (vec![filter("version", "eq", "v1")], vec!["alb-1", "dblb-1"]),
        (vec![filter("version", "eq", "V1")], vec!["alb-1", "dblb-1"]),
        (
            vec![filter("module_type", "ne", "alb")],
            vec!["ailb-1", "dblb-1"],
        ),
        (
            vec![filter("max_connections", "gt", "60")],
            vec!["alb-1", "alb-2"],
        ),
        (
            vec![filter("max_connections", "lt", "60")],
            vec!["ailb-1", "dblb-1"],
        ),
        (
            vec![filter("instance_id", "in", "alb-2, ailb-1,nope")],
            vec!["ailb-1", "alb-2"],
        ),
        (
            vec![filter("instance_id", "contains", "LB-1")],
            vec!["ailb-1", "alb-1", "dblb-1"],
        ),
        (
            vec![filter("metadata.zone", "eq", "a")],
            vec!["alb-1", "dblb-1"],
        ),
        (
            vec![filter("metadata.zone", "ne", "a")],
            vec!["ailb-1", "alb-2"],
        ),
        (
            vec![
                filter("metadata.zone", "eq", "a"),
                filter("module_type", "eq", "dblb"),
            ],
            vec!["dblb-1"],
        ),
        (
            vec![filter("health_status", "eq", "healthy")],
            vec!["ailb-1", "alb-1", "alb-2", "dblb-1"],
        ),
        (vec![filter("version", "eq", "v9")], vec![]),
    ];
    for (filters, want) in cases {
        let label = format!("{filters:?}");
        let r = t.list(q(filters)).await.unwrap();
        assert_eq!(ids(&r.modules), want, "{label}");
        assert_eq!(r.total_modules as usize, want.len(), "{label}");
    }

    // sort_by + sort_desc
    let r = t
        .list(pb::ListModulesRequest {
            query: Some(query(vec![], "max_connections", true)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r.modules), vec!["alb-2", "alb-1", "dblb-1", "ailb-1"]);
    let r = t
        .list(pb::ListModulesRequest {
            query: Some(query(vec![], "max_connections", false)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r.modules), vec!["ailb-1", "dblb-1", "alb-1", "alb-2"]);

    // Pagination: 1-based pages.
    let page = |p: i32, size: i32| pb::ListModulesRequest {
        query: Some(paged(query(vec![], "instance_id", false), p, size)),
        ..Default::default()
    };
    let r = t.list(page(1, 3)).await.unwrap();
    assert_eq!(ids(&r.modules), vec!["ailb-1", "alb-1", "alb-2"]);
    let p = r.pagination.unwrap();
    assert_eq!(
        (p.page, p.page_size, p.total_items, p.total_pages),
        (1, 3, 4, 2)
    );
    assert_eq!(r.total_modules, 4);
    let r = t.list(page(2, 3)).await.unwrap();
    assert_eq!(ids(&r.modules), vec!["dblb-1"]);
    let p = r.pagination.unwrap();
    assert_eq!(
        (p.page, p.page_size, p.total_items, p.total_pages),
        (2, 3, 4, 2)
    );
    let r = t.list(page(3, 3)).await.unwrap();
    assert!(r.modules.is_empty());
    // page_size 0 = 50, page 0 = the first.
    let r = t.list(page(0, 0)).await.unwrap();
    assert_eq!(r.modules.len(), 4);
    let p = r.pagination.unwrap();
    assert_eq!(
        (p.page, p.page_size, p.total_items, p.total_pages),
        (1, 50, 4, 1)
    );
    // Filtered totals count after filtering.
    let r = t
        .list(pb::ListModulesRequest {
            query: Some(paged(
                query(vec![filter("module_type", "eq", "alb")], "", false),
                1,
                1,
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&r.modules), vec!["alb-1"]);
    let p = r.pagination.unwrap();
    assert_eq!((p.total_items, p.total_pages), (2, 2));
}

#[tokio::test]
async fn list_modules_refuses_unknown_fields_and_operators_naming_them() {
    let t = TestNlb::start().await;
    four_modules(&t).await;
    let req = |filters: Vec<pb::Filter>, sort: &str| pb::ListModulesRequest {
        query: Some(query(filters, sort, false)),
        ..Default::default()
    };
    assert_status(
        t.list(req(vec![filter("colour", "eq", "red")], "")).await,
        Code::InvalidArgument,
        &["unknown field \"colour\"", "instance_id"],
    );
    assert_status(
        t.list(req(vec![filter("version", "like", "v%")], "")).await,
        Code::InvalidArgument,
        &["unknown operator \"like\"", "\"version\""],
    );
    assert_status(
        t.list(req(vec![], "shoe_size")).await,
        Code::InvalidArgument,
        &["query.sort_by", "\"shoe_size\""],
    );
    assert_status(
        t.list(req(vec![filter("metadata.", "eq", "x")], "")).await,
        Code::InvalidArgument,
        &["unknown field \"metadata.\""],
    );
    assert_status(
        t.list(pb::ListModulesRequest {
            query: Some(paged(query(vec![], "", false), -1, 10)),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["query.pagination"],
    );
}

// ===========================================================================
// GetModuleInfo
// ===========================================================================

#[tokio::test]
async fn module_info_shows_health_connections_weight_routes_stats_and_deployment() {
    let t = TestNlb::start_with("traffic_weights: {alb: {v1: 80, v2: 20}}").await;
    let mut r = route("api", Protocol::Https, 443);
    r.destination_pattern = "api.example.com".into();
    r.priority = 5;
    r.metadata.insert("owner".into(), "team-a".into());
    let mut inst = instance(
        "alb-1",
        ModuleType::Alb,
        "127.0.0.1:5001",
        Some("127.0.0.1:8081"),
    );
    inst.max_connections = 500;
    let mut req = register_req(inst, vec![r.clone()]);
    req.capabilities
        .insert("proxy_protocol".into(), "v2".into());
    req.capabilities.insert("tls".into(), "terminate".into());
    let reg = t.register(req).await.registration_id;
    t.register_simple("alb-2", ModuleType::Alb, "v2", vec![])
        .await;
    let stats = pb::ModuleStats {
        instance_id: "alb-1".into(),
        total_requests: 10,
        cpu_usage_percent: 5.0,
        ..Default::default()
    };
    t.client
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            instance_id: "alb-1".into(),
            registration_id: reg,
            status: HealthStatus::Healthy as i32,
            current_stats: Some(stats.clone()),
            timestamp: None,
        })
        .await
        .unwrap();
    let _g = t.hold("alb-1", 2);

    let info = t.module_info("alb-1").await.unwrap();
    let i = info.instance.as_ref().unwrap();
    assert_eq!(i.instance_id, "alb-1");
    assert_eq!(i.health_status, HealthStatus::Healthy as i32);
    assert_eq!(i.current_connections, 2);
    assert_eq!(i.max_connections, 500);
    assert_eq!(i.traffic_weight, 80, "the weight of its version v1");
    assert_eq!(info.routes, vec![r]);
    assert_eq!(info.stats, Some(stats));
    let d = info.deployment_config.as_ref().unwrap();
    assert_eq!(
        (
            d.blue_version.as_str(),
            d.blue_weight,
            d.green_version.as_str(),
            d.green_weight
        ),
        ("v1", 80, "v2", 20)
    );
    assert_eq!(d.active_version, "v1");
    assert!(d.canary_enabled);
    assert_eq!(d.canary_percent, 20);
    assert_eq!(info.details["state"], "healthy");
    assert_eq!(info.details["takes_traffic"], "true");
    assert_eq!(info.details["data_address"], "127.0.0.1:8081");
    assert_eq!(info.details["proxy_protocol"], "v2");
    assert_eq!(info.details["capability.tls"], "terminate");
    assert_eq!(info.details["heartbeat_interval_seconds"], "2");
    assert_eq!(info.details["lease_seconds"], "6");

    let info2 = t.module_info("alb-2").await.unwrap();
    assert_eq!(info2.instance.unwrap().traffic_weight, 20);

    assert_status(
        t.module_info("nope").await,
        Code::NotFound,
        &["no instance nope is registered"],
    );
    assert_status(
        t.module_info("").await,
        Code::InvalidArgument,
        &["instance_id"],
    );
}

// ===========================================================================
// UpdateRouting
// ===========================================================================

const POOLS: &str = "backends:\n  pool-a: [\"127.0.0.1:9101\"]\n  pool-b: [\"127.0.0.1:9102\"]\n  pool-c: [\"127.0.0.1:9103\"]\n  pool-d: [\"127.0.0.1:9104\", \"127.0.0.1:9105\"]\n";

async fn update_routing(
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

async fn routes_section(t: &TestNlb) -> String {
    let c = t
        .client
        .clone()
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: "routes".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.configs.len(), 1);
    String::from_utf8(c.configs[0].config_data.clone()).unwrap()
}

fn route_ids_in_yaml(yaml: &str) -> Vec<String> {
    let v: Vec<BTreeMap<String, serde_yaml_ng::Value>> =
        serde_yaml_ng::from_str(yaml).unwrap_or_default();
    v.iter()
        .map(|r| r["route_id"].as_str().unwrap().to_string())
        .collect()
}

fn state_file_route_ids(t: &TestNlb) -> Vec<String> {
    let text = std::fs::read_to_string(&t.state_file).expect("state file written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("state file is JSON");
    v["sections"]["routes"]
        .as_array()
        .expect("routes persisted")
        .iter()
        .map(|r| r["route_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn operator_routes_apply_serve_and_persist() {
    let t = TestNlb::start_with(POOLS).await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    t.register_simple("alb-2", ModuleType::Alb, "v1", vec![])
        .await;
    let resp = update_routing(
        &t,
        vec![
            type_route("web", Protocol::Http, 80, "alb"),
            backend_route("db", Protocol::Postgres, 5432, "pool-a"),
        ],
        false,
        false,
    )
    .await
    .unwrap();
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.routes_updated, 2);
    assert!(resp.validation_errors.is_empty());
    assert!(
        resp.message.contains("2 routes applied"),
        "{}",
        resp.message
    );

    let r = t.route(Protocol::Http, 80, "", true).await;
    assert!(r.routed, "{r:?}");
    assert!(["alb-1", "alb-2"].contains(&r.target_instance_id.as_str()));
    assert_eq!(r.target_module_type, ModuleType::Alb as i32);
    let r = t.route(Protocol::Postgres, 5432, "", true).await;
    assert!(r.routed, "{r:?}");
    assert_eq!(r.target_instance_id, "pool-a/127.0.0.1:9101");
    assert_eq!(r.target_address, "127.0.0.1:9101");

    let table = t
        .client
        .clone()
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .unwrap()
        .into_inner();
    let entries: Vec<(&str, &str)> = table
        .entries
        .iter()
        .map(|e| {
            (
                e.route.as_ref().unwrap().route_id.as_str(),
                e.target_instance_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            ("db", "pool-a/127.0.0.1:9101"),
            ("web", "alb-1"),
            ("web", "alb-2")
        ]
    );

    // Persisted: shown in GetNLBConfig and written to the state file.
    assert_eq!(
        route_ids_in_yaml(&routes_section(&t).await),
        vec!["web", "db"]
    );
    assert_eq!(state_file_route_ids(&t), vec!["web", "db"]);
    let text = std::fs::read_to_string(&t.state_file).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["sections"]["routes"][1]["metadata"]["backend"], "pool-a");
    assert_eq!(v["sections"]["routes"][0]["protocol"], "http");
    assert_eq!(v["sections"]["routes"][0]["destination_port"], 80);

    // The persisted routes come back after a restart.
    let reloaded = nlb::config::ConfigStore::load(Some(t.config_file.clone()), Box::new(|_| None))
        .expect("config reloads");
    let ids: Vec<String> = reloaded
        .current()
        .routes
        .iter()
        .map(|r| r.route_id.clone())
        .collect();
    assert_eq!(ids, vec!["web", "db"]);
}

#[tokio::test]
async fn update_routing_upserts_by_route_id_and_replace_all_replaces() {
    let t = TestNlb::start_with(POOLS).await;
    update_routing(
        &t,
        vec![
            backend_route("a", Protocol::Http, 80, "pool-a"),
            backend_route("b", Protocol::Http, 81, "pool-b"),
        ],
        false,
        false,
    )
    .await
    .unwrap();
    // Upsert: "b" changes, "c" is added, "a" stays.
    let resp = update_routing(
        &t,
        vec![
            backend_route("b", Protocol::Http, 81, "pool-c"),
            backend_route("c", Protocol::Http, 82, "pool-a"),
        ],
        false,
        false,
    )
    .await
    .unwrap();
    assert!(
        resp.message.contains("3 operator routes in force"),
        "{}",
        resp.message
    );
    assert_eq!(
        route_ids_in_yaml(&routes_section(&t).await),
        vec!["a", "b", "c"]
    );
    let r = t.route(Protocol::Http, 81, "", true).await;
    assert_eq!(r.target_instance_id, "pool-c/127.0.0.1:9103", "{r:?}");
    let r = t.route(Protocol::Http, 80, "", true).await;
    assert_eq!(r.target_instance_id, "pool-a/127.0.0.1:9101", "{r:?}");

    // replace_all: only the given routes remain.
    let resp = update_routing(
        &t,
        vec![backend_route("z", Protocol::Http, 90, "pool-b")],
        true,
        false,
    )
    .await
    .unwrap();
    assert!(resp.success);
    assert_eq!(route_ids_in_yaml(&routes_section(&t).await), vec!["z"]);
    assert_eq!(state_file_route_ids(&t), vec!["z"]);
    let r = t.route(Protocol::Http, 80, "", true).await;
    assert!(!r.routed, "route a is gone: {r:?}");
    let r = t.route(Protocol::Http, 90, "", true).await;
    assert_eq!(r.target_instance_id, "pool-b/127.0.0.1:9102");

    // replace_all with nothing clears the operator routes.
    update_routing(&t, vec![], true, false).await.unwrap();
    assert!(route_ids_in_yaml(&routes_section(&t).await).is_empty());
}

#[tokio::test]
async fn update_routing_validate_only_reports_errors_and_changes_nothing() {
    let t = TestNlb::start_with(POOLS).await;
    update_routing(
        &t,
        vec![backend_route("keep", Protocol::Http, 80, "pool-a")],
        false,
        false,
    )
    .await
    .unwrap();
    let before_state = std::fs::read_to_string(&t.state_file).unwrap();
    let generation = t.nlb.registry.generation();

    let mut bad_cidr = backend_route("cidr", Protocol::Http, 80, "pool-a");
    bad_cidr.source_pattern = "300.0.0.0/8".into();
    let bad = vec![
        backend_route("big", Protocol::Http, 70000, "pool-a"),
        bad_cidr,
        route("untargeted", Protocol::Http, 80),
        type_route("udp", Protocol::Udp, 53, "alb"),
        type_route("badtype", Protocol::Http, 80, "nginx"),
    ];
    let resp = update_routing(&t, bad.clone(), false, true).await.unwrap();
    assert!(!resp.success);
    assert_eq!(resp.routes_updated, 0);
    let errs = resp.validation_errors.join("\n");
    for (id, field) in [
        ("big", "destination_port"),
        ("cidr", "source_pattern"),
        ("untargeted", "metadata"),
        ("udp", "protocol"),
        ("badtype", "metadata"),
    ] {
        assert!(
            resp.validation_errors
                .iter()
                .any(|e| e.contains(&format!("route {id:?}")) && e.contains(field)),
            "no error names route {id} and field {field}: {errs}"
        );
    }
    assert_eq!(
        resp.error.as_ref().unwrap().code,
        pb::StatusCode::InvalidArgument as i32
    );

    // A missing pool is caught by validation too.
    let resp = update_routing(
        &t,
        vec![backend_route("nopool", Protocol::Http, 80, "pool-zzz")],
        false,
        true,
    )
    .await
    .unwrap();
    assert!(!resp.success);
    assert!(
        resp.validation_errors
            .iter()
            .any(|e| e.contains("pool-zzz") && e.contains("metadata.backend")),
        "{:?}",
        resp.validation_errors
    );

    // Valid routes with validate_only: success, nothing applied.
    let resp = update_routing(
        &t,
        vec![backend_route("new", Protocol::Http, 99, "pool-b")],
        true,
        true,
    )
    .await
    .unwrap();
    assert!(resp.success, "{resp:?}");
    assert!(resp.message.contains("are valid"), "{}", resp.message);

    assert_eq!(route_ids_in_yaml(&routes_section(&t).await), vec!["keep"]);
    assert_eq!(
        std::fs::read_to_string(&t.state_file).unwrap(),
        before_state
    );
    assert_eq!(t.nlb.registry.generation(), generation, "no rebuild");
    let r = t.route(Protocol::Http, 99, "", true).await;
    assert!(!r.routed);

    // Without validate_only: INVALID_ARGUMENT naming route and field.
    let r = update_routing(&t, bad, false, false).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &[
            "route \"big\"",
            "destination_port",
            "route \"udp\"",
            "protocol",
        ],
    );
    let r = update_routing(
        &t,
        vec![
            backend_route("dup", Protocol::Http, 80, "pool-a"),
            backend_route("dup", Protocol::Http, 81, "pool-a"),
        ],
        false,
        false,
    )
    .await;
    assert_status(r, Code::InvalidArgument, &["route \"dup\"", "given twice"]);
    assert_eq!(route_ids_in_yaml(&routes_section(&t).await), vec!["keep"]);
    assert_eq!(
        std::fs::read_to_string(&t.state_file).unwrap(),
        before_state
    );
}

// ===========================================================================
// GetRoutingTable
// ===========================================================================

#[tokio::test]
async fn routing_table_has_one_entry_per_route_and_serving_instance() {
    let t = TestNlb::start().await;
    let web = || {
        let mut r = route("web", Protocol::Https, 443);
        r.destination_pattern = "*.example.com".into();
        vec![r]
    };
    for id in ["alb-1", "alb-2", "alb-3"] {
        t.register_simple(id, ModuleType::Alb, "v1", web()).await;
    }
    let mut pg = route("pg", Protocol::Postgres, 5432);
    pg.destination_pattern = "db.internal".into();
    t.register_simple("dblb-1", ModuleType::Dblb, "v1", vec![pg])
        .await;
    let _g = t.hold("alb-2", 2);
    let _g3 = t.hold("alb-3", 1);

    let get = |req: pb::GetRoutingTableRequest| {
        let mut c = t.client.clone();
        async move {
            c.get_routing_table(req)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let all = get(pb::GetRoutingTableRequest::default()).await.unwrap();
    assert_eq!(all.total_entries, 4);
    // One route "web", three entries with each instance's connections.
    let web_entries: Vec<(&str, i32)> = all
        .entries
        .iter()
        .filter(|e| e.route.as_ref().unwrap().route_id == "web")
        .map(|e| (e.target_instance_id.as_str(), e.current_connections))
        .collect();
    assert_eq!(web_entries, vec![("alb-1", 0), ("alb-2", 2), ("alb-3", 1)]);
    for e in &all.entries {
        assert!(e.created_at.is_some());
        if e.route.as_ref().unwrap().route_id == "web" {
            assert_eq!(e.target_module_type, ModuleType::Alb as i32);
            assert_eq!(
                e.route.as_ref().unwrap().destination_pattern,
                "*.example.com"
            );
        }
    }
    let snapshot = t.nlb.registry.router().load();
    assert_eq!(snapshot.routes().count(), 2, "one merged web route, one pg");

    // protocol_filter
    let r = get(pb::GetRoutingTableRequest {
        protocol_filter: Protocol::Postgres as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(r.entries.len(), 1);
    assert_eq!(r.entries[0].target_instance_id, "dblb-1");
    assert_eq!(r.entries[0].target_module_type, ModuleType::Dblb as i32);

    // destination_filter: a name the route's pattern matches, or the pattern.
    for dest in ["api.example.com", "*.example.com", "API.Example.com."] {
        let r = get(pb::GetRoutingTableRequest {
            destination_filter: dest.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let got: Vec<&str> = r
            .entries
            .iter()
            .map(|e| e.target_instance_id.as_str())
            .collect();
        assert_eq!(got, vec!["alb-1", "alb-2", "alb-3"], "{dest}");
    }
    let r = get(pb::GetRoutingTableRequest {
        destination_filter: "example.com".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(r.entries.is_empty(), "the wildcard does not match the apex");

    // Query filters and pagination.
    let r = get(pb::GetRoutingTableRequest {
        query: Some(query(
            vec![filter("current_connections", "gt", "0")],
            "current_connections",
            true,
        )),
        ..Default::default()
    })
    .await
    .unwrap();
    let got: Vec<&str> = r
        .entries
        .iter()
        .map(|e| e.target_instance_id.as_str())
        .collect();
    assert_eq!(got, vec!["alb-2", "alb-3"]);
    let r = get(pb::GetRoutingTableRequest {
        query: Some(query(
            vec![filter("target_module_type", "eq", "dblb")],
            "",
            false,
        )),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(r.entries.len(), 1);
    let r = get(pb::GetRoutingTableRequest {
        query: Some(paged(query(vec![], "target_instance_id", false), 2, 3)),
        ..Default::default()
    })
    .await
    .unwrap();
    let got: Vec<&str> = r
        .entries
        .iter()
        .map(|e| e.target_instance_id.as_str())
        .collect();
    assert_eq!(got, vec!["dblb-1"]);
    let p = r.pagination.unwrap();
    assert_eq!(
        (p.page, p.page_size, p.total_items, p.total_pages),
        (2, 3, 4, 2)
    );
    assert_eq!(r.total_entries, 4);
    assert_status(
        get(pb::GetRoutingTableRequest {
            query: Some(query(vec![filter("colour", "eq", "x")], "", false)),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["unknown field \"colour\""],
    );
    assert_status(
        get(pb::GetRoutingTableRequest {
            protocol_filter: 99,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["protocol_filter", "99"],
    );
}

#[tokio::test]
async fn routing_table_lists_a_route_with_no_servers() {
    let t = TestNlb::start().await;
    update_routing(
        &t,
        vec![type_route("video", Protocol::Rtmp, 1935, "rtmp")],
        false,
        false,
    )
    .await
    .unwrap();
    let table = t
        .client
        .clone()
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(table.entries.len(), 1);
    let e = &table.entries[0];
    assert_eq!(e.route.as_ref().unwrap().route_id, "video");
    assert_eq!(e.target_instance_id, "");
    assert_eq!(e.current_connections, 0);
}

// ===========================================================================
// RouteRequest
// ===========================================================================

#[tokio::test]
async fn route_request_follows_matching_and_precedence() {
    let t = TestNlb::start_with(POOLS).await;
    let mut wild = backend_route("wild", Protocol::Https, 0, "pool-a");
    wild.destination_pattern = "*.example.com".into();
    wild.priority = 5;
    let mut exact = backend_route("exact", Protocol::Https, 0, "pool-b");
    exact.destination_pattern = "api.example.com".into();
    exact.priority = 5;
    let mut prio = backend_route("prio", Protocol::Https, 8443, "pool-c");
    prio.priority = 9;
    let fallback = backend_route("fallback", Protocol::Tcp, 443, "pool-d");
    let mut internal = backend_route("internal", Protocol::Http, 80, "pool-c");
    internal.source_pattern = "10.0.0.0/8".into();
    update_routing(
        &t,
        vec![wild, exact, prio, fallback, internal],
        false,
        false,
    )
    .await
    .unwrap();

    let ask = |protocol: Protocol, port: i32, name: &str, client: Option<&str>| {
        let mut c = t.client.clone();
        let mut context = HashMap::new();
        if let Some(ip) = client {
            context.insert("client_ip".to_string(), ip.to_string());
        }
        let req = pb::RouteRequestRequest {
            route: Some(pb::Route {
                protocol: protocol as i32,
                destination_port: port,
                destination_pattern: name.into(),
                ..Default::default()
            }),
            context,
            dry_run: true,
        };
        async move { c.route_request(req).await.unwrap().into_inner() }
    };
    // Exact name over wildcard at equal priority.
    let r = ask(Protocol::Https, 443, "api.example.com", None).await;
    assert!(r.routed, "{r:?}");
    assert_eq!(r.target_instance_id, "pool-b/127.0.0.1:9102");
    assert_eq!(r.priority, 5);
    assert!(r.message.contains("\"exact\""), "{}", r.message);
    // Case and trailing dot do not matter.
    let r = ask(Protocol::Https, 443, "API.Example.COM.", None).await;
    assert_eq!(r.target_instance_id, "pool-b/127.0.0.1:9102");
    // Wildcard for other names.
    let r = ask(Protocol::Https, 443, "www.example.com", None).await;
    assert_eq!(r.target_instance_id, "pool-a/127.0.0.1:9101");
    assert!(r.message.contains("\"wild\""), "{}", r.message);
    // Higher priority wins over a more specific name.
    let r = ask(Protocol::Https, 8443, "api.example.com", None).await;
    assert_eq!(r.target_instance_id, "pool-c/127.0.0.1:9103");
    assert_eq!(r.priority, 9);
    // HTTP/1 does not match HTTPS routes: the TCP fallback on 443 takes it.
    let r = ask(Protocol::Http, 443, "api.example.com", None).await;
    assert!(r.routed);
    assert!(r.target_instance_id.starts_with("pool-d/"), "{r:?}");
    // The wildcard does not match the apex; on 443 the fallback takes it.
    let r = ask(Protocol::Https, 443, "example.com", None).await;
    assert!(r.target_instance_id.starts_with("pool-d/"), "{r:?}");
    // Client CIDR.
    let r = ask(Protocol::Http, 80, "", Some("10.1.2.3")).await;
    assert_eq!(r.target_instance_id, "pool-c/127.0.0.1:9103", "{r:?}");
    let r = ask(Protocol::Http, 80, "", Some("192.168.1.1")).await;
    assert!(!r.routed);
    let e = r.error.unwrap();
    assert_eq!(e.code, pb::StatusCode::NotFound as i32);
    assert!(e.message.contains("no route matches"), "{}", e.message);
    // Nothing on port 80 without a client address.
    let r = ask(Protocol::Http, 80, "", None).await;
    assert!(!r.routed);
    assert_eq!(r.error.unwrap().code, pb::StatusCode::NotFound as i32);
}

#[tokio::test]
async fn route_request_dry_run_counts_nothing_a_real_one_counts() {
    let t = TestNlb::start().await;
    t.register_simple(
        "alb-1",
        ModuleType::Alb,
        "v1",
        vec![route("web", Protocol::Http, 80)],
    )
    .await;
    for _ in 0..3 {
        let r = t.route(Protocol::Http, 80, "", true).await;
        assert!(r.routed);
        assert_eq!(r.target_instance_id, "alb-1");
        assert_eq!(r.target_module_type, ModuleType::Alb as i32);
        assert_eq!(r.target_address, data_addr_for("alb-1"));
        assert!(r.message.contains("dry run"), "{}", r.message);
    }
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.details["total_routed"], "0");
    assert_eq!(t.status().await.total_requests, 0);
    let table = t
        .client
        .clone()
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        table.entries[0].last_used.is_none(),
        "{:?}",
        table.entries[0]
    );

    for _ in 0..2 {
        let r = t.route(Protocol::Http, 80, "", false).await;
        assert!(r.routed);
        assert!(!r.message.contains("dry run"), "{}", r.message);
    }
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.details["total_routed"], "2");
    assert_eq!(t.status().await.total_requests, 2);
    let table = t
        .client
        .clone()
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(table.entries[0].last_used.is_some());
}

#[tokio::test]
async fn route_request_without_route_or_server_says_why() {
    let t = TestNlb::start().await;
    let r = t.route(Protocol::Http, 80, "www.example.com", false).await;
    assert!(!r.routed);
    assert_eq!(r.target_instance_id, "");
    let e = r.error.unwrap();
    assert_eq!(e.code, pb::StatusCode::NotFound as i32);
    assert!(
        e.message.contains("no route matches") && e.message.contains("www.example.com:80"),
        "{}",
        e.message
    );

    // A route whose only type has no instance.
    update_routing(
        &t,
        vec![type_route("video", Protocol::Rtmp, 1935, "rtmp")],
        false,
        false,
    )
    .await
    .unwrap();
    let r = t.route(Protocol::Rtmp, 1935, "", false).await;
    assert!(!r.routed);
    let e = r.error.unwrap();
    assert_eq!(e.code, pb::StatusCode::Unavailable as i32);
    assert!(
        e.message.contains("\"video\"") && e.message.contains("has no servers"),
        "{}",
        e.message
    );

    // A route whose only server is draining.
    let reg = t
        .register_simple(
            "alb-1",
            ModuleType::Alb,
            "v1",
            vec![route("web", Protocol::Http, 80)],
        )
        .await;
    t.client
        .clone()
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: reg,
            graceful: true,
            drain_timeout_seconds: 300,
        })
        .await
        .unwrap();
    let r = t.route(Protocol::Http, 80, "", false).await;
    assert!(!r.routed);
    let e = r.error.unwrap();
    assert_eq!(e.code, pb::StatusCode::Unavailable as i32);
    assert!(
        e.message.contains("\"web\"") && e.message.contains("none of its 1 servers"),
        "{}",
        e.message
    );
    assert_eq!(
        t.status().await.total_requests,
        0,
        "failures are not routed"
    );
}

#[tokio::test]
async fn route_request_refuses_bad_input() {
    let t = TestNlb::start().await;
    let mut c = t.client.clone();
    let req = |r: pb::Route, ctx: &[(&str, &str)]| pb::RouteRequestRequest {
        route: Some(r),
        context: ctx
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        dry_run: true,
    };
    assert_status(
        c.route_request(req(route("", Protocol::Http, 70000), &[]))
            .await,
        Code::InvalidArgument,
        &["route.destination_port", "70000"],
    );
    assert_status(
        c.route_request(req(route("", Protocol::Http, -1), &[]))
            .await,
        Code::InvalidArgument,
        &["route.destination_port", "-1"],
    );
    assert_status(
        c.route_request(req(
            route("", Protocol::Http, 80),
            &[("client_ip", "not-an-ip")],
        ))
        .await,
        Code::InvalidArgument,
        &["\"not-an-ip\"", "is not a client IP address"],
    );
    assert_status(
        c.route_request(req(
            pb::Route {
                source_pattern: "999.1.1.1".into(),
                ..route("", Protocol::Http, 80)
            },
            &[],
        ))
        .await,
        Code::InvalidArgument,
        &["route.source_pattern", "\"999.1.1.1\""],
    );
    assert_status(
        c.route_request(req(route("", Protocol::Unspecified, 80), &[]))
            .await,
        Code::InvalidArgument,
        &["route.protocol"],
    );
    assert_status(
        c.route_request(req(route("", Protocol::Udp, 53), &[]))
            .await,
        Code::InvalidArgument,
        &["route.protocol", "udp"],
    );
    assert_status(
        c.route_request(req(
            pb::Route {
                destination_pattern: "*.example.com".into(),
                ..route("", Protocol::Https, 443)
            },
            &[],
        ))
        .await,
        Code::InvalidArgument,
        &["route.destination_pattern", "is a pattern"],
    );
    assert_status(
        c.route_request(pb::RouteRequestRequest::default()).await,
        Code::InvalidArgument,
        &["route: is required"],
    );
    // A client given as ip:port is accepted.
    let r = c
        .route_request(req(
            route("", Protocol::Http, 80),
            &[("client_address", "10.0.0.1:5555")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.routed, "no route, but a valid request");
}

#[tokio::test]
async fn route_request_follows_version_weights() {
    let t = TestNlb::start_with("traffic_weights: {alb: {v1: 100}}").await;
    let web = || vec![route("web", Protocol::Http, 80)];
    for (id, v) in [
        ("alb-a", "v1"),
        ("alb-b", "v1"),
        ("alb-c", "v2"),
        ("alb-d", "v2"),
    ] {
        t.register_simple(id, ModuleType::Alb, v, web()).await;
    }
    let mut seen = HashSet::new();
    for _ in 0..60 {
        let r = t.route(Protocol::Http, 80, "", false).await;
        assert!(r.routed);
        assert!(
            r.message.contains("(version v1)"),
            "every request goes to v1: {}",
            r.message
        );
        seen.insert(r.target_instance_id);
    }
    let want: HashSet<String> = ["alb-a".to_string(), "alb-b".to_string()].into();
    assert_eq!(seen, want, "both v1 instances, no v2 instance");
    for id in ["alb-c", "alb-d"] {
        assert_eq!(
            t.module_info(id).await.unwrap().details["total_routed"],
            "0"
        );
        assert_eq!(
            t.module_info(id)
                .await
                .unwrap()
                .instance
                .unwrap()
                .traffic_weight,
            0
        );
    }
    assert_eq!(
        t.module_info("alb-a")
            .await
            .unwrap()
            .instance
            .unwrap()
            .traffic_weight,
        100
    );
}

// ===========================================================================
// ValidateRoute
// ===========================================================================

#[tokio::test]
async fn validate_route_asks_candidates_and_reports_capable_ones() {
    let t = TestNlb::start_with("routing: {validate_timeout_ms: 200}").await;
    let yes = FakeModule::start().await;
    yes.set_can_handle(true, "serves http", Duration::ZERO);
    let no = FakeModule::start().await;
    no.set_can_handle(false, "no tls certs", Duration::ZERO);
    let slow = FakeModule::start().await;
    slow.set_can_handle(true, "too late", Duration::from_secs(3));
    let db = FakeModule::start().await;
    for (id, ty, fake) in [
        ("alb-yes", ModuleType::Alb, &yes),
        ("alb-no", ModuleType::Alb, &no),
        ("ailb-slow", ModuleType::Ailb, &slow),
        ("dblb-1", ModuleType::Dblb, &db),
    ] {
        t.register(register_req(
            instance(id, ty, &fake.address(), Some(&data_addr_for(id))),
            vec![],
        ))
        .await;
    }
    let mut r = route("api", Protocol::Https, 443);
    r.destination_pattern = "api.example.com".into();
    let started = Instant::now();
    let resp = t
        .client
        .clone()
        .validate_route(pb::ValidateRouteRequest {
            route: Some(r.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the slow module did not hold the call: {:?}",
        started.elapsed()
    );
    assert!(resp.valid, "{resp:?}");
    assert!(resp.validation_errors.is_empty());
    assert!(resp.has_handler);
    assert_eq!(resp.capable_instances, vec!["alb-yes"]);
    assert_eq!(resp.details["candidates"], "3", "{:?}", resp.details);
    assert!(
        resp.details["instance.alb-yes"].contains("can handle (priority 7) serves http"),
        "{:?}",
        resp.details
    );
    assert_eq!(
        resp.details["instance.alb-no"],
        "cannot handle: no tls certs"
    );
    assert!(
        resp.details["instance.ailb-slow"].contains("did not answer within 200 ms"),
        "{:?}",
        resp.details
    );
    assert!(!resp.details.contains_key("instance.dblb-1"));
    assert_eq!(yes.can_handle_calls(), 1);
    assert_eq!(no.can_handle_calls(), 1);
    assert_eq!(slow.can_handle_calls(), 1);
    assert_eq!(db.can_handle_calls(), 0, "a dblb is not asked about HTTPS");
    assert_eq!(yes.last_can_handle().unwrap().route, Some(r));

    // Naming a module type asks only that type.
    let resp = t
        .client
        .clone()
        .validate_route(pb::ValidateRouteRequest {
            route: Some(type_route("pg", Protocol::Postgres, 5432, "dblb")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.valid);
    assert_eq!(resp.capable_instances, vec!["dblb-1"]);
    assert_eq!(db.can_handle_calls(), 1);
    assert_eq!(yes.can_handle_calls(), 1);
}

#[tokio::test]
async fn validate_route_refuses_an_invalid_route_without_asking() {
    let t = TestNlb::start_with(POOLS).await;
    let fake = FakeModule::start().await;
    t.register(register_req(
        instance("alb-1", ModuleType::Alb, &fake.address(), None),
        vec![],
    ))
    .await;
    let mut bad = route("bad", Protocol::Http, 70000);
    bad.source_pattern = "10.0.0.0/99".into();
    let resp = t
        .client
        .clone()
        .validate_route(pb::ValidateRouteRequest { route: Some(bad) })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.valid);
    assert!(!resp.has_handler);
    assert!(resp.capable_instances.is_empty());
    let errs = resp.validation_errors.join("\n");
    assert!(
        errs.contains("route \"bad\": destination_port") && errs.contains("source_pattern"),
        "{errs}"
    );
    assert_eq!(fake.can_handle_calls(), 0);

    // A backend route: the pool's addresses are its handlers; a missing pool is an error.
    let resp = t
        .client
        .clone()
        .validate_route(pb::ValidateRouteRequest {
            route: Some(backend_route("b", Protocol::Tcp, 9000, "pool-d")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.valid);
    assert_eq!(
        resp.capable_instances,
        vec!["pool-d/127.0.0.1:9104", "pool-d/127.0.0.1:9105"]
    );
    let resp = t
        .client
        .clone()
        .validate_route(pb::ValidateRouteRequest {
            route: Some(backend_route("b", Protocol::Tcp, 9000, "pool-x")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.valid);
    assert!(
        resp.validation_errors[0].contains("no backend pool named \"pool-x\""),
        "{:?}",
        resp.validation_errors
    );
    assert_status(
        t.client
            .clone()
            .validate_route(pb::ValidateRouteRequest { route: None })
            .await,
        Code::InvalidArgument,
        &["route: is required"],
    );
    assert_eq!(fake.can_handle_calls(), 0);
}

// ===========================================================================
// ReportMetrics / GetModuleMetrics / GetNLBMetrics
// ===========================================================================

async fn report(
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

#[tokio::test]
async fn reported_metrics_are_stored_and_filtered_by_name_and_window() {
    let t = TestNlb::start().await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let base = now_ms() - 60_000;
    let mut labelled = point("rps", 100.0, base + 1_000);
    labelled.labels.insert("route".into(), "web".into());
    let resp = report(
        &t,
        "alb-1",
        vec![
            point("rps", 1.0, base),
            point("rps", 3.0, base + 2_000),
            point("rps", 2.0, base + 1_000),
            point("latency_ms", 10.0, base + 1_000),
            labelled,
        ],
    )
    .await
    .unwrap();
    assert!(resp.acknowledged);
    assert_eq!(resp.message, "stored 5 points");
    assert!(resp.processed_at.is_some());

    let get = |names: &[&str], start: Option<u64>, end: Option<u64>| {
        let mut c = t.client.clone();
        let req = pb::GetModuleMetricsRequest {
            instance_id: "alb-1".into(),
            metric_names: names.iter().map(|s| s.to_string()).collect(),
            start_time: start.map(shared_types::time::from_unix_millis),
            end_time: end.map(shared_types::time::from_unix_millis),
        };
        async move { c.get_module_metrics(req).await }
    };
    let m = get(&["rps"], None, None)
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert_eq!(m.instance_id, "alb-1");
    assert_eq!(m.module_type, ModuleType::Alb as i32);
    let got: Vec<(f64, usize)> = m
        .metrics
        .iter()
        .map(|p| (p.value, p.labels.len()))
        .collect();
    // Unlabelled series in time order, then the labelled one.
    assert_eq!(got, vec![(1.0, 0), (2.0, 0), (3.0, 0), (100.0, 1)]);
    let stamps: Vec<u64> = m.metrics[..3]
        .iter()
        .map(|p| {
            shared_types::time::unix_millis(shared_types::time::to_system(
                p.timestamp.as_ref().unwrap(),
            ))
        })
        .collect();
    assert_eq!(stamps, vec![base, base + 1_000, base + 2_000]);

    // Time window (inclusive).
    let m = get(&["rps"], Some(base + 500), Some(base + 2_000))
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    let got: Vec<f64> = m.metrics.iter().map(|p| p.value).collect();
    assert_eq!(got, vec![2.0, 3.0, 100.0]);
    let m = get(&[], Some(base + 1_000), Some(base + 1_000))
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    let got: Vec<(&str, f64)> = m
        .metrics
        .iter()
        .map(|p| (p.name.as_str(), p.value))
        .collect();
    assert_eq!(
        got,
        vec![("latency_ms", 10.0), ("rps", 2.0), ("rps", 100.0)]
    );
    assert_status(
        get(&[], Some(base + 5_000), Some(base)).await,
        Code::InvalidArgument,
        &["start_time is after end_time"],
    );

    // GetNLBMetrics carries module points by instance.
    let all = t
        .client
        .clone()
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            metric_names: vec!["latency_ms".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(all.metrics.is_empty(), "the NLB has no latency_ms series");
    let m = &all.module_metrics["alb-1"];
    assert_eq!(m.module_type, ModuleType::Alb as i32);
    assert_eq!(m.metrics.len(), 1);
    assert_eq!(m.metrics[0].value, 10.0);
}

#[tokio::test]
async fn nlb_metrics_aggregate_and_own_points() {
    let t = TestNlb::start().await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let base = now_ms() - 60_000;
    report(
        &t,
        "alb-1",
        vec![
            point("rps", 1.0, base),
            point("rps", 3.0, base + 1_000),
            point("rps", 8.0, base + 2_000),
        ],
    )
    .await
    .unwrap();
    let resp = t
        .client
        .clone()
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            metric_names: vec!["rps".into()],
            aggregate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let pts = &resp.module_metrics["alb-1"].metrics;
    let by_agg: BTreeMap<&str, f64> = pts
        .iter()
        .map(|p| (p.labels["agg"].as_str(), p.value))
        .collect();
    assert_eq!(
        by_agg,
        BTreeMap::from([
            ("avg", 4.0),
            ("count", 3.0),
            ("max", 8.0),
            ("min", 1.0),
            ("sum", 12.0)
        ])
    );
    assert_eq!(pts.len(), 5);
    assert!(pts.iter().all(|p| p.name == "rps"));

    // The NLB's own points: the latest sample reflects now.
    let resp = t
        .client
        .clone()
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            metric_names: vec!["nlb_registered_instances".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.metrics.is_empty());
    assert!(resp
        .metrics
        .iter()
        .all(|p| p.name == "nlb_registered_instances"));
    assert_eq!(resp.metrics.last().unwrap().value, 1.0);
    assert!(resp.module_metrics.is_empty(), "{:?}", resp.module_metrics);
    let resp = t
        .client
        .clone()
        .get_nlb_metrics(pb::GetNlbMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: HashSet<&str> = resp.metrics.iter().map(|p| p.name.as_str()).collect();
    for n in [
        "nlb_registered_instances",
        "nlb_healthy_instances",
        "nlb_active_connections",
        "nlb_total_requests",
        "nlb_routes",
        "nlb_uptime_seconds",
    ] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    // A window in the future holds nothing.
    let later = now_ms() + 3_600_000;
    let resp = t
        .client
        .clone()
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            start_time: Some(shared_types::time::from_unix_millis(later)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.metrics.is_empty());
    assert!(resp.module_metrics.is_empty());
}

#[tokio::test]
async fn report_metrics_refuses_unknown_instances_bad_values_and_extra_series() {
    let t = TestNlb::start_with("metrics: {max_series_per_instance: 2}").await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let now = now_ms();
    assert_status(
        report(&t, "ghost", vec![point("rps", 1.0, now)]).await,
        Code::NotFound,
        &["no instance ghost is registered"],
    );
    assert_status(
        t.client
            .clone()
            .get_module_metrics(pb::GetModuleMetricsRequest {
                instance_id: "ghost".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &["ghost"],
    );
    assert_status(
        report(
            &t,
            "alb-1",
            vec![point("ok", 1.0, now), point("bad", f64::NAN, now)],
        )
        .await,
        Code::InvalidArgument,
        &["metrics.metrics[1] (bad)", "NaN", "not a finite number"],
    );
    assert_status(
        report(&t, "alb-1", vec![point("inf", f64::INFINITY, now)]).await,
        Code::InvalidArgument,
        &["metrics.metrics[0] (inf)"],
    );
    assert_status(
        report(&t, "alb-1", vec![point("", 1.0, now)]).await,
        Code::InvalidArgument,
        &["metrics.metrics[0].name"],
    );
    // Nothing of a refused report was stored.
    let stored = t
        .client
        .clone()
        .get_module_metrics(pb::GetModuleMetricsRequest {
            instance_id: "alb-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.metrics.unwrap().metrics.is_empty());

    let resp = report(
        &t,
        "alb-1",
        vec![
            point("a", 1.0, now),
            point("b", 2.0, now),
            point("c", 3.0, now),
        ],
    )
    .await
    .unwrap();
    assert!(resp.acknowledged);
    assert!(
        resp.message.contains("stored 2 points")
            && resp.message.contains("1 points refused")
            && resp.message.contains("maximum of 2 series"),
        "{}",
        resp.message
    );
    // Existing series still take points.
    let resp = report(&t, "alb-1", vec![point("a", 5.0, now + 1)])
        .await
        .unwrap();
    assert_eq!(resp.message, "stored 1 points");
    let stored = t
        .client
        .clone()
        .get_module_metrics(pb::GetModuleMetricsRequest {
            instance_id: "alb-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(String, f64)> = stored
        .metrics
        .unwrap()
        .metrics
        .into_iter()
        .map(|p| (p.name, p.value))
        .collect();
    assert_eq!(
        got,
        vec![("a".into(), 1.0), ("a".into(), 5.0), ("b".into(), 2.0)]
    );
    // metrics.instance_id must match.
    let r = t
        .client
        .clone()
        .report_metrics(pb::ReportMetricsRequest {
            instance_id: "alb-1".into(),
            metrics: Some(pb::ModuleMetrics {
                instance_id: "alb-2".into(),
                ..Default::default()
            }),
            reported_at: None,
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["\"alb-2\"", "\"alb-1\""]);
}

// ===========================================================================
// StreamNLBMetrics
// ===========================================================================

#[tokio::test]
async fn stream_nlb_metrics_delivers_periodic_messages_with_module_points() {
    let t = TestNlb::start().await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    report(&t, "alb-1", vec![point("rps", 7.0, now_ms())])
        .await
        .unwrap();
    let mut stream = t
        .client
        .clone()
        .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
            interval_seconds: 1,
            metric_names: vec![],
            include_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(SOON, stream.next())
            .await
            .expect("a message within 10 s")
            .expect("the stream stays open")
            .expect("no error");
        got.push(msg);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    for msg in &got {
        assert!(msg.timestamp.is_some());
        assert!(!msg.metrics.is_empty());
        assert!(
            msg.metrics.iter().all(|p| p.name.starts_with("nlb_")),
            "{:?}",
            msg.metrics
        );
        let reg = msg
            .metrics
            .iter()
            .find(|p| p.name == "nlb_registered_instances")
            .expect("registered instances point");
        assert_eq!(reg.value, 1.0);
        let m = &msg.module_metrics["alb-1"];
        assert_eq!(m.module_type, ModuleType::Alb as i32);
        let rps: Vec<f64> = m
            .metrics
            .iter()
            .filter(|p| p.name == "rps")
            .map(|p| p.value)
            .collect();
        assert_eq!(rps, vec![7.0]);
    }
    drop(stream);

    // Names filter, and no module points unless asked.
    let mut stream = t
        .client
        .clone()
        .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
            interval_seconds: 1,
            metric_names: vec!["nlb_routes".into()],
            include_modules: false,
        })
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(SOON, stream.next())
        .await
        .expect("a message")
        .unwrap()
        .unwrap();
    assert_eq!(msg.metrics.len(), 1);
    assert_eq!(msg.metrics[0].name, "nlb_routes");
    assert!(msg.module_metrics.is_empty());

    assert_status(
        t.client
            .clone()
            .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
                interval_seconds: -1,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["interval_seconds", "-1"],
    );
}

#[tokio::test]
async fn dropping_a_metrics_stream_ends_its_server_task() {
    let t = TestNlb::start().await;
    // The NLB's long-lived holders of its state (servers and loops).
    let baseline = Arc::strong_count(&t.nlb);
    let mut stream = t
        .client
        .clone()
        .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
            // Long interval: the task must notice the client leaving without
            // waiting for its next tick.
            interval_seconds: 600,
            metric_names: vec![],
            include_modules: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(SOON, stream.next())
        .await
        .expect("the first message comes at once")
        .unwrap()
        .unwrap();
    assert!(!first.metrics.is_empty());
    assert_eq!(
        Arc::strong_count(&t.nlb),
        baseline + 1,
        "the stream's task holds the NLB"
    );
    drop(stream);
    eventually(
        "the stream task ended after its client left",
        SOON,
        || async { Arc::strong_count(&t.nlb) == baseline },
    )
    .await;
    // The NLB keeps serving.
    let s = t.status().await;
    assert_eq!(s.status, HealthStatus::Healthy as i32);
    let mut again = t
        .client
        .clone()
        .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
            interval_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tokio::time::timeout(SOON, again.next()).await.is_ok());
}

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
            "metrics"
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

// ===========================================================================
// GetLoadDistribution / RebalanceLoad
// ===========================================================================

/// alb-1 and alb-2, max 100 connections each, both serving route "web".
/// Returns their registration ids.
async fn two_albs(t: &TestNlb) -> HashMap<String, String> {
    let mut regs = HashMap::new();
    for id in ["alb-1", "alb-2"] {
        let mut inst = instance(id, ModuleType::Alb, "127.0.0.1:1", Some(&data_addr_for(id)));
        inst.max_connections = 100;
        let reg = t
            .register(register_req(inst, vec![route("web", Protocol::Http, 80)]))
            .await;
        regs.insert(id.to_string(), reg.registration_id);
    }
    regs
}

async fn distribution(t: &TestNlb, filter: ModuleType) -> pb::GetLoadDistributionResponse {
    t.client
        .clone()
        .get_load_distribution(pb::GetLoadDistributionRequest {
            module_type_filter: filter as i32,
            include_historical: false,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn load_distribution_reports_connections_and_balance() {
    let t = TestNlb::start().await;
    two_albs(&t).await;
    t.register_simple(
        "dblb-1",
        ModuleType::Dblb,
        "v1",
        vec![route("pg", Protocol::Postgres, 5432)],
    )
    .await;
    let mut g1 = t.hold("alb-1", 3);
    let mut g2 = t.hold("alb-2", 3);

    let d = distribution(&t, ModuleType::Alb).await;
    let mut keys: Vec<&String> = d.distribution.keys().collect();
    keys.sort();
    assert_eq!(keys, vec!["alb-1", "alb-2"]);
    for id in ["alb-1", "alb-2"] {
        let l = &d.distribution[id];
        assert_eq!(l.instance_id, id);
        assert_eq!(l.active_connections, 3);
        assert!((l.load_score - 0.03).abs() < 1e-9, "{l:?}");
    }
    assert!((d.balance_score - 1.0).abs() < 1e-9, "{}", d.balance_score);
    assert!(d.measured_at.is_some());

    // Skewed: 6 against 2 -> scores .06 and .02 -> 1 - cv = 0.5.
    g1.extend(t.hold("alb-1", 3));
    g2.pop();
    let d = distribution(&t, ModuleType::Alb).await;
    assert_eq!(d.distribution["alb-1"].active_connections, 6);
    assert_eq!(d.distribution["alb-2"].active_connections, 2);
    assert!((d.balance_score - 0.5).abs() < 1e-9, "{}", d.balance_score);

    // All types.
    let d = distribution(&t, ModuleType::Unspecified).await;
    assert_eq!(d.distribution.len(), 3);
    assert_eq!(d.distribution["dblb-1"].active_connections, 0);
    assert!(
        d.balance_score < 0.5,
        "an idle dblb widens the spread: {}",
        d.balance_score
    );
    drop(g1);
    drop(g2);
    let d = distribution(&t, ModuleType::Unspecified).await;
    assert!((d.balance_score - 1.0).abs() < 1e-9, "idle is balanced");
}

#[tokio::test]
async fn rebalance_returns_previous_and_new_distributions() {
    let t = TestNlb::start().await;
    two_albs(&t).await;
    let _g = t.hold("alb-1", 10);
    let resp = t
        .client
        .clone()
        .rebalance_load(pb::RebalanceLoadRequest {
            force: false,
            target_instances: vec![],
            strategy: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success);
    assert_eq!(
        resp.previous_distribution,
        HashMap::from([("alb-1".to_string(), 10), ("alb-2".to_string(), 0)])
    );
    assert_eq!(
        resp.new_distribution,
        HashMap::from([("alb-1".to_string(), 5), ("alb-2".to_string(), 5)])
    );
    assert!(
        resp.message.contains("least_connections") && resp.message.contains("2 instances"),
        "{}",
        resp.message
    );
    assert!(
        !resp.message.contains("told to shed") && !resp.message.contains("overloaded"),
        "not forced, so no shedding is decided: {}",
        resp.message
    );

    // Targets limit it.
    let resp = t
        .client
        .clone()
        .rebalance_load(pb::RebalanceLoadRequest {
            force: true,
            target_instances: vec!["alb-2".into()],
            strategy: "even".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.previous_distribution.keys().collect::<Vec<_>>(),
        vec!["alb-2"]
    );
    assert!(
        resp.message.contains("no instance is overloaded"),
        "{}",
        resp.message
    );

    let r = t
        .client
        .clone()
        .rebalance_load(pb::RebalanceLoadRequest {
            strategy: "random".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["strategy", "\"random\""]);
    let r = t
        .client
        .clone()
        .rebalance_load(pb::RebalanceLoadRequest {
            target_instances: vec!["alb-1".into(), "ghost".into()],
            ..Default::default()
        })
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["target_instances", "not registered: ghost"],
    );
}

#[tokio::test]
async fn rebalance_least_connections_uses_reported_cpu() {
    let t = TestNlb::start().await;
    let regs = two_albs(&t).await;
    let rid = regs["alb-1"].clone();
    // alb-1 reports 50% CPU: its capacity halves.
    t.client
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            instance_id: "alb-1".into(),
            registration_id: rid,
            status: HealthStatus::Healthy as i32,
            current_stats: Some(pb::ModuleStats {
                cpu_usage_percent: 50.0,
                ..Default::default()
            }),
            timestamp: None,
        })
        .await
        .unwrap();
    let _g = t.hold("alb-2", 9);
    let resp = t
        .client
        .clone()
        .rebalance_load(pb::RebalanceLoadRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Capacities 50 and 100: 9 connections split 3 / 6.
    assert_eq!(
        resp.new_distribution,
        HashMap::from([("alb-1".to_string(), 3), ("alb-2".to_string(), 6)])
    );
    assert_eq!(
        t.module_info("alb-1").await.unwrap().details["capacity_factor"],
        "0.500"
    );
}

// ===========================================================================
// TriggerScaling
// ===========================================================================

#[tokio::test]
async fn trigger_scaling_asks_a_module_to_scale_to_the_right_target() {
    let t = TestNlb::start().await;
    let fake = FakeModule::start().await;
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
    let reg2 = t
        .register_simple("alb-2", ModuleType::Alb, "v1", vec![])
        .await;
    let resp = t
        .client
        .clone()
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: String::new(),
            module_type: ModuleType::Alb as i32,
            scaling_action: "scale_up".into(),
            target_instances: 0,
            config: Some(pb::ScalingConfig {
                max_instances: 10,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success, "{resp:?}");
    assert_eq!(resp.current_instances, 2);
    assert_eq!(resp.target_instances, 3);
    assert_eq!(resp.scaling_action, "scale_up");
    assert!(
        resp.message.contains("from 2 to 3") && resp.message.contains("carried out by alb-1"),
        "{}",
        resp.message
    );
    assert_eq!(fake.scale_calls(), 1);
    let asked = fake.last_scale().unwrap();
    assert_eq!(asked.instance_id, "alb-1");
    assert!(asked.immediate);
    let cfg = asked.config.unwrap();
    assert_eq!(cfg.min_instances, 3);
    assert_eq!(cfg.max_instances, 10);

    // The other instances hear of it in their heartbeats.
    let hb = t.heartbeat("alb-2", &reg2).await;
    assert!(hb.should_scale);
    assert_eq!(hb.instructions["desired_instances"], "3");

    // scale_to and scale_down.
    let resp = t
        .client
        .clone()
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "alb-1".into(),
            scaling_action: "scale_to".into(),
            target_instances: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.target_instances, 5);
    assert_eq!(fake.last_scale().unwrap().config.unwrap().min_instances, 5);
    let resp = t
        .client
        .clone()
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: ModuleType::Alb as i32,
            scaling_action: "scale_down".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.target_instances, 1);
    assert_eq!(fake.scale_calls(), 3);

    // A module that refuses.
    fake.set_scale(ScaleAnswer::Refuse("at quota".into()));
    let r = t
        .client
        .clone()
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: ModuleType::Alb as i32,
            scaling_action: "scale_up".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::FailedPrecondition, &["alb-1", "at quota"]);
}

#[tokio::test]
async fn trigger_scaling_reports_modules_that_cannot_scale_and_bad_requests() {
    let t = TestNlb::start().await;
    let stub = FakeModule::start_stub().await;
    t.register(register_req(
        instance("alb-stub", ModuleType::Alb, &stub.address(), None),
        vec![],
    ))
    .await;
    let mut c = t.client.clone();
    let r = c
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "alb-stub".into(),
            scaling_action: "scale_up".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::FailedPrecondition, &["alb-stub", "cannot scale"]);

    let r = c
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "alb-stub".into(),
            scaling_action: "explode".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["scaling_action", "\"explode\""]);
    let r = c
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "alb-stub".into(),
            scaling_action: "scale_to".into(),
            target_instances: -2,
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["target_instances", "-2"]);
    let r = c
        .trigger_scaling(pb::TriggerScalingRequest {
            scaling_action: "scale_up".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["module_type", "instance_id"]);
    let r = c
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "ghost".into(),
            scaling_action: "scale_up".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::NotFound, &["ghost"]);
    let r = c
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "alb-stub".into(),
            module_type: ModuleType::Dblb as i32,
            scaling_action: "scale_up".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["alb-stub", "dblb"]);
    let r = c
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: ModuleType::Rtmp as i32,
            scaling_action: "scale_up".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::FailedPrecondition, &["no live rtmp instance"]);
}

// ===========================================================================
// Service basics: health, request ids, limits, bad bytes, admin port
// ===========================================================================

#[tokio::test]
async fn grpc_health_reports_serving() {
    let t = TestNlb::start().await;
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(t.grpc_addr).await);
    for service in ["", "marchproxy.NLBService"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.Such".into(),
        })
        .await;
    assert_status(r, Code::NotFound, &[]);
}

#[tokio::test]
async fn responses_carry_a_request_id_and_echo_a_given_one() {
    let t = TestNlb::start().await;
    let resp = t
        .client
        .clone()
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap();
    let id = resp
        .metadata()
        .get("x-request-id")
        .expect("x-request-id on the response")
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated id {id:?}");
    let resp2 = t
        .client
        .clone()
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap();
    assert_ne!(
        resp2
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        id,
        "a new id per call"
    );

    let mut req = tonic::Request::new(pb::GetNlbStatusRequest::default());
    req.metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().unwrap());
    let resp = t.client.clone().get_nlb_status(req).await.unwrap();
    assert_eq!(
        resp.metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "trace-me-42"
    );
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_nlb_keeps_serving() {
    let t = TestNlb::start_with("grpc: {max_message_bytes: 65536}").await;
    let mut inst = instance("alb-1", ModuleType::Alb, "127.0.0.1:1", None);
    inst.metadata.insert("blob".into(), "x".repeat(100 * 1024));
    let r = t
        .client
        .clone()
        .register_module(register_req(inst, vec![]))
        .await;
    let s = assert_status(r, Code::OutOfRange, &["too large", "65536"]);
    assert!(s.message().contains("bytes"), "{}", s.message());
    assert!(t.nlb.registry.list().is_empty());
    // The same client and a new one still work.
    t.register_simple("alb-2", ModuleType::Alb, "v1", vec![])
        .await;
    let s = t.status().await;
    assert_eq!(s.registered_modules, 1);
    let mut c = t.new_client().await;
    assert!(c
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .is_ok());
}

#[tokio::test]
async fn garbage_on_the_grpc_port_is_closed_and_the_nlb_keeps_serving() {
    let t = TestNlb::start().await;
    for garbage in [
        &b"\x00\x01\x02garbage that is not HTTP/2 at all\r\n\r\n\xff\xfe"[..],
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x09\x00\x00\x00\x00\x00junk"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(t.grpc_addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let closed = tokio::time::timeout(SOON, async {
            let mut buf = [0u8; 4096];
            // Whatever the server says first (a GOAWAY, say), it then closes.
            for _ in 0..100 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
            false
        })
        .await;
        assert_eq!(closed, Ok(true), "connection closed after {garbage:?}");
    }
    assert_eq!(t.status().await.status, HealthStatus::Healthy as i32);
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
}

#[tokio::test]
async fn admin_port_serves_health_readiness_metrics_and_status() {
    let t = TestNlb::start().await;
    t.register_simple(
        "alb-1",
        ModuleType::Alb,
        "v1",
        vec![route("web", Protocol::Http, 80)],
    )
    .await;

    let r = http_get(t.admin_addr, "/healthz").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.trim(), "ok");
    let r = http_get(t.admin_addr, "/readyz").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.trim(), "ready");

    let r = http_get(t.admin_addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{}",
        r.head
    );
    assert!(
        r.body
            .contains("nlb_registrations_total{result=\"registered\"} 1"),
        "{}",
        r.body
    );
    assert!(r.body.contains("nlb_routes 1"), "{}", r.body);

    let r = http_get(t.admin_addr, "/status").await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("status is JSON");
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["ready"], true);
    assert_eq!(v["routes"], 1);
    assert_eq!(v["modules"][0]["instance_id"], "alb-1");
    assert_eq!(v["modules"][0]["module_type"], "alb");
    assert_eq!(v["modules"][0]["state"], "healthy");

    let r = http_get(t.admin_addr, "/nope").await;
    assert_eq!(r.status, 404);

    // After shutdown begins, not ready.
    let nlb = Arc::clone(&t.nlb);
    let admin = t.admin_addr;
    t.shutdown().await;
    assert!(!nlb.ready.load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err()
            || http_get(admin, "/readyz").await.status != 200
    );
}

// ===========================================================================
// More liveness, limits and config paths
// ===========================================================================

#[tokio::test]
async fn metrics_stream_ends_when_the_nlb_shuts_down() {
    let t = TestNlb::start().await;
    let mut stream = t
        .client
        .clone()
        .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
            interval_seconds: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(SOON, stream.next())
        .await
        .expect("first message")
        .unwrap()
        .unwrap();
    let started = Instant::now();
    t.shutdown_with(Duration::from_secs(60)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "an open metrics stream held the shutdown for {:?} (grace 60 s)",
        started.elapsed()
    );
    let end = tokio::time::timeout(SOON, stream.next())
        .await
        .expect("the stream ends with the NLB");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
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

#[tokio::test]
async fn active_health_checks_stop_and_restore_traffic() {
    let t = TestNlb::start_with("health: {active_checks: true}").await;
    let fake = FakeModule::start().await;
    fake.set_health(HealthStatus::Unhealthy, "backend pool down");
    let stub = FakeModule::start_stub().await;
    let health = pb::HealthCheckConfig {
        interval_seconds: 1,
        timeout_seconds: 1,
        unhealthy_threshold: 3,
        healthy_threshold: 1,
        ..Default::default()
    };
    let mut regs = HashMap::new();
    for (id, fake) in [("alb-checked", &fake), ("alb-stub", &stub)] {
        let mut req = register_req(
            instance(
                id,
                ModuleType::Alb,
                &fake.address(),
                Some(&data_addr_for(id)),
            ),
            vec![route("web", Protocol::Http, 80)],
        );
        req.health_config = Some(health.clone());
        regs.insert(id, t.register(req).await.registration_id);
    }
    // Keep both leases alive with heartbeats while the checks run.
    let beat = || async {
        for (id, reg) in &regs {
            assert!(t.heartbeat(id, reg).await.acknowledged);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        beat().await;
        let info = t.module_info("alb-checked").await.unwrap();
        if info.details["reason"] == "failing health checks" {
            assert_eq!(
                info.instance.unwrap().health_status,
                HealthStatus::Unhealthy as i32
            );
            assert!(
                info.details["last_health_check"].contains("backend pool down"),
                "{:?}",
                info.details
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never marked unhealthy: {:?}",
            info.details
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fake.health_calls() >= 3, "{}", fake.health_calls());
    // The module without HealthCheck relies on heartbeats and stays in.
    let info = t.module_info("alb-stub").await.unwrap();
    assert_eq!(info.details["state"], "healthy", "{:?}", info.details);
    assert!(
        info.details["last_health_check"].contains("not implemented"),
        "{:?}",
        info.details
    );
    for _ in 0..20 {
        let r = t.route(Protocol::Http, 80, "", true).await;
        assert_eq!(r.target_instance_id, "alb-stub", "{r:?}");
    }

    fake.set_health(HealthStatus::Healthy, "recovered");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        beat().await;
        let info = t.module_info("alb-checked").await.unwrap();
        if info.details["state"] == "healthy" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never restored: {:?}",
            info.details
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn silent_instances_are_removed_after_the_grace_and_the_registry_has_a_cap() {
    let t = TestNlb::start_with("registry: {removal_grace_seconds: 1, max_instances: 2}").await;
    let mut req = register_req(
        instance(
            "alb-1",
            ModuleType::Alb,
            "127.0.0.1:1",
            Some("127.0.0.1:8081"),
        ),
        vec![],
    );
    req.health_config = Some(pb::HealthCheckConfig {
        interval_seconds: 1,
        unhealthy_threshold: 1,
        ..Default::default()
    });
    let reg = t.register(req).await.registration_id;
    report(&t, "alb-1", vec![point("rps", 1.0, now_ms())])
        .await
        .unwrap();
    t.register_simple("alb-2", ModuleType::Alb, "v1", vec![])
        .await;
    let r = t
        .client
        .clone()
        .register_module(register_req(
            instance("alb-3", ModuleType::Alb, "127.0.0.1:1", None),
            vec![],
        ))
        .await;
    assert_status(r, Code::ResourceExhausted, &["maximum of 2 instances"]);

    eventually("alb-1 removed after lease and grace", SOON, || async {
        matches!(t.module_info("alb-1").await, Err(s) if s.code() == Code::NotFound)
    })
    .await;
    let hb = t.heartbeat("alb-1", &reg).await;
    assert_eq!(hb.instructions["action"], "reregister");
    assert_status(
        t.client
            .clone()
            .get_module_metrics(pb::GetModuleMetricsRequest {
                instance_id: "alb-1".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &["alb-1"],
    );
    // Room again.
    t.register_simple("alb-3", ModuleType::Alb, "v1", vec![])
        .await;
}

#[tokio::test]
async fn a_lapsed_instance_may_be_taken_over_from_another_address() {
    let t = TestNlb::start().await;
    let mut req = register_req(
        instance(
            "alb-1",
            ModuleType::Alb,
            "127.0.0.1:5001",
            Some("127.0.0.1:8081"),
        ),
        vec![],
    );
    req.health_config = Some(pb::HealthCheckConfig {
        interval_seconds: 1,
        unhealthy_threshold: 1,
        ..Default::default()
    });
    let old = t.register(req.clone()).await.registration_id;
    eventually("alb-1 lapsed", SOON, || async {
        t.module_info("alb-1")
            .await
            .is_ok_and(|i| i.details["state"] == "unhealthy")
    })
    .await;
    req.instance.as_mut().unwrap().address = "127.0.0.1:5002".into();
    let new = t.register(req).await;
    assert_ne!(new.registration_id, old);
    assert!(
        new.message.contains("registered alb instance alb-1"),
        "{}",
        new.message
    );
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.instance.unwrap().address, "127.0.0.1:5002");
    let hb = t.heartbeat("alb-1", &old).await;
    assert!(!hb.acknowledged);
    assert_eq!(hb.instructions["action"], "reregister");
    assert!(
        t.heartbeat("alb-1", &new.registration_id)
            .await
            .acknowledged
    );
}

#[tokio::test]
async fn reported_status_in_heartbeats_steers_traffic() {
    let t = TestNlb::start().await;
    let mut inst = instance(
        "alb-1",
        ModuleType::Alb,
        "127.0.0.1:1",
        Some("127.0.0.1:8081"),
    );
    inst.health_status = HealthStatus::Starting as i32;
    let reg = t
        .register(register_req(inst, vec![route("web", Protocol::Http, 80)]))
        .await
        .registration_id;
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(
        info.instance.unwrap().health_status,
        HealthStatus::Starting as i32
    );
    assert!(!t.route(Protocol::Http, 80, "", true).await.routed);
    let hb = |status: HealthStatus| {
        let mut c = t.client.clone();
        let reg = reg.clone();
        async move {
            c.heartbeat(pb::HeartbeatRequest {
                instance_id: "alb-1".into(),
                registration_id: reg,
                status: status as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    hb(HealthStatus::Healthy).await;
    assert!(t.route(Protocol::Http, 80, "", true).await.routed);
    hb(HealthStatus::Unhealthy).await;
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.details["reason"], "reports unhealthy");
    assert!(!t.route(Protocol::Http, 80, "", true).await.routed);
    hb(HealthStatus::Degraded).await;
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(
        info.instance.unwrap().health_status,
        HealthStatus::Degraded as i32
    );
    assert!(
        t.route(Protocol::Http, 80, "", true).await.routed,
        "degraded still serves"
    );
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

#[tokio::test]
async fn load_distribution_with_history_averages_heartbeat_samples() {
    let t = TestNlb::start().await;
    let regs = two_albs(&t).await;
    for cpu in [10.0, 30.0] {
        t.client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                instance_id: "alb-1".into(),
                registration_id: regs["alb-1"].clone(),
                status: HealthStatus::Healthy as i32,
                current_stats: Some(pb::ModuleStats {
                    cpu_usage_percent: cpu,
                    memory_usage_mb: cpu * 10.0,
                    ..Default::default()
                }),
                timestamp: None,
            })
            .await
            .unwrap();
    }
    let now = distribution(&t, ModuleType::Alb).await;
    assert_eq!(now.distribution["alb-1"].cpu_usage_percent, 30.0);
    assert_eq!(now.distribution["alb-1"].memory_usage_mb, 300.0);
    let hist = t
        .client
        .clone()
        .get_load_distribution(pb::GetLoadDistributionRequest {
            module_type_filter: ModuleType::Alb as i32,
            include_historical: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hist.distribution["alb-1"].cpu_usage_percent, 20.0);
    assert_eq!(hist.distribution["alb-1"].memory_usage_mb, 200.0);
    assert_eq!(hist.distribution["alb-2"].cpu_usage_percent, 0.0);
}

#[tokio::test]
async fn errors_carry_the_request_id_too() {
    let t = TestNlb::start().await;
    let mut req = tonic::Request::new(pb::GetModuleInfoRequest {
        instance_id: "ghost".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "err-trace-7".parse().unwrap());
    let s = t.client.clone().get_module_info(req).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(
        s.metadata()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap()),
        Some("err-trace-7")
    );
}
