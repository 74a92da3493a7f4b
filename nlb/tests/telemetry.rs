//! Control API tests of metrics: `ReportMetrics`, `GetModuleMetrics` and
//! `GetNLBMetrics` (storage, name and time filters, aggregates, limits) and
//! `StreamNLBMetrics` (periodic messages, and the stream's server task ending
//! when the client leaves or the NLB shuts down).

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use shared_types::pb::{self, HealthStatus, ModuleType};
use tonic::Code;

// ===========================================================================
// ReportMetrics / GetModuleMetrics / GetNLBMetrics
// ===========================================================================

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
    // The interval holds: messages are spaced, not pushed back to back (a
    // lower bound; a loaded machine only spaces them more).
    let at = |m: &pb::StreamNlbMetricsResponse| {
        let t = m.timestamp.as_ref().unwrap();
        t.seconds as f64 + f64::from(t.nanos) / 1e9
    };
    assert!(
        at(&got[1]) - at(&got[0]) >= 0.5,
        "{} s apart",
        at(&got[1]) - at(&got[0])
    );
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
