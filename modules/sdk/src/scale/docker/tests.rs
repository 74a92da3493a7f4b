//! The Docker scaler against an in-process fake Engine API on a unix
//! socket, which answers as the daemon does (API 1.41) and records every
//! call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::UnixListener;

use super::*;

const PROJECT: &str = "edge";
const SERVICE: &str = "alb";

#[derive(Debug, Clone)]
struct Container {
    id: String,
    name: String,
    labels: BTreeMap<String, String>,
    state: String,
    created: i64,
    /// The create body (for the ones the scaler made), else the template's.
    config: Value,
    networks: Vec<String>,
}

#[derive(Default)]
struct Engine {
    containers: Vec<Container>,
    /// "METHOD path?query" of every call, in order.
    calls: Vec<String>,
    /// Bodies of `POST /containers/create`, by name.
    created: Vec<(String, Value)>,
    faults: Vec<String>,
    next_id: u32,
    clock: i64,
}

type Shared = Arc<Mutex<Engine>>;

fn template_config() -> Value {
    json!({
        "Image": "switchyard/alb:dev",
        "Env": ["MODULE_NLB_ADDR=nlb:50051", "MODULE_CONFIG=/etc/switchyard/alb.yaml", "PATH=/usr/bin"],
        "Cmd": null,
        "Entrypoint": ["/usr/local/bin/alb"],
        "WorkingDir": "",
        "Labels": {
            PROJECT_LABEL: PROJECT,
            SERVICE_LABEL: SERVICE,
            NUMBER_LABEL: "1",
            "com.docker.compose.config-hash": "abc123",
            "com.docker.compose.oneoff": "False",
            "com.docker.compose.version": "2.20.2",
        },
        "StopSignal": "SIGTERM",
    })
}

fn host_config() -> Value {
    json!({
        "Binds": ["/srv/edge/deploy/compose/alb.yaml:/etc/switchyard/alb.yaml:ro"],
        "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
        "NetworkMode": "edge_switchyard",
        "PortBindings": {"9101/tcp": [{"HostIp": "127.0.0.1", "HostPort": "19101"}]},
    })
}

impl Engine {
    fn add(&mut self, number: u32, state: &str) -> String {
        self.next_id += 1;
        self.clock += 10;
        let id = format!("{:0>12}{}", self.next_id, "f".repeat(52));
        let mut labels: BTreeMap<String, String> =
            serde_json::from_value(template_config()["Labels"].clone()).unwrap();
        labels.insert(NUMBER_LABEL.into(), number.to_string());
        self.containers.push(Container {
            id: id.clone(),
            name: format!("{PROJECT}-{SERVICE}-{number}"),
            labels,
            state: state.into(),
            created: self.clock,
            config: template_config(),
            networks: vec!["edge_switchyard".into(), "edge_backend".into()],
        });
        id
    }

    fn find(&self, key: &str) -> Option<usize> {
        self.containers.iter().position(|c| {
            c.id == key || (c.id.starts_with(key) && key.len() >= 12) || c.name == key
        })
    }

    fn inspect(&self, c: &Container) -> Value {
        let mut config = c.config.clone();
        config["Labels"] = json!(c.labels);
        json!({
            "Id": c.id,
            "Name": format!("/{}", c.name),
            "Created": "2026-01-01T00:00:00Z",
            "State": {"Status": c.state, "Running": c.state == "running"},
            "Image": "sha256:0123",
            "Config": config,
            "HostConfig": host_config(),
            "NetworkSettings": {"Networks": c.networks.iter().map(|n| (n.clone(), json!({"Aliases": [SERVICE], "NetworkID": format!("id-{n}")}))).collect::<serde_json::Map<_, _>>()},
        })
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(bytes))
        .unwrap()
}

fn no_such(key: &str) -> Response<Full<Bytes>> {
    reply(404, json!({"message": format!("No such container: {key}")}))
}

fn query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), unescape(v)))
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

