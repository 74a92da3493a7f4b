//! The NLB's autoscaler against real SDK modules: load rises (connections
//! the modules report in their heartbeats), the NLB asks a module's
//! `ModuleService.Scale` for more instances; load falls, and after its
//! window and cooldown it asks for fewer. Every decision is a metric and
//! an event in `/status`.

use std::sync::Arc;
use std::time::Duration;

use shared_types::pb::{ModuleType, Protocol, ScalingConfig};
use std::sync::Mutex;
use switchyard_sdk::config::{HeartbeatConfig, Listen, NlbLink};
use switchyard_sdk::{
    Connection, Descriptor, Module, ModuleError, Runner, ScaleOutcome, Scaler, SdkConfig,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Holds each connection until the client closes it.
struct Holder;

#[switchyard_sdk::async_trait]
impl Module for Holder {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            module_type: ModuleType::Alb,
            name: "holder",
            version: "1.0.0".into(),
            protocols: vec![Protocol::Tcp],
            capabilities: Default::default(),
        }
    }

    async fn serve(&self, mut conn: Connection) {
        let mut buf = [0u8; 64];
        while matches!(conn.stream.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// Records every `Scale` it is asked for (when, and how many).
#[derive(Default, Clone)]
struct Recorder {
    asked: Arc<Mutex<Vec<(tokio::time::Instant, ScalingConfig, bool)>>>,
}

impl Recorder {
    /// The first `Scale` asked for `n` instances (after `after`, if given).
    fn first(
        &self,
        after: Option<tokio::time::Instant>,
        n: i32,
    ) -> Option<(tokio::time::Instant, ScalingConfig, bool)> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .find(|(at, c, _)| after.is_none_or(|t| *at > t) && c.min_instances == n)
            .cloned()
    }
}

#[switchyard_sdk::async_trait]
impl Scaler for Recorder {
    async fn scale(
        &self,
        config: &ScalingConfig,
        immediate: bool,
    ) -> Result<ScaleOutcome, ModuleError> {
        self.asked
            .lock()
            .unwrap()
            .push((tokio::time::Instant::now(), *config, immediate));
        Ok(ScaleOutcome {
            current_instances: 2,
            desired_instances: config.min_instances,
        })
    }
}

fn module_config(nlb: &str, id: &str) -> SdkConfig {
    SdkConfig {
        nlb: NlbLink {
            addr: nlb.into(),
            ..NlbLink::default()
        },
        listen: Listen {
            grpc: "127.0.0.1:0".into(),
            data: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
        },
        instance_id: id.into(),
        heartbeat: HeartbeatConfig {
            interval_seconds: 1,
            ..HeartbeatConfig::default()
        },
        ..SdkConfig::default()
    }
}

async fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An NLB in this process whose autoscaler evaluates every second, with a
/// policy for `holder`: 1 to 4 instances, 2 connections each.
async fn nlb_with_policy(dir: &std::path::Path) -> nlb::Running {
    let file = dir.join("nlb.yaml");
    std::fs::write(
        &file,
        format!(
            "grpc: {{listen: '127.0.0.1:0'}}\n\
             admin: {{listen: '127.0.0.1:0'}}\n\
             state_file: {:?}\n\
             health: {{active_checks: false}}\n\
             autoscaling:\n  evaluation_interval_seconds: 1\n  modules:\n    holder:\n\
             \x20     min_instances: 1\n      max_instances: 4\n      target_connections: 2\n\
             \x20     scale_up_cooldown_seconds: 2\n      scale_down_cooldown_seconds: 2\n\
             \x20     window_seconds: 3\n",
            dir.join("state.json").display().to_string()
        ),
    )
    .unwrap();
    let store =
        nlb::config::ConfigStore::load(Some(file), Box::new(|_| None)).expect("config loads");
    nlb::start(nlb::Nlb::new(store)).await.expect("NLB starts")
}

/// Until the NLB has `n` instances, all healthy.
async fn until_healthy(running: &nlb::Running, n: usize) {
    until("the modules registered and healthy", 30, || {
        let views = running.nlb.registry.list();
        (views.len() == n
            && views
                .iter()
                .all(|v| v.state == nlb::routing::EndpointState::Healthy))
        .then_some(())
    })
    .await;
}

/// While a rollout of the type runs, the autoscaler recommends but does
/// not scale (a scale-down could remove the canary); once it ends, it
/// scales.
#[tokio::test(flavor = "multi_thread")]
async fn a_type_with_an_active_rollout_is_not_scaled_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let running = nlb_with_policy(dir.path()).await;
    let nlb_addr = running.grpc_addr.to_string();
    let recorder = Recorder::default();
    let mut runners = Vec::new();
    for (id, version) in [("holder-a", "1.0.0"), ("holder-b", "2.0.0")] {
        let mut config = module_config(&nlb_addr, id);
        config.version = version.into();
        runners.push(
            Runner::new(Holder, config)
                .scaler(recorder.clone())
                .start()
                .await
                .unwrap(),
        );
    }
    until_healthy(&running, 2).await;
    let versions = vec!["1.0.0".to_string(), "2.0.0".to_string()];
    running
        .nlb
        .rollouts
        .start(
            &shared_types::pb::StartRolloutRequest {
                rollout_id: "r".into(),
                module_type: ModuleType::Alb as i32,
                baseline_version: "1.0.0".into(),
                canary_version: "2.0.0".into(),
                steps: vec![shared_types::pb::RolloutStep {
                    canary_weight: 50,
                    hold_seconds: 86_400,
                }],
                ..Default::default()
            },
            &versions,
        )
        .expect("the rollout starts");

    // Load that asks for 4 instances.
    let mut conns = Vec::new();
    for i in 0..10 {
        let to = runners[i % 2].data_addr;
        conns.push(TcpStream::connect(to).await.unwrap());
    }
    // The autoscaler recommended 4: an evaluation saw the load.
    until("a recommendation of 4", 60, || {
        running
            .nlb
            .metrics
            .render()
            .lines()
            .any(|l| {
                l.starts_with("nlb_scaling_recommended_instances{module=\"holder\"}")
                    && l.ends_with(" 4")
            })
            .then_some(())
    })
    .await;
    running
        .nlb
        .rollouts
        .rollback("r", "the test ends it")
        .expect("rolled back");
    let ended_at = tokio::time::Instant::now();
    let up = until("a scale-up to 4 after the rollout ended", 60, || {
        recorder.first(None, 4)
    })
    .await;
    assert!(
        up.0 > ended_at,
        "no Scale while the rollout ran: {:?}",
        recorder.asked.lock().unwrap()
    );
    drop(conns);
    for r in runners {
        r.stop(switchyard_sdk::StopReason::Signal);
    }
    running.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn load_scales_a_type_up_and_its_end_scales_it_down() {
    let dir = tempfile::tempdir().unwrap();
    let running = nlb_with_policy(dir.path()).await;
    let nlb_addr = running.grpc_addr.to_string();

    let recorder = Recorder::default();
    let a = Runner::new(Holder, module_config(&nlb_addr, "holder-a"))
        .scaler(recorder.clone())
        .start()
        .await
        .unwrap();
    let b = Runner::new(Holder, module_config(&nlb_addr, "holder-b"))
        .scaler(recorder.clone())
        .start()
        .await
        .unwrap();
    until_healthy(&running, 2).await;

    // Load: ten long-lived connections, five on each (two per instance is
    // the target), which the modules report in their heartbeats.
    let mut conns = Vec::new();
    for i in 0..10 {
        let to = if i % 2 == 0 { a.data_addr } else { b.data_addr };
        conns.push(TcpStream::connect(to).await.unwrap());
    }
    let up = until("a scale-up to the maximum, 4", 60, || {
        recorder.first(None, 4)
    })
    .await;
    assert_eq!(up.1.max_instances, 4, "{:?}", up.1);
    assert!(up.2, "asked to scale at once");
    assert_eq!(up.1.target_connections, 2);

    // The load ends: fewer, after the window and the cooldown.
    let closed_at = tokio::time::Instant::now();
    drop(conns);
    let down = until("a scale-down to the minimum, 1", 60, || {
        recorder.first(Some(closed_at), 1)
    })
    .await;
    assert_eq!(down.1.max_instances, 1);

    // Never anything but 4 while loaded, nor below the minimum.
    let asked: Vec<i32> = recorder
        .asked
        .lock()
        .unwrap()
        .iter()
        .map(|(_, c, _)| c.min_instances)
        .collect();
    assert!(asked.iter().all(|n| *n == 4 || *n == 1), "{asked:?}");
    let first_down = asked.iter().position(|n| *n == 1).unwrap();
    assert!(asked[..first_down].iter().all(|n| *n == 4), "{asked:?}");

    // Each decision is a metric and an event.
    let metrics = running.nlb.metrics.render();
    let count = |direction: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("nlb_scaling_decisions_total{")
                    && l.contains("module=\"holder\"")
                    && l.contains(&format!("direction=\"{direction}\""))
                    && l.contains("result=\"ok\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(count("up") >= 1.0 && count("down") >= 1.0, "{metrics}");
    let status = nlb::admin::status_json(&running.nlb);
    let events = status["scaling_events"].as_array().unwrap();
    let ups: Vec<_> = events.iter().filter(|e| e["to"] == 4).collect();
    assert!(
        ups.iter().any(|e| e["from"] == 2
            && e["result"] == "ok"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("connections per instance against a target of 2")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["to"] == 1 && e["from"] == 2),
        "{events:?}"
    );

    a.stop(switchyard_sdk::StopReason::Signal);
    b.stop(switchyard_sdk::StopReason::Signal);
    running.shutdown(Duration::from_secs(2)).await;
}
