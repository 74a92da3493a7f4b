//! The config model through its public API: validation naming every bad key,
//! layering (file, API layer, environment), the atomic state file, and
//! restart-only sections.

use std::path::Path;

use nlb::config::{self, ConfigStore, NlbConfig, Sections, StateFile};

fn sections(yaml: &str) -> Sections {
    config::parse_sections(yaml).expect("test YAML parses")
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn keys(errors: &[config::ConfigError]) -> Vec<String> {
    errors.iter().map(|e| e.key.clone()).collect()
}

fn yaml(text: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(text).expect("test YAML parses")
}

#[test]
fn an_empty_config_is_the_documented_defaults() {
    let c = config::merge(&Sections::new(), &Sections::new(), &no_env).unwrap();
    assert_eq!(c, NlbConfig::default());
    assert_eq!(c.grpc.listen, "127.0.0.1:50051");
    assert_eq!(c.admin.listen, "127.0.0.1:9090");
    assert_eq!(c.state_file, Path::new("nlb.state.json"));
    assert_eq!(c.grpc.max_message_bytes, 4 * 1024 * 1024);
    assert_eq!(c.registry.drain_timeout_seconds, 30);
    assert!(c.health.active_checks);
    assert!(!c.routing.sticky);
}

#[test]
fn every_bad_key_is_named_with_its_reason() {
    let text = r#"
upstreams: []
grpc: {lisen: "0.0.0.0:1"}
admin: {listen: "nope"}
registry: {removal_grace_seconds: 0}
backends:
  pg: ["db:0", "db:5432"]
  "bad name": ["x:1"]
routes:
  - {route_id: web, protocol: http, destination_port: 70000, metadata: {module_type: alb}}
  - {route_id: web, protocol: gopher, metadata: {module_type: alb}}
  - {route_id: db, protocol: postgres, source_pattern: "10.0.0.0/33", metadata: {backend: missing}}
  - {route_id: udp, protocol: udp, metadata: {module_type: rtmp}}
traffic_weights:
  alb: {v1: 60, v2: 30}
  nginx: {v1: 100}
"#;
    let errors = config::check(&sections(text)).unwrap_err();
    let k = keys(&errors);
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for want in [
        "upstreams",
        "grpc",
        "admin.listen",
        "registry.removal_grace_seconds",
        "backends.pg[0]",
        "backends.bad name",
        "routes[0].destination_port",
        "routes[1].protocol",
        "routes[2].source_pattern",
        "routes[3].protocol",
        "traffic_weights.alb",
        "traffic_weights.nginx",
    ] {
        assert!(
            k.iter().any(|x| x == want),
            "{want} not named in {shown:#?}"
        );
    }
    let find = |key: &str| {
        shown
            .iter()
            .find(|t| t.starts_with(&format!("{key}:")))
            .unwrap()
            .clone()
    };
    assert!(find("grpc").contains("lisen"), "{}", find("grpc"));
    assert!(find("traffic_weights.alb").contains("sum to 90"));
    assert!(find("routes[0].destination_port").contains("70000"));
    assert!(find("upstreams").contains("unknown key"));
    // The backend of routes[2] is checked once the route is otherwise valid.
    let fixed = text.replace("10.0.0.0/33", "10.0.0.0/8");
    let errors = config::check(&sections(&fixed)).unwrap_err();
    assert!(keys(&errors).contains(&"routes[2].metadata.backend".to_string()));
}

#[test]
fn layers_apply_file_then_api_then_environment() {
    let file = sections(
        "grpc: {listen: '127.0.0.1:1000', max_message_bytes: 2048}\nrouting: {sticky: false}",
    );
    let api = sections("routing: {sticky: true}\ngrpc: {listen: '127.0.0.1:2000'}");
    let env = |k: &str| (k == "NLB_GRPC_LISTEN").then(|| "127.0.0.1:3000".to_string());
    let c = config::merge(&file, &api, &env).unwrap();
    assert_eq!(c.grpc.listen, "127.0.0.1:3000", "environment wins");
    assert_eq!(
        c.grpc.max_message_bytes,
        4 * 1024 * 1024,
        "an API section replaces the whole file section"
    );
    assert!(c.routing.sticky);
    let bad_env = |k: &str| (k == "NLB_ADMIN_LISTEN").then(|| "localhost".to_string());
    let errors = config::merge(&file, &Sections::new(), &bad_env).unwrap_err();
    assert!(
        errors[0].to_string().contains("NLB_ADMIN_LISTEN"),
        "{}",
        errors[0]
    );
}

#[test]
fn the_state_file_round_trips_and_never_tears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/state.json");
    let state = StateFile::new(&path);
    assert_eq!(
        state.load().unwrap().0.len(),
        0,
        "a missing file is an empty layer"
    );
    let s = sections(
        "traffic_weights: {alb: {v1: 90, v2: 10}}\nroutes: [{route_id: a, protocol: tcp, metadata: {backend: b}}]",
    );
    state.save(&s, 42).unwrap();
    let (back, at) = state.load().unwrap();
    assert_eq!(back, s);
    assert_eq!(at, 42);
    // No temp file is left beside it.
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["state.json".to_string()]);
    std::fs::write(&path, "{not json").unwrap();
    let err = state.load().unwrap_err().to_string();
    assert!(
        err.contains("state.json") && err.contains("not valid"),
        "{err}"
    );
}

