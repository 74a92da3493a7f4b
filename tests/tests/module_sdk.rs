//! The module SDK against a real NLB: the SDK's example module
//! (`echo-module`) registers, heartbeats with real stats, survives an NLB
//! restart, follows `drain` and `shed`, stops cleanly on SIGTERM, and
//! announces route changes.

use e2e::module::{start_echo, ModuleLaunch, ModuleProcess};
use e2e::{free_addr, metric_value, Launch, NlbProcess, Sandbox};
use shared_types::pb::{
    GetModuleInfoRequest, HealthStatus, ListModulesRequest, RebalanceLoadRequest,
    StreamMetricsRequest, UnregisterModuleRequest,
};

async fn nlb_at(sb: &Sandbox, addr: &str) -> NlbProcess {
    sb.start_with(Launch {
        use_config_file: false,
        grpc_addr: Some(addr.to_string()),
        ..Launch::default()
    })
    .await
}

/// An NLB on ports the harness picks (retried if taken).
async fn nlb(sb: &Sandbox) -> NlbProcess {
    sb.start_with(Launch {
        use_config_file: false,
        ..Launch::default()
    })
    .await
}

/// An NLB and one registered echo module.
async fn stack(sb: &Sandbox, id: &str) -> (NlbProcess, ModuleProcess) {
    let nlb = nlb(sb).await;
    let m = start_echo(
        sb.path(),
        &nlb.grpc_addr,
        &ModuleLaunch {
            instance_id: Some(id.into()),
            ..ModuleLaunch::default()
        },
    )
    .await;
    m.wait_registered().await;
    (nlb, m)
}

