//! Registry rules: registration, leases, drains, instructions, and that only
//! changes of membership, health, routes or weights rebuild the snapshot.

use std::collections::HashMap;
use std::time::Duration;

use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tokio::time::Instant;

use super::*;

fn settings() -> Settings {
    Settings {
        drain_timeout: Duration::from_secs(30),
        removal_grace: Duration::from_secs(30),
        max_instances: 3,
        series_interval: Duration::from_secs(10),
    }
}

fn registry() -> Registry {
    Registry::new(settings(), OperatorRouting::default())
}

fn route(id: &str, port: i32) -> pb::Route {
    pb::Route {
        route_id: id.into(),
        protocol: Protocol::Http as i32,
        destination_port: port,
        ..Default::default()
    }
}

fn req(id: &str, addr: &str, data: Option<&str>) -> pb::RegisterModuleRequest {
    let mut metadata = HashMap::new();
    if let Some(d) = data {
        metadata.insert("data_address".to_string(), d.to_string());
    }
    pb::RegisterModuleRequest {
        instance: Some(pb::ModuleInstance {
            instance_id: id.into(),
            module_type: ModuleType::Alb as i32,
            address: addr.into(),
            metadata,
            version: "v1".into(),
            ..Default::default()
        }),
        initial_routes: vec![route("web", 80)],
        health_config: Some(pb::HealthCheckConfig {
            interval_seconds: 1,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            ..Default::default()
        }),
        capabilities: HashMap::new(),
    }
}

fn beat(id: &str, reg: &str, status: HealthStatus) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        instance_id: id.into(),
        registration_id: reg.into(),
        status: status as i32,
        ..Default::default()
    }
}

/// The check a test records results for: this registration of `id`.
fn check_for(id: &str, reg: &Registered) -> DueCheck {
    DueCheck {
        instance_id: id.into(),
        registration_id: reg.registration_id.clone(),
        address: "10.0.0.1:9000".into(),
        timeout: Duration::from_secs(1),
    }
}

fn routable(r: &Registry, id: &str) -> bool {
    r.router()
        .load()
        .routes()
        .flat_map(|r| r.servers.iter())
        .any(|e| e.id == id && e.accepts_new())
}

#[test]
fn zero_health_values_take_the_documented_defaults() {
    let t = HealthTimings::from_proto(Some(&pb::HealthCheckConfig::default())).unwrap();
    assert_eq!(t.interval, Duration::from_secs(2));
    assert_eq!(t.timeout, Duration::from_secs(1));
    assert_eq!(t.unhealthy_threshold, 3);
    assert_eq!(t.healthy_threshold, 1);
    assert_eq!(t.lease(), Duration::from_secs(6));
    let err = HealthTimings::from_proto(Some(&pb::HealthCheckConfig {
        interval_seconds: -1,
        ..Default::default()
    }))
    .unwrap_err();
    assert!(err.contains("health_config.interval_seconds"), "{err}");
}

#[test]
fn registration_validates_every_field_at_once() {
    let r = registry();
    let mut bad = req("bad id!", "10.0.0.1", Some("10.0.0.1:70000"));
    bad.instance.as_mut().unwrap().module_type = 0;
    bad.initial_routes.push(route("", 70000));
    let RegistryError::InvalidArgument(msg) = r.register(&bad).unwrap_err() else {
        panic!("expected InvalidArgument")
    };
    for needle in [
        "instance.instance_id",
        "instance.module_type",
        "instance.address",
        "data_address",
        "route_id: is empty",
        "destination_port: 70000",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from {msg}");
    }
    assert!(r.list().is_empty());
}

#[test]
fn re_registering_a_live_instance_is_idempotent() {
    let r = registry();
    let first = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let again = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    assert_eq!(first.registration_id, again.registration_id);
    assert!(again.renewed && !first.renewed);
    assert_eq!(r.list().len(), 1);
    // Another address while the first is alive is refused.
    let clash = r
        .register(&req("alb-1", "10.0.0.2:9000", None))
        .unwrap_err();
    assert!(matches!(clash, RegistryError::AlreadyExists(m) if m.contains("10.0.0.1:9000")));
}

