//! Control API tests of the route table: `UpdateRouting` (operator routes
//! applied, served and persisted; upsert and replace_all; validate_only) and
//! `GetRoutingTable` (one entry per route and serving instance, filters,
//! query and pages).

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;

use common::*;
use shared_types::pb::{self, ModuleType, Protocol};
use tonic::Code;

// ===========================================================================
// UpdateRouting
// ===========================================================================

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
