//! `nlb --check-config FILE`: exit codes and messages that name each bad key.

use std::process::Output;

use e2e::{run_nlb, Sandbox};

fn check(sandbox: &Sandbox, file: &std::path::Path) -> Output {
    run_nlb(
        &["--check-config", file.to_str().expect("utf-8 path")],
        &[],
        sandbox.path(),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The stderr line that names `key` as the bad key (`<file>: <key>: why`).
fn line_for<'a>(stderr: &'a str, key: &str) -> &'a str {
    let needle = format!(": {key}: ");
    stderr
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no line names key {key:?}; stderr:\n{stderr}"))
}

#[test]
fn a_valid_file_passes() {
    let sb = Sandbox::new();
    sb.write_config(
        r#"
grpc:
  listen: "127.0.0.1:50551"
  max_message_bytes: 1048576
admin:
  listen: "127.0.0.1:9590"
backends:
  web: ["127.0.0.1:8081", "localhost:8082"]
routes:
  - route_id: web-http
    protocol: http
    destination_pattern: "*.example.com"
    destination_port: 8080
    metadata: { backend: web }
  - route_id: alb-tls
    protocol: HTTPS
    priority: 10
    metadata: { module_type: alb }
traffic_weights:
  alb: { v1: 70, v2: 30 }
registry:
  removal_grace_seconds: 60
"#,
    );
    let out = check(&sb, &sb.config_path());
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {}; stdout:\n{stdout}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("valid"), "stdout: {stdout}");
    assert!(
        stdout.contains(&sb.config_path().display().to_string()),
        "stdout names the file: {stdout}"
    );
}

#[test]
fn every_problem_in_a_file_is_named_by_its_key() {
    let sb = Sandbox::new();
    sb.write_config(
        r#"
upstreams: []
grpc:
  lisen: "127.0.0.1:50051"
admin:
  listen: "nope"
backends:
  web: ["127.0.0.1:0"]
routes:
  - route_id: web-http
    protocol: http
    destination_port: 70000
    metadata: { backend: web }
traffic_weights:
  alb: { v1: 60, v2: 30 }
"#,
    );
    let out = check(&sb, &sb.config_path());
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "a bad file must fail; stderr:\n{stderr}"
    );
    assert!(
        !text(&out.stdout).contains("valid"),
        "stdout must not say valid: {}",
        text(&out.stdout)
    );

    let l = line_for(&stderr, "upstreams");
    assert!(l.contains("unknown key"), "{l}");
    assert!(
        l.contains("grpc") && l.contains("routes"),
        "lists the known sections: {l}"
    );

    let l = line_for(&stderr, "grpc");
    assert!(l.contains("lisen"), "names the misspelt key: {l}");
    assert!(l.contains("listen"), "names the expected key: {l}");

    let l = line_for(&stderr, "admin.listen");
    assert!(l.contains("\"nope\"") && l.contains("ip:port"), "{l}");

    let l = line_for(&stderr, "routes[0].destination_port");
    assert!(l.contains("70000") && l.contains("65535"), "{l}");

    let l = line_for(&stderr, "backends.web[0]");
    assert!(l.contains("127.0.0.1:0") && l.contains("1 to 65535"), "{l}");

    let l = line_for(&stderr, "traffic_weights.alb");
    assert!(l.contains("90") && l.contains("100"), "{l}");

    assert!(
        stderr.contains("6 problem(s)"),
        "counts the problems; stderr:\n{stderr}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let sb = Sandbox::new();
    let missing = sb.path().join("does-not-exist.yaml");
    let out = check(&sb, &missing);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("cannot read {}", missing.display())),
        "names the path and says it cannot be read; stderr:\n{stderr}"
    );
}

#[test]
fn garbage_is_not_yaml() {
    let sb = Sandbox::new();
    std::fs::write(sb.config_path(), "grpc: {listen: [\n\t:::: }}}\n\u{1}\u{2}").unwrap();
    let out = check(&sb, &sb.config_path());
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains("not valid YAML"),
        "says the file is not YAML; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&sb.config_path().display().to_string()),
        "names the file; stderr:\n{stderr}"
    );
}

#[test]
fn yaml_that_is_not_a_mapping_is_refused() {
    let sb = Sandbox::new();
    sb.write_config("- just\n- a list\n");
    let out = check(&sb, &sb.config_path());
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains("must be a YAML mapping of sections"),
        "stderr:\n{stderr}"
    );
}
