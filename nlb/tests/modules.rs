//! Control API tests of module membership: `RegisterModule` (validation
//! naming every bad field, idempotent re-registration, instances without a
//! data address), `UnregisterModule` (graceful drains and immediate removal),
//! `ListModules` (filters, query, sort, pages) and `GetModuleInfo`.

#[allow(dead_code)]
mod common;

use std::collections::HashMap;

use common::*;
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tonic::Code;

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
            drain_timeout_seconds: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success);
    assert_eq!(resp.active_connections_drained, 3);
    assert!(
        resp.message.contains("alb-1 is draining") && resp.message.contains("within 4s"),
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
