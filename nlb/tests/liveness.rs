//! Control API tests of instance liveness: `Heartbeat` (lease renewal, stats,
//! the instructions it carries: reregister, drain, shed, reload), reported
//! status steering traffic, lapsed leases, takeover from another address,
//! removal after the grace, the registry's cap, and active health checks.

#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tonic::Code;

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

// ===========================================================================
// Leases, removal and active health checks
// ===========================================================================

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
async fn silent_instances_are_removed_after_the_grace_and_the_registry_has_a_cap() {
    // Lease 1 s + grace 3 s: room for the calls below before alb-1 goes,
    // even on a loaded machine.
    let t = TestNlb::start_with("registry: {removal_grace_seconds: 3, max_instances: 2}").await;
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

// ===========================================================================
// HeartbeatStream (Switchyard extension)
// ===========================================================================

#[tokio::test]
async fn a_heartbeat_stream_answers_each_beat_in_order_like_the_unary_call() {
    let t = TestNlb::start().await;
    let reg = t
        .register(register_req(
            instance(
                "alb-1",
                ModuleType::Alb,
                "127.0.0.1:7001",
                Some("127.0.0.1:8001"),
            ),
            vec![],
        ))
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut answers = t
        .client
        .clone()
        .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    let beat = |reg_id: &str, cpu: f64| pb::HeartbeatRequest {
        instance_id: "alb-1".into(),
        registration_id: reg_id.into(),
        status: HealthStatus::Healthy as i32,
        current_stats: Some(pb::ModuleStats {
            cpu_usage_percent: cpu,
            ..Default::default()
        }),
        timestamp: None,
    };
    for cpu in [10.0, 20.0, 30.0] {
        tx.send(beat(&reg.registration_id, cpu)).await.unwrap();
        let a = tokio::time::timeout(SOON, answers.message())
            .await
            .expect("answered in time")
            .expect("no error")
            .expect("an answer");
        assert!(a.acknowledged, "{}", a.message);
        assert!(a.message.starts_with("lease renewed"), "{}", a.message);
    }
    // The latest stats are the last beat's.
    let info = t.module_info("alb-1").await.unwrap();
    assert_eq!(info.stats.unwrap().cpu_usage_percent, 30.0);

    // An unknown registration is told to register again, and the stream stays.
    tx.send(beat("no-such-registration", 0.0)).await.unwrap();
    let a = answers.message().await.unwrap().unwrap();
    assert!(!a.acknowledged);
    assert_eq!(a.instructions["action"], "reregister");
    tx.send(beat(&reg.registration_id, 40.0)).await.unwrap();
    assert!(answers.message().await.unwrap().unwrap().acknowledged);

    // An invalid beat ends the stream with the unary call's error.
    tx.send(pb::HeartbeatRequest::default()).await.unwrap();
    let err = answers
        .message()
        .await
        .expect_err("the stream ends in an error");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("instance_id"), "{}", err.message());
    let m = scrape(t.admin_addr).await;
    assert_eq!(sample(&m, "nlb_heartbeats_total{result=\"ok\"}"), 4.0);
    assert_eq!(
        sample(&m, "nlb_heartbeats_total{result=\"reregister\"}"),
        1.0
    );
}
