//! Tokens between the NLB and its modules, with the real binaries: the
//! module token a module presents to register, the operator and nlb tokens
//! a module asks of whoever changes it over `ModuleService`, and the call
//! token the NLB presents when it drives a module (`TriggerScaling` ->
//! `Scale`).

use std::collections::HashMap;

use e2e::module::{bearer, start_echo, with_header, ModuleLaunch, ModuleProcess};
use e2e::{metric_value, Launch, NlbProcess, Sandbox};
use shared_types::pb::module_service_client::ModuleServiceClient;
use shared_types::pb::{
    self, CanHandleRequest, ConfigUpdate, DeleteRouteRequest, GetActiveVersionRequest,
    GetConfigRequest, GetInstancesRequest, GetMetricsRequest, GetModuleInfoRequest,
    GetRateLimitsRequest, GetRoutesRequest, GetStatsRequest, GetStatusRequest, HealthCheckRequest,
    HealthStatus, ModuleType, PromoteVersionRequest, Protocol, RateLimit, ReloadRequest,
    RemoveRateLimitRequest, RollbackRequest, ScaleRequest, ScalingConfig, SetRateLimitRequest,
    SetTrafficWeightRequest, ShutdownRequest, TriggerScalingRequest, UpdateConfigRequest,
    UpdateRoutesRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// The NLB's tokens (each at least 16 characters).
const NLB_MODULE: &str = "e2e-nlb-module-token-0123456789";
const NLB_OPERATOR: &str = "e2e-nlb-operator-token-0123456789";
const NLB_VIEWER: &str = "e2e-nlb-viewer-token-0123456789";
/// The tokens a module accepts for changes.
const MOD_OPERATOR: &str = "e2e-module-operator-token-0123";
const MOD_NLB: &str = "e2e-module-nlb-token-0123456789";
const WRONG: &str = "e2e-a-token-nobody-knows-0123456";

/// An NLB with `env` on ports the harness picks (again, if another process
/// took one first).
async fn nlb_with(sb: &Sandbox, env: &[(&str, &str)]) -> NlbProcess {
    sb.start_with(Launch {
        use_config_file: false,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Launch::default()
    })
    .await
}

/// A started (listening, maybe not yet registered) echo module.
async fn echo(sb: &Sandbox, nlb: &NlbProcess, id: &str, env: &[(&str, &str)]) -> ModuleProcess {
    start_echo(
        sb.path(),
        &nlb.grpc_addr,
        &ModuleLaunch {
            instance_id: Some(id.into()),
            config: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .await
}

/// An open NLB and one registered echo module that asks for the operator
/// and nlb tokens.
async fn guarded_stack(sb: &Sandbox, id: &str) -> (NlbProcess, ModuleProcess) {
    let nlb = nlb_with(sb, &[]).await;
    let m = echo(
        sb,
        &nlb,
        id,
        &[
            ("MODULE_OPERATOR_TOKEN", MOD_OPERATOR),
            ("MODULE_NLB_TOKEN", MOD_NLB),
        ],
    )
    .await;
    m.wait_registered().await;
    (nlb, m)
}

fn expect_err<T: std::fmt::Debug>(r: Result<Response<T>, Status>) -> Status {
    match r {
        Ok(resp) => panic!("expected an error, got {:?}", resp.into_inner()),
        Err(s) => s,
    }
}

/// Asserts `r` failed with `code` and a message containing each of `words`.
fn assert_status<T: std::fmt::Debug>(r: Result<Response<T>, Status>, code: Code, words: &[&str]) {
    let s = expect_err(r);
    assert_eq!(s.code(), code, "{s:?}");
    for w in words {
        assert!(s.message().contains(w), "{w:?} not in {:?}", s.message());
    }
}

/// UNAUTHENTICATED for want of a token, naming the method and the tokens.
fn refused<T: std::fmt::Debug>(r: Result<Response<T>, Status>, method: &str) {
    assert_status(r, Code::Unauthenticated, &[method, "operator or nlb token"]);
}

/// UNAUTHENTICATED for a token the module does not know.
fn unknown_token<T: std::fmt::Debug>(r: Result<Response<T>, Status>, method: &str) {
    assert_status(
        r,
        Code::Unauthenticated,
        &[method, "not one this module knows"],
    );
}

fn limit(target: &str) -> SetRateLimitRequest {
    SetRateLimitRequest {
        instance_id: String::new(),
        limit: Some(RateLimit {
            target: target.into(),
            requests_per_minute: 100,
            enabled: true,
            ..RateLimit::default()
        }),
    }
}

async fn limit_targets(c: &mut ModuleServiceClient<Channel>) -> Vec<(String, String)> {
    c.get_rate_limits(GetRateLimitsRequest::default())
        .await
        .expect("GetRateLimits")
        .into_inner()
        .limits
        .into_iter()
        .map(|l| (l.limit_id, l.target))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The `audit` log lines of the module (text format).
fn audit_lines(m: &ModuleProcess) -> Vec<String> {
    m.stderr()
        .lines()
        .filter(|l| l.contains(" audit: ModuleService change "))
        .map(str::to_string)
        .collect()
}

/// `(method, caller, role)` of each audit line, in order.
fn audited(m: &ModuleProcess) -> Vec<(String, String, String)> {
    let field = |line: &str, key: &str| {
        let start = line
            .find(&format!(" {key}="))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            + key.len()
            + 2;
        line[start..]
            .split(' ')
            .next()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string()
    };
    audit_lines(m)
        .iter()
        .map(|l| (field(l, "method"), field(l, "caller"), field(l, "role")))
        .collect()
}

fn triples(t: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    t.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_nlb_registers_only_modules_presenting_its_module_token() {
    let sb = Sandbox::new();
    let nlb = nlb_with(
        &sb,
        &[
            ("NLB_MODULE_TOKEN", NLB_MODULE),
            ("NLB_OPERATOR_TOKEN", NLB_OPERATOR),
            ("NLB_VIEWER_TOKEN", NLB_VIEWER),
        ],
    )
    .await;
    let good = echo(&sb, &nlb, "echo-good", &[("MODULE_TOKEN", NLB_MODULE)]).await;
    let wrong = echo(&sb, &nlb, "echo-wrong", &[("MODULE_TOKEN", WRONG)]).await;
    let none = echo(&sb, &nlb, "echo-none", &[]).await;
    let viewer = echo(&sb, &nlb, "echo-viewer", &[("MODULE_TOKEN", NLB_VIEWER)]).await;
    good.wait_registered().await;
    let st = good.status().await;
    assert_eq!(st["nlb"]["registered"], true, "{st}");
    let got = nlb
        .client()
        .await
        .get_module_info(bearer(
            GetModuleInfoRequest {
                instance_id: "echo-good".into(),
            },
            NLB_OPERATOR,
        ))
        .await
        .expect("GetModuleInfo as operator")
        .into_inner();
    let inst = got.instance.unwrap();
    assert_eq!(inst.address, good.grpc_addr);
    assert_eq!(inst.health_status, HealthStatus::Healthy as i32);

    // The others keep trying, stay unready, say why, and keep running.
    for (m, code) in [
        (&wrong, "UNAUTHENTICATED"),
        (&none, "UNAUTHENTICATED"),
        (&viewer, "PERMISSION_DENIED"),
    ] {
        m.eventually("two refused registrations", || async {
            let text = m.try_get("/metrics").await?.body;
            metric_value(&text, r#"module_registrations_total{result="error"}"#)
                .filter(|n| *n >= 2.0)
        })
        .await;
        let ready = m.get("/readyz").await;
        assert_eq!(ready.status, 503, "{}", ready.body);
        assert!(ready.body.contains("not ready"), "{}", ready.body);
        let st = m.status().await;
        assert_eq!(st["phase"], "starting", "{st}");
        assert_eq!(st["nlb"]["registered"], false, "{st}");
        let err = st["nlb"]["last_error"].as_str().unwrap_or_default();
        assert!(
            err.contains("registration") && err.contains(code),
            "{code}: {st}"
        );
        let text = m.get("/metrics").await.body;
        assert_eq!(
            metric_value(&text, r#"module_registrations_total{result="ok"}"#),
            Some(0.0)
        );
    }
    let mut wrong = wrong;
    let mut none = none;
    let mut viewer = viewer;
    for m in [&mut wrong, &mut none, &mut viewer] {
        assert!(m.try_exit().is_none(), "a refused module keeps running");
    }
    // The NLB never heard of them.
    let mut c = nlb.client().await;
    for id in ["echo-wrong", "echo-none", "echo-viewer"] {
        assert_status(
            c.get_module_info(bearer(
                GetModuleInfoRequest {
                    instance_id: id.into(),
                },
                NLB_VIEWER,
            ))
            .await,
            Code::NotFound,
            &[id],
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_are_open_and_every_change_needs_a_token() {
    let sb = Sandbox::new();
    let (_nlb, m) = guarded_stack(&sb, "echo-guard").await;
    let mut c = m.client().await;

    // Reads need no token.
    let s = c
        .get_status(GetStatusRequest::default())
        .await
        .expect("GetStatus without a token")
        .into_inner();
    assert_eq!(s.details["auth"], "on");
    assert_eq!(s.instance.unwrap().instance_id, "echo-guard");
    let routes = c
        .get_routes(GetRoutesRequest::default())
        .await
        .expect("GetRoutes without a token")
        .into_inner()
        .routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].route_id, "echo");
    let h = c
        .health_check(HealthCheckRequest {
            instance_id: String::new(),
            deep_check: true,
        })
        .await
        .expect("HealthCheck without a token")
        .into_inner();
    assert_eq!(h.status, HealthStatus::Healthy as i32);
    assert_eq!(h.checks["nlb"], "registered");
    c.get_rate_limits(GetRateLimitsRequest::default())
        .await
        .expect("GetRateLimits");
    c.get_metrics(GetMetricsRequest::default())
        .await
        .expect("GetMetrics");
    c.get_instances(GetInstancesRequest::default())
        .await
        .expect("GetInstances");
    c.get_active_version(GetActiveVersionRequest::default())
        .await
        .expect("GetActiveVersion");
    c.get_config(GetConfigRequest::default())
        .await
        .expect("GetConfig");
    c.get_stats(GetStatsRequest::default())
        .await
        .expect("GetStats without reset");
    let can = c
        .can_handle(CanHandleRequest {
            route: Some(pb::Route {
                route_id: "t".into(),
                protocol: Protocol::Tcp as i32,
                ..pb::Route::default()
            }),
            context: HashMap::new(),
        })
        .await
        .expect("CanHandle")
        .into_inner();
    assert!(can.can_handle);
    let checked = c
        .update_config(UpdateConfigRequest {
            instance_id: String::new(),
            config: Some(ConfigUpdate {
                config_type: "greeting".into(),
                config_data: b"just checking".to_vec(),
                ..ConfigUpdate::default()
            }),
            validate_only: true,
        })
        .await
        .expect("UpdateConfig validate_only is a read")
        .into_inner();
    assert!(checked.success, "{checked:?}");

    // Every change without a token: UNAUTHENTICATED, naming the method.
    refused(c.reload(ReloadRequest::default()).await, "Reload");
    refused(
        c.shutdown(ShutdownRequest {
            instance_id: String::new(),
            graceful: true,
            timeout_seconds: 5,
        })
        .await,
        "Shutdown",
    );
    refused(
        c.update_routes(UpdateRoutesRequest {
            instance_id: String::new(),
            routes: vec![],
            replace_all: true,
        })
        .await,
        "UpdateRoutes",
    );
    refused(
        c.delete_route(DeleteRouteRequest {
            instance_id: String::new(),
            route_id: "echo".into(),
        })
        .await,
        "DeleteRoute",
    );
    refused(c.set_rate_limit(limit("*")).await, "SetRateLimit");
    refused(
        c.remove_rate_limit(RemoveRateLimitRequest {
            instance_id: String::new(),
            limit_id: "rl-1".into(),
        })
        .await,
        "RemoveRateLimit",
    );
    refused(
        c.scale(ScaleRequest {
            instance_id: String::new(),
            config: Some(ScalingConfig {
                min_instances: 1,
                max_instances: 2,
                ..ScalingConfig::default()
            }),
            immediate: true,
        })
        .await,
        "Scale",
    );
    refused(
        c.set_traffic_weight(SetTrafficWeightRequest {
            instance_id: String::new(),
            version: "0.2.0".into(),
            weight: 50,
        })
        .await,
        "SetTrafficWeight",
    );
    refused(
        c.promote_version(PromoteVersionRequest {
            instance_id: String::new(),
            version: "0.2.0".into(),
            immediate: true,
            promotion_rate: 0,
        })
        .await,
        "PromoteVersion",
    );
    refused(
        c.rollback(RollbackRequest {
            instance_id: String::new(),
            target_version: "0.0.9".into(),
        })
        .await,
        "Rollback",
    );
    refused(
        c.update_config(UpdateConfigRequest {
            instance_id: String::new(),
            config: Some(ConfigUpdate {
                config_type: "greeting".into(),
                config_data: b"taken over".to_vec(),
                ..ConfigUpdate::default()
            }),
            validate_only: false,
        })
        .await,
        "UpdateConfig",
    );
    refused(
        c.get_stats(GetStatsRequest {
            instance_id: String::new(),
            reset_counters: true,
        })
        .await,
        "GetStats",
    );

    // Nothing changed.
    let routes = c
        .get_routes(GetRoutesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(routes.len(), 1);
    assert!(limit_targets(&mut c).await.is_empty());
    let v = c
        .get_active_version(GetActiveVersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.active_version, "0.1.0");
    assert_eq!(
        v.version_weights,
        HashMap::from([("0.1.0".to_string(), 100)])
    );
    let conn = m.connect().await;
    assert!(
        conn.greeting.starts_with("hello from echo ("),
        "{:?}",
        conn.greeting
    );
    assert!(
        audit_lines(&m).is_empty(),
        "no change was allowed: {:?}",
        audit_lines(&m)
    );
    let ready = m.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_and_nlb_tokens_are_accepted_in_either_header() {
    let sb = Sandbox::new();
    let (_nlb, mut m) = guarded_stack(&sb, "echo-tokens").await;
    let mut c = m.client().await;

    // A token the module does not know, in either header.
    unknown_token(
        c.set_rate_limit(bearer(limit("*"), WRONG)).await,
        "SetRateLimit",
    );
    unknown_token(
        c.set_rate_limit(with_header(limit("*"), "x-api-key", WRONG))
            .await,
        "SetRateLimit",
    );
    // A known token without the Bearer scheme is not a bearer token.
    refused(
        c.set_rate_limit(with_header(limit("*"), "authorization", MOD_OPERATOR))
            .await,
        "SetRateLimit",
    );
    assert!(limit_targets(&mut c).await.is_empty());

    // The operator token as a bearer token, the nlb token as x-api-key,
    // and the other way round.
    let r = c
        .set_rate_limit(bearer(limit("route:a"), MOD_OPERATOR))
        .await
        .expect("SetRateLimit with the operator token")
        .into_inner();
    assert!(r.success && r.message.contains("rl-1"), "{r:?}");
    c.set_rate_limit(with_header(limit("route:b"), "x-api-key", MOD_NLB))
        .await
        .expect("SetRateLimit with the nlb token as x-api-key");
    c.set_rate_limit(bearer(limit("route:c"), MOD_NLB))
        .await
        .expect("SetRateLimit with the nlb token as a bearer token");
    c.set_rate_limit(with_header(limit("route:d"), "x-api-key", MOD_OPERATOR))
        .await
        .expect("SetRateLimit with the operator token as x-api-key");
    assert_eq!(
        limit_targets(&mut c).await,
        pairs(&[
            ("rl-1", "route:a"),
            ("rl-2", "route:b"),
            ("rl-3", "route:c"),
            ("rl-4", "route:d")
        ])
    );
    // Each allowed change is audited with the caller and its role.
    assert_eq!(
        audited(&m),
        triples(&[
            ("SetRateLimit", "MODULE_OPERATOR_TOKEN", "operator"),
            ("SetRateLimit", "MODULE_NLB_TOKEN", "nlb"),
            ("SetRateLimit", "MODULE_NLB_TOKEN", "nlb"),
            ("SetRateLimit", "MODULE_OPERATOR_TOKEN", "operator"),
        ])
    );

    // Shutdown: refused without a token and with a wrong one (the module
    // keeps serving), done with the nlb token.
    refused(
        c.shutdown(ShutdownRequest {
            instance_id: String::new(),
            graceful: true,
            timeout_seconds: 5,
        })
        .await,
        "Shutdown",
    );
    unknown_token(
        c.shutdown(bearer(
            ShutdownRequest {
                instance_id: String::new(),
                graceful: true,
                timeout_seconds: 5,
            },
            WRONG,
        ))
        .await,
        "Shutdown",
    );
    assert!(m.try_exit().is_none());
    let mut conn = m.connect().await;
    assert_eq!(conn.ask("still up").await.as_deref(), Some("still up"));
    drop(conn);
    let r = c
        .shutdown(with_header(
            ShutdownRequest {
                instance_id: String::new(),
                graceful: true,
                timeout_seconds: 5,
            },
            "x-api-key",
            MOD_NLB,
        ))
        .await
        .expect("Shutdown with the nlb token")
        .into_inner();
    assert!(r.success, "{r:?}");
    let status = m.wait_exit().await;
    assert!(status.success(), "exit {status}; stderr:\n{}", m.stderr());
    assert_eq!(
        audited(&m).last(),
        Some(&(
            "Shutdown".to_string(),
            "MODULE_NLB_TOKEN".to_string(),
            "nlb".to_string()
        )),
        "{}",
        m.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_rereads_the_tokens_file() {
    let sb = Sandbox::new();
    let tokens = sb.path().join("module-tokens.yaml");
    let old = "e2e-old-operator-token-01234567";
    let new = "e2e-new-operator-token-01234567";
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: ops-old, role: operator, token: {old}}}\n"),
    )
    .unwrap();
    let nlb = nlb_with(&sb, &[]).await;
    let m = echo(
        &sb,
        &nlb,
        "echo-rotate",
        &[("MODULE_TOKENS_FILE", tokens.to_str().unwrap())],
    )
    .await;
    m.wait_registered().await;
    let mut c = m.client().await;
    c.set_rate_limit(bearer(limit("route:a"), old))
        .await
        .expect("the old token works");
    unknown_token(
        c.set_rate_limit(bearer(limit("route:b"), new)).await,
        "SetRateLimit",
    );

    // Rotate: the file now names the new token; Reload (with the old one).
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: ops-new, role: operator, token: {new}}}\n"),
    )
    .unwrap();
    let r = c
        .reload(bearer(ReloadRequest::default(), old))
        .await
        .expect("Reload")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert!(r.message.contains("1 token(s) in force"), "{r:?}");
    unknown_token(
        c.set_rate_limit(bearer(limit("route:c"), old)).await,
        "SetRateLimit",
    );
    c.set_rate_limit(bearer(limit("route:d"), new))
        .await
        .expect("the new token works");

    // A broken file keeps the tokens in force.
    std::fs::write(
        &tokens,
        "tokens:\n  - {name: short, role: operator, token: short}\n",
    )
    .unwrap();
    let r = c
        .reload(bearer(ReloadRequest::default(), new))
        .await
        .expect("Reload")
        .into_inner();
    assert!(!r.success, "{r:?}");
    assert!(
        r.message.contains("module-tokens.yaml") && r.message.contains("16"),
        "{r:?}"
    );
    c.set_rate_limit(bearer(limit("route:e"), new))
        .await
        .expect("the new token still works");
    assert_eq!(
        limit_targets(&mut c).await,
        pairs(&[
            ("rl-1", "route:a"),
            ("rl-2", "route:d"),
            ("rl-3", "route:e")
        ])
    );
    assert_eq!(
        audited(&m),
        triples(&[
            ("SetRateLimit", "ops-old", "operator"),
            ("Reload", "ops-old", "operator"),
            ("SetRateLimit", "ops-new", "operator"),
            ("Reload", "ops-new", "operator"),
            ("SetRateLimit", "ops-new", "operator"),
        ])
    );
}

fn scale_to(n: i32) -> TriggerScalingRequest {
    TriggerScalingRequest {
        instance_id: String::new(),
        module_type: ModuleType::Alb as i32,
        scaling_action: "scale_to".into(),
        target_instances: n,
        config: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_nlb_presents_its_call_token_when_it_drives_a_module() {
    let sb = Sandbox::new();
    let nlb = nlb_with(&sb, &[("NLB_MODULE_CALL_TOKEN", MOD_NLB)]).await;
    let m = echo(
        &sb,
        &nlb,
        "echo-driven",
        &[
            ("MODULE_OPERATOR_TOKEN", MOD_OPERATOR),
            ("MODULE_NLB_TOKEN", MOD_NLB),
        ],
    )
    .await;
    m.wait_registered().await;
    // The module let the NLB's Scale through: it fails only for want of a
    // scaler, and the NLB says so.
    assert_status(
        nlb.client().await.trigger_scaling(scale_to(3)).await,
        Code::FailedPrecondition,
        &["echo-driven", "cannot scale", "no scaler"],
    );
    assert_eq!(
        audited(&m),
        triples(&[("Scale", "MODULE_NLB_TOKEN", "nlb")])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_refuses_an_nlb_without_its_call_token() {
    let sb = Sandbox::new();
    let guarded = [
        ("MODULE_OPERATOR_TOKEN", MOD_OPERATOR),
        ("MODULE_NLB_TOKEN", MOD_NLB),
    ];
    // An NLB with no call token, and one with a token the module does not
    // know.
    let plain = nlb_with(&sb, &[]).await;
    let stranger = nlb_with(&sb, &[("NLB_MODULE_CALL_TOKEN", WRONG)]).await;
    let m1 = echo(&sb, &plain, "echo-plain", &guarded).await;
    let m2 = echo(&sb, &stranger, "echo-stranger", &guarded).await;
    m1.wait_registered().await;
    m2.wait_registered().await;

    // The module's UNAUTHENTICATED comes back through the NLB as it is.
    assert_status(
        plain.client().await.trigger_scaling(scale_to(3)).await,
        Code::Unauthenticated,
        &["echo-plain", "Scale", "operator or nlb token"],
    );
    assert_status(
        stranger.client().await.trigger_scaling(scale_to(3)).await,
        Code::Unauthenticated,
        &["echo-stranger", "Scale", "not one this module knows"],
    );
    for m in [&m1, &m2] {
        assert!(audit_lines(m).is_empty(), "{:?}", audit_lines(m));
        let ready = m.get("/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.body);
    }
}

// Bugs found: each test asserts what the docs promise and is ignored until
// the code does it.

#[tokio::test(flavor = "multi_thread")]
async fn the_nlb_can_ask_a_module_to_scale_to_zero() {
    let sb = Sandbox::new();
    let nlb = nlb_with(&sb, &[("NLB_MODULE_CALL_TOKEN", MOD_NLB)]).await;
    let m = echo(&sb, &nlb, "echo-zero", &[("MODULE_NLB_TOKEN", MOD_NLB)]).await;
    m.wait_registered().await;
    // Like any other target, it reaches Scale, which says there is no scaler.
    assert_status(
        nlb.client().await.trigger_scaling(scale_to(0)).await,
        Code::FailedPrecondition,
        &["echo-zero", "no scaler"],
    );
    assert_status(
        nlb.client()
            .await
            .trigger_scaling(TriggerScalingRequest {
                scaling_action: "scale_down".into(),
                ..scale_to(0)
            })
            .await,
        Code::FailedPrecondition,
        &["echo-zero", "no scaler"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reload_keeps_the_tokens_in_force() {
    let sb = Sandbox::new();
    let tokens = sb.path().join("module-tokens.yaml");
    let old = "e2e-old-operator-token-01234567";
    let new = "e2e-new-operator-token-01234567";
    let entry = |name: &str, token: &str| {
        format!("tokens:\n  - {{name: {name}, role: operator, token: {token}}}\n")
    };
    std::fs::write(&tokens, entry("ops-old", old)).unwrap();
    let config = |module: &str| format!("auth:\n  tokens_file: {}\n{module}", tokens.display());
    let nlb = nlb_with(&sb, &[]).await;
    let m = start_echo(
        sb.path(),
        &nlb.grpc_addr,
        &ModuleLaunch {
            instance_id: Some("echo-partial".into()),
            config: Some(config("module:\n  greeting: first\n")),
            env: vec![],
        },
    )
    .await;
    m.wait_registered().await;
    let mut c = m.client().await;
    // A new tokens file, and a module section echo refuses.
    std::fs::write(&tokens, entry("ops-new", new)).unwrap();
    std::fs::write(
        m.config_path.as_ref().unwrap(),
        config("module:\n  greeting: second\n  colour: blue\n"),
    )
    .unwrap();
    let r = c
        .reload(bearer(ReloadRequest::default(), old))
        .await
        .expect("Reload")
        .into_inner();
    assert!(!r.success, "{r:?}");
    assert!(r.message.contains("the config in force stays"), "{r:?}");
    // So the old token still works and the new one does not yet.
    c.set_rate_limit(bearer(limit("route:a"), old))
        .await
        .expect("the token in force before the failed reload");
    unknown_token(
        c.set_rate_limit(bearer(limit("route:b"), new)).await,
        "SetRateLimit",
    );
}