#[test]
fn section_updates_validate_persist_and_say_when_a_restart_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nlb.yaml");
    let state = dir.path().join("state.json");
    let write = |body: &str| {
        std::fs::write(&file, format!("state_file: {}\n{body}", state.display())).unwrap();
    };
    write("backends: {pg: ['127.0.0.1:5432']}\n");
    let store = ConfigStore::load(Some(file.clone()), Box::new(no_env)).unwrap();

    let weights = yaml("{alb: {v1: 50, v2: 50}}");
    let dry = store
        .update_section("traffic_weights", weights.clone(), true)
        .unwrap();
    assert!(dry.changed && !dry.requires_restart);
    assert!(
        store.current().traffic_weights.is_empty(),
        "validate_only changes nothing"
    );
    assert!(!state.exists());

    store
        .update_section("traffic_weights", weights, false)
        .unwrap();
    assert_eq!(store.current().traffic_weights["alb"]["v2"], 50);
    assert!(state.exists());

    let grpc = yaml("{listen: '127.0.0.1:6000'}");
    assert!(
        store
            .update_section("grpc", grpc, false)
            .unwrap()
            .requires_restart
    );

    let errors = store
        .update_section("traffic_weights", yaml("{alb: {v1: 50}}"), false)
        .unwrap_err();
    assert_eq!(
        keys(errors.invalid()),
        vec!["traffic_weights.alb".to_string()]
    );
    assert_eq!(
        store.current().traffic_weights["alb"]["v1"],
        50,
        "a refused change keeps the old config"
    );

    // A new store (a restart) re-applies the API layer over the file.
    let again = ConfigStore::load(Some(file.clone()), Box::new(no_env)).unwrap();
    assert_eq!(again.current().traffic_weights["alb"]["v2"], 50);
    assert_eq!(again.current().grpc.listen, "127.0.0.1:6000");
    assert_eq!(
        again.api_sections(),
        vec!["grpc".to_string(), "traffic_weights".to_string()]
    );

    // Reload re-reads the file; the API layer still wins.
    write("backends: {pg: ['127.0.0.1:5433']}\ntraffic_weights: {alb: {v1: 100}}\n");
    let change = again.reload().unwrap();
    assert!(change.changed);
    assert_eq!(
        again.current().backends["pg"],
        vec!["127.0.0.1:5433".to_string()]
    );
    assert_eq!(again.current().traffic_weights["alb"]["v2"], 50);
    std::fs::write(&file, "grpc: [").unwrap();
    assert!(again.reload().is_err());
    assert_eq!(
        again.current().backends["pg"],
        vec!["127.0.0.1:5433".to_string()],
        "a bad file keeps the config in force"
    );
    let unknown = again
        .update_section("bogus", serde_yaml_ng::Value::Null, true)
        .unwrap_err();
    assert_eq!(keys(unknown.invalid()), vec!["bogus".to_string()]);
}

