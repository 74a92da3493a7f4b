//! `nlbctl` against a real `nlb` with security on: exit codes per token role
//! (no token, a wrong one, viewer, module, operator), tokens from the flag,
//! a file and the environment, and TLS with client certificates.

use e2e::nlbctl::nlbctl;
use e2e::pki::Pki;
use e2e::{Launch, NlbProcess, Sandbox};

const OPERATOR: &str = "ctl-operator-token-0123456789";
const VIEWER: &str = "ctl-viewer-token-0123456789";
const MODULE: &str = "ctl-module-token-0123456789";

const CONFIG: &str = "health: {active_checks: false}\nbackends:\n  pg: [\"127.0.0.1:5432\"]\n";

async fn start_with_tokens(sb: &Sandbox) -> NlbProcess {
    sb.write_config(CONFIG);
    sb.start_with(Launch {
        env: [
            ("NLB_OPERATOR_TOKEN", OPERATOR),
            ("NLB_VIEWER_TOKEN", VIEWER),
            ("NLB_MODULE_TOKEN", MODULE),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Launch::default()
    })
    .await
}

/// Runs `nlbctl --addr ADDR <line>` with `env`, returning the exit code.
async fn code(addr: &str, line: &str, env: &[(&str, &str)]) -> i32 {
    let mut args = vec!["--addr", addr];
    args.extend(line.split_whitespace());
    let run = nlbctl(&args, env).await;
    run.code
        .unwrap_or_else(|| panic!("nlbctl {line} was killed; stderr:\n{}", run.stderr))
}

#[tokio::test]
async fn exit_codes_follow_the_token_role() {
    let sb = Sandbox::new();
    let nlb = start_with_tokens(&sb).await;
    let at = nlb.grpc_addr.as_str();
    let routes = sb.path().join("routes.yaml");
    std::fs::write(
        &routes,
        "- {route_id: db, protocol: postgres, destination_port: 5432, metadata: {backend: pg}}\n",
    )
    .unwrap();
    let routes = routes.display().to_string();
    let routing = sb.path().join("routing.yaml");
    std::fs::write(&routing, "sticky: true\n").unwrap();
    let routing = routing.display().to_string();

    // No token, or one the NLB does not know: 4, and the message says why.
    let run = nlbctl(&["--addr", at, "modules", "list"], &[]).await;
    run.expect_code(4);
    assert!(run.stderr.contains("UNAUTHENTICATED"), "{}", run.stderr);
    assert!(!run.stderr.contains(OPERATOR));
    assert_eq!(
        code(at, "--token wrong-token-0123456789 status", &[]).await,
        4
    );

    // A viewer reads, dry-runs and validates; changes are 4.
    let viewer = [("NLBCTL_TOKEN", VIEWER)];
    for read in [
        "modules list",
        "status",
        "routes show",
        "load",
        "config show routing",
        "metrics",
    ] {
        assert_eq!(code(at, read, &viewer).await, 0, "viewer: {read}");
    }
    assert_eq!(
        code(
            at,
            "routes dry-run --protocol postgres --port 5432",
            &viewer
        )
        .await,
        7,
        "no route yet: a negative answer, not a refusal"
    );
    let validate = format!("routes apply --validate-only {routes}");
    assert_eq!(code(at, &validate, &viewer).await, 0);
    let validate = format!("config validate routing {routing}");
    assert_eq!(code(at, &validate, &viewer).await, 0);
    for change in [
        format!("routes apply {routes}"),
        format!("config apply routing {routing}"),
        "rebalance".to_string(),
        "scale alb --to 2".to_string(),
    ] {
        assert_eq!(code(at, &change, &viewer).await, 4, "viewer: {change}");
    }

    // A module token may not use nlbctl's commands at all.
    assert_eq!(code(at, &format!("--token {MODULE} status"), &[]).await, 4);

    // The operator, from a token file: changes apply.
    let token_file = sb.path().join("operator.token");
    std::fs::write(&token_file, format!("{OPERATOR}\n")).unwrap();
    let op = [("NLBCTL_TOKEN_FILE", token_file.to_str().unwrap())];
    assert_eq!(code(at, &format!("routes apply {routes}"), &op).await, 0);
    assert_eq!(
        code(
            at,
            "routes dry-run --protocol postgres --port 5432",
            &viewer
        )
        .await,
        0,
        "the operator's route is in force"
    );
    assert_eq!(
        code(at, &format!("config apply routing {routing}"), &op).await,
        0
    );
}

#[tokio::test]
async fn tls_and_client_certificates_against_the_real_nlb() {
    let sb = Sandbox::new();
    let pki = Pki::generate(&["localhost", "127.0.0.1"]);
    let files = pki.write(sb.path());
    sb.write_config(&format!(
        "{CONFIG}tls:\n  grpc: {{cert_file: {:?}, key_file: {:?}, client_ca_file: {:?}}}\n",
        files.server_cert, files.server_key, files.ca
    ));
    let nlb = sb.start().await;
    let at = nlb.grpc_addr.as_str();
    let (ca, cert, key) = (
        files.ca.to_str().unwrap(),
        files.client_cert.to_str().unwrap(),
        files.client_key.to_str().unwrap(),
    );

    let run = nlbctl(
        &[
            "--addr",
            at,
            "--ca-cert",
            ca,
            "--cert",
            cert,
            "--key",
            key,
            "status",
            "--json",
        ],
        &[],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.json()["details"]["grpc_tls"], "mutual");
    // The same through the environment.
    let env = [
        ("NLBCTL_CA_CERT", ca),
        ("NLBCTL_CERT", cert),
        ("NLBCTL_KEY", key),
    ];
    assert_eq!(code(at, "modules list", &env).await, 0);

    // No client certificate, or plaintext: the NLB cannot be reached (3).
    assert_eq!(code(at, &format!("--ca-cert {ca} status"), &[]).await, 3);
    assert_eq!(code(at, "status", &[]).await, 3);
    // A CA that did not sign the server's certificate: 3 as well.
    let other = Pki::generate(&["localhost"]);
    let other_ca = sb.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.ca).unwrap();
    let line = format!(
        "--ca-cert {} --cert {cert} --key {key} status",
        other_ca.display()
    );
    assert_eq!(code(at, &line, &[]).await, 3);
}