#[test]
fn without_data_address_an_instance_is_managed_but_takes_no_traffic() {
    let r = registry();
    let out = r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    assert!(!out.takes_traffic);
    assert!(
        out.message.contains("no metadata[\"data_address\"]"),
        "{}",
        out.message
    );
    assert!(!routable(&r, "alb-1"));
    assert_eq!(r.get("alb-1").unwrap().details["takes_traffic"], "false");
}

#[test]
fn the_registry_is_bounded() {
    let r = registry();
    for i in 0..3 {
        r.register(&req(&format!("alb-{i}"), "10.0.0.1:9000", None))
            .unwrap();
    }
    let err = r
        .register(&req("alb-9", "10.0.0.1:9000", None))
        .unwrap_err();
    assert!(matches!(err, RegistryError::ResourceExhausted(_)));
}

#[test]
fn heartbeat_stats_are_sampled_into_series_at_most_once_per_interval() {
    let r = registry();
    let reg = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let with_stats = || pb::HeartbeatRequest {
        current_stats: Some(pb::ModuleStats::default()),
        ..beat("alb-1", &reg.registration_id, HealthStatus::Healthy)
    };
    let sampled: Vec<bool> = (0..3)
        .map(|_| r.heartbeat(with_stats()).unwrap().stats_to_record.is_some())
        .collect();
    // The first beat is sampled; the next ones, within the 10 s interval, not.
    assert_eq!(sampled, [true, false, false]);
    // A beat without stats is never sampled.
    let plain = beat("alb-1", &reg.registration_id, HealthStatus::Healthy);
    assert!(r.heartbeat(plain).unwrap().stats_to_record.is_none());
    // The latest stats are kept whether sampled or not.
    assert!(r.get("alb-1").unwrap().stats.is_some());
}

#[test]
fn heartbeats_that_change_nothing_rebuild_nothing() {
    let r = registry();
    let reg = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let generation = r.generation();
    for _ in 0..5 {
        let out = r
            .heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
            .unwrap();
        assert!(out.acknowledged);
    }
    assert_eq!(
        r.generation(),
        generation,
        "plain heartbeats must not rebuild"
    );
    // A health change does.
    r.heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Unhealthy))
        .unwrap();
    assert_eq!(r.generation(), generation + 1);
    assert!(!routable(&r, "alb-1"));
    assert_eq!(
        r.get("alb-1").unwrap().instance.health_status,
        HealthStatus::Unhealthy as i32
    );
}

#[test]
fn unknown_registrations_are_told_to_reregister() {
    let r = registry();
    let reg = r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    for (id, rid) in [("alb-1", "nope"), ("alb-2", reg.registration_id.as_str())] {
        let out = r.heartbeat(beat(id, rid, HealthStatus::Healthy)).unwrap();
        assert!(!out.acknowledged);
        assert_eq!(out.instructions["action"], "reregister");
    }
    assert!(matches!(
        r.heartbeat(beat("", "x", HealthStatus::Healthy)),
        Err(RegistryError::InvalidArgument(_))
    ));
}

#[test]
fn a_lapsed_lease_stops_traffic_and_heartbeats_restore_it() {
    let r = registry();
    let reg = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    assert!(routable(&r, "alb-1"));
    // Lease = interval 1 s x unhealthy_threshold 2.
    let tick = r.tick(Instant::now() + Duration::from_millis(1500));
    assert!(tick.lapsed.is_empty());
    let tick = r.tick(Instant::now() + Duration::from_secs(3));
    assert_eq!(tick.lapsed, vec!["alb-1".to_string()]);
    assert!(!routable(&r, "alb-1"));
    assert_eq!(
        r.get("alb-1").unwrap().details["reason"],
        "missed heartbeats"
    );
    // healthy_threshold 2: one beat is not enough, two are.
    r.heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert!(!routable(&r, "alb-1"));
    r.heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert!(routable(&r, "alb-1"));
}

#[test]
fn silent_instances_are_removed_after_the_grace() {
    let r = registry();
    r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    // Lease 2 s + grace 30 s.
    let tick = r.tick(Instant::now() + Duration::from_secs(20));
    assert_eq!(tick.lapsed.len(), 1);
    assert!(tick.expired.is_empty());
    let tick = r.tick(Instant::now() + Duration::from_secs(40));
    assert_eq!(tick.expired, vec!["alb-1".to_string()]);
    assert!(r.get("alb-1").is_none());
}

