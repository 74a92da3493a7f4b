//! Control API tests of load: `GetLoadDistribution` (connections, balance
//! score, history), `RebalanceLoad` (previous and new distributions,
//! strategies, targets) and `TriggerScaling` (asking a module to scale, and
//! modules that cannot).

#[allow(dead_code)]
mod common;

use std::time::Duration;

use std::collections::HashMap;

use common::*;
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tonic::Code;

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
async fn load_distribution_with_history_averages_heartbeat_samples() {
    // Heartbeat stats are sampled into the series once per interval: 1 s here.
    let t = TestNlb::start_with("metrics: {sample_interval_seconds: 1}").await;
    let regs = two_albs(&t).await;
    for (i, cpu) in [10.0, 30.0].into_iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
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
    // Exactly the target, whatever max the caller sent: a scaler keeps the
    // count within min..=max.
    assert_eq!(cfg.min_instances, 3);
    assert_eq!(cfg.max_instances, 3);

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

#[tokio::test]
async fn the_module_call_token_goes_only_with_calls_that_change_a_module() {
    let t = TestNlb::start_with_env(
        "routing: {validate_timeout_ms: 5000}",
        &[("NLB_MODULE_CALL_TOKEN", "nlb-calls-modules-0001")],
    )
    .await;
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
    // A read: ValidateRoute asks the module's CanHandle.
    t.client
        .clone()
        .validate_route(pb::ValidateRouteRequest {
            route: Some(route("api", Protocol::Http, 80)),
        })
        .await
        .unwrap();
    // A change: TriggerScaling asks the module's Scale.
    t.client
        .clone()
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: ModuleType::Alb as i32,
            scaling_action: "scale_up".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = fake.state.authorizations.lock().clone();
    assert_eq!(
        seen,
        [
            ("CanHandle", None),
            ("Scale", Some("Bearer nlb-calls-modules-0001".to_string())),
        ]
    );
}

#[tokio::test]
async fn a_forced_rebalance_asks_again_until_every_instance_is_within_its_bound() {
    let t = TestNlb::start().await;
    let regs = two_albs(&t).await;
    let mut on_1 = t.hold("alb-1", 10);
    let force = pb::RebalanceLoadRequest {
        force: true,
        target_instances: vec![],
        strategy: "even".into(),
    };
    let resp = t
        .client
        .clone()
        .rebalance_load(force.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.message.contains("alb-1 sheds 5") && resp.message.contains("checked again every 3 s"),
        "{}",
        resp.message
    );
    let shed_of = |hb: &pb::HeartbeatResponse| {
        (hb.instructions.get("action").map(String::as_str) == Some("shed"))
            .then(|| hb.instructions["shed_connections"].clone())
    };
    assert_eq!(
        shed_of(&t.heartbeat("alb-1", &regs["alb-1"]).await).as_deref(),
        Some("5")
    );

    // alb-1 sheds nothing: it is told again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let hb = t.heartbeat("alb-1", &regs["alb-1"]).await;
        if let Some(n) = shed_of(&hb) {
            assert_eq!(n, "5");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not told to shed again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A second forced call while one follows up does not start another:
    // the one running goes on with its arguments.
    let resp = t
        .client
        .clone()
        .rebalance_load(pb::RebalanceLoadRequest {
            target_instances: vec!["alb-1".into(), "alb-2".into()],
            ..force
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.message
            .contains("already running goes on with these arguments"),
        "{}",
        resp.message
    );
    assert_eq!(
        t.nlb.rebalancing.lock().as_ref().map(|j| j.targets.clone()),
        Some(vec!["alb-1".to_string(), "alb-2".to_string()])
    );

    // It sheds four; their clients come back on alb-2: 6 and 4 is within
    // the bound (target 5, plus 10% and one).
    on_1.truncate(6);
    let _on_2 = t.hold("alb-2", 4);
    // Drain any instruction already on its way, then none comes any more.
    let _ = t.heartbeat("alb-1", &regs["alb-1"]).await;
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < quiet_until {
        for id in ["alb-1", "alb-2"] {
            let hb = t.heartbeat(id, &regs[id]).await;
            assert_eq!(shed_of(&hb), None, "{id} told to shed within its bound");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(t.nlb.rebalancing.lock().is_none(), "the follow-up ended");
}

#[tokio::test]
async fn trigger_scaling_autoscale_sets_the_types_policy_from_its_scaling_config() {
    let t = TestNlb::start().await;
    let ask = |config: Option<pb::ScalingConfig>| pb::TriggerScalingRequest {
        instance_id: String::new(),
        module_type: ModuleType::Alb as i32,
        scaling_action: "autoscale".into(),
        target_instances: 0,
        config,
    };
    let resp = t
        .client
        .clone()
        .trigger_scaling(ask(Some(pb::ScalingConfig {
            min_instances: 2,
            max_instances: 6,
            target_connections: 300,
            target_cpu_percent: 70,
            cooldown_seconds: 45,
            auto_scaling_enabled: true,
            ..Default::default()
        })))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success, "{resp:?}");
    assert!(
        resp.message.contains("policy of alb set: 2 to 6"),
        "{}",
        resp.message
    );
    let policy = t.nlb.config.current().autoscaling.modules["alb"].clone();
    assert!(policy.enabled);
    assert_eq!((policy.min_instances, policy.max_instances), (2, 6));
    assert_eq!(
        (policy.target_connections, policy.target_cpu_percent),
        (300, 70)
    );
    assert_eq!(
        (
            policy.scale_up_cooldown_seconds,
            policy.scale_down_cooldown_seconds
        ),
        (45, 45)
    );

    // Disabled keeps it, stopped.
    let resp = t
        .client
        .clone()
        .trigger_scaling(ask(Some(pb::ScalingConfig {
            min_instances: 2,
            max_instances: 6,
            target_connections: 300,
            auto_scaling_enabled: false,
            ..Default::default()
        })))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.message.contains("disabled"), "{}", resp.message);
    assert!(!t.nlb.config.current().autoscaling.modules["alb"].enabled);

    // On, then off with nothing else set: the settings stay.
    for enabled in [true, false] {
        let config = if enabled {
            pb::ScalingConfig {
                min_instances: 2,
                max_instances: 6,
                target_connections: 300,
                auto_scaling_enabled: true,
                ..Default::default()
            }
        } else {
            pb::ScalingConfig::default()
        };
        t.client
            .clone()
            .trigger_scaling(ask(Some(config)))
            .await
            .unwrap();
        let p = t.nlb.config.current().autoscaling.modules["alb"].clone();
        assert_eq!(
            (
                p.enabled,
                p.min_instances,
                p.max_instances,
                p.target_connections
            ),
            (enabled, 2, 6, 300)
        );
    }

    // A policy that does not validate is refused, naming the key; no config
    // at all too.
    let r = t
        .client
        .clone()
        .trigger_scaling(ask(Some(pb::ScalingConfig {
            min_instances: 8,
            max_instances: 3,
            target_connections: 10,
            ..Default::default()
        })))
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &[
            "autoscaling.modules.alb.min_instances",
            "above max_instances 3",
        ],
    );
    let r = t
        .client
        .clone()
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: ModuleType::Dblb as i32,
            ..ask(Some(pb::ScalingConfig::default()))
        })
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["autoscaling.modules.dblb", "no autoscaling policy to stop"],
    );
    let r = t.client.clone().trigger_scaling(ask(None)).await;
    assert_status(r, Code::InvalidArgument, &["config", "ScalingConfig"]);
}