async fn info(nlb: &NlbProcess, id: &str) -> Option<shared_types::pb::GetModuleInfoResponse> {
    nlb.client()
        .await
        .get_module_info(GetModuleInfoRequest {
            instance_id: id.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_started_before_the_nlb_waits_then_registers() {
    let sb = Sandbox::new();
    let nlb_addr = free_addr();
    let m = start_echo(
        sb.path(),
        &nlb_addr,
        &ModuleLaunch {
            instance_id: Some("echo-early".into()),
            ..ModuleLaunch::default()
        },
    )
    .await;
    // No NLB yet: the module keeps trying, and says why it is not ready.
    m.eventually("two failed registration attempts", || async {
        let text = m.try_get("/metrics").await?.body;
        metric_value(&text, r#"module_registrations_total{result="error"}"#).filter(|n| *n >= 2.0)
    })
    .await;
    let ready = m.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let status = m.status().await;
    assert_eq!(status["phase"], "starting");
    assert!(
        status["nlb"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("registration")),
        "{status}"
    );

    let nlb = nlb_at(&sb, &nlb_addr).await;
    m.wait_registered().await;
    let got = info(&nlb, "echo-early")
        .await
        .expect("the NLB knows echo-early");
    let inst = got.instance.unwrap();
    assert_eq!(inst.address, m.grpc_addr);
    assert_eq!(inst.metadata["data_address"], m.data_addr);
    assert_eq!(inst.version, "0.1.0");
    assert_eq!(inst.health_status, HealthStatus::Healthy as i32);
    let routes: Vec<String> = got.routes.into_iter().map(|r| r.route_id).collect();
    assert_eq!(routes, ["echo"]);
    assert_eq!(got.details["capability.protocols"], "tcp");
    let mut me = m;
    assert!(
        me.try_exit().is_none(),
        "the module must not exit for a late NLB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_carry_real_stats_to_get_module_info() {
    let sb = Sandbox::new();
    let (nlb, m) = stack(&sb, "echo-stats").await;
    let mut conn = m.connect().await;
    for i in 0..5 {
        assert_eq!(
            conn.ask(&format!("line-{i}")).await.as_deref(),
            Some(&*format!("line-{i}"))
        );
    }
    let stats = nlb
        .eventually("5 requests in the NLB's view of echo-stats", || async {
            info(&nlb, "echo-stats")
                .await
                .and_then(|i| i.stats)
                .filter(|s| s.total_requests == 5)
        })
        .await;
    assert_eq!(stats.instance_id, "echo-stats");
    assert_eq!(stats.successful_requests, 5);
    assert_eq!(stats.failed_requests, 0);
    assert_eq!(stats.active_connections, 1);
    assert_eq!(stats.total_connections, 1);
    // "line-N\n" is 7 bytes each way, plus the greeting line out.
    assert_eq!(stats.bytes_received, 35);
    assert_eq!(stats.bytes_sent, 35 + conn.greeting.len() as i64 + 1);
    assert!(
        stats.p50_latency_ms > 0.0 && stats.p99_latency_ms >= stats.p50_latency_ms,
        "{stats:?}"
    );
    assert!(stats.memory_usage_mb > 1.0, "{stats:?}");
    assert!(stats.since.is_some());
    assert_eq!(stats.custom_stats["greeting_bytes"], "15");
    // The NLB counts the module's connection as the instance's.
    let inst = info(&nlb, "echo-stats").await.unwrap().instance.unwrap();
    assert_eq!(inst.current_connections, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_registers_again_after_the_nlb_restarts() {
    let sb = Sandbox::new();
    let addr = free_addr();
    let mut nlb = nlb_at(&sb, &addr).await;
    let m = start_echo(
        sb.path(),
        &addr,
        &ModuleLaunch {
            instance_id: Some("echo-restart".into()),
            ..ModuleLaunch::default()
        },
    )
    .await;
    m.wait_registered().await;
    let first = m.status().await["nlb"]["registration_id"].clone();
    nlb.signal("KILL");
    nlb.wait_exit().await;
    drop(nlb);
    let nlb = nlb_at(&sb, &addr).await;
    // Registrations are soft state: the new NLB learns of the instance from
    // the module itself, with no operator action.
    nlb.eventually("echo-restart registered with the new NLB", || async {
        info(&nlb, "echo-restart").await
    })
    .await;
    let status = m
        .eventually("the module counted a second registration", || async {
            let s = m.status().await;
            (s["nlb"]["registrations"] == 2 && s["nlb"]["registered"] == true).then_some(s)
        })
        .await;
    assert_ne!(status["nlb"]["registration_id"], first);
    let text = m.get("/metrics").await.body;
    assert!(
        metric_value(&text, r#"module_instructions_total{action="reregister"}"#).unwrap_or(0.0)
            >= 1.0
            || metric_value(&text, r#"module_registrations_total{result="ok"}"#) == Some(2.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drain_instruction_finishes_connections_then_stops() {
    let sb = Sandbox::new();
    let (nlb, mut m) = stack(&sb, "echo-drain").await;
    let mut conn = m.connect().await;
    assert_eq!(conn.ask("before").await.as_deref(), Some("before"));
    // An operator drains the instance at the NLB.
    let resp = nlb
        .client()
        .await
        .unregister_module(UnregisterModuleRequest {
            instance_id: "echo-drain".into(),
            registration_id: String::new(),
            graceful: true,
            drain_timeout_seconds: 60,
        })
        .await
        .expect("UnregisterModule")
        .into_inner();
    assert!(resp.success, "{}", resp.message);
    // The next heartbeat says drain: the module asks its connection to
    // finish (echo says bye), stops taking new ones, and exits 0.
    assert_eq!(
        conn.line().await.as_deref(),
        Some("bye: the module is closing this connection")
    );
    assert_eq!(
        conn.line().await,
        None,
        "the connection is closed after bye"
    );
    let status = m.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        m.stderr()
    );
    assert!(m.stderr().contains("the NLB said drain"), "{}", m.stderr());
    assert!(tokio::net::TcpStream::connect(&m.data_addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shed_instruction_asks_the_oldest_connections_to_finish() {
    let sb = Sandbox::new();
    let nlb = nlb(&sb).await;
    let launch = |id: &str| ModuleLaunch {
        instance_id: Some(id.into()),
        ..ModuleLaunch::default()
    };
    let hot = start_echo(sb.path(), &nlb.grpc_addr, &launch("echo-hot")).await;
    let cold = start_echo(sb.path(), &nlb.grpc_addr, &launch("echo-cold")).await;
    hot.wait_registered().await;
    cold.wait_registered().await;
    let mut conns = Vec::new();
    for _ in 0..6 {
        conns.push(hot.connect().await);
    }
    // The NLB learns of the 6 connections from the next heartbeat.
    nlb.eventually("echo-hot reported 6 connections", || async {
        info(&nlb, "echo-hot")
            .await
            .and_then(|i| i.instance)
            .filter(|i| i.current_connections == 6)
    })
    .await;
    let r = nlb
        .client()
        .await
        .rebalance_load(RebalanceLoadRequest {
            force: true,
            target_instances: vec![],
            strategy: "even".into(),
        })
        .await
        .expect("RebalanceLoad")
        .into_inner();
    assert!(r.success, "{}", r.message);
    // Even over two: 3 each, so echo-hot sheds 3, the oldest first.
    for (i, c) in conns.iter_mut().enumerate().take(3) {
        assert_eq!(
            c.line().await.as_deref(),
            Some("bye: the module is closing this connection"),
            "connection {i}"
        );
    }
    for (i, c) in conns.iter_mut().enumerate().skip(3) {
        assert_eq!(
            c.ask("still here").await.as_deref(),
            Some("still here"),
            "connection {i}"
        );
    }
    let text = hot.get("/metrics").await.body;
    assert_eq!(
        metric_value(&text, "module_shed_connections_total"),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&text, r#"module_instructions_total{action="shed"}"#),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_unregisters_drains_and_exits_0() {
    let sb = Sandbox::new();
    let (nlb, mut m) = stack(&sb, "echo-term").await;
    let mut conn = m.connect().await;
    assert_eq!(conn.ask("hi").await.as_deref(), Some("hi"));
    m.signal("TERM");
    assert_eq!(
        conn.line().await.as_deref(),
        Some("bye: the module is closing this connection")
    );
    let status = m.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        m.stderr()
    );
    // The NLB was told: the instance drains (or is already gone).
    let modules = nlb
        .client()
        .await
        .list_modules(ListModulesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .modules;
    let left: Vec<_> = modules
        .iter()
        .filter(|i| i.instance_id == "echo-term")
        .map(|i| HealthStatus::try_from(i.health_status).unwrap())
        .collect();
    assert!(
        left.is_empty() || left == [HealthStatus::Stopping],
        "echo-term after SIGTERM: {left:?}"
    );
    assert!(
        m.stderr().contains("unregistered from the NLB"),
        "{}",
        m.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_metrics_stream_does_not_hold_up_the_exit() {
    let sb = Sandbox::new();
    let (_nlb, mut m) = stack(&sb, "echo-stream").await;
    let mut c = m.client().await;
    let mut stream = c
        .stream_metrics(StreamMetricsRequest {
            instance_id: String::new(),
            interval_seconds: 86_400,
            metric_names: vec!["module_connections_total".into()],
        })
        .await
        .expect("StreamMetrics")
        .into_inner();
    // The first message comes at once; the next would be a day later.
    let first = stream
        .message()
        .await
        .expect("a message")
        .expect("not ended");
    assert_eq!(first.metrics.unwrap().metrics.len(), 1);
    m.signal("TERM");
    // The stream ends with the drain, and the module exits 0.
    let end = tokio::time::timeout(e2e::CALL_DEADLINE, stream.message())
        .await
        .expect("the stream ends when the module stops");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    let status = m.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        m.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_module_refuses_a_line_without_end() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-long").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(&m.data_addr).await.unwrap();
    // One byte over the limit and no newline: the module reads exactly
    // this much, answers, and closes (nothing is left unread, so the close
    // is a clean one).
    s.write_all(&vec![b'x'; 64 * 1024 + 1]).await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(e2e::CALL_DEADLINE, s.read_to_string(&mut got))
        .await
        .expect("the module answers and closes")
        .unwrap();
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 2, "{got:?}");
    assert!(lines[0].starts_with("hello from echo"), "{got:?}");
    assert_eq!(lines[1], "error: line longer than 65536 bytes");
    // The module is unharmed.
    let mut again = m.connect().await;
    assert_eq!(again.ask("ok").await.as_deref(), Some("ok"));
}