async fn handle(engine: Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let q = query(req.uri().query().unwrap_or(""));
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut e = engine.lock();
    e.calls.push(format!(
        "{method} {path}{}",
        if q.is_empty() {
            String::new()
        } else {
            format!(
                "?{}",
                q.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&")
            )
        }
    ));
    let Some(rest) = path.strip_prefix("/v1.41") else {
        e.faults.push(format!("no API version in {path}"));
        return reply(400, json!({"message": "no version"}));
    };
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let json_body = || -> Option<Value> {
        if content_type.as_deref() != Some("application/json") {
            return None;
        }
        serde_json::from_slice(&body).ok()
    };
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["containers", "json"]) => {
            if q.get("all").map(String::as_str) != Some("1") {
                e.faults.push("list without all=1".into());
            }
            let filters: Value =
                serde_json::from_str(q.get("filters").map_or("{}", |s| s)).unwrap();
            let wanted: Vec<(String, String)> = filters["label"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str()?.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if wanted.len() != 2 {
                e.faults.push(format!("filters {filters}"));
            }
            let list: Vec<Value> = e
                .containers
                .iter()
                .filter(|c| wanted.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
                .map(|c| {
                    json!({
                        "Id": c.id, "Names": [format!("/{}", c.name)], "Image": "switchyard/alb:dev",
                        "Labels": c.labels, "State": c.state, "Status": "Up 5 minutes", "Created": c.created,
                    })
                })
                .collect();
            reply(200, Value::Array(list))
        }
        ("GET", ["containers", key, "json"]) => match e.find(key) {
            Some(i) => reply(200, e.inspect(&e.containers[i].clone())),
            None => no_such(key),
        },
        ("POST", ["containers", "create"]) => {
            let Some(b) = json_body() else {
                e.faults.push("create without a JSON body".into());
                return reply(400, json!({"message": "bad body"}));
            };
            let name = q.get("name").cloned().unwrap_or_default();
            if e.containers.iter().any(|c| c.name == name) {
                return reply(
                    409,
                    json!({"message": format!("Conflict. The container name \"/{name}\" is already in use")}),
                );
            }
            let endpoints = b["NetworkingConfig"]["EndpointsConfig"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if endpoints.len() > 1 {
                e.faults.push("API 1.41 takes one network at create".into());
            }
            e.next_id += 1;
            e.clock += 10;
            let id = format!("{:0>12}{}", e.next_id, "a".repeat(52));
            let labels: BTreeMap<String, String> =
                serde_json::from_value(b["Labels"].clone()).unwrap();
            let created = e.clock;
            e.containers.push(Container {
                id: id.clone(),
                name: name.clone(),
                labels,
                state: "created".into(),
                created,
                config: b.clone(),
                networks: endpoints.keys().cloned().collect(),
            });
            e.created.push((name, b));
            reply(201, json!({"Id": id, "Warnings": []}))
        }
        ("POST", ["networks", net, "connect"]) => {
            let Some(b) = json_body() else {
                e.faults.push("connect without a JSON body".into());
                return reply(400, json!({"message": "bad body"}));
            };
            let key = b["Container"].as_str().unwrap_or_default().to_string();
            match e.find(&key) {
                Some(i) => {
                    e.containers[i].networks.push(net.to_string());
                    reply(200, Value::Null)
                }
                None => no_such(&key),
            }
        }
        ("POST", ["containers", key, action @ ("start" | "stop")]) => match e.find(key) {
            Some(i) => {
                let to = if *action == "start" {
                    "running"
                } else {
                    "exited"
                };
                if e.containers[i].state == to {
                    return reply(304, Value::Null);
                }
                e.containers[i].state = to.into();
                reply(204, Value::Null)
            }
            None => no_such(key),
        },
        ("DELETE", ["containers", key]) => match e.find(key) {
            Some(i) if e.containers[i].state == "running" => reply(
                409,
                json!({"message": "You cannot remove a running container: stop it first"}),
            ),
            Some(i) => {
                e.containers.remove(i);
                reply(204, Value::Null)
            }
            None => no_such(key),
        },
        _ => {
            e.faults.push(format!("unexpected {method} {path}"));
            reply(404, json!({"message": "page not found"}))
        }
    }
}

struct Fake {
    engine: Shared,
    dir: tempfile::TempDir,
}

impl Fake {
    async fn start() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("docker.sock")).unwrap();
        let engine: Shared = Arc::default();
        let state = engine.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake { engine, dir }
    }

    fn settings(&self) -> DockerScaling {
        DockerScaling {
            socket: self.dir.path().join("docker.sock"),
            stop_timeout_seconds: 7,
            ..DockerScaling::default()
        }
    }

    /// A scaler running in the container `own` (its host name: the short id).
    fn scaler(&self, own: &str) -> DockerScaler {
        DockerScaler::new(self.settings(), own[..12].to_string())
    }

    fn calls(&self) -> Vec<String> {
        let e = self.engine.lock();
        assert!(e.faults.is_empty(), "{:?}", e.faults);
        e.calls.clone()
    }

    fn running(&self) -> Vec<String> {
        let e = self.engine.lock();
        let mut names: Vec<String> = e
            .containers
            .iter()
            .filter(|c| c.state == "running")
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        names
    }
}