#[test]
fn graceful_unregister_drains_until_the_deadline() {
    let r = registry();
    let reg = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let counters = r
        .router()
        .load()
        .routes()
        .flat_map(|r| r.servers.iter())
        .find(|e| e.id == "alb-1")
        .map(|e| std::sync::Arc::clone(&e.counters))
        .unwrap();
    let _a = counters.open_connection(0);
    let _b = counters.open_connection(0);
    let out = r
        .unregister("alb-1", &reg.registration_id, true, 5)
        .unwrap();
    assert_eq!(out.active_connections, 2);
    assert!(!routable(&r, "alb-1"), "no new traffic at once");
    let view = r.get("alb-1").unwrap();
    assert_eq!(view.instance.health_status, HealthStatus::Stopping as i32);
    assert_eq!(view.instance.current_connections, 2);
    // Heartbeats now carry the drain instruction.
    let hb = r
        .heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert_eq!(hb.instructions["action"], "drain");
    assert!(r
        .tick(Instant::now() + Duration::from_secs(4))
        .drained
        .is_empty());
    assert_eq!(
        r.tick(Instant::now() + Duration::from_secs(6)).drained,
        vec!["alb-1".to_string()]
    );
    assert!(r.get("alb-1").is_none());
}

#[test]
fn unregister_checks_the_binding() {
    let r = registry();
    r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    assert!(matches!(
        r.unregister("alb-1", "someone-else", false, 0),
        Err(RegistryError::PermissionDenied(_))
    ));
    assert!(matches!(
        r.unregister("alb-9", "", false, 0),
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        r.unregister("alb-1", "", true, -1),
        Err(RegistryError::InvalidArgument(_))
    ));
    let out = r.unregister("alb-1", "", false, 0).unwrap();
    assert!(!out.graceful);
    assert!(r.get("alb-1").is_none());
}

#[test]
fn reported_connections_count_when_the_nlb_forwarded_none() {
    let r = registry();
    let mut regs = Vec::new();
    for i in 0..2 {
        let id = format!("alb-{i}");
        regs.push(
            r.register(&req(
                &id,
                &format!("10.0.0.{i}:9000"),
                Some("10.0.0.1:8080"),
            ))
            .unwrap(),
        );
    }
    let mut hb = beat("alb-0", &regs[0].registration_id, HealthStatus::Healthy);
    hb.current_stats = Some(pb::ModuleStats {
        active_connections: 8,
        ..Default::default()
    });
    r.heartbeat(hb).unwrap();
    assert_eq!(r.get("alb-0").unwrap().instance.current_connections, 8);
    let out = r.rebalance(Strategy::Even, true, &[]);
    assert_eq!(out.previous["alb-0"], 8);
    assert_eq!(out.target["alb-0"], 4);
    assert_eq!(out.shed, vec![("alb-0".to_string(), 4)]);
    let hb = r
        .heartbeat(beat(
            "alb-0",
            &regs[0].registration_id,
            HealthStatus::Healthy,
        ))
        .unwrap();
    assert_eq!(hb.instructions["action"], "shed");
    assert_eq!(hb.instructions["shed_connections"], "4");
}

#[test]
fn instructions_are_delivered_once() {
    let r = registry();
    let reg = r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    assert!(r.instruct("alb-1", Instruction::Shed(7)));
    let hb = r
        .heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert_eq!(hb.instructions["action"], "shed");
    assert_eq!(hb.instructions["shed_connections"], "7");
    let hb = r
        .heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert!(hb.instructions.is_empty());
    r.set_instance_routes("alb-1", Vec::new(), true).unwrap();
    let hb = r
        .heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert_eq!(hb.instructions["action"], "reload");
    assert!(hb.should_reload);
}

#[test]
fn failing_active_checks_stop_traffic_after_the_threshold() {
    let r = registry();
    let reg = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let c = check_for("alb-1", &reg);
    r.record_check(&c, false, "refused".into());
    assert!(
        routable(&r, "alb-1"),
        "one failure is below unhealthy_threshold 2"
    );
    r.record_check(&c, false, "refused".into());
    assert!(!routable(&r, "alb-1"));
    r.record_check(&c, true, "ok".into());
    assert!(!routable(&r, "alb-1"), "healthy_threshold is 2");
    r.record_check(&c, true, "ok".into());
    assert!(routable(&r, "alb-1"));
    // Checks come due one interval apart.
    let due = r.due_checks(Instant::now() + Duration::from_secs(2));
    assert_eq!(due.len(), 1);
    assert!(r
        .due_checks(Instant::now() + Duration::from_secs(2))
        .is_empty());
}

