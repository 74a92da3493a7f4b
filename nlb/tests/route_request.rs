//! Control API tests of route decisions: `RouteRequest` (matching and
//! precedence, dry runs, why nothing was routed, bad input, version weights)
//! and `ValidateRoute` (asking candidate modules, refusing invalid routes).

#[allow(dead_code)]
mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use shared_types::pb::{self, ModuleType, Protocol};
use tonic::Code;

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
    // 2 s: ample for the fast fakes' first connect on a loaded machine.
    let t = TestNlb::start_with("routing: {validate_timeout_ms: 2000}").await;
    let yes = FakeModule::start().await;
    yes.set_can_handle(true, "serves http", Duration::ZERO);
    let no = FakeModule::start().await;
    no.set_can_handle(false, "no tls certs", Duration::ZERO);
    let slow = FakeModule::start().await;
    // Slower than the bound below: only the 2 s deadline can end the call in time.
    slow.set_can_handle(true, "too late", Duration::from_secs(60));
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
        resp.details["instance.ailb-slow"].contains("did not answer within 2000 ms"),
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
