//! Control API security with the real `nlb` binary: the warning when it runs
//! open, token auth from the environment and a tokens file, SIGHUP re-reading
//! the tokens, the audit trail as JSON log lines, and `--check-config`
//! loading the files the config names.

use e2e::{run_nlb, Launch, Sandbox};
use shared_types::pb;
use tonic::Code;

const OPERATOR: &str = "e2e-operator-token-0123456789";
const VIEWER: &str = "e2e-viewer-token-0123456789";

fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn routes() -> pb::UpdateRoutingRequest {
    pb::UpdateRoutingRequest {
        routes: vec![pb::Route {
            route_id: "web".into(),
            protocol: pb::Protocol::Http as i32,
            destination_port: 80,
            metadata: [("module_type".to_string(), "alb".to_string())].into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The JSON log lines of target `audit`.
fn audit_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "audit")
        .collect()
}

#[tokio::test]
async fn an_open_nlb_says_so_at_start() {
    let sandbox = Sandbox::new();
    sandbox.write_config("");
    let nlb = sandbox.start().await;
    let err = nlb.stderr();
    assert!(
        err.contains("CONTROL API AUTHENTICATION IS OFF"),
        "no warning in:\n{err}"
    );
    let status = nlb.get("/status").await;
    let doc: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(doc["auth"], "off");
}

#[tokio::test]
async fn operator_changes_leave_audit_lines_and_sighup_rereads_the_tokens() {
    let sandbox = Sandbox::new();
    let tokens = sandbox.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: grafana, role: viewer, token: {VIEWER}}}\n"),
    )
    .unwrap();
    sandbox.write_config(&format!(
        "auth: {{tokens_file: {:?}, reload_interval_seconds: 0}}\n",
        tokens.display().to_string()
    ));
    let nlb = sandbox
        .start_with(Launch {
            env: vec![
                ("NLB_OPERATOR_TOKEN".into(), OPERATOR.into()),
                ("NLB_LOG_FORMAT".into(), "json".into()),
            ],
            ..Launch::default()
        })
        .await;
    assert!(!nlb.stderr().contains("AUTHENTICATION IS OFF"));
    let mut c = nlb.client().await;

    let err = c
        .list_modules(pb::ListModulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let ok = c
        .update_routing(bearer(routes(), OPERATOR))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.success, "{}", ok.message);
    let denied = c
        .update_routing(bearer(routes(), VIEWER))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let lines = nlb
        .eventually("two audit lines", || async {
            let l = audit_lines(&nlb.stderr());
            (l.len() >= 2).then_some(l)
        })
        .await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let (first, second) = (&lines[0]["fields"], &lines[1]["fields"]);
    assert_eq!(first["who"], "env:operator");
    assert_eq!(first["role"], "operator");
    assert_eq!(first["method"], "UpdateRouting");
    assert_eq!(first["result"], "ok");
    assert!(
        first["what"].as_str().unwrap().contains("1 routes [web]"),
        "{first}"
    );
    assert!(
        first["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{first}"
    );
    assert!(!first["request_id"].as_str().unwrap().is_empty(), "{first}");
    assert!(first["at_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(second["who"], "grafana");
    assert_eq!(second["result"], "denied");
    assert!(
        second["detail"]
            .as_str()
            .unwrap()
            .contains("needs an operator token"),
        "{second}"
    );
    let metrics = nlb.get("/metrics").await.body;
    assert_eq!(
        e2e::metric_value(
            &metrics,
            "nlb_audit_events_total{method=\"UpdateRouting\",result=\"ok\"}"
        ),
        Some(1.0)
    );

    // A new tokens file applies on SIGHUP (the periodic check is off here).
    let new_viewer = "e2e-new-viewer-token-0123456789";
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: grafana, role: viewer, token: {new_viewer}}}\n"),
    )
    .unwrap();
    nlb.signal("HUP");
    nlb.eventually("the new viewer token works", || {
        let mut c = c.clone();
        async move {
            c.list_modules(bearer(pb::ListModulesRequest::default(), new_viewer))
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    let old = c
        .list_modules(bearer(pb::ListModulesRequest::default(), VIEWER))
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn check_config_loads_the_tokens_and_certificate_files() {
    let sandbox = Sandbox::new();
    let tokens = sandbox.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens: [{name: a, role: admin, token: 0123456789abcdefgh}]",
    )
    .unwrap();
    sandbox.write_config(&format!(
        "auth: {{tokens_file: {:?}}}\n",
        tokens.display().to_string()
    ));
    let config = sandbox.config_path();
    let out = run_nlb(
        &["--check-config", config.to_str().unwrap()],
        &[],
        sandbox.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokens.yaml") && err.contains("role \"admin\""),
        "{err}"
    );

    sandbox.write_config(
        "tls: {grpc: {cert_file: /nonexistent/nlb.crt, key_file: /nonexistent/nlb.key}}\n",
    );
    let out = run_nlb(
        &["--check-config", config.to_str().unwrap()],
        &[],
        sandbox.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/nlb.crt"), "{err}");
}