#[test]
fn identical_announcements_merge_and_weights_show_per_instance() {
    let r = Registry::new(
        settings(),
        OperatorRouting {
            policy: crate::routing::Policy {
                weights: [(
                    ModuleType::Alb,
                    vec![("v1".to_string(), 80), ("v2".to_string(), 20)],
                )]
                .into(),
                sticky: false,
                sticky_types: Default::default(),
                slow_start_ms: 0,
            },
            ..Default::default()
        },
    );
    for i in 0..3 {
        r.register(&req(
            &format!("alb-{i}"),
            &format!("10.0.0.{i}:9000"),
            Some("10.0.0.1:8080"),
        ))
        .unwrap();
    }
    let snapshot = r.router().load();
    let routes: Vec<_> = snapshot.routes().collect();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].servers.len(), 3);
    let view = r.get("alb-0").unwrap();
    assert_eq!(view.instance.traffic_weight, 80);
    assert_eq!(view.deployment.active_version, "v1");
    assert_eq!(view.deployment.green_version, "v2");
    assert_eq!(view.deployment.canary_percent, 20);
}

#[test]
fn force_rebalance_tells_overloaded_instances_to_shed() {
    let r = registry();
    for i in 0..2 {
        r.register(&req(
            &format!("alb-{i}"),
            &format!("10.0.0.{i}:9000"),
            Some("10.0.0.1:8080"),
        ))
        .unwrap();
    }
    let snapshot = r.router().load();
    let counters = |id: &str| {
        snapshot
            .routes()
            .flat_map(|r| r.servers.iter())
            .find(|e| e.id == id)
            .map(|e| std::sync::Arc::clone(&e.counters))
            .unwrap()
    };
    let hot = counters("alb-0");
    let guards: Vec<_> = (0..30).map(|_| hot.open_connection(0)).collect();
    let out = r.rebalance(Strategy::Even, true, &[]);
    assert_eq!(out.previous["alb-0"], 30);
    assert_eq!(out.previous["alb-1"], 0);
    assert_eq!(out.target["alb-0"], 15);
    assert_eq!(out.target["alb-1"], 15);
    assert_eq!(out.shed, vec![("alb-0".to_string(), 15)]);
    // Without force, nothing is told to shed.
    assert!(r.rebalance(Strategy::Even, false, &[]).shed.is_empty());
    drop(guards);
    assert_eq!(Strategy::parse("").unwrap(), Strategy::LeastConnections);
    assert!(Strategy::parse("random")
        .unwrap_err()
        .contains("least_connections, even"));
}

#[test]
fn a_repeated_unregister_cannot_extend_a_drain() {
    let r = registry();
    let reg = r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    r.unregister("alb-1", &reg.registration_id, true, 5)
        .unwrap();
    let again = r
        .unregister("alb-1", &reg.registration_id, true, 600)
        .unwrap();
    assert!(again.message.contains("within 5s"), "{}", again.message);
    assert_eq!(
        r.tick(Instant::now() + Duration::from_secs(6))
            .drained
            .len(),
        1
    );
}

#[test]
fn duplicate_announced_route_ids_are_refused() {
    let r = registry();
    let mut dup = req("alb-1", "10.0.0.1:9000", None);
    dup.initial_routes.push(route("web", 81));
    let err = r.register(&dup).unwrap_err();
    assert!(
        matches!(&err, RegistryError::InvalidArgument(m) if m.contains("route \"web\": route_id: given twice")),
        "{err:?}"
    );
}

#[test]
fn turning_active_checks_off_forgets_their_failures() {
    let r = registry();
    let reg = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let c = check_for("alb-1", &reg);
    r.record_check(&c, false, "refused".into());
    r.record_check(&c, false, "refused".into());
    assert!(!routable(&r, "alb-1"));
    r.clear_check_failures();
    assert!(routable(&r, "alb-1"));
}

#[test]
fn removals_report_the_module_address() {
    let r = registry();
    r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    let tick = r.tick(Instant::now() + Duration::from_secs(60));
    assert_eq!(tick.expired, vec!["alb-1".to_string()]);
    assert_eq!(tick.removed_addresses, vec!["10.0.0.1:9000".to_string()]);
}

