//! Concurrency, bounds and isolation: concurrent route upserts lose nothing,
//! no instance id reaches the NLB's own series, oversized inputs and answers
//! are refused with messages that say how, and changes that touch no routing
//! input rebuild no snapshot.

#[allow(dead_code)]
mod common;

use std::collections::HashMap;

use common::*;
use shared_types::pb::{self, ModuleType, Protocol};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_route_upserts_lose_nothing() {
    let t = TestNlb::start_with(POOLS).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = t.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client;
            c.update_routing(pb::UpdateRoutingRequest {
                routes: vec![backend_route(
                    &format!("r{i:02}"),
                    Protocol::Http,
                    80,
                    "pool-a",
                )],
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().success)
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().unwrap(), "every upsert succeeds");
    }
    let routes = &t.nlb.config.current().routes;
    let mut ids: Vec<&str> = routes.iter().map(|r| r.route_id.as_str()).collect();
    ids.sort();
    let want: Vec<String> = (0..40).map(|i| format!("r{i:02}")).collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    // The live snapshot holds all of them too.
    assert_eq!(t.nlb.registry.router().load().routes().count(), 40);
}

#[tokio::test]
async fn an_instance_named_nlb_stays_out_of_the_nlbs_own_series() {
    let t = TestNlb::start().await;
    let reg = t
        .register_simple(
            "nlb",
            ModuleType::Alb,
            "v1",
            vec![route("web", Protocol::Http, 80)],
        )
        .await;
    report(&t, "nlb", vec![point("nlb_routes", 999.0, now_ms())])
        .await
        .unwrap();
    let mut c = t.client.clone();
    let m = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            metric_names: vec!["nlb_routes".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!m.metrics.is_empty());
    assert!(
        m.metrics.iter().all(|p| p.value != 999.0),
        "{:?}",
        m.metrics
    );
    assert_eq!(m.module_metrics["nlb"].metrics[0].value, 999.0);
    // Removing the instance leaves the NLB's own series alone.
    c.unregister_module(pb::UnregisterModuleRequest {
        instance_id: "nlb".into(),
        registration_id: reg,
        graceful: false,
        drain_timeout_seconds: 0,
    })
    .await
    .unwrap();
    let m = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(m
        .metrics
        .iter()
        .any(|p| p.name == "nlb_registered_instances"));
    assert!(!m.module_metrics.contains_key("nlb"));
}

#[tokio::test]
async fn an_answer_too_large_for_one_response_says_how_to_narrow_it() {
    let t = TestNlb::start_with("metrics: {max_series_per_instance: 300, retention_points: 200}\n")
        .await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let base = now_ms() - 1_000_000;
    for series in 0..300 {
        let points: Vec<pb::MetricDataPoint> = (0..200)
            .map(|i| {
                let mut p = point("rps", f64::from(i), base + u64::from(i as u32));
                p.labels.insert("worker".into(), series.to_string());
                p
            })
            .collect();
        report(&t, "alb-1", points).await.unwrap();
    }
    let mut c = t.client.clone();
    let r = c
        .get_module_metrics(pb::GetModuleMetricsRequest {
            instance_id: "alb-1".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::ResourceExhausted, &["60000 points", "narrow"]);
    // Aggregated, the same data fits.
    let r = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            metric_names: vec!["rps".into()],
            aggregate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.module_metrics["alb-1"].metrics.len(), 300 * 5);
}

#[tokio::test]
async fn oversized_labels_and_registrations_are_refused_by_name() {
    let t = TestNlb::start().await;
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
    let mut p = point("rps", 1.0, now_ms());
    p.labels.insert("path".into(), "x".repeat(10_000));
    let r = report(&t, "alb-1", vec![p]).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["metrics.metrics[0] (rps)", "\"path\"", "too long"],
    );

    let mut inst = instance("alb-2", ModuleType::Alb, "127.0.0.1:9000", None);
    inst.metadata = (0..100)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect::<HashMap<_, _>>();
    let r = t
        .client
        .clone()
        .register_module(register_req(inst, vec![]))
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["instance.metadata", "100 entries, at most 64"],
    );

    let mut req = register_req(
        instance("alb-3", ModuleType::Alb, "127.0.0.1:9000", None),
        vec![],
    );
    req.capabilities.insert("notes".into(), "y".repeat(5000));
    let r = t.client.clone().register_module(req).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["capabilities[\"notes\"]", "too long"],
    );
}

#[tokio::test]
async fn a_missing_backend_names_the_route() {
    let t = TestNlb::start_with(POOLS).await;
    update_routing(
        &t,
        vec![backend_route("first", Protocol::Http, 80, "pool-a")],
        false,
        false,
    )
    .await
    .unwrap();
    let resp = update_routing(
        &t,
        vec![backend_route("nopool", Protocol::Http, 81, "pool-zzz")],
        false,
        true,
    )
    .await
    .unwrap();
    assert!(
        resp.validation_errors
            .iter()
            .any(|e| e.contains("route \"nopool\"") && e.contains("pool-zzz")),
        "{:?}",
        resp.validation_errors
    );
}

#[tokio::test]
async fn config_changes_that_touch_no_routing_input_rebuild_nothing() {
    let t = TestNlb::start_with(POOLS).await;
    let before = t.nlb.registry.generation();
    let mut c = t.client.clone();
    for (section, data) in [
        ("metrics", "{retention_points: 100}"),
        ("health", "{active_checks: false}"),
        ("registry", "{removal_grace_seconds: 60}"),
    ] {
        let r = c
            .update_nlb_config(pb::UpdateNlbConfigRequest {
                config: Some(pb::ConfigUpdate {
                    config_type: section.into(),
                    config_data: data.as_bytes().to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.success, "{section}: {}", r.message);
    }
    assert_eq!(t.nlb.registry.generation(), before);
    // A routing input does rebuild.
    let r = c
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            config: Some(pb::ConfigUpdate {
                config_type: "routing".into(),
                config_data: b"{sticky: true}".to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    assert_eq!(t.nlb.registry.generation(), before + 1);
}