#[test]
fn yaml_routes_convert_to_the_contract_and_back() {
    let c = config::check(&sections(
        "backends: {pg: ['db:5432']}\nroutes: [{route_id: db, protocol: POSTGRES, destination_port: 5432, priority: 5, metadata: {backend: pg}}]",
    ))
    .unwrap();
    let proto = c.routes[0].to_proto();
    assert_eq!(proto.protocol, shared_types::pb::Protocol::Postgres as i32);
    assert_eq!(proto.destination_port, 5432);
    assert_eq!(proto.metadata["backend"], "pg");
    let back = config::RouteConfig::from_proto(&proto);
    assert_eq!(back.protocol, "postgres");
    assert_eq!(back.priority, 5);
}

#[test]
fn a_null_section_returns_to_the_file_and_state_file_is_not_settable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nlb.yaml");
    let state = dir.path().join("state.json");
    std::fs::write(
        &file,
        format!(
            "state_file: {}\nrouting: {{sticky: true}}\n",
            state.display()
        ),
    )
    .unwrap();
    let store = ConfigStore::load(Some(file), Box::new(no_env)).unwrap();
    store
        .update_section("routing", yaml("{sticky: false}"), false)
        .unwrap();
    assert!(!store.current().routing.sticky);
    assert_eq!(store.api_sections(), vec!["routing".to_string()]);
    let back = store
        .update_section("routing", serde_yaml_ng::Value::Null, false)
        .unwrap();
    assert!(back.changed);
    assert!(
        store.current().routing.sticky,
        "the file's section applies again"
    );
    assert!(store.api_sections().is_empty());
    let errors = store
        .update_section("state_file", yaml("/elsewhere.json"), true)
        .unwrap_err();
    assert_eq!(keys(errors.invalid()), vec!["state_file".to_string()]);
    assert!(errors.to_string().contains("NLB_STATE_FILE"));
}

#[test]
fn a_state_file_that_cannot_be_written_refuses_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let file = dir.path().join("nlb.yaml");
    let state = state_dir.join("state.json");
    std::fs::write(&file, format!("state_file: {}\n", state.display())).unwrap();
    let store = ConfigStore::load(Some(file), Box::new(no_env)).unwrap();
    // After start, a file takes the place of the state directory (root
    // ignores permissions, so a read-only directory would not do).
    std::fs::write(&state_dir, "a file where the state directory should be").unwrap();
    let err = store
        .update_section("routing", yaml("{sticky: true}"), false)
        .unwrap_err();
    assert!(matches!(err, config::UpdateError::Persist(_)), "{err}");
    assert!(err.to_string().contains("state.json"), "{err}");
    assert!(!store.current().routing.sticky, "nothing changed");
}

#[test]
fn each_section_has_its_own_update_time() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nlb.yaml");
    let state = dir.path().join("state.json");
    std::fs::write(&file, format!("state_file: {}\n", state.display())).unwrap();
    let store = ConfigStore::load(Some(file), Box::new(no_env)).unwrap();
    let read = store.section_updated_ms("routing");
    assert!(read > 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    store
        .update_section("routing", yaml("{sticky: true}"), false)
        .unwrap();
    assert!(store.section_updated_ms("routing") > read);
    assert_eq!(
        store.section_updated_ms("metrics"),
        read,
        "untouched sections keep the file's time"
    );
}