fn to(n: i32) -> ScalingConfig {
    ScalingConfig {
        min_instances: n,
        max_instances: n,
        ..ScalingConfig::default()
    }
}

/// Waits for the work `Scale` may have left running.
async fn settled(fake: &Fake, want: &[&str]) {
    for _ in 0..200 {
        if fake.running() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.running(), want);
}

#[tokio::test]
async fn scaling_up_copies_this_container_with_the_next_numbers_and_starts_the_copies() {
    let fake = Fake::start().await;
    let own = fake.engine.lock().add(1, "running");
    let scaler = fake.scaler(&own);
    let out = scaler.scale(&to(3), true).await.unwrap();
    assert_eq!(
        out,
        ScaleOutcome {
            current_instances: 1,
            desired_instances: 3
        }
    );
    settled(&fake, &["edge-alb-1", "edge-alb-2", "edge-alb-3"]).await;

    let calls = fake.calls();
    let filters =
        r#"{"label":["com.docker.compose.project=edge","com.docker.compose.service=alb"]}"#;
    let short = &own[..12];
    let new_ids: Vec<String> = {
        let e = fake.engine.lock();
        e.containers[1..].iter().map(|c| c.id.clone()).collect()
    };
    assert_eq!(
        calls,
        [
            format!("GET /v1.41/containers/{short}/json"),
            format!("GET /v1.41/containers/json?all=1&filters={filters}"),
            format!("GET /v1.41/containers/{own}/json"),
            "POST /v1.41/containers/create?name=edge-alb-2".to_string(),
            "POST /v1.41/networks/edge_backend/connect".to_string(),
            format!("POST /v1.41/containers/{}/start", new_ids[0]),
            "POST /v1.41/containers/create?name=edge-alb-3".to_string(),
            "POST /v1.41/networks/edge_backend/connect".to_string(),
            format!("POST /v1.41/containers/{}/start", new_ids[1]),
        ]
    );
    let e = fake.engine.lock();
    for ((name, body), n) in e.created.iter().zip([2, 3]) {
        assert_eq!(name, &format!("edge-alb-{n}"));
        assert_eq!(body["Image"], "switchyard/alb:dev");
        assert_eq!(body["Env"], template_config()["Env"]);
        assert_eq!(body["Entrypoint"], json!(["/usr/local/bin/alb"]));
        assert!(
            body.get("Cmd").is_none(),
            "null fields are left out: {body}"
        );
        let labels = &body["Labels"];
        assert_eq!(labels[PROJECT_LABEL], PROJECT);
        assert_eq!(labels[SERVICE_LABEL], SERVICE);
        assert_eq!(labels["com.docker.compose.config-hash"], "abc123");
        assert_eq!(labels[NUMBER_LABEL], n.to_string());
        assert_eq!(labels[SCALED_BY_LABEL], "switchyard-sdk");
        let host = &body["HostConfig"];
        assert_eq!(host["Binds"], host_config()["Binds"]);
        assert_eq!(host["RestartPolicy"]["Name"], "unless-stopped");
        assert_eq!(host["NetworkMode"], "edge_switchyard");
        assert_eq!(
            host["PortBindings"]["9101/tcp"][0],
            json!({"HostIp": "127.0.0.1", "HostPort": ""}),
            "a fixed host port becomes ephemeral"
        );
        assert_eq!(
            body["NetworkingConfig"],
            json!({"EndpointsConfig": {"edge_switchyard": {"Aliases": ["alb"]}}})
        );
    }
    for c in &e.containers[1..] {
        assert_eq!(c.networks, ["edge_switchyard", "edge_backend"]);
    }
}