#[test]
fn a_check_of_an_earlier_registration_is_dropped() {
    let r = registry();
    let old = r
        .register(&req("alb-1", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let stale = check_for("alb-1", &old);
    // Lease lapses, and the id comes back from another address.
    r.tick(Instant::now() + Duration::from_secs(3));
    let new = r
        .register(&req("alb-1", "10.0.0.2:9000", Some("10.0.0.2:8080")))
        .unwrap();
    assert_ne!(old.registration_id, new.registration_id);
    assert_eq!(new.replaced_address.as_deref(), Some("10.0.0.1:9000"));
    r.record_check(&stale, false, "refused".into());
    r.record_check(&stale, false, "refused".into());
    assert!(
        routable(&r, "alb-1"),
        "the old registration's failures do not count"
    );
}

#[test]
fn deployment_started_is_when_the_weights_last_changed() {
    let r = registry();
    r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    assert!(r
        .get("alb-1")
        .unwrap()
        .deployment
        .deployment_started
        .is_none());
    let weights = |v2: u32| OperatorRouting {
        policy: crate::routing::Policy {
            weights: [(
                ModuleType::Alb,
                vec![("v1".to_string(), 100 - v2), ("v2".to_string(), v2)],
            )]
            .into(),
            sticky: false,
            sticky_types: Default::default(),
            slow_start_ms: 0,
        },
        ..Default::default()
    };
    assert!(r.set_operator_routing(weights(10)));
    let first = r
        .get("alb-1")
        .unwrap()
        .deployment
        .deployment_started
        .unwrap();
    assert!(
        !r.set_operator_routing(weights(10)),
        "unchanged: no rebuild"
    );
    assert_eq!(
        r.get("alb-1")
            .unwrap()
            .deployment
            .deployment_started
            .unwrap(),
        first
    );
    std::thread::sleep(Duration::from_millis(20));
    r.set_operator_routing(weights(50));
    let second = r
        .get("alb-1")
        .unwrap()
        .deployment
        .deployment_started
        .unwrap();
    assert!((second.seconds, second.nanos) > (first.seconds, first.nanos));
}

#[test]
fn a_scaling_target_is_announced_until_the_reaper_sees_it_met() {
    let r = registry();
    let reg = r.register(&req("alb-1", "10.0.0.1:9000", None)).unwrap();
    r.set_scaling_target(ModuleType::Alb, 2);
    let hb = r
        .heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert!(hb.should_scale);
    assert_eq!(hb.instructions["desired_instances"], "2");
    r.register(&req("alb-2", "10.0.0.2:9000", None)).unwrap();
    r.tick(Instant::now());
    let hb = r
        .heartbeat(beat("alb-1", &reg.registration_id, HealthStatus::Healthy))
        .unwrap();
    assert!(!hb.should_scale, "2 live alb instances: the target is met");
    assert!(!hb.instructions.contains_key("desired_instances"));
}

// ------------------------------------------------- rebuild cost, same result

fn big_registry() -> Registry {
    Registry::new(
        Settings {
            max_instances: 1000,
            ..settings()
        },
        OperatorRouting {
            routes: vec![RouteSpec::operator(&pb::Route {
                route_id: "all-alb".into(),
                protocol: Protocol::Http as i32,
                destination_port: 8080,
                metadata: [("module_type".to_string(), "alb".to_string())].into(),
                ..Default::default()
            })
            .unwrap()],
            ..Default::default()
        },
    )
}

#[test]
fn servers_are_listed_by_id_whatever_the_registration_order() {
    let r = big_registry();
    // Registered out of order; each announces the same route "web".
    for i in [7, 3, 9, 1, 5, 0, 8, 2, 6, 4] {
        r.register(&req(
            &format!("alb-{i}"),
            &format!("10.0.0.{i}:9000"),
            Some("10.0.0.1:8080"),
        ))
        .unwrap();
    }
    let snapshot = r.router().load();
    let expected: Vec<String> = (0..10).map(|i| format!("alb-{i}")).collect();
    let mut routes = 0;
    for route in snapshot.routes() {
        let ids: Vec<&str> = route.servers.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, expected, "route {}", route.spec.route_id());
        routes += 1;
    }
    assert_eq!(routes, 2, "the operator route and the merged announcement");
}

#[test]
fn rebuilds_reuse_endpoints_of_unchanged_instances_only() {
    let r = big_registry();
    let a = r
        .register(&req("alb-a", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    r.register(&req("alb-b", "10.0.0.2:9000", Some("10.0.0.2:8080")))
        .unwrap();
    let endpoint = |id: &str| {
        r.router()
            .load()
            .routes()
            .flat_map(|route| route.servers.iter())
            .find(|e| e.id == id)
            .cloned()
            .expect("listed")
    };
    let (a1, b1) = (endpoint("alb-a"), endpoint("alb-b"));
    // A change of b's health: a's endpoint is carried over, b's is new.
    let b = r.get("alb-b").unwrap();
    let b_reg = r.read(|inner| inner.instances["alb-b"].registration_id.clone());
    r.heartbeat(beat(
        &b.instance.instance_id,
        &b_reg,
        HealthStatus::Unhealthy,
    ))
    .unwrap();
    let (a2, b2) = (endpoint("alb-a"), endpoint("alb-b"));
    assert!(Arc::ptr_eq(&a1, &a2), "unchanged instance, same endpoint");
    assert!(!Arc::ptr_eq(&b1, &b2), "changed instance, new endpoint");
    assert!(!b2.accepts_new());
    assert!(Arc::ptr_eq(&b1.counters, &b2.counters), "counters live on");
    // A capacity change gives a new endpoint too.
    r.rebalance(Strategy::LeastConnections, false, &[]);
    r.heartbeat(pb::HeartbeatRequest {
        current_stats: Some(pb::ModuleStats {
            cpu_usage_percent: 50.0,
            ..Default::default()
        }),
        ..beat("alb-a", &a.registration_id, HealthStatus::Healthy)
    })
    .unwrap();
    r.rebalance(Strategy::LeastConnections, false, &[]);
    let a3 = endpoint("alb-a");
    assert!(!Arc::ptr_eq(&a2, &a3));
    assert!(
        (a3.capacity_factor - 0.5).abs() < 1e-9,
        "{}",
        a3.capacity_factor
    );
    // Re-registering from another address (after a drain) is a new instance.
    r.unregister("alb-a", "", true, 0).unwrap();
    r.register(&req("alb-a", "10.0.0.9:9000", Some("10.0.0.9:8080")))
        .unwrap();
    let a4 = endpoint("alb-a");
    assert_eq!(a4.address.as_deref(), Some("10.0.0.9:8080"));
}

#[test]
fn identical_announcements_share_one_key() {
    let r = big_registry();
    for i in 0..3 {
        r.register(&req(&format!("alb-{i}"), &format!("10.0.0.{i}:9000"), None))
            .unwrap();
    }
    r.read(|inner| {
        let keys: Vec<*const crate::routing::route::MergeKey> = inner
            .instances
            .values()
            .map(|i| i.routes[0].merge_key() as *const _)
            .collect();
        assert!(keys.windows(2).all(|w| w[0] == w[1]), "{keys:?}");
    });
}

#[test]
fn summaries_match_the_views() {
    let r = big_registry();
    let a = r
        .register(&req("alb-a", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    r.register(&req("alb-b", "10.0.0.2:9000", None)).unwrap();
    r.register(&req("alb-c", "10.0.0.3:9000", Some("10.0.0.3:8080")))
        .unwrap();
    r.heartbeat(beat("alb-a", &a.registration_id, HealthStatus::Unhealthy))
        .unwrap();
    r.unregister("alb-c", "", true, 30).unwrap();
    let from_views: Vec<Summary> = r.list().iter().map(InstanceView::summary).collect();
    assert_eq!(r.summaries(), from_views);
    assert_eq!(from_views.len(), 3);
}

#[test]
fn an_instance_announcing_a_route_twice_serves_it_once() {
    let r = big_registry();
    r.register(&req("alb-a", "10.0.0.1:9000", Some("10.0.0.1:8080")))
        .unwrap();
    let web = RouteSpec::announced(&route("web", 80), ModuleType::Alb).unwrap();
    // The control API refuses duplicate ids; the registry copes anyway.
    r.set_instance_routes("alb-a", vec![web.clone(), web], true)
        .unwrap();
    let snapshot = r.router().load();
    let web = snapshot
        .routes()
        .find(|route| route.spec.route_id() == "web")
        .expect("web");
    let ids: Vec<&str> = web.servers.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["alb-a"]);
}