#[tokio::test]
async fn numbers_already_taken_by_stopped_containers_are_skipped() {
    let fake = Fake::start().await;
    let own = fake.engine.lock().add(1, "running");
    fake.engine.lock().add(2, "exited");
    fake.scaler(&own).scale(&to(2), true).await.unwrap();
    settled(&fake, &["edge-alb-1", "edge-alb-3"]).await;
}

#[tokio::test]
async fn scaling_down_stops_then_removes_the_newest_never_its_own_container() {
    let fake = Fake::start().await;
    let (one, two, three) = {
        let mut e = fake.engine.lock();
        (
            e.add(1, "running"),
            e.add(2, "running"),
            e.add(3, "running"),
        )
    };
    // The scaler runs in the newest container: the next two go.
    let out = fake.scaler(&three).scale(&to(1), true).await.unwrap();
    assert_eq!(
        out,
        ScaleOutcome {
            current_instances: 3,
            desired_instances: 1
        }
    );
    settled(&fake, &["edge-alb-3"]).await;
    let calls = fake.calls();
    let changing: Vec<&String> = calls.iter().filter(|c| !c.starts_with("GET")).collect();
    assert_eq!(changing.len(), 4, "{calls:?}");
    for id in [&one, &two] {
        let stop = calls
            .iter()
            .position(|c| c == &format!("POST /v1.41/containers/{id}/stop?t=7"))
            .unwrap_or_else(|| panic!("{id} not stopped with t=7: {calls:?}"));
        let remove = calls
            .iter()
            .position(|c| c == &format!("DELETE /v1.41/containers/{id}?v=1"))
            .unwrap_or_else(|| panic!("{id} not removed: {calls:?}"));
        assert!(stop < remove, "{calls:?}");
    }
    assert!(calls
        .iter()
        .all(|c| !c.contains(&format!("{three}/")) && !c.ends_with(&three)));
    assert_eq!(fake.engine.lock().containers.len(), 1);
}

#[tokio::test]
async fn scaling_down_takes_the_newest_first() {
    let fake = Fake::start().await;
    let (one, _, three) = {
        let mut e = fake.engine.lock();
        (
            e.add(1, "running"),
            e.add(2, "running"),
            e.add(3, "running"),
        )
    };
    fake.scaler(&one).scale(&to(2), true).await.unwrap();
    settled(&fake, &["edge-alb-1", "edge-alb-2"]).await;
    assert!(fake
        .calls()
        .contains(&format!("POST /v1.41/containers/{three}/stop?t=7")));
}

#[tokio::test]
async fn scaling_to_zero_keeps_its_own_container_and_says_so() {
    let fake = Fake::start().await;
    let own = {
        let mut e = fake.engine.lock();
        let own = e.add(1, "running");
        e.add(2, "running");
        own
    };
    let out = fake.scaler(&own).scale(&to(0), true).await.unwrap();
    assert_eq!(out.desired_instances, 1);
    settled(&fake, &["edge-alb-1"]).await;
}

#[tokio::test]
async fn at_the_target_nothing_changes() {
    let fake = Fake::start().await;
    let own = fake.engine.lock().add(1, "running");
    let out = fake.scaler(&own).scale(&to(1), true).await.unwrap();
    assert_eq!(out.desired_instances, 1);
    assert!(fake.calls().iter().all(|c| c.starts_with("GET")));
}

#[tokio::test]
async fn outside_a_compose_container_the_project_setting_is_named() {
    let fake = Fake::start().await;
    fake.engine.lock().add(1, "running");
    let scaler = DockerScaler::new(fake.settings(), "not-a-container".into());
    let e = scaler.scale(&to(2), true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("scaling.docker.project"), "{e}");
    assert!(e.to_string().contains("not-a-container"), "{e}");

    // With the project and service set, it scales the service from outside.
    let settings = DockerScaling {
        project: PROJECT.into(),
        service: SERVICE.into(),
        ..fake.settings()
    };
    let scaler = DockerScaler::new(settings, "not-a-container".into());
    scaler.scale(&to(2), true).await.unwrap();
    settled(&fake, &["edge-alb-1", "edge-alb-2"]).await;
}

#[tokio::test]
async fn a_missing_socket_is_named() {
    let settings = DockerScaling {
        socket: "/nonexistent/docker.sock".into(),
        ..DockerScaling::default()
    };
    let e = DockerScaler::new(settings, "abc".into())
        .scale(&to(2), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.to_string().contains("/nonexistent/docker.sock"), "{e}");
}
